"""Peak GPU memory of ppo.py's trainer (policy + critic + reference, two AdamWs) at Qwen2.5-Math-1.5B's shape. Not a
test: it prints a table for the README's memory notes.

Randomly initialised models of the 1.5B shape (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocabulary
151,936, tied embeddings), so nothing is downloaded. One rollout batch of `--micro-batch` rows x `--tokens` tokens
(prompt `--prompt-tokens` + response) goes through ppo.py's own functions, as in one training step with vLLM asleep:
old log-probs, reference log-probs, values (no grad), then update_critic and update_policy (one optimizer step each;
update_policy, grpo.py's, takes the old log-probs again, as ppo.py does with the KL in the rewards).
Two steps are run: AdamW allocates its moments at the first one, so the second one's peaks are the steady state.
Memory: torch.cuda.max_memory_allocated per phase (the CUDA context and allocator slack come on top; vLLM's share,
0.35 of the card by default, is asleep during the update and not part of this measurement).

    python bench/ppo_memory.py                                   # GPU: 1.5B shape, 8 x 4096 tokens, checkpointing
    python bench/ppo_memory.py --shape tiny --device cpu         # a smoke run of the script itself
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppo  # noqa: E402

SHAPES = {  # Qwen2.5-Math-1.5B's config.json, and a small one for a smoke run
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="1.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="prompt + response tokens per row")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--kl-coef", type=float, default=0.001, help="0: no reference model (as ppo.py)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--reference-on-cpu", action="store_true")
    cli = parser.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification
    device = torch.device(cli.device)
    on_gpu = device.type == "cuda"
    config = Qwen2Config(**SHAPES[cli.shape], tie_word_embeddings=True, max_position_embeddings=cli.tokens,
                         num_labels=1, pad_token_id=0)
    args = ppo.Args(micro_batch=cli.micro_batch, mini_batch=cli.micro_batch, kl_coef=cli.kl_coef,
                    reference_on_cpu=cli.reference_on_cpu, gradient_checkpointing=not cli.no_gradient_checkpointing,
                    max_new_tokens=cli.tokens - cli.prompt_tokens, lr=1e-6, critic_lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)
    memory = (lambda: torch.cuda.max_memory_allocated()) if on_gpu else (lambda: 0)
    rows = []

    def phase(name: str):
        rows.append((name, torch.cuda.memory_allocated() if on_gpu else 0, memory()))
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()

    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config).to(device).train()  # fp32 master weights, as ppo.py
    critic = Qwen2ForTokenClassification(config).to(device).train()
    reference = None
    if args.kl_coef > 0:
        reference = Qwen2ForCausalLM(config).eval().requires_grad_(False).to("cpu" if args.reference_on_cpu else device)
    for model in (policy, critic) if args.gradient_checkpointing else ():
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    optimizer, scheduler = ppo.make_optimizer(policy, args, 2)
    critic_args = ppo.dataclasses.replace(args, lr=args.critic_lr, weight_decay=args.critic_weight_decay)
    critic_optimizer, critic_scheduler = ppo.make_optimizer(critic, critic_args, 2)
    n_params = sum(p.numel() for p in policy.parameters())
    phase("models loaded")
    g = torch.Generator().manual_seed(0)
    rollouts = [{"prompt_ids": torch.randint(1, config.vocab_size, (cli.prompt_tokens,), generator=g).tolist(),
                 "response_ids": torch.randint(1, config.vocab_size, (cli.tokens - cli.prompt_tokens,),
                                               generator=g).tolist(), "truncated": False,
                 "engine_logprobs": [0.0] * (cli.tokens - cli.prompt_tokens)}
                for _ in range(cli.micro_batch)]
    lengths = [len(r["response_ids"]) for r in rollouts]
    for step in (1, 2):
        with torch.no_grad(), autocast, ppo.reference_on_device(reference, device, args):
            old_logp = ppo.token_logprobs(policy, rollouts, args, 0, device)
            ref_logp = ppo.token_logprobs(reference, rollouts, args, 0, device) if reference is not None else None
            old_values = [v.cpu() for v in ppo.token_values(critic, rollouts, args, 0, device)]
        phase(f"step {step}: old/ref log-probs, values")
        rewards = [float(i % 2) for i in range(len(rollouts))]
        kl = [(a - b).float().cpu() for a, b in zip(old_logp, ref_logp)] if ref_logp is not None else None
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(n, dtype=torch.bool) for n in lengths], batch_first=True)
        pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
        advantages, returns = ppo.gae(pad(ppo.token_rewards(rewards, lengths, kl, args.kl_coef)), pad(old_values),
                                      mask, args.gamma, args.lam)
        advantages = [a[:n] for a, n in zip(ppo.whiten(advantages, mask), lengths)]
        returns = [r[:n] for r, n in zip(returns, lengths)]
        ppo.update_critic(critic, rollouts, old_values, returns, critic_optimizer, critic_scheduler, args, autocast,
                          0, device)
        phase(f"step {step}: update_critic")
        ppo.update_policy(policy, None, rollouts, advantages, optimizer, scheduler, args, autocast, 0, device)
        phase(f"step {step}: update_policy")
    print(f"shape {cli.shape} ({n_params / 1e9:.3f}e9 parameters per model), device {device}"
          f"{' ' + torch.cuda.get_device_name() if on_gpu else ''}, micro-batch {cli.micro_batch} x {cli.tokens} "
          f"tokens, gradient checkpointing {args.gradient_checkpointing}, reference "
          f"{'none' if reference is None else 'cpu' if args.reference_on_cpu else 'on the device'}")
    resident = 24 + (4 if reference is not None and not args.reference_on_cpu else 0)
    print(f"arithmetic: {resident} B/param resident after the first step (policy and critic 4 weights + 8 AdamW "
          f"each{', reference 4' if resident == 28 else ''}) = {gib(resident * n_params)} GiB, plus 4 B/param "
          f"({gib(4 * n_params)} GiB) for one model's gradients during its update")
    print("| phase | allocated after (GiB) | peak during (GiB) |\n|---|---|---|")
    for name, allocated, peak in rows:
        print(f"| {name} | {gib(allocated)} | {gib(peak)} |")


if __name__ == "__main__":
    main()
