"""Helpers of bench/gpu_smoke.sh (the end-to-end GPU smoke run of every script); not a test.

    python bench/gpu_smoke.py build --shape 1.5b DIR      # random Qwen2.5-Math-1.5B-shaped model + tiny tokenizer
    python bench/gpu_smoke.py exec --record F --label L grpo.py --flags ...      # run a script, record peak memory
    python bench/gpu_smoke.py summarize WORK OUT          # metrics of every run -> OUT/summary.md, OUT/metrics.jsonl

Peak GPU memory is measured here, around the whole process (torch.cuda.max_memory_allocated / _reserved at exit),
not by the scripts: one number per process (a first run or its resume), not per step.
"""
import argparse
import json
import math
import random
import runpy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402

SHAPES = {
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    # the CPU's stand-in: 1.5B's vocabulary would make a 2-core step take minutes (the LM head dominates)
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def build(folder: Path, shape: str) -> None:
    """Qwen2.5-Math-1.5B's config with random weights, saved bf16 as a hub folder with the tiny tokenizer. Its ~440
    ids are a corner of the vocabulary (as Qwen's 151,665 of 151,936 are): a random model samples mostly ids that the
    tokenizer lacks, which decoding must take."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    tokenizer = evaluation.train_tiny_tokenizer(random.Random(0))
    im_end, bos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=bos, eos_token_id=im_end,
                         **SHAPES[shape])
    assert config.vocab_size >= len(tokenizer)
    start = time.time()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1.5B random init: seconds on a GPU
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, bos], pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {shape}: {params / 1e9:.3f}B parameters, vocab {config.vocab_size} (tokenizer {len(tokenizer)}), "
          f"saved bf16 to {folder} in {time.time() - start:.1f} s")


def execute(script: str, argv: list[str], record: Path, label: str) -> None:
    """Run a script as `python script argv` would, in this process, and append its peak GPU memory to `record`."""
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        peak = {"label": label}
        if torch.cuda.is_available():
            peak.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
        with open(record, "a") as f:
            f.write(json.dumps(peak) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def finite_check(rows: list[dict]) -> str:
    """'yes' when every loss and gradient norm of every step is a finite number; else which were not."""
    bad, seen = [], 0
    for row in rows:
        for key, value in row.items():
            if "loss" in key or "grad_norm" in key:
                seen += 1
                if not (isinstance(value, (int, float)) and math.isfinite(value)):
                    bad.append(f"{key}@{row['step']}={value}")
        if not any("loss" in k for k in row) or not any("grad_norm" in k for k in row):  # ppo.py: policy_loss
            bad.append(f"no loss or grad_norm@{row['step']}")
    return "no steps" if not rows else ("yes" if not bad and seen else "NO: " + ", ".join(bad))


def fmt(values, digits=".1f") -> str:
    return " / ".join(format(v, digits) for v in values) if values else "-"


def summarize(work: Path, out: Path) -> str:
    """One row per script: each step's seconds (generate, score, train, other), the peak memory of its first run and
    of its resume, the mean engine-trainer log-prob gap, and whether all losses and gradient norms were finite."""
    status = {r["label"]: r for r in read_jsonl(work / "status.jsonl")}
    peaks = {r["label"]: r for r in read_jsonl(work / "peaks.jsonl")}
    merged, lines = [], []
    header = ["script", "exit (run, resume)", "steps", "generate s", "score s", "train s", "other s",
              "peak alloc GiB (run, resume)", "peak reserved GiB", "logprob_gap", "finite loss & grad", "wall s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for script in ("grpo", "eval", "ppo", "pcl", "one_shot", "hapo"):  # the order they run in
        phases = [f"{script}/run", f"{script}/resume"] if script != "eval" else ["eval/run"]
        if not any(p in status for p in phases):
            continue
        rows = read_jsonl(work / "runs" / script / "metrics.jsonl")
        merged += [{"script": script, **r} for r in rows]
        merged += [{"script": script, **status.get(p, {}), **peaks.get(p, {})} for p in phases if p in status]
        exits = ", ".join(str(status[p]["rc"]) if p in status else "-" for p in phases)
        peak = lambda key: ", ".join(f"{peaks[p][key]:.1f}" if key in peaks.get(p, {}) else "-" for p in phases)
        wall = sum(status[p].get("wall_s", 0) for p in phases if p in status)
        if script == "eval":
            results = json.loads((work / "runs" / "eval" / "results.json").read_text()) \
                if (work / "runs" / "eval" / "results.json").is_file() else {"benchmarks": {}}
            done = ", ".join(f"{name} {r['problems']}x{r['n']} in {r['seconds']} s"
                             for name, r in results["benchmarks"].items())
            lines.append(f"| eval.py | {exits} | {done or '-'} | | | | | {peak('peak_allocated_gib')} | "
                         f"{peak('peak_reserved_gib')} | | | {wall:.0f} |")
            continue
        other = [sum(v for k, v in r.items() if k.startswith("time_") and k not in
                     ("time_generate", "time_score", "time_train")) for r in rows]
        gaps = [r["logprob_gap"] for r in rows if "logprob_gap" in r]
        lines.append(f"| {script}.py | {exits} | {', '.join(str(r['step']) for r in rows) or '-'} | "
                     f"{fmt([r['time_generate'] for r in rows])} | {fmt([r['time_score'] for r in rows], '.3f')} | "
                     f"{fmt([r['time_train'] for r in rows])} | {fmt(other) if any(other) else '-'} | "
                     f"{peak('peak_allocated_gib')} | {peak('peak_reserved_gib')} | "
                     f"{fmt(gaps, '.2e') if gaps else '-'} | {finite_check(rows)} | {wall:.0f} |")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in merged)
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--shape", choices=SHAPES, default="1.5b")
    b.add_argument("folder", type=Path)
    e = sub.add_parser("exec")
    e.add_argument("--record", type=Path, required=True)
    e.add_argument("--label", required=True)
    e.add_argument("script")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    s = sub.add_parser("summarize")
    s.add_argument("work", type=Path)
    s.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        build(args.folder, args.shape)
    elif args.command == "exec":
        execute(args.script, args.argv, args.record, args.label)
    else:
        print(summarize(args.work, args.out))


if __name__ == "__main__":
    main()
