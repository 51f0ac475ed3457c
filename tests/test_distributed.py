"""grpo.py under torchrun (FSDP2 on the gloo backend, 2 CPU ranks): one step equals the single-process step on the
same batch, and a resumed 2-rank run equals an uninterrupted one.

The file is also the worker that torchrun starts (`python -m torch.distributed.run ... test_distributed.py
worker FOLDER`): sampling on 2 ranks cannot equal sampling in one process, so the step test feeds fixed rollouts
to the real update path (shard_model, update_policy, streamed_weights); the same launch then trains the whole runs
that the resume and vLLM tests read."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import grpo  # noqa: E402

HAS_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = pytest.mark.skipif(not HAS_GLOO, reason="torch.distributed with the gloo backend is not available")
PROMPTS, SAMPLES = 4, 4
# --mask-truncated's rows in the masked test: rank 0 keeps 7 responses (3 micro-batches of 3), rank 1 keeps 3 (1)
MASKED = {2, 9, 10, 11, 12, 13}
RANK_1_MASKED = set(range(8, 16))  # every response rank 1 holds: it only runs filler passes and logs nothing itself


# ---- the worker ------------------------------------------------------------------------------------------------
def fixed_batch(tokenizer, masked: set = frozenset()):
    """4 prompts x 4 responses; the last two prompts' responses are much longer, so rank 1 holds most tokens and a
    rank that divided by its own token count would weigh its tokens differently from the single process."""
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for p, problem in enumerate(evaluation.toy_problems(PROMPTS, seed=5)):
        prompt = tokenizer.encode(problem["problem"])
        for _ in range(SAMPLES):
            n = int(torch.randint(2, 6, (1,), generator=g)) + (12 if p >= PROMPTS // 2 else 0)
            rollouts.append({"prompt_ids": prompt, "response_ids": torch.randint(5, 300, (n,), generator=g).tolist(),
                             "engine_logprobs": [0.0] * n, "truncated": False,
                             "masked": len(rollouts) in masked})
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0])
    return rollouts, grpo.group_advantages(rewards, SAMPLES)


def one_training_step(local_counts: bool = False, masked: set = frozenset(), drop_masked: bool = False,
                      mini_batches: int = 1, micro_batch: int = 3) -> dict:
    """One update on the fixed batch (mini_batches optimizer steps), on however many ranks this process group has:
    full weights after it. drop_masked: the masked responses are left out of the batch instead (what masking must
    amount to)."""
    rank, world, device = grpo.init_distributed()
    # float64: the comparison is about the distribution, not float32 summation order (AdamW's first step is
    # about lr * sign(gradient), which turns rounding in a near-zero gradient into a visible weight difference)
    model, tokenizer = evaluation.load_model("tiny", dtype=torch.float64)
    reference = evaluation.load_model("tiny", dtype=torch.float64)[0].eval().requires_grad_(False)
    args = grpo.Args(mini_batch=PROMPTS * SAMPLES // mini_batches, micro_batch=micro_batch, kl_coef=0.05,
                     entropy_coef=0.01, lr=1e-3)
    if world > 1:
        model, reference = grpo.shard_model(model, device, world), grpo.shard_model(reference, device, world)
    if local_counts:  # the mistake the comparison must catch: each rank normalises by its own token count
        summed = grpo.summed_over_ranks  # (the maximum of the micro-batch counts still comes from every rank)
        grpo.summed_over_ranks = lambda counts, device, op=None: counts if op is None else summed(counts, device, op)
    optimizer, scheduler = grpo.make_optimizer(model, args, 1)
    rollouts, advantages = fixed_batch(tokenizer, masked)
    if drop_masked:
        kept = [i for i, r in enumerate(rollouts) if not r["masked"]]
        rollouts, advantages = [rollouts[i] for i in kept], advantages[kept]
    share = len(rollouts) // world
    mine = list(range(rank * share, (rank + 1) * share))  # whole groups: rank 0 the first prompts
    torch.manual_seed(rank)
    stats = grpo.update_policy(model, reference, [rollouts[i] for i in mine], advantages[mine], optimizer, scheduler,
                               dataclasses.replace(args, mini_batch=args.mini_batch // world),
                               torch.autocast("cpu", enabled=False), tokenizer.pad_token_id, device)
    return {"weights": {k: v.detach().clone() for k, v in grpo.streamed_weights(model)}, "stats": stats,
            "rank": rank, "most_held_in_push": most_held_in_push(model)}


class EngineCountingHeldWeights:
    """A stand-in vLLM engine whose weight reload counts how many of the tensors it was handed are still alive
    while it loads the next one (vLLM's loader copies each into its own weights and drops it)."""
    most_held = 0

    def collective_rpc(self, method, kwargs):
        handed = []
        for _, tensor in kwargs["weights_iterator"]:  # the one in hand counts too
            handed.append(weakref.ref(tensor))
            self.most_held = max(self.most_held, sum(ref() is not None for ref in handed))
            del tensor

    def reset_prefix_cache(self):
        pass


def most_held_in_push(model) -> int:
    engine = EngineCountingHeldWeights()
    grpo.push_weights(engine, model, grpo.Args())
    return engine.most_held


# the variants the tests compare with one process, all in one torchrun launch (a launch starts three interpreters)
STEPS = {"plain": {}, "rank-1-masked": {"masked": RANK_1_MASKED}, "masked": {"masked": MASKED},
         "two-mini-batches": {"mini_batches": 2}, "local-counts": {"local_counts": True}}  # local counts: the last


def whole_runs(root: Path) -> list[list[str]]:
    """grpo.py's command lines on 2 ranks: 4 steps with a checkpoint after 2 (root/straight); 2 steps, then resumed
    with --total-steps 4 (root/resumed); where vLLM is installed, 3 steps with an engine per rank (root/vllm)."""
    common = ["--rollout", "hf", "--prompts-per-step", "4", "--mini-batch", "16", "--micro-batch", "8",
              "--eval-every", "0", "--eval-max-problems", "4", "--save-every", "2",
              "--warmup-steps", "3"]  # lr 0, 1/3, 2/3, 1: a scheduler restarted by the resume would show
    runs = [[*common, "--total-steps", "4", "--output-dir", root / "straight"],
            [*common, "--total-steps", "2", "--output-dir", root / "resumed"],
            ["--resume", root / "resumed", "--total-steps", "4"]]
    if HAS_VLLM:  # at T = 0.6 the engine must report the log-probs of the tempered distribution it sampled from
        runs.append(["--rollout", "vllm", "--prompts-per-step", "4", "--mini-batch", "32", "--lr", "1e-2",
                     "--temperature", "0.6", "--total-steps", "3", "--eval-every", "0", "--eval-max-problems", "2",
                     "--output-dir", root / "vllm"])
    return [list(map(str, run)) for run in runs]


def worker(root: str) -> None:
    """Every variant of STEPS (root/steps.pt), then every run of whole_runs, in one torchrun launch (a launch starts
    three interpreters): the runs go through grpo.main as `torchrun grpo.py` would, in one process group."""
    joined = grpo.init_distributed()
    grpo.init_distributed = lambda: joined
    results = {name: one_training_step(**kwargs) for name, kwargs in STEPS.items()}
    if joined[0] == 0:
        torch.save(results, Path(root) / "steps.pt")
    leave, evaluation.leave_process_group = evaluation.leave_process_group, torch.distributed.barrier
    for argv in whole_runs(Path(root)):
        grpo.main(grpo.parse_args(argv))
    if not HAS_VLLM:  # a vLLM engine tears the process group down itself
        leave()


# ---- the tests -------------------------------------------------------------------------------------------------
def torchrun(*args, timeout=300):
    """2 ranks; a run that hangs (mismatched collectives) is killed with its workers and fails the test."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # a crash shows where
    with subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env=env) as run:
        try:
            stdout, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.terminate()  # torchrun stops its workers on SIGTERM (they run in sessions of their own)
            stdout, stderr = run.communicate(timeout=60)
            pytest.fail(f"torchrun ran past {timeout} s: {stdout[-2000:]}{stderr[-2000:]}")
    assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_statistics(two: dict, one: dict,
                           logged=("loss", "grad_norm", "entropy", "clip_frac", "kl", "logprob_gap")) -> None:
    """Every logged training statistic of the whole batch, not a rank's own share."""
    assert two.keys() == one.keys() and set(logged) <= one.keys(), (two.keys(), one.keys())
    for key in one:
        # 1e-6: policy_loss's clip fraction is a float32 mean
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-12), \
            f"{key}: 2 ranks {two[key]}, 1 process {one[key]}"


def test_logged_statistics_do_not_depend_on_the_micro_batch():
    """The loss of an optimizer step is its micro-batches' shares summed, the other statistics are per token: a
    memory setting must not rescale them (a mean of micro-batch shares logged a quarter of the loss at 4 of them)."""
    # two optimizer steps, so that the second one sees a KL and clipped ratios
    whole = one_training_step(mini_batches=2, micro_batch=8)["stats"]
    split = one_training_step(mini_batches=2, micro_batch=2)["stats"]
    assert whole["loss"] != 0 and whole["kl"] > 0 and whole["clip_frac"] > 0, whole
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-12), f"{key}: {split[key]} vs {whole[key]}"


@pytest.fixture(scope="module")
def two_ranks(launch):
    """{variant of STEPS: one_training_step's result on 2 ranks}."""
    return torch.load(launch / "steps.pt")


@pytest.fixture(scope="module")
def one_process():
    """one_training_step in this process, per variant of STEPS, computed once."""
    results = {}

    def step(name: str) -> dict:
        if name not in results:
            results[name] = one_training_step(**STEPS[name])
        return results[name]
    return step


@pytest.mark.slow
def test_a_rank_with_every_response_masked_trains_in_step_with_the_other(two_ranks, one_process):
    """Rank 1's 8 responses are all masked: it runs filler passes only and has no statistics of its own, yet logs
    the whole batch's, as one process does."""
    two, one = two_ranks["rank-1-masked"], one_process("rank-1-masked")
    assert_same_statistics(two["stats"], one["stats"])
    assert max_difference(two["weights"], one["weights"]) < 1e-9


@pytest.mark.slow
def test_one_step_on_two_ranks_equals_one_step_in_one_process(two_ranks, one_process):
    two, local, one = two_ranks["plain"], two_ranks["local-counts"], one_process("plain")
    before = dict(grpo.streamed_weights(evaluation.load_model("tiny", dtype=torch.float64)[0]))
    moved = max_difference(one["weights"], before)
    assert moved > 1e-4, f"the step moved the weights by only {moved}: the comparison could not fail"
    assert_same_statistics(two["stats"], one["stats"])
    # under FSDP a push gathers each weight when vLLM loads it: one full tensor at a time, not the whole model
    assert two["most_held_in_push"] == 1, f"{two['most_held_in_push']} gathered weights held at once"
    gap = max_difference(two["weights"], one["weights"])
    wrong = max_difference(local["weights"], one["weights"])
    print(f"step moved weights by {moved:.3g}; 2 ranks vs 1 process {gap:.3g}; per-rank counts vs 1 process "
          f"{wrong:.3g}")
    assert gap < 1e-9, f"2 ranks differ from 1 process by {gap} (the step moved weights by {moved})"
    assert local["stats"]["grad_norm"] != pytest.approx(one["stats"]["grad_norm"], rel=1e-3)
    assert wrong > 100 * max(gap, 1e-8), f"per-rank token counts went unnoticed: {wrong} vs {gap}"


@pytest.mark.slow
def test_masked_responses_on_two_ranks_equal_one_process(two_ranks, one_process):
    """--mask-truncated drops 5 of rank 1's 8 responses and 1 of rank 0's: rank 1 has one micro-batch to rank 0's
    three, and runs two filler passes (loss counted 0) to stay in step with FSDP's collectives."""
    two, one, unmasked = two_ranks["masked"], one_process("masked"), one_process("plain")
    changed = max_difference(one["weights"], unmasked["weights"])
    assert changed > 1e-4, f"masking changed the step by only {changed}: the comparison could not fail"
    assert_same_statistics(two["stats"], one["stats"])
    gap = max_difference(two["weights"], one["weights"])
    assert gap < 1e-9, f"2 ranks differ from 1 process by {gap} with masked responses"
    dropped = max_difference(one_training_step(masked=MASKED, drop_masked=True)["weights"], one["weights"])
    print(f"masked: 2 ranks vs 1 process {gap:.3g}; masked vs left out {dropped:.3g}; masking changed the step "
          f"by {changed:.3g}")
    assert dropped < 1e-9, f"masked responses still move the weights ({dropped}) in one process"


@pytest.mark.slow
def test_several_mini_batches_on_two_ranks_equal_one_process(two_ranks, one_process):
    """Two optimizer steps on the batch (mini-batches of 8 of its 16 responses): each step must train on the
    responses it trains on in one process, whichever rank holds them. Rank 0 holds the first two prompts' 8, rank 1
    the others, and one shuffle of all 16 decides the mini-batches: a rank may hold 3 of one and 5 of the next."""
    two, one, whole = two_ranks["two-mini-batches"], one_process("two-mini-batches"), one_process("plain")
    apart = max_difference(one["weights"], whole["weights"])
    assert apart > 1e-4, f"two steps moved the weights like one ({apart}): the comparison could not fail"
    assert_same_statistics(two["stats"], one["stats"])
    gap = max_difference(two["weights"], one["weights"])
    print(f"2 mini-batches: 2 ranks vs 1 process {gap:.3g}; 2 steps vs 1 step {apart:.3g}")
    assert gap < 1e-9, f"2 ranks differ from 1 process by {gap} with 2 mini-batches"


@pytest.mark.slow
def test_two_rank_resume_equals_uninterrupted_two_rank_run(launch):
    from safetensors.torch import load_file
    straight = load_file(launch / "straight" / "checkpoint-4" / "model.safetensors")
    halfway = load_file(launch / "straight" / "checkpoint-2" / "model.safetensors")
    resumed = load_file(launch / "resumed" / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(halfway[k], straight[k]) for k in straight), "steps 3-4 changed nothing"
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"{k} differs after resume"
    logged = lambda run, key: [json.loads(line).get(key) for line in open(launch / run / "metrics.jsonl")]
    assert logged("resumed", "reward_mean") == logged("straight", "reward_mean"), "the resumed run sampled others"
    assert logged("resumed", "lr") == logged("straight", "lr"), "the schedule did not come back"


@pytest.mark.slow
def test_two_rank_checkpoint_is_a_plain_hf_folder(launch):
    """Rank 0 writes the full model: eval.py (and vLLM) load it like a single-process checkpoint."""
    from safetensors.torch import load_file
    folder = launch / "straight" / "checkpoint-4"
    model, _ = evaluation.load_model(str(folder))
    saved = load_file(folder / "model.safetensors")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    for name, tensor in model.state_dict().items():
        key = "model.embed_tokens.weight" if name == "lm_head.weight" else name  # tied: stored once
        assert torch.equal(tensor, saved[key]), name


@pytest.mark.slow
def test_single_process_resume_of_a_two_rank_checkpoint_fails_clearly(launch, tmp_path):
    with pytest.raises(SystemExit, match="written by 2 rank"):
        grpo.main(grpo.parse_args(["--resume", str(launch / "straight")]))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_each_rank_vllm_engine_samples_from_the_trained_weights(launch):
    """One vLLM engine per rank (external_launcher), fed the weights gathered from the FSDP shards after every step.
    At lr 1e-2 an engine left with the old weights was measured 4.2 and 8.8 nats per token away from the trainer
    at steps 2 and 3 (push_weights replaced by a no-op); with the push, it stays at float32 rounding. (vLLM's raw
    log-probs, before the temperature of 0.6, would differ by far more than the bound below.)"""
    gaps = [json.loads(line)["logprob_gap"] for line in open(launch / "vllm" / "metrics.jsonl")
            if json.loads(line)["step"] > 0]  # step 0 only evaluates
    assert len(gaps) == 3 and max(gaps) < 1e-4, f"engine and trainer log-probs differ: {gaps}"


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2])
