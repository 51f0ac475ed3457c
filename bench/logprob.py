"""Time and peak memory of the LM-head log-prob (+ entropy) forward+backward at Qwen2.5-Math-1.5B's head. Not a test.

Head: hidden 1536, vocab 151936, temperature 0.6 (the paper's); gradients flow to both the hidden states and the
weight (tied embeddings are trained). Methods, each one forward+backward:
  ours            grpo.logprobs_and_entropy, loss = (logp * g1 + entropy * g2).sum()
  ours (logp only) the same Function, loss = (logp * g1).sum() (the entropy is only logged: its backward is skipped)
  naive           log_softmax((hidden @ weight.T).float() / T) over the full [tokens x vocab] tensor, same loss
  GEMM floor      the three matmuls alone: hidden @ W.T, grad @ W, grad.T @ hidden
  Liger FLCE      liger_kernel's LigerFusedLinearCrossEntropyLoss(reduction="none"), log-prob only (if installed)
Time: median of --reps runs after a warm-up (on CPU the warm-up is a 64-token run: a full one costs as much as a
rep). Memory: peak growth over the inputs (grads included): CUDA max_memory_allocated; CPU peak RSS (ru_maxrss) in
a fresh subprocess per case. Exactness: max |logp - reference| and max |entropy - reference|, the reference being
log_softmax of the fp32 logits of the same (bf16) inputs, row-chunked, under no_grad.
--passes counts, instead, how many times ours reads and writes [tokens x vocab]-sized memory (fp32, on CPU).
--gradients checks, instead, each fused method's gradients against fp32 autograd (the table checks values only).

    python bench/logprob.py --device cpu                        # tokens 256,1024, fp32, 1 rep: a few minutes
    python bench/logprob.py                                     # GPU: tokens 8192,32768,65536, bf16, 5 reps
    python bench/logprob.py --passes                            # memory traffic of ours, counted op by op
    python bench/logprob.py --gradients --tokens 4096          # gradients against fp32 autograd (GPU: ~10 GiB)
"""
import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo import logprobs_and_entropy  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

HIDDEN, VOCAB, T = 1536, 151936, 0.6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fused(function, entropy_in_loss: bool):
    """A case for a fused function: loss = (logp * g1 + entropy * g2).sum(), or (logp * g1).sum() when the entropy
    is only logged (its backward terms are then skipped)."""
    def case(h, w, t, g1, g2, memory_mib):
        logp, entropy = function(h, w, t, T, memory_mib)
        ((logp * g1).sum() + ((entropy * g2).sum() if entropy_in_loss else 0)).backward()
        return logp, entropy
    return case


def naive(h, w, t, g1, g2, memory_mib):
    logp_all = torch.log_softmax((h @ w.T).float() / T, -1)
    logp = logp_all.gather(1, t[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (logp * g1 + entropy * g2).sum().backward()
    return logp, entropy


@torch.no_grad()
def gemm_floor(h, w, t, g1, g2, memory_mib):
    z = h @ w.T  # stands in for the gradient of the logits in the two backward matmuls
    z @ w, z.T @ h
    return None, None


def liger(h, w, t, g1, g2, memory_mib):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    out = LigerFusedLinearCrossEntropyLoss(reduction="none")(w, h / T, t)  # logits / T == (h / T) @ W.T
    logp = -(out[0] if isinstance(out, tuple) else out)
    (logp * g1).sum().backward()
    return logp, None


CASES = {"ours": fused(logprobs_and_entropy, True), "ours (logp only)": fused(logprobs_and_entropy, False),
         "naive": naive, "GEMM floor": gemm_floor, "Liger FLCE": liger}
# rows that report the exactness column
CHECKED = {"ours", "Liger FLCE"}


@torch.no_grad()
def reference(h, w, t, rows=2048):
    """log p(target) and entropy from fp32 logits of the same inputs (the inputs' own rounding is not an error)."""
    logp, entropy = [], []
    for s in range(0, len(h), rows):
        log_p = torch.log_softmax(h[s:s + rows].float() @ w.float().T / T, -1)
        logp.append(log_p.gather(1, t[s:s + rows, None]).squeeze(1))
        entropy.append(-(log_p.exp() * log_p).sum(-1))
    return torch.cat(logp), torch.cat(entropy)


def tokens(n, dtype, device):
    h = torch.randn(n, HIDDEN, dtype=dtype, device=device).requires_grad_()
    t = torch.randint(VOCAB, (n,), device=device)
    return h, t, torch.randn(n, device=device), torch.randn(n, device=device)


def run_case(name, n, args):
    """{'ms': median time, 'bytes': peak extra memory, 'diff': exactness or None}, in this process."""
    device, dtype, cuda = torch.device(args.device), DTYPES[args.dtype], args.device == "cuda"
    torch.manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN, dtype=dtype, device=device).mul_(0.05).requires_grad_()  # logits' std ~ 2
    big = tokens(n, dtype, device)
    warm = big if cuda else tokens(min(n, 64), dtype, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, peak = [], 0
    for i in range(args.reps + 1):
        h, t, g1, g2 = warm if i == 0 else big
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            mem_before = torch.cuda.memory_allocated()
        sync()
        start = time.perf_counter()
        logp, entropy = CASES[name](h, w, t, g1, g2, args.memory_mib)
        sync()
        if i > 0:
            times.append(time.perf_counter() - start)
            if cuda:
                peak = max(peak, torch.cuda.max_memory_allocated() - mem_before)
        h.grad = w.grad = None
    if not cuda:  # ru_maxrss is in KiB on Linux; the 64-token warm-up peaks lower than the measured runs
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    diff = entropy_diff = None
    if name in CHECKED:
        ref_logp, ref_entropy = reference(big[0].detach(), w.detach(), big[1])
        diff = (logp.detach() - ref_logp).abs().max().item()
        if entropy is not None:
            entropy_diff = (entropy.detach() - ref_entropy).abs().max().item()
    return {"ms": statistics.median(times) * 1e3, "bytes": peak, "diff": diff, "entropy_diff": entropy_diff}


def run_isolated(name, n, args):
    """CPU: one case in a fresh subprocess, so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--one-case", name, "--tokens", str(n), "--device", args.device,
           "--dtype", args.dtype, "--memory-mib", str(args.memory_mib), "--reps", str(args.reps)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode == 0:
        return json.loads(p.stdout.strip().splitlines()[-1])
    if p.returncode == -9 or "memory" in p.stderr.lower():
        return "OOM"
    return "error: " + (p.stderr.strip().splitlines() or ["?"])[-1][:80]


def measure(name, n, args):
    if name == "Liger FLCE" and importlib.util.find_spec("liger_kernel") is None:
        return "not installed"
    if args.device == "cpu":
        return run_isolated(name, n, args)
    try:
        return run_case(name, n, args)
    except torch.OutOfMemoryError:
        return "OOM"
    except Exception as e:  # e.g. an incompatible liger_kernel
        return f"error: {type(e).__name__}: {str(e)[:80]}"
    finally:
        torch.cuda.empty_cache()


class CountPasses(TorchDispatchMode):
    """Adds up the bytes that each non-GEMM op reads and writes in the [chunk x vocab] temporaries: tensors of at
    least `big` elements whose last dimension is not the hidden size (so not the weight or the hidden states)."""
    NO_TRAFFIC = ("view", "slice", "t.", "transpose", "permute", "unsqueeze", "squeeze", "select", "as_strided",
                  "expand", "detach", "alias", "empty", "new_empty", "new_zeros", "gather", "index", "_index_put_impl_",
                  "clamp")

    def __init__(self, big):
        super().__init__()
        self.big, self.read, self.written, self.gemm_written = big, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__) + "."
        sized = lambda xs: sum(x.numel() * x.element_size() for x in xs
                               if isinstance(x, torch.Tensor) and x.numel() >= self.big and x.shape[-1] != HIDDEN)
        outputs = out if isinstance(out, (tuple, list)) else [out]
        if name.startswith(("mm.", "addmm.")):
            self.gemm_written += sized(outputs)
        elif not name.startswith(self.NO_TRAFFIC):
            self.read += sized(list(args) + [v for k, v in (kwargs or {}).items() if k != "out"])
            self.written += sized(outputs)
        return out


def count_passes(args):
    """Memory traffic of ours, in passes over an fp32 [tokens x vocab] tensor (each ~6 ms at 32k tokens on an H100)."""
    n = args.tokens[0]
    h, t, g1, g2 = tokens(n, torch.float32, "cpu")
    w = torch.randn(VOCAB, HIDDEN).mul_(0.05).requires_grad_()
    one_pass = n * VOCAB * 4
    print(f"tokens {n}, vocab {VOCAB}, fp32 on CPU (on a GPU under bf16 autocast dL/dz is written in bf16: half)\n")
    print("| method | phase | reads | writes | GEMM output writes |")
    print("|---|---|---:|---:|---:|")
    for name in ("ours", "ours (logp only)"):
        h.grad = w.grad = None
        with CountPasses(big=2**20) as fwd:
            logp, entropy = logprobs_and_entropy(h, w, t, T, args.memory_mib)
            loss = (logp * g1).sum() + ((entropy * g2).sum() if "logp only" not in name else 0)
        with CountPasses(big=2**20) as bwd:
            loss.backward()
        for phase, c in (("forward", fwd), ("backward", bwd)):
            print(f"| {name} | {phase} | {c.read / one_pass:.2f} | {c.written / one_pass:.2f} | "
                  f"{c.gemm_written / one_pass:.2f} |")


def check_gradients(args):
    """Gradients of each fused method against fp32 autograd through log_softmax of the same (rounded) inputs: the
    timing table checks values only, and a GPU-only path (alpha, in-GEMM accumulation) could break a gradient alone.
    Errors are max abs differences divided by the reference gradient's max abs."""
    device, dtype, n = torch.device(args.device), DTYPES[args.dtype], args.tokens[0]
    torch.manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN, dtype=dtype, device=device).mul_(0.05).requires_grad_()
    h, t, g1, g2 = tokens(n, dtype, device)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    log_p = torch.log_softmax(h32 @ w32.T / T, -1)
    ref_logp, ref_entropy = log_p.gather(1, t[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1)
    (ref_logp * g1 + ref_entropy * g2).sum().backward()
    del log_p
    print(f"tokens {n}, {args.dtype}, {args.device}; loss = sum(g1 log p + g2 H); errors against fp32 autograd\n")
    print("| method | max abs log p error | max abs entropy error | grad hidden error (rel) | "
          "grad weight error (rel) |")
    print("|---|---:|---:|---:|---:|")
    for name in [m for m in args.methods.split(",") if m in CHECKED and m != "Liger FLCE"]:
        h.grad = w.grad = None
        try:
            logp, entropy = CASES[name](h, w, t, g1, g2, args.memory_mib)
        except Exception as e:  # one failing method must not hide the others' rows
            print(f"| {name} | error: {type(e).__name__}: {str(e)[:80]} | | | |", flush=True)
            continue
        rel = lambda grad, ref: ((grad.float() - ref).abs().max() / ref.abs().max()).item()
        print(f"| {name} | {(logp.detach() - ref_logp).abs().max().item():.1e} | "
              f"{(entropy.detach() - ref_entropy).abs().max().item():.1e} | {rel(h.grad, h32.grad):.1e} | "
              f"{rel(w.grad, w32.grad):.1e} |", flush=True)


def main():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--memory-mib", type=float, default=1024, help="ours: working memory of one chunk (MiB)")
    ap.add_argument("--methods", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--passes", action="store_true", help="count ours' memory passes instead of timing")
    ap.add_argument("--gradients", action="store_true", help="check the fused methods' gradients instead of timing")
    ap.add_argument("--reps", type=int, default=None, help="timed runs after the warm-up (default 5 cuda, 1 cpu)")
    ap.add_argument("--one-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    on_gpu = args.device == "cuda"
    args.tokens = [int(x) for x in (args.tokens or ("8192,32768,65536" if on_gpu else "256,1024")).split(",")]
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.reps = args.reps or (5 if on_gpu else 1)

    if args.passes:
        count_passes(args)
        return
    if args.gradients:
        check_gradients(args)
        return
    if args.one_case:
        print(json.dumps(run_case(args.one_case, args.tokens[0], args)))
        return

    device = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"LM head {HIDDEN} x {VOCAB}, T={T}, {args.dtype}, ours {args.memory_mib:g} MiB/chunk, {device}, torch "
          f"{torch.__version__}; time: median of {args.reps} after a warm-up\n")
    mem = "CUDA max_memory_allocated" if on_gpu else "peak RSS, fresh process"
    print(f"| tokens | method | time (ms) | x floor | x Liger | peak extra MiB ({mem}) | max abs logp error | "
          "max abs entropy error |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in args.tokens:
        results = {name: measure(name, n, args) for name in args.methods.split(",")}
        floor, liger_ms = results.get("GEMM floor"), results.get("Liger FLCE")
        for name, r in results.items():
            if isinstance(r, str):
                print(f"| {n} | {name} | {r} | | | | | |")
                continue
            ratio = f"{r['ms'] / floor['ms']:.2f}" if isinstance(floor, dict) else ""
            vs_liger = f"{r['ms'] / liger_ms['ms']:.2f}" if isinstance(liger_ms, dict) else ""
            diff = "" if r["diff"] is None else f"{r['diff']:.1e}"
            entropy_diff = "" if r["entropy_diff"] is None else f"{r['entropy_diff']:.1e}"
            print(f"| {n} | {name} | {r['ms']:,.1f} | {ratio} | {vs_liger} | {r['bytes'] / 2**20:,.0f} | {diff} | "
                  f"{entropy_diff} |", flush=True)


if __name__ == "__main__":
    main()
