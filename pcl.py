"""Prompt Curriculum Learning (PCL) for LLM math reasoning in one file.

"Prompt Curriculum Learning for Efficient LLM Post-Training" (2025): each step a value model V(x), trained online to
predict the policy's accuracy on a prompt from the prompt alone, scores k*m uniform candidates in one forward pass;
the m whose V(x) is closest to tau = 0.5 (the most samples with a non-zero advantage) are rolled out n times each
for on-policy GRPO; then V is regressed on their realised mean rewards. Baselines: plain GRPO (--select uniform) and
DAPO's dynamic sampling (--select dynamic-sampling), which rolls out all k*m to keep the groups whose rewards differ.

    python pcl.py                                     # the tiny built-in model on the toy task: CPU, ~5 minutes
    python pcl.py --select uniform                    # the same run with uniform prompts, to compare
    torchrun --nproc_per_node 8 pcl.py --model ...    # several GPUs: FSDP2, one vLLM engine per rank

Choices and simplifications (a flag where there is a choice):
- Rollouts from vLLM in this process, its weights pushed after every update, or from HF `generate` (--rollout hf).
- Loss aggregation: token-mean (DAPO, verl), seq-mean-token-mean (the GRPO paper) or seq-mean-token-sum-norm
  (Dr. GRPO, which also drops the std: --no-std-normalize).
- The trainer's log-probs are of the response tokens only, from logits divided by the sampling temperature, through
  a chunked autograd Function that never holds a [tokens x vocab] tensor.
- Under torchrun each rank takes whole prompt groups and an FSDP2 shard; losses are normalised by the whole batch's
  counts, so a step is the single-process step on the whole batch.
- V (ours: no code of the paper is public): --model's backbone, a zero-initialised linear head on the last prompt
  token, a sigmoid (V = 0.5 everywhere, ties go to the first drawn: the first steps are uniform); its own AdamW.
- tau is 0.3 by default, for the toy (the paper's 0.5: --tau 0.5): late in a toy run its prompts are solved or
  unsolved, equally far from 0.5, and 0.3 sends that tie to the unsolved ones, the ones left to learn (docs/pcl.md).
- Dynamic sampling with fewer than m informative prompts trains on those alone (DAPO draws again).
- V is scored where its selection cannot hide its errors: on a fixed probe of training prompts never trained on.
- Checkpoints: the last step's and every --save-every's, V's weights and AdamW state with the policy's.
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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

import eval as evaluation
import verify

warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # a checkpoint of one process: meant


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


# ---- Args: every hyperparameter, with the PCL paper's value ("not given": not in our notes of it) --------------
@dataclass
class Experiment:
    _argument_group_name = "experiment"
    seed: int = arg(1, "seeds python, numpy, torch and the rollout sampler")
    output_dir: str = arg("", "the run's folder; default runs/<script>-<time>")
    total_steps: int = arg(60, "rollout batches (paper: until the validation accuracy plateaus)")
    eval_every: int = arg(25, "evaluate every this many steps, and at steps 0 and the last; 0: only those")
    save_every: int = arg(0, "checkpoint every this many steps; 0: only at the end (and on Ctrl-C)")
    resume: str = arg("", "continue a run: its folder (its latest checkpoint) or one of its checkpoint-<step>")


@dataclass
class ModelData:
    _argument_group_name = "model and data"
    model: str = arg("tiny", "hub id or folder (paper: Qwen3-1.7B/4B/8B-Base, Llama-3.2-3B-Instruct); tiny: built-in")
    train_data: str = arg("toy", "jsonl/json/parquet with problem and answer columns (paper: MATH train, DeepScaleR)")
    problem_key: str = arg("problem", "the column holding the problem")
    answer_key: str = arg("answer", "the column holding the gold answer")
    eval_data: str = arg("auto", "toy, a benchmark (math500, ...) or a file; auto: toy for the tiny models, else "
                                 "math500")
    eval_max_problems: int = arg(0, "evaluate on the first this many problems; 0: all")
    template: Literal[evaluation.TEMPLATES] = arg("qwen-math-train", "prompt template (paper: not given)")
    max_prompt_tokens: int = arg(1024, "longer prompts are dropped, with a count printed")


@dataclass
class Rollout:
    _argument_group_name = "rollout"
    rollout: Literal["auto", "vllm", "hf"] = arg("auto", "vllm, hf (transformers generate), auto: vllm if installed")
    prompts_per_step: int = arg(16, "m, prompts trained on per step (paper: 512)")
    samples_per_prompt: int = arg(8, "n, responses per prompt (paper: 16)")
    temperature: float = arg(1.0, "sampling temperature; the trainer's logits are divided by it too (paper: not given)")
    top_p: float = arg(1.0, "nucleus sampling (paper: not given)")
    max_new_tokens: int = arg(40, "response budget; a truncated response scores 0 (paper: 4096)")
    gpu_memory_utilization: float = arg(0.35, "vLLM's share of the GPU; the trainer has the rest")
    vllm_sleep: bool = arg(True, "free vLLM's GPU memory while training (GPU only)")


@dataclass
class GRPO:
    _argument_group_name = "GRPO"
    answer_mode: Literal[verify.MODES] = arg("boxed", "how verify.py reads the answer")
    std_normalize: bool = arg(False, "advantage (r - mean) / std (paper: off, r - mean)")
    mask_truncated: bool = arg(False, "leave truncated responses out of the loss")
    clip_low: float = arg(0.2, "PPO ratio clip below 1 (on-policy, one step per batch: the ratio is 1)")
    clip_high: float = arg(0.2, "PPO ratio clip above 1")
    kl_coef: float = arg(0.0, "k3 KL to the reference model in the loss; 0 loads no reference (paper: 0)")
    entropy_coef: float = arg(0.0, "entropy bonus: loss -= coef * entropy (paper: 0)")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = arg(
        "seq-mean-token-mean", "loss aggregation (paper: seq-mean-token-mean)")
    num_updates: int = arg(1, "passes over each rollout batch (paper: 1)")
    mini_batch: int = arg(128, "responses per optimizer step (paper: the whole batch m*n)")
    micro_batch: int = arg(32, "responses per forward/backward; gradients accumulate over a mini-batch")


@dataclass
class Optimisation:
    _argument_group_name = "optimisation"
    lr: float = arg(2e-4, "the policy's AdamW learning rate (paper: not given)")
    weight_decay: float = arg(0.01, "(paper: not given)")
    lr_schedule: Literal["constant", "cosine", "linear"] = arg("constant", "after warmup; cosine and linear end at "
                                                                           "0 (paper: constant)")
    warmup_steps: int = arg(0, "linear warmup, in optimizer steps")
    max_grad_norm: float = arg(1.0, "global gradient-norm clip, the policy's and V's (paper: not given)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward (real runs: on)")
    logprob_memory_mib: float = arg(1024, "working memory of one chunk of the fused log-prob (MiB)")


@dataclass
class PCL:
    _argument_group_name = "PCL: prompt selection by a value model"
    select: Literal["pcl", "uniform", "dynamic-sampling"] = arg(
        "pcl", "pcl: by V(x); uniform: plain GRPO; dynamic-sampling: DAPO's filter (the paper's baselines)")
    candidates_factor: int = arg(4, "k: pcl and dynamic sampling draw k*m candidates per step (paper: 4)")
    tau: float = arg(0.3, "target accuracy: pcl keeps the m candidates whose V(x) is closest to it (paper: 0.5, "
                          "as real runs pass; the toy's 0.3 breaks the tie of solved and unsolved toward unsolved)")
    value_model: str = arg("", "V's initial backbone, with the policy's tokenizer; default: --model (ours)")
    value_lr: float = arg(3e-4, "V's AdamW learning rate (ours; 1e-3 was unstable on the toy)")
    value_updates: int = arg(8, "V's AdamW steps per training step, each on all kept prompts (ours; 4 was too slow "
                                "on the toy)")
    value_probe: int = arg(64, "training prompts kept out of training, on which V is scored at each evaluation")


GROUPS = (Experiment, ModelData, Rollout, GRPO, PCL, Optimisation)


@dataclass
class Args(Optimisation, PCL, GRPO, Rollout, ModelData, Experiment):
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


def run_evaluation(engine, tokenizer, problems, args) -> dict:
    """Greedy accuracy on the held-out problems (toy split or a benchmark), through eval.py."""
    metrics, _ = evaluation.evaluate(engine, tokenizer, problems, template=args.template,
                                     max_tokens=args.max_new_tokens, seed=args.seed, mode=args.answer_mode)
    return {f"eval/{k}": v for k, v in metrics.items()}


# ==== ALGO LOGIC: PCL, prompts of intermediate difficulty chosen by a value model ===================================
class ValueModel(torch.nn.Module):
    """V(x) in [0, 1]: the policy's expected accuracy on prompt x, from the prompt alone. Ours: an LM's backbone, a
    linear head on the last prompt token's hidden state, a sigmoid; the head starts at zero, so V = 0.5 everywhere."""
    base_model_prefix = "backbone"  # shard_model finds V's decoder layers as it finds the policy's

    def __init__(self, lm):
        super().__init__()
        self.backbone = getattr(lm, lm.base_model_prefix)
        self.head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1  # right padding: the last real token of each row
        return torch.sigmoid(self.head(hidden[torch.arange(len(hidden)), last]).squeeze(-1).float())


def prompt_batches(prompt_ids: list[list[int]], size: int, pad_id: int, device):
    for u in range(0, len(prompt_ids), size):
        yield u, collate([{"prompt_ids": p, "response_ids": []} for p in prompt_ids[u:u + size]], pad_id, device)


@torch.no_grad()
def predict_values(value_model, prompt_ids: list[list[int]], args, pad_id, device, autocast) -> torch.Tensor:
    """V(x) of every prompt: forward passes over the prompts alone, no generation."""
    value_model.eval()
    with autocast:
        values = [value_model(b["input_ids"], b["attention_mask"]).float().cpu()
                  for _, b in prompt_batches(prompt_ids, args.micro_batch, pad_id, device)]
    value_model.train()
    return torch.cat(values)


def select_prompts(values: torch.Tensor, m: int, tau: float) -> list[int]:
    """PCL's rule: the m candidates whose V is closest to tau, closest first; ties go to the one drawn first (ours)."""
    return torch.sort((values - tau).abs(), stable=True).indices[:m].tolist()


def select_informative(rewards: torch.Tensor, group_size: int, m: int, world: int = 1) -> list[int]:
    """DAPO's dynamic sampling: the first m candidates whose group's rewards differ; fewer if the pool has fewer
    (ours: DAPO draws again), and under torchrun a multiple of the world size, so that every rank trains on as many."""
    groups = rewards.view(-1, group_size)
    informative = (groups.max(dim=1).values != groups.min(dim=1).values).nonzero().flatten().tolist()[:m]
    return informative[:len(informative) - len(informative) % world]


def kept_rollouts_of_rank(pool_rollouts: list[dict], kept: list[int], group_size: int, rank: int, world: int):
    """This rank's share of the kept groups, from whichever rank rolled each out (a contiguous share of the pool)."""
    first, n = rank * len(pool_rollouts), group_size  # every rank rolled out as many: its first one's index
    held = {i: pool_rollouts[i * n - first:(i + 1) * n - first] for i in kept
            if 0 <= i * n - first < len(pool_rollouts)}
    groups = {i: group for part in gather_from_ranks([held]) for i, group in part.items()}
    return [r for i in rank_share(kept, rank, world) for r in groups[i]]


def update_value_model(value_model, optimizer, prompt_ids, realised, args, pad_id, device, autocast) -> dict:
    """--value-updates AdamW steps of V on the kept prompts' realised accuracy (V lags the policy by one step, as in
    the paper), mean squared error (the paper sums: at large m the sum's gradient would meet the clip). The logged loss
    is the first step's. Under torchrun each rank takes its share over the whole batch's count; FSDP sums gradients."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    total, start = len(prompt_ids), time.time()
    prompt_ids, realised = rank_share(prompt_ids, rank, world), rank_share(realised, rank, world)
    losses, grad_norms = [], []
    for _ in range(args.value_updates):
        losses.append(0.0)
        for u, batch in prompt_batches(prompt_ids, args.micro_batch, pad_id, device):
            with autocast:
                predicted = value_model(batch["input_ids"], batch["attention_mask"])
            loss = ((predicted - realised[u:u + len(predicted)].to(device)) ** 2).sum() / total
            loss.backward()
            losses[-1] += loss.item()
        grad_norms.append(clip_gradients(value_model, args.max_grad_norm).item())
        if math.isfinite(grad_norms[-1]):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"value_loss": sum(gather_from_ranks(losses[:1])), "value_grad_norm": np.mean(grad_norms),
            "time_value": time.time() - start}


def load_value_model(args, tokenizer, device, world: int):
    """V and its AdamW optimizer, as a resumed run left them. V starts from --value-model, by default the run's
    --model (ours), and reads the policy's token ids: its tokenizer must be the policy's."""
    lm, value_tokenizer = evaluation.load_model(args.value_model or args.model)
    if value_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"--value-model {args.value_model}: its tokenizer's vocabulary is not the policy's")
    if args.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    value_model = shard_model(ValueModel(lm).train(), device, world)
    optimizer = torch.optim.AdamW(value_model.parameters(), args.value_lr, weight_decay=0.0)  # ours: no decay
    if args.resume:  # as save_value_model wrote them
        load = lambda name: torch.load(Path(args.resume) / name, map_location="cpu", weights_only=False)
        whole = StateDictOptions(full_state_dict=True)
        set_model_state_dict(value_model, load("value_model.pt"), options=whole)
        set_optimizer_state_dict(value_model, optimizer, load("optimizer/value_optimizer.pt"), options=whole)
    return value_model, optimizer


def save_value_model(folder: Path, value_model, optimizer) -> None:
    """V's weights into a checkpoint (value_model.pt) and its AdamW state beside the policy's (optimizer/, which only
    the latest checkpoint keeps), both whole: under torchrun every rank gathers them (collectives), rank 0 writes."""
    if is_distributed():  # the FSDP root keeps its gathered weights after forward: read the shards
        value_model.reshard()
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(value_model, options=whole)
    state = get_optimizer_state_dict(value_model, optimizer, options=whole)
    if not is_distributed() or torch.distributed.get_rank() == 0:
        torch.save(weights, folder / "value_model.pt")
        torch.save(state, folder / "optimizer" / "value_optimizer.pt")


def split_probe(problems: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(probe, training pool): `size` prompts drawn once and taken out of the pool, so that no selection and no
    update touches them (ours)."""
    if size >= len(problems):
        raise SystemExit(f"--value-probe {size}: must leave training prompts ({len(problems)} in all)")
    drawn = set(np.random.default_rng([seed, 1]).permutation(len(problems))[:size].tolist())
    return [problems[i] for i in sorted(drawn)], [p for i, p in enumerate(problems) if i not in drawn]


def probe_value_model(value_model, engine, tokenizer, probe, args, step, device, autocast) -> dict:
    """V's predictions on the probe against the policy's accuracy there, n samples per prompt at the training
    temperature (through eval.py, which leaves the run's random streams as they were; each rank samples its share)."""
    samples = evaluation.evaluate(engine, tokenizer, probe, args.template, args.samples_per_prompt, args.temperature,
                                  args.top_p, args.max_new_tokens, args.seed + step, args.answer_mode)[1]
    accuracy = np.array([s["correct"] * (not s["truncated"]) for s in samples]).reshape(len(probe), -1).mean(1)
    v = predict_values(value_model, [p["prompt_ids"] for p in probe], args, tokenizer.pad_token_id, device,
                       autocast).double().numpy()
    corr = float(np.corrcoef(v, accuracy)[0, 1]) if v.std() > 0 and accuracy.std() > 0 else float("nan")
    return {"value_probe_corr": corr, "value_probe_mae": float(np.abs(v - accuracy).mean()),
            "value_probe_accuracy": float(accuracy.mean()), "value_probe_accuracy_std": float(accuracy.std())}


def rank_share(items: list, rank: int, world: int) -> list:
    """This rank's contiguous share (whole groups: group advantages need no communication)."""
    return items[rank * len(items) // world:(rank + 1) * len(items) // world]


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
                "max_prompt_tokens", "candidates_factor", "value_updates")


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


def read_data(args) -> tuple[list[dict], list[dict]]:
    """The training problems and the held-out ones, read before any model loads: bad data costs a second."""
    if args.eval_data == "auto":
        args.eval_data = "toy" if args.model in evaluation.TINY_MODELS else "math500"
    try:
        return (evaluation.load_problems(args.train_data, args.problem_key, args.answer_key),
                evaluation.load_eval_set(args.eval_data, args.problem_key, args.answer_key, args.eval_max_problems))
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
    if not 0 <= args.tau <= 1:
        raise SystemExit(f"--tau {args.tau}: a target accuracy, in [0, 1]")
    try:
        evaluation.check_model(args.value_model or args.model)
    except SystemExit as e:
        raise SystemExit(f"--value-{str(e)[2:]}") from None
    train_problems, eval_problems = read_data(args)
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
    value_model, value_optimizer = load_value_model(args, tokenizer, device, world)
    probe, problems = split_probe(tokenize_prompts(train_problems, tokenizer, args), args.value_probe, args.seed)
    updates_per_step = args.num_updates * args.prompts_per_step * args.samples_per_prompt // args.mini_batch
    optimizer, scheduler = make_optimizer(model, args, args.total_steps * updates_per_step)
    engine = make_rollout_engine(args, model_path, model)
    push_weights(engine, model, args)  # the engine loaded fp32 files from disk; from here on it tracks the policy
    start = load_checkpoint(Path(args.resume), model, optimizer, scheduler)["step"] if args.resume else 0
    log = open_log(output_dir, args, start) if rank == 0 else lambda metrics: None
    if start == 0:  # the held-out accuracy before training
        log({"step": 0, **run_evaluation(engine or model, tokenizer, eval_problems, args)})
    rank_args = dataclasses.replace(args, mini_batch=args.mini_batch // world)  # each rank's share of a mini-batch
    ctrl_c, n, m, pad_id = CtrlC(), args.samples_per_prompt, args.prompts_per_step, tokenizer.pad_token_id
    transformers.utils.logging.disable_progress_bar()  # a checkpoint's "writing shards" bar would break the step bar
    bar = tqdm(range(start, args.total_steps), initial=start, total=args.total_steps, unit="step", disable=rank != 0)
    for step in bar:
        metrics = {"step": step + 1}
        # 1. sample prompts: k*m uniform candidates (m for --select uniform), of which m are kept: V(x) nearest tau
        #    (pcl), or the first whose group's rewards differ, all rolled out (dynamic sampling); all ranks keep alike
        t0 = time.time()
        pool = m if args.select == "uniform" else args.candidates_factor * m
        candidates = [problems[i] for i in batch_indices(step, len(problems), pool, args.seed)]
        if args.select == "pcl":
            values = predict_values(value_model, [p["prompt_ids"] for p in candidates], args, pad_id, device, autocast)
            kept = gather_from_ranks([select_prompts(values, m, args.tau)])[0]  # GPU rounding must not split ranks
        elif args.select == "dynamic-sampling":  # each rank rolls out its share of the pool; all see every reward
            mine = rank_share(candidates, rank, world)
            pool_rollouts = generate(engine, model, tokenizer, mine, args, step, rank)
            golds = [p["answer"] for p in mine for _ in range(n)]  # scored as step 3 scores
            pool_correct = verify.score_batch([r["text"] for r in pool_rollouts], golds, mode=args.answer_mode)
            pool_rewards = [0.0 if r["truncated"] else c for r, c in zip(pool_rollouts, pool_correct)]
            kept = select_informative(torch.tensor(gather_from_ranks(pool_rewards)), n, m, world)
            metrics["pool_accuracy"] = np.mean(gather_from_ranks(pool_correct))
        else:
            kept = list(range(m))
        batch = rank_share([candidates[i] for i in kept], rank, world)
        metrics["time_select"] = time.time() - t0
        # 2. generate
        t0 = time.time()
        rollouts = (kept_rollouts_of_rank(pool_rollouts, kept, n, rank, world) if args.select == "dynamic-sampling"
                    else generate(engine, model, tokenizer, batch, args, step, rank))  # DAPO: its filter's rollouts
        t1 = time.time()
        # 3. score: the final answer checked by verify.py; a truncated response earns nothing
        golds = [p["answer"] for p in batch for _ in range(args.samples_per_prompt)]
        correct = verify.score_batch([r["text"] for r in rollouts], golds, mode=args.answer_mode)
        rewards = torch.tensor([0.0 if r["truncated"] else c for r, c in zip(rollouts, correct)])
        # 4. advantages
        advantages = group_advantages(rewards, args.samples_per_prompt, args.std_normalize)
        if args.mask_truncated:
            rollouts = [dict(r, masked=r["truncated"]) for r in rollouts]
        # 5. update: num_updates passes, each over mini-batches with micro-batch gradient accumulation
        if engine is not None and args.vllm_sleep and torch.cuda.is_available():
            engine.sleep(level=2)  # free vLLM's GPU memory (weights and KV cache) for the update
        realised = torch.tensor(gather_from_ranks(rewards.view(-1, n).mean(dim=1).tolist()))  # every rank's prompts
        if kept:  # dynamic sampling may keep no prompt at all: nothing to train on
            metrics.update(lr=scheduler.get_last_lr()[0], **update_policy(
                model, reference, rollouts, advantages, optimizer, scheduler, rank_args, autocast, pad_id, device))
            # then V on the kept prompts' realised accuracy, while vLLM still sleeps (two AdamW states on the GPU)
            metrics.update(update_value_model(value_model, value_optimizer, [candidates[i]["prompt_ids"] for i in kept],
                                              realised, args, pad_id, device, autocast))
        # 6. push weights into the rollout engine
        push_weights(engine, model, args)
        # 7. log, evaluate, checkpoint (under torchrun: the whole batch, gathered from every rank)
        metrics.update(effective_ratio=np.mean(gather_from_ranks((advantages != 0).tolist())),  # what PCL raises
                       kept_prompts=len(kept), kept_accuracy_distance=(realised - args.tau).abs().mean().item())
        lengths = gather_from_ranks([len(r["response_ids"]) for r in rollouts])
        metrics.update(reward_mean=np.mean(gather_from_ranks(rewards.tolist())),
                       accuracy=np.mean(gather_from_ranks(list(correct))), response_len_mean=np.mean(lengths),
                       truncated_share=np.mean(gather_from_ranks([r["truncated"] for r in rollouts])),
                       time_generate=t1 - t0, time_train=time.time() - t1,
                       tokens_per_s=sum(lengths) / max(t1 - t0, 1e-9))
        stopping = any(gather_from_ranks([ctrl_c.asked]))  # every rank stops at the same step
        if step + 1 == args.total_steps or (args.eval_every and (step + 1) % args.eval_every == 0):
            metrics.update(run_evaluation(engine or model, tokenizer, eval_problems, args))
            if probe:
                metrics.update(probe_value_model(value_model, engine or model, tokenizer, probe, args, step, device,
                                                 autocast))
        if step + 1 == args.total_steps or stopping or (args.save_every and (step + 1) % args.save_every == 0):
            save_checkpoint(output_dir / f"checkpoint-{step + 1}", step + 1, model, tokenizer, optimizer, scheduler)
            save_value_model(output_dir / f"checkpoint-{step + 1}", value_model, value_optimizer)
        log({k: float(v) if isinstance(v, np.floating) else v for k, v in metrics.items()})
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", len=f"{metrics['response_len_mean']:.0f}")
        if stopping:
            break
    bar.close()
    if rank == 0:
        print(summary(output_dir, args, world, stopping))
    if world > 1 and engine is None:  # a vLLM engine tears the process group down itself when it shuts down
        evaluation.leave_process_group()
    return output_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except KeyboardInterrupt:  # before the first step, when there is nothing to save yet
        sys.exit("\ninterrupted before training began: nothing was written")
