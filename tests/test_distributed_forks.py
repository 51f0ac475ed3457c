"""The forks of grpo.py under torchrun (FSDP2 on the gloo backend, 2 CPU ranks), with their per-problem state made
global: one step on 2 ranks gives the single-process weights AND state, and a resumed 2-rank run equals an
uninterrupted one, state included, where the state is sharded (PCL's value model, PPO's critic). HAPO's and 1-shot's
histories are dicts that rank 0 writes through the save_sharded_checkpoint these two run (test_shared_blocks: the
same source), and their single-process resume tests restore them.

As in test_distributed.py, this file is also the worker that torchrun starts (`python -m torch.distributed.run ...
test_distributed_forks.py worker FOLDER`): fixed rollouts go through the real scoring and update path, then
pcl.py's whole runs go through pcl.main."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import hapo  # noqa: E402
import one_shot  # noqa: E402
import pcl  # noqa: E402
import ppo  # noqa: E402
# tests/ is on the path
from test_distributed import assert_same_statistics, fixed_batch, max_difference  # noqa: E402

HAS_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
pytestmark = pytest.mark.skipif(not HAS_GLOO, reason="torch.distributed with the gloo backend is not available")
SAMPLES = 4


# ---- hapo.py: the worker ---------------------------------------------------------------------------------------
# 4 prompt slots x 4 responses; slot 2 is problem 0 again, on rank 1, with its shortest correct response (3): a
# rank that updated the history from its own responses alone would keep 5 for problem 0 on rank 0, and would not
# know problem 3 at all.
HAPO_PROBLEMS = [0, 1, 0, 3]
HAPO_LENGTHS = [[6, 4, 7, 5], [3, 5, 2, 4], [3, 8, 2, 6], [15, 17, 14, 16]]
HAPO_CORRECT = [[1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 0, 1], [1, 0, 1, 0]]
HAPO_HISTORY = {0: (9, 1), 3: (20, 2)}


def hapo_batch(tokenizer):
    g = torch.Generator().manual_seed(0)
    problems = evaluation.toy_problems(len(HAPO_PROBLEMS), seed=5)
    rollouts = [{"prompt_ids": tokenizer.encode(problems[i]["problem"]),
                 "response_ids": torch.randint(5, 300, (n,), generator=g).tolist(), "engine_logprobs": [0.0] * n,
                 "truncated": False}
                for i, lengths in zip(HAPO_PROBLEMS, HAPO_LENGTHS) for n in lengths]
    problem_ids = [i for i in HAPO_PROBLEMS for _ in range(SAMPLES)]
    return rollouts, problem_ids, [n for ns in HAPO_LENGTHS for n in ns], [bool(c) for cs in HAPO_CORRECT for c in cs]


def hapo_step() -> dict:
    """HAPO's step 3-5 on the fixed batch, on however many ranks this process group has."""
    rank, world, device = hapo.init_distributed()
    model, tokenizer = evaluation.load_model("tiny", dtype=torch.float64)
    args = hapo.Args(mini_batch=len(HAPO_PROBLEMS) * SAMPLES, micro_batch=3, lr=1e-3)
    model = hapo.shard_model(model, device, world)
    optimizer, scheduler = hapo.make_optimizer(model, args, 1)
    rollouts, problem_ids, lengths, right = hapo_batch(tokenizer)
    share = len(rollouts) // world  # this rank's whole groups, as main's step 1 takes them
    pick = lambda values: values[rank * share:(rank + 1) * share]
    history, mean_history = dict(HAPO_HISTORY), dict(HAPO_HISTORY)
    length_rewards = hapo.history_length_rewards(history, pick(problem_ids), pick(lengths), pick(right), args)
    hapo.history_length_rewards(mean_history, pick(problem_ids), pick(lengths), pick(right),
                                dataclasses.replace(args, history_mode="mean"))
    rewards = torch.tensor([float(c) + b for c, b in zip(pick(right), length_rewards)])
    advantages = hapo.group_advantages(rewards, SAMPLES)
    torch.manual_seed(rank)
    stats = hapo.update_policy(model, None, pick(rollouts), advantages, optimizer, scheduler,
                               dataclasses.replace(args, mini_batch=args.mini_batch // world),
                               torch.autocast("cpu", enabled=False), tokenizer.pad_token_id, device)
    return {"weights": {k: v.detach().clone() for k, v in hapo.streamed_weights(model)},
            "stats": stats, "rewards": hapo.gather_from_ranks(rewards.tolist()),
            "histories": hapo.gather_from_ranks([history]), "mean_histories": hapo.gather_from_ranks([mean_history]),
            "rank": rank}


# ---- one_shot.py: the worker -----------------------------------------------------------------------------------
# the pool run's batch: 4 prompts (example "a" twice, once on each rank) x 4 responses with fixed rewards
SHOT_IDS = ["a", "b", "a", "c"]
SHOT_REWARDS = [1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0]


def one_shot_step() -> dict:
    """The pool run's steps 1 (this rank's groups), 4-5 and 7 on a fixed batch (the paper's KL and entropy terms on):
    weights and history."""
    rank, world, device = one_shot.init_distributed()
    model, tokenizer = evaluation.load_model("tiny", dtype=torch.float64)
    reference = evaluation.load_model("tiny", dtype=torch.float64)[0].eval().requires_grad_(False)
    args = one_shot.Args(mini_batch=len(SHOT_IDS) * SAMPLES, micro_batch=3, lr=1e-3)
    assert args.kl_coef > 0 and args.entropy_coef > 0
    model, reference = one_shot.shard_model(model, device, world), one_shot.shard_model(reference, device, world)
    optimizer, scheduler = one_shot.make_optimizer(model, args, 1)
    g = torch.Generator().manual_seed(1)
    problems = evaluation.toy_problems(len(SHOT_IDS), seed=5)
    batch = [{"id": i, "prompt_ids": tokenizer.encode(p["problem"])} for i, p in zip(SHOT_IDS, problems)]
    rollouts = []
    for p in batch:
        for _ in range(SAMPLES):
            n = int(torch.randint(2, 12, (1,), generator=g))
            rollouts.append({"prompt_ids": p["prompt_ids"], "response_ids": torch.randint(5, 300, (n,), generator=g)
                             .tolist(), "engine_logprobs": [0.0] * n, "truncated": False})
    share = len(SHOT_IDS) // world  # main's step 1: this rank's whole groups
    batch, mine = batch[rank * share:(rank + 1) * share], slice(rank * share * SAMPLES, (rank + 1) * share * SAMPLES)
    rewards = torch.tensor(SHOT_REWARDS)[mine]
    history = {"a": [0.5]}
    one_shot.record_accuracy(history, batch, rewards, SAMPLES)
    torch.manual_seed(rank)
    stats = one_shot.update_policy(model, reference, rollouts[mine], one_shot.group_advantages(rewards, SAMPLES),
                                   optimizer, scheduler, dataclasses.replace(args, mini_batch=args.mini_batch // world),
                                   torch.autocast("cpu", enabled=False), tokenizer.pad_token_id, device)
    return {"weights": {k: v.detach().clone() for k, v in one_shot.streamed_weights(model)},
            "stats": stats, "histories": one_shot.gather_from_ranks([history]), "rank": rank}


# ---- pcl.py: the worker ----------------------------------------------------------------------------------------
PCL_REWARDS = [1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0]


def pcl_step() -> dict:
    """PCL's steps 2 and 5-7 on fixed candidates and rollouts: V scores 16 candidates, the 4 closest to tau are kept
    (each rank rolls out 2), the policy takes one step and V (sharded like the policy) regresses on all 4 kept
    prompts, each rank on its 2."""
    rank, world, device = pcl.init_distributed()
    model, tokenizer = evaluation.load_model("tiny", dtype=torch.float64)
    args, off = pcl.Args(prompts_per_step=4, mini_batch=4 * SAMPLES, micro_batch=3, lr=1e-3, value_lr=1e-2), \
        torch.autocast("cpu", enabled=False)
    value_model = pcl.ValueModel(evaluation.load_model("tiny", dtype=torch.float64)[0]).double()  # head: built fp32
    with torch.no_grad():  # a V that does not tie everywhere, so the selection is not simply the first m
        value_model.head.weight.copy_(torch.randn(value_model.head.weight.shape, generator=torch.Generator()
                                                  .manual_seed(3), dtype=torch.float64) * 0.3)
    model, value_model = pcl.shard_model(model, device, world), pcl.shard_model(value_model, device, world)
    value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=args.value_lr, weight_decay=0.0)
    optimizer, scheduler = pcl.make_optimizer(model, args, 1)
    candidates = [{"prompt_ids": tokenizer.encode(p["problem"])} for p in evaluation.toy_problems(16, seed=7)]
    values = pcl.predict_values(value_model, [c["prompt_ids"] for c in candidates], args, tokenizer.pad_token_id,
                                device, off)
    kept = pcl.gather_from_ranks([pcl.select_prompts(values, args.prompts_per_step, args.tau)])[0]  # as main does
    g = torch.Generator().manual_seed(2)
    rollouts = [{"prompt_ids": candidates[i]["prompt_ids"], "response_ids": torch.randint(5, 300, (n,), generator=g)
                 .tolist(), "engine_logprobs": [0.0] * n, "truncated": False}
                for i in kept for n in torch.randint(2, 14, (SAMPLES,), generator=g).tolist()]
    mine = pcl.rank_share(list(range(len(rollouts))), rank, world)
    rewards = torch.tensor(PCL_REWARDS)[mine]
    torch.manual_seed(rank)
    stats = pcl.update_policy(model, None, [rollouts[i] for i in mine],
                              pcl.group_advantages(rewards, SAMPLES, args.std_normalize), optimizer, scheduler,
                              dataclasses.replace(args, mini_batch=args.mini_batch // world), off,
                              tokenizer.pad_token_id, device)
    realised = torch.tensor(pcl.gather_from_ranks(rewards.view(-1, SAMPLES).mean(dim=1).tolist()))  # as main does
    value_stats = pcl.update_value_model(value_model, value_optimizer, [candidates[i]["prompt_ids"] for i in kept],
                                         realised, args, tokenizer.pad_token_id, device, off)
    if world > 1:
        value_model.reshard()  # the FSDP root keeps its gathered weights after forward: read the shards
    value = pcl.get_model_state_dict(value_model, options=pcl.StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"weights": {k: v.detach().clone() for k, v in pcl.streamed_weights(model)},
            "stats": stats, "value_stats": value_stats, "realised": realised, "value": value,
            "values": pcl.gather_from_ranks([values]), "kept": pcl.gather_from_ranks([kept]), "rank": rank}


# ---- ppo.py: the worker ----------------------------------------------------------------------------------------
def ppo_step(mini_batches: int = 1) -> dict:
    """PPO's steps 4-5 on fixed rollouts (rank 1's responses are the longer ones, so its tokens' advantages have
    other statistics than rank 0's): values, GAE per response, whitening, the critic's and the policy's update
    (mini_batches optimizer steps each). --mask-truncated's mark on 5 of rank 1's 8 responses leaves it one
    micro-batch to rank 0's three: it runs filler passes in both updates to stay in step with FSDP's collectives."""
    rank, world, device = ppo.init_distributed()
    model, tokenizer = evaluation.load_model("tiny", dtype=torch.float64)
    torch.manual_seed(0)  # the critic's fresh value head: the same on every rank and in one process
    args = ppo.Args(mini_batch=16 // mini_batches, micro_batch=3, lr=1e-3, critic_lr=1e-3)
    critic = ppo.load_critic(evaluation.resolve_model_path("tiny"), tokenizer, args).double()
    assert args.whiten_advantages
    if world > 1:
        model, critic = ppo.shard_model(model, device, world), ppo.shard_model(critic, device, world)
    optimizer, scheduler = ppo.make_optimizer(model, args, 1)
    critic_optimizer, critic_scheduler = ppo.make_optimizer(critic, dataclasses.replace(args, lr=args.critic_lr), 1)
    g = torch.Generator().manual_seed(4)
    rollouts = []
    for p, problem in enumerate(evaluation.toy_problems(4, seed=5)):
        for _ in range(SAMPLES):
            n = int(torch.randint(2, 6, (1,), generator=g)) + (12 if p >= 2 else 0)
            rollouts.append({"prompt_ids": tokenizer.encode(problem["problem"]), "engine_logprobs": [0.0] * n,
                             "response_ids": torch.randint(5, 300, (n,), generator=g).tolist(), "truncated": False,
                             "masked": 9 <= len(rollouts) <= 13})
    mine = list(range(rank * 16 // world, (rank + 1) * 16 // world))  # as main: this rank's whole groups
    rollouts, rewards = [rollouts[i] for i in mine], torch.tensor(PCL_REWARDS)[mine]
    rank_args, pad_id = dataclasses.replace(args, mini_batch=args.mini_batch // world), tokenizer.pad_token_id
    with torch.no_grad():
        # float64 (the critic's values are float32): one process whitens with float32 statistics, 2 ranks with
        # float64 sums, and an advantage one float32 ulp apart moves AdamW's first step by ~lr
        old_values = [v.cpu().double() for v in ppo.token_values(critic, rollouts, args, pad_id, device)]
    advantages, returns, value_stats = ppo.advantages_and_returns(rollouts, rewards.tolist(), old_values, None, args)
    raw = ppo.advantages_and_returns(rollouts, rewards.tolist(), old_values, None,
                                     dataclasses.replace(args, whiten_advantages=False))[0]
    kept = torch.cat([a for a, r in zip(raw, rollouts) if not r["masked"]])
    local = (kept - kept.mean()) / kept.std()  # the mistake the comparison must catch: each rank's own statistics
    torch.manual_seed(rank)
    critic_stats = ppo.update_critic(critic, rollouts, old_values, returns, critic_optimizer, critic_scheduler,
                                     rank_args, torch.autocast("cpu", enabled=False), pad_id, device)
    stats = ppo.update_policy(model, None, rollouts, advantages, optimizer, scheduler, rank_args,
                              torch.autocast("cpu", enabled=False), pad_id, device)
    full = lambda m: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()  # noqa: E731
                      for k, v in m.state_dict().items()}
    return {"weights": {k: v.detach().clone() for k, v in ppo.streamed_weights(model)}, "critic": full(critic),
            "stats": {**critic_stats, **stats}, "rank": rank,
            "advantages": ppo.gather_from_ranks([a.tolist() for a in advantages]), "value_stats": value_stats,
            "raw_advantages": ppo.gather_from_ranks([a.tolist() for a in raw]),
            "masked": ppo.gather_from_ranks([r["masked"] for r in rollouts]),
            "local_advantages": ppo.gather_from_ranks(local.tolist())}


def ppo_reference_on_cpu() -> dict:
    """--reference-on-cpu: each rank keeps a whole reference in CPU memory (not an FSDP shard) and moves it to its
    device for its forwards alone. Its log-probs of each rank's responses, and the sharded reference's."""
    rank, world, device = ppo.init_distributed()
    tokenizer = evaluation.load_model("tiny")[1]
    rollouts = fixed_batch(tokenizer)[0][rank * 8:(rank + 1) * 8]  # rank 1 holds the long responses
    load = lambda: evaluation.load_model("tiny", dtype=torch.float64)[0].eval().requires_grad_(False)  # noqa: E731
    whole, sharded = load(), ppo.shard_model(load(), device, world)
    args = ppo.Args(micro_batch=3, reference_on_cpu=True)
    with torch.no_grad(), ppo.reference_on_device(whole, device, args):
        logprobs = {name: ppo.token_logprobs(reference, rollouts, args, tokenizer.pad_token_id, device)
                    for name, reference in (("whole", whole), ("sharded", sharded))}
    return {name: ppo.gather_from_ranks([torch.cat(lp).tolist()]) for name, lp in logprobs.items()}


# ---- pcl.py --select dynamic-sampling: the worker --------------------------------------------------------------
# A pool of 8 prompts x 4 responses, rolled out 4 by each rank (rank 0: prompts 0-3). Informative (mixed rewards)
# prompts: 0, 1, 2, 5 in the first pool, so that rank 1's share of the kept (2 and 5) holds a group rank 0 rolled
# out; 1, 3, 6 in the second, where one process keeps 3 prompts and 2 ranks keep 2.
PCL_POOLS = {"four": (0, 1, 2, 5), "three": (1, 3, 6)}


def pcl_dynamic_sampling() -> dict:
    rank, world, _ = pcl.init_distributed()
    out = {"rank": rank}
    for name, informative in PCL_POOLS.items():
        mine = pcl.rank_share(list(range(8)), rank, world)  # as main: each rank rolls out its share of the pool
        rollouts = [{"prompt_ids": [i], "response_ids": [100 + i, j]} for i in mine for j in range(SAMPLES)]
        rewards = [float(j % 2) if i in informative else 1.0 for i in mine for j in range(SAMPLES)]
        kept = pcl.select_informative(torch.tensor(pcl.gather_from_ranks(rewards)), SAMPLES, 4, world)
        out[name] = {"kept": kept, "rollouts": pcl.gather_from_ranks(
            [pcl.kept_rollouts_of_rank(rollouts, kept, SAMPLES, rank, world)])}
    return out


WORKERS = {"hapo-step": hapo_step, "one-shot-step": one_shot_step, "pcl-step": pcl_step, "ppo-step": ppo_step,
           "ppo-two-mini-batches": lambda: ppo_step(mini_batches=2), "pcl-dynamic-sampling": pcl_dynamic_sampling,
           "ppo-reference-on-cpu": ppo_reference_on_cpu}


def whole_runs(root: Path) -> list[list[str]]:
    """pcl.py's command lines on 2 ranks: 4 steps with a checkpoint after 2 (root/straight), 2 steps resumed in
    place to 4 (root/resumed), and 2 steps of dynamic sampling (root/dynamic-sampling)."""
    common = ["--rollout", "hf", "--prompts-per-step", "4", "--mini-batch", "16", "--micro-batch", "8",
              "--eval-every", "0", "--eval-max-problems", "2", "--save-every", "2"]
    runs = [[*common, "--total-steps", "4", "--output-dir", root / "straight"],
            [*common, "--total-steps", "2", "--output-dir", root / "resumed"],
            ["--resume", root / "resumed", "--total-steps", "4"],
            ["--select", "dynamic-sampling", "--rollout", "hf", "--prompts-per-step", "4", "--mini-batch", "32",
             "--micro-batch", "8", "--total-steps", "2", "--eval-every", "0", "--eval-max-problems", "4",
             "--output-dir", root / "dynamic-sampling"]]
    return [list(map(str, run)) for run in runs]


def worker(root: str) -> None:
    """Every worker above (root/steps.pt: {kind: its result}), then pcl.py's whole runs, in one torchrun launch (a
    launch starts three interpreters), in one process group."""
    joined = hapo.init_distributed()
    for script in (hapo, one_shot, pcl, ppo):
        script.init_distributed = lambda: joined
    results = {kind: step() for kind, step in WORKERS.items()}
    if joined[0] == 0:
        torch.save(results, Path(root) / "steps.pt")
    leave, evaluation.leave_process_group = evaluation.leave_process_group, torch.distributed.barrier
    for argv in whole_runs(Path(root)):
        pcl.main(pcl.parse_args(argv))
    leave()


@pytest.fixture(scope="module")
def two_ranks(launch):
    return torch.load(launch / "steps.pt", weights_only=False)


@pytest.mark.slow
def test_hapo_one_step_on_two_ranks_equals_one_process_weights_and_history(two_ranks):
    two, one = two_ranks["hapo-step"], hapo_step()
    # the history: every rank holds the single-process one, which needs both ranks' responses
    assert one["histories"][0] == {0: (3, 6), 1: (4, 1), 3: (14, 4)}, one["histories"]
    assert two["histories"] == [one["histories"][0]] * 2, two["histories"]
    assert two["mean_histories"] == [one["mean_histories"][0]] * 2, two["mean_histories"]
    assert one["mean_histories"][0][0] == pytest.approx(((9 + 6 + 5 + 3 + 8 + 6) / 6, 6))
    # the rewards (scored against the history from before the batch) and the step
    assert two["rewards"] == pytest.approx(one["rewards"], abs=1e-12)
    assert any(r not in (0.0, 1.0) for r in one["rewards"]), "no length reward: the history played no part"
    before = dict(hapo.streamed_weights(evaluation.load_model("tiny", dtype=torch.float64)[0]))
    moved, gap = max_difference(one["weights"], before), max_difference(two["weights"], one["weights"])
    print(f"hapo: step moved weights by {moved:.3g}; 2 ranks vs 1 process {gap:.3g}")
    assert moved > 1e-4, f"the step moved the weights by only {moved}: the comparison could not fail"
    assert_same_statistics(two["stats"], one["stats"])
    assert gap < 1e-9, f"2 ranks differ from 1 process by {gap} (the step moved weights by {moved})"


def assert_resume_equal(root: Path) -> list:
    from safetensors.torch import load_file
    straight = load_file(root / "straight" / "checkpoint-4" / "model.safetensors")
    halfway = load_file(root / "straight" / "checkpoint-2" / "model.safetensors")
    resumed = load_file(root / "resumed" / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(halfway[k], straight[k]) for k in straight), "steps 3-4 changed nothing"
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"{k} differs after resume"
    metrics = lambda run: [json.loads(line) for line in open(root / run / "metrics.jsonl")]
    rewards = lambda run: [m["reward_mean"] for m in metrics(run) if "reward_mean" in m]
    assert rewards("resumed") == rewards("straight"), "the resumed run sampled other responses"
    return metrics("resumed")


@pytest.mark.slow
def test_one_shot_one_step_on_two_ranks_equals_one_process_weights_and_history(two_ranks):
    two, one = two_ranks["one-shot-step"], one_shot_step()
    # every rank records every rank's groups; "a", drawn on both ranks, once for the step (as the paper's trainer)
    assert one["histories"][0] == {"a": [0.5, 0.625], "b": [0.25], "c": [0.25]}, one["histories"]
    assert two["histories"] == [one["histories"][0]] * 2, two["histories"]
    before = dict(one_shot.streamed_weights(evaluation.load_model("tiny", dtype=torch.float64)[0]))
    moved, gap = max_difference(one["weights"], before), max_difference(two["weights"], one["weights"])
    print(f"one_shot: step moved weights by {moved:.3g}; 2 ranks vs 1 process {gap:.3g}")
    assert moved > 1e-4, f"the step moved the weights by only {moved}: the comparison could not fail"
    assert_same_statistics(two["stats"], one["stats"])
    assert gap < 1e-9, f"2 ranks differ from 1 process by {gap} (the step moved weights by {moved})"


@pytest.mark.slow
def test_pcl_one_step_on_two_ranks_equals_one_process_selection_policy_and_value_model(two_ranks):
    two, one = two_ranks["pcl-step"], pcl_step()
    # the selection: the same candidates, the same V, the same kept prompts on every rank, as in one process
    assert one["kept"][0] != [0, 1, 2, 3], "V ties everywhere: the selection test could not fail"
    assert two["kept"] == [one["kept"][0]] * 2
    assert all(torch.equal(v, one["values"][0]) for v in two["values"])
    # V regressed on every rank's kept prompts: the 2-rank V is the single-process V
    assert torch.equal(two["realised"], one["realised"]) and len(one["realised"]) == 4
    before = pcl.ValueModel(evaluation.load_model("tiny", dtype=torch.float64)[0]).double().state_dict()
    value_moved = max_difference({k: v for k, v in one["value"].items() if "head" not in k},
                                 {k: v for k, v in before.items() if "head" not in k})
    value_gap = max_difference(two["value"], one["value"])
    assert value_moved > 1e-4, f"V's step moved its backbone by only {value_moved}"
    assert value_gap < 1e-12, f"V on 2 ranks differs from 1 process by {value_gap}"
    # AdamW's step hides a gradient scaled by the world size (each rank regressing on all prompts): the norm does not
    assert two["value_stats"]["value_grad_norm"] == pytest.approx(one["value_stats"]["value_grad_norm"], rel=1e-9)
    # V's output is float32 (ValueModel casts it): the ranks' partial losses add up in another order
    assert two["value_stats"]["value_loss"] == pytest.approx(one["value_stats"]["value_loss"], rel=1e-6)
    # the policy step
    before = dict(pcl.streamed_weights(evaluation.load_model("tiny", dtype=torch.float64)[0]))
    moved, gap = max_difference(one["weights"], before), max_difference(two["weights"], one["weights"])
    print(f"pcl: step moved weights by {moved:.3g}; 2 ranks vs 1 process {gap:.3g}; V moved {value_moved:.3g}, "
          f"2 ranks vs 1 process {value_gap:.3g}")
    assert moved > 1e-4, f"the step moved the weights by only {moved}: the comparison could not fail"
    assert_same_statistics(two["stats"], one["stats"])
    assert gap < 1e-9, f"2 ranks differ from 1 process by {gap} (the step moved weights by {moved})"


@pytest.mark.slow
def test_pcl_two_rank_resume_equals_uninterrupted_run_with_value_model(launch):
    assert_resume_equal(launch)
    value = lambda run, step: torch.load(launch / run / f"checkpoint-{step}" / "value_model.pt")  # noqa: E731
    straight, resumed, halfway = value("straight", 4), value("resumed", 4), value("straight", 2)
    assert any(not torch.equal(straight[k], halfway[k]) for k in halfway), "V did not move in steps 3-4"
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"V's {k} differs after resume"


@pytest.mark.slow
def test_pcl_dynamic_sampling_on_two_ranks_keeps_the_single_process_groups(two_ranks):
    two, one = two_ranks["pcl-dynamic-sampling"], pcl_dynamic_sampling()
    group = lambda i: [{"prompt_ids": [i], "response_ids": [100 + i, j]} for j in range(SAMPLES)]  # noqa: E731
    assert one["four"]["kept"] == two["four"]["kept"] == [0, 1, 2, 5]
    # rank 0 trains on prompts 0 and 1, rank 1 on 2 (which rank 0 rolled out) and 5: together one process's batch
    assert two["four"]["rollouts"] == [group(0) + group(1), group(2) + group(5)]
    assert one["four"]["rollouts"] == [group(0) + group(1) + group(2) + group(5)]
    # three informative prompts: one process keeps them all, 2 ranks the first two (one each)
    assert one["three"]["kept"] == [1, 3, 6] and two["three"]["kept"] == [1, 3]
    assert two["three"]["rollouts"] == [group(1), group(3)]


@pytest.mark.slow
def test_pcl_dynamic_sampling_runs_under_torchrun(launch):
    # step 0: only an evaluation
    metrics = [json.loads(line) for line in open(launch / "dynamic-sampling" / "metrics.jsonl")][1:]
    assert len(metrics) == 2 and any(m["kept_prompts"] for m in metrics), metrics
    pool = 4 * 4 * 8  # k*m candidates x n samples, from both ranks
    for m in metrics:
        assert m["kept_prompts"] in (0, 2, 4)
        if not m["kept_prompts"]:
            continue
        assert m["effective_ratio"] == 1.0, "a kept group with all-equal rewards"
        # a kept group holds a reward of 1, so a correct response; every kept response is one of the pool's
        pool_correct, kept_correct = m["pool_accuracy"] * pool, m["accuracy"] * m["kept_prompts"] * 8
        assert pool_correct == pytest.approx(round(pool_correct)) and round(pool_correct) >= max(1, kept_correct), \
            f"pool accuracy {m['pool_accuracy']}: not a count over the {pool} responses of the pool, which holds " \
            f"the kept groups' {kept_correct:g} correct ones"


@pytest.mark.slow
def test_ppo_one_step_on_two_ranks_equals_one_process_policy_and_critic(two_ranks):
    two, one = two_ranks["ppo-step"], ppo_step()
    # whitening with the whole batch's statistics: the single-process advantages, not each rank's own whitening
    kept_tokens = lambda rows: torch.tensor([a for row, m in zip(rows, one["masked"]) if not m for a in row])
    advantages, local = kept_tokens(two["advantages"]), torch.tensor(two["local_advantages"])
    reference = kept_tokens(one["advantages"])
    assert two["masked"] == one["masked"] and sum(one["masked"]) == 5
    assert (advantages - reference).abs().max() < 1e-5
    assert (local - reference).abs().max() > 0.1, "per-rank whitening would pass too: the check could not fail"
    # --mask-truncated: over the kept responses' tokens only (every rank's), as for the batch without the masked
    raw = kept_tokens(two["raw_advantages"])
    assert (advantages - (raw - raw.mean()) / raw.std()).abs().max() < 1e-5
    every_token = torch.tensor([a for row in two["raw_advantages"] for a in row])
    assert ((raw - every_token.mean()) / every_token.std() - reference).abs().max() > 0.1, \
        "whitening over the masked responses' tokens too would pass: the check could not fail"
    assert two["value_stats"] == pytest.approx(one["value_stats"], rel=1e-9)
    # gamma = lambda = 1, no KL: every token's return is its response's reward; the mean is over kept tokens only
    kept_rows = [(len(row), PCL_REWARDS[i]) for i, (row, m) in enumerate(zip(one["raw_advantages"], one["masked"]))
                 if not m]
    assert one["value_stats"]["return_mean"] == pytest.approx(sum(n * r for n, r in kept_rows) /
                                                              sum(n for n, _ in kept_rows), rel=1e-12)
    before = dict(ppo.streamed_weights(evaluation.load_model("tiny", dtype=torch.float64)[0]))
    moved, gap = max_difference(one["weights"], before), max_difference(two["weights"], one["weights"])
    critic_gap = max_difference(two["critic"], one["critic"])
    print(f"ppo: step moved weights by {moved:.3g}; 2 ranks vs 1 process: policy {gap:.3g}, critic {critic_gap:.3g}")
    assert moved > 1e-4, f"the step moved the weights by only {moved}: the comparison could not fail"
    assert_same_statistics(two["stats"], one["stats"], ("loss", "value_loss", "grad_norm",
                                                        "critic_grad_norm", "entropy", "clip_frac",
                                                        "value_clip_frac"))
    assert gap < 1e-9, f"the policy on 2 ranks differs from 1 process by {gap} (the step moved weights by {moved})"
    assert critic_gap < 1e-9, f"the critic on 2 ranks differs from 1 process by {critic_gap}"


@pytest.mark.slow
def test_ppo_several_mini_batches_on_two_ranks_equal_one_process_policy_and_critic(two_ranks):
    """Two optimizer steps of the critic and two of the policy on the batch (mini-batches of 8 of its 16 responses):
    each step must train on the responses it trains on in one process, whichever rank holds them. One shuffle of
    all 16 decides the mini-batches (one for the critic's update, one for the policy's), so a rank may hold 3 of one
    and 5 of the next."""
    two, one, whole = two_ranks["ppo-two-mini-batches"], ppo_step(mini_batches=2), ppo_step()
    apart = {"weights": max_difference(one["weights"], whole["weights"]),
             "critic": max_difference(one["critic"], whole["critic"])}
    gaps = {part: max_difference(two[part], one[part]) for part in ("weights", "critic")}
    print(f"ppo, 2 mini-batches: 2 ranks vs 1 process {gaps}; 2 steps vs 1 step {apart}")
    for part in ("weights", "critic"):
        assert apart[part] > 1e-4, f"{part}: two steps moved it like one ({apart[part]}): the test could not fail"
        assert gaps[part] < 1e-12, f"{part} on 2 ranks differ from 1 process by {gaps[part]} with 2 mini-batches"
    for key in ("grad_norm", "critic_grad_norm"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-9), key


@pytest.mark.slow
def test_ppo_reference_on_cpu_under_torchrun_equals_the_sharded_reference(two_ranks):
    """The whole reference beside the sharded policy gives each rank's tokens the sharded reference's log-probs, and
    one process's, so the KL it measures is the same."""
    logprobs = two_ranks["ppo-reference-on-cpu"]
    model, tokenizer = evaluation.load_model("tiny", dtype=torch.float64)
    with torch.no_grad():
        one = ppo.token_logprobs(model, fixed_batch(tokenizer)[0], ppo.Args(micro_batch=3), tokenizer.pad_token_id,
                                 torch.device("cpu"))
    assert [len(part) for part in logprobs["whole"]] == [len(torch.cat(one[:8])), len(torch.cat(one[8:]))]
    assert sum(logprobs["whole"], []) == pytest.approx(torch.cat(one).tolist(), rel=1e-9, abs=1e-12)
    assert logprobs["whole"] == logprobs["sharded"]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2])
