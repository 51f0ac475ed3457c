"""eval.py: benchmarks, metrics, and the command line. CPU only, no network (~1 min on 2 cores; where vLLM is installed,
its sampling tests start two tiny engines, ~1 min more)."""
import csv
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as evaluation  # noqa: E402
import verify  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
SIZES = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva_math": 272, "olympiadbench": 675,
         "gsm8k": 1319}
# Golds that do not grade as correct against themselves: math-verify cannot parse them, so every response to them
# scores 0 and eval.py counts them as unparseable golds.
UNPARSEABLE_GOLDS = {
    ("minerva_math", "np.arcsin(10/13)"): "Python code, not math",
    ("minerva_math", "\\frac{dM}{dt}=\\frac{10^{5} L_{\\odot}}{0.007 c^{2} M_{\\odot}^{6}} M^{6}"):
        "a differential equation with \\odot subscripts",
    ("minerva_math", "-1./3"): "Fortran-style decimal point before the slash",
    ("minerva_math", "-3./2"): "Fortran-style decimal point before the slash",
    ("minerva_math", "\\hbar \\omega(v+1 / 2)-\\frac{E_{0}^{2} e^{2}}{2 m \\omega^{2}}"):
        "\\hbar times a function-call-like \\omega(...)",
    ("minerva_math", "E_{1},E_{2}"): "a list of subscripted symbols",
    ("olympiadbench", "m_{\\max }=n^{2}-n-1"): "\\max in a subscript",
    ("olympiadbench", "f(x)=a x+b, where b is an arbitrary integer, and a is an arbitrary positive integer with "
                      "\\mho(a)=0"): "prose",
    ("olympiadbench", "(-\\infty, 0) \\cup\\{1\\}."): "a union with an escaped-brace set and a trailing period",
    ("olympiadbench", "t(0,4]"): "a stray 't' before the interval",
}


def run_cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model and its tokenizer, loaded once."""
    return evaluation.load_model("tiny")


# ---- pass@k ----------------------------------------------------------------------------------------------------

def exact_pass_at_k_by_enumeration(n, c, k):
    """The definition: the share of k-subsets of the n samples that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def exact_pass_at_k_by_product(n, c, k):
    """1 - prod_{i<k} (n-c-i)/(n-i): another exact form, built without binomials."""
    miss = Fraction(1)
    for i in range(k):
        miss *= Fraction(max(n - c - i, 0), n - i)
    return 1 - miss


def test_pass_at_k_equals_its_definition_on_small_n():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert evaluation.pass_at_k(n, c, k) == float(exact_pass_at_k_by_enumeration(n, c, k)), (n, c, k)


@pytest.mark.parametrize("c", [0, 1, 2, 7, 100, 512, 1000, 1023, 1024])
@pytest.mark.parametrize("k", [1, 2, 8, 64, 256, 512, 1000, 1024])
def test_pass_at_k_is_exact_at_n_1024(c, k):
    assert evaluation.pass_at_k(1024, c, k) == float(exact_pass_at_k_by_product(1024, c, k))


def test_pass_at_k_edge_cases():
    assert evaluation.pass_at_k(1024, 1, 1) == 1 / 1024
    assert evaluation.pass_at_k(1024, 0, 1024) == 0.0
    assert evaluation.pass_at_k(1024, 1, 1024) == 1.0, "n - c < k: every k-subset holds the correct sample"
    assert evaluation.pass_at_k(8, 3, 6) == 1.0
    for bad in [(8, 9, 1), (8, -1, 1), (8, 2, 0), (8, 2, 9)]:
        with pytest.raises(ValueError):
            evaluation.pass_at_k(*bad)


def test_summarize_gives_avg_at_n_pass_at_k_and_lengths():
    def sample(correct, length):
        return {"correct": float(correct), "length": length, "truncated": length >= 10, "gold_parseable": True}
    samples = [sample(c, length) for c, length in
               [(1, 1), (0, 2), (0, 3), (0, 4), (1, 5), (1, 6), (1, 7), (1, 10)]]  # problem A: 1 of 4, B: 4 of 4
    metrics = evaluation.summarize(samples, n=4, ks=(1, 2, 4, 8))
    assert metrics["accuracy"] == 5 / 8
    assert metrics["pass@1"] == 5 / 8
    assert metrics["pass@2"] == (evaluation.pass_at_k(4, 1, 2) + 1.0) / 2
    assert metrics["pass@4"] == 1.0
    assert "pass@8" not in metrics, "pass@k needs k <= n"
    assert metrics["response_len_mean"] == 38 / 8
    assert metrics["response_len_p90"] == 10, "nearest rank: the 8th of 8 sorted lengths"
    assert metrics["truncated_share"] == 1 / 8
    assert metrics["unparseable_golds"] == 0


# ---- benchmarks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SIZES))
def test_each_benchmark_loads_with_its_size(name):
    problems = evaluation.load_benchmark(name, str(DATA_DIR))
    assert len(problems) == SIZES[name]
    for p in problems:
        assert isinstance(p["problem"], str) and p["problem"].strip()
        assert isinstance(p["answer"], str) and p["answer"].strip()


@pytest.mark.slow
def test_every_gold_grades_as_correct_against_itself():
    golds = [(name, p["answer"]) for name in SIZES for p in evaluation.load_benchmark(name, str(DATA_DIR))]
    scores = verify.score_batch([f"\\boxed{{{gold}}}" for _, gold in golds], [gold for _, gold in golds],
                                mode="boxed", workers=2)
    failing = {key for key, score in zip(golds, scores) if score != 1.0}
    assert failing == set(UNPARSEABLE_GOLDS), (f"new failures: {failing - set(UNPARSEABLE_GOLDS)}; listed but now "
                                               f"matching: {set(UNPARSEABLE_GOLDS) - failing}")


def test_golds_are_read_where_each_file_keeps_them():
    first = {name: evaluation.load_benchmark(name, str(DATA_DIR))[0]["answer"] for name in SIZES}
    assert first["amc23"] == "27", "AMC23 stores 27.0; the gold is the integer"
    assert first["gsm8k"] == "18", "GSM8K's gold follows ####"
    assert first["minerva_math"] == "1.6", "Minerva's gold is the last box of the solution"
    assert first["olympiadbench"] == "2"
    olympiad = [p["answer"] for p in evaluation.load_benchmark("olympiadbench", str(DATA_DIR))]
    assert not any("$" in gold for gold in olympiad), "OlympiadBench golds lose their $ delimiters"
    gsm8k = [p["answer"] for p in evaluation.load_benchmark("gsm8k", str(DATA_DIR))]
    assert "2125" in gsm8k and not any("," in gold for gold in gsm8k), "thousands separators dropped: 2,125 -> 2125"
    assert verify.score("so \\boxed{27}", first["amc23"]) == 1.0


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation.load_benchmark("math500", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"math500/test\.jsonl not found"):
        evaluation.load_benchmark("math500", str(tmp_path))


def test_row_without_answer_names_file_and_row(tmp_path):
    (tmp_path / "math500").mkdir()
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "solution": "4"}]
    (tmp_path / "math500" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"math500/test\.jsonl: row 1 has no usable gold answer"):
        evaluation.load_benchmark("math500", str(tmp_path))


def test_training_rows_without_an_answer_are_dropped_and_counted(capsys):
    dsr_sub = DATA_DIR.parent / "train" / "one_shot_rlvr" / "dsr_sub.jsonl"
    problems = evaluation.load_problems(str(dsr_sub))
    assert len(problems) == 1208  # 1209 rows, row 265 has an empty answer
    assert all(p["answer"].strip() and p["problem"].strip() for p in problems)
    printed = capsys.readouterr().out
    assert "dropped 1 rows with an empty 'problem' or 'answer' (rows 265)" in printed


def test_a_missing_column_or_no_usable_row_is_a_clear_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 has no 'problem' \(its keys: question, answer\)"):
        evaluation.load_problems(str(path))
    path.write_text(json.dumps({"problem": "1+1?", "answer": " "}) + "\n")
    with pytest.raises(ValueError, match="no row has both a 'problem' and an 'answer'"):
        evaluation.load_problems(str(path))


def test_unknown_benchmark_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown benchmark 'math5000'"):
        evaluation.load_benchmark("math5000", str(DATA_DIR))


def write_math_beyond_csv(folder):
    (folder / "math_beyond").mkdir()
    rows = [
        {"problem": "Find x, if 2x = 6.", "answer": "3", "qwen2.5-math-1.5b_unsolved": "True",
         "llama-3.1-8b_unsolved": "False"},
        {"problem": 'A "quoted", two-line\nproblem.', "answer": "\\frac{1}{2}", "qwen2.5-math-1.5b_unsolved": "False",
         "llama-3.1-8b_unsolved": "True"},
        {"problem": "What is 10 - 3?", "answer": "7", "qwen2.5-math-1.5b_unsolved": "True",
         "llama-3.1-8b_unsolved": "True"},
    ]
    with open(folder / "math_beyond" / "test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_math_beyond_reads_a_local_csv_and_selects_a_models_unsolved_subset(tmp_path):
    write_math_beyond_csv(tmp_path)
    everything = evaluation.load_benchmark("math_beyond", str(tmp_path))
    assert [p["answer"] for p in everything] == ["3", "\\frac{1}{2}", "7"]
    assert everything[1]["problem"] == 'A "quoted", two-line\nproblem.'
    qwen = evaluation.load_benchmark("math_beyond", str(tmp_path), subset="qwen2.5-math-1.5b")
    assert [p["row"] for p in qwen] == [0, 2]
    by_hub_id = evaluation.load_benchmark("math_beyond", str(tmp_path), subset="Qwen/Qwen2.5-Math-1.5B")
    assert by_hub_id == qwen, "a hub id names the same subset"
    with pytest.raises(ValueError, match="models: llama-3.1-8b, qwen2.5-math-1.5b"):
        evaluation.load_benchmark("math_beyond", str(tmp_path), subset="gpt-2")


def test_template_is_byte_exact():
    expected = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                "<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n")
    assert evaluation.build_prompt("{problem}", None, "qwen25-math-cot") == expected
    assert evaluation.build_prompt("What is 1+1?", None, "qwen25-math-cot") == expected.replace("{problem}",
                                                                                                "What is 1+1?")


def llama_style_tokenizer():
    """A tokenizer whose encode adds a BOS (a post-processor, as Llama 3's) and whose chat template writes it too."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["<s>", "</s>", "<unk>", "What", "is", "1", "+", "?"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", chat_template="<s>{% for m in messages %}{{ m['content'] }}"
                                                                   "{% endfor %}")


def test_chat_template_asks_for_a_boxed_answer():
    prompt = evaluation.build_prompt("What is 1+1?", llama_style_tokenizer(), "chat")
    assert prompt == "<s>What is 1+1?" + evaluation.TRAIN_SUFFIX


def test_a_prompt_that_starts_with_the_bos_gets_no_second_one():
    tokenizer = llama_style_tokenizer()
    chat = evaluation.build_prompt("What is 1+1?", tokenizer, "chat")
    assert tokenizer.encode(chat)[:2] == [0, 0], "the defect encode_prompt avoids: a second BOS"
    assert evaluation.encode_prompt(tokenizer, chat) == tokenizer.encode(chat)[1:]
    plain = evaluation.build_prompt("What is 1+1?", tokenizer, "plain")
    assert evaluation.encode_prompt(tokenizer, plain) == tokenizer.encode(plain), "no BOS in the text: encode's own"
    assert evaluation.encode_prompt(tokenizer, plain).count(0) == 1


def test_hf_generate_gives_the_model_one_bos(tiny, monkeypatch):
    model, _ = tiny
    tokenizer = llama_style_tokenizer()  # its ids are all in the tiny model's vocabulary
    seen = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda input_ids, **kw: seen.append(input_ids.tolist()) or
                        real_generate(input_ids=input_ids, **kw))
    prompt = evaluation.build_prompt("What is 1+1?", tokenizer, "chat")
    evaluation.generate(model, tokenizer, [prompt], max_tokens=2)
    assert seen == [[evaluation.encode_prompt(tokenizer, prompt)]] and seen[0][0].count(0) == 1


class FakeVLLM:
    """Records what generate() hands a vLLM engine, and answers every sample with the stop token."""
    llm_engine = None

    def __init__(self):
        self.prompts, self.params = [], []

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace
        self.prompts, self.params = prompts, params
        stop = SimpleNamespace(token_ids=[1], finish_reason="stop", logprobs=[{1: SimpleNamespace(logprob=0.0)}])
        return [SimpleNamespace(outputs=[stop] * p.n) for p in params]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_gets_token_ids_with_one_bos():
    tokenizer, engine = llama_style_tokenizer(), FakeVLLM()
    prompt = evaluation.build_prompt("What is 1+1?", tokenizer, "chat")
    evaluation.generate(engine, tokenizer, [prompt], max_tokens=2)
    assert engine.prompts == [{"prompt_token_ids": evaluation.encode_prompt(tokenizer, prompt)}], \
        "a text prompt would get vLLM's own BOS on top of the template's"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_sampling_seeds_follow_the_problems_index_in_its_benchmark():
    tokenizer, engine = llama_style_tokenizer(), FakeVLLM()
    evaluation.generate(engine, tokenizer, ["What", "is", "1"], n=4, temperature=0.6, seed=3, first_index=0)
    whole = [p.seed for p in engine.params]
    evaluation.generate(engine, tokenizer, ["is", "1"], n=4, temperature=0.6, seed=3, first_index=1)
    assert [p.seed for p in engine.params] == whole[1:], "a shard starting at problem 1 seeds it as one process does"
    assert len(set(whole)) == 3 and min(b - a for a, b in itertools.combinations(sorted(whole), 2)) >= 4, \
        "vLLM seeds sample k with seed + k: problems' seeds must not share those"
    evaluation.generate(engine, tokenizer, ["What"], n=4, temperature=0.6, seed=4, first_index=0)
    assert engine.params[0].seed != whole[0], "another --seed, other samples"
    evaluation.generate(engine, tokenizer, ["What"], n=1, temperature=0.0, seed=3, first_index=0)
    assert engine.params[0].seed is None, "greedy needs no seed (a seed would cost vLLM its fused sampler)"
    evaluation.generate(engine, tokenizer, ["What"], n=4, temperature=0.6, seed=3)
    assert engine.params[0].seed is None, "a trainer's call: the call's own seeded stream, no per-request loop"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_a_torchrun_shard_of_evaluate_seeds_its_problems_by_their_index_in_the_benchmark(monkeypatch):
    """evaluate() as the training scripts call it, on the second of two shards (problems 2 and 3 of 4)."""
    tokenizer, engine = llama_style_tokenizer(), FakeVLLM()
    monkeypatch.setattr(evaluation, "engine_shard", lambda engine: (1, 2, True))
    monkeypatch.setattr(evaluation, "gather_samples", lambda samples, *args, **kwargs: samples)
    problems = [{"problem": word, "answer": "1"} for word in ("What", "is", "1", "?")]
    evaluation.evaluate(engine, tokenizer, problems, template="plain", n=2, temperature=0.6, seed=3)
    assert [p.seed for p in engine.params] == [evaluation.sampling_seed(3, 2), evaluation.sampling_seed(3, 3)]


# ---- grading and evaluate() (the training scripts' entry point) -------------------------------------------------

def test_an_unparseable_gold_is_counted_and_never_correct():
    problems = [{"problem": "p1", "answer": "???"}, {"problem": "p2", "answer": "4"}]
    completions = [[{"text": "\\boxed{???}", "token_ids": [1, 2], "truncated": False}],
                   [{"text": "\\boxed{4}", "token_ids": [1, 2, 3], "truncated": False}]]
    samples = evaluation.grade(problems, ["q1", "q2"], completions, mode="boxed")
    assert [s["correct"] for s in samples] == [0.0, 1.0]
    assert evaluation.summarize(samples, n=1)["unparseable_golds"] == 1


def test_a_gold_whose_parse_timed_out_is_asked_again_and_not_counted_unparseable(monkeypatch):
    monkeypatch.setattr(evaluation, "_gold_verdicts", {})
    verdicts, asked = iter([None, True]), []  # None: verify's answer when the parse timed out or its worker died
    monkeypatch.setattr(verify, "gold_is_parseable", lambda gold: asked.append(gold) or next(verdicts))
    problems = [{"problem": "p", "answer": "7"}]
    wrong = [[{"text": "\\boxed{1}", "token_ids": [1], "truncated": False}]]
    first = evaluation.grade(problems, ["q"], wrong)
    assert first[0]["gold_parseable"] is None and evaluation.summarize(first, n=1)["unparseable_golds"] == 0
    assert evaluation.bad_golds(evaluation.summarize(first, n=1)) == "0 (+1 timed out)", "unknown, and shown so"
    second = evaluation.grade(problems, ["q"], wrong)
    assert second[0]["gold_parseable"] is True and asked == ["7", "7"], "an unknown verdict is not remembered"
    evaluation.grade(problems, ["q"], wrong)
    assert asked == ["7", "7"], "a verdict is remembered"


def test_hf_batch_size_counts_sequences(tiny, monkeypatch):
    """pass@1024 must fit: --batch-size bounds the sequences of one HF generate call, splitting a prompt's n."""
    model, tokenizer = tiny
    rows = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda input_ids, **kw: rows.append(len(input_ids)) or
                        real_generate(input_ids=input_ids, **kw))
    prompts = [evaluation.build_prompt(p["problem"], tokenizer, "qwen-math-train") for p in evaluation.toy_problems(2)]
    completions = evaluation.generate(model, tokenizer, prompts, n=5, temperature=1.0, max_tokens=4, batch_size=4)
    assert rows == [4, 4, 2] and [len(c) for c in completions] == [5, 5]


def test_hf_samples_at_n_1_are_those_of_prompt_batches(tiny):
    """n = 1: a batch of sequences is a batch of prompts, so greedy and n = 1 samples are what they were."""
    model, tokenizer = tiny
    prompts = [evaluation.build_prompt(p["problem"], tokenizer, "qwen-math-train") for p in evaluation.toy_problems(3)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")  # as generate() did
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = model.generate(**enc, max_new_tokens=6, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             eos_token_id=evaluation.stop_token_ids(tokenizer, model),
                             pad_token_id=tokenizer.pad_token_id)
    old = [evaluation.completion_record(tokenizer, ids.tolist(), evaluation.stop_token_ids(tokenizer, model), 6)
           for ids in out[:, enc.input_ids.shape[1]:]]
    new = evaluation.generate(model, tokenizer, prompts, n=1, temperature=1.0, max_tokens=6, seed=0, batch_size=3)
    assert [c[0]["token_ids"] for c in new] == [r["token_ids"] for r in old]


def test_evaluate_on_the_tiny_model_keeps_the_training_api(tiny):
    model, tokenizer = tiny
    problems = evaluation.toy_splits()[1][:4]
    metrics, samples = evaluation.evaluate(model, tokenizer, problems, template="qwen-math-train", n=4,
                                           temperature=1.0, max_tokens=24, mode="boxed", ks=(1, 4))
    assert {"accuracy", "response_len_mean", "truncated_share", "response_len_p90", "unparseable_golds",
            "pass@1", "pass@4"} <= set(metrics)
    assert math.isclose(metrics["pass@1"], metrics["accuracy"]), "pass@1 is avg@n"
    assert len(samples) == 16
    assert {"prompt", "response", "extracted", "gold", "correct", "length", "truncated"} <= set(samples[0])


# ---- the command line ------------------------------------------------------------------------------------------

def test_decoding_defaults_follow_the_papers_protocol():
    def decoding(name, *argv):
        args = evaluation.parse_args(list(argv))
        return evaluation.decoding_for(name, args, evaluation.parse_ks(args.k))
    math500, aime = decoding("math500"), decoding("aime24")
    assert (math500["n"], math500["temperature"], math500["template"], math500["max_tokens"]) == \
        (1, 0.0, "qwen25-math-cot", 3072), "greedy on MATH500"
    assert (aime["n"], aime["temperature"], aime["ks"]) == (8, 0.6, (8,)), "avg@8 at T=0.6 on AIME"
    assert decoding("aime24", "--temperature", "0")["n"] == 1, "--temperature 0 makes every benchmark greedy"
    assert decoding("math500", "--n", "4")["temperature"] == 0.6, "sampling several needs a temperature"
    assert decoding("math500", "--n", "4", "--k", "1,4,8")["ks"] == (1, 4)
    toy = decoding("toy")
    assert (toy["template"], toy["mode"], toy["n"]) == ("qwen-math-train", "boxed", 1)


def test_engine_vllm_without_vllm_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(evaluation.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit, match="pip install vllm"):
        evaluation.load_engine("tiny", "vllm", seed=0)


@pytest.mark.slow
def test_cli_with_no_arguments_evaluates_the_tiny_model_on_the_toy_task(tmp_path):
    done = run_cli("--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    toy = results["benchmarks"]["toy"]
    held_out = len(evaluation.toy_splits()[1])
    assert toy["problems"] == held_out and toy["n"] == 1 and toy["temperature"] == 0.0 and toy["mode"] == "boxed"
    assert toy["response_len_mean"] > 0 and toy["unparseable_golds"] == 0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == held_out
    assert toy["accuracy"] == sum(s["correct"] for s in samples) / held_out, "accuracy: the share of correct samples"
    assert {"benchmark", "prompt", "response", "extracted", "gold", "correct", "length"} <= set(samples[0])
    assert "toy" in done.stdout and "accuracy" in done.stdout, "the results table"


# ---- the tiny model's cache under torchrun ------------------------------------------------------------------------
def fake_build(folder, seed=0, **recipe):
    (folder / "config.json").write_text(json.dumps({"fillers": recipe.get("fillers")}))


def test_each_built_in_model_has_its_own_folder_and_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(evaluation, "build_tiny_model", fake_build)
    for name, fillers in (("tiny", evaluation.TOY_FILLERS), ("tiny-verbose", evaluation.TOY_VERBOSE_FILLERS)):
        path = Path(evaluation.resolve_model_path(name))
        assert path == tmp_path / f"{name}-v{evaluation.TINY_VERSION}-seed0"
        assert json.loads((path / "config.json").read_text())["fillers"] == list(fillers)
    assert evaluation.resolve_model_path("tiny-other") == "tiny-other"  # any other name is a hub id or folder


def test_a_broken_tiny_model_folder_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(evaluation, "build_tiny_model", fake_build)
    broken = tmp_path / f"tiny-v{evaluation.TINY_VERSION}-seed0"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")  # what a build on a non-zero torchrun rank leaves behind
    assert Path(evaluation.tiny_model_path()) == broken and (broken / "config.json").exists()


def test_other_local_ranks_wait_for_local_rank_0(tmp_path, monkeypatch):
    import threading
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(evaluation, "build_tiny_model", lambda *a: pytest.fail("a non-zero local rank built"))
    target = tmp_path / f"tiny-v{evaluation.TINY_VERSION}-seed0"
    threading.Timer(0.5, lambda: (target.mkdir(), fake_build(target))).start()
    assert Path(evaluation.tiny_model_path()) == target


def test_a_build_that_writes_no_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(evaluation, "build_tiny_model", lambda folder, seed=0, **recipe: None)  # as on global rank != 0
    with pytest.raises(SystemExit, match="only global rank 0 can build it"):
        evaluation.tiny_model_path()
    assert not (tmp_path / f"tiny-v{evaluation.TINY_VERSION}-seed0").exists()


# ---- sampling with vLLM: reproducible whatever ran before or beside a problem -------------------------------------
@pytest.fixture(scope="module")
def vllm_tiny():
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer
    path = evaluation.resolve_model_path("tiny")
    return evaluation.make_engine(path, seed=0), AutoTokenizer.from_pretrained(path)


def vllm_samples(vllm_tiny, problems, seed=0, first_index=0):
    engine, tokenizer = vllm_tiny
    samples = evaluation.sample_and_grade(engine, tokenizer, problems, "qwen-math-train", n=3, temperature=1.0,
                                          top_p=1.0, max_tokens=24, seed=seed, mode="boxed", batch_size=64,
                                          progress=False, first_index=first_index)
    return [s["response"] for s in samples]


def test_vllm_samples_depend_on_the_seed_and_the_problems_index_only(vllm_tiny):
    """A benchmark's samples are the same whether or not another sampled benchmark ran before it on the engine, and
    a shard's (problems 2-3 of 4, as on a second rank) are those of one process over all problems."""
    problems = evaluation.toy_splits()[1][:4]
    alone = vllm_samples(vllm_tiny, problems)
    vllm_samples(vllm_tiny, evaluation.toy_problems(3, seed=5))  # another benchmark
    assert vllm_samples(vllm_tiny, problems) == alone
    assert vllm_samples(vllm_tiny, problems[2:], first_index=2) == alone[6:], "a shard's samples differ"
    assert len(set(alone)) > 4, "the 3 samples of a problem are not one response 3 times"
    assert vllm_samples(vllm_tiny, problems, seed=1) != alone, "another --seed, other samples"


def test_vllm_samples_a_batch_larger_than_one_prefill_step(vllm_tiny):
    """64 problems x 8 seeded samples (PCL's probe): more prompt tokens than one engine step takes. A prefill split
    over steps made vLLM 0.32 rewind the request's generator, which a CPU generator cannot (RuntimeError)."""
    engine, tokenizer = vllm_tiny
    samples = evaluation.sample_and_grade(engine, tokenizer, evaluation.toy_problems(64, seed=3), "qwen-math-train",
                                          n=8, temperature=1.0, top_p=1.0, max_tokens=8, seed=0, mode="boxed",
                                          batch_size=64, progress=False)
    assert len(samples) == 64 * 8


@pytest.mark.slow
def test_vllm_samples_are_the_same_with_the_engine_core_in_a_child_process(vllm_tiny, tmp_path):
    """vLLM's default on a GPU runs the engine core, and its sampler, in a child process, which no seed set in this
    process reaches (VLLM_ENABLE_V1_MULTIPROCESSING=1; eval.py sets 0 on CPUs only)."""
    out = subprocess.run([sys.executable, __file__, "vllm-samples", str(tmp_path / "samples.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    in_process = vllm_samples(vllm_tiny, evaluation.toy_splits()[1][:4])
    assert json.loads((tmp_path / "samples.json").read_text()) == {"first": in_process, "after another": in_process}


def vllm_samples_in_a_child_engine(output: str) -> None:
    """Samples of the first 4 held-out problems from a fresh engine, before and after another sampled benchmark."""
    from transformers import AutoTokenizer
    path = evaluation.resolve_model_path("tiny")
    engine = (evaluation.make_engine(path, seed=0), AutoTokenizer.from_pretrained(path))
    first = vllm_samples(engine, evaluation.toy_splits()[1][:4])
    vllm_samples(engine, evaluation.toy_problems(3, seed=5))
    Path(output).write_text(json.dumps({"first": first,
                                        "after another": vllm_samples(engine, evaluation.toy_splits()[1][:4])}))


if __name__ == "__main__" and sys.argv[1:2] == ["vllm-samples"]:  # a main module: vLLM spawns its engine core
    vllm_samples_in_a_child_engine(sys.argv[2])


# ---- fidelity (issue 21) ---------------------------------------------------------------------------------------
def penalised_tiny_copy(folder: Path) -> str:
    """The tiny model whose generation_config.json asks for a strong repetition penalty, an n-gram ban and a small
    top-k, as hub checkpoints do (Qwen2.5's instruct models: repetition_penalty 1.05-1.1)."""
    import shutil
    shutil.copytree(evaluation.resolve_model_path("tiny"), folder, dirs_exist_ok=True)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(repetition_penalty=3.0, no_repeat_ngram_size=2, top_k=2, do_sample=True, temperature=0.3)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return str(folder)


def test_hf_generation_ignores_the_checkpoints_generation_config(tiny, tmp_path):
    """eval.py's HF greedy answers must be the model's own, as vLLM's are: a penalty the checkpoint asks for must not
    change them."""
    model, tokenizer = tiny
    penalised, _ = evaluation.load_model(penalised_tiny_copy(tmp_path))
    assert penalised.generation_config.repetition_penalty == 3.0
    prompts = [evaluation.build_prompt(p["problem"], tokenizer, "qwen-math-train")
               for p in evaluation.toy_problems(6, seed=4)]
    clean = evaluation.generate(model, tokenizer, prompts, max_tokens=40)
    assert evaluation.generate(penalised, tokenizer, prompts, max_tokens=40) == clean
