"""1-shot RLVR for LLM math reasoning in one file: GRPO on copies of a single training example.

Wang et al., 2025, "Reinforcement Learning for Reasoning in Large Language Models with One Training Example": one
math problem, copied to fill the batch, lifts Qwen2.5-Math-1.5B on MATH500 from 36.0% to 72.8% (pi_1). The example
is picked by its historical variance: a GRPO run over a pool (DSR-sub, 1209 problems) records each example's
training accuracy every time it is sampled; ranked by the standard deviation of that record, largest first, pi_1 is
the top one. Held-out accuracy keeps rising after the accuracy on the example saturates, so it is evaluated all
along and the best evaluation is kept. Two runs, on the toy task on a CPU (a few minutes each):

    python one_shot.py --pool --pool-size 32 --output-dir runs/toy-pool   # GRPO over 32 problems: their history
    python one_shot.py --history runs/toy-pool     # pi_1 of that history, 1-shot RLVR from the base model
    python one_shot.py --history acc_step_500.json --model Qwen/Qwen2.5-Math-1.5B ...   # the paper's pi_1: README

Beside grpo.py (whose loss this is, with the paper's KL and entropy terms on): every run writes accuracy_history.json,
the pool run's being the one ranked; the 1-shot run's problems are copies of the example(s), each copy its own group;
several evaluation sets (the paper's six), each decoded as eval.py decodes it, whose mean is eval/accuracy; best.json;
the paper's ablations (--entropy-only, --label). Simplifications (docs/one_shot.md):
- verify.py grades the response's last box, and a truncated response scores 0 (the paper reads prompt + response);
- the toy's `tiny-format` finds the right number but often leaves the box out or hedges: one example teaches it the
  answer's form and commitment, which every question shares (the toy has no reasoning to improve);
- a pool run of ours ranks our own rollouts: acc_step_500.json gives the paper's pi_i.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import transformers
from tqdm import tqdm

import eval as evaluation
import verify

warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # a checkpoint of one process: meant


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


# ---- Args: every hyperparameter, with the paper's value (1-shot RLVR's DSR-sub baseline) --------------------------
@dataclass
class Experiment:
    _argument_group_name = "experiment"
    seed: int = arg(1, "seeds python, numpy, torch and the rollout sampler")
    output_dir: str = arg("", "the run's folder; default runs/<script>-<time>")
    total_steps: int = arg(20, "rollout batches (paper: 2000; 500 for the pool run)")
    eval_every: int = arg(2, "evaluate every this many steps, and at steps 0 and the last; 0: only those")
    save_every: int = arg(0, "checkpoint every this many steps; 0: only at the end (and on Ctrl-C)")
    resume: str = arg("", "continue a run: its folder (its latest checkpoint) or one of its checkpoint-<step>")


@dataclass
class ModelData:
    _argument_group_name = "model and data"
    model: str = arg("tiny-format", "hub id or folder (paper: Qwen/Qwen2.5-Math-1.5B); tiny...: a built-in model")
    train_data: str = arg("toy", "jsonl/json/parquet with problem and answer columns (paper: dsr_sub.jsonl)")
    problem_key: str = arg("problem", "the column holding the problem")
    answer_key: str = arg("answer", "the column holding the gold answer")
    eval_data: str = arg("auto", "comma-separated: toy, benchmarks (math500, ...), paper (its six) or files; auto: toy "
                                 "for the tiny models, else paper")
    eval_max_problems: int = arg(0, "evaluate on the first this many problems of each set; 0: all")
    template: Literal[evaluation.TEMPLATES] = arg("qwen-math-train", "prompt template (paper: qwen-math-train)")
    max_prompt_tokens: int = arg(1024, "longer prompts are dropped, with a count printed (paper: 1024)")


@dataclass
class Rollout:
    _argument_group_name = "rollout"
    rollout: Literal["auto", "vllm", "hf"] = arg("auto", "vllm, hf (transformers generate), auto: vllm if installed")
    prompts_per_step: int = arg(16, "prompts per rollout batch (paper: 128)")
    samples_per_prompt: int = arg(8, "group size n (paper: 8)")
    temperature: float = arg(1.0, "sampling temperature; the trainer's logits are divided by it too (paper: 0.6)")
    top_p: float = arg(1.0, "nucleus sampling (paper: 1.0)")
    max_new_tokens: int = arg(40, "response budget; a truncated response scores 0 (paper: 3072)")
    gpu_memory_utilization: float = arg(0.35, "vLLM's share of the GPU; the trainer has the rest")
    vllm_sleep: bool = arg(True, "free vLLM's GPU memory while training (GPU only)")


@dataclass
class GRPO:
    _argument_group_name = "GRPO"
    answer_mode: Literal[verify.MODES] = arg("boxed", "how verify.py reads the answer (paper: boxed)")
    std_normalize: bool = arg(True, "advantage (r - mean) / std; --no-std-normalize: Dr. GRPO's r - mean")
    mask_truncated: bool = arg(False, "leave truncated responses out of the loss")
    clip_low: float = arg(0.2, "PPO ratio clip below 1 (paper: 0.2)")
    clip_high: float = arg(0.2, "PPO ratio clip above 1; larger is DAPO's clip-higher (paper: 0.2)")
    kl_coef: float = arg(0.001, "k3 KL to the reference model in the loss; 0 loads no reference (paper: 0.001)")
    entropy_coef: float = arg(0.001, "entropy bonus: loss -= coef * entropy (paper: 0.001)")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = arg(
        "token-mean", "loss aggregation (paper: token-mean; seq-mean-token-sum-norm is Dr. GRPO's)")
    num_updates: int = arg(1, "passes over each rollout batch (paper: 1)")
    mini_batch: int = arg(128, "responses per optimizer step (paper: 1024, the whole batch)")
    micro_batch: int = arg(32, "responses per forward/backward; gradients accumulate over a mini-batch")


@dataclass
class Optimisation:
    _argument_group_name = "optimisation"
    lr: float = arg(1e-4, "AdamW learning rate (paper: 1e-6; the tiny model needs far more)")
    weight_decay: float = arg(0.01, "(paper: 0.01)")
    lr_schedule: Literal["constant", "cosine", "linear"] = arg("constant", "after warmup; cosine and linear end at "
                                                                           "0 (paper: constant)")
    warmup_steps: int = arg(0, "linear warmup, in optimizer steps")
    max_grad_norm: float = arg(1.0, "global gradient-norm clip (paper: 1.0)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward (real runs: on)")
    logprob_memory_mib: float = arg(1024, "working memory of one chunk of the fused log-prob (MiB)")


@dataclass
class OneShotRLVR:
    _argument_group_name = "1-shot RLVR"
    pool: bool = arg(False, "the pool run: GRPO over the pool, recording each example's accuracy history")
    pool_size: int = arg(0, "the pool: the first this many training problems; 0: all (paper: DSR-sub's 1209)")
    history: str = arg("", "train on pi_--rank of this accuracy history: a pool run's folder or its file "
                           "(paper: acc_step_500.json)")
    rank: list[int] = field(default_factory=lambda: [1], metadata={"help": "pi_i for each i: the i-th largest std "
                                                                           "of accuracy (paper: 1; 1 13)"})
    example_index: list[str] = field(default_factory=list, metadata={"help": "train on these instead: the data's "
                                                                             "`index` column, else positions"})
    label: list[str] = field(default_factory=list, metadata={"help": "ablation: reward against these answers, one "
                                                                     "per example"})
    entropy_only: bool = arg(False, "ablation: no outcome reward; the loss is -entropy_coef * entropy (+ KL)")


GROUPS = (Experiment, ModelData, Rollout, GRPO, Optimisation, OneShotRLVR)


@dataclass
class Args(OneShotRLVR, Optimisation, GRPO, Rollout, ModelData, Experiment):
    pass


# ==== ALGO LOGIC: GRPO ================================================================================================
def group_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6):
    """GRPO's advantage: each reward minus its group's mean, divided by the group's std unless Dr. GRPO."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize:
        centered = centered / (groups.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)


def token_weights(lengths: list[int], mode: str, minibatch_tokens: int, minibatch_seqs: int, max_len: int):
    """Per-token weights w such that the mini-batch loss is sum(w * per-token loss). The normalisers are those of the
    whole mini-batch, so micro-batches accumulate to exactly its gradient."""
    per_seq = {"token-mean": lambda n: 1.0 / minibatch_tokens,
               "seq-mean-token-mean": lambda n: 1.0 / (n * minibatch_seqs),
               "seq-mean-token-sum-norm": lambda n: 1.0 / (max_len * minibatch_seqs)}[mode]
    return torch.cat([torch.full((n,), per_seq(n)) for n in lengths])


def policy_loss(logp, old_logp, advantages, weights, args, ref_logp=None, entropy=None):
    """PPO clipped surrogate + k3 KL to the reference + entropy bonus, per token, aggregated with `weights`."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - args.clip_low, 1 + args.clip_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    stats = {"clip_frac": ((ratio * advantages) > (clipped * advantages)).float().mean().item()}
    if ref_logp is not None:
        kl = low_var_kl(logp, ref_logp)
        per_token = per_token + args.kl_coef * kl
        stats["kl"] = kl.mean().item()
    if entropy is not None:
        per_token = per_token - args.entropy_coef * entropy
    return (per_token * weights).sum(), stats


def low_var_kl(logp, ref_logp):
    """k3 estimator of KL(policy || reference): exp(r) - r - 1 with r = ref - logp; unbiased, always >= 0."""
    r = torch.clamp(ref_logp - logp, min=-20, max=20)  # as verl: exp of a larger r would give 0 * inf gradients
    return torch.clamp(torch.exp(r) - r - 1, min=-10, max=10)


def update_policy(model, reference, rollouts, advantages, optimizer, scheduler, args, autocast, pad_id, device):
    """num_updates passes over the batch in shuffled mini-batches; one optimizer step per mini-batch."""
    with torch.no_grad(), autocast:  # old and reference log-probs: fixed for all passes over this batch
        old_logp = token_logprobs(model, rollouts, args, pad_id, device)
        ref_logp = token_logprobs(reference, rollouts, args, pad_id, device) if reference is not None else None
    # the engine sampled from exactly these weights: any gap is engine-trainer mismatch (numerics, a missed push)
    engine_lp = torch.tensor([lp for r in rollouts for lp in r["engine_logprobs"]])
    sums = dict.fromkeys(("loss", "clip_frac", "kl", "entropy", "tokens"), 0.0)  # over the batch, per token
    sums.update(logprob_gap=(engine_lp - torch.cat(old_logp).float().cpu()).abs().sum().item(),
                sampled_tokens=float(len(engine_lp)))
    grad_norms = []
    for _ in range(args.num_updates):
        for share in mini_batch_shares(len(rollouts), args.mini_batch, [args.seed, scheduler.last_epoch]):
            mini = [i for i in share if not rollouts[i].get("masked")]
            # under torchrun: the counts of every rank's share, so the summed gradients are the whole batch's
            mini_tokens, mini_seqs = summed_over_ranks([sum(len(rollouts[i]["response_ids"]) for i in mini),
                                                        len(mini)], device)
            if not mini_seqs:  # every response of the mini-batch masked (on every rank)
                continue
            for micro, counted in micro_batches(mini, 0, args.micro_batch, device):
                rows = [rollouts[i] for i in micro]
                lengths = [len(r["response_ids"]) for r in rows]
                with autocast:
                    logp, entropy = response_logprobs(model, collate(rows, pad_id, device), args.temperature,
                                                      args.logprob_memory_mib)
                per_token = lambda values: torch.cat([values[i] for i in micro]).to(device)
                adv = torch.cat([advantages[i].expand(n) for i, n in zip(micro, lengths)]).to(device)
                weights = token_weights(lengths, args.loss_agg, mini_tokens, mini_seqs, args.max_new_tokens)
                loss, s = policy_loss(logp, per_token(old_logp), adv, weights.to(device), args,
                                      per_token(ref_logp) if ref_logp is not None else None,
                                      entropy if args.entropy_coef else None)
                (loss * counted).backward()
                if counted:  # a filler pass (counted 0) only keeps this rank in step with the others
                    sums["loss"] += loss.item()
                    sums["clip_frac"] += s["clip_frac"] * sum(lengths)
                    sums["kl"] += s.get("kl", 0.0) * sum(lengths)
                    sums["entropy"] += entropy.detach().float().sum().item()
                    sums["tokens"] += sum(lengths)
            grad_norms.append(clip_gradients(model, args.max_grad_norm).item())
            if math.isfinite(grad_norms[-1]):
                optimizer.step()
            else:  # a bf16 overflow or a bad row: this step is lost, the run goes on
                print(f"non-finite gradient norm ({grad_norms[-1]}): update skipped")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    total = {k: sum(part[k] for part in gather_from_ranks([sums])) for k in sums}
    out = {"logprob_gap": total["logprob_gap"] / total["sampled_tokens"]}
    if grad_norms:  # the loss of an optimizer step, averaged over the steps; the norm is already global
        out.update(loss=total["loss"] / len(grad_norms), grad_norm=sum(grad_norms) / len(grad_norms))
    if total["tokens"]:
        out.update({k: total[k] / total["tokens"] for k in ("clip_frac", "kl", "entropy")})
    return out


def token_logprobs(model, rollouts, args, pad_id, device) -> list[torch.Tensor]:
    """Per-rollout 1-D tensors of the response tokens' log-probs under `model` (no gradient)."""
    out = []
    for u in range(0, len(rollouts), args.micro_batch):
        rows = rollouts[u:u + args.micro_batch]
        logp, _ = response_logprobs(model, collate(rows, pad_id, device), args.temperature, args.logprob_memory_mib)
        out += list(logp.split([len(r["response_ids"]) for r in rows]))
    return out


def run_evaluation(engine, tokenizer, eval_sets, args) -> dict:
    """Accuracy on each evaluation set, decoded as `eval.py --benchmarks` decodes it (the paper's protocol: greedy,
    avg@8 at T=0.6 on aime24/aime25/amc23), a file as the training prompts; eval/accuracy is their unweighted mean:
    with --eval-data paper, the paper's six-benchmark "Avg.", by which it picks its reported checkpoint."""
    out = {}
    for name, problems in eval_sets.items():
        decoding = dict(template=args.template, mode=args.answer_mode, n=1, temperature=0.0, top_p=1.0, ks=())
        if name in evaluation.BENCHMARKS:
            decoding = evaluation.decoding_for(name, argparse.Namespace(n=None, temperature=None, top_p=1.0,
                                                                        template=None, mode=None, max_tokens=None), ())
        decoding["max_tokens"] = min(decoding.get("max_tokens", math.inf), args.max_new_tokens)  # the engine's context
        metrics, _ = evaluation.evaluate(engine, tokenizer, problems, seed=args.seed, **decoding)
        out[f"eval/{name}"] = metrics.pop("accuracy")
        out.update({f"eval_detail/{name}/{k}": v for k, v in metrics.items()})
    return {"eval/accuracy": sum(out[f"eval/{name}"] for name in eval_sets) / len(eval_sets), **out}


# ==== ALGO LOGIC: 1-shot RLVR: one example, chosen by the variance of its accuracy history, copied ==================
def training_problems(args, problems: list[dict]) -> list[dict]:
    """The run's problems, each with an id (the data's `index` column, else its position): the pool (--pool), or
    --prompts-per-step copies of the example(s) in equal shares, each copy its own GRPO group, as the paper's merged
    files hold them (the seeded sampler then takes every copy every step, in shuffled order)."""
    chosen = [flag for flag in ("pool", "history", "example_index") if getattr(args, flag)]
    if len(chosen) != 1:
        raise SystemExit("give one of --pool (record a history), --history (train on its pi_--rank), --example-index"
                         f"{', not ' + ' and '.join(chosen) if chosen else ''}: first python one_shot.py --pool "
                         "--pool-size 32 --output-dir runs/toy-pool, then python one_shot.py --history runs/toy-pool")
    if args.example_index and args.rank != [1]:  # --rank 1 cannot be told from the default: it is harmless
        raise SystemExit("--rank picks from a --history; --example-index names the examples itself: give one")
    if args.entropy_only and args.entropy_coef <= 0:
        raise SystemExit("--entropy-only trains on the entropy term alone: it needs --entropy-coef > 0")
    count = 0 if args.pool else len(args.example_index or args.rank)
    if args.label and len(args.label) != count:
        raise SystemExit(f"--label: give one label per example ({count}), got {len(args.label)}")
    if count and args.prompts_per_step % count:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must split into equal shares for {count} "
                         "examples")
    problems = [{**p, "id": str(p.get("index", i))} for i, p in enumerate(problems)]
    if args.pool:
        return problems[:args.pool_size or None]
    ids = args.example_index or select_by_rank(load_history(args.history), args.rank)
    if args.history:
        print(f"{args.history} ranked by historical variance: "
              + ", ".join(f"pi_{r} = {i}" for r, i in zip(args.rank, ids)))
    examples = find_examples(problems, ids, args.label)
    for e in examples:
        relabelled = f" (the data says {e['true_answer']!r})" if e["answer"] != e["true_answer"] else ""
        print(f"example {e['id']}, answer {e['answer']!r}{relabelled}: {e['problem'][:300]!r}")
    return [e for e in examples for _ in range(args.prompts_per_step // len(examples))]


def load_history(path: str) -> dict[str, list[float]]:
    """{"index": [accuracy, ...]}: the paper's acc_step_500.json, or accuracy_history.json in a pool run's folder."""
    file = Path(path) / "accuracy_history.json" if Path(path).is_dir() else Path(path)
    try:
        history = json.loads(file.read_text())
    except FileNotFoundError:
        raise SystemExit(f"--history: {file} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"--history: {file} is not valid JSON ({e})") from None
    valid = lambda accs: isinstance(accs, list) and all(type(a) in (int, float) and 0 <= a <= 1 for a in accs)
    if not isinstance(history, dict) or not history or not all(map(valid, history.values())):
        raise SystemExit(f'--history: {file} must hold a JSON object {{"index": [accuracy in [0, 1], ...], ...}}')
    return history


def select_by_rank(history: dict[str, list[float]], ranks: list[int]) -> list[str]:
    """pi_i for each i: the examples by the std of their accuracy history, largest first. Ties keep the file's order,
    as the paper's stable sort of the JSON's keys does; an empty record counts as std 0."""
    ranked = sorted(history, key=lambda key: -np.std(history[key]) if history[key] else 0.0)
    bad = [r for r in ranks if not 1 <= r <= len(ranked)]
    if bad:
        raise SystemExit(f"--rank {bad[0]}: ranks run from 1 to {len(ranked)} (the history's examples)")
    return [ranked[r - 1] for r in ranks]


def find_examples(problems: list[dict], ids: list[str], labels=()) -> list[dict]:
    """The problems named by `ids`, with their answer replaced by `labels` where given (the paper's label-noise
    ablation; the data's own answer stays as true_answer)."""
    examples = []
    for n, example_id in enumerate(ids):
        rows = [p for p in problems if p["id"] == str(example_id)]
        if len({(p["problem"], p["answer"]) for p in rows}) != 1:
            raise SystemExit(f"example {example_id!r}: " + (f"{len(rows)} different training problems have this id"
                             if rows else "no training problem has this id (the data's `index`, else a position)"))
        examples.append({**rows[0], "true_answer": rows[0]["answer"]} | ({"answer": labels[n]} if labels else {}))
    return examples


def record_accuracy(history: dict, batch: list[dict], rewards: torch.Tensor, group_size: int) -> None:
    """Each example's training accuracy this step (its group's mean reward; under torchrun, of every rank's groups)
    appended to its history, once per step. A batch that spans an epoch boundary may hold an example twice: its
    groups make one record, the accuracy of all its samples (the paper's trainer never samples one twice a step)."""
    this_step = {}
    accuracies = rewards.view(-1, group_size).mean(1).tolist()
    for example_id, accuracy in gather_from_ranks([(p["id"], a) for p, a in zip(batch, accuracies)]):
        this_step.setdefault(example_id, []).append(accuracy)
    for example_id, values in this_step.items():
        history.setdefault(example_id, []).append(float(np.mean(values)))


# ==== PLUMBING: the fused log-prob (the memory-critical piece) ========================================================
class ChunkedLogprobEntropy(torch.autograd.Function):
    """log p(target) and entropy H of p = softmax(hidden @ weight.T / T), never holding a [tokens x vocab] tensor.

    Forward walks over chunks of tokens and keeps three numbers per token (log p(target), H, log-sum-exp). The GEMM
    writes y = logits / T itself (1/T is its alpha), and exp(y) is taken with no max shift: a policy's logits keep
    sum exp(y) well inside fp32's range, and the rare rows outside it (found with one host sync per forward) are
    computed again with the shift (`softmax_statistics`).
    Backward walks over blocks of the vocabulary, recomputing the logits of every token for one block at a time.
    With z the logits divided by T, g1 and g2 the incoming gradients of log p(target) and H:
        d log p(t) / dz_j = [j = t] - p_j          d H / dz_j = -p_j (log p_j + H)
        so dL/dz_j = p_j (a + b log p_j) + [j = t] g1 / T,   a = -(g1 + g2 H) / T,   b = -g2 / T  (per token),
    the 1/T coming from z = logits / T. The block's GEMM writes log p = z / T - lse itself: the hidden states carry
    -lse * T in extra contraction columns against columns of ones in the weight block (`with_shift_columns`), and
    1/T is the GEMM's alpha. Blocking the vocabulary makes each block's weight gradient one complete GEMM, written
    once in the weight's dtype: no fp32 accumulator of the weight's size. Only the small hidden-state gradient
    [tokens x hidden] is accumulated, in fp32, by the GEMM itself (C += A B).
    Cost per element of a block, counted in passes over fp32 memory after its GEMM (`bench/logprob.py --passes`):
    forward 4 reads + 1 write, backward 4 reads + 3 writes (2 reads + 2 writes when the entropy's gradient is not
    needed); docs/logprob.md has the speed.
    Chunk sizes come from a memory budget (memory_mib) for these temporaries, not a fixed count.
    Under CUDA autocast the GEMMs run in the autocast dtype with fp32 outputs (logits are never rounded to bf16);
    the statistics are fp32 (fp64 inputs stay fp64: the tests' exact reference)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature: float, memory_mib: float):
        ctx.set_materialize_grads(False)
        dtype = gemm_dtype(hidden)
        stats = torch.promote_types(dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):  # every dtype below is chosen on purpose
            h, w = hidden.to(dtype), weight.to(dtype)
            n, vocab = h.shape[0], w.shape[0]
            logp, entropy, lse = (torch.empty(n, dtype=stats, device=h.device) for _ in range(3))
            rows = chunk_length(memory_mib, bytes_per_item=2 * vocab * stats.itemsize)  # y and exp(y)
            for s in range(0, n, rows):
                y = scaled_matmul(h[s:s + rows], w.T, inv_temperature, stats)
                lse[s:s + rows], logp[s:s + rows], entropy[s:s + rows] = softmax_statistics(y, targets[s:s + rows])
            redo = ((lse < -60) | (lse > 80) | ~entropy.isfinite()).nonzero().squeeze(1)  # the one host sync
            for s in range(0, len(redo), rows):
                index = redo[s:s + rows]
                y = scaled_matmul(h[index], w.T, inv_temperature, stats)
                lse[index], logp[index], entropy[index] = softmax_statistics(y, targets[index], shift=True)
        ctx.save_for_backward(hidden, weight, targets, logp, entropy, lse)
        ctx.inv_temperature, ctx.memory_mib, ctx.dtype = inv_temperature, memory_mib, dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, logp, entropy, lse = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        inv_t, stats = ctx.inv_temperature, lse.dtype
        g1 = grad_logp if grad_logp is not None else torch.zeros_like(lse)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(ctx.dtype), weight.to(ctx.dtype)
            n, vocab = h.shape[0], w.shape[0]
            if grad_entropy is None:  # the entropy is only logged: its terms are skipped entirely
                a, b = -inv_t * g1, None
                at_target = (1 - logp.exp()) * inv_t * g1
            else:
                a, b = -inv_t * (g1 + grad_entropy * entropy), -inv_t * grad_entropy
                at_target = logp.exp() * (a + b * logp) + inv_t * g1
            at_target = at_target.to(ctx.dtype)  # the target's entry, from fp32 statistics, rounded once
            grad_hidden = torch.empty(hidden.shape, dtype=stats, device=h.device) if ctx.needs_input_grad[0] else None
            grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
            h_shift = with_shift_columns(h, -lse / inv_t)
            # the budget holds h_shift, and per column: log p, p, the dtype's dL/dz and the weight block's copy
            spare_mib = ctx.memory_mib - h_shift.numel() * h_shift.element_size() / 2**20
            bytes_per_column = n * (2 * stats.itemsize + ctx.dtype.itemsize) + h_shift.shape[1] * w.element_size()
            cols = chunk_length(spare_mib, bytes_per_column)
            if cols > 128:  # keep blocks a multiple of 128 wide: a misaligned width sends cuBLAS to kernels 3x slower
                cols -= cols % 128
            w_shift_buffer = w.new_ones(min(cols, vocab), h_shift.shape[1])  # ones meet the shift's columns
            token = torch.arange(n, device=h.device)
            for v in range(0, vocab, cols):
                w_block = w[v:v + cols]
                w_shift = w_shift_buffer[:w_block.shape[0]]
                w_shift[:, :w.shape[1]] = w_block
                log_p = scaled_matmul(h_shift, w_shift.T, inv_t, stats)  # z / T - lse, from the GEMM
                grad_z = torch.empty(log_p.shape, dtype=ctx.dtype, device=h.device)
                if b is None:
                    torch.mul(log_p.exp_(), a[:, None], out=grad_z)  # a p
                else:
                    p = torch.exp(log_p)
                    torch.mul(p, torch.addcmul(a[:, None], log_p, b[:, None], out=log_p), out=grad_z)
                col = targets - v  # overwrite the targets that fall in this block (no host sync: masked write)
                hit = (col >= 0) & (col < grad_z.shape[1])
                col = col.clamp_(0, grad_z.shape[1] - 1)
                grad_z[token, col] = torch.where(hit, at_target, grad_z[token, col])
                if grad_weight is not None:  # the block's complete weight gradient: one GEMM, written once
                    matmul(grad_z.T, h, weight.dtype, out=grad_weight[v:v + cols])
                if grad_hidden is not None:
                    if v == 0:
                        matmul(grad_z, w_block, stats, out=grad_hidden)
                    else:
                        matmul_accumulate(grad_hidden, grad_z, w_block)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None


def softmax_statistics(y, targets, shift: bool = False):
    """(log-sum-exp, log p(target), entropy) of each row of softmax(y); y is overwritten when shifted.

    Unshifted, e = exp(y) is read and summed as it is: exact while the row's sum stays inside fp32's range, which
    the forward checks afterwards (a sum above e^80 may hold an overflowed term, one below e^-60 is denormal) and
    redoes with shift=True, the textbook y - max y. H = log sum e - sum e y / sum e."""
    top = y.amax(1, keepdim=True) if shift else None
    if shift:
        y.sub_(top)
    e = torch.exp(y)
    total = e.sum(1)
    log_total = total.log()
    dot_ey = torch.bmm(e[:, None, :], y[:, :, None]).view(-1)  # sum_j e_j y_j, one read of each
    logp = y.gather(1, targets[:, None]).squeeze(1) - log_total
    lse = log_total + top.squeeze(1) if shift else log_total
    return lse, logp, log_total - dot_ey / total


def with_shift_columns(h, column, parts: int = 3, width: int = 8):
    """h with `width` more columns: `column` split into `parts` values of h's dtype that add up to it (bf16 holds 8
    mantissa bits, 3 parts hold fp32's 24; the GEMM adds them in fp32), then zeros (a multiple of 8 wide keeps
    tensor cores aligned). Against a weight block with ones in those columns, h_shift @ w_shift.T = h @ w.T + column."""
    split, rest = [], column
    for _ in range(parts):
        split.append(rest.to(h.dtype))
        rest = rest - split[-1].to(column.dtype)
    return torch.cat([h, torch.stack(split, 1), h.new_zeros(h.shape[0], width - parts)], 1)


def gemm_dtype(hidden):
    """The dtype of the log-prob's GEMMs: CUDA autocast's (fp32 master weights, bf16 compute), else the input's."""
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return hidden.dtype


def matmul(a, b, out_dtype, out=None):
    """a @ b, accumulated in fp32 or wider and written in out_dtype. Half-precision inputs on a GPU use cuBLAS's
    fp32-output GEMM (no rounding to bf16, no extra pass); elsewhere the inputs are upcast first."""
    if a.dtype == out_dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda and out_dtype == torch.float32:
        return torch.mm(a, b, out_dtype=out_dtype, out=out)
    wide = torch.promote_types(a.dtype, out_dtype)
    product = torch.mm(a.to(wide), b.to(wide)).to(out_dtype)
    return product if out is None else out.copy_(product)


def scaled_matmul(a, b, scale: float, out_dtype):
    """scale * (a @ b) as matmul makes it, the scale being the GEMM's alpha (no extra pass over the output)."""
    unused = a.new_zeros(1, 1)  # addmm's input, ignored at beta=0
    if a.dtype == out_dtype:
        return torch.addmm(unused, a, b, beta=0, alpha=scale)
    if a.is_cuda and out_dtype == torch.float32:
        return torch.addmm(unused, a, b, beta=0, alpha=scale, out_dtype=out_dtype)
    return matmul(a, b, out_dtype).mul_(scale)


def matmul_accumulate(acc, a, b) -> None:
    """acc += a @ b with acc as the GEMM's C: no [tokens x hidden] product written and then read back. Half-precision
    a and b on a GPU add into the fp32 acc through cuBLAS's fp32-output GEMM; elsewhere they are upcast first."""
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, out=acc)
    elif a.is_cuda and acc.dtype == torch.float32:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except RuntimeError:  # an older torch may want the input in a's dtype: add the fp32 product in a pass
            acc += matmul(a, b, acc.dtype)
    else:
        acc += torch.mm(a.to(acc.dtype), b.to(acc.dtype))


def chunk_length(memory_mib: float, bytes_per_item: int) -> int:
    """How many rows (or columns) of temporaries fit in the memory budget; at least one."""
    return max(1, int(memory_mib * 2**20 // bytes_per_item))


def logprobs_and_entropy(hidden, weight, targets, temperature: float = 1.0, memory_mib: float = 1024):
    """Per-token log-prob of `targets` and entropy under softmax(hidden @ weight.T / temperature): float32 for
    bf16/fp32 inputs (float64 for float64 ones, which the tests use as the exact reference). memory_mib bounds the
    temporaries of one chunk (the weight gradient and the hidden-state gradient come on top)."""
    return ChunkedLogprobEntropy.apply(hidden, weight, targets, 1.0 / temperature, memory_mib)


def response_logprobs(model, batch: dict, temperature: float, memory_mib: float):
    """Log-probs and entropies of the response tokens of a collated batch, flattened in row order.

    Only the hidden states that predict response tokens reach the LM head: the prompt's never do."""
    if hasattr(model, "unshard"):  # an FSDP2 module gathers weights in forward(), which this skips: gather now
        model.unshard()
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    predicts_response = batch["response_mask"][:, 1:]
    hidden = hidden[:, :-1][predicts_response]
    targets = batch["input_ids"][:, 1:][predicts_response]
    return logprobs_and_entropy(hidden, model.get_output_embeddings().weight, targets, temperature, memory_mib)


def check_lm_head(model) -> None:
    """The fused log-prob is softmax(hidden @ weight.T / T): a model whose logits take more than that (a bias,
    Gemma's final soft-capping, Granite's or Cohere's scaling), which vLLM would apply and the trainer would not, would
    train off-policy without a word. It is refused, naming what the trainer does not model."""
    config = model.config.get_text_config()
    unmodelled = [f"config.{name} = {getattr(config, name)}" for name, neutral in
                  (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0))
                  if getattr(config, name, None) not in (None, neutral)]
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        unmodelled.append("lm_head.bias")
    if unmodelled:
        raise SystemExit(f"{type(model).__name__}: the trainer's log-probs do not model {', '.join(unmodelled)}")


def collate(rollouts: list[dict], pad_id: int, device) -> dict:
    """Right-padded prompt+response rows; response_mask marks the response tokens (stop token included)."""
    rows = [torch.tensor(r["prompt_ids"] + r["response_ids"]) for r in rollouts]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
    position = torch.arange(input_ids.shape[1])
    attention_mask = position < torch.tensor([len(row) for row in rows])[:, None]
    response_mask = attention_mask & (position >= torch.tensor([len(r["prompt_ids"]) for r in rollouts])[:, None])
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.long().to(device),
            "response_mask": response_mask.to(device)}


# ==== PLUMBING: rollouts (generation itself is eval.py's) and the weight push =========================================
def make_rollout_engine(args, model_path: str, model):
    """An in-process vLLM engine on the trainer's device, or None for HF `generate` on the policy itself."""
    if args.rollout == "hf" or (args.rollout == "auto" and importlib.util.find_spec("vllm") is None):
        return None
    return evaluation.make_engine(model_path, args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
                                  enable_sleep_mode=torch.cuda.is_available() and args.vllm_sleep,
                                  max_model_len=min(args.max_prompt_tokens + args.max_new_tokens,
                                                    model.config.max_position_embeddings), enable_prefix_caching=True)


def generate(engine, model, tokenizer, batch: list[dict], args, step: int, rank: int) -> list[dict]:
    """n sampled responses per prompt, grouped by prompt: [{prompt_ids, response_ids, text, truncated,
    engine_logprobs}]. The sampler's seed is a function of (seed, step, rank): a resumed run draws what the
    uninterrupted one drew, each rank draws its own, and the trainer's random streams are left alone."""
    completions = evaluation.generate(engine or model, tokenizer, [p["prompt_ids"] for p in batch],
                                      n=args.samples_per_prompt, temperature=args.temperature, top_p=args.top_p,
                                      max_tokens=args.max_new_tokens, seed=(args.seed * 1_000_003 + step) * 4096 + rank,
                                      batch_size=len(batch) * args.samples_per_prompt)
    return [{"prompt_ids": p["prompt_ids"], "response_ids": c["token_ids"], "text": c["text"],
             "truncated": c["truncated"], "engine_logprobs": c["logprobs"]} for p, group in zip(batch, completions)
            for c in group]


def push_weights(engine, model, args) -> None:
    """Load the policy's weights into the vLLM engine in place (waking it first on a GPU, where it slept through the
    update), then forget the cached prefixes of the old weights."""
    if engine is None:
        return
    sleeps = args.vllm_sleep and torch.cuda.is_available()
    if sleeps:
        engine.wake_up(tags=["weights"])
    engine.collective_rpc("reload_weights", kwargs={"weights_iterator": streamed_weights(model)})
    if sleeps:
        engine.wake_up(tags=["kv_cache"])
    engine.reset_prefix_cache()


def streamed_weights(model):
    """name -> full tensor, one at a time, lm_head.weight included even when tied (without it vLLM silently generates
    from neither the old nor the new weights). Under FSDP each is gathered when asked for, so a push holds one full
    tensor, not the whole model; every rank must go through it in the same order (each gather is a collective)."""
    if is_distributed():  # the FSDP root keeps its gathered (on GPUs bf16) weights after forward: read the shards
        model.reshard()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    state = model.state_dict()
    for name, t in state.items():
        yield name, full(t)
    if "lm_head.weight" not in state and model.get_output_embeddings() is not None:  # a critic has no LM head
        yield "lm_head.weight", full(model.get_output_embeddings().weight)


# ==== PLUMBING: torchrun and FSDP2 (idle in a single process) =========================================================
def init_distributed() -> tuple[int, int, torch.device]:
    """rank, world size and this rank's device. Under torchrun (WORLD_SIZE > 1) join its process group: NCCL on
    GPUs, gloo on CPUs; a single process starts no process group at all."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def is_distributed() -> bool:
    """Started by torchrun with several ranks. (An in-process vLLM engine starts a process group of one.)"""
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def shard_model(model, device, world: int):
    """One process: the model on the device. Under torchrun, FSDP2: each decoder layer is one gather/reduce unit and
    the root holds embeddings, norm and LM head; fully_shard moves each layer to the GPU as it shards it, so no GPU
    ever holds a whole fp32 model. On GPUs bf16 copies of the fp32 weights compute, and gradients reduce in fp32."""
    if world == 1:
        return model.to(device)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in getattr(model, model.base_model_prefix).layers:
        fully_shard(layer, mp_policy=mixed)
    fully_shard(model, mp_policy=mixed)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # each rank's loss is already divided by the whole batch's counts: sum the gradients, do not average
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    with torch.no_grad():  # FSDP takes the first module to run forward as the root; response_logprobs skips forward
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    model.reshard()  # the root keeps its gathered weights after forward; the optimizer must get the shards
    return model


def gather_from_ranks(values: list) -> list:
    """Every rank's values in rank order; in a single process, the values themselves."""
    if not is_distributed():
        return values
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def summed_over_ranks(counts: list[int], device, op=None) -> list[int]:
    """Counts summed over the ranks (or their maximum, op=MAX), reduced on the ranks' device (NCCL: GPU tensors)."""
    if not is_distributed():
        return counts
    total = torch.tensor(counts, dtype=torch.long, device=device)
    torch.distributed.all_reduce(total, op=op or torch.distributed.ReduceOp.SUM)
    return total.tolist()


def mini_batch_shares(n: int, size: int, seed: list[int]) -> list[list[int]]:
    """This rank's rows of each shuffled mini-batch (n rows and `size` rows per mini-batch on each rank). The shuffle
    is the single process's: one permutation of every rank's rows, a function of `seed` (so a resumed run needs no
    random state), each rank keeping the members it holds; so every optimizer step sees the rows one process would."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    order = np.random.default_rng(seed).permutation(n * world).tolist()
    first, step = rank * n, size * world
    return [[g - first for g in order[m:m + step] if first <= g < first + n] for m in range(0, n * world, step)]


def micro_batches(kept: list[int], filler: int, size: int, device) -> list[tuple[list[int], float]]:
    """A mini-batch's rows in micro-batches, each with the factor its loss counts with. FSDP's gathers are collectives,
    so every rank runs as many passes as the others: a rank holding fewer rows of this mini-batch adds passes over one
    row, `filler`, whose loss counts 0."""
    chunks = [(kept[u:u + size], 1.0) for u in range(0, len(kept), size)]
    most = summed_over_ranks([len(chunks)], device, torch.distributed.ReduceOp.MAX)[0] if is_distributed() else 0
    return chunks + [([filler], 0.0)] * (most - len(chunks))


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Clip to a global gradient norm; returns the norm before clipping (under FSDP over every rank's shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor, the same on every rank


# ==== PLUMBING: arguments, data, checkpoints, logging =================================================================
class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: )" after an empty default
        return action.help if action.default in ("", None, []) else super()._get_help_string(action)


def parse_args(argv=None) -> Args:
    """The command line, through transformers' HfArgumentParser. --resume RUN continues a run with its own args.json;
    flags given on the command line override it (--total-steps to train longer, say), with a note."""
    from transformers import HfArgumentParser
    parser = HfArgumentParser(GROUPS, description=__doc__.split("\n\n")[0], formatter_class=Help,
                              usage="%(prog)s [--flag value ...]; --help lists them")
    for action in parser._actions:  # it also lists --output_dir beside --output-dir: --help shows one spelling
        action.option_strings = [o for o in action.option_strings if "_" not in o] or action.option_strings
    args = Args(**vars(parser.parse_args(argv)))
    if not args.resume:
        return args
    checkpoint = latest_checkpoint(Path(args.resume))
    run_args = json.loads((checkpoint.parent / "args.json").read_text())
    foreign = sorted(set(run_args) - {f.name for f in dataclasses.fields(Args)})
    if foreign:  # another script's run: its flags are not this script's
        raise SystemExit(f"--resume {checkpoint.parent}: not a {Path(__file__).name} run (its args.json has "
                         f"{', '.join(foreign)})")
    resumed = Args(**vars(parser.parse_args(argv, namespace=argparse.Namespace(**run_args))))
    changed = [f"--{k.replace('_', '-')} {v} (was {run_args[k]})" for k, v in dataclasses.asdict(resumed).items()
               if k != "resume" and v != run_args.get(k)]
    if changed:
        print(f"resuming {checkpoint.parent} with " + ", ".join(changed))
    return dataclasses.replace(resumed, resume=str(checkpoint), output_dir=str(checkpoint.parent))


def latest_checkpoint(folder: Path) -> Path:
    """A checkpoint-<step> folder, or a run's folder standing for its latest checkpoint."""
    if not (folder / "trainer_state.pt").is_file():
        steps = sorted(int(c.name.split("-")[1]) for c in folder.glob("checkpoint-*") if c.name.split("-")[1].isdigit())
        if not steps:
            raise SystemExit(f"--resume {folder}: neither a run folder with checkpoints nor a checkpoint-<step> folder")
        folder = folder / f"checkpoint-{steps[-1]}"
    if not (folder.parent / "args.json").is_file() or not (folder / "trainer_state.pt").is_file():
        raise SystemExit(f"--resume {folder}: not a checkpoint of a run (no trainer_state.pt, or no args.json beside)")
    if not (folder / "optimizer").is_dir():
        raise SystemExit(f"--resume {folder}: an older checkpoint, which keeps its weights only; resume the run's "
                         "latest (give the run's folder)")
    return folder


AT_LEAST_ONE = ("total_steps", "prompts_per_step", "max_new_tokens", "num_updates", "mini_batch", "micro_batch",
                "max_prompt_tokens")


def check_args(args, world: int) -> Path:
    """Everything that needs nothing built, so that bad input costs one line and a second, and writes nothing.
    Returns the run's folder."""
    for name, value in dataclasses.asdict(args).items():
        at_least = 1 if name in AT_LEAST_ONE else 0
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < at_least:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be at least {at_least}")
    if args.samples_per_prompt < 2:  # the baseline is the group's mean: a group of one has nothing to compare with
        raise SystemExit(f"--samples-per-prompt {args.samples_per_prompt}: GRPO needs at least 2 per prompt")
    batch = args.prompts_per_step * args.samples_per_prompt
    if batch % args.mini_batch or args.mini_batch % args.micro_batch:
        raise SystemExit(f"--mini-batch {args.mini_batch} must divide the batch (prompts per step x samples per "
                         f"prompt = {batch}), and --micro-batch {args.micro_batch} must divide --mini-batch")
    if args.prompts_per_step % world or args.mini_batch % world:
        raise SystemExit(f"torchrun with {world} ranks: --prompts-per-step ({args.prompts_per_step}) and "
                         f"--mini-batch ({args.mini_batch}) must be multiples of {world}")
    if not args.temperature > 0 or not 0 < args.top_p <= 1:
        raise SystemExit(f"--temperature {args.temperature}, --top-p {args.top_p}: training samples, so the "
                         "temperature must be > 0 (the trainer divides its logits by it), and top-p in (0, 1]")
    if args.rollout == "vllm" and importlib.util.find_spec("vllm") is None:
        raise SystemExit("--rollout vllm: vLLM is not installed (pip install vllm), or use --rollout hf")
    evaluation.check_model(args.model)
    folder = Path(args.output_dir or f"runs/{Path(__file__).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume:
        step = int(Path(args.resume).name.split("-")[1])
        world_then = torch.load(Path(args.resume) / "trainer_state.pt", weights_only=False)["world_size"]
        if world_then != world:
            raise SystemExit(f"--resume {args.resume}: written by {world_then} rank(s); resume it with as many")
        if step >= args.total_steps:
            raise SystemExit(f"--resume {folder}: the run is finished ({step} of {args.total_steps} steps); "
                             "add --total-steps N to train it further")
    elif folder.is_file() or (folder / "args.json").exists():
        raise SystemExit(f"--output-dir {folder}: " + ("a file" if folder.is_file() else "holds a run: continue it "
                         f"with --resume {folder}, or choose another folder"))
    return folder


def read_data(args) -> tuple[list[dict], dict[str, list[dict]]]:
    """The training problems and the evaluation sets by name (a file's name is its path), read before any model
    loads: bad data costs a second."""
    if args.eval_data == "auto":
        args.eval_data = "toy" if args.model in evaluation.TINY_MODELS else "paper"
    names = [m for name in args.eval_data.split(",") for m in
             (evaluation.PAPER_BENCHMARKS if name.strip() == "paper" else (name.strip(),))]
    try:
        return (evaluation.load_problems(args.train_data, args.problem_key, args.answer_key),
                {name: evaluation.load_eval_set(name, args.problem_key, args.answer_key, args.eval_max_problems)
                 for name in dict.fromkeys(names)})
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--train-data / --eval-data: {e}") from None


def tokenize_prompts(problems: list[dict], tokenizer, args) -> list[dict]:
    """The problems with their prompts' token ids; prompts over the length limit are dropped and counted."""
    try:
        kept = [{**p, "prompt_ids": evaluation.encode_prompt(tokenizer, evaluation.build_prompt(p["problem"],
                                                                                             tokenizer, args.template))}
                for p in problems]
    except ValueError as e:  # a chat template the tokenizer lacks
        raise SystemExit(f"--template: {e}") from None
    kept = [p for p in kept if len(p["prompt_ids"]) <= args.max_prompt_tokens]
    if len(kept) < len(problems):
        print(f"dropped {len(problems) - len(kept)} of {len(problems)} prompts longer than {args.max_prompt_tokens} "
              "tokens")
    if not kept:
        raise SystemExit(f"no training prompt fits in --max-prompt-tokens {args.max_prompt_tokens}")
    return kept


def batch_indices(step: int, n_problems: int, batch: int, seed: int) -> list[int]:
    """The problems of rollout batch `step`: epochs of seeded shuffles, so the data order is a function of the
    step alone and a resumed run sees exactly the batches an uninterrupted one would."""
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(position, n_problems)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_problems)[i]))
    return out


def make_optimizer(model, args, total_updates: int):
    """AdamW and transformers' schedule of that name (warmup from 0, then constant, or cosine or linear to 0)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    name = "constant_with_warmup" if args.lr_schedule == "constant" else args.lr_schedule
    return optimizer, transformers.get_scheduler(name, optimizer, args.warmup_steps, total_updates)


def save_checkpoint(folder: Path, step: int, model, tokenizer, optimizer, scheduler, extra: dict | None = None):
    """An HF folder (loadable by transformers, vLLM and eval.py) and what resuming needs: the optimizer state
    (torch.distributed.checkpoint: sharded under torchrun), the schedule and `extra`, a fork's own state (the same on
    every rank). No random state: every draw is a function of the seed and the step. One layout for any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    weights = dict(streamed_weights(model))  # a collective under FSDP: every rank gathers
    if model.config.tie_word_embeddings:  # written once, as save_pretrained does
        weights.pop("lm_head.weight", None)
    if rank == 0:
        model.save_pretrained(folder, state_dict=weights)
        tokenizer.save_pretrained(folder)
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "world_size": world,
                    **(extra or {})}, folder / "trainer_state.pt")
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder / "optimizer",
             no_dist=not is_distributed())
    if is_distributed():
        torch.distributed.barrier()
    for older in folder.parent.glob("checkpoint-*") if rank == 0 else ():  # 2x the weights each: only the
        if older != folder:  # latest checkpoint keeps what resuming needs; the others keep what evaluating needs
            for state in list(older.glob("**/optimizer")):  # a second model's (ppo's critic/) too
                shutil.rmtree(state, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """What save_checkpoint wrote, into the model's optimizer and the schedule; returns trainer_state.pt's contents
    (the step and a fork's `extra`). The weights were loaded with the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = torch.load(folder / "trainer_state.pt", weights_only=False, map_location="cpu")
    if is_distributed():
        model.reshard()
    sharded = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(sharded, checkpoint_id=folder / "optimizer", no_dist=not is_distributed())
    set_optimizer_state_dict(model, optimizer, sharded["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


class CtrlC:
    """The first Ctrl-C asks the run to stop after the step in progress and save it; a second one quits at once."""

    def __init__(self):
        self.asked = False
        signal.signal(signal.SIGINT, self.ask)

    def ask(self, *_):
        if self.asked:
            os._exit(130)
        self.asked = True
        print("\nCtrl-C: stopping after this step, with a checkpoint (Ctrl-C again quits at once, unsaved)", flush=True)


def open_log(output_dir: Path, args, start: int):
    """metrics.jsonl (every number of every step) as one run: a resumed run first drops the steps after its
    checkpoint, which it trains again. Returns log(metrics), which also prints each evaluation."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args) | {"resume": ""}, indent=2))
    path = output_dir / "metrics.jsonl"
    kept = [line for line in path.read_text().splitlines(True) if json.loads(line)["step"] <= start] if start else []
    path.write_text("".join(kept))

    def log(metrics: dict):
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if "eval/accuracy" in metrics:
            tqdm.write(f"step {metrics['step']}: held-out accuracy {metrics['eval/accuracy']:.3f} ({args.eval_data})")
    return log


def summary(output_dir: Path, args, world: int, stopped: bool) -> str:
    """What the run did, where it is, and what to run next."""
    rows = [json.loads(line) for line in open(output_dir / "metrics.jsonl")]
    trained, evals = [r for r in rows if "reward_mean" in r], [r for r in rows if "eval/accuracy" in r]
    step = trained[-1]["step"]
    checkpoint = output_dir / f"checkpoint-{step}"
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    lines = [f"{'stopped' if stopped else 'finished'} at step {step} of {args.total_steps}: reward "
             f"{trained[0]['reward_mean']:.2f} -> {trained[-1]['reward_mean']:.2f}, held-out accuracy "
             f"{evals[0]['eval/accuracy']:.2f} (step {evals[0]['step']}) -> {evals[-1]['eval/accuracy']:.2f} "
             f"(step {evals[-1]['step']})", f"metrics: {output_dir / 'metrics.jsonl'}", f"checkpoint: {checkpoint}"]
    if stopped:
        lines.append(f"continue: {launcher} {Path(__file__).name} --resume {output_dir}")
    else:
        benchmarks = "toy" if args.eval_data == "toy" else "paper"
        lines.append(f"evaluate it: python eval.py --model {checkpoint} --benchmarks {benchmarks}")
    return "\n".join(lines)


# ==== main ============================================================================================================
def main(args: Args) -> Path:
    # setup: processes, checks, seed, data, model, reference, optimizer, engine, run folder, resume
    rank, world, device = init_distributed()  # one process unless started by torchrun
    output_dir = check_args(args, world)  # before anything is built or written
    train_problems, eval_problems = read_data(args)
    train_problems = training_problems(args, train_problems)  # the pool, or copies of the example(s)
    torch.manual_seed(args.seed)  # a new head's initial weights; every other draw is seeded by (seed, step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if rank == 0:
        print(f"{'resuming' if args.resume else 'training'} {args.model} on {args.train_data} ({len(train_problems)} "
              f"problems), writing to {output_dir}", flush=True)
    model_path = args.resume or evaluation.resolve_model_path(args.model)  # torchrun: one rank builds the tiny
    model, tokenizer = evaluation.load_model(model_path)  # fp32 master weights; bf16 compute on GPU
    check_lm_head(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model = shard_model(model.train(), device, world)  # under torchrun: sharded before the next model loads
    reference = None
    if args.kl_coef > 0:  # with no KL term there is nothing to compare against: no reference is loaded
        reference = evaluation.load_model(args.model)[0].eval().requires_grad_(False)
        reference = shard_model(reference, device, world)
    problems = tokenize_prompts(train_problems, tokenizer, args)
    updates_per_step = args.num_updates * args.prompts_per_step * args.samples_per_prompt // args.mini_batch
    optimizer, scheduler = make_optimizer(model, args, args.total_steps * updates_per_step)
    engine = make_rollout_engine(args, model_path, model)
    push_weights(engine, model, args)  # the engine loaded fp32 files from disk; from here on it tracks the policy
    state = load_checkpoint(Path(args.resume), model, optimizer, scheduler) if args.resume else {"step": 0}
    start, history, best = state["step"], state.get("history", {}), state.get("best")
    log = open_log(output_dir, args, start) if rank == 0 else lambda metrics: None
    if start == 0:  # the held-out accuracy before training: the first best
        best = {"step": 0, **run_evaluation(engine or model, tokenizer, eval_problems, args)}
        log(best)
    rank_args = dataclasses.replace(args, mini_batch=args.mini_batch // world)  # each rank's share of a mini-batch
    ctrl_c, share = CtrlC(), args.prompts_per_step // world
    transformers.utils.logging.disable_progress_bar()  # a checkpoint's "writing shards" bar would break the step bar
    bar = tqdm(range(start, args.total_steps), initial=start, total=args.total_steps, unit="step", disable=rank != 0)
    for step in bar:
        metrics = {"step": step + 1}
        # 1. sample prompts: this rank's whole groups, so group advantages need no communication
        batch = [problems[i] for i in batch_indices(step, len(problems), args.prompts_per_step, args.seed)]
        batch = batch[rank * share:(rank + 1) * share]
        # 2. generate
        t0 = time.time()
        rollouts = generate(engine, model, tokenizer, batch, args, step, rank)
        t1 = time.time()
        # 3. score: the final answer checked by verify.py; a truncated response earns nothing
        golds = [p["answer"] for p in batch for _ in range(args.samples_per_prompt)]
        correct = verify.score_batch([r["text"] for r in rollouts], golds, mode=args.answer_mode)
        rewards = torch.tensor([0.0 if r["truncated"] else c for r, c in zip(rollouts, correct)])
        # 4. advantages; the entropy-only ablation has none, so only the entropy (and KL) terms move the policy
        advantages = group_advantages(rewards, args.samples_per_prompt, args.std_normalize)
        if args.entropy_only:
            advantages = torch.zeros_like(advantages)
        if args.mask_truncated:
            rollouts = [dict(r, masked=r["truncated"]) for r in rollouts]
        # 5. update: num_updates passes, each over mini-batches with micro-batch gradient accumulation
        if engine is not None and args.vllm_sleep and torch.cuda.is_available():
            engine.sleep(level=2)  # free vLLM's GPU memory (weights and KV cache) for the update
        metrics.update(lr=scheduler.get_last_lr()[0], **update_policy(
            model, reference, rollouts, advantages, optimizer, scheduler, rank_args, autocast, tokenizer.pad_token_id,
            device))
        # 6. push weights into the rollout engine
        push_weights(engine, model, args)
        # 7. log, evaluate, checkpoint (under torchrun: the whole batch, gathered from every rank)
        lengths = gather_from_ranks([len(r["response_ids"]) for r in rollouts])
        metrics.update(reward_mean=np.mean(gather_from_ranks(rewards.tolist())),
                       accuracy=np.mean(gather_from_ranks(list(correct))), response_len_mean=np.mean(lengths),
                       truncated_share=np.mean(gather_from_ranks([r["truncated"] for r in rollouts])),
                       time_generate=t1 - t0, time_train=time.time() - t1,
                       tokens_per_s=sum(lengths) / max(t1 - t0, 1e-9))
        #    each example's accuracy this step: the pool run's history is what --history ranks
        record_accuracy(history, batch, rewards, args.samples_per_prompt)
        if not args.pool and len(history) > 1:
            metrics.update({f"accuracy/{i}": accuracies[-1] for i, accuracies in history.items()})
        if args.label:  # the label-noise ablation: how often the policy still gives the data's own answer
            true_golds = [p["true_answer"] for p in batch for _ in range(args.samples_per_prompt)]
            metrics["true_label_accuracy"] = np.mean(gather_from_ranks(verify.score_batch(
                [r["text"] for r in rollouts], true_golds, mode=args.answer_mode)))
        stopping = any(gather_from_ranks([ctrl_c.asked]))  # every rank stops at the same step
        if step + 1 == args.total_steps or (args.eval_every and (step + 1) % args.eval_every == 0):
            metrics.update(run_evaluation(engine or model, tokenizer, eval_problems, args))
            if metrics["eval/accuracy"] > best["eval/accuracy"]:  # the paper reports its best evaluation
                best = {k: v for k, v in metrics.items() if k == "step" or k.startswith("eval")}
        if step + 1 == args.total_steps or stopping or (args.save_every and (step + 1) % args.save_every == 0):
            save_checkpoint(output_dir / f"checkpoint-{step + 1}", step + 1, model, tokenizer, optimizer, scheduler,
                            extra={"history": history, "best": best})
        if rank == 0:
            (output_dir / "accuracy_history.json").write_text(json.dumps(history))
            (output_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")
        log({k: float(v) if isinstance(v, np.floating) else v for k, v in metrics.items()})
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", len=f"{metrics['response_len_mean']:.0f}")
        if stopping:
            break
    bar.close()
    if rank == 0:
        print(summary(output_dir, args, world, stopping))
        print(f"next, 1-shot RLVR on its pi_1: python {Path(__file__).name} --history {output_dir}" if args.pool else
              f"best: step {best['step']}, eval/accuracy {best['eval/accuracy']:.3f} ({output_dir / 'best.json'})")
    if world > 1 and engine is None:  # a vLLM engine tears the process group down itself when it shuts down
        evaluation.leave_process_group()
    return output_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except KeyboardInterrupt:  # before the first step, when there is nothing to save yet
        sys.exit("\ninterrupted before training began: nothing was written")
