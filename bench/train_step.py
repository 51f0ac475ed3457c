"""One training step of a randomly initialised Qwen2.5-Math-1.5B-shaped policy: time and peak GPU memory with
grpo.py's fused log-prob against a naive full-vocabulary log_softmax. Not a test; needs a GPU (no download: the
model is built from its config with random weights).

The step is grpo.py's: fp32 master weights, bf16 autocast, gradient checkpointing, AdamW; all --batch x --seq
tokens in one forward/backward, the first --prompt-len of each row being prompt (no log-prob), the rest response;
loss = -(advantage * log p) - 0.001 * entropy, mean over response tokens.

    python bench/train_step.py                    # 16 x 4096 tokens: ours, naive
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402

QWEN25_MATH_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)
T = 0.6


def ours(model, batch):
    return grpo.response_logprobs(model, batch, T, memory_mib=1024)


def naive(model, batch):
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    predicts_response = batch["response_mask"][:, 1:]
    logits = model.lm_head(hidden[:, :-1][predicts_response])
    log_p = torch.log_softmax(logits.float() / T, dim=-1)
    targets = batch["input_ids"][:, 1:][predicts_response]
    return log_p.gather(1, targets[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1)


def training_step(model, optimizer, batch, advantages, logprob_fn):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp, entropy = logprob_fn(model, batch)
    loss = -(advantages * logp).mean() - 0.001 * entropy.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--methods", default="ours,naive")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_MATH_15B)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)  # fp32 master weights, as grpo.py keeps them
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(config.vocab_size, (args.batch, args.seq), device="cuda")
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    response_mask[:, args.prompt_len:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response_mask}
    n_response = int(response_mask[:, 1:].sum())
    advantages = torch.randn(n_response, device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; Qwen2.5-Math-1.5B shape ({n_params / 1e9:.2f}B "
          f"parameters, random), {args.batch} x {args.seq} tokens, {n_response} response tokens through the LM head; "
          f"fp32 master weights + AdamW, bf16 autocast, gradient checkpointing, T={T}\n")
    print("| log-prob | step time (s) | peak GPU memory (GiB) | response tokens / s |")
    print("|---|---:|---:|---:|")
    for name in args.methods.split(","):
        fn = {"ours": ours, "naive": naive}[name]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            times = []
            for i in range(args.steps + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                training_step(model, optimizer, batch, advantages, fn)
                torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            print(f"| {name} | out of memory | > {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} | |",
                  flush=True)
            continue
        t = statistics.median(times)
        print(f"| {name} | {t:.2f} | {torch.cuda.max_memory_allocated() / 2**30:.1f} | {n_response / t:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
