"""1-shot RLVR's entropy bonus on the toy: the default run against `--entropy-coef 0`, per seed. Not a test.

For each seed: the toy pool run (`python one_shot.py --pool --pool-size 32`), then 1-shot RLVR on pi_1 of its
history with the defaults and again with `--entropy-coef 0`; prints a markdown table of held-out toy accuracy (greedy,
the toy's held-out split) at three points of the 1-shot run: the base model (step 0), saturation (the first
evaluation at or after the step where the reward on the example first reached 0.9) and the end; with the reward on
the example at the end (the mean of the last 5 steps) and the step it first reached 0.9.

    python bench/one_shot_entropy.py                       # seeds 1-3: 9 toy runs, ~30 min on 2 CPU cores
    python bench/one_shot_entropy.py --seeds 1 -- --rollout hf   # flags after -- go to every run
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default (0.001)": [], "--entropy-coef 0": ["--entropy-coef", "0"]}


def summary(metrics: list[dict], reward_bar: float = 0.9) -> dict:
    """The curve's three points from one_shot.py's metrics.jsonl (see the docstring); saturation is None when the
    reward never reached the bar."""
    evals = {m["step"]: m["eval/toy"] for m in metrics if "eval/toy" in m}
    rewards = {m["step"]: m["reward_mean"] for m in metrics if "reward_mean" in m}
    saturated = next((s for s in sorted(rewards) if rewards[s] >= reward_bar), None)
    at_saturation = next((evals[s] for s in sorted(evals) if saturated is not None and s >= saturated), None)
    last = sorted(rewards)[-5:]
    return {"base": evals[0], "saturated_step": saturated, "at_saturation": at_saturation,
            "end": evals[max(evals)], "best": max(evals.values()), "reward_end": sum(rewards[s] for s in last) / 5}


def run(output_dir: Path, seed: int, extra: list[str]) -> tuple[dict, float]:
    """One toy run of one_shot.py: its curve's summary (a pool run's too: it is not used) and its seconds."""
    start = time.time()
    out = subprocess.run([sys.executable, str(ROOT / "one_shot.py"), "--seed", str(seed), "--output-dir",
                          str(output_dir), *extra], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"one_shot.py failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return summary([json.loads(line) for line in open(output_dir / "metrics.jsonl")]), time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--keep", default="", help="keep the runs' folders under here")
    parser.add_argument("extra", nargs="*", help="flags passed to every run (after --)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            pool = Path(args.keep or tmp) / f"seed{seed}-pool"
            run(pool, seed, ["--pool", "--pool-size", "32", *args.extra])
            for setting, flags in SETTINGS.items():
                name = f"seed{seed}-{'default' if not flags else 'no-entropy'}"
                s, seconds = run(Path(args.keep or tmp) / name, seed, ["--history", str(pool), *flags, *args.extra])
                print(f"{name}: {s} ({seconds:.0f} s)", file=sys.stderr, flush=True)
                rows.append((seed, setting, s))
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print("| seed | entropy bonus | held-out: base | at saturation (step) | end | best | reward on the example, end |")
    print("|---|---|---|---|---|---|---|")
    for seed, setting, s in rows:
        print(f"| {seed} | {setting} | {fmt(s['base'])} | {fmt(s['at_saturation'])} ({s['saturated_step'] or '-'}) "
              f"| {fmt(s['end'])} | {fmt(s['best'])} | {fmt(s['reward_end'])} |")
    for setting in SETTINGS:
        mean = lambda key: sum(s[key] for _, name, s in rows if name == setting) / len(args.seeds)
        print(f"| mean | {setting} | {mean('base'):.2f} | | {mean('end'):.2f} | {mean('best'):.2f} "
              f"| {mean('reward_end'):.2f} |")


if __name__ == "__main__":
    main()
