"""HAPO for LLM math reasoning in one file.

History-Aware Policy Optimization (Huang, Zhang and Cardie, 2025, "HAPO: Training Language Models to Reason Concisely
via History-Aware Policy Optimization"): GRPO whose reward adds a length term measured against a per-problem history.
For every training problem i the trainer remembers h_i, the shortest correct response to it seen so far. A response of
length L on a problem with a history earns, with x = L / h_i and c(x) = cos(x pi/2) for x < 2, else -1,
    correct:  1 + w * max(-0.7, c(x))      shorter than the best so far pays more; never below 0.3
    wrong:    0 + w * min(0, c(x))         long wrong answers pay less; short wrong ones are never rewarded
and 0 or 1 alone while the problem has no correct response yet. All responses of a batch are scored against the
history from before the batch; then h_i = min(h_i, shortest correct length in the batch). The defaults train the
built-in tiny model on the toy task on a CPU in a few minutes; the README gives the paper's real-run command.

    python hapo.py                                 # tiny model, toy task, CPU
    python hapo.py --help                          # every hyperparameter, with the paper's value
    torchrun --nproc_per_node 8 hapo.py --model ...  # several GPUs: FSDP2, one vLLM engine per rank

Differs from grpo.py in: the reward (correctness + history-relative length reward, `length_reward`,
`history_length_rewards`), the history state (kept per training problem, saved in checkpoints with a fingerprint
of the problem list, --history-mode and --length-reward, and restored on resume with the same three only),
`--train-problems` (train on the first N problems, so that problems are revisited and have a history; the toy
default takes 320, a data file is used whole), and the length metrics it logs (mean and p90 of all and of correct
responses, history coverage and mean h_i).
Choices, all flags: `--history-mode mean` (h_i = running mean of correct lengths), `--length-reward linear`
(piecewise linear with a 10% tolerance, from the paper's code), `--length-weight` w in [0, 1]. Lengths for the
reward and h_i count response tokens without the stop token, as the paper does; a truncated response counts as
wrong, and its length (the whole budget) is scored as a wrong response's.
Under torchrun (grpo.py's scale-out blocks) the history is global: every rank takes in the whole batch's correct
lengths (`history_length_rewards_over_ranks`), so all ranks hold the single-process history; rank 0 saves it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
    output_dir: str = ""  # default runs/hapo-<time>
    total_steps: int = 100  # rollout batches (paper: 1,250 = 5 epochs over its 2,000 problems at 8 per step)
    eval_every: int = 25  # evaluate every this many steps (and at the end); 0: only at the end
    save_every: int = 0  # checkpoint every this many steps (and at the end); 0: only at the end
    keep_resume_states: int = 0  # only the newest this many checkpoints keep the optimizer and RNG state; 0: all
    resume: str = ""  # a checkpoint folder to continue from (the history comes back with it)
    track: str = ""  # also log to "tensorboard" or "wandb" when installed
    # model & data
    # hub id or folder (paper: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B and two more); "tiny-verbose": the built-in
    # model whose answers trail longer idle sentences, so that the length reward has something to cut
    model: str = "tiny-verbose"
    train_data: str = "toy"  # jsonl/json/parquet with problem and answer columns (paper: 2,000 DeepScaleR); "toy"
    train_problems: int = -1  # train on the first N, revisited; 0: all (paper); -1: 320 of the toy task, all else
    problem_key: str = "problem"  # column holding the problem text
    answer_key: str = "answer"  # column holding the gold answer
    eval_data: str = "auto"  # toy (held-out split), a benchmark (math500, ...) or a file; auto: toy or math500
    eval_max_problems: int = 0  # evaluate on the first this many problems; 0: all
    # the paper's code sends the chat template a system message of its own (whose text we lack) and the bare
    # question as the user turn; `chat` sends no system message (the template may add its default one) and appends
    # " Let's think step by step and output the final answer within \boxed{}." to the question
    template: str = "qwen-math-train"  # qwen-math-train, qwen25-math-cot, chat (nearest the paper's prompt), plain
    max_prompt_tokens: int = 1024  # longer prompts are dropped, with a count printed (paper's code: cut to 512)
    # rollout
    rollout: str = "auto"  # "vllm", "hf" (transformers generate) or "auto" (vllm when installed)
    prompts_per_step: int = 16  # prompts per rollout batch (paper: 8)
    samples_per_prompt: int = 8  # group size n (paper: 2)
    temperature: float = 1.0  # sampling temperature, also divides the trainer's logits (paper: 0.7)
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 40  # response budget; a truncated response counts as wrong (paper: 32768)
    gpu_memory_utilization: float = 0.35  # vLLM's share of the GPU; the trainer uses the rest
    vllm_sleep: bool = True  # free vLLM's GPU memory while training (GPU only)
    vllm_tensor_parallel: int = 1  # under torchrun: ranks (GPUs) per vLLM engine, for models too big for one GPU
    # algorithm: HAPO's reward
    length_weight: float = 1.0  # w of the length reward; in [0, 1], so any right answer beats any wrong (paper: 1.0)
    length_reward: str = "cosine"  # "cosine" (paper) or "linear" (piecewise, tolerance 0.1 h_i; the paper's code)
    history_mode: str = "min"  # h_i: "min" = shortest correct length so far (paper), "mean" = mean correct length
    # algorithm: GRPO underneath
    answer_mode: str = "boxed"  # verify.py mode for the reward: "boxed" or "flex"
    std_normalize: bool = True  # advantage (r - mean) / (std + eps) (paper); --no-std-normalize: r - mean
    mask_truncated: bool = False  # drop truncated responses from the loss
    clip_low: float = 0.2  # PPO ratio clip below 1 (paper: 0.2)
    clip_high: float = 0.2  # PPO ratio clip above 1 (paper: 0.2)
    kl_coef: float = 0.0  # low-variance (k3) KL to the reference in the loss; 0 loads no reference (paper: 0.04)
    entropy_coef: float = 0.0  # entropy bonus: loss -= coef * entropy
    loss_agg: str = "token-mean"  # token-mean, seq-mean-token-mean (paper), seq-mean-token-sum-norm (Dr. GRPO)
    num_updates: int = 1  # passes over each rollout batch
    mini_batch: int = 128  # responses per optimizer step (paper: 16, one step per rollout batch)
    micro_batch: int = 32  # responses per forward/backward; gradients accumulate over a mini-batch
    # optimisation
    lr: float = 2e-4  # AdamW learning rate (paper: 1e-6; the tiny model needs far more)
    weight_decay: float = 0.01  # AdamW weight decay (paper: 0)
    lr_schedule: str = "constant"  # "constant", "cosine" or "linear" (to 0; both after warmup; paper: linear)
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    max_grad_norm: float = 1.0  # global gradient-norm clip
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


# ---- HAPO: the history-aware length reward ---------------------------------------------------------------------
def length_reward(length: int, history_len: float | None, correct: bool, shape: str = "cosine",
                  weight: float = 1.0) -> float:
    """The length reward of one response against its problem's history h_i, with x = length / h_i.

    cosine (the paper): c(x) = cos(x pi/2) for x < 2, else -1. A correct response earns max(-0.7, c): more the
    shorter it is than the best so far, less when longer, but never below -0.7, so that with w <= 1 every correct
    response (total >= 0.3) beats every wrong one (total <= 0). A wrong response earns min(0, c): a long one is
    penalised, a short one is not rewarded (that would teach answering fast and wrong) and not penalised either,
    so exploring shorter solutions stays free. linear (the paper's code): 1 - x below h_i, 0 up to 10% above it,
    -(x - 1.1) beyond, floored at -0.7 (correct) or -1 (wrong). No history yet: 0."""
    if history_len is None:
        return 0.0
    x = length / history_len
    if shape == "cosine":
        c = math.cos(x * math.pi / 2) if x < 2 else -1.0
        r = max(-0.7, c) if correct else min(0.0, c)
    elif shape == "linear":
        tolerance = 0.1
        if correct and x < 1:
            r = 1.0 - x
        elif x < 1 + tolerance:
            r = 0.0
        else:
            r = max(-0.7 if correct else -1.0, -(x - 1 - tolerance))
    else:
        raise ValueError(f"unknown length reward {shape!r}")
    return weight * r


def history_length_rewards(history: dict, problem_ids: list[int], lengths: list[int], correct: list[bool],
                           args) -> list[float]:
    """Length rewards of a batch, then the history update: HAPO's step between generating and the advantages.

    `history` maps a training problem's index to (h_i, correct responses seen). Every response is scored against
    the history from before the batch, so responses of one batch never see each other; only then does each problem
    take in its correct lengths of this batch: h_i = min(h_i, shortest) (min, the paper) or the running mean of all
    correct lengths (mean)."""
    rewards = [length_reward(n, history[i][0] if i in history else None, c, args.length_reward, args.length_weight)
               for i, n, c in zip(problem_ids, lengths, correct)]
    for i in sorted(set(problem_ids)):
        new = [n for j, n, c in zip(problem_ids, lengths, correct) if j == i and c]
        if not new:
            continue
        h, seen = history.get(i, (None, 0))
        if args.history_mode == "min":
            h = min(new) if h is None else min(h, min(new))
        else:
            h = ((h or 0) * seen + sum(new)) / (seen + len(new))
        history[i] = (h, seen + len(new))
    return rewards


def history_length_rewards_over_ranks(history: dict, problem_ids: list[int], lengths: list[int],
                                      correct: list[bool], args) -> list[float]:
    """history_length_rewards under torchrun: this rank's responses are scored against the history from before the
    batch, then the history takes in the correct lengths of the whole batch, every rank's (gathered in rank order,
    which is the batch's order). So h_i is the min over ranks (mean mode: their sums and counts together), and every
    rank holds the same history, the one a single process would. In a single process: history_length_rewards."""
    if not is_distributed():
        return history_length_rewards(history, problem_ids, lengths, correct, args)
    rewards = history_length_rewards(dict(history), problem_ids, lengths, correct, args)  # a copy: scoring only
    history_length_rewards(history, gather_from_ranks(problem_ids), gather_from_ranks(lengths),
                           gather_from_ranks(list(correct)), args)
    return rewards


def response_length(response_ids: list[int], stops: list[int]) -> int:
    """The length HAPO counts: response tokens without the stop token that ended it (a truncated one has none)."""
    return len(response_ids) - int(bool(response_ids) and response_ids[-1] in stops)


def check_hapo_args(args) -> None:
    """Fail before any model loads: a weight outside [0, 1] would let a wrong answer outscore a right one."""
    if not 0.0 <= args.length_weight <= 1.0:
        raise SystemExit(f"--length-weight must be in [0, 1] (a larger weight lets a short wrong answer beat a long "
                         f"right one), got {args.length_weight}")
    if args.length_reward not in ("cosine", "linear"):
        raise SystemExit(f"--length-reward must be cosine or linear, not {args.length_reward!r}")
    if args.history_mode not in ("min", "mean"):
        raise SystemExit(f"--history-mode must be min or mean, not {args.history_mode!r}")
    if args.train_problems < -1:
        raise SystemExit(f"--train-problems must be >= 0 (0: all; -1: 320 of the toy task, all of a file), got "
                         f"{args.train_problems}")


TOY_TRAIN_PROBLEMS = 320  # 100 steps of 16 prompts visit each 5 times: the paper's 5 epochs, at the toy's scale


def training_problems(problems: list[dict], args) -> list[dict]:
    """The first --train-problems problems, so that each is revisited and builds a history. The toy default (-1)
    cuts the toy task to 320; a --train-data file is used whole unless asked otherwise, and any cut is printed."""
    n = args.train_problems
    if n == -1:
        n = TOY_TRAIN_PROBLEMS if args.train_data == "toy" else 0
    if n > len(problems):
        print(f"--train-problems {n}: there are only {len(problems)} problems, training on all of them")
    elif 0 < n < len(problems):
        print(f"training on the first {n} of {len(problems)} problems (--train-problems {n}; 0: all)")
        return problems[:n]
    return problems


def problems_fingerprint(problems: list[dict]) -> dict:
    """What the history's indices point at: the count and a hash of the problems' texts and answers, in order. A
    resume over another list (another file, --train-problems, or a --template / --max-prompt-tokens that drops
    other prompts and so shifts the indices) would hand one problem's h_i to another."""
    texts = json.dumps([[p["problem"], p["answer"]] for p in problems])
    return {"count": len(problems), "sha256": hashlib.sha256(texts.encode()).hexdigest()}


def check_same_problems(state: dict, problems: list[dict], folder: str) -> None:
    """Refuse to resume a history over other training problems than the checkpoint's."""
    saved, now = state.get("train_problems"), problems_fingerprint(problems)
    history = state.get("history", {})
    if saved is None:  # a checkpoint from before fingerprints: only a history past the end can be caught
        if history and max(history) >= len(problems):
            raise SystemExit(f"the checkpoint's history covers problem {max(history)}, but there are "
                             f"{len(problems)} training problems: resume with the same --train-data and "
                             "--train-problems")
        return
    if saved != now:
        raise SystemExit(f"--resume {folder}: the checkpoint's history is over other training problems "
                         f"({saved['count']} problems, hash {saved['sha256'][:12]}) than this run's ({now['count']}, "
                         f"hash {now['sha256'][:12]}): resume with the same --train-data, --train-problems, "
                         "--problem-key / --answer-key, --template and --max-prompt-tokens")


def history_settings(args) -> dict:
    """The flags that say what a saved history means: whether h_i is the shortest correct length or a running mean
    (weighted by the count seen), and the reward shape it was built to be scored with. Saved in every checkpoint."""
    return {"history_mode": args.history_mode, "length_reward": args.length_reward}


def check_same_history_settings(folder: Path, args) -> None:
    """Refuse, before any model loads, a resume that would read the checkpoint's history under other settings (a
    `min` history read as a mean, or the reverse, goes wrong silently). Checkpoints from before these were saved
    hold none, and pass."""
    state = torch.load(folder / "trainer_state.pt", weights_only=False, mmap=True, map_location="cpu")
    for name, now in history_settings(args).items():
        saved = state.get(name)
        if saved is not None and saved != now:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"--resume {folder}: the checkpoint's history was kept with {flag} {saved}, this run "
                             f"asks for {flag} {now}: resume with {flag} {saved}")


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


# ---- main loop -------------------------------------------------------------------------------------------------
def main(args: Args):
    # setup: processes, seed, model, reference, optimizer, data, history, engine, output dir, resume
    check_hapo_args(args)
    rank, world, device = init_distributed()  # one process unless started by torchrun
    check_world_size(args, world)
    check_choices(args)
    if args.samples_per_prompt < 2:  # the baseline is the group's mean: a group of one has nothing to compare with
        raise SystemExit(f"--samples-per-prompt {args.samples_per_prompt}: GRPO needs at least 2 per prompt")
    seed_everything(args.seed + rank)  # each rank samples its own responses; the data order is seeded apart
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if args.resume:
        check_resume(args)
        check_same_history_settings(Path(args.resume), args)
    model_path = args.resume or resolve_on_rank0_first(args.model)
    model, tokenizer = evaluation.load_model(model_path)  # fp32 master weights; bf16 compute on GPU
    check_lm_head(model)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model = on_device(model, device, world)  # under torchrun: sharded, before the next model loads
    reference = None
    if args.kl_coef > 0:  # with no KL term there is nothing to compare against: no reference is loaded
        reference = evaluation.load_model(resolve_on_rank0_first(args.model))[0].eval()
        reference.requires_grad_(False)
        reference = on_device(reference, device, world)
    problems = training_problems(load_prompts(args, tokenizer), args)
    history: dict[int, tuple[float, int]] = {}  # problem index -> (h_i, correct responses seen); HAPO's state
    eval_problems = load_eval_problems(args)
    batch_size = args.prompts_per_step * args.samples_per_prompt
    if batch_size % args.mini_batch or args.mini_batch % args.micro_batch:
        raise SystemExit(f"need mini_batch | prompts_per_step*samples_per_prompt ({batch_size}) and "
                         f"micro_batch | mini_batch; got mini_batch={args.mini_batch}, micro_batch={args.micro_batch}")
    updates_per_step = args.num_updates * batch_size // args.mini_batch
    optimizer, scheduler = make_optimizer(model, args, args.total_steps * updates_per_step)
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
        state = load_trainer_state_for_world(Path(args.resume), model, optimizer, scheduler, world)  # every rank
        start_step, history = state["step"], state.get("history", {})
        if "history" not in state:
            print(f"{args.resume} holds no HAPO history (not a hapo.py checkpoint): starting with none")
        check_same_problems(state, problems, args.resume)
        del state  # in one process it holds a CPU copy of AdamW's moments (~12 GB at 1.5B): the optimizer has its own
        print(f"resumed from {args.resume} at step {start_step}, history of {len(history)} problems")
    stops = evaluation.stop_token_ids(tokenizer, model)
    logger = Logger(output_dir, args) if rank == 0 else None
    rank_args = dataclasses.replace(args, mini_batch=args.mini_batch // world)  # each rank's share of a mini-batch
    bad_steps = 0

    for step in range(start_step, args.total_steps):
        metrics = {"step": step + 1}
        # 1. sample prompts
        batch_ids = rank_share(batch_indices(step, len(problems), args.prompts_per_step, args.seed), rank, world)
        batch = [problems[i] for i in batch_ids]
        # 2. generate
        t0 = time.time()
        rollouts = generate(engine, model, tokenizer, [p["prompt_ids"] for p in batch], args, step, stops)
        t1 = time.time()
        # 3. score: correctness by verify.py (a truncated response counts as wrong) + HAPO's length reward against
        #    the history from before this batch; then the history takes in this batch's correct lengths (under
        #    torchrun every rank's, so every rank holds the same history, the single-process one)
        texts = tokenizer.batch_decode([r["response_ids"] for r in rollouts], skip_special_tokens=True)
        golds = [p["answer"] for p in batch for _ in range(args.samples_per_prompt)]
        correct = verify.score_batch(texts, golds, mode=args.answer_mode)
        right = [bool(c) and not r["truncated"] for r, c in zip(rollouts, correct)]
        problem_ids = [i for i in batch_ids for _ in range(args.samples_per_prompt)]
        with_history = sum(gather_from_ranks([i in history for i in problem_ids])) / (len(problem_ids) * world)
        length_rewards = history_length_rewards_over_ranks(history, problem_ids,
                                                           [response_length(r["response_ids"], stops)
                                                            for r in rollouts], right, args)
        rewards = torch.tensor([float(c) + b for c, b in zip(right, length_rewards)])
        t2 = time.time()
        # 4. advantages
        advantages = group_advantages(rewards, args.samples_per_prompt, args.std_normalize)
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
        # 7. log / evaluate / checkpoint (under torchrun: the whole batch, gathered from every rank)
        lengths = gather_from_ranks([len(r["response_ids"]) for r in rollouts])
        rewards, correct = torch.tensor(gather_from_ranks(rewards.tolist())), gather_from_ranks(list(correct))
        right = gather_from_ranks(right)  # correct and not truncated: the responses the reward counts as right
        length_rewards = gather_from_ranks(length_rewards)
        truncated = gather_from_ranks([r["truncated"] for r in rollouts])
        metrics.update(reward_mean=rewards.mean().item(), accuracy=sum(correct) / len(correct),
                       response_len_mean=sum(lengths) / len(lengths),
                       **length_metrics(lengths, right), length_reward_mean=sum(length_rewards) / len(lengths),
                       scored_with_history=with_history, history_share=len(history) / len(problems),
                       history_len_mean=sum(h for h, _ in history.values()) / max(1, len(history)),
                       truncated_share=sum(truncated) / len(truncated),
                       time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2,
                       tokens_per_s=sum(lengths) / max(t1 - t0, 1e-9), lr=lr, **train_stats)
        last = step + 1 == args.total_steps
        if last or (args.eval_every and (step + 1) % args.eval_every == 0):
            # every rank evaluates its share of the set (eval.evaluate) and gets all results; rank 0 logs
            metrics.update(run_evaluation(engine or model, tokenizer, eval_problems, args))
        if last or (args.save_every and (step + 1) % args.save_every == 0):
            folder = output_dir / f"checkpoint-{step + 1}"
            hapo_state = {"history": history, "train_problems": problems_fingerprint(problems),
                          **history_settings(args)}
            if world > 1:  # the history is the same on every rank: rank 0 writes it
                save_sharded_checkpoint(folder, step + 1, model, tokenizer, optimizer, scheduler, extra=hapo_state)
            else:
                save_checkpoint(folder, step + 1, model, tokenizer, optimizer, scheduler, extra=hapo_state)
            if rank == 0:  # older checkpoints keep their weights only (--keep-resume-states)
                drop_old_resume_states(output_dir, args.keep_resume_states, step + 1)
        if rank == 0:
            logger.log(metrics, line_keys=("reward_mean", "accuracy", "response_len_mean", "correct_len_mean",
                                           "length_reward_mean", "history_share", "history_len_mean", "kl",
                                           "grad_norm", "time_generate", "time_train"))
    if world > 1 and engine is None:  # a vLLM engine tears the process group down itself when it shuts down
        evaluation.leave_process_group()
    return output_dir


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


def run_evaluation(engine, tokenizer, problems, args) -> dict:
    """Greedy accuracy and response lengths (all, and correct only: right and not truncated, as in training) on the
    held-out problems, through eval.py."""
    with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training run's random stream
        metrics, samples = evaluation.evaluate(engine, tokenizer, problems, template=args.template,
                                               max_tokens=args.max_new_tokens, seed=args.seed, mode=args.answer_mode)
    right = [s["correct"] and not s["truncated"] for s in samples]  # as the training metric (and reward) count them
    metrics.update(length_metrics([s["length"] for s in samples], right))
    return {f"eval/{k}": v for k, v in metrics.items()}


def length_metrics(lengths: list[int], correct: list[float]) -> dict:
    """What HAPO moves: p90 of all response lengths, and mean and p90 of the correct ones (tokens as generated,
    stop token included, like response_len_mean here, in grpo.py and in eval.py)."""
    right = [n for n, c in zip(lengths, correct) if c]
    out = {"response_len_p90": evaluation.percentile(lengths, 0.9)}
    if right:
        out.update(correct_len_mean=sum(right) / len(right), correct_len_p90=evaluation.percentile(right, 0.9))
    return out


if __name__ == "__main__":
    main(parse_args())
