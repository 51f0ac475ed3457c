"""HAPO against GRPO on the same task, seed and number of steps: response length and accuracy. Not a test.

Runs `grpo.py` and `hapo.py` one after the other with their defaults plus the flags given here, both on hapo.py's
default model (`tiny-verbose` on the toy task) unless the flags name another, then prints both curves at every
tenth of the run and their ends.
The issue's bar: hapo's mean response length at the end at least 30% below grpo's, with accuracy within 0.05.
"End" is the mean over the last tenth of the steps (sampled responses, at the training temperature), so one
noisy step does not decide it; the greedy evaluation at the last step is printed beside it.

    python bench/hapo_vs_grpo.py                             # both default runs: ~5-10 minutes on 2 CPU cores
    python bench/hapo_vs_grpo.py --seeds 1,2,3               # repeat per seed
    python bench/hapo_vs_grpo.py -- --rollout hf             # flags after -- go to both scripts
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hapo import Args as HapoArgs  # noqa: E402


def run(script: str, output_dir: Path, seed: int, steps: int, extra: list[str]) -> tuple[list[dict], float]:
    start = time.time()
    out = subprocess.run([sys.executable, str(ROOT / script), "--seed", str(seed), "--total-steps", str(steps),
                          "--output-dir", str(output_dir), *extra], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{script} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")], time.time() - start


def tenth_means(metrics: list[dict], key: str) -> list[float]:
    """Mean of `key` over each tenth of the run (steps without the key are skipped)."""
    tenth = max(1, len(metrics) // 10)
    chunks = [metrics[i:i + tenth] for i in range(0, len(metrics), tenth)]
    return [sum(m[key] for m in c if key in m) / max(1, sum(key in m for m in c)) for c in chunks]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1", help="comma-separated seeds; both scripts run once per seed")
    parser.add_argument("--steps", type=int, default=100, help="--total-steps of both runs")
    parser.add_argument("--keep", default="", help="keep the runs' folders (metrics.jsonl, checkpoints) under here")
    parser.add_argument("extra", nargs="*", help="flags passed to both scripts (after --)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if not any(flag == "--model" or flag.startswith("--model=") for flag in args.extra):
        args.extra = ["--model", HapoArgs().model, *args.extra]  # the same model for both, whatever grpo's default
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        for seed in seeds:
            runs = {}
            for script in ("grpo.py", "hapo.py"):
                metrics, seconds = run(script, Path(tmp) / f"{Path(script).stem}-{seed}", seed, args.steps, args.extra)
                runs[script] = metrics
                print(f"\n{script} seed {seed}: {len(metrics)} steps in {seconds:.0f} s; means per tenth of the run")
                print(" " * 18 + " ".join(f"{10 * (i + 1):>6}%" for i in range(10)))
                for key in ("accuracy", "response_len_mean", "correct_len_mean", "history_len_mean"):
                    if key in metrics[0] or key in metrics[-1]:
                        print(f"{key:>18}" + " ".join(f"{v:7.3f}" for v in tenth_means(metrics, key)))
            grpo, hapo = runs["grpo.py"], runs["hapo.py"]
            end = lambda m, k: tenth_means(m, k)[-1]
            rows.append({"seed": seed, "grpo_acc": end(grpo, "accuracy"), "hapo_acc": end(hapo, "accuracy"),
                         "grpo_len": end(grpo, "response_len_mean"), "hapo_len": end(hapo, "response_len_mean"),
                         "grpo_eval_acc": grpo[-1]["eval/accuracy"], "hapo_eval_acc": hapo[-1]["eval/accuracy"],
                         "grpo_eval_len": grpo[-1]["eval/response_len_mean"],
                         "hapo_eval_len": hapo[-1]["eval/response_len_mean"]})
    print("\nlast tenth of the run (sampled) and final greedy evaluation; length in tokens, stop token included")
    print("| seed | grpo acc | hapo acc | acc diff | grpo len | hapo len | length change | eval acc grpo / hapo "
          "| eval len grpo / hapo | bar met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        change = r["hapo_len"] / r["grpo_len"] - 1
        diff = r["hapo_acc"] - r["grpo_acc"]
        met = change <= -0.30 and diff >= -0.05  # within 0.05 below; higher accuracy is no failure
        print(f"| {r['seed']} | {r['grpo_acc']:.3f} | {r['hapo_acc']:.3f} | {diff:+.3f} | {r['grpo_len']:.2f} | "
              f"{r['hapo_len']:.2f} | {100 * change:+.1f}% | {r['grpo_eval_acc']:.2f} / {r['hapo_eval_acc']:.2f} | "
              f"{r['grpo_eval_len']:.2f} / {r['hapo_eval_len']:.2f} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    main()
