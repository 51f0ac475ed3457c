"""Throughput of verify.score_batch against plain single-process math-verify, on realistic items. Not a test.

Items: each MATH500 gold against four responses of a few hundred words of reasoning ending in a box: the gold
as written, the gold written differently (a `\\displaystyle` that math-verify drops, so verify's exact-text
shortcut does not apply), the gold plus one (wrong), and some integer (wrong, bar coincidences).
Baseline: `verify(parse("\\boxed{gold}"), parse(response))` in a loop in this process, math-verify defaults.

    python bench/verify_throughput.py [--items 2000] [--workers 2]
"""

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import verify

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

REASONING = (
    "To solve this, let us first restate the problem in our own words and list what is given. "
    "We introduce a variable for the unknown quantity and translate each condition into an equation. "
    "The first condition gives a linear relation, and the second one constrains the sign, so we keep only "
    "the admissible case. Substituting back, the expression simplifies after we factor out the common term "
    "and cancel it, which is allowed because it is nonzero under the constraints we found. "
    "It remains to check the boundary cases: each of them either violates a condition or gives the same value, "
    "so nothing new appears. As a sanity check, plugging the value into the original statement reproduces "
    "every number we were given, and an estimate by rounding agrees with the exact computation. "
    "Finally we write the result in simplest form, as the problem asks.\n\n"
)


def build_items(n_items):
    golds = [json.loads(line)["answer"] for line in (DATA / "eval/math500/test.jsonl").read_text().splitlines()]
    responses, item_golds, kinds = [], [], []
    for k, gold in enumerate(golds):
        for kind, answer in (
            ("correct, as written", gold),
            ("correct, written differently", "\\displaystyle " + gold),
            ("wrong: gold + 1", gold + " + 1"),
            ("wrong: some integer", str((k * 37) % 997)),
        ):
            responses.append(REASONING * 2 + f"Therefore the final answer is $\\boxed{{{answer}}}$.")
            item_golds.append(gold)
            kinds.append(kind)
    return responses[:n_items], item_golds[:n_items], kinds[:n_items]


def plain_math_verify(responses, golds):
    from math_verify import parse
    from math_verify import verify as mv_verify

    results, latencies = [], []
    for response, gold in zip(responses, golds):
        start = time.perf_counter()
        results.append(float(mv_verify(parse(f"\\boxed{{{gold}}}"), parse(response))))
        latencies.append(time.perf_counter() - start)
    return results, latencies


def workers_cpu_seconds():
    """CPU time of verify's worker processes so far (Linux /proc; a private peek, fine for a benchmark)."""
    total = 0.0
    for worker in verify._pool.workers if verify._pool else []:
        fields = Path(f"/proc/{worker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(fn):
    """(result, wall seconds, CPU seconds of this process plus verify's workers)."""
    wall, cpu, workers_cpu = time.perf_counter(), time.process_time(), workers_cpu_seconds()
    result = fn()
    cpu = time.process_time() - cpu + workers_cpu_seconds() - workers_cpu
    return result, time.perf_counter() - wall, cpu


def warm_up_items():
    """Other problems' answers (DSR-sub), to warm both sides' parsers before timing: both run for a whole training
    run, and a fresh process is slow on its first few hundred parses while ANTLR builds its DFA cache."""
    rows = [json.loads(line) for line in (DATA / "train/one_shot_rlvr/dsr_sub.jsonl").read_text().splitlines()]
    golds = [str(row["answer"]) for row in rows[:300]]
    responses = [REASONING + f"So the answer is $\\boxed{{{g}}}$." for g in golds]
    responses += [REASONING + f"So the answer is $\\boxed{{{g} + 2}}$." for g in golds]
    return responses, golds + golds


def print_row(name, n, run, baseline=None):
    _, wall, cpu = run
    speedup = f"{baseline / wall:.2f}x" if baseline else "-"
    print(f"| {name:<56} | {n:5d} | {wall:6.2f} | {n / wall:8.0f} | {speedup:>6} | {cpu / n * 1000:11.2f} |")
    return wall


def fresh_pool(n_workers, warm_responses, warm_golds):
    """New workers whose parsers have seen only the warm-up items, so every measured item is new to them."""
    verify._shutdown_pool()
    verify._verdicts.clear()
    verify.score_batch(warm_responses, warm_golds, workers=n_workers)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("verify").setLevel(logging.ERROR)  # two DSR-sub golds do not parse; not news here

    responses, golds, kinds = build_items(args.items)
    hard = [i for i, kind in enumerate(kinds) if kind in ("correct, written differently", "wrong: gold + 1")]
    hard_responses, hard_golds = [responses[i] for i in hard], [golds[i] for i in hard]
    print(
        f"{len(responses)} items, mean response {statistics.mean(map(len, responses)):.0f} chars, "
        f"{len(os.sched_getaffinity(0))} cpus, load average {os.getloadavg()[0]:.2f}"
    )
    warm_responses, warm_golds = warm_up_items()
    plain_math_verify(warm_responses, warm_golds)

    # Interleaved, so that load from elsewhere on the machine hits both sides alike.
    base_first = measure(lambda: plain_math_verify(responses, golds))
    fresh_pool(args.workers, warm_responses, warm_golds)
    ours_first = measure(lambda: verify.score_batch(responses, golds, workers=args.workers))
    base_again = measure(lambda: plain_math_verify(responses, golds))
    ours_again = measure(lambda: verify.score_batch(responses, golds, workers=args.workers))
    fresh_pool(1, warm_responses, warm_golds)
    ours_one = measure(lambda: verify.score_batch(responses, golds, workers=1))
    base_hard = measure(lambda: plain_math_verify(hard_responses, hard_golds))
    fresh_pool(args.workers, warm_responses, warm_golds)
    ours_hard = measure(lambda: verify.score_batch(hard_responses, hard_golds, workers=args.workers))

    n, h = len(responses), len(hard)
    print(f"load average after: {os.getloadavg()[0]:.2f}; speed = items/s against plain math-verify on the same items")
    print(f"| {'what':<56} | items | wall s |  items/s |  speed | CPU ms/item |")
    print(f"|{'-' * 58}|-------|--------|----------|--------|-------------|")
    base = print_row("plain math-verify, 1 process", n, base_first)
    print_row(f"score_batch, {args.workers} workers, items new to them", n, ours_first, base)
    print_row("score_batch, 1 worker, items new to it", n, ours_one, base)
    base = print_row("plain math-verify: the same items again", n, base_again)
    print_row(f"score_batch, {args.workers} workers: again (remembered verdicts)", n, ours_again, base)
    base = print_row("plain math-verify: only items no shortcut applies to", h, base_hard)
    print_row(f"score_batch, {args.workers} workers: only those items, new to them", h, ours_hard, base)

    print("CPU ms/item counts this process and verify's workers.")
    (base_scores, latencies), ours = base_first[0], ours_first[0]
    disagree = [i for i, (a, b) in enumerate(zip(base_scores, ours)) if a != b]
    print(f"\n{sum(ours):.0f} / {n} scored correct; verify.py and plain math-verify disagree on {len(disagree)} items")
    for i in disagree[:10]:
        print(f"  {kinds[i]:<30} gold {golds[i]!r}: math-verify {base_scores[i]}, verify.py {ours[i]}")

    fresh_pool(args.workers, warm_responses, warm_golds)
    single = []
    for response, gold in zip(responses, golds):
        start = time.perf_counter()
        verify.score(response, gold)
        single.append(time.perf_counter() - start)
    single.sort()
    print(
        f"one item per call, verify.score (a worker round trip each): "
        f"median {statistics.median(single) * 1e3:.1f} ms, p99 {single[int(0.99 * len(single))] * 1e3:.1f} ms, "
        f"max {single[-1] * 1e3:.0f} ms (timeout 5 s)"
    )
    print(
        f"one item per call, plain math-verify in this process: median {statistics.median(latencies) * 1e3:.1f} ms, "
        f"max {max(latencies) * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
