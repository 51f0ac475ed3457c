"""ppo.py: GAE, whitening, the value loss, per-token rewards, the critic's alignment, learning, warm-up and resume."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import ppo  # noqa: E402


# ---- GAE -------------------------------------------------------------------------------------------------------
def test_gae_by_hand():
    # row 0: 3 tokens, outcome 1 on the last; row 1: 2 tokens, outcome 0, then one padded slot holding junk
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 7.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.8], [0.3, 0.2, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # gamma = lambda = 1: A_t = (sum of rewards from t) - V(s_t), R_t = the outcome
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.4, 0.2], [-0.3, -0.2, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    # gamma 0.9, lambda 0.5, row 0: deltas 0.9*0.6-0.5 = 0.04, 0.9*0.8-0.6 = 0.12, 1-0.8 = 0.2; gamma*lambda = 0.45
    #   A_2 = 0.2, A_1 = 0.12 + 0.45*0.2 = 0.21, A_0 = 0.04 + 0.45*0.21 = 0.1345
    # row 1: deltas 0.9*0.2-0.3 = -0.12, 0-0.2 = -0.2 (terminal after the last token): A_1 = -0.2, A_0 = -0.21
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    expected = torch.tensor([[0.1345, 0.21, 0.2], [-0.21, -0.2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.tensor([[0.6345, 0.81, 1.0], [0.09, 0.0, 0.0]], dtype=torch.float64))


def loop_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """The textbook sum A_t = sum_l (gamma*lam)^l delta_{t+l}, one response at a time, no padding anywhere."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) for t in range(n)]


def random_padded_batch(seed: int, rows: int = 6, width: int = 11):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g).tolist()
    lengths[0] = width  # one full row: no padding after it
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(rows, width, dtype=torch.float64, generator=g)
    values = torch.randn(rows, width, dtype=torch.float64, generator=g)
    return rewards, values, mask, lengths


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.7, 0.0), (1.0, 0.3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_a_per_response_loop_on_random_padded_data(gamma, lam, seed):
    rewards, values, mask, lengths = random_padded_batch(seed)
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected = torch.tensor(loop_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam),
                                dtype=torch.float64)
        torch.testing.assert_close(advantages[i, :n], expected, rtol=1e-12, atol=1e-12)
        assert torch.all(advantages[i, n:] == 0) and torch.all(returns[i, n:] == 0), "padding must stay 0"


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.5)])
def test_returns_are_advantages_plus_values_before_whitening(gamma, lam):
    rewards, values, mask, _ = random_padded_batch(3)
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(returns[mask], advantages[mask] + values[mask], rtol=0, atol=0)
    if lam == 1.0:  # Monte-Carlo: R_t = sum_{k>=t} gamma^(k-t) r_k, whatever the values
        for i in range(mask.shape[0]):
            r = rewards[i, mask[i]].tolist()
            mc = [sum(gamma ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))]
            torch.testing.assert_close(returns[i, mask[i]], torch.tensor(mc, dtype=torch.float64))


def test_padding_changes_nothing():
    """Whatever sits in padded slots (rewards, values) changes no advantage, return or whitened advantage."""
    rewards, values, mask, _ = random_padded_batch(4)
    junk_rewards, junk_values = rewards.clone(), values.clone()
    junk_rewards[~mask] = 1e3
    junk_values[~mask] = -1e3
    assert (~mask).any(), "no padding in the batch: the test would pass vacuously"
    a, r = ppo.gae(rewards, values, mask, 0.95, 0.9)
    a_junk, r_junk = ppo.gae(junk_rewards, junk_values, mask, 0.95, 0.9)
    torch.testing.assert_close(a_junk, a, rtol=0, atol=0)
    torch.testing.assert_close(r_junk, r, rtol=0, atol=0)
    junk_a = a.clone()
    junk_a[~mask] = 50.0
    torch.testing.assert_close(ppo.whiten(junk_a, mask), ppo.whiten(a, mask), rtol=0, atol=0)


def test_whiten_over_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    w = ppo.whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(w[mask], (valid - 2.5) / valid.std(), rtol=1e-7, atol=1e-7)
    assert torch.all(w[~mask] == 0)
    assert torch.all(ppo.whiten(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)) == 0), "constant -> 0, no nan"
    assert torch.all(ppo.whiten(x, torch.zeros(2, 3, dtype=torch.bool)) == 0), "no valid token -> 0, no nan"


def test_mask_truncated_whitens_over_the_kept_responses_only():
    """--mask-truncated drops the truncated responses from both losses, so they must not set the whitening's mean
    and variance, nor the logged value statistics: the kept responses get the advantages and statistics of the batch
    without the masked ones. (Truncated responses are long, failed and negative: left in, they shift every kept
    token's whitened advantage up.)"""
    g = torch.Generator().manual_seed(0)
    lengths, masked = [3, 5, 12, 2, 12, 4], [False, False, True, False, True, False]
    scores = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    rollouts = [{"response_ids": [7] * n, "masked": m} for n, m in zip(lengths, masked)]
    old_values = [torch.rand(n, generator=g) for n in lengths]
    args = ppo.Args(mask_truncated=True)
    advantages, returns, stats = ppo.advantages_and_returns(rollouts, scores, old_values, None, args)
    keep = [i for i, m in enumerate(masked) if not m]
    alone, alone_returns, alone_stats = ppo.advantages_and_returns(
        [rollouts[i] for i in keep], [scores[i] for i in keep], [old_values[i] for i in keep], None, args)
    for j, i in enumerate(keep):
        torch.testing.assert_close(advantages[i], alone[j], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(returns[i], alone_returns[j], rtol=0, atol=0)
    assert set(stats) == {"value_mean", "return_mean", "return_var", "explained_var"}, stats
    assert stats == pytest.approx(alone_stats, rel=1e-6)
    assert all(torch.isfinite(advantages[i]).all() for i in range(len(lengths))), "a filler row must stay finite"
    raw = ppo.advantages_and_returns(rollouts, scores, old_values, None, ppo.Args(whiten_advantages=False))[0]
    every_token = torch.cat(raw)
    shift = max(((a - every_token.mean()) / every_token.std() - alone[j]).abs().max().item()
                for j, a in enumerate(raw[i] for i in keep))
    assert shift > 0.1, f"whitening over every token gives nearly the same advantages ({shift}): the test is vacuous"


def test_token_rewards_put_the_outcome_on_the_last_token_and_the_kl_penalty_on_every_token():
    plain = ppo.token_rewards([1.0, 0.0], [3, 2])
    assert [r.tolist() for r in plain] == [[0.0, 0.0, 1.0], [0.0, 0.0]]
    kl = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.0])]
    with_kl = ppo.token_rewards([1.0, 0.0], [3, 2], kl, kl_coef=0.1)
    torch.testing.assert_close(with_kl[0], torch.tensor([-0.05, 0.1, 1.0 - 0.2]))
    torch.testing.assert_close(with_kl[1], torch.tensor([-0.1, 0.0]))


# ---- value loss ------------------------------------------------------------------------------------------------
def test_clipped_value_loss_by_hand():
    old = torch.zeros(4, dtype=torch.float64)
    values = torch.tensor([0.3, 1.0, -1.0, 0.2], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    loss, clip_frac = ppo.value_loss(values, old, returns, torch.full((4,), 0.25, dtype=torch.float64), clip=0.5)
    # token 0: inside the clip, 0.5*0.7^2; token 1: V=1 clipped to 0.5, max(0, 0.5^2) -> 0.5*0.25 (clipped wins);
    # token 2: V=-1 clipped to -0.5, max(1, 0.25) -> 0.5*1 (unclipped wins); token 3: 0.5*0.2^2
    assert loss.item() == pytest.approx((0.245 + 0.125 + 0.5 + 0.02) / 4)
    assert clip_frac == pytest.approx(0.25)
    loss.backward()
    # the clipped branch of token 1 is flat in V: no gradient pulls it further from its rollout-time value
    torch.testing.assert_close(values.grad, torch.tensor([-0.7, 0.0, -1.0, 0.2], dtype=torch.float64) * 0.25)


def test_explained_variance():
    returns = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert ppo.explained_variance(returns.clone(), returns) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full((4,), 0.5), returns) == pytest.approx(0.0)
    # residuals [-0.2, 0.2, 0.2, -0.2] have variance 0.16/3; returns have 1/3
    assert ppo.explained_variance(torch.tensor([0.2, 0.8, 0.8, 0.2]), returns) == pytest.approx(1 - 0.16)
    assert math.isnan(ppo.explained_variance(torch.zeros(4), torch.ones(4)))


# ---- the critic on the tiny model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = evaluation.load_model("tiny")
    torch.manual_seed(0)
    critic = ppo.load_critic(evaluation.resolve_model_path("tiny"), tokenizer, ppo.Args())
    return model, tokenizer, critic


def fake_rollouts(tokenizer, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [tokenizer.encode(p["problem"]) for p in evaluation.toy_problems(n, seed=seed)]
    return [{"prompt_ids": p, "response_ids": torch.randint(5, 300, (int(torch.randint(2, 9, (1,), generator=g)),),
                                                             generator=g).tolist(),
             "engine_logprobs": [], "truncated": False} for p in prompts]


def test_value_of_token_t_is_read_where_token_t_is_predicted(tiny):
    """V(s_t) comes from the hidden state at position t-1, the same one response_logprobs uses for token t."""
    _, tokenizer, critic = tiny
    rollouts = fake_rollouts(tokenizer, n=3)
    batch = ppo.collate(rollouts, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        values = ppo.response_values(critic, batch)
        critic.eval()  # the HF head's dropout, which response_values never applies
        per_position = critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., 0]
        critic.train()
    expected = torch.cat([per_position[i, len(r["prompt_ids"]) - 1:len(r["prompt_ids"]) + len(r["response_ids"]) - 1]
                          for i, r in enumerate(rollouts)])
    assert values.shape[0] == sum(len(r["response_ids"]) for r in rollouts)
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)


def test_values_do_not_depend_on_the_padding_of_the_batch(tiny):
    _, tokenizer, critic = tiny
    rollouts = fake_rollouts(tokenizer, n=6, seed=1)
    with torch.no_grad():
        together = ppo.token_values(critic, rollouts, ppo.Args(micro_batch=6), tokenizer.pad_token_id, "cpu")
        alone = ppo.token_values(critic, rollouts, ppo.Args(micro_batch=1), tokenizer.pad_token_id, "cpu")
    assert len({len(r["prompt_ids"]) + len(r["response_ids"]) for r in rollouts}) > 1, "no padding: vacuous"
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_critic_gradient_accumulation_equals_one_big_batch(tiny):
    _, tokenizer, critic = tiny
    rollouts = fake_rollouts(tokenizer, seed=2)
    g = torch.Generator().manual_seed(0)
    old_values = [torch.randn(len(r["response_ids"]), dtype=torch.float64, generator=g) * 0.1 for r in rollouts]
    returns = [torch.randn(len(r["response_ids"]), dtype=torch.float64, generator=g) for r in rollouts]
    grads = []
    for micro in (8, 2, 3):
        c = type(critic)(critic.config)
        c.load_state_dict(critic.state_dict())
        c.double().train()  # float64: the comparison is about the accumulation, not float32 summation order
        args = ppo.Args(mini_batch=8, micro_batch=micro, num_updates=1, critic_max_grad_norm=1e9)
        optimizer = torch.optim.SGD(c.parameters(), lr=0.0)  # lr 0: only the accumulated gradient is read
        optimizer.zero_grad = lambda set_to_none=True: None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        torch.manual_seed(0)
        ppo.update_critic(c, rollouts, old_values, returns, optimizer, scheduler, args,
                          torch.autocast("cpu", enabled=False), tokenizer.pad_token_id, torch.device("cpu"))
        grads.append(torch.cat([p.grad.flatten() for p in c.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_policy_gradient_accumulation_equals_one_big_batch(tiny, mode):
    model, tokenizer, _ = tiny
    rollouts = [dict(r, engine_logprobs=[0.0] * len(r["response_ids"])) for r in fake_rollouts(tokenizer, seed=3)]
    g = torch.Generator().manual_seed(1)
    advantages = [torch.randn(len(r["response_ids"]), dtype=torch.float64, generator=g) for r in rollouts]
    grads = []
    for micro in (8, 2, 3):
        m = type(model)(model.config)
        m.load_state_dict(model.state_dict())
        m.double().train()
        args = ppo.Args(mini_batch=8, micro_batch=micro, num_updates=1, loss_agg=mode, max_grad_norm=1e9)
        optimizer = torch.optim.SGD(m.parameters(), lr=0.0)
        optimizer.zero_grad = lambda set_to_none=True: None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        torch.manual_seed(0)
        ppo.update_policy(m, None, rollouts, advantages, optimizer, scheduler, args,
                          torch.autocast("cpu", enabled=False), tokenizer.pad_token_id, torch.device("cpu"))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-9, atol=1e-12)


# ---- memory: the reference only when needed, on the CPU if asked, gradient checkpointing ------------------------
class ReachedTheUpdate(Exception):
    pass


def reference_of_a_run(monkeypatch, tmp_path, *argv):
    """main up to its first update: the reference model it built (None without one) and eval.py's model loads."""
    loaded, seen = [], []
    real_load = evaluation.load_model
    monkeypatch.setattr(evaluation, "load_model", lambda path, **k: loaded.append(path) or real_load(path, **k))

    def first_update(reference, device, args):
        seen.append(reference)
        raise ReachedTheUpdate
    monkeypatch.setattr(ppo, "reference_on_device", first_update)
    monkeypatch.setattr(ppo, "CtrlC", lambda: None)  # pytest keeps its own Ctrl-C
    with pytest.raises(ReachedTheUpdate):
        ppo.main(ppo.parse_args([*SHORT, "--total-steps", "1", *argv, "--output-dir", str(tmp_path / "run")]))
    return seen[0], loaded


def test_no_reference_model_exists_when_kl_coef_is_0(monkeypatch, tmp_path):
    for argv in ([], ["--kl-in-loss"]):
        reference, loaded = reference_of_a_run(monkeypatch, tmp_path / str(len(argv)), *argv)
        assert reference is None and len(loaded) == 1, "a reference model was loaded although no KL term uses it"
    reference, loaded = reference_of_a_run(monkeypatch, tmp_path / "kl", "--kl-coef", "0.05", "--reference-on-cpu")
    assert len(loaded) == 2 and not reference.training
    assert not any(p.requires_grad for p in reference.parameters()), "the reference must be frozen"
    assert all(p.device.type == "cpu" for p in reference.parameters())


def frozen_reference():
    return evaluation.load_model(evaluation.resolve_model_path("tiny"))[0].eval().requires_grad_(False)


def test_reference_on_cpu_visits_the_device_and_keeps_its_cpu_weights(tiny):
    """--reference-on-cpu: the forward runs on the device, and afterwards the reference holds the very CPU tensors
    it held before, with its log-probs unchanged. model.to(device) and back would copy the frozen weights
    device-to-host into new memory every step (6 GB at 1.5B). The device is "meta", the only non-CPU device of a CPU
    machine, onto which model.to copies and from which it cannot copy back."""
    _, tokenizer, _ = tiny
    reference = frozen_reference()
    tensors = lambda: [*reference.named_parameters(remove_duplicate=False),  # noqa: E731
                       *reference.named_buffers(remove_duplicate=False)]
    before = {name: (t, t.untyped_storage().data_ptr()) for name, t in tensors()}
    rollouts, args, pad_id = fake_rollouts(tokenizer, n=4), ppo.Args(reference_on_cpu=True), tokenizer.pad_token_id
    with torch.no_grad():
        plain = ppo.token_logprobs(reference, rollouts, args, pad_id, "cpu")
    with ppo.reference_on_device(reference, torch.device("meta"), args):
        devices = {t.device.type for _, t in tensors()}
        tied = reference.lm_head.weight is reference.model.embed_tokens.weight
    assert devices == {"meta"} and tied, f"the forward would see weights on {devices} (tied: {tied})"
    assert reference.lm_head.weight is reference.model.embed_tokens.weight, "the tied weights came apart"
    for name, t in tensors():
        assert t is before[name][0] and t.untyped_storage().data_ptr() == before[name][1], \
            f"{name}: not the CPU tensor it held before the forward"
    with torch.no_grad(), ppo.reference_on_device(reference, torch.device("cpu"), args):
        visited = ppo.token_logprobs(reference, rollouts, args, pad_id, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(visited, plain)) and len(visited) == len(plain) == 4
    with ppo.reference_on_device(reference, torch.device("meta"), ppo.Args()):
        assert {t.device.type for _, t in tensors()} == {"cpu"}, "without --reference-on-cpu nothing is copied"


def test_a_copy_that_fails_midway_leaves_the_reference_whole_on_the_cpu(monkeypatch):
    """An out-of-memory error while the reference's weights are copied to the device: every module gets its CPU
    tensors back, the tied weights tied."""
    reference = frozen_reference()
    before = {name: t for name, t in reference.named_parameters(remove_duplicate=False)}
    copies, real_to = [], torch.Tensor.to

    def to_until_out_of_memory(t, *args, **kwargs):
        copies.append(1)
        if len(copies) == 10:
            raise torch.OutOfMemoryError("the device is full")
        return real_to(t, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to_until_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        with ppo.reference_on_device(reference, torch.device("meta"), ppo.Args(reference_on_cpu=True)):
            pass
    monkeypatch.undo()
    assert all(t is before[name] for name, t in reference.named_parameters(remove_duplicate=False))
    assert reference.lm_head.weight is reference.model.embed_tokens.weight


def saved_activation_bytes_and_grads(model, forward):
    """Bytes that autograd keeps for backward during `forward(model)`, and the gradient of its sum."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(model)
    model.zero_grad(set_to_none=True)
    out.sum().backward()
    return saved[0], torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_gradient_checkpointing_keeps_fewer_activations_and_the_same_gradients(tiny):
    """--gradient-checkpointing, for the policy and the critic: far fewer saved activations, equal gradients."""
    model, tokenizer, critic = tiny
    batch = ppo.collate(fake_rollouts(tokenizer, n=4, seed=5), tokenizer.pad_token_id, "cpu")
    forwards = {"policy": lambda m: ppo.response_logprobs(m, batch, 1.0, 1024)[0],
                "critic": lambda m: ppo.response_values(m, batch)}
    for name, base in (("policy", model), ("critic", critic)):
        plain, checkpointed = type(base)(base.config), type(base)(base.config)
        if name == "critic":  # as main builds them: the critic through load_critic, the policy's flag set inline
            checkpointed = ppo.load_critic(evaluation.resolve_model_path("tiny"), tokenizer,
                                           ppo.Args(gradient_checkpointing=True))
        else:
            checkpointed.gradient_checkpointing_enable()
            checkpointed.config.use_cache = False
        for m in (plain, checkpointed):
            m.load_state_dict(base.state_dict())
            m.double().train()
        assert checkpointed.is_gradient_checkpointing and not checkpointed.config.use_cache
        plain_bytes, plain_grad = saved_activation_bytes_and_grads(plain, forwards[name])
        ckpt_bytes, ckpt_grad = saved_activation_bytes_and_grads(checkpointed, forwards[name])
        print(f"{name}: saved activations {plain_bytes} -> {ckpt_bytes} bytes with checkpointing")
        assert ckpt_bytes < plain_bytes / 3, f"{name}: checkpointing saved little ({plain_bytes} -> {ckpt_bytes})"
        assert plain_grad.numel() == ckpt_grad.numel() == sum(p.numel() for p in base.parameters()), \
            f"{name}: some parameter got no gradient"
        torch.testing.assert_close(ckpt_grad, plain_grad, rtol=1e-10, atol=1e-12)


# ---- whole runs ------------------------------------------------------------------------------------------------
def run_script(*args):
    """`python ppo.py args`, in this process: an interpreter start and the imports cost more than a short run."""
    return ppo.main(ppo.parse_args(list(args)))


def read_metrics(output_dir):
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


def trained(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if m["step"] > 0]  # step 0 holds the evaluation before training


@pytest.mark.slow
def test_default_run_learns(training_run):
    """The CartPole of the codebase: no arguments, the tiny model's reward climbs on the toy task."""
    rewards = [m["reward_mean"] for m in trained(training_run("ppo")["metrics"])]
    start, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"reward first five steps {start:.3f}, last five {last:.3f}")
    assert start <= 0.4, f"the task is too easy at the start: {start:.3f}"  # step 0: ~0.25 (eval.build_tiny_model)
    assert last >= 0.85, f"the default run did not learn: {start:.3f} -> {last:.3f}"


@pytest.mark.slow
def test_default_run_critic_explains_the_returns(training_run):
    """The critic's values explain a good part of the returns' variance over the run. Steps are pooled by their
    return variance: once nearly every response is right, the returns hardly vary and one step's ratio is noise."""
    steps = [m for m in training_run("ppo")["metrics"] if "explained_var" in m]
    pooled = 1 - sum((1 - m["explained_var"]) * m["return_var"] for m in steps) / sum(m["return_var"] for m in steps)
    print(f"explained variance: first three steps {[round(m['explained_var'], 3) for m in steps[:3]]}, "
          f"whole run pooled {pooled:.3f}")
    assert pooled > 0.2, f"the critic does not predict the returns: pooled explained variance {pooled:.3f}"
    keys = {"value_loss", "value_clip_frac", "critic_grad_norm", "loss", "clip_frac", "entropy", "grad_norm",
            "logprob_gap", "value_mean", "return_mean", "return_var"}
    last = training_run("ppo")["metrics"][-1]
    assert keys <= set(last), f"missing metrics: {keys - set(last)}"


SHORT = ["--rollout", "hf", "--prompts-per-step", "4", "--mini-batch", "16", "--micro-batch", "8",
         "--eval-every", "0", "--eval-max-problems", "4"]


# the KL-in-reward path and the offload, too; a decaying learning rate (linear after one warm-up update, for the
# policy and the critic), so that a resume that forgot either scheduler's state would train with another one
RESUMABLE = SHORT + ["--kl-coef", "0.05", "--reference-on-cpu", "--lr-schedule", "linear", "--warmup-steps", "1",
                     "--total-steps", "4"]


@pytest.mark.slow
def test_ctrl_c_and_resume_equal_the_uninterrupted_run_for_policy_and_critic(tmp_path):
    """Ctrl-C mid-run saves the policy and the critic at the step in progress; resuming the run's folder continues in
    place and ends with the uninterrupted run's policy, critic, learning rates and metrics."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    run_script(*RESUMABLE, "--output-dir", str(straight))
    child = subprocess.Popen([sys.executable, str(ROOT / "ppo.py"), *RESUMABLE, "--output-dir", str(run)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 2:  # step 0's evaluation and step 1
        assert child.poll() is None, child.stdout.read()[-3000:]
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    out = child.communicate(timeout=300)[0]
    assert child.returncode == 0 and "Traceback" not in out, out[-3000:]
    stopped = read_metrics(run)[-1]["step"]
    assert stopped < 4 and (run / f"checkpoint-{stopped}" / "critic" / "optimizer").is_dir(), stopped
    run_script("--resume", str(run))
    from safetensors.torch import load_file
    for part in ("critic/model.safetensors", "model.safetensors"):  # the critic first: it moves apart first
        ends, resumed = load_file(straight / "checkpoint-4" / part), load_file(run / "checkpoint-4" / part)
        halfway = load_file(run / f"checkpoint-{stopped}" / part)
        assert any(not torch.equal(halfway[k], ends[k]) for k in ends), f"{part}: the steps after Ctrl-C did nothing"
        for k in ends:
            assert torch.equal(ends[k], resumed[k]), f"{part}: {k} differs after resume"
    steady = lambda folder: [{k: v for k, v in m.items() if not k.startswith(("time_", "tokens_per_s"))}  # noqa: E731
                             for m in read_metrics(folder)]
    assert [m["step"] for m in read_metrics(run)] == list(range(5)), "each step once, in order"
    assert steady(run) == steady(straight), "the resumed run logged other numbers"
    lrs = [m["lr"] for m in trained(read_metrics(straight))]
    # the rate of each step's first update: transformers' warmup from 0 (one update), then a linear decay; a restarted
    # scheduler would repeat a rate
    assert lrs[0] == 0 and lrs[1] > lrs[2] > lrs[3] > 0, f"not warmup, then decay: {lrs}"
    kls = [m["kl"] for m in trained(read_metrics(straight))]
    assert kls[0] == 0 and any(k != 0 for k in kls[1:]), f"the KL penalty is not measured: {kls}"


@pytest.mark.slow
def test_critic_warmup_leaves_the_policy_alone(tmp_path):
    # verl's critic_warmup 2: the policy trains once global_steps (from 1) reaches 2, so step 1 is the critic's alone
    run_script(*SHORT, "--total-steps", "2", "--critic-warmup-steps", "2", "--save-every", "1",
               "--kl-coef", "0.05", "--kl-in-loss", "--output-dir", str(tmp_path))
    from safetensors.torch import load_file
    initial = load_file(Path(evaluation.resolve_model_path("tiny")) / "model.safetensors")
    warm = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    after = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(initial[k], warm[k]) for k in initial), "the policy moved during the critic's warm-up"
    assert any(not torch.equal(initial[k], after[k]) for k in initial), "the policy never moved after the warm-up"
    critic = load_file(tmp_path / "checkpoint-1" / "critic" / "model.safetensors")
    assert any(not torch.equal(initial[k], critic[k]) for k in initial if k in critic), "the critic did not train"
    metrics = trained(read_metrics(tmp_path))
    assert "loss" not in metrics[0] and "loss" in metrics[1]
    assert "kl" in metrics[1], "the KL-in-loss form logs its KL"


def test_resuming_another_scripts_run_stops_with_one_line(tmp_path):
    """A GRPO run has no critic to continue from: resuming it with ppo.py says so in one line, before loading."""
    run = tmp_path / "grpo-run"
    (run / "checkpoint-2" / "optimizer").mkdir(parents=True)
    torch.save({"step": 2, "world_size": 1}, run / "checkpoint-2" / "trainer_state.pt")
    (run / "args.json").write_text(json.dumps({"std_normalize": True, "total_steps": 4}))
    out = subprocess.run([sys.executable, str(ROOT / "ppo.py"), "--resume", str(run)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode not in (0, None) and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert str(run) in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]


# ---- fidelity (issue 21) ---------------------------------------------------------------------------------------
def test_the_critic_takes_one_optimizer_step_per_critic_mini_batch(tiny):
    """The paper's code (verl) scales the actor's mini-batch by the samples per prompt and not the critic's: 128
    prompts x 8 samples make 1 policy step and 8 critic steps of 128 responses. Here 8 responses, 4 critic steps."""
    _, tokenizer, critic = tiny
    rollouts = fake_rollouts(tokenizer, seed=2)
    values = [torch.zeros(len(r["response_ids"])) for r in rollouts]
    c = type(critic)(critic.config)
    c.load_state_dict(critic.state_dict())
    optimizer = torch.optim.SGD(c.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    steps = []  # each optimizer step's gradient size: every step must have a gradient of its own
    optimizer.step = lambda: steps.append(sum(p.grad.abs().sum().item() for p in c.parameters()))
    ppo.update_critic(c, rollouts, values, [torch.ones_like(v) for v in values], optimizer, scheduler,
                      ppo.Args(mini_batch=8, critic_mini_batch=2, micro_batch=2), torch.autocast("cpu", enabled=False),
                      tokenizer.pad_token_id, torch.device("cpu"))
    assert len(steps) == 4 and scheduler.last_epoch == 4 and all(g > 0 for g in steps), steps


def test_critic_warmup_counts_steps_from_1_as_verl(tmp_path):
    """verl updates the actor when critic_warmup <= global_steps, global_steps counting from 1: a warm-up of 1 trains
    the policy at step 1 already (as 0 does), a warm-up of 2 leaves step 1 to the critic alone."""
    run_script(*SHORT, "--total-steps", "1", "--critic-warmup-steps", "1", "--output-dir", str(tmp_path))
    assert "loss" in trained(read_metrics(tmp_path))[0], "warm-up 1 kept the policy from training at step 1"
