"""Time to pick intermediate-difficulty prompts: PCL's value model vs rollout-based filtering. Not a test.

The paper's claim: scoring k*m candidates with V(x) (one forward pass over each prompt) is 12.1x (MATH) and 16.9x
(DeepScaleR) faster than DAPO-style dynamic sampling (n rollouts per candidate, scored, groups with all-equal
rewards dropped). Both are timed here on the same candidates, model and machine, with pcl.py's own functions:
  pcl               pcl.predict_values on k*m prompts + pcl.select_prompts
  dynamic sampling  pcl.generate (n per candidate, the run's rollout engine), verify.py, pcl.select_informative
Each is timed --reps times after one warm-up; the table gives the medians and their ratio. V is the untrained
value model (its cost does not depend on its weights); the policy is --model as it is, so the rollouts' lengths are
the untrained policy's.

    python bench/pcl_selection.py --rollout hf                         # tiny model, toy prompts, CPU
    python bench/pcl_selection.py --model Qwen/Qwen3-1.7B-Base --train-data math_train.jsonl \\
        --candidates 2048 --samples-per-prompt 16 --max-new-tokens 4096 --micro-batch 64     # the paper's setting
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as evaluation  # noqa: E402
import pcl  # noqa: E402
import verify  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--train-data", default="toy")
    parser.add_argument("--candidates", type=int, default=64, help="k*m (paper: 4 * 512 = 2048)")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="n (paper: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="(paper: 4096)")
    parser.add_argument("--micro-batch", type=int, default=32, help="prompts per V forward pass")
    parser.add_argument("--rollout", default="auto")
    parser.add_argument("--reps", type=int, default=3)
    cli = parser.parse_args()
    args = pcl.Args(model=cli.model, train_data=cli.train_data, samples_per_prompt=cli.samples_per_prompt,
                    max_new_tokens=cli.max_new_tokens, micro_batch=cli.micro_batch, rollout=cli.rollout,
                    prompts_per_step=max(1, cli.candidates // 4))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    path = evaluation.resolve_model_path(args.model)
    model, tokenizer = evaluation.load_model(path)
    model.to(device)
    value_model = pcl.ValueModel(evaluation.load_model(path)[0]).to(device)
    problems = pcl.tokenize_prompts(pcl.read_data(args)[0], tokenizer, args)
    candidates = [problems[i] for i in pcl.batch_indices(0, len(problems), cli.candidates, args.seed)]
    prompt_ids = [p["prompt_ids"] for p in candidates]
    engine = pcl.make_rollout_engine(args, path, model)
    golds = [p["answer"] for p in candidates for _ in range(args.samples_per_prompt)]

    def by_value():
        values = pcl.predict_values(value_model, prompt_ids, args, tokenizer.pad_token_id, device, autocast)
        return pcl.select_prompts(values, args.prompts_per_step, args.tau)

    def by_rollouts():
        rollouts = pcl.generate(engine, model, tokenizer, candidates, args, 0, 0)
        correct = verify.score_batch([r["text"] for r in rollouts], golds, mode=args.answer_mode)
        rewards = torch.tensor([0.0 if r["truncated"] else c for r, c in zip(rollouts, correct)])
        return pcl.select_informative(rewards, args.samples_per_prompt, args.prompts_per_step)

    times = {}
    for name, fn in (("pcl (V forward)", by_value), ("dynamic sampling (rollouts)", by_rollouts)):
        fn()
        runs = []
        for _ in range(cli.reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    print(f"model {args.model}, {cli.candidates} candidates, n {args.samples_per_prompt}, max_new_tokens "
          f"{args.max_new_tokens}, rollout {'vllm' if engine is not None else 'hf'}, device {device}")
    print("| selection | seconds (median) | x faster than rollouts |")
    print("|---|---|---|")
    slow = times["dynamic sampling (rollouts)"]
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {slow / t:.1f} |")


if __name__ == "__main__":
    main()
