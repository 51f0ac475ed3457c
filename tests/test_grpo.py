"""grpo.py: the fused log-prob, advantages, loss aggregation, learning, weight sync and resume."""
import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import grpo  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# ---- logprobs_and_entropy --------------------------------------------------------------------------------------
def reference_logprobs_and_entropy(hidden, weight, targets, temperature):
    log_p = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    return log_p.gather(1, targets[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1)


def random_problem(n=37, h=24, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(v, (n,), generator=g)
    return hidden, weight, targets, torch.randn(n, dtype=torch.float64, generator=g), \
        torch.randn(n, dtype=torch.float64, generator=g)


# Budgets that give 1 token x 1 vocab column per chunk, a few of each with remainders, and everything at once
# (37 tokens x 101 vocab in float64: 1616 bytes per forward row, 888 per backward column).
@pytest.mark.parametrize("memory_mib", [1e-9, 0.01, 0.05, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_logprob_matches_float64_reference_values_and_gradients(memory_mib, temperature):
    hidden, weight, targets, g_logp, g_entropy = random_problem()
    ref_logp, ref_entropy = reference_logprobs_and_entropy(hidden, weight, targets, temperature)
    (ref_logp @ g_logp + ref_entropy @ g_entropy).backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logp, entropy = grpo.logprobs_and_entropy(hidden, weight, targets, temperature, memory_mib=memory_mib)
    (logp @ g_logp + entropy @ g_entropy).backward()
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=1e-6, atol=1e-9)


def test_fused_logprob_gradient_without_entropy_term():
    hidden, weight, targets, g_logp, _ = random_problem(seed=1)
    ref_logp, _ = reference_logprobs_and_entropy(hidden, weight, targets, 0.7)
    (ref_logp @ g_logp).backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logp, entropy = grpo.logprobs_and_entropy(hidden, weight, targets, 0.7, memory_mib=0.01)
    (logp @ g_logp).backward()  # entropy only logged: its gradient is None and its work is skipped
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("memory_mib", [0.01, 1000.0])  # chunks of a few rows, and one chunk of all 40
def test_fused_logprob_saves_no_tokens_by_vocab_tensor(memory_mib):
    n, h, v = 40, 16, 300
    hidden, weight, targets, g_logp, g_entropy = random_problem(n, h, v)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logp, entropy = grpo.logprobs_and_entropy(hidden, weight, targets, 1.0, memory_mib=memory_mib)
    # tensors kept as ctx attributes bypass the hook: there must be none
    kept = [k for k, x in vars(logp.grad_fn).items() if isinstance(x, torch.Tensor)]
    assert not kept, f"tensors kept outside save_for_backward: {kept}"
    (logp @ g_logp + entropy @ g_entropy).backward()
    assert saved, "the hook saw nothing: the test would pass vacuously"
    # inputs (hidden, weight, targets) plus per-token statistics: far below one [tokens x vocab] tensor
    assert sum(saved) <= n * h + v * h + 4 * n, f"saved {sum(saved)} numbers: {saved}"


def test_fused_logprob_in_float32_is_close_to_float64():
    hidden, weight, targets, _, _ = random_problem()
    logp, entropy = grpo.logprobs_and_entropy(hidden.float(), weight.float(), targets, 0.6, memory_mib=0.003)
    ref_logp, ref_entropy = reference_logprobs_and_entropy(hidden, weight, targets, 0.6)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=1e-4, atol=1e-4)


# log-sum-exp of z / T for 8 of the 37 rows: a term overflows fp32 (e^120); the sum underflows to 0 (e^-120); the
# sum is denormal, finite but inexact (e^-95, below fp32's smallest normal e^-87.3)
@pytest.mark.parametrize("row_lse", [120.0, -120.0, -95.0])
def test_fused_logprob_redoes_rows_outside_fp32_range_with_the_max_shift(row_lse):
    """The forward skips the max shift; rows whose exp(z / T) would overflow (a sum above e^80) or whose sum would
    be denormal (below e^-60) must be found and computed again with it. A logit added to every vocabulary entry of
    a row changes nothing in its softmax but moves its log-sum-exp to row_lse."""
    hidden, weight, targets, g_logp, g_entropy = random_problem()
    with torch.no_grad():
        weight[:, 0] = 1.0  # the same in every vocabulary row: hidden[:, 0] adds to all of a row's logits
        hidden[:, 0] = 0.0
        lse = torch.logsumexp(hidden @ weight.T / 0.6, 1)
        hidden[::5, 0] = (row_lse - lse[::5]) * 0.6
    ref_logp, ref_entropy = reference_logprobs_and_entropy(hidden, weight, targets, 0.6)
    (ref_logp @ g_logp + ref_entropy @ g_entropy).backward()
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    logp, entropy = grpo.logprobs_and_entropy(h32, w32, targets, 0.6, memory_mib=0.003)
    (logp @ g_logp.float() + entropy @ g_entropy.float()).backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=1e-4, atol=1e-4)
    # the rows' shift makes weight.grad[:, 0] ~370: fp32 errors are measured against each gradient's largest entry
    for grad, ref in ((h32.grad, hidden.grad), (w32.grad, weight.grad)):
        assert (grad.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


# ---- advantages and loss ---------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    std = torch.tensor([1.0, 0, 0, 0]).std().item()
    expected = torch.tensor([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0, 0, 0, 0])
    torch.testing.assert_close(grpo.group_advantages(rewards, 4), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, std_normalize=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


@pytest.mark.parametrize("mode,expected", [
    # two sequences of lengths 1 and 3 with per-token losses [1] and [2, 3, 4]; max length 5
    ("token-mean", (1 + 2 + 3 + 4) / 4),
    ("seq-mean-token-mean", (1 / 1 + (2 + 3 + 4) / 3) / 2),
    ("seq-mean-token-sum-norm", (1 / 5 + (2 + 3 + 4) / 5) / 2),
])
def test_loss_aggregation_by_hand(mode, expected):
    weights = grpo.token_weights([1, 3], mode, minibatch_tokens=4, minibatch_seqs=2, max_len=5)
    assert (weights * torch.tensor([1.0, 2, 3, 4])).sum().item() == pytest.approx(expected)


def test_clipped_surrogate_by_hand():
    args = grpo.Args(clip_low=0.2, clip_high=0.3)
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = grpo.policy_loss(logp, old, adv, torch.full((4,), 0.25), args)
    # ratio 1.5 clipped to 1.3 for A>0; 0.5 unclipped for A>0 (min picks 0.5); 1.1 for A<0; 0.7 clipped to 0.8 for A<0
    assert loss.item() == pytest.approx(-(1.3 + 0.5 - 1.1 - 0.8) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)


def test_low_var_kl_is_zero_at_equality_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.all(grpo.low_var_kl(logp, logp) == 0)
    assert torch.all(grpo.low_var_kl(logp, logp + torch.tensor([0.3, -0.4, 1.0])) > 0)


def test_low_var_kl_by_hand_and_the_loss_pulls_towards_the_reference():
    # k3 of KL(policy || reference) from a token sampled by the policy: r = log p_ref - log p_pol, exp(r) - r - 1.
    # The swapped direction (r = log p_pol - log p_ref) gives 0.0408 here, not 0.0499.
    assert grpo.low_var_kl(torch.tensor([-1.0]), torch.tensor([-0.7])).item() == pytest.approx(math.exp(0.3) - 1.3)
    args = grpo.Args(kl_coef=0.1)
    logp = torch.tensor([-1.0, -0.2], requires_grad=True)
    ref = torch.tensor([-0.7, -0.9])  # the reference likes the first token more, the second less
    loss, stats = grpo.policy_loss(logp, logp.detach(), torch.zeros(2), torch.full((2,), 0.5), args, ref_logp=ref)
    loss.backward()
    assert logp.grad[0] < 0 < logp.grad[1], "a descent step must move each log-prob towards the reference's"
    assert stats["kl"] == pytest.approx(((math.exp(0.3) - 1.3) + (math.exp(-0.7) - 0.3)) / 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return evaluation.load_model("tiny")


def fake_rollouts(tokenizer, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [tokenizer.encode(p["problem"]) for p in evaluation.toy_problems(n, seed=seed)]
    return [{"prompt_ids": p, "response_ids": torch.randint(5, 300, (int(torch.randint(2, 9, (1,), generator=g)),),
                                                             generator=g).tolist(),
             "engine_logprobs": [], "truncated": False} for p in prompts]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_equals_one_big_batch(tiny, mode):
    model, tokenizer = tiny
    rollouts = fake_rollouts(tokenizer)
    for r in rollouts:
        r["engine_logprobs"] = [0.0] * len(r["response_ids"])
    advantages = torch.linspace(-1, 1, len(rollouts))
    grads = []
    for micro in (8, 2, 3):
        m = type(model)(model.config)
        m.load_state_dict(model.state_dict())
        m.double().train()  # float64: the comparison is about the accumulation, not float32 summation order
        args = grpo.Args(mini_batch=8, micro_batch=micro, loss_agg=mode, max_grad_norm=1e9)
        optimizer = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: we only read the accumulated gradient
        optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradient for inspection
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        torch.manual_seed(0)
        grpo.update_policy(m, None, rollouts, advantages, optimizer, scheduler, args,
                           torch.autocast("cpu", enabled=False), tokenizer.pad_token_id, torch.device("cpu"))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-9, atol=1e-12)


def test_a_non_finite_gradient_skips_the_update_but_not_the_schedule(tiny, capsys):
    """The guard a bf16 run relies on: a NaN loss leaves the weights and AdamW's moments as they were, the scheduler
    still counts the step (so the schedule does not shift), and the step is reported as skipped."""
    model, tokenizer = tiny
    m = type(model)(model.config)
    m.load_state_dict(model.state_dict())
    rollouts = fake_rollouts(tokenizer)
    for r in rollouts:
        r["engine_logprobs"] = [0.0] * len(r["response_ids"])
    args = grpo.Args(mini_batch=8, micro_batch=4, lr_schedule="linear", lr=1.0)
    optimizer, scheduler = grpo.make_optimizer(m, args, total_updates=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    advantages = torch.linspace(-1, 1, 8)
    advantages[3] = float("nan")
    stats = grpo.update_policy(m, None, rollouts, advantages, optimizer, scheduler, args,
                               torch.autocast("cpu", enabled=False), tokenizer.pad_token_id, torch.device("cpu"))
    assert "update skipped" in capsys.readouterr().out and not optimizer.state, "AdamW took the step"
    assert math.isnan(stats["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert scheduler.last_epoch == 1 and all(p.grad is None for p in m.parameters())


def test_response_logprobs_skip_the_prompt(tiny):
    model, tokenizer = tiny
    rollouts = fake_rollouts(tokenizer, n=3)
    batch = grpo.collate(rollouts, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp, _ = grpo.response_logprobs(model, batch, 1.0, 4)
        full = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 -1)
    expected = torch.cat([full[i, len(r["prompt_ids"]) - 1:len(r["prompt_ids"]) + len(r["response_ids"]) - 1]
                          .gather(1, torch.tensor(r["response_ids"])[:, None]).squeeze(1)
                          for i, r in enumerate(rollouts)])
    assert logp.shape[0] == sum(len(r["response_ids"]) for r in rollouts)
    torch.testing.assert_close(logp, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.9), (1.0, 1.0)])
def test_hf_rollout_logprobs_equal_generates_own_scores(tiny, temperature, top_p):
    """eval.generate records each sampled token's log-prob as it goes; generate's output_scores, which keeps a
    [rows x vocab] tensor per token, must give the same tokens and the same log-probs."""
    model, tokenizer = tiny
    args = grpo.Args(temperature=temperature, top_p=top_p, samples_per_prompt=4, max_new_tokens=30)
    prompts = [tokenizer.encode(evaluation.build_prompt(p["problem"], tokenizer, args.template))
               for p in evaluation.toy_problems(3, seed=5)]
    stops = evaluation.stop_token_ids(tokenizer, model)
    rollouts = grpo.generate(None, model, tokenizer, [{"prompt_ids": p} for p in prompts], args, 0, 0)
    rows = [ids for ids in prompts for _ in range(4)]
    width = max(map(len, rows))
    torch.manual_seed((args.seed * 1_000_003 + 0) * 4096)  # the seed grpo.generate gives step 0 on rank 0
    out = model.generate(input_ids=torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows]),
                         attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
                         max_new_tokens=30, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, do_sample=True,
                         temperature=temperature, top_p=top_p, top_k=0, output_scores=True,
                         return_dict_in_generate=True)
    generated = out.sequences[:, width:]
    scores = torch.stack(out.scores, dim=1).float().log_softmax(-1).gather(-1, generated[..., None]).squeeze(-1)
    assert len({tuple(r["response_ids"]) for r in rollouts}) > 1
    for r, ids, lps in zip(rollouts, generated.tolist(), scores.tolist()):
        n = len(r["response_ids"])
        assert r["response_ids"] == ids[:n]
        assert r["engine_logprobs"] == pytest.approx(lps[:n], abs=1e-6)


class ReachedTheCollective(Exception):
    pass


def nccl_like_all_reduce(tensor, *args, **kwargs):
    """NCCL reduces only GPU tensors; a tensor on another device (meta, in the tests) ends the call here."""
    if tensor.device.type == "cpu":
        raise RuntimeError("No backend type associated with device type cpu")
    raise ReachedTheCollective(tensor.device)


def test_collectives_reduce_tensors_on_the_ranks_device(monkeypatch):
    """Under torchrun on GPUs the process group is NCCL's, which reduces only GPU tensors. A stand-in all_reduce
    that refuses CPU tensors as NCCL does, and a rank whose device is "meta" (the only non-CPU device a CPU machine
    has): each function's collective must get a tensor on that device. (Meta tensors hold no data, so the stand-in
    stops the function there.) The object collective (gather_from_ranks) places its own."""
    monkeypatch.setattr(grpo, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", nccl_like_all_reduce)
    meta = torch.device("meta")
    for call in (lambda: grpo.summed_over_ranks([3, 1], meta), lambda: grpo.micro_batches([0, 1, 2], 0, 2, meta)):
        with pytest.raises(ReachedTheCollective, match="meta"):
            call()


# ---- whole runs ------------------------------------------------------------------------------------------------


def read_metrics(output_dir):
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


def test_training_prompts_get_one_bos_where_the_chat_template_writes_it(tmp_path):
    """Llama 3's chat template writes <|begin_of_text|> and its tokenizer's encode adds another: one is kept."""
    from test_eval import llama_style_tokenizer
    tokenizer = llama_style_tokenizer()
    (tmp_path / "train.jsonl").write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    args = grpo.Args(train_data=str(tmp_path / "train.jsonl"), template="chat")
    prompts = grpo.tokenize_prompts(evaluation.load_problems(args.train_data), tokenizer, args)
    assert prompts[0]["prompt_ids"].count(tokenizer.bos_token_id) == 1, prompts[0]["prompt_ids"]


def test_the_readme_training_data_loads(tiny):
    """DSR-sub, the 1-shot paper's 1,209-problem set, has one row without an answer: it is dropped, not fatal."""
    dsr_sub = ROOT.parent / "shared" / "data" / "train" / "one_shot_rlvr" / "dsr_sub.jsonl"
    args = grpo.Args(train_data=str(dsr_sub), max_prompt_tokens=100_000)
    problems = grpo.tokenize_prompts(evaluation.load_problems(args.train_data), tiny[1], args)
    assert len(problems) == 1208 and all(p["prompt_ids"] and p["answer"] for p in problems)


@pytest.mark.slow
def test_default_run_learns(training_run):
    """The CartPole of the codebase: no arguments, the tiny model's reward climbs on the toy task."""
    rewards = [m["reward_mean"] for m in training_run("grpo")["metrics"] if "reward_mean" in m]  # not step 0
    tenth = max(1, len(rewards) // 10)
    first, last = sum(rewards[:tenth]) / tenth, sum(rewards[-tenth:]) / tenth
    print(f"reward first tenth {first:.3f}, last tenth {last:.3f}")
    assert first <= 0.4, f"the task is too easy at the start: {first:.3f}"  # step 0: ~0.25 (eval.build_tiny_model)
    assert last >= 0.8, f"the default run did not learn: {first:.3f} -> {last:.3f}"


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_continues_the_run_exactly(tmp_path, capsys):
    """Ctrl-C mid-run: a checkpoint at the step in progress, the --resume command printed, no traceback; resuming the
    run folder continues it in place, and the weights and metrics.jsonl (each step once, in order) equal an
    uninterrupted run's. With vLLM too where installed: its sampler is seeded per step and the trainer's random
    streams are restored after the engine starts (its start seeds them all)."""
    common = ["--rollout", "vllm" if HAS_VLLM else "hf", "--prompts-per-step", "4", "--mini-batch", "16",
              "--micro-batch", "8", "--eval-every", "3", "--eval-max-problems", "4", "--total-steps", "6",
              "--lr-schedule", "linear", "--warmup-steps", "1"]  # the scheduler's state must come back too
    grpo.main(grpo.parse_args([*common, "--output-dir", str(tmp_path / "straight")]))  # in this process: quicker
    run = tmp_path / "interrupted"
    child = subprocess.Popen([sys.executable, str(ROOT / "grpo.py"), *common, "--output-dir", str(run)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 2:  # step 0's evaluation and step 1
        assert child.poll() is None, child.stdout.read()[-3000:]
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    out = child.communicate(timeout=300)[0]
    assert child.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert f"--resume {run}" in out, out[-1000:]
    stopped = read_metrics(run)[-1]["step"]
    assert stopped < 6 and (run / f"checkpoint-{stopped}" / "trainer_state.pt").is_file()
    capsys.readouterr()
    grpo.main(grpo.parse_args(["--resume", str(run)]))
    assert "finished at step 6 of 6" in capsys.readouterr().out
    from safetensors.torch import load_file
    straight = load_file(tmp_path / "straight" / "checkpoint-6" / "model.safetensors")
    for k, v in load_file(run / "checkpoint-6" / "model.safetensors").items():
        assert torch.equal(straight[k], v), f"{k} differs after resume"
    steady = lambda folder: [{k: v for k, v in m.items() if not k.startswith(("time_", "tokens_per_s"))}
                             for m in read_metrics(folder)]
    assert [m["step"] for m in read_metrics(run)] == list(range(7)), "each step once, in order"
    assert steady(run) == steady(tmp_path / "straight"), "the resumed run logged other numbers"


# ---- vLLM rollouts ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_vllm_sampling_is_seeded_per_step_and_leaves_the_trainers_stream_alone(tiny):
    """Requests carry no seed (per-request seeds cost vLLM a Python loop per token): the engine samples from torch's
    generator, seeded per step inside eval.generate, then restored; copies of one prompt draw different responses."""
    model, tokenizer = tiny
    args = grpo.Args(rollout="vllm", samples_per_prompt=8)
    engine = grpo.make_rollout_engine(args, evaluation.resolve_model_path("tiny"), model)
    prompt = tokenizer.encode(evaluation.build_prompt(evaluation.toy_problems(1, seed=6)[0]["problem"], tokenizer,
                                                      args.template))
    responses = lambda step: [tuple(r["response_ids"]) for r in grpo.generate(engine, model, tokenizer,
                                                                              [{"prompt_ids": prompt}] * 3, args,
                                                                              step, 0)]
    torch.manual_seed(123)
    np.random.seed(123)
    trainer_stream, trainer_numpy = torch.get_rng_state(), np.random.get_state()[1].copy()
    step_5 = responses(5)
    assert torch.equal(torch.get_rng_state(), trainer_stream), "sampling moved the trainer's random stream"
    assert (np.random.get_state()[1] == trainer_numpy).all(), "sampling moved the trainer's numpy stream"
    assert responses(5) == step_5, "the same step must draw the same samples (a resumed run redraws them)"
    assert responses(6) != step_5
    groups = [step_5[i:i + 8] for i in range(0, 24, 8)]
    assert groups[0] != groups[1] and groups[1] != groups[2], "copies of one prompt drew the same responses"


# ---- vLLM weight sync ------------------------------------------------------------------------------------------
def untied_copy(tmp_path):
    model, tokenizer = evaluation.load_model("tiny")
    config = model.config
    config.tie_word_embeddings = False
    untied = type(model)(config)
    state = model.state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    untied.load_state_dict(state)
    untied.generation_config = model.generation_config
    untied.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
@pytest.mark.parametrize("tied", [True, False])
def test_vllm_greedy_equals_hf_greedy_after_a_training_step_and_push(tmp_path, tied):
    path = evaluation.resolve_model_path("tiny") if tied else untied_copy(tmp_path)
    model, tokenizer = evaluation.load_model(path)
    assert model.config.tie_word_embeddings == tied
    args = grpo.Args(rollout="vllm", lr=3e-2, mini_batch=16, micro_batch=16)
    engine = grpo.make_rollout_engine(args, path, model)
    rollouts = fake_rollouts(tokenizer, n=16, seed=3)
    optimizer, scheduler = grpo.make_optimizer(model, args, 10)
    model.train()
    grpo.update_policy(model, None, [dict(r, engine_logprobs=[0.0] * len(r["response_ids"])) for r in rollouts],
                       torch.linspace(-1, 1, 16), optimizer, scheduler, args, torch.autocast("cpu", enabled=False),
                       tokenizer.pad_token_id, torch.device("cpu"))
    grpo.push_weights(engine, model, args)
    prompts = [evaluation.build_prompt(p["problem"], tokenizer, "qwen-math-train")
               for p in evaluation.toy_problems(6, seed=4)]
    hf = [c[0]["token_ids"] for c in evaluation.generate(model, tokenizer, prompts, max_tokens=24)]
    vllm = [c[0]["token_ids"] for c in evaluation.generate(engine, tokenizer, prompts, max_tokens=24)]
    stale, _ = evaluation.load_model(path)
    before = [c[0]["token_ids"] for c in evaluation.generate(stale, tokenizer, prompts, max_tokens=24)]
    assert hf != before, "the training step did not change greedy outputs: the test cannot tell a missed push"
    assert vllm == hf


# ---- fidelity (issue 21) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.6])  # top-p 1: with top-p the recorder logs renormalised log-probs
def test_hf_rollouts_sample_from_the_policy_whatever_the_generation_config_says(tmp_path, temperature):
    """The recorder logs log-probs of the policy's distribution: a repetition penalty, an n-gram ban or a top-k from
    the checkpoint's generation_config.json would sample from another one and show as a logprob_gap."""
    from test_eval import penalised_tiny_copy
    model, tokenizer = evaluation.load_model(penalised_tiny_copy(tmp_path))
    args = grpo.Args(temperature=temperature, samples_per_prompt=4, max_new_tokens=40)
    prompts = [tokenizer.encode(evaluation.build_prompt(p["problem"], tokenizer, args.template))
               for p in evaluation.toy_problems(4, seed=5)]
    rollouts = grpo.generate(None, model, tokenizer, [{"prompt_ids": p} for p in prompts], args, 0, 0)
    with torch.no_grad():
        trainer = torch.cat(grpo.token_logprobs(model, rollouts, args, tokenizer.pad_token_id, "cpu"))
    engine = torch.tensor([lp for r in rollouts for lp in r["engine_logprobs"]])
    gap = (engine - trainer).abs()
    assert gap.max() < 1e-4, f"logprob_gap {gap.mean():.3g} (max {gap.max():.3g}): HF sampled off-policy"


def test_k3_kl_gradient_is_finite_for_a_token_the_reference_finds_100_nats_likelier():
    """exp(100) overflows fp32: without clamping the log-ratio first (verl clamps it to +-20) the clamped value's
    backward is 0 * inf = NaN, and one such token makes the whole step's gradient NaN."""
    logp = torch.tensor([-101.0, -1.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -101.0, -0.7])  # 100 nats above, 100 below, and an ordinary token
    loss, _ = grpo.policy_loss(logp, logp.detach(), torch.zeros(3), torch.full((3,), 1 / 3), grpo.Args(kl_coef=0.1),
                               ref_logp=ref)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), logp.grad
    assert logp.grad[2] == pytest.approx(0.1 / 3 * (1 - math.exp(-0.2)), rel=1e-5), "an ordinary token's gradient"


@pytest.mark.parametrize("script", ["grpo", "hapo", "one_shot", "pcl", "ppo"])
@pytest.mark.parametrize("attribute, value", [("final_logit_softcapping", 30.0), ("logits_scaling", 8.0),
                                              ("logit_scale", 0.0625)])
def test_a_model_whose_logits_the_fused_logprob_does_not_model_is_refused_before_anything_is_written(
        tmp_path, monkeypatch, script, attribute, value):
    """Gemma's soft-capping, Granite's and Cohere's scaling: vLLM would apply them, the trainer would not."""
    import importlib
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(evaluation.resolve_model_path("tiny"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, attribute: value}))
    module = importlib.import_module(script)

    def went_on(*args, **kwargs):
        raise AssertionError(f"{script} went on to read its data with {attribute} = {value}")
    monkeypatch.setattr(module, "tokenize_prompts", went_on)
    extra = ["--example-index", "0"] if script == "one_shot" else []
    args = module.parse_args(["--model", str(folder), "--rollout", "hf", "--output-dir", str(tmp_path / "out"),
                              *extra])
    with pytest.raises(SystemExit, match=f"config.{attribute} = {value}"):
        module.main(args)
    assert not (tmp_path / "out").exists()


def test_an_lm_head_bias_is_refused(tiny):
    model, _ = tiny
    grpo.check_lm_head(model)  # the tiny model's head is the fused log-prob's: accepted
    biased = type(model)(model.config)
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    with pytest.raises(SystemExit, match="lm_head.bias"):
        grpo.check_lm_head(biased)
