"""1-shot RLVR for LLM math reasoning in one file: GRPO on copies of a single training example.

Wang et al., 2025, "Reinforcement Learning for Reasoning in Large Language Models with One Training Example": one
math problem, replicated to fill the batch, lifts Qwen2.5-Math-1.5B on MATH500 from 36.0% to 72.8% (pi_1). The
example is picked by its *historical variance*: train GRPO on a pool (DSR-sub, 1209 problems), record each example's
training accuracy every time it is sampled, rank the examples by the standard deviation of that record (largest
first); pi_1 is the top one. Held-out accuracy keeps rising after the training accuracy on the example saturates
("post-saturation generalization"), so the held-out sets are evaluated all along and the best evaluation is kept.
The defaults run the whole pipeline on the toy task on a CPU in a few minutes (2 cores): a short pool run records
the history, pi_1 is chosen by the same rule, and training restarts from the base model on copies of it. The base
model is `tiny-format` (eval.py), which nearly always finds the right number but often leaves the box out or hedges
with a second boxed number: what one example can teach it is the answer's form and commitment, which every question
shares, as much of the paper's gain is (the toy has no reasoning to improve; see the README). Held-out toy accuracy
rises with the reward on pi_1 and stays up after it saturates. (On `tiny`, whose only skill is reading the number,
the policy learns pi_1's answer instead and held-out accuracy falls.)

    python one_shot.py                             # toy pool run -> pi_1 -> 1-shot RLVR from the base model, CPU
    python one_shot.py --history acc_step_500.json --rank 1 --train-data dsr_sub.jsonl ...   # the paper's pi_1
    python one_shot.py --help                      # every hyperparameter, with the paper's value

Differs from grpo.py in: the choice of the example(s) (a pool run that writes accuracy_history.json, a history file
ranked by std, or indices given); the batch (every step: equal shares of copies of the example(s), each copy its
own group); per-example training accuracy; several evaluation sets, evaluated also before the first step, with the
best average kept (best.json); the paper's ablations (entropy only: no outcome reward; a replaced label); flags
that take several values (--rank 1 13); training rows keep their ids, and a row without an answer is dropped.
The algorithm is grpo.py's (clipped surrogate, k3 KL, entropy bonus, token-mean) with the paper's KL and entropy
coefficients on by default; the paper's settings are in the Args comments.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
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
    output_dir: str = ""  # default runs/one_shot-<time>
    total_steps: int = 30  # 1-shot RLVR steps; 0: only the pool run (paper: 2000; it reports the best checkpoint)
    eval_every: int = 2  # evaluate every this many steps, before the first and at the end; 0: at the end (paper: 20)
    save_every: int = 0  # checkpoint every this many steps (and at the end); 0: only at the end (paper: 20)
    keep_resume_states: int = 0  # only the newest this many checkpoints keep the optimizer and RNG state; 0: all
    resume: str = ""  # a checkpoint folder to continue from (of the pool run or of 1-shot training)
    track: str = ""  # also log to "tensorboard" or "wandb" when installed
    # the example(s): given, ranked from a history file, or ranked from a pool run of our own
    example_index: tuple[str, ...] = ()  # train on these: values of the data's `index` column, else row numbers
    history: str = ""  # {"index": [accuracy, ...]} to rank by historical variance (paper: acc_step_500.json)
    rank: tuple[int, ...] = (1,)  # train on pi_i for each i: the i-th largest std of accuracy history (paper: 1; 1 13)
    pool_steps: int = 20  # steps of the pool run that records the history, when none is given (paper: 500)
    pool_size: int = -1  # the pool: the first this many training problems; 0: all (paper: 1209); -1: 32 on toy, else 0
    label: tuple[str, ...] = ()  # ablation (label noise): reward against these answers, one per example
    entropy_only: bool = False  # ablation: no outcome reward, the loss is -entropy_coef * entropy (+ the KL term)
    # model & data
    model: str = "tiny-format"  # hub id or folder (paper: Qwen/Qwen2.5-Math-1.5B); "tiny...": a built-in model
    train_data: str = "toy"  # pool and examples: jsonl/json/parquet, problem and answer columns (paper: dsr_sub.jsonl)
    problem_key: str = "problem"  # column holding the problem text
    answer_key: str = "answer"  # column holding the gold answer
    eval_data: str = "auto"  # comma-separated: toy, benchmarks (math500, ...), paper (its six), files; auto: toy/paper
    eval_max_problems: int = 0  # evaluate on the first this many problems of each set; 0: all
    template: str = "qwen-math-train"  # prompt template: qwen-math-train (paper), qwen25-math-cot, chat, plain
    max_prompt_tokens: int = 1024  # longer prompts are dropped, with a count printed (paper: 1024)
    # rollout
    rollout: str = "auto"  # "vllm", "hf" (transformers generate) or "auto" (vllm when installed)
    prompts_per_step: int = 16  # copies of the example(s) per rollout batch, each its own group (paper: 128)
    samples_per_prompt: int = 8  # group size n (paper: 8)
    temperature: float = 1.0  # sampling temperature, also divides the trainer's logits (paper: 0.6; ablation 1.0)
    top_p: float = 1.0  # nucleus sampling (paper: 1.0)
    max_new_tokens: int = 40  # response budget; longer responses are truncated and score 0 (paper: 3072)
    gpu_memory_utilization: float = 0.35  # vLLM's share of the GPU; the trainer uses the rest
    vllm_sleep: bool = True  # free vLLM's GPU memory while training (GPU only)
    vllm_tensor_parallel: int = 1  # under torchrun: ranks (GPUs) per vLLM engine, for models too big for one GPU
    # algorithm
    answer_mode: str = "boxed"  # verify.py mode for the reward: "boxed" (paper: its own last-box grader) or "flex"
    std_normalize: bool = True  # advantage (r - mean) / (std + eps); --no-std-normalize: Dr. GRPO's r - mean
    mask_truncated: bool = False  # drop truncated responses from the loss
    clip_low: float = 0.2  # PPO ratio clip below 1 (paper: 0.2)
    clip_high: float = 0.2  # PPO ratio clip above 1; larger is DAPO's clip-higher (paper: 0.2)
    kl_coef: float = 0.001  # low-variance (k3) KL to the reference in the loss; 0 loads no reference (paper: 0.001)
    entropy_coef: float = 0.001  # entropy bonus: loss -= coef * entropy (paper: 0.001)
    loss_agg: str = "token-mean"  # token-mean (paper), seq-mean-token-mean, seq-mean-token-sum-norm (Dr. GRPO)
    num_updates: int = 1  # passes over each rollout batch (paper: 1)
    mini_batch: int = 128  # responses per optimizer step (paper: 1024, one step per batch: its "128" counts prompts)
    micro_batch: int = 32  # responses per forward/backward; gradients accumulate over a mini-batch
    # optimisation
    lr: float = 1e-4  # AdamW learning rate (paper: 1e-6; the tiny model needs far more)
    weight_decay: float = 0.01  # (paper: 0.01)
    lr_schedule: str = "constant"  # "constant" (paper), "cosine" or "linear" (to 0; both after warmup)
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    max_grad_norm: float = 1.0  # global gradient-norm clip (paper: 1.0)
    gradient_checkpointing: bool = False  # recompute activations in backward (real runs: on)
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
def group_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6):
    """GRPO's advantage: each reward minus its group's mean, divided by the group's std unless Dr. GRPO."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize:
        centered = centered / (groups.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)


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


# ---- the example(s): historical variance, replication ----------------------------------------------------------
def load_history(path: str) -> dict[str, list[float]]:
    """An accuracy history {"index": [accuracy, ...]}, as the paper's acc_step_500.json and our pool run write it."""
    try:
        history = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"--history: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"--history: {path} is not valid JSON ({e})") from None
    if not isinstance(history, dict) or not history:
        raise SystemExit(f"--history: {path} must hold a non-empty JSON object {{\"index\": [accuracy, ...]}}")
    for key, accs in history.items():
        if not isinstance(accs, list) or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                 and 0 <= a <= 1 for a in accs):
            raise SystemExit(f"--history: {path}: the value of {key!r} must be a list of accuracies in [0, 1]")
    return history


def rank_by_variance(history: dict[str, list[float]]) -> list[str]:
    """The examples from pi_1 on: largest std of the accuracy history first (the variance's order). Ties keep the
    file's order, as the paper's stable sort of the JSON's keys does; its file and ours list the examples in the
    order they were first sampled. An empty record counts as std 0."""
    score = {key: float(np.std(accs)) if accs else 0.0 for key, accs in history.items()}
    return sorted(history, key=lambda key: -score[key])


def select_by_rank(history: dict[str, list[float]], ranks) -> list[str]:
    ranked = rank_by_variance(history)
    bad = [r for r in ranks if not 1 <= r <= len(ranked)]
    if bad:
        raise SystemExit(f"--rank {' '.join(map(str, bad))}: ranks run from 1 to {len(ranked)} (the history's "
                         "examples)")
    return [ranked[r - 1] for r in ranks]


def find_examples(problems: list[dict], ids, labels=()) -> list[dict]:
    """The training rows named by `ids` (the data's `index` column, else row numbers), with their label replaced
    where `labels` says so (the paper's label-noise ablation)."""
    if labels and len(labels) != len(ids):
        raise SystemExit(f"--label: give one label per example ({len(ids)}), got {len(labels)}")
    examples = []
    for n, example_id in enumerate(ids):
        rows = [p for p in problems if p["id"] == str(example_id)]
        if not rows:
            kind = "`index` column" if "index" in problems[0] else "row number (the data has no `index` column)"
            raise SystemExit(f"example {example_id!r}: no training problem has this {kind} in the training data "
                             "(or it was dropped: see the lines above)")
        if len({(p["problem"], p["answer"]) for p in rows}) > 1:
            raise SystemExit(f"example {example_id!r}: the training data has {len(rows)} different problems with "
                             "this index")
        examples.append({**rows[0], "true_answer": rows[0]["answer"]} | ({"answer": labels[n]} if labels else {}))
    return examples


def replicate(examples: list[dict], copies: int) -> list[dict]:
    """The 1-shot batch: `copies` prompts, equal shares of each example in blocks (the order of the paper's merged
    files). Each copy is sampled samples_per_prompt times and is its own GRPO group, not one group of all."""
    if copies % len(examples):
        raise SystemExit(f"--prompts-per-step {copies} must split into equal shares for {len(examples)} examples")
    return [example for example in examples for _ in range(copies // len(examples))]

# ---- scale-out: the pieces the shared blocks call (torchrun itself: grpo.py only, so far) ---------------------
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


def on_device(model, device, world: int):
    """One process: the model on the device. Under torchrun: this rank's FSDP2 shard of a model still in CPU memory;
    fully_shard moves each layer to the GPU as it shards it, so no GPU ever holds a whole fp32 model (a 7B policy and
    reference moved whole would take 56 GB of each GPU, which torch then keeps cached where vLLM needs room)."""
    return shard_model(model, device) if world > 1 else model.to(device)


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
    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(args_class):
        flag = "--" + f.name.replace("_", "-")
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        several = re.fullmatch(r"tuple\[(\w+), \.\.\.\]", type_name)  # --rank 1 13: one or more values
        if f.type in (bool, "bool"):
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=helps.get(f.name))
        elif several:
            parser.add_argument(flag, type=kinds[several[1]], nargs="+", default=f.default, help=helps.get(f.name))
        else:
            parser.add_argument(flag, type=kinds[type_name], default=f.default, help=helps.get(f.name))
    parsed = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(parser.parse_args(argv)).items()}
    return args_class(**parsed)


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
    """Training problems with their tokenized prompts and ids (the `index` column, else the row number). Problems
    without an answer (DSR-sub has one, index 265) and prompts over the length limit are dropped and counted."""
    try:
        rows = evaluation.toy_splits()[0] if args.train_data == "toy" else evaluation.read_rows(args.train_data)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--train-data: {e}") from None
    kept, unanswered = [], []
    for row, p in enumerate(rows):  # an example's id names its row even after some rows are dropped
        for key in (args.problem_key, args.answer_key):
            if key not in p:
                raise SystemExit(f"--train-data: {args.train_data}: row {row} has no {key!r} (its keys: "
                                 f"{', '.join(p)}); choose the column with --problem-key / --answer-key")
        example_id = str(p.get("index", row))
        if p[args.answer_key] is None or str(p[args.answer_key]).strip() == "":
            unanswered.append(example_id)
            continue
        problem, answer = str(p[args.problem_key]), str(p[args.answer_key])
        try:
            ids = evaluation.encode_prompt(tokenizer, evaluation.build_prompt(problem, tokenizer, args.template))
        except ValueError as e:  # a chat template the tokenizer lacks
            raise SystemExit(f"--template: {e}") from None
        if len(ids) <= args.max_prompt_tokens:
            kept.append({**p, "problem": problem, "answer": answer, "id": example_id, "prompt_ids": ids})
    if unanswered:
        print(f"dropped {len(unanswered)} problems with an empty answer: {', '.join(unanswered[:10])}")
    if len(kept) + len(unanswered) < len(rows):
        print(f"dropped {len(rows) - len(unanswered) - len(kept)} of {len(rows)} prompts longer than "
              f"{args.max_prompt_tokens} tokens")
    if not kept:
        raise SystemExit(f"no usable training problem in --train-data (max prompt tokens {args.max_prompt_tokens})")
    return kept


def load_eval_problems(args) -> dict[str, list[dict]]:
    """The evaluation sets of --eval-data by name: toy, benchmarks (paper: the paper's six) and files, each file
    named by file_set_names."""
    if args.eval_data == "auto":
        args.eval_data = "toy" if args.model in evaluation.TINY_MODELS else "paper"
    sources = [name.strip() for name in args.eval_data.split(",") if name.strip()]
    sources = list(dict.fromkeys(m for name in sources
                                 for m in (evaluation.PAPER_BENCHMARKS if name == "paper" else (name,))))
    if not sources:
        raise SystemExit("--eval-data: no evaluation set given")
    file_names = file_set_names([source for source in sources if is_data_file(source)])
    sets = {}
    for source in sources:
        try:
            if source in file_names:
                problems = evaluation.load_problems(source, args.problem_key, args.answer_key)
            else:
                problems = evaluation.load_benchmark(source)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--eval-data: {e}") from None
        sets[file_names.get(source, source)] = problems[:args.eval_max_problems] if args.eval_max_problems \
            else problems
    return sets


def is_data_file(source: str) -> bool:
    """An --eval-data entry is a file when it is one or has a data file's suffix (a missing one is reported missing);
    a benchmark's bare name is always the benchmark (./math500 names a file of that name)."""
    return source not in evaluation.BENCHMARKS and (Path(source).suffix in (".jsonl", ".json", ".parquet")
                                                     or Path(source).is_file())


def file_set_names(paths: list[str]) -> dict[str, str]:
    """Each evaluation file's set name: its stem, lengthened by its folders until no other file's name at that
    length is the same (d/math500/test.jsonl, d/aime24/test.jsonl: math500/test, aime24/test) and it is not a
    benchmark's name (a file math500.jsonl is decoded as the training prompts, so it is named <folder>/math500,
    not math500), nor "average"."""
    reserved = {*evaluation.BENCHMARKS, "paper", "average"}
    parts = {path: Path(path).resolve().with_suffix("").parts[1:] for path in paths}
    names = {}
    for path, own in parts.items():
        for k in range(1, len(own) + 1):
            if "/".join(own[-k:]) not in reserved and all(other[-k:] != own[-k:] for p, other in parts.items()
                                                           if p != path):
                names[path] = "/".join(own[-k:])
                break
        else:
            raise SystemExit(f"--eval-data: {path} cannot be told apart from another evaluation set (the same file "
                             "given twice, or the same name with another suffix); give each set once")
    return names


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


# ---- main loop -------------------------------------------------------------------------------------------------
def main(args: Args):
    # setup: processes, checks, data, the examples' source, reference, engine, output dir, resume
    rank, world, device = init_distributed()  # one process unless started by torchrun
    check_world_size(args, world)
    check_choices(args)
    if args.samples_per_prompt < 2:  # the baseline is the group's mean: a group of one has nothing to compare with
        raise SystemExit(f"--samples-per-prompt {args.samples_per_prompt}: GRPO needs at least 2 per prompt")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if args.example_index and args.history:
        raise SystemExit("give --example-index or --history (ranked by --rank), not both")
    if args.example_index and args.rank != Args.rank:  # --rank 1 cannot be told from the default: it is harmless
        raise SystemExit(f"--rank {' '.join(map(str, args.rank))} picks from a history, but --example-index names "
                         "the examples itself: give one of the two")
    if args.entropy_only and args.entropy_coef <= 0:
        raise SystemExit("--entropy-only trains on the entropy term alone: it needs --entropy-coef > 0")
    batch_size = args.prompts_per_step * args.samples_per_prompt
    if batch_size % args.mini_batch or args.mini_batch % args.micro_batch:
        raise SystemExit(f"need mini_batch | prompts_per_step*samples_per_prompt ({batch_size}) and "
                         f"micro_batch | mini_batch; got mini_batch={args.mini_batch}, micro_batch={args.micro_batch}")
    if args.resume:
        check_resume(args)
    state = phase_state(Path(args.resume)) if args.resume else {}
    if state and state.get("phase") not in ("pool", "one-shot"):
        raise SystemExit(f"--resume {args.resume}: not a checkpoint of one_shot.py (no phase in trainer_state.pt)")
    if state.get("phase") == "pool" and (args.example_index or args.history):
        raise SystemExit(f"--resume {args.resume} continues a pool run: drop --example-index / --history")
    if state.get("phase") == "one-shot":
        check_same_examples(state, args)
    base_path = resolve_on_rank0_first(args.model)
    model, tokenizer = evaluation.load_model(args.resume or base_path)  # fp32 master weights; bf16 compute on GPU
    check_lm_head(model)
    problems = load_prompts(args, tokenizer)
    eval_sets = load_eval_problems(args)
    chosen = None  # the examples' ids, once known; all checked here, before any training
    if state.get("phase") == "one-shot":
        chosen = [e["id"] for e in state["examples"]]
        examples = find_examples(problems, chosen, [e["answer"] for e in state["examples"]])
    elif args.example_index or args.history:
        chosen = list(args.example_index) or select_by_rank(load_history(args.history), args.rank)
        if args.history:
            print(f"{args.history} ranked by historical variance: "
                  + ", ".join(f"pi_{r} = {i}" for r, i in zip(args.rank, chosen)))
        examples = find_examples(problems, chosen, args.label)
    else:
        if args.pool_steps <= 0:
            raise SystemExit("no example: give --example-index, --history, or --pool-steps > 0 for a pool run")
        if min(args.rank) < 1:
            raise SystemExit(f"--rank {min(args.rank)}: ranks start at 1 (pi_1, the largest historical variance)")
        if args.label and len(args.label) != len(args.rank):
            raise SystemExit(f"--label: give one label per example ({len(args.rank)}), got {len(args.label)}")
        check_ranks_within_pool_run(args, len(pool_of(args, problems)))
    if chosen is not None and not args.total_steps:
        raise SystemExit("--total-steps 0 means a pool run only, but the example is already given")
    replicate(list(chosen or args.rank), args.prompts_per_step)  # unequal shares fail now, not after the pool run
    reference = None
    if args.kl_coef > 0:  # with no KL term there is nothing to compare against: no reference is loaded
        reference = evaluation.load_model(base_path)[0].eval()
        reference.requires_grad_(False)
        reference = on_device(reference, device, world)  # under torchrun: sharded once, for both phases
    output_dir = Path(gather_from_ranks([args.output_dir or f"runs/{Path(__file__).stem}-"
                                         f"{time.strftime('%Y%m%d-%H%M%S')}"])[0])  # rank 0's clock names it
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (output_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    engine = make_rollout_engine(args, base_path, model, device)
    stops = evaluation.stop_token_ids(tokenizer, model)
    run = dict(reference=reference, engine=engine, tokenizer=tokenizer, eval_sets=eval_sets, device=device,
               autocast=autocast, stops=stops)

    # 0. choose the example(s) (the paper's data selection): plain GRPO over the pool from the base model records
    #    each example's accuracy every time it is sampled; the ranks pick from that history by its variance
    if chosen is None:
        pool = pool_of(args, problems)
        print(f"pool run: {args.pool_steps} GRPO steps over {len(pool)} problems, recording their accuracy")
        history = train(args, "pool", pool, model, output_dir / "pool", state, **run)
        chosen = select_by_rank(history, args.rank)
        print("pool history ranked by historical variance: "
              + ", ".join(f"pi_{r} = {i}" for r, i in zip(args.rank, chosen)))
        examples = find_examples(problems, chosen, args.label)
        del model  # the pool run's policy and AdamW state go before 1-shot RLVR's are made
        free_finished_phase()
        model, state = evaluation.load_model(base_path)[0], {}  # 1-shot RLVR starts again from the base model
    if not args.total_steps:
        return finish(output_dir, engine)
    for e in examples:
        relabelled = f" (the data says {e['true_answer']!r})" if e["answer"] != e["true_answer"] else ""
        print(f"example {e['id']}, answer {e['answer']!r}{relabelled}: {e['problem'][:300]!r}")

    # 1-shot RLVR: GRPO from the base model on equal shares of copies of the example(s), the same batch every step
    train(args, "one-shot", replicate(examples, args.prompts_per_step), model, output_dir, state, **run)
    return finish(output_dir, engine)


def phase_state(folder: Path) -> dict:
    """What main needs of a checkpoint: its phase, example(s), history, best evaluation and step. Read onto the CPU
    (a single-GPU checkpoint's AdamW moments would come back onto the GPU, ~12 GB at 1.5B, and fail on a machine
    without one), and the rest let go here, before training: train() loads the optimizer's state itself."""
    state = torch.load(folder / "trainer_state.pt", weights_only=False, mmap=True, map_location="cpu")
    return {k: state[k] for k in ("phase", "examples", "history", "best", "step") if k in state}


def check_same_examples(state: dict, args) -> None:
    """A 1-shot checkpoint trains on its own example(s) and labels. Flags that ask for others are refused, not
    ignored; flags that ask for the same ones (the first command again, with --resume) pass."""
    saved = [e["id"] for e in state["examples"]]
    asked, flags = None, ""
    if args.example_index:
        asked, flags = list(args.example_index), f"--example-index {' '.join(args.example_index)}"
    elif args.history:
        asked = select_by_rank(load_history(args.history), args.rank)
        flags = f"--history {args.history} --rank {' '.join(map(str, args.rank))}"
    if asked is not None and asked != saved:
        raise SystemExit(f"--resume {args.resume} trains on example(s) {' '.join(saved)}, but {flags} picks "
                         f"{' '.join(asked)}: drop {flags.split()[0]}, or start a new run without --resume")
    labels = [e["answer"] for e in state["examples"]]
    if args.label and list(args.label) != labels:
        raise SystemExit(f"--resume {args.resume} trains against the label(s) {' '.join(labels)}, but --label says "
                         f"{' '.join(args.label)}: drop --label, or start a new run without --resume")


def pool_of(args, problems: list[dict]) -> list[dict]:
    """The pool run's problems: the first --pool-size training problems (32 on the toy task by default)."""
    pool_size = args.pool_size if args.pool_size >= 0 else (32 if args.train_data == "toy" else 0)
    return problems[:pool_size] if pool_size else problems


def check_ranks_within_pool_run(args, pool_size: int) -> None:
    """pi_i needs at least i examples in the pool run's history, which holds only the examples it samples: the
    whole pool once its steps cover it (each epoch is a permutation), else the first pool_steps x prompts_per_step.
    Checked now, not after the pool run."""
    sampled = min(pool_size, args.pool_steps * args.prompts_per_step)
    if max(args.rank) > sampled:
        raise SystemExit(f"--rank {max(args.rank)}: the pool run ranks only the {sampled} examples it samples "
                         f"({pool_size} in the pool, {args.pool_steps} steps x {args.prompts_per_step} prompts); "
                         f"ask for ranks up to {sampled}, or a larger --pool-size / --pool-steps")


def free_finished_phase() -> None:
    """Free what the pool run left behind before 1-shot RLVR allocates its own. Its AdamW can be caught in a reference
    cycle (in torch 2.13 the first optimizer of a process is: the frames of its __init__ survive torch's lazy compile
    import), and then its state and, through it, the policy's weights outlive train() until a cyclic garbage
    collection: at 1.5B about 18 GB of GPU memory next to the new policy, optimizer and vLLM."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finish(output_dir: Path, engine) -> Path:
    if is_distributed() and engine is None:  # a vLLM engine tears the process group down itself when it shuts down
        evaluation.leave_process_group()
    return output_dir


def train(args, phase, problems, model, output_dir, state, reference, engine, tokenizer, eval_sets, device, autocast,
          stops):
    """GRPO steps over the pool, recording each example's accuracy history (phase "pool"), or over the replicated
    example(s) (phase "one-shot"). Each phase reseeds at its start and the rollouts' randomness follows from the seed
    and the step (HF generate draws from the reseeded torch stream, vLLM from one seeded per step: generate_vllm),
    so a 1-shot run does not depend on how its example was chosen: the default run's second phase draws the samples
    of a run given the first phase's history (equal weights: tested with HF rollouts, seen with vLLM on CPU; on a GPU
    up to its kernels' nondeterminism)."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    seed_everything(args.seed + rank)  # each rank samples its own responses; the data order is seeded apart
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model = on_device(model, device, world)  # here, not in main: 1-shot training starts again from the base model
    steps = args.pool_steps if phase == "pool" else args.total_steps
    batch_size = args.prompts_per_step * args.samples_per_prompt
    updates_per_step = args.num_updates * batch_size // args.mini_batch
    optimizer, scheduler = make_optimizer(model, args, steps * updates_per_step)
    output_dir.mkdir(parents=True, exist_ok=True)
    start_step, history, best = 0, {}, None
    if state:
        state = load_trainer_state_for_world(Path(args.resume), model, optimizer, scheduler, world)  # every rank
        start_step, history, best = state["step"], state["history"], state["best"]
        del state  # the optimizer's entries, read onto the CPU: on a GPU load_state_dict made the optimizer its own
        print(f"resumed the {phase} run from {args.resume} at step {start_step}")
    push_weights(engine, model)  # the engine loaded the base model's files; from here on it tracks the policy
    logger = Logger(output_dir, args) if rank == 0 else None
    rank_args = dataclasses.replace(args, mini_batch=args.mini_batch // world)  # each rank's share of a mini-batch
    ids = list(dict.fromkeys(p["id"] for p in problems))
    relabelled = phase == "one-shot" and any(p["answer"] != p["true_answer"] for p in problems)
    if phase == "one-shot" and start_step == 0 and args.eval_every:  # step 0: the base model, as the paper's plots
        at_start = run_evaluation(engine or model, tokenizer, eval_sets, args)  # every rank: FSDP's generate
        if rank == 0:
            logger.log({"step": 0, **at_start})
    bad_steps = 0

    for step in range(start_step, steps):
        metrics = {"step": step + 1}
        # 1. sample prompts: the pool run samples the pool as GRPO does; 1-shot RLVR takes every copy every step
        #    (under torchrun each rank takes whole groups of its share of the batch)
        whole_batch = [problems[i] for i in batch_indices(step, len(problems), args.prompts_per_step, args.seed)] \
            if phase == "pool" else problems
        batch = rank_share(whole_batch, rank, world)
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
        # 4. advantages; without the outcome reward (the entropy-only ablation) the surrogate vanishes and only the
        #    entropy (and KL) terms move the policy
        advantages = group_advantages(rewards, args.samples_per_prompt, args.std_normalize)
        if args.entropy_only and phase == "one-shot":
            advantages = torch.zeros_like(advantages)
        if args.mask_truncated:
            rollouts = [dict(r, masked=r["truncated"]) for r in rollouts]
        # 5. update: num_updates passes, each over mini-batches with micro-batch gradient accumulation
        sleep_engine(engine, args)
        lr = scheduler.get_last_lr()[0]  # the rate of this step's (first) update
        train_stats = update_policy(model, reference, rollouts, advantages, optimizer, scheduler, rank_args,
                                    autocast, tokenizer.pad_token_id, device)
        # 6. push weights into the rollout engine
        wake_engine(engine, model, args)
        t3 = time.time()
        bad_steps = bad_steps + 1 if train_stats.pop("skipped") else 0
        if bad_steps >= args.max_bad_steps:
            raise SystemExit(f"stopping: {bad_steps} updates in a row had a non-finite loss or gradient "
                             "(lower --lr, check the data, or use fp32)")
        # 7. log (each example's accuracy: the pool run's history) / evaluate (the best average) / checkpoint
        #    (under torchrun: the whole batch, gathered from every rank, so every rank records the same history)
        group_accuracy = group_accuracy_over_ranks(rewards, args.samples_per_prompt)
        if phase == "pool":
            record_accuracy(history, whole_batch, group_accuracy)
            if rank == 0:
                (output_dir / "accuracy_history.json").write_text(json.dumps(history))
        elif len(ids) > 1:
            for i in ids:
                shares = [a for p, a in zip(whole_batch, group_accuracy) if p["id"] == i]
                metrics[f"accuracy/{i}"] = sum(shares) / len(shares)
        if relabelled:  # the label-noise ablation: how often the policy says the data's own answer
            true_golds = [p["true_answer"] for p in batch for _ in range(args.samples_per_prompt)]
            true_correct = gather_from_ranks(verify.score_batch(texts, true_golds, mode=args.answer_mode))
            metrics["true_label_accuracy"] = sum(true_correct) / len(true_correct)
        lengths = gather_from_ranks([len(r["response_ids"]) for r in rollouts])
        rewards, correct = torch.tensor(gather_from_ranks(rewards.tolist())), gather_from_ranks(list(correct))
        truncated = gather_from_ranks([r["truncated"] for r in rollouts])
        metrics.update(reward_mean=rewards.mean().item(), accuracy=sum(correct) / len(correct),
                       response_len_mean=sum(lengths) / len(lengths),
                       truncated_share=sum(truncated) / len(truncated),
                       time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2,
                       tokens_per_s=sum(lengths) / max(t1 - t0, 1e-9), lr=lr, **train_stats)
        last = step + 1 == steps
        saving = last or (args.save_every and (step + 1) % args.save_every == 0)
        if last or (args.eval_every and (step + 1) % args.eval_every == 0):
            # every rank evaluates its share of each set (eval.evaluate) and gets all results; rank 0 logs
            metrics.update(run_evaluation(engine or model, tokenizer, eval_sets, args))
            if best is None or metrics["eval/average"] > best["average"]:  # the paper reports its best checkpoint
                best = {"step": step + 1, "average": metrics["eval/average"],
                        "checkpoint": str(output_dir / f"checkpoint-{step + 1}") if saving else None,
                        **{k[5:]: v for k, v in metrics.items() if k.startswith("eval/")}}
                if rank == 0:
                    (output_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")
            metrics.update({"best/step": best["step"], "best/average": best["average"]})
        if saving:
            extra = {"phase": phase, "history": history, "best": best,
                     "examples": [{"id": i, "answer": next(p["answer"] for p in problems if p["id"] == i)}
                                  for i in ids] if phase == "one-shot" else None}
            folder = output_dir / f"checkpoint-{step + 1}"
            if world > 1:  # the history is the same on every rank: rank 0 writes it
                save_sharded_checkpoint(folder, step + 1, model, tokenizer, optimizer, scheduler, extra=extra)
            else:
                save_checkpoint(folder, step + 1, model, tokenizer, optimizer, scheduler, extra=extra)
            if rank == 0:  # older checkpoints keep their weights only (--keep-resume-states)
                drop_old_resume_states(output_dir, args.keep_resume_states, step + 1)
        if rank == 0:
            logger.log(metrics)
    if rank == 0:
        close_logger(logger)
    return history


def close_logger(logger: Logger) -> None:
    """End the phase's log: the pool run and 1-shot RLVR are two runs in one process, each with its own Logger.
    wandb keeps one active run per process, so the pool run's must finish before the next wandb.init, or 1-shot
    RLVR would log into it at steps it already used (which wandb drops)."""
    logger.file.close()
    if hasattr(logger.tracker, "finish"):  # wandb's Run
        logger.tracker.finish()
    elif logger.tracker is not None:  # TensorBoard's SummaryWriter
        logger.tracker.close()


def group_accuracy_over_ranks(rewards: torch.Tensor, group_size: int) -> list[float]:
    """Each group's accuracy (its mean reward), for the whole batch: under torchrun every rank's groups, gathered in
    rank order, which is the batch's order."""
    return gather_from_ranks(rewards.view(-1, group_size).mean(1).tolist())


def record_accuracy(history: dict, batch: list[dict], group_accuracy: list[float]) -> None:
    """The pool run's accuracy history: each sampled example's accuracy appended once per step. A batch that spans
    an epoch boundary may hold an example twice: its groups count as one record, the accuracy of all its samples
    (the paper's trainer never samples an example twice in a step). `batch` is the whole batch (every rank's share),
    so under torchrun every rank records every rank's rollouts."""
    this_step = {}
    for p, accuracy in zip(batch, group_accuracy):
        this_step.setdefault(p["id"], []).append(accuracy)
    for key, accuracies in this_step.items():
        history.setdefault(key, []).append(sum(accuracies) / len(accuracies))


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


def update_policy(model, reference, rollouts, advantages, optimizer, scheduler, args, autocast, pad_id, device):
    """num_updates passes over the batch in shuffled mini-batches; one optimizer step per mini-batch."""
    with torch.no_grad(), autocast:  # old and reference log-probs: fixed for all passes over this batch
        old_logp = token_logprobs(model, rollouts, args, pad_id, device)
        ref_logp = token_logprobs(reference, rollouts, args, pad_id, device) if reference is not None else None
    # the engine sampled from exactly these weights: any gap is engine-trainer mismatch (numerics, a missed push)
    engine_lp = torch.tensor([lp for r in rollouts for lp in r["engine_logprobs"]])
    # logged sums over the batch: each micro-batch's share of its mini-batch's loss, the other statistics per token
    sums = dict.fromkeys(("loss", "clip_frac", "kl", "entropy", "tokens"), 0.0)
    sums.update(logprob_gap=(engine_lp - torch.cat(old_logp).float().cpu()).abs().sum().item(),
                sampled_tokens=float(len(engine_lp)))
    grad_norms, skipped = [], False
    for update in range(args.num_updates):
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
                adv = torch.cat([advantages[i].expand(n) for i, n in zip(micro, lengths)]).to(device)
                weights = token_weights(lengths, args.loss_agg, mini_tokens, mini_seqs, args.max_new_tokens)
                loss, s = policy_loss(logp, per_token(old_logp), adv, weights.to(device), args,
                                      per_token(ref_logp) if ref_logp is not None else None,
                                      entropy if args.entropy_coef else None)
                (loss * counted).backward()
                if not counted:  # a filler pass only keeps this rank in step with the others
                    continue
                sums["loss"] += loss.item()
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
    out = {"logprob_gap": total["logprob_gap"] / total["sampled_tokens"], "skipped": skipped}
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
    """Accuracy on each evaluation set, decoded as `eval.py --benchmarks` does (the paper's protocol on its six:
    greedy, avg@8 at T=0.6 on aime24/aime25/amc23); files as the training prompts. eval/average is their unweighted
    mean: with --eval-data paper, the paper's six-benchmark "Avg." by which it picks its checkpoint."""
    out = {}
    with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training run's random stream
        for name, problems in eval_sets.items():
            if name in evaluation.BENCHMARKS:  # a file's set never has a benchmark's name (file_set_names)
                decoding = evaluation.decoding_for(name, argparse.Namespace(
                    n=None, temperature=None, top_p=1.0, template=None, mode=None, max_tokens=None), ks=())
            else:
                decoding = dict(template=args.template, mode=args.answer_mode, n=1, temperature=0.0, top_p=1.0,
                                max_tokens=args.max_new_tokens, ks=())
            # the engine's context holds max_prompt_tokens + max_new_tokens
            decoding["max_tokens"] = min(decoding["max_tokens"], args.max_new_tokens)
            metrics, _ = evaluation.evaluate(engine, tokenizer, problems, seed=args.seed, **decoding)
            out[f"eval/{name}"] = metrics.pop("accuracy")
            out.update({f"eval_detail/{name}/{k}": v for k, v in metrics.items()})
    out["eval/average"] = sum(out[f"eval/{name}"] for name in eval_sets) / len(eval_sets)
    return out


if __name__ == "__main__":
    main(parse_args())
