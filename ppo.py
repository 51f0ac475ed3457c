"""PPO with a learned critic and GAE for LLM math reasoning in one file.

Proximal Policy Optimization (Schulman et al., 2017) as used for LLMs since Ziegler et al. (2019) and Ouyang et al.
(2022): a critic (the base model's transformer plus a scalar value head) predicts, at every response token, the
return still to come; generalized advantage estimation (GAE, Schulman et al., 2016) turns the per-token rewards (the
verified outcome on the last token, minus a KL penalty to a frozen reference on every token) and the critic's values
into per-token advantages; the policy takes PPO-clipped steps on them and the critic regresses the returns with a
clipped value loss. The 1-shot RLVR paper (Wang et al., 2025) reports PPO next to GRPO on Qwen2.5-Math-1.5B. The
defaults train the built-in tiny model on the toy task on a CPU in a few minutes; the README gives the real-run
command.

    python ppo.py                                  # tiny model, toy task, CPU
    python ppo.py --help                           # every hyperparameter, with the paper's value
    torchrun --nproc_per_node 8 ppo.py --model ...   # several GPUs: FSDP2 policy, reference and critic

Differs from grpo.py in: the critic (a second model with its own AdamW, optional warm-up steps, saved in every
checkpoint and restored on resume); per-token rewards with the KL penalty folded in (or, with --kl-in-loss, GRPO's
k3 KL in the loss); GAE advantages and returns instead of group-normalised rewards, whitened over the batch's
tokens (with --mask-truncated, the kept responses' tokens only); the clipped value loss and its own update loop;
old and reference log-probs computed before the update (the rewards need them); the reference may live on the CPU
between its forwards. Under torchrun (grpo.py's scale-out blocks) the critic is sharded like the policy, GAE runs
on each rank's own responses, and the advantages are whitened with the whole batch's mean and variance (sums and
counts all-reduced).

Choices and simplifications, all flags:
- gamma = lambda = 1 by default: the outcome reward arrives only at the end, so any discount would only shrink the
  signal that reaches early tokens; with lambda = 1 the advantage is the Monte-Carlo return minus V(s_t).
- A truncated response earns 0 and its end counts as terminal (V = 0 after the last token), as in grpo.py.
- The value of token t is read from the hidden state at position t-1, the one whose logits give token t's
  log-prob: V(s_t) is the value of the state in which token t is chosen.
- Rollouts, the fused log-prob, evaluation, logging and checkpoints are grpo.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import eval as evaluation
import verify


@dataclass
class Args:
    # experiment
    seed: int = 1  # seeds python, numpy, torch and the rollout sampler
    output_dir: str = ""  # default runs/ppo-<time>
    total_steps: int = 60  # rollout batches (paper, GRPO: 2000 steps; it reports the best checkpoint)
    eval_every: int = 25  # evaluate every this many steps (and at the end); 0: only at the end
    save_every: int = 0  # checkpoint every this many steps (and at the end); 0: only at the end
    keep_resume_states: int = 0  # only the newest this many checkpoints keep the optimizer and RNG state; 0: all
    resume: str = ""  # a checkpoint folder to continue from
    track: str = ""  # also log to "tensorboard" or "wandb" when installed
    # model & data
    model: str = "tiny"  # hub id or folder (paper: Qwen/Qwen2.5-Math-1.5B); "tiny" builds the built-in model
    train_data: str = "toy"  # jsonl/json/parquet with problem and answer columns (paper: dsr_sub.jsonl); "toy"
    problem_key: str = "problem"  # column holding the problem text
    answer_key: str = "answer"  # column holding the gold answer
    eval_data: str = "auto"  # toy (held-out split), a benchmark (math500, ...) or a file; auto: toy or math500
    eval_max_problems: int = 0  # evaluate on the first this many problems; 0: all
    template: str = "qwen-math-train"  # prompt template: qwen-math-train (paper), qwen25-math-cot, chat, plain
    max_prompt_tokens: int = 1024  # longer prompts are dropped, with a count printed (paper: 1024)
    # rollout
    rollout: str = "auto"  # "vllm", "hf" (transformers generate) or "auto" (vllm when installed)
    prompts_per_step: int = 16  # prompts per rollout batch (paper: 128)
    samples_per_prompt: int = 8  # responses per prompt (paper: 8)
    temperature: float = 1.0  # sampling temperature, also divides the trainer's logits (paper: 0.6)
    top_p: float = 1.0  # nucleus sampling (paper: 1.0)
    max_new_tokens: int = 40  # response budget; longer responses are truncated and score 0 (paper: 3072)
    gpu_memory_utilization: float = 0.35  # vLLM's share of the GPU; the trainer uses the rest
    vllm_sleep: bool = True  # free vLLM's GPU memory while training (GPU only)
    vllm_tensor_parallel: int = 1  # under torchrun: ranks (GPUs) per vLLM engine, for models too big for one GPU
    # algorithm
    answer_mode: str = "boxed"  # verify.py mode for the reward: "boxed" (paper) or "flex"
    mask_truncated: bool = False  # drop truncated responses from the losses and the advantages' whitening
    gamma: float = 1.0  # GAE discount (paper: 1.0, verl's default; outcome rewards want no discount)
    lam: float = 1.0  # GAE lambda; 1: Monte-Carlo returns minus values (paper: 1.0, verl's default)
    whiten_advantages: bool = True  # advantages (A - mean) / std over the batch's response tokens (paper: on)
    clip_low: float = 0.2  # PPO ratio clip below 1 (paper: 0.2)
    clip_high: float = 0.2  # PPO ratio clip above 1 (paper: 0.2)
    kl_coef: float = 0.0  # KL penalty to the reference; 0 loads no reference (paper: 0.001)
    kl_in_loss: bool = False  # GRPO's k3 KL in the policy loss, not -kl_coef * KL in every token's reward
    entropy_coef: float = 0.0  # entropy bonus: loss -= coef * entropy (paper: 0.001)
    loss_agg: str = "token-mean"  # policy loss: token-mean (paper), seq-mean-token-mean, seq-mean-token-sum-norm
    num_updates: int = 1  # epochs over each rollout batch, for the policy and the critic (paper: 1)
    mini_batch: int = 64  # responses per optimizer step (paper: 1024 = the whole batch, one step per batch)
    micro_batch: int = 64  # responses per forward/backward; gradients accumulate over a mini-batch
    # critic
    critic_model: str = ""  # hub id or folder for the critic's transformer; "": --model (paper: the base model)
    critic_lr: float = 1e-3  # the critic's AdamW learning rate (paper: 1e-5; the tiny model needs far more)
    critic_weight_decay: float = 0.01  # (paper: 0.01)
    critic_mini_batch: int = 0  # responses per critic optimizer step; 0: --mini-batch (paper: 128, 8 steps a batch)
    critic_warmup_steps: int = 0  # verl's critic_warmup: the policy trains from step W on (steps from 1) (paper: 0)
    critic_max_grad_norm: float = 1.0  # the critic's gradient-norm clip (paper: 1.0)
    value_clip: float = 0.5  # new values stay within +-value_clip of the rollout-time values in the loss (paper: 0.5)
    # optimisation
    lr: float = 2e-4  # the policy's AdamW learning rate (paper: 1e-6; the tiny model needs far more)
    weight_decay: float = 0.01  # (paper: 0.01)
    lr_schedule: str = "constant"  # "constant" (paper), "cosine" or "linear" (to 0), for policy and critic
    warmup_steps: int = 0  # linear warmup, in optimizer steps, for policy and critic
    max_grad_norm: float = 1.0  # the policy's global gradient-norm clip (paper: 1.0)
    gradient_checkpointing: bool = False  # recompute activations in backward, policy and critic (real runs: on)
    reference_on_cpu: bool = False  # keep the reference in CPU memory, on the GPU only for its forward pass
    logprob_memory_mib: float = 1024  # working memory of one chunk of the fused log-prob (MiB)
    max_bad_steps: int = 3  # stop after this many updates in a row with a non-finite loss or gradient


# ---- log-probs: the memory-critical piece --------------------------------------------------------------------
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
    needed). On an H200 at 32k tokens the GEMMs take half of the time, these passes the rest (bench/results/).
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


def response_values(critic, batch: dict):
    """The critic's V(s_t) for every response token t of a collated batch, flattened in row order.

    s_t is the prompt plus the response before token t. Its value is read from the hidden state at position t-1,
    the same state whose logits give token t's log-prob in response_logprobs, so values and log-probs line up token
    for token. The state after the last token is terminal and never valued."""
    if is_distributed():  # FSDP gathers weights in forward(), which this skips: gather the root's (embeddings, head)
        critic.unshard()
    decoder = getattr(critic, critic.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    predicts_response = batch["response_mask"][:, 1:]
    return critic.score(hidden[:, :-1][predicts_response]).squeeze(-1).float()


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
    width = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rollouts)
    input_ids = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rollouts), width), dtype=torch.long)
    response_mask = torch.zeros((len(rollouts), width), dtype=torch.bool)
    for i, r in enumerate(rollouts):
        p, n = len(r["prompt_ids"]), len(r["response_ids"])
        input_ids[i, :p + n] = torch.tensor(r["prompt_ids"] + r["response_ids"])
        attention_mask[i, :p + n] = 1
        response_mask[i, p:p + n] = True
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "response_mask": response_mask.to(device)}


# ---- rollouts --------------------------------------------------------------------------------------------------
def make_rollout_engine(args, model_path: str, model, device):
    """An in-process vLLM engine on the trainer's device, or None for HF `generate` on the policy itself."""
    vllm_installed = importlib.util.find_spec("vllm") is not None
    if args.vllm_tensor_parallel > 1 and not vllm_installed:
        raise SystemExit("--vllm-tensor-parallel: vLLM is not installed (pip install vllm)")
    if args.rollout == "hf" or (args.rollout == "auto" and not vllm_installed):
        return None
    if args.rollout not in ("vllm", "auto"):
        raise SystemExit(f"--rollout must be vllm, hf or auto, not {args.rollout!r}")
    if not vllm_installed:
        raise SystemExit("--rollout vllm: vLLM is not installed (pip install vllm), or use --rollout hf")
    # In-process engine: its model is reachable for weight pushes. On CPU the KV cache needs an explicit size.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM
    on_gpu = device.type == "cuda"
    # Under torchrun each rank runs its own engine on its own prompts, or each group of vllm_tensor_parallel
    # consecutive ranks one engine split over their GPUs; external_launcher makes vLLM join the process group that
    # torchrun started instead of spawning workers (vLLM wants one seed on all ranks).
    per_rank = dict(distributed_executor_backend="external_launcher", tensor_parallel_size=args.vllm_tensor_parallel,
                    data_parallel_size=torch.distributed.get_world_size() // args.vllm_tensor_parallel) \
        if is_distributed() else {}
    return LLM(model=model_path, dtype="bfloat16" if on_gpu else "float32", seed=args.seed, **per_rank,
               gpu_memory_utilization=args.gpu_memory_utilization, enable_sleep_mode=on_gpu and args.vllm_sleep,
               max_model_len=min(args.max_prompt_tokens + args.max_new_tokens, model.config.max_position_embeddings),
               enable_prefix_caching=True,
               logprobs_mode="processed_logprobs")  # log-probs after temperature: comparable to the trainer's


def generate(engine, model, tokenizer, prompt_ids: list[list[int]], args, step: int, stops: list[int]):
    """n sampled responses per prompt: [{prompt_ids, response_ids, truncated, engine_logprobs}], grouped by prompt."""
    if engine is None:
        return generate_hf(model, tokenizer, prompt_ids, args, stops)
    if args.vllm_tensor_parallel > 1:
        return generate_tensor_parallel(engine, prompt_ids, args, step, stops)
    return generate_vllm(engine, prompt_ids, args, step, stops)


def generate_vllm(engine, prompt_ids: list[list[int]], args, step: int, stops: list[int]) -> list[dict]:
    """The engine's n samples per prompt, with its log-probs of the sampled tokens (after temperature).

    Requests carry no seed: vLLM then samples from torch's generator (its GPU model runner V2: from a seed it draws
    per request from numpy's), both seeded here per step and engine, so every sample is drawn independently (with
    per-request seeds the n samples of each prompt would use the same n streams for every prompt, and copies of one
    prompt, as in 1-shot RLVR, would get identical responses), a resumed run draws what the uninterrupted one drew,
    and the trainer's own random streams are left as they were."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = SamplingParams(n=args.samples_per_prompt, temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_new_tokens, stop_token_ids=stops, logprobs=0)
    seed, numpy_state = rollout_seed(args, step), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        np.random.seed([seed % 2**32, seed >> 32])
        try:
            outputs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                      use_tqdm=False)
        finally:
            np.random.set_state(numpy_state)
    return [{"prompt_ids": ids, "response_ids": list(c.token_ids), "truncated": c.finish_reason == "length",
             "engine_logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]}
            for ids, o in zip(prompt_ids, outputs) for c in o.outputs]


def rollout_seed(args, step: int) -> int:
    """The seed of one engine's sampling at one step: distinct for every step and every engine (under torchrun one
    per rank, or one per tensor-parallel group, whose ranks must draw the same samples)."""
    engine_index = torch.distributed.get_rank() // args.vllm_tensor_parallel if is_distributed() else 0
    return (args.seed * 1_000_003 + step) * 4096 + engine_index


def generate_tensor_parallel(engine, prompt_ids: list[list[int]], args, step: int, stops: list[int]) -> list[dict]:
    """A tensor-parallel engine spans vllm_tensor_parallel consecutive ranks, which must send it the same requests:
    the group's prompts are gathered, generated together, and each rank keeps the responses to its own prompts."""
    tp, rank = args.vllm_tensor_parallel, torch.distributed.get_rank()
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, prompt_ids)
    first = rank - rank % tp
    group_prompts = [ids for part in parts[first:first + tp] for ids in part]
    rollouts = generate_vllm(engine, group_prompts, args, step, stops)
    start = args.samples_per_prompt * sum(len(part) for part in parts[first:rank])
    return rollouts[start:start + args.samples_per_prompt * len(prompt_ids)]


@torch.no_grad()
def generate_hf(model, tokenizer, prompt_ids, args, stops):
    """The fallback: transformers `generate` on the policy itself, left-padded, sampling from the torch RNG."""
    from transformers import LogitsProcessorList
    model.eval()
    model.config.use_cache = True
    rows = [ids for ids in prompt_ids for _ in range(args.samples_per_prompt)]
    width = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    recorder = SampledLogprobs(args.temperature, args.top_p)  # applies temperature and top-p: generate must not
    sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if args.temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    # only these settings: the checkpoint's generation_config.json (a repetition penalty, ...) must not apply
    out = evaluation.generate_exactly(model, dict(max_new_tokens=args.max_new_tokens, eos_token_id=stops,
                                                  pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                                                  **sampling),
                                      input_ids=input_ids, attention_mask=attention_mask,
                                      logits_processor=LogitsProcessorList([recorder]),
                                      synced_gpus=is_distributed())  # FSDP: ranks done early keep joining
    generated = out.sequences[:, width:]
    token_logprobs = recorder.logprobs(generated)
    rollouts = []
    for prompt, ids, lps in zip(rows, generated.tolist(), token_logprobs.tolist()):
        response = evaluation.completion_record(tokenizer, ids, stops, args.max_new_tokens)  # cut after a stop
        n = len(response["token_ids"])
        rollouts.append({"prompt_ids": prompt, "response_ids": response["token_ids"],
                         "truncated": response["truncated"], "engine_logprobs": lps[:n]})
    model.train()
    model.config.use_cache = not args.gradient_checkpointing
    return rollouts


class SampledLogprobs:
    """generate()'s logits processor for sampling at a temperature with top-p, which records log p of each sampled
    token under them: one number per row and step. (generate's own output_scores keeps a [rows x vocab] fp32 tensor
    per generated token: 1.9 GB per row at 3k tokens of a 152k vocabulary.) The token sampled from one step's
    distribution is known at the next call, as the last of input_ids, or at the end, as the last generated one."""

    def __init__(self, temperature: float, top_p: float):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper
        self.warpers = [] if temperature <= 0 else [TemperatureLogitsWarper(temperature)] + \
            ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        self.previous, self.steps = None, []

    def __call__(self, input_ids, scores):
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        self.record(input_ids[:, -1])
        self.previous = scores.float().log_softmax(-1)
        return scores

    def record(self, sampled):
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, sampled[:, None]).squeeze(-1))

    def logprobs(self, generated) -> torch.Tensor:
        """[rows x generated tokens]: log p of every generated token (padding after a row's stop included)."""
        self.record(generated[:, -1])
        return torch.stack(self.steps, dim=1).cpu()


def push_weights(engine, model) -> None:
    """Load the policy's weights into the vLLM engine in place, then forget cached prefixes of the old weights.

    state_dict() carries lm_head.weight even when it is tied to the embeddings; without it vLLM silently generates
    from neither the old nor the new weights."""
    if engine is None:
        return
    engine.collective_rpc("reload_weights", kwargs={"weights_iterator": streamed_weights(model)})
    engine.reset_prefix_cache()


def sleep_engine(engine, args) -> None:
    """Free vLLM's GPU memory (weights and KV cache) for the training step; the push refills the weights."""
    if engine is not None and args.vllm_sleep and torch.cuda.is_available():
        engine.sleep(level=2)


def wake_engine(engine, model, args) -> None:
    if engine is not None and args.vllm_sleep and torch.cuda.is_available():
        engine.wake_up(tags=["weights"])
        push_weights(engine, model)
        engine.wake_up(tags=["kv_cache"])
    else:
        push_weights(engine, model)


# ---- the algorithm ---------------------------------------------------------------------------------------------
def token_rewards(scores: list[float], lengths: list[int], kl: list[torch.Tensor] | None = None,
                  kl_coef: float = 0.0) -> list[torch.Tensor]:
    """Per-token rewards: the verified outcome on the last response token and, when kl is given, -kl_coef * KL on
    every token (the PPO-RLHF form of Ziegler et al., 2019: the penalty is part of the return the critic learns)."""
    out = []
    for i, n in enumerate(lengths):
        r = torch.zeros(n) if kl is None else -kl_coef * kl[i].float()
        if n:
            r[-1] += scores[i]
        out.append(r)
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation over right-padded [responses, tokens] tensors: (advantages, returns).

      delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)        A_t = delta_t + gamma * lam * A_{t+1}        R_t = A_t + V(s_t)

    The state after a response's last token is terminal (V = 0). Rewards and values at padding are zeroed first, so
    whatever sits there changes nothing; advantages and returns are 0 at padding."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8):
    """(x - mean) / std over the valid tokens of the whole batch; padding stays 0 (everything, when none is valid)."""
    valid = x[mask]
    if not valid.numel():
        return torch.zeros_like(x)
    var = valid.var() if valid.numel() > 1 else torch.zeros((), dtype=x.dtype)
    return (x - valid.mean()) * torch.rsqrt(var + eps) * mask


def whiten_over_ranks(x: torch.Tensor, mask: torch.Tensor, device, eps: float = 1e-8):
    """whiten with the mean and variance of every rank's valid tokens (sums and counts all-reduced, two passes as
    torch's var): each rank's share is whitened as the whole batch would be in one process."""
    if not is_distributed():
        return whiten(x, mask, eps)
    valid = x[mask].double()
    total, count = sums_over_ranks([valid.sum().item(), valid.numel()], device)
    if not count:
        return torch.zeros_like(x)
    mean = total / count
    squares, = sums_over_ranks([((valid - mean) ** 2).sum().item()], device)
    var = squares / (count - 1) if count > 1 else 0.0
    return (x - mean) * (1 / math.sqrt(var + eps)) * mask


def sums_over_ranks(sums: list[float], device) -> list[float]:
    """Float64 sums over every rank, all-reduced on this rank's device: NCCL reduces only GPU tensors."""
    total = torch.tensor(sums, dtype=torch.float64, device=device)
    if is_distributed():
        torch.distributed.all_reduce(total)
    return total.tolist()


def advantages_and_returns(rollouts, scores: list[float], old_values, kl, args, device):
    """Step 4 after the no-gradient passes: per-token rewards, GAE on each response (under torchrun: this rank's),
    and the advantages whitened over the kept responses' tokens of the whole batch. --mask-truncated drops the
    truncated responses from both losses, so they must not set the mean and variance either: long, failed and
    negative, they would shift every kept token's whitened advantage up. The logged value statistics cover the same
    tokens. Returns per-response advantages and returns, and the statistics."""
    lengths = [len(r["response_ids"]) for r in rollouts]
    pad = lambda rows: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # noqa: E731
    mask = pad([torch.ones(n, dtype=torch.bool) for n in lengths])
    kept = pad([torch.full((n,), not r.get("masked", False)) for r, n in zip(rollouts, lengths)])
    values = pad(old_values)
    advantages, returns = gae(pad(token_rewards(scores, lengths, kl, args.kl_coef)), values, mask, args.gamma,
                              args.lam)
    stats = value_statistics(values[kept], returns[kept])
    if args.whiten_advantages:
        advantages = whiten_over_ranks(advantages, kept, device)
    return [a[:n] for a, n in zip(advantages, lengths)], [r[:n] for r, n in zip(returns, lengths)], stats


def value_statistics(values: torch.Tensor, returns: torch.Tensor) -> dict:
    """The critic's values against the returns over every rank's tokens given (for logging)."""
    values = torch.tensor(gather_from_ranks(values.tolist()), dtype=values.dtype)
    returns = torch.tensor(gather_from_ranks(returns.tolist()), dtype=returns.dtype)
    if not returns.numel():  # every response masked
        return {}
    stats = dict(value_mean=values.mean().item(), return_mean=returns.mean().item(), return_var=returns.var().item())
    if stats["return_var"] > 0:  # undefined when every return is the same (e.g. all responses right)
        stats["explained_var"] = explained_variance(values, returns)
    return stats


def token_weights(lengths: list[int], mode: str, minibatch_tokens: int, minibatch_seqs: int, max_len: int):
    """Per-token weights w such that the mini-batch loss is sum(w * per-token loss).

    The normalisers are those of the whole mini-batch, so micro-batches accumulate to exactly its gradient."""
    if mode == "token-mean":
        per_seq = [1.0 / minibatch_tokens] * len(lengths)
    elif mode == "seq-mean-token-mean":
        per_seq = [1.0 / (n * minibatch_seqs) for n in lengths]
    elif mode == "seq-mean-token-sum-norm":
        per_seq = [1.0 / (max_len * minibatch_seqs)] * len(lengths)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return torch.cat([torch.full((n,), w) for n, w in zip(lengths, per_seq)])


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


def value_loss(values, old_values, returns, weights, clip: float):
    """PPO's clipped value loss per token, 0.5 * max((V - R)^2, (V_clip - R)^2), aggregated with `weights`.

    V_clip = V_old + clamp(V - V_old, -clip, clip): like the ratio clip for the policy, a value may not profit from
    moving further than `clip` from its value at rollout time."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)
    return (per_token * weights).sum(), {"value_clip_frac": (clipped_error > unclipped_error).float().mean().item()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the given tokens: 1 for a perfect critic, 0 for one that predicts the mean, below
    0 for one worse than that; nan when the returns do not vary."""
    var = returns.var()
    return (1 - (returns - values).var() / var).item() if var > 0 else float("nan")


# ---- scale-out: torchrun + FSDP2 (idle in a single process) ---------------------------------------------------
def is_distributed() -> bool:
    """Started by torchrun with several ranks. (An in-process vLLM engine starts a process group of one.)"""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def summed_over_ranks(counts: list[int], device) -> list[int]:
    """Counts of the whole mini-batch from each rank's share: a rank's loss divided by them is its share of the
    single-process loss, so the gradients summed over ranks are the single-process gradient."""
    if not is_distributed():
        return counts
    total = torch.tensor(counts, dtype=torch.long, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def micro_batches(kept: list[int], filler: int, size: int, device) -> list[tuple[list[int], float]]:
    """A mini-batch's kept rows in micro-batches of `size`, each with the factor its loss counts with (1 or 0).

    Under torchrun every rank must run as many forward and backward passes as the others, because FSDP's
    all-gathers and reduce-scatters are collectives. A rank left with fewer passes (it holds fewer rows of this
    mini-batch, or --mask-truncated dropped more of its rows) makes up the difference with passes over one row,
    `filler`, whose loss counts 0."""
    chunks = [(kept[u:u + size], 1.0) for u in range(0, len(kept), size)]
    if is_distributed():
        most = torch.tensor(len(chunks), device=device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        chunks += [([filler], 0.0)] * (int(most) - len(chunks))
    return chunks


def mini_batch_shares(n: int, size: int) -> list[list[int]]:
    """This rank's rows of each shuffled mini-batch, for a batch of n rows on each rank and `size` rows per rank and
    mini-batch. Under torchrun the shuffle is the single process's: one permutation of every rank's rows, rank 0's
    draw sent to all, and each rank keeps the members of each mini-batch that it holds; so every optimizer step sees
    the rows it would see in one process. A rank may then hold more of a mini-batch than another: micro_batches
    keeps the ranks in step."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    order = [torch.randperm(n * world).tolist()]  # drawn on every rank: every rank's random stream moves alike
    if world > 1:
        torch.distributed.broadcast_object_list(order, src=0)
    first, step = rank * n, size * world
    return [[g - first for g in order[0][m:m + step] if first <= g < first + n] for m in range(0, n * world, step)]


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Clip to a global gradient norm; returns the norm before clipping (under FSDP over every rank's shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor, the same on every rank


def full_weights(model) -> dict:
    """name -> full tensor, lm_head.weight included even when tied. Under FSDP the shards are gathered, which is a
    collective: every rank must call this."""
    return dict(streamed_weights(model))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def streamed_weights(model):
    """full_weights one tensor at a time. Under FSDP each is gathered when it is asked for: a weight push that loads
    and drops them one by one holds one full tensor (the 0.9 GB embedding at 1.5B in fp32), not the whole model
    (6 GB). Every rank must go through it in the same order, since each gather is a collective."""
    if is_distributed():  # the FSDP root keeps its gathered (on GPUs bf16) weights after forward: read the shards
        model.reshard()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    names = set()
    for name, t in model.state_dict().items():
        names.add(name)
        yield name, full(t)
    if "lm_head.weight" not in names:
        yield "lm_head.weight", full(model.get_output_embeddings().weight)


def init_distributed() -> tuple[int, int, torch.device]:
    """rank, world size and this rank's device. Under torchrun (WORLD_SIZE > 1) join its process group: NCCL on
    GPUs, gloo on CPUs; a single process starts no process group at all."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.distributed.is_available():
        raise SystemExit(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def resolve_on_rank0_first(name: str) -> str:
    """Rank 0 downloads (or builds the tiny model) first; the other ranks then find it cached instead of racing."""
    rank = torch.distributed.get_rank() if is_distributed() else 0
    if rank != 0:
        torch.distributed.barrier()
    path = evaluation.resolve_model_path(name)
    if rank == 0 and is_distributed():
        torch.distributed.barrier()
    return path


def shard_model(model, device):
    """FSDP2 (fully_shard): each decoder layer is one gather/reduce unit, the root holds embeddings, norm and LM
    head. On GPUs bf16 copies of the fp32 master weights compute and gradients are reduced in fp32; CPUs stay fp32."""
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


def rank_share(batch: list, rank: int, world: int) -> list:
    """This rank's prompts of the rollout batch: whole groups, so group advantages need no communication."""
    share = len(batch) // world
    return batch[rank * share:(rank + 1) * share]


def gather_from_ranks(values: list) -> list:
    """Every rank's values in rank order (for logging); in a single process, the values themselves."""
    if not is_distributed():
        return values
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def summed_stats_over_ranks(sums: dict) -> dict:
    """Each logged sum over the whole batch: every rank's sums added (all ranks hold the same keys)."""
    parts = gather_from_ranks([sums])
    return {k: sum(part[k] for part in parts) for k in sums}


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_sharded_checkpoint(folder: Path, step: int, model, tokenizer, optimizer, scheduler,
                            extra: dict | None = None):
    """Rank 0 writes the full HF folder (loadable by vLLM and eval.py) and trainer_state.pt (with `extra`: the
    fork's own state, the same on every rank); every rank writes its optimizer shard (torch.distributed.checkpoint)
    and its RNG state, so a resume at the same world size is exact."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    folder.mkdir(parents=True, exist_ok=True)
    weights = full_weights(model)  # also leaves the root sharded: the optimizer's state is keyed by the shards
    if model.config.tie_word_embeddings:  # written once, as a single-process save_pretrained does
        weights.pop("lm_head.weight")
    if rank == 0:
        model.save_pretrained(folder, state_dict=weights)
        tokenizer.save_pretrained(folder)
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "world_size": world, **(extra or {})},
                   folder / "trainer_state.pt")
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder / "optimizer")
    torch.save(rng_state(), folder / f"rng-rank{rank}.pt")  # each rank samples from its own stream
    torch.distributed.barrier()


def load_sharded_trainer_state(folder: Path, model, optimizer, scheduler) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    state = torch.load(Path(folder) / "trainer_state.pt", weights_only=False, map_location="cpu")
    if state.get("world_size") != world:
        raise SystemExit(f"--resume {folder}: written by {state.get('world_size', 'a single process (1)')} "
                         f"rank(s); resume it with that many (this run has {world})")
    model.reshard()
    sharded = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(sharded, checkpoint_id=Path(folder) / "optimizer")
    set_optimizer_state_dict(model, optimizer, sharded["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(Path(folder) / f"rng-rank{rank}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# ---- plumbing: arguments, data, checkpoints, logging -----------------------------------------------------------
def parse_args(argv=None, args_class=Args) -> Args:
    """--flag-name for every Args field; booleans also take --no-flag-name. Help is the field's comment."""
    source = inspect.getsource(args_class)
    helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(args_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=helps.get(f.name))
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default, help=helps.get(f.name))
    return args_class(**vars(parser.parse_args(argv)))


def check_choices(args) -> None:
    """The flags with a fixed set of values, and the sampling settings the trainer needs, checked before anything
    loads (a typo would otherwise fail after the first batch, or fall back silently)."""
    choices = {"rollout": ("auto", "vllm", "hf"), "template": evaluation.TEMPLATES, "answer_mode": verify.MODES,
               "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
               "lr_schedule": ("constant", "cosine", "linear")}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)!r}: choose one of {', '.join(allowed)}")
    if not args.temperature > 0:
        raise SystemExit(f"--temperature {args.temperature}: training samples, so it must be > 0 (the trainer also "
                         "divides its logits by it)")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top-p {args.top_p}: must be in (0, 1]")


def load_prompts(args, tokenizer) -> list[dict]:
    """Training problems with their tokenized prompts; prompts over the length limit are dropped and counted."""
    try:
        problems = evaluation.load_problems(args.train_data, args.problem_key, args.answer_key)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--train-data: {e}") from None
    try:
        prompts = [evaluation.build_prompt(p["problem"], tokenizer, args.template) for p in problems]
    except ValueError as e:  # a chat template the tokenizer lacks
        raise SystemExit(f"--template: {e}") from None
    kept = []
    for p, prompt in zip(problems, prompts):
        ids = evaluation.encode_prompt(tokenizer, prompt)  # one BOS, also where the template writes it
        if len(ids) <= args.max_prompt_tokens:
            kept.append({**p, "prompt_ids": ids})
    if len(kept) < len(problems):
        print(f"dropped {len(problems) - len(kept)} of {len(problems)} prompts longer than {args.max_prompt_tokens} "
              "tokens")
    if not kept:
        raise SystemExit(f"no training prompt fits in --max-prompt-tokens {args.max_prompt_tokens}")
    return kept


def load_eval_problems(args) -> list[dict]:
    if args.eval_data == "auto":
        args.eval_data = "toy" if args.model in evaluation.TINY_MODELS else "math500"
    try:
        if args.eval_data == "toy":
            problems = evaluation.toy_splits()[1]
        elif Path(args.eval_data).suffix in (".jsonl", ".json", ".parquet"):
            problems = evaluation.load_problems(args.eval_data, args.problem_key, args.answer_key)
        else:
            problems = evaluation.load_benchmark(args.eval_data)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--eval-data: {e}") from None
    return problems[:args.eval_max_problems] if args.eval_max_problems else problems


def batch_indices(step: int, n_problems: int, batch: int, seed: int) -> list[int]:
    """The problems of rollout batch `step`: epochs of seeded shuffles, so the data order is a function of the
    step alone and a resumed run sees exactly the batches an uninterrupted one would."""
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(position, n_problems)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_problems)[i]))
    return out


def make_optimizer(model, args, total_updates: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def lr_factor(update: int) -> float:
        if update < args.warmup_steps:
            return (update + 1) / args.warmup_steps
        progress = min(1.0, (update - args.warmup_steps) / max(1, total_updates - args.warmup_steps))
        if args.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if args.lr_schedule == "linear":  # to 0 at the end, as transformers' default schedule
            return 1.0 - progress
        return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def save_checkpoint(folder: Path, step: int, model, tokenizer, optimizer, scheduler, extra: dict | None = None):
    """An HF folder (loadable by transformers, vLLM and eval.py) plus what resuming needs: optimizer, RNG, step."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                **(extra or {})}, folder / "trainer_state.pt")


def check_resume(args) -> None:
    """--resume continues a run: the folder must hold what resuming needs, and --model must be the run's. The
    weights come from the checkpoint, but the reference model and the evaluation defaults come from --model, so a
    resume that leaves --model out is refused; another spelling of a model (a moved folder, a hub id) is noted."""
    folder = Path(args.resume)
    if not (folder / "trainer_state.pt").is_file():
        why = " (a checkpoint that --keep-resume-states left with its weights only, or not a checkpoint)" \
            if (folder / "config.json").is_file() else " (give a checkpoint-<step> folder)"
        raise SystemExit(f"--resume {args.resume}: no trainer_state.pt there{why}")
    # the run wrote args.json into its output folder (one_shot.py's pool run: one folder further up)
    written = [d / "args.json" for d in (folder.parent, folder.parent.parent) if (d / "args.json").is_file()]
    model_then = json.loads(written[0].read_text()).get("model") if written else None
    if model_then is None or model_then == args.model:
        return
    if args.model == type(args)().model:
        raise SystemExit(f"--resume {args.resume}: that run trained --model {model_then}, and this command leaves "
                         f"--model at its default ({args.model}); give the run's --model")
    print(f"--resume: the run trained --model {model_then}; taking --model {args.model} to be the same model")


def drop_old_resume_states(output_dir: Path, keep: int, step: int) -> None:
    """Only the newest `keep` checkpoints up to `step` (the one just written) keep what resuming needs (the
    optimizer state, twice the fp32 weights, and the RNG); older ones keep their weights and tokenizer, which is what
    evaluating them needs. 0 keeps everything. Later checkpoints, left by a continuation that this run's resume
    abandoned, are not touched."""
    if keep <= 0:
        return
    names = (f.name.removeprefix("checkpoint-") for f in output_dir.glob("checkpoint-*"))
    written = sorted(s for s in map(int, filter(str.isdigit, names)) if s <= step)
    for old in written[:-keep]:
        for path in (output_dir / f"checkpoint-{old}").iterdir():
            if path.name == "trainer_state.pt" or path.name.startswith("rng-rank"):
                path.unlink()
            elif path.is_dir() and path.name.endswith("optimizer"):  # the sharded optimizer states
                shutil.rmtree(path)


def load_trainer_state(folder: Path, optimizer, scheduler) -> dict:
    state = torch.load(Path(folder) / "trainer_state.pt", weights_only=False, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


class Logger:
    """One line per step to stdout, the same as JSON lines in metrics.jsonl, and optionally TensorBoard/wandb."""

    def __init__(self, output_dir: Path, args):
        self.file = open(output_dir / "metrics.jsonl", "a")
        self.tracker = None
        if args.track == "tensorboard" and importlib.util.find_spec("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter
            self.tracker = SummaryWriter(str(output_dir))
        elif args.track == "wandb" and importlib.util.find_spec("wandb"):
            import wandb
            self.tracker = wandb.init(config=dataclasses.asdict(args), dir=str(output_dir))
        elif args.track:
            print(f"--track {args.track}: not installed, logging to metrics.jsonl only")

    def log(self, metrics: dict, line_keys=("reward_mean", "accuracy", "response_len_mean", "entropy", "kl",
                                              "clip_frac", "grad_norm", "time_generate", "time_score",
                                              "time_train", "tokens_per_s", "logprob_gap")):
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        shown = [f"{k.replace('eval/', 'eval_')} {v:.4g}" for k, v in metrics.items()
                 if (k in line_keys or k.startswith("eval/")) and isinstance(v, (int, float))]
        print(f"step {metrics['step']:>5} | " + " | ".join(shown), flush=True)
        if self.tracker is not None and hasattr(self.tracker, "add_scalar"):
            for k, v in metrics.items():
                self.tracker.add_scalar(k, v, metrics["step"])
        elif self.tracker is not None:
            self.tracker.log(metrics, step=metrics["step"])


LINE_KEYS = ("reward_mean", "accuracy", "response_len_mean", "entropy", "kl", "clip_frac", "explained_var",
             "value_loss", "value_clip_frac", "grad_norm", "critic_grad_norm", "time_generate", "time_train",
             "logprob_gap")  # the stdout line; metrics.jsonl has every metric


# ---- main loop -------------------------------------------------------------------------------------------------
def main(args: Args):
    # setup: processes, seed, policy, reference, critic, optimizers, data, engine, output dir, resume
    rank, world, device = init_distributed()  # one process unless started by torchrun
    check_world_size(args, world)
    check_choices(args)
    seed_everything(args.seed + rank)  # each rank samples its own responses; the data order is seeded apart
    check_args(args)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if args.resume:
        check_resume(args)
    model_path = args.resume or resolve_on_rank0_first(args.model)
    # each model is loaded into CPU memory and put on the device (under torchrun: sharded) before the next one loads
    model, tokenizer = evaluation.load_model(model_path)  # fp32 master weights; bf16 compute on GPU
    check_lm_head(model)
    with_own_memory(model).train()
    if args.gradient_checkpointing:
        use_gradient_checkpointing(model)
    model = on_device(model, device, world)
    reference = load_reference(args)
    if reference is not None and not args.reference_on_cpu:  # a reference kept on the CPU stays whole there
        reference = on_device(reference, device, world)
    if args.resume and not (Path(args.resume) / "critic").is_dir():
        raise SystemExit(f"--resume {args.resume}: no critic/ folder in it, so not a ppo.py checkpoint")
    critic_path = str(Path(args.resume) / "critic") if args.resume else \
        resolve_on_rank0_first(args.critic_model or args.model)
    critic = load_critic(critic_path, tokenizer)
    if args.gradient_checkpointing:
        use_gradient_checkpointing(critic)
    critic = on_device(critic, device, world)
    problems = load_prompts(args, tokenizer)
    eval_problems = load_eval_problems(args)
    batch_size = args.prompts_per_step * args.samples_per_prompt
    if batch_size % args.mini_batch or args.mini_batch % args.micro_batch:
        raise SystemExit(f"need mini_batch | prompts_per_step*samples_per_prompt ({batch_size}) and "
                         f"micro_batch | mini_batch; got mini_batch={args.mini_batch}, micro_batch={args.micro_batch}")
    critic_mini_batch = args.critic_mini_batch or args.mini_batch
    if batch_size % critic_mini_batch or critic_mini_batch % args.micro_batch or critic_mini_batch % world:
        raise SystemExit(f"--critic-mini-batch {critic_mini_batch}: must divide the batch ({batch_size}) and be a "
                         f"multiple of --micro-batch ({args.micro_batch}) and of the number of ranks ({world})")
    updates_per_step = args.num_updates * batch_size // args.mini_batch
    policy_steps = args.total_steps - max(0, args.critic_warmup_steps - 1)
    optimizer, scheduler = make_optimizer(model, args, policy_steps * updates_per_step)
    critic_args = dataclasses.replace(args, lr=args.critic_lr, weight_decay=args.critic_weight_decay)
    critic_optimizer, critic_scheduler = make_optimizer(
        critic, critic_args, args.total_steps * args.num_updates * batch_size // critic_mini_batch)
    output_dir = Path(gather_from_ranks([args.output_dir or f"runs/{Path(__file__).stem}-"
                                         f"{time.strftime('%Y%m%d-%H%M%S')}"])[0])  # rank 0's clock names it
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (output_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    engine = make_rollout_engine(args, model_path, model, device)
    if engine is not None:  # vLLM's start seeded every generator with args.seed: each rank's stream again
        seed_everything(args.seed + rank)
    push_weights(engine, model)  # the engine loaded fp32 files from disk; from here on it tracks the policy
    start_step = 0
    if args.resume:
        start_step = resume_trainer(Path(args.resume), model, optimizer, scheduler, critic, critic_optimizer,
                                    critic_scheduler, world)
        print(f"resumed from {args.resume} at step {start_step}")
    stops = evaluation.stop_token_ids(tokenizer, model)
    logger = Logger(output_dir, args) if rank == 0 else None
    rank_args = dataclasses.replace(args, mini_batch=args.mini_batch // world,  # each rank's share of a mini-batch
                                    critic_mini_batch=critic_mini_batch // world)
    pad_id = tokenizer.pad_token_id
    bad_steps = 0

    for step in range(start_step, args.total_steps):
        metrics = {"step": step + 1}
        # 1. sample prompts
        batch = [problems[i] for i in batch_indices(step, len(problems), args.prompts_per_step, args.seed)]
        batch = rank_share(batch, rank, world)
        # 2. generate
        t0 = time.time()
        rollouts = generate(engine, model, tokenizer, [p["prompt_ids"] for p in batch], args, step, stops)
        t1 = time.time()
        # 3. score: the final answer checked by verify.py; a truncated response earns nothing
        texts = tokenizer.batch_decode([r["response_ids"] for r in rollouts], skip_special_tokens=True)
        golds = [p["answer"] for p in batch for _ in range(args.samples_per_prompt)]
        correct = verify.score_batch(texts, golds, mode=args.answer_mode)
        rewards = torch.tensor([0.0 if r["truncated"] else c for r, c in zip(rollouts, correct)])
        t2 = time.time()
        # 4. values, per-token rewards (outcome + KL penalty), GAE advantages and returns (under torchrun: GAE on
        #    this rank's responses, whitening with the whole batch's statistics; never the masked responses')
        if args.mask_truncated:
            rollouts = [dict(r, masked=r["truncated"]) for r in rollouts]
        sleep_engine(engine, args)
        lengths = [len(r["response_ids"]) for r in rollouts]
        with torch.no_grad(), autocast:  # fixed for all passes over this batch
            old_logp = token_logprobs(model, rollouts, args, pad_id, device)
            ref_logp = reference_logprobs(reference, rollouts, args, pad_id, device) if reference is not None else None
            old_values = [v.cpu() for v in token_values(critic, rollouts, args, pad_id, device)]
        engine_lp = torch.tensor([lp for r in rollouts for lp in r["engine_logprobs"]])
        metrics["logprob_gap"] = mean_over_ranks((engine_lp - torch.cat(old_logp).cpu()).abs(), device)
        kl = None
        if ref_logp is not None and not args.kl_in_loss:  # k1 = log pi - log pi_ref per token, as in PPO-RLHF
            kl = [(lp - ref).float().cpu() for lp, ref in zip(old_logp, ref_logp)]
            metrics["kl"] = mean_over_ranks(torch.cat(kl), device)
        advantages, returns, value_stats = advantages_and_returns(rollouts, rewards.tolist(), old_values, kl, args,
                                                                  device)
        metrics.update(value_stats)
        # 5. update: the critic, then (after its warm-up) the policy, num_updates passes over mini-batches each
        lr = scheduler.get_last_lr()[0]  # the rate of this step's (first) policy update
        train_stats = update_critic(critic, rollouts, old_values, returns, critic_optimizer, critic_scheduler,
                                    rank_args, autocast, pad_id, device)
        if step + 1 >= args.critic_warmup_steps:  # verl: critic_warmup <= global_steps, which count from 1
            policy_stats = update_policy(model, rollouts, advantages, old_logp, ref_logp if args.kl_in_loss else None,
                                         optimizer, scheduler, rank_args, autocast, pad_id, device)
            train_stats["skipped"] |= policy_stats.pop("skipped")
            train_stats.update(policy_stats)
        # 6. push weights into the rollout engine
        if device.type == "cuda":  # three models' activations stay cached by torch unless handed back before vLLM
            torch.cuda.empty_cache()  # wakes up and allocates its weights and KV cache again
        wake_engine(engine, model, args)
        t3 = time.time()
        bad_steps = bad_steps + 1 if train_stats.pop("skipped") else 0
        if bad_steps >= args.max_bad_steps:
            raise SystemExit(f"stopping: {bad_steps} updates in a row had a non-finite loss or gradient "
                             "(lower --lr or --critic-lr, check the data, or use fp32)")
        # 7. log / evaluate / checkpoint (under torchrun: the whole batch, gathered from every rank)
        lengths = gather_from_ranks(lengths)
        rewards, correct = torch.tensor(gather_from_ranks(rewards.tolist())), gather_from_ranks(list(correct))
        truncated = gather_from_ranks([r["truncated"] for r in rollouts])
        metrics.update(reward_mean=rewards.mean().item(), accuracy=sum(correct) / len(correct),
                       response_len_mean=sum(lengths) / len(lengths),
                       truncated_share=sum(truncated) / len(truncated),
                       time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2,
                       tokens_per_s=sum(lengths) / max(t1 - t0, 1e-9), lr=lr, **train_stats)
        last = step + 1 == args.total_steps
        if last or (args.eval_every and (step + 1) % args.eval_every == 0):
            # every rank evaluates its share of the set (eval.evaluate) and gets all results; rank 0 logs
            metrics.update(run_evaluation(engine or model, tokenizer, eval_problems, args))
        if last or (args.save_every and (step + 1) % args.save_every == 0):
            folder = output_dir / f"checkpoint-{step + 1}"
            if world > 1:  # the critic's optimizer is sharded like the policy's: every rank writes its shard
                save_sharded_critic(folder, critic, tokenizer, critic_optimizer)
                save_sharded_checkpoint(folder, step + 1, model, tokenizer, optimizer, scheduler,
                                        extra={"critic_scheduler": critic_scheduler.state_dict()})
            else:
                save_checkpoint(folder, step + 1, model, tokenizer, optimizer, scheduler,
                                extra={"critic_optimizer": critic_optimizer.state_dict(),
                                       "critic_scheduler": critic_scheduler.state_dict()})
                critic.save_pretrained(folder / "critic")
                tokenizer.save_pretrained(folder / "critic")
            if rank == 0:  # older checkpoints keep their weights only (--keep-resume-states)
                drop_old_resume_states(output_dir, args.keep_resume_states, step + 1)
        if rank == 0:
            logger.log(metrics, line_keys=LINE_KEYS)
    if world > 1 and engine is None:  # a vLLM engine tears the process group down itself when it shuts down
        evaluation.leave_process_group()
    return output_dir


def mean_over_ranks(values: torch.Tensor, device) -> float:
    """The mean of a per-token statistic over every rank's tokens (for logging)."""
    if not is_distributed():
        return values.mean().item()
    total, count = sums_over_ranks([values.double().sum().item(), values.numel()], device)
    return total / count if count else float("nan")


def save_sharded_critic(folder: Path, critic, tokenizer, optimizer) -> None:
    """The critic under torchrun: rank 0 writes its full HF folder (critic/, as in one process); every rank writes
    its shard of the critic's optimizer state (critic_optimizer/, torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    critic.reshard()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    weights = {name: full(t) for name, t in critic.state_dict().items()}  # a collective: every rank
    if torch.distributed.get_rank() == 0:
        critic.save_pretrained(folder / "critic", state_dict=weights)
        tokenizer.save_pretrained(folder / "critic")
    dcp.save({"optimizer": get_optimizer_state_dict(critic, optimizer)}, checkpoint_id=folder / "critic_optimizer")


def load_sharded_critic_optimizer(folder: Path, critic, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    critic.reshard()
    sharded = {"optimizer": get_optimizer_state_dict(critic, optimizer)}
    dcp.load(sharded, checkpoint_id=folder / "critic_optimizer")
    set_optimizer_state_dict(critic, optimizer, sharded["optimizer"])


def check_world_size(args, world: int) -> None:
    """Under torchrun every rank takes whole groups and an equal share of every mini-batch."""
    if args.vllm_tensor_parallel < 1 or (args.vllm_tensor_parallel > 1 and (world == 1 or args.rollout == "hf")):
        raise SystemExit(f"--vllm-tensor-parallel {args.vllm_tensor_parallel}: a vLLM engine split over that many "
                         "ranks needs torchrun with one rank per GPU and --rollout vllm")
    if world == 1:
        return
    if args.prompts_per_step % world or args.mini_batch % world:
        raise SystemExit(f"torchrun with {world} ranks: --prompts-per-step ({args.prompts_per_step}) and "
                         f"--mini-batch ({args.mini_batch}) must be multiples of {world}")
    if world % args.vllm_tensor_parallel:
        raise SystemExit(f"--vllm-tensor-parallel {args.vllm_tensor_parallel} must divide the number of ranks "
                         f"({world})")


def load_trainer_state_for_world(folder: Path, model, optimizer, scheduler, world: int) -> dict:
    """A single-process checkpoint holds the whole optimizer state; a torchrun one holds it sharded."""
    sharded = (folder / "optimizer").is_dir()
    if world > 1:
        return load_sharded_trainer_state(folder, model, optimizer, scheduler)
    if sharded:
        world_then = torch.load(folder / "trainer_state.pt", weights_only=False, map_location="cpu")["world_size"]
        raise SystemExit(f"--resume {folder}: written by torchrun with {world_then} ranks; resume it with "
                         f"torchrun --nproc_per_node {world_then} (its optimizer state is sharded)")
    return load_trainer_state(folder, optimizer, scheduler)


def resume_trainer(folder: Path, model, optimizer, scheduler, critic, critic_optimizer, critic_scheduler,
                   world: int) -> int:
    """Both optimizers, both schedulers and the RNG from a checkpoint; returns the step to continue from. The loaded
    trainer_state.pt (in a single process both AdamW states in CPU memory, ~25 GB for a 1.5B policy and critic) lives
    only in this frame: once the optimizers hold their copies (on the GPU), the CPU copies are freed."""
    state = load_trainer_state_for_world(folder, model, optimizer, scheduler, world)
    if world > 1:
        load_sharded_critic_optimizer(folder, critic, critic_optimizer)
    else:
        critic_optimizer.load_state_dict(state["critic_optimizer"])
    critic_scheduler.load_state_dict(state["critic_scheduler"])
    return state["step"]


def check_args(args: Args) -> None:
    """PPO's own arguments, checked before anything is loaded."""
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1):
        raise SystemExit(f"--gamma and --lam must lie in [0, 1]; got gamma={args.gamma}, lam={args.lam}")
    if args.value_clip <= 0:
        raise SystemExit(f"--value-clip must be positive; got {args.value_clip}")
    if args.kl_coef < 0:
        raise SystemExit(f"--kl-coef must be >= 0 (0: no KL term and no reference model); got {args.kl_coef}")
    if not 0 <= args.critic_warmup_steps <= args.total_steps:
        raise SystemExit(f"--critic-warmup-steps must lie in [0, total_steps={args.total_steps}]; "
                         f"got {args.critic_warmup_steps}")


def load_critic(path: str, tokenizer):
    """The critic, in CPU memory: the transformer of `path` under a scalar value head (transformers'
    ForTokenClassification with one label, the form verl uses), freshly initialised for a base model, restored for a
    saved critic."""
    from transformers import AutoModelForTokenClassification
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise SystemExit(f"critic {path}: no such folder")
    try:
        critic = AutoModelForTokenClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SystemExit(f"critic {path}: cannot load it as a model with a value head ({e})") from None
    if not isinstance(getattr(critic, "score", None), torch.nn.Linear):
        raise SystemExit(f"critic {path}: {type(critic).__name__} has no linear `score` head to use as value head")
    if critic.get_input_embeddings().num_embeddings < len(tokenizer):
        raise SystemExit(f"critic {path}: its vocabulary ({critic.get_input_embeddings().num_embeddings}) is smaller "
                         f"than the policy tokenizer's ({len(tokenizer)}); the critic must read the policy's tokens")
    return with_own_memory(critic).train()


def load_reference(args: Args):
    """The frozen reference for the KL term (in CPU memory), or None when kl_coef is 0: then nothing is loaded, which
    saves a third model's weights (6 GB for a 1.5B model in fp32). With --reference-on-cpu it stays there."""
    if args.kl_coef == 0:
        return None
    reference = evaluation.load_model(evaluation.resolve_model_path(args.model))[0].eval()
    return reference.requires_grad_(False)


def on_device(model, device, world: int):
    """One process: the model on the device. Under torchrun: this rank's FSDP2 shard of a model still in CPU memory;
    fully_shard moves each layer to the GPU as it shards it, so no GPU ever holds a whole fp32 model (a 7B policy and
    reference moved whole would take 56 GB of each GPU, which torch then keeps cached where vLLM needs room)."""
    return shard_model(model, device) if world > 1 else model.to(device)


def use_gradient_checkpointing(*models) -> None:
    """Keep only each layer's input in the forward and recompute the layer in backward: activation memory of one
    layer instead of all of them, for about one more forward of compute. Training never uses the KV cache."""
    for m in models:
        m.gradient_checkpointing_enable()
        m.config.use_cache = False


def with_own_memory(model):
    """Copy every weight into a fresh allocation. Weights read from a safetensors file sit at the file's byte
    offsets, and CPU kernels round differently at different alignments: without the copy, a run resumed from a
    checkpoint drifted from an uninterrupted one by ~1e-8 per step (measured on the tiny critic)."""
    for p in model.parameters():
        p.data = p.data.clone()
    return model


def update_critic(critic, rollouts, old_values, returns, optimizer, scheduler, args, autocast, pad_id, device):
    """num_updates passes of the clipped value loss over the batch in shuffled mini-batches of critic_mini_batch
    (0: mini_batch) responses; token-mean per mini-batch, one optimizer step per mini-batch."""
    # logged sums over the batch: each micro-batch's share of its mini-batch's loss, the clip fraction per token
    sums = dict.fromkeys(("value_loss", "value_clip_frac", "tokens"), 0.0)
    grad_norms, skipped = [], False
    for _ in range(args.num_updates):
        for share in mini_batch_shares(len(rollouts), args.critic_mini_batch or args.mini_batch):
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
                    values = response_values(critic, collate(rows, pad_id, device))
                per_token = lambda x: torch.cat([x[i] for i in micro]).to(device)  # noqa: E731
                weights = token_weights(lengths, "token-mean", mini_tokens, mini_seqs, args.max_new_tokens)
                loss, s = value_loss(values, per_token(old_values), per_token(returns), weights.to(device),
                                     args.value_clip)
                (loss * counted).backward()
                if not counted:  # a filler pass only keeps this rank in step with the others
                    continue
                sums["value_loss"] += loss.item()
                sums["value_clip_frac"] += s["value_clip_frac"] * sum(lengths)
                sums["tokens"] += sum(lengths)
            grad_norm = clip_gradients(critic, args.critic_max_grad_norm)
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped = True
                print(f"non-finite critic gradient norm ({grad_norm.item()}): update skipped")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            grad_norms.append(grad_norm.item())
    total = summed_stats_over_ranks(sums)
    out = {"skipped": skipped}
    if grad_norms:  # the loss of an optimizer step, averaged over the steps; the norm is already global
        out.update(value_loss=total["value_loss"] / len(grad_norms),
                   critic_grad_norm=sum(grad_norms) / len(grad_norms))
    if total["tokens"]:
        out["value_clip_frac"] = total["value_clip_frac"] / total["tokens"]
    return out


def update_policy(model, rollouts, advantages, old_logp, ref_logp, optimizer, scheduler, args, autocast, pad_id,
                  device):
    """num_updates passes over the batch in shuffled mini-batches; one optimizer step per mini-batch. Advantages
    are per token; old (and, for the KL-in-loss form, reference) log-probs come from before the update."""
    # logged sums over the batch: each micro-batch's share of its mini-batch's loss, the other statistics per token
    sums = dict.fromkeys(("policy_loss", "clip_frac", "kl", "entropy", "tokens"), 0.0)
    grad_norms, skipped = [], False
    for _ in range(args.num_updates):
        for share in mini_batch_shares(len(rollouts), args.mini_batch):
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
                weights = token_weights(lengths, args.loss_agg, mini_tokens, mini_seqs, args.max_new_tokens)
                loss, s = policy_loss(logp, per_token(old_logp), per_token(advantages), weights.to(device), args,
                                      per_token(ref_logp) if ref_logp is not None else None,
                                      entropy if args.entropy_coef else None)
                (loss * counted).backward()
                if not counted:  # a filler pass only keeps this rank in step with the others
                    continue
                sums["policy_loss"] += loss.item()
                sums["clip_frac"] += s["clip_frac"] * sum(lengths)
                sums["kl"] += s.get("kl", 0.0) * sum(lengths)
                sums["entropy"] += entropy.detach().float().sum().item()
                sums["tokens"] += sum(lengths)
            grad_norm = clip_gradients(model, args.max_grad_norm)
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped = True
                print(f"non-finite gradient norm ({grad_norm.item()}): update skipped")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            grad_norms.append(grad_norm.item())
    total = summed_stats_over_ranks(sums)
    out = {"skipped": skipped}
    if grad_norms:  # the loss of an optimizer step, averaged over the steps; the norm is already global
        out.update(policy_loss=total["policy_loss"] / len(grad_norms), grad_norm=sum(grad_norms) / len(grad_norms))
    if total["tokens"]:
        keys = ("clip_frac", "entropy") + (("kl",) if ref_logp is not None else ())  # k1 KL is logged apart
        out.update({k: total[k] / total["tokens"] for k in keys})
    return out


def token_logprobs(model, rollouts, args, pad_id, device) -> list[torch.Tensor]:
    """Per-rollout 1-D tensors of the response tokens' log-probs under `model` (no gradient)."""
    out = []
    for u in range(0, len(rollouts), args.micro_batch):
        rows = rollouts[u:u + args.micro_batch]
        logp, _ = response_logprobs(model, collate(rows, pad_id, device), args.temperature, args.logprob_memory_mib)
        out += list(logp.split([len(r["response_ids"]) for r in rows]))
    return out


def reference_logprobs(reference, rollouts, args, pad_id, device) -> list[torch.Tensor]:
    """The frozen reference's log-probs; with --reference-on-cpu it visits the GPU only for this forward."""
    if not args.reference_on_cpu:
        return token_logprobs(reference, rollouts, args, pad_id, device)
    kept = visit_device(reference, device)
    try:
        return token_logprobs(reference, rollouts, args, pad_id, device)
    finally:
        leave_device(kept)


def visit_device(model, device) -> list:
    """Give every module of a frozen model copies of its weights and buffers on `device`; returns what leave_device
    puts back. (model.to(device) and back would also copy the weights device-to-host into new memory every step,
    although frozen weights never change: the CPU tensors are kept instead, and the device copies dropped.)"""
    copies, kept = {}, []
    try:
        for module in model.modules():
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if id(t) not in copies:  # a tied weight: one copy, shared as the original is
                    copies[id(t)] = torch.nn.Parameter(t.to(device), requires_grad=False) \
                        if isinstance(t, torch.nn.Parameter) else t.to(device)
                kept.append((module, name, t))
                setattr(module, name, copies[id(t)])
    except BaseException:  # a copy that failed (out of memory): the model goes back whole, its ties intact
        leave_device(kept)
        raise
    return kept


def leave_device(kept: list) -> None:
    for module, name, t in kept:
        setattr(module, name, t)


def token_values(critic, rollouts, args, pad_id, device) -> list[torch.Tensor]:
    """Per-rollout 1-D tensors of the critic's values of the response tokens (no gradient)."""
    out = []
    for u in range(0, len(rollouts), args.micro_batch):
        rows = rollouts[u:u + args.micro_batch]
        values = response_values(critic, collate(rows, pad_id, device))
        out += list(values.split([len(r["response_ids"]) for r in rows]))
    return out


def run_evaluation(engine, tokenizer, problems, args) -> dict:
    """Greedy accuracy on the held-out problems (toy split or a benchmark), through eval.py."""
    with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training run's random stream
        metrics, _ = evaluation.evaluate(engine, tokenizer, problems, template=args.template,
                                         max_tokens=args.max_new_tokens, seed=args.seed, mode=args.answer_mode)
    return {f"eval/{k}": v for k, v in metrics.items()}


if __name__ == "__main__":
    main(parse_args())
