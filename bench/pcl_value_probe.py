"""PCL's value model on its fixed probe, and the selection it drives, against uniform prompts. Not a test.

Runs the default `pcl.py` with `--select pcl` and `--select uniform` for each seed and rollout engine (two runs at a
time, one thread each), then prints one row per run and the issue's bars per seed and engine:
  - V: the mean `value_probe_corr` over the evaluations whose probe accuracies vary (std >= 0.1) >= 0.6;
  - the kept prompts' mean |accuracy - tau| over the second half at least 0.1 below uniform's;
  - pcl's mean effective ratio at least 1.3x uniform's.

    python bench/pcl_value_probe.py                                  # seeds 1,2,3, HF and vLLM: 12 runs
    python bench/pcl_value_probe.py --seeds 1 --rollouts hf -- --total-steps 30   # flags after -- go to pcl.py
"""
import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(output_dir: Path, seed: int, select: str, rollout: str, extra: list[str]) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "pcl.py"), "--seed", str(seed), "--select", select,
                          "--rollout", rollout, "--output-dir", str(output_dir), *extra], capture_output=True,
                         text=True, cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(f"pcl.py --select {select} --seed {seed} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return [m for m in map(json.loads, open(output_dir / "metrics.jsonl")) if m["step"] > 0]  # 0: evaluation only


def mean(values):
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def summary(metrics: list[dict]) -> dict:
    """The issue's numbers for one run; the probe's only where its accuracies vary (std >= 0.1)."""
    probes = [m for m in metrics if "value_probe_corr" in m]
    varied = [m for m in probes if m["value_probe_accuracy_std"] >= 0.1]
    late = metrics[len(metrics) // 2:]
    return {"probe_corr": mean([m["value_probe_corr"] for m in varied]),
            "probe_mae": mean([m["value_probe_mae"] for m in probes]),
            "probe_varied": f"{len(varied)}/{len(probes)}",
            "probe_curve": " ".join(f"{m['value_probe_corr']:.2f}" for m in probes),
            "distance_late": mean([m["kept_accuracy_distance"] for m in late]),
            "ratio": mean([m["effective_ratio"] for m in metrics]),
            "eval": " / ".join(f"{m['eval/accuracy']:.2f}" for m in metrics if "eval/accuracy" in m)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--rollouts", default="hf,vllm")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="flags for pcl.py (after --)")
    cli = parser.parse_args()
    seeds, rollouts = [int(s) for s in cli.seeds.split(",")], cli.rollouts.split(",")
    jobs = [(r, s, select) for r in rollouts for s in seeds for select in ("pcl", "uniform")]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(cli.jobs) as pool:
        results = dict(zip(jobs, pool.map(lambda j: summary(run(Path(tmp) / "-".join(map(str, j)), j[1], j[2], j[0],
                                                                   cli.extra)), jobs)))
    print("| rollout | seed | select | V probe corr (evals with std >= 0.1) | V probe MAE | probe corr per eval | "
          "kept mean abs(acc - tau), 2nd half | effective ratio | held-out acc per eval |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (r, s, select), x in results.items():
        print(f"| {r} | {s} | {select} | {x['probe_corr']:.2f} ({x['probe_varied']}) | {x['probe_mae']:.3f} | "
              f"{x['probe_curve']} | {x['distance_late']:.3f} | {x['ratio']:.3f} | {x['eval']} |")
    print("\n| rollout | seed | V probe corr >= 0.6 | distance: uniform - pcl >= 0.1 | ratio pcl / uniform >= 1.3 |")
    print("|---|---|---|---|---|")
    for r in rollouts:
        for s in seeds:
            p, u = results[(r, s, "pcl")], results[(r, s, "uniform")]
            gap, ratio = u["distance_late"] - p["distance_late"], p["ratio"] / u["ratio"]
            print(f"| {r} | {s} | {p['probe_corr']:.2f} {'ok' if p['probe_corr'] >= 0.6 else 'FAIL'} | "
                  f"{gap:.3f} {'ok' if gap >= 0.1 else 'FAIL'} | {ratio:.2f}x {'ok' if ratio >= 1.3 else 'FAIL'} |")


if __name__ == "__main__":
    main()
