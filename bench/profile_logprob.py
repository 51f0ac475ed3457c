"""Where ours' time goes at 32k tokens on a GPU: torch.profiler's kernel table, and a few alternatives timed alone.
Not a test."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo import logprobs_and_entropy  # noqa: E402

N, D, V, T = 32768, 1536, 151936, 0.6


def timed(label, fn, reps=5):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    print(f"{label}: {(time.perf_counter() - start) / reps * 1e3:.2f} ms", flush=True)


def main():
    torch.manual_seed(0)
    h = torch.randn(N, D, dtype=torch.bfloat16, device="cuda").requires_grad_()
    w = torch.randn(V, D, dtype=torch.bfloat16, device="cuda").mul_(0.05).requires_grad_()
    t = torch.randint(V, (N,), device="cuda")
    g1, g2 = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")

    def step():
        logp, entropy = logprobs_and_entropy(h, w, t, T)
        (logp * g1 + entropy * g2).sum().backward()
        h.grad = w.grad = None
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print("## ours")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))

    rows, cols = 883, 3276
    z = torch.randn(rows, V, device="cuda")
    e = torch.randn(rows, V, device="cuda")
    timed("one fp32 pass (copy) [883 x V]", lambda: z.clone())
    timed("dot via bmm", lambda: torch.bmm(e[:, None, :], z[:, :, None]))
    timed("dot via (e*y).sum", lambda: (e * z).sum(1))
    timed("dot via linalg.vecdot", lambda: torch.linalg.vecdot(e, z))
    timed("dot via bmm, 16 segments per row", lambda: torch.bmm(e.view(rows * 16, 1, V // 16),
                                                              z.view(rows * 16, V // 16, 1)).view(rows, 16).sum(1))
    shift = z.amax(1, keepdim=True)
    timed("broadcast add in place (the shift)", lambda: torch.add(shift, z, alpha=1 / T, out=z))
    timed("scalar mul in place", lambda: z.mul_(1.0))
    timed("max with indices", lambda: z.max(1))
    timed("softmax", lambda: torch.softmax(z, 1))
    timed("log_softmax", lambda: torch.log_softmax(z, 1))
    e_bf16 = torch.empty(rows, V, device="cuda", dtype=torch.bfloat16)
    timed("exp fp32 -> bf16 out", lambda: torch.exp(z, out=e_bf16))
    timed("amax", lambda: z.amax(1))
    timed("exp", lambda: torch.exp(z))
    timed("sum", lambda: z.sum(1))
    timed("logsumexp", lambda: torch.logsumexp(z, 1))
    hb, wb = h.detach()[:rows], w.detach()
    timed("mm bf16 out [883 x V]", lambda: hb @ wb.T)
    timed("mm fp32 out [883 x V]", lambda: torch.mm(hb, wb.T, out_dtype=torch.float32))
    hc, wc = h.detach(), w.detach()[:cols]
    timed("mm bf16 out [N x 3276]", lambda: hc @ wc.T)
    timed("mm fp32 out [N x 3276]", lambda: torch.mm(hc, wc.T, out_dtype=torch.float32))
    cols = 3200
    h_aug, w_aug = torch.randn(N, D + 8, device="cuda").bfloat16(), torch.randn(cols, D + 8, device="cuda").bfloat16()
    zero = torch.zeros(1, 1, device="cuda", dtype=torch.bfloat16)
    timed("mm fp32 out [N x 3200], K=1536 (before #9)", lambda: torch.mm(hc, wc[:cols].T, out_dtype=torch.float32))
    timed("addmm alpha fp32 out [N x 3200], K=1544 (ours)",
          lambda: torch.addmm(zero, h_aug, w_aug.T, beta=0, alpha=1 / T, out_dtype=torch.float32))
    zb, lse = torch.randn(N, cols, device="cuda"), torch.randn(N, device="cuda")
    a, b = torch.randn(N, 1, device="cuda"), torch.randn(N, 1, device="cuda")
    timed("backward broadcast add [N x 3200] (lse, before #9)",
          lambda: torch.add(-lse[:, None], zb, alpha=1 / T, out=zb))
    timed("backward exp [N x 3200]", lambda: torch.exp(zb))
    timed("backward addcmul broadcast [N x 3200]", lambda: torch.addcmul(a, zb, b))
    gzb = torch.empty(N, cols, device="cuda", dtype=torch.bfloat16)
    timed("backward mul -> bf16 [N x 3200]", lambda: torch.mul(zb, zb, out=gzb))
    gz = torch.randn(N, cols, device="cuda").bfloat16()
    wb = wc[:cols]
    timed("grad_W block gz.T @ h [3200 x D]", lambda: gz.T @ hc)
    timed("grad_h block gz @ w_b fp32 out", lambda: torch.mm(gz, wb, out_dtype=torch.float32))
    timed("grad_h block gz @ w_b bf16 out", lambda: gz @ wb)
    grad_h = torch.zeros(N, D, device="cuda")
    timed("grad_h += (gz @ w_b, fp32 out) (before #9)", lambda: grad_h.add_(torch.mm(gz, wb, out_dtype=torch.float32)))
    try:  # older torch refuses an fp32 input beside bf16 matrices
        timed("grad_h addmm in place, fp32 input and out (ours)",
              lambda: torch.addmm(grad_h, gz, wb, out_dtype=torch.float32, out=grad_h))
    except RuntimeError as e:
        print(f"grad_h addmm in place: {str(e)[:120]}")


if __name__ == "__main__":
    main()
