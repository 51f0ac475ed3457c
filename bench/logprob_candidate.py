"""Candidates for issue #9, measured beside grpo.py's ChunkedLogprobEntropy by bench/logprob.py. Not a test.

Candidate A: two changes against grpo.py's function, both in backward.
1. grpo.py recomputes a block of logits with a GEMM and then makes log p = z / T - lse with a broadcast add: a read
   and a write of fp32 [tokens x block] per block, in a kernel that the H200 profile showed running slower than a
   plain copy (the per-token lse is broadcast). Here the GEMM writes log p itself:
   - the contraction gets 8 more columns: the hidden states carry -lse * T, split into 3 parts of the GEMM's dtype
     (bf16 has 8 mantissa bits; 3 parts carry fp32's 24), the weight block carries 1 in those columns, and 0 pads
     the width to a multiple of 8 (tensor-core alignment). fp32 accumulation adds them to h . w exactly enough;
   - 1/T is the GEMM's alpha (torch.addmm with beta=0 and out_dtype=fp32 on CUDA).
   So backward reads and writes one fp32 pass less per block (4 reads + 2.5 writes instead of 5 + 3.5; `python
   bench/logprob.py --passes --tokens 8192` counts 4.00 + 3.02 against 5.00 + 4.00 in fp32 on CPU; the weight
   block's copy with its extra columns adds writes, more at fewer tokens).
2. The hidden-state gradient is accumulated by the GEMM (C += A B, torch.addmm with the fp32 gradient as its input
   and output). grpo.py writes each block's fp32 [tokens x hidden] product and then adds it in a pass: at 32k
   tokens 4 x 201 MB of traffic per block, where the GEMM's C needs 2 x 201 MB; 48 blocks, so ~19 GB less (~4 ms
   at the H200's 4.8 TB/s, arithmetic). At 65k tokens, 99 blocks of 403 MB: ~79 GB less (~16 ms).
Forward, the weight gradient and the target's entry are grpo.py's. On CPU against grpo.py's function (300 tokens,
hidden 64, vocab 1000, T=0.6, a 0.05 MiB budget so that the backward runs over many blocks): log-probs and
entropies identical; gradients (largest ~15) identical in float64 and within 4.1e-5 in float32.
Candidate B (SoftmaxForwardLogprobEntropy, below): A plus a forward built on torch's softmax kernel; counted op by
op its forward makes 4 reads + 1 write against 6 + 2 (softmax counts as one read and one write, though its kernel
reads each row more than once). Against grpo.py's function on CPU (same case): log-probs within 3.6e-15 and
entropies within 6e-14 in float64 (5.7e-6 and 9e-5 in float32), gradients identical in float64.
Candidate C (UnshiftedForwardLogprobEntropy, below): A plus a forward without the max shift, the shift being needed
only where exp would leave fp32's range (those rows are redone with it); 4 reads + 1 write, and no softmax kernel.
Against grpo.py's function on CPU (same case): log-probs within 3.6e-15 and entropies within 4.6e-14 in float64,
gradients identical; with 10 rows' logits scaled 40x, or at T = 0.001 (rows redone with the shift), log-probs within
5.7e-14 and 1.8e-12. In float32 against a float64 reference its entropy is less exact than grpo.py's (relative
1.7e-5 against 1.1e-6: E_p[z / T] is no longer small beside log-sum-exp), its log-probs as exact.
Candidate D: C's forward with grpo.py's backward, so that the GPU times the forward's change and A's apart.
None is timed on a GPU yet.

If one wins on the GPU, it replaces ChunkedLogprobEntropy in every script (the shared-block test
keeps the copies identical) and this file goes."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo import ChunkedLogprobEntropy, chunk_length, gemm_dtype, matmul  # noqa: E402

ALPHA_FAILED = False  # set when torch.addmm cannot take out_dtype with alpha (then one more pass)
ACCUMULATE_FAILED = False  # set when torch.addmm cannot add a bf16 product into fp32 in place
EXTRA = 8  # extra contraction columns: 3 carry -lse * T, 5 are zero (width stays a multiple of 8)


def split_into_parts(x: torch.Tensor, dtype, parts: int = 3) -> torch.Tensor:
    """[n] wide values as [n x parts] of `dtype` whose sum (in fp32 or wider) is x to about parts x mantissa bits."""
    out, rest = [], x
    for _ in range(parts):
        out.append(rest.to(dtype))
        rest = rest - out[-1].to(x.dtype)
    return torch.stack(out, 1)


def scaled_matmul(a, b, scale: float, out_dtype, out=None):
    """scale * (a @ b) in out_dtype with the scale as the GEMM's alpha (no extra pass): addmm with beta=0, and on
    CUDA with out_dtype=fp32 for bf16 inputs. Half-precision inputs off CUDA: matmul, then an in-place scale."""
    global ALPHA_FAILED
    zero = torch.zeros((1, 1), dtype=a.dtype, device=a.device)  # beta=0: addmm's input is ignored
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    if a.dtype == out_dtype:
        return torch.addmm(zero, a, b, beta=0, alpha=scale, out=out)
    if a.is_cuda and not ALPHA_FAILED:
        try:
            return torch.addmm(zero, a, b, beta=0, alpha=scale, out_dtype=out_dtype, out=out)
        except (RuntimeError, TypeError) as e:  # this torch lacks addmm's out_dtype: say so, scale in a pass
            ALPHA_FAILED = True
            print(f"logprob_candidate: addmm(out_dtype=fp32, alpha) failed ({str(e)[:100]}); scaling in a pass",
                  file=sys.stderr)
    return matmul(a, b, out_dtype, out=out).mul_(scale)


class ShiftInGemmLogprobEntropy(ChunkedLogprobEntropy):
    """grpo.py's forward; a backward whose GEMM writes log p (see the module's docstring)."""

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
            if grad_entropy is None:
                a, b = -inv_t * g1, None
                at_target = (1 - logp.exp()) * inv_t * g1
            else:
                a, b = -inv_t * (g1 + grad_entropy * entropy), -inv_t * grad_entropy
                at_target = logp.exp() * (a + b * logp) + inv_t * g1
            at_target = at_target.to(ctx.dtype)
            grad_hidden = torch.empty(hidden.shape, dtype=stats, device=h.device) if ctx.needs_input_grad[0] else None
            grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
            width = w.shape[1] + EXTRA  # the weight block's copy with the extra columns is part of the budget
            bytes_per_column = n * (2 * stats.itemsize + ctx.dtype.itemsize) + width * w.element_size()
            cols = chunk_length(ctx.memory_mib, bytes_per_column)
            if cols > 128:
                cols -= cols % 128
            # h | -lse*T in 3 parts | 0 ... : times [w | 1 1 1 | 0 ...] and alpha = 1/T gives z / T - lse = log p
            shift = split_into_parts(-lse / inv_t, ctx.dtype)
            h_shifted = torch.cat([h, shift, h.new_zeros(n, EXTRA - shift.shape[1])], 1)
            w_shifted = w.new_zeros(min(cols, vocab), width)
            w_shifted[:, w.shape[1]:w.shape[1] + shift.shape[1]] = 1
            token = torch.arange(n, device=h.device)
            for v in range(0, vocab, cols):
                w_block = w[v:v + cols]
                w_aug = w_shifted[:w_block.shape[0]]
                w_aug[:, :w.shape[1]] = w_block
                log_p = scaled_matmul(h_shifted, w_aug.T, inv_t, stats)
                grad_z = torch.empty(log_p.shape, dtype=ctx.dtype, device=h.device)
                if b is None:
                    torch.mul(log_p.exp_(), a[:, None], out=grad_z)
                else:
                    p = torch.exp(log_p)
                    torch.mul(p, torch.addcmul(a[:, None], log_p, b[:, None], out=log_p), out=grad_z)
                col = targets - v
                hit = (col >= 0) & (col < grad_z.shape[1])
                col = col.clamp_(0, grad_z.shape[1] - 1)
                grad_z[token, col] = torch.where(hit, at_target, grad_z[token, col])
                if grad_weight is not None:
                    matmul(grad_z.T, h, weight.dtype, out=grad_weight[v:v + cols])
                if grad_hidden is not None:
                    if v == 0:
                        matmul(grad_z, w_block, stats, out=grad_hidden)
                    else:
                        accumulate_matmul(grad_hidden, grad_z, w_block)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None


def accumulate_matmul(acc, a, b) -> None:
    """acc += a @ b with acc as the GEMM's C (beta=1): no [tokens x hidden] product written and then read back.
    On CUDA, half-precision a, b and an fp32 acc need torch.addmm's out_dtype with an fp32 input, which older torch
    refuses ("self and mat2 must have the same dtype"); then the product is added in a pass, as grpo.py does."""
    global ACCUMULATE_FAILED
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, out=acc)
        return
    if a.is_cuda and not ACCUMULATE_FAILED:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError) as e:
            ACCUMULATE_FAILED = True
            print(f"logprob_candidate: addmm(fp32 input, out_dtype=fp32) failed ({str(e)[:100]}); adding in a pass",
                  file=sys.stderr)
    acc += matmul(a, b, acc.dtype)


def forward_over_chunks(ctx, hidden, weight, targets, inv_temperature, memory_mib, statistics, redo=None):
    """The forward of B and C: the GEMM writes a chunk's z / T (alpha), statistics(y, targets) makes its (lse,
    log p(target), entropy); rows that redo(lse, entropy) marks are computed again with the max shift."""
    ctx.set_materialize_grads(False)
    dtype = gemm_dtype(hidden)
    stats = torch.promote_types(dtype, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        n, vocab = h.shape[0], w.shape[0]
        logp, entropy, lse = (torch.empty(n, dtype=stats, device=h.device) for _ in range(3))
        rows = chunk_length(memory_mib, bytes_per_item=2 * vocab * stats.itemsize)  # z / T and one more
        for s in range(0, n, rows):
            y = scaled_matmul(h[s:s + rows], w.T, inv_temperature, stats)
            lse[s:s + rows], logp[s:s + rows], entropy[s:s + rows] = statistics(y, targets[s:s + rows])
        outside = redo(lse, entropy).nonzero().squeeze(1) if redo is not None else []  # the one host sync
        for s in range(0, len(outside), rows):
            index = outside[s:s + rows]
            y = scaled_matmul(h[index], w.T, inv_temperature, stats)
            lse[index], logp[index], entropy[index] = shifted_statistics(y, targets[index])
    ctx.save_for_backward(hidden, weight, targets, logp, entropy, lse)
    ctx.inv_temperature, ctx.memory_mib, ctx.dtype = inv_temperature, memory_mib, dtype
    return logp, entropy


def softmax_statistics(y, targets):
    """B: one read finds each row's max and its column, p = softmax(y) is one kernel, lse = max - log p(argmax) (p
    there is at least 1/vocab: no underflow), H = lse - sum p y."""
    top, column = y.max(1)
    p = torch.softmax(y, 1)
    lse = top - p.gather(1, column[:, None]).squeeze(1).log()
    return lse, y.gather(1, targets[:, None]).squeeze(1) - lse, lse - torch.bmm(p[:, None, :], y[:, :, None]).view(-1)


def unshifted_statistics(y, targets):
    """C: e = exp(y) with no shift, lse = log sum e, H = lse - sum e y / sum e."""
    e = torch.exp(y)
    total = e.sum(1)
    lse = total.log()
    entropy = lse - torch.bmm(e[:, None, :], y[:, :, None]).view(-1) / total
    return lse, y.gather(1, targets[:, None]).squeeze(1) - lse, entropy


def outside_fp32_range(lse, entropy):
    """C's rows to redo: a sum of exp(z / T) beyond e^80 (a term may have overflowed) or below e^-60 (denormal)."""
    return (lse <= -60) | (lse >= 80) | ~entropy.isfinite()


def shifted_statistics(y, targets):
    """grpo.py's forward on one chunk: y - max, its exp, their sum and sum e (y - max)."""
    top = y.amax(1, keepdim=True)
    e = torch.exp(y.sub_(top))
    log_total = e.sum(1).log()
    entropy = log_total - torch.bmm(e[:, None, :], y[:, :, None]).view(-1) / log_total.exp()
    return log_total + top.squeeze(1), y.gather(1, targets[:, None]).squeeze(1) - log_total, entropy


class SoftmaxForwardLogprobEntropy(ShiftInGemmLogprobEntropy):
    """Candidate B: A's backward, and a forward that leaves the shift, exp and sum to torch's fused softmax kernel
    (no broadcast op)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature: float, memory_mib: float):
        return forward_over_chunks(ctx, hidden, weight, targets, inv_temperature, memory_mib, softmax_statistics)


class UnshiftedForwardLogprobEntropy(ShiftInGemmLogprobEntropy):
    """Candidate C: A's backward, and a forward without the max shift. exp(z / T) needs no shift while the row's sum
    stays well inside fp32's range (e^-60 to e^80: no overflow of a term or of the sum, no denormal sum), which a
    policy's logits at a usual temperature keep (|z| < 48 at T = 0.6). Then the GEMM writes z / T (alpha), and exp,
    sum and the dot sum e (z / T) follow: 4 reads + 1 write against 6 + 2, and no max. Rows outside that range are
    found with one host sync per forward and recomputed with the shift (rare: a flag for them, not an error)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature: float, memory_mib: float):
        return forward_over_chunks(ctx, hidden, weight, targets, inv_temperature, memory_mib, unshifted_statistics,
                                   redo=outside_fp32_range)


class UnshiftedForwardOnlyLogprobEntropy(ChunkedLogprobEntropy):
    """Candidate D: C's forward with grpo.py's backward, to time the forward's change apart from A's backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature: float, memory_mib: float):
        return UnshiftedForwardLogprobEntropy.forward(ctx, hidden, weight, targets, inv_temperature, memory_mib)


def logprobs_and_entropy(hidden, weight, targets, temperature: float = 1.0, memory_mib: float = 1024):
    """Candidate A."""
    return ShiftInGemmLogprobEntropy.apply(hidden, weight, targets, 1.0 / temperature, memory_mib)


def logprobs_and_entropy_b(hidden, weight, targets, temperature: float = 1.0, memory_mib: float = 1024):
    """Candidate B."""
    return SoftmaxForwardLogprobEntropy.apply(hidden, weight, targets, 1.0 / temperature, memory_mib)


def logprobs_and_entropy_c(hidden, weight, targets, temperature: float = 1.0, memory_mib: float = 1024):
    """Candidate C."""
    return UnshiftedForwardLogprobEntropy.apply(hidden, weight, targets, 1.0 / temperature, memory_mib)


def logprobs_and_entropy_d(hidden, weight, targets, temperature: float = 1.0, memory_mib: float = 1024):
    """Candidate D."""
    return UnshiftedForwardOnlyLogprobEntropy.apply(hidden, weight, targets, 1.0 / temperature, memory_mib)
