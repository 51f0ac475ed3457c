"""pcl.py: prompt selection by V(x), the value model's loss and update, the effective ratio, whole runs, resume."""
import gc
import json
import math
import re
import sys
import weakref
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import pcl  # noqa: E402


# ---- selection ---------------------------------------------------------------------------------------------------
def test_selection_picks_the_m_closest_to_tau():
    values = torch.tensor([0.9, 0.45, 0.1, 0.6, 0.52, 0.0])
    assert pcl.select_prompts(values, 3, 0.5) == [4, 1, 3]
    assert pcl.select_prompts(values, 2, 0.0) == [5, 2]
    g = torch.Generator().manual_seed(0)
    values = torch.rand(200, generator=g, dtype=torch.float64)
    chosen = pcl.select_prompts(values, 50, 0.3)
    brute = sorted(range(200), key=lambda i: abs(values[i].item() - 0.3))[:50]
    assert chosen == brute
    assert max(abs(values[i] - 0.3) for i in chosen) <= min(abs(values[i] - 0.3) for i in set(range(200)) - set(chosen))


def test_selection_ties_go_to_the_lowest_index():
    # binary-exact values: the four distances 0.25 tie exactly
    assert pcl.select_prompts(torch.tensor([0.25, 0.75, 0.25, 0.75, 0.5]), 3, 0.5) == [4, 0, 1]
    # an untrained V (0.5 everywhere) keeps the first m candidates: uniform sampling
    assert pcl.select_prompts(torch.full((16,), 0.5), 4, 0.5) == [0, 1, 2, 3]


def test_dynamic_sampling_keeps_the_first_informative_groups():
    rewards = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0])  # 5 groups of 4
    assert pcl.select_informative(rewards, 4, 2) == [1, 3]
    assert pcl.select_informative(rewards, 4, 10) == [1, 3, 4], "fewer than m informative: all of them, no more"
    assert pcl.select_informative(torch.ones(8), 4, 2) == []
    # under torchrun (2 ranks) a multiple of the world size: every rank trains on as many prompts
    assert pcl.select_informative(rewards, 4, 10, world=2) == [1, 3]
    assert pcl.select_informative(rewards, 4, 2, world=2) == [1, 3]


# ---- the value model ---------------------------------------------------------------------------------------------
def test_probe_is_drawn_once_and_taken_out_of_the_training_pool():
    problems = [{"problem": str(i)} for i in range(500)]
    probe, pool = pcl.split_probe(problems, 64, seed=1)
    assert len(probe) == 64 and len(pool) == 436
    assert not {p["problem"] for p in probe} & {p["problem"] for p in pool}, "a probe prompt can be trained on"
    assert pcl.split_probe(problems, 64, seed=1) == (probe, pool), "a resumed run must draw the same probe"
    assert pcl.split_probe(problems, 64, seed=2)[0] != probe
    assert pcl.split_probe(problems, 0, seed=1) == ([], problems)
    assert pcl.split_probe(problems[:10], 4, seed=3)[0] == pcl.split_probe(problems[:10], 4, seed=3)[0]
    with pytest.raises(SystemExit, match="--value-probe"):
        pcl.split_probe(problems[:64], 64, seed=1)


@pytest.fixture(scope="module")
def tiny():
    return evaluation.load_model("tiny")


def toy_prompts(tokenizer, n, seed=0):
    return [tokenizer.encode(evaluation.build_prompt(p["problem"], tokenizer, "qwen-math-train"))
            for p in evaluation.toy_problems(n, seed=seed)]


def fresh_value_model(model):
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    return pcl.ValueModel(copy)


def test_value_model_starts_at_one_half_and_ignores_padding(tiny):
    model, tokenizer = tiny
    value_model = fresh_value_model(model)
    prompts = toy_prompts(tokenizer, 6)
    args = pcl.Args(micro_batch=4)
    off = torch.autocast("cpu", enabled=False)
    assert torch.equal(pcl.predict_values(value_model, prompts, args, tokenizer.pad_token_id, "cpu", off),
                       torch.full((6,), 0.5))
    torch.nn.init.normal_(value_model.head.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    batched = pcl.predict_values(value_model, prompts, args, tokenizer.pad_token_id, "cpu", off)
    alone = torch.cat([pcl.predict_values(value_model, [p], args, tokenizer.pad_token_id, "cpu", off) for p in prompts])
    assert batched.std() > 1e-3, "V does not depend on the prompt: the padding check would pass vacuously"
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_value_update_moves_v_towards_the_realised_accuracy_and_accumulates_exactly(tiny):
    model, tokenizer = tiny
    prompts = toy_prompts(tokenizer, 8, seed=1)
    target = torch.tensor([1.0, 0.0, 0.75, 0.25, 1.0, 0.0, 0.5, 0.125])
    off = torch.autocast("cpu", enabled=False)
    grads = []
    for micro in (8, 3):
        value_model = fresh_value_model(model).double()
        torch.nn.init.normal_(value_model.head.weight, std=0.1, generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.SGD(value_model.parameters(), lr=0.0)
        optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradient for inspection
        pcl.update_value_model(value_model, optimizer, prompts, target.double(), pcl.Args(
            micro_batch=micro, max_grad_norm=1e9, value_updates=1), tokenizer.pad_token_id, "cpu", off)
        grads.append(torch.cat([p.grad.flatten() for p in value_model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)

    value_model = fresh_value_model(model)
    optimizer = torch.optim.AdamW(value_model.parameters(), lr=3e-4)
    args = pcl.Args(micro_batch=3, value_updates=4)
    mse = lambda: ((pcl.predict_values(value_model, prompts, args, tokenizer.pad_token_id, "cpu", off) - target) ** 2
                   ).mean().item()
    before = mse()
    first = pcl.update_value_model(value_model, optimizer, prompts, target, args, tokenizer.pad_token_id, "cpu", off)
    # the loss is the mean (not the sum) squared error, logged before V's first step on these targets (V = 0.5)
    assert first["value_loss"] == pytest.approx(((0.5 - target) ** 2).mean().item(), rel=1e-6) == before
    for _ in range(20 // args.value_updates - 1):  # 20 AdamW steps in all
        pcl.update_value_model(value_model, optimizer, prompts, target, args, tokenizer.pad_token_id, "cpu", off)
    assert mse() < 0.7 * before, f"V did not fit its targets: loss {before:.4f} -> {mse():.4f}"


# ---- whole runs --------------------------------------------------------------------------------------------------
def read_metrics(output_dir):
    """The trained steps' metrics (step 0 is the evaluation before training)."""
    return [m for m in map(json.loads, open(Path(output_dir) / "metrics.jsonl")) if m["step"] > 0]


def training_numbers(output_dir):
    """Each trained step's metrics but timings, evaluations and V's probe (which a run's last step adds)."""
    return [{k: v for k, v in m.items() if not k.startswith(("time_", "tokens_", "eval/", "value_probe"))}
            for m in read_metrics(output_dir)]


def mean(values):
    values = [v for v in values if v == v]  # NaN: a step where the kept prompts' accuracies did not vary
    return sum(values) / len(values)


# The default run (--select pcl) and the same run with --select uniform, trained by conftest.py once per session.
# HF rollouts, so that the bars are the same whether or not vLLM is installed; the probe every 10 steps (it leaves
# training as it was) gives V's mean six points.
RUNS = {s: ("pcl", ["--rollout", "hf", "--eval-every", "10", "--select", s]) for s in ("pcl", "uniform")}


@pytest.fixture(scope="module")
def default_runs(training_run):
    return {s: [m for m in training_run(s)["metrics"] if m["step"] > 0] for s in RUNS}


@pytest.mark.slow
def test_default_run_value_model_predicts_accuracy_on_the_probe(default_runs):
    """Scored on prompts no selection touched: V's ranking (correlation) where the probe's accuracies vary, and its
    error against the best constant guess (the probe's mean accuracy)."""
    probes = [m for m in default_runs["pcl"] if "value_probe_corr" in m]
    varied = [m for m in probes if m["value_probe_accuracy_std"] >= 0.1]
    assert len(varied) >= len(probes) // 2, f"the probe's accuracies did not vary: nothing to predict ({probes})"
    corr = mean([m["value_probe_corr"] for m in varied])
    print(f"V on the probe, pcl run: corr {[round(m['value_probe_corr'], 2) for m in probes]}, "
          f"MAE {[round(m['value_probe_mae'], 3) for m in probes]}")
    assert corr >= 0.6, f"V did not learn the policy's accuracy: mean probe correlation {corr:.3f}"
    late = probes[len(probes) // 2:]
    assert mean([m["value_probe_mae"] for m in late]) < mean([m["value_probe_accuracy_std"] for m in late]), \
        "V's error on the probe is no better than guessing the mean accuracy for every prompt"


@pytest.mark.slow
def test_default_run_pcl_raises_the_effective_ratio(default_runs):
    ratio = {s: mean([m["effective_ratio"] for m in default_runs[s]]) for s in default_runs}
    distance = {s: mean([m["kept_accuracy_distance"] for m in runs[len(runs) // 2:]])
                for s, runs in default_runs.items()}
    print(f"effective ratio: {ratio}; kept prompts' mean |accuracy - tau| over the second half: {distance}")
    assert ratio["pcl"] >= 1.3 * ratio["uniform"], ratio
    assert distance["pcl"] <= distance["uniform"] - 0.1, f"pcl's kept prompts are not nearer tau: {distance}"


@pytest.mark.slow
def test_default_run_pcl_learns(default_runs):
    evals = {s: [m["eval/accuracy"] for m in runs if "eval/accuracy" in m] for s, runs in default_runs.items()}
    print(f"held-out accuracy at each evaluation: {evals}")
    assert evals["pcl"][-1] >= 0.6 and evals["pcl"][-1] > evals["pcl"][0], evals
    assert evals["pcl"][-1] >= evals["uniform"][-1], f"pcl learned less than uniform prompts: {evals}"


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run_policy_and_value_model(tmp_path, capsys):
    """A 2-step run resumed in place with --total-steps 4 against 4 steps straight (in this process, to save
    interpreter starts): policy, V and metrics.jsonl as the uninterrupted run's. The learning rate warms up over 3
    steps: a scheduler restarted by the resume would show at step 3; V's AdamW state not restored would move V."""
    common = ["--rollout", "hf", "--prompts-per-step", "4", "--mini-batch", "32", "--micro-batch", "8",
              "--eval-every", "0", "--eval-max-problems", "4", "--value-lr", "1e-2", "--warmup-steps", "3",
              "--save-every", "2"]
    pcl.main(pcl.parse_args([*common, "--total-steps", "4", "--output-dir", str(tmp_path / "straight")]))
    pcl.main(pcl.parse_args([*common, "--total-steps", "2", "--output-dir", str(tmp_path / "resumed")]))
    capsys.readouterr()
    pcl.main(pcl.parse_args(["--resume", str(tmp_path / "resumed"), "--total-steps", "4"]))
    assert "finished at step 4 of 4" in capsys.readouterr().out
    from safetensors.torch import load_file
    straight = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors")
    halfway = load_file(tmp_path / "straight" / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(halfway[k], straight[k]) for k in straight), "steps 3-4 changed nothing"
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"policy {k} differs after resume"
    v_straight, v_resumed, v_halfway = (torch.load(tmp_path / r / f"checkpoint-{s}" / "value_model.pt")
                                        for r, s in (("straight", 4), ("resumed", 4), ("straight", 2)))
    assert any(not torch.equal(v_halfway[k], v_straight[k]) for k in v_straight), "steps 3-4 did not move V"
    for k in v_straight:
        assert torch.equal(v_straight[k], v_resumed[k]), f"value model {k} differs after resume"
    assert training_numbers(tmp_path / "resumed") == training_numbers(tmp_path / "straight"), \
        "each step once, in order, with the uninterrupted run's numbers"
    lr = pcl.Args().lr
    assert [m["lr"] for m in read_metrics(tmp_path / "straight")] == pytest.approx([0, lr / 3, 2 * lr / 3, lr])


@pytest.mark.parametrize("argv,message", [
    (["--candidates-factor", "0"], r"--candidates-factor 0: must be at least 1"),
    (["--value-updates", "0"], r"--value-updates 0: must be at least 1"),
    (["--tau", "1.5"], r"--tau 1.5: a target accuracy"),
    (["--samples-per-prompt", "1"], r"at least 2"),
    (["--value-probe=-1"], r"--value-probe -1"),
    (["--value-model", "/nonexistent/value"], r"--value-model /nonexistent/value: no such folder"),
    (["--resume", "/nonexistent/run"], r"--resume /nonexistent/run"),
])
def test_bad_arguments_stop_with_one_line_before_anything_is_built(argv, message, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(SystemExit) as stop:
        pcl.main(pcl.parse_args(argv + ["--output-dir", str(tmp_path / "out")]))
    assert re.search(message, str(stop.value)) and "\n" not in str(stop.value), stop.value
    assert not loaded and not (tmp_path / "out").exists()


def test_an_unknown_selection_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        pcl.parse_args(["--select", "best"])
    err = capsys.readouterr().err
    assert "--select" in err and "dynamic-sampling" in err, err


# ---- main in this process: dynamic sampling, the order of the updates, what stays in memory, the probe -----------
def small_run(output_dir, **changes):
    """A 2-prompt x 4-sample run with HF rollouts, one optimizer step per batch."""
    return pcl.Args(**{**dict(rollout="hf", prompts_per_step=2, samples_per_prompt=4, candidates_factor=2,
                              mini_batch=8, micro_batch=4, eval_every=0, eval_max_problems=2, value_lr=1e-2,
                              value_probe=8, output_dir=str(output_dir)), **changes})


def test_dynamic_sampling_trains_only_on_informative_prompts(tmp_path):
    pcl.main(small_run(tmp_path, select="dynamic-sampling", prompts_per_step=4, mini_batch=16, total_steps=1))
    for m in read_metrics(tmp_path):
        assert m["effective_ratio"] == 1.0, "a kept group with all-equal rewards: the filter let it through"
        assert 0 < m["kept_prompts"] <= 4 and m["time_generate"] < m["time_select"], m


@pytest.fixture(scope="module")
def recorded_runs(tmp_path_factory):
    """A 2-step run, then the same run resumed for a third step, in this process, recording the order of the
    policy's and V's updates and the weight push (which wakes vLLM), and (at each update of V) whether the LM V was
    built from or a copy of V's weights loaded from the checkpoint is still alive."""
    folder = tmp_path_factory.mktemp("recorded")
    events, lms, loaded = [], [], []

    def record(name, function):
        def wrapper(*a, **k):
            events.append(name)
            if name == "update_value_model":
                gc.collect()
                events.append(("alive", sum(r() is not None for r in lms), sum(r() is not None for r in loaded)))
            return function(*a, **k)
        return wrapper

    class RecordedValueModel(pcl.ValueModel):
        def __init__(self, lm):
            lms.append(weakref.ref(lm))
            super().__init__(lm)

    def recorded_load(path, *a, **k):
        state = torch_load(path, *a, **k)
        if isinstance(path, Path) and path.name == "value_model.pt":  # (the AdamW state loaded is V's AdamW state)
            loaded.extend(weakref.ref(t) for t in state.values())
        return state

    torch_load = torch.load
    with pytest.MonkeyPatch.context() as patch:
        for name in ("update_policy", "update_value_model", "push_weights"):
            patch.setattr(pcl, name, record(name, getattr(pcl, name)))
        patch.setattr(pcl, "ValueModel", RecordedValueModel)
        patch.setattr(torch, "load", recorded_load)
        pcl.main(small_run(folder / "run", total_steps=2))
        first = list(events)
        events.clear()
        pcl.main(pcl.parse_args(["--resume", str(folder / "run"), "--total-steps", "3"]))
    assert loaded, "the resumed run loaded no value model: the memory check could not fail"
    return {"first": first, "resumed": list(events), "folder": folder}


def test_value_model_is_updated_before_the_weight_push_wakes_the_engine(recorded_runs):
    updates = [e for e in recorded_runs["first"] if isinstance(e, str)]
    assert updates == ["push_weights"] + ["update_policy", "update_value_model", "push_weights"] * 2, \
        "V must train while vLLM sleeps: on one GPU the policy, V and their AdamW states leave vLLM no room"


def test_no_copy_of_the_value_model_outlives_loading_it(recorded_runs):
    alive = [e for run in ("first", "resumed") for e in recorded_runs[run] if isinstance(e, tuple)]
    assert len(alive) == 3
    assert all(lms == 0 for _, lms, _ in alive), \
        "the LM V was built from is alive: its LM head (after sharding a dead full copy of the embeddings) with it"
    assert all(copies == 0 for _, _, copies in alive), \
        "V's weights loaded from the checkpoint are still referenced after --resume copied them into V"


def test_default_mini_batch_is_the_whole_batch(recorded_runs):
    args = pcl.Args()
    assert args.mini_batch == args.prompts_per_step * args.samples_per_prompt, "one optimizer step per batch"
    state = torch.load(recorded_runs["folder"] / "run" / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 3, "one optimizer step per rollout batch, the paper's setting"


def test_the_probe_leaves_the_training_run_as_it_was(tmp_path):
    """The probe's samples draw from a seed of their own: a run scored on it every step trains exactly as one whose
    probe is never rolled out."""
    pcl.main(small_run(tmp_path / "probed", total_steps=2, eval_every=1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pcl, "probe_value_model", lambda *a, **k: {})
        pcl.main(small_run(tmp_path / "unprobed", total_steps=2, eval_every=1))
    probed, unprobed = read_metrics(tmp_path / "probed"), read_metrics(tmp_path / "unprobed")
    assert all(math.isfinite(m["value_probe_mae"]) and m["value_probe_accuracy_std"] >= 0 for m in probed)
    same = ("reward_mean", "response_len_mean", "logprob_gap", "value_loss", "loss", "eval/accuracy")
    assert [[m[k] for k in same] for m in probed] == [[m[k] for k in same] for m in unprobed]


def test_a_step_that_keeps_no_prompt_logs_no_batch_statistics(tmp_path):
    with pytest.MonkeyPatch.context() as patch:  # as if every group of the pool had all-equal rewards
        patch.setattr(pcl, "select_informative", lambda *a, **k: [])
        pcl.main(small_run(tmp_path, select="dynamic-sampling", total_steps=1))
    (step,) = read_metrics(tmp_path)
    assert step["kept_prompts"] == 0 and math.isfinite(step["pool_accuracy"]), "the pool was rolled out and scored"
    for key in ("reward_mean", "accuracy", "effective_ratio", "response_len_mean", "truncated_share",
                "kept_accuracy_distance"):
        assert math.isnan(step[key]), f"{key} is {step[key]} for a step that trained on nothing: it must be NaN"
    assert "loss" not in step and "value_loss" not in step, "nothing was trained"


def test_value_model_with_another_vocabulary_is_refused(tiny, tmp_path):
    from transformers import AutoTokenizer
    other = AutoTokenizer.from_pretrained(evaluation.resolve_model_path("tiny"))
    other.add_tokens(["<another-family>"])
    tiny[0].save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="--value-model .*vocabulary"):
        pcl.main(small_run(tmp_path / "run", total_steps=1, value_model=str(tmp_path / "other")))
