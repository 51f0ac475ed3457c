"""Curves of one or more training runs against step, drawn from their metrics.jsonl. Not a test.

One panel per kind of metric that the runs logged, one colour per run:
- reward and accuracy of the sampled batch, with the held-out evaluation (`eval/accuracy`, 1-shot's `eval/<set>`
  and `eval/average`) as dots;
- response length (HAPO: all responses, the correct ones, the history h_i);
- the effective ratio, the share of samples with a non-zero advantage (PCL);
- the value model's fit (PPO's critic: `explained_var`; PCL's V: `value_corr`, `value_probe_corr`, ...).

    pip install matplotlib                                   # an optional extra, not in requirements.txt
    python bench/plot_runs.py runs/grpo-*/ --out docs/img/grpo.png
    python bench/plot_runs.py runs/pcl-a/ runs/pcl-b/ --smooth 5 --out pcl.png
    python bench/plot_runs.py runs/toy-pool/ runs/one_shot-x/ --out one_shot.png    # 1-shot RLVR beside its pool run
"""
import argparse
import json
import math
import re
from pathlib import Path

# eval/accuracy, eval/average, 1-shot's eval/<set>; not the lengths, shares and gold counts logged beside them
EVAL_ACCURACY = re.compile(r"eval/(?!.*(len|share|time|truncated|gold|pass))[^/]+$")
# (title, y-limits or None, keys drawn as lines, keys drawn as dots); a panel is drawn when a run has one of its keys
PANELS = {
    "reward": ("reward / accuracy", (-0.02, 1.02), ["reward_mean", "accuracy"], [EVAL_ACCURACY]),
    "length": ("response length (tokens)", None,
               ["response_len_mean", "correct_len_mean", "history_len_mean"], ["eval/correct_len_mean"]),
    "effective": ("effective ratio", (-0.02, 1.02), ["effective_ratio"], []),
    "value": ("value model", (-1.05, 1.05),
              ["explained_var", "value_corr", "value_explained_var", "value_probe_corr", "value_probe_mae"], []),
}
# the length panel needs HAPO's history: every script logs response_len_mean, but only HAPO is about it
PANEL_NEEDS = {"length": "history_len_mean"}


def load(path: str) -> tuple[str, list[dict]]:
    p = Path(path)
    file = p / "metrics.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise SystemExit(f"{path}: no metrics.jsonl there (give a run's folder or its metrics.jsonl)")
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    name = file.parent.name if file.parent.name != "pool" else f"{file.parent.parent.name}/pool"
    return name, [r for r in rows if "step" in r]


def keys_matching(runs: list[tuple[str, list[dict]]], patterns: list) -> list[str]:
    present = sorted({k for _, rows in runs for r in rows for k in r})
    out = []
    for pattern in patterns:
        out += [k for k in present if (pattern.fullmatch(k) if isinstance(pattern, re.Pattern) else k == pattern)
                and k not in out]
    return out


def series(rows: list[dict], key: str, smooth: int) -> tuple[list[float], list[float]]:
    """(steps, values) where the key was logged and finite, as a trailing mean over `smooth` logged points."""
    points = [(r["step"], float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    values = [v for _, v in points]
    means = [sum(values[max(0, i - smooth + 1):i + 1]) / len(values[max(0, i - smooth + 1):i + 1])
             for i in range(len(values))]
    return [s for s, _ in points], means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (or their metrics.jsonl files)")
    parser.add_argument("--out", default="runs/plot.png", help="the PNG to write")
    parser.add_argument("--panels", default="auto", help=f"comma-separated, from {', '.join(PANELS)}; auto: those "
                        "the runs logged")
    parser.add_argument("--smooth", type=int, default=1, help="trailing mean over this many steps (lines only)")
    parser.add_argument("--title", default="", help="a title over the panels")
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_runs.py needs matplotlib, an optional extra: pip install matplotlib") from None

    runs = [load(p) for p in args.runs]
    if args.panels == "auto":
        names = [n for n, (_, _, lines, dots) in PANELS.items() if keys_matching(runs, lines + dots)
                 and (n not in PANEL_NEEDS or keys_matching(runs, [PANEL_NEEDS[n]]))]
    else:
        names = args.panels.split(",")
        if unknown := [n for n in names if n not in PANELS]:
            raise SystemExit(f"--panels: unknown {', '.join(unknown)}; choose from {', '.join(PANELS)}")
    if not names:
        raise SystemExit("none of the runs logged a metric this script draws (is metrics.jsonl empty?)")

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, name in zip(axes[0], names):
        title, ylim, lines, dots = PANELS[name]
        for r, (run, rows) in enumerate(runs):
            keys = keys_matching([(run, rows)], lines) + keys_matching([(run, rows)], dots)
            for i, key in enumerate(keys):
                # one run: a colour per metric; several: a colour per run, a line style (or marker) per metric
                colour = colours[(i if len(runs) == 1 else r) % len(colours)]
                label = f"{run}: {key}" if len(runs) > 1 else key
                if key in lines:
                    ax.plot(*series(rows, key, args.smooth), styles[0 if len(runs) == 1 else i % len(styles)],
                            color=colour, lw=1.2, label=label)
                else:
                    ax.plot(*series(rows, key, 1), "os^vD"[i % 5], color=colour, ms=4, mfc="white", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        drawn = [y for line in ax.get_lines() for y in line.get_ydata()]
        # HAPO's reward reaches 2 and is shown whole; an explained variance of -8 on one step is cut off
        if ylim and (name != "reward" or (drawn and ylim[0] <= min(drawn) and max(drawn) <= ylim[1])):
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out} ({', '.join(names)}; {len(runs)} run{'s' * (len(runs) > 1)})")


if __name__ == "__main__":
    main()
