"""one_shot.py: the example chosen by historical variance, its copies, the entropy bonus and the ablations, the two
runs (pool, then 1-shot RLVR) learning on the toy, resume, and clear errors."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import one_shot  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "train" / "one_shot_rlvr"
DSR_SUB = str(DATA / "dsr_sub.jsonl")


@pytest.fixture(scope="module")
def tiny():
    return evaluation.load_model("tiny")


def problems_of(*argv):
    """The run's training problems as main makes them (before tokenizing), from a command line's flags."""
    args = one_shot.parse_args(list(argv))
    return one_shot.training_problems(args, evaluation.load_problems(args.train_data))


# ---- choosing the example --------------------------------------------------------------------------------------
def test_ranking_the_papers_history_gives_its_examples():
    history = one_shot.load_history(str(DATA / "acc_step_500.json"))
    assert one_shot.select_by_rank(history, [1, 2, 13, 1209]) == ["124", "267", "682", "789"]
    pi1 = problems_of("--train-data", DSR_SUB, "--history", str(DATA / "acc_step_500.json"), "--prompts-per-step",
                      "1")[0]
    paper_pi1 = json.loads((DATA / "pi1_r128.jsonl").read_text().splitlines()[0])
    assert pi1["id"] == "124" and pi1["answer"] == "12.8" and pi1["problem"] == paper_pi1["problem"]


def test_ranking_is_by_std_largest_first_ties_in_file_order():
    history = {"b": [0.5, 0.5], "a": [0.0, 1.0], "d": [0.0, 0.0, 1.0], "c": [1.0, 0.0], "e": []}
    # std: a = c = 0.5, d = 0.471, b = e = 0; a before c and b before e because the file lists them so
    assert one_shot.select_by_rank(history, [1, 2, 3, 4, 5]) == ["a", "c", "d", "b", "e"]


def test_a_pool_runs_folder_is_a_history(tmp_path):
    """--history takes the pool run's folder as well as a file: it reads accuracy_history.json there."""
    (tmp_path / "accuracy_history.json").write_text(json.dumps({"3": [0.0, 1.0]}))
    assert one_shot.load_history(str(tmp_path)) == {"3": [0.0, 1.0]}


def test_examples_are_found_by_index_column_else_position():
    toy = evaluation.toy_splits()[0]
    assert problems_of("--example-index", "7", "--prompts-per-step", "1")[0]["problem"] == toy[7]["problem"]
    relabelled = problems_of("--example-index", "7", "3", "--label", "42", "x", "--prompts-per-step", "2")
    assert [(e["id"], e["answer"], e["true_answer"]) for e in relabelled] == [("7", "42", toy[7]["answer"]),
                                                                              ("3", "x", toy[3]["answer"])]


def test_the_pool_is_the_first_pool_size_problems():
    pool = problems_of("--pool", "--pool-size", "32")
    assert [p["id"] for p in pool] == [str(i) for i in range(32)]
    assert len(problems_of("--pool")) == len(evaluation.toy_splits()[0]), "--pool-size 0: all"


def test_copies_match_the_papers_merged_file():
    batch = problems_of("--train-data", DSR_SUB, "--example-index", "124", "682", "--prompts-per-step", "128")
    paper = [json.loads(line) for line in (DATA / "merge_pi1_pi13_r128.jsonl").read_text().splitlines()]
    assert [int(p["id"]) for p in batch] == [p["index"] for p in paper]
    assert [p["problem"] for p in batch] == [p["problem"] for p in paper]


def test_every_copy_is_sampled_every_step_and_is_its_own_group(tiny):
    model, tokenizer = tiny
    copies = problems_of("--example-index", "0", "1", "--prompts-per-step", "4")
    for step in range(3):  # GRPO's sampler over the copies: a permutation of all of them, every step
        assert sorted(one_shot.batch_indices(step, len(copies), 4, seed=1)) == [0, 1, 2, 3]
    batch = one_shot.tokenize_prompts(copies, tokenizer, one_shot.Args())
    args = one_shot.Args(samples_per_prompt=3, max_new_tokens=12, rollout="hf")
    rollouts = one_shot.generate(None, model, tokenizer, batch, args, step=0, rank=0)
    assert [r["prompt_ids"] for r in rollouts] == [p["prompt_ids"] for p in batch for _ in range(3)]
    # copies 0 and 1 of the same example: groups of 3, so a copy whose samples all agree has zero advantages
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0])
    advantages = one_shot.group_advantages(rewards, args.samples_per_prompt)
    assert torch.all(advantages[3:6] == 0) and torch.all(advantages[9:] == 0)
    assert advantages[0] > 0 > advantages[1] and advantages[8] > 0 > advantages[6]


def test_the_history_records_an_example_once_per_step_across_an_epoch_boundary():
    """A batch that spans two epochs can draw one example twice (here 4 of 5 problems per step, so step 1 takes the
    last problem of epoch 0 and three of epoch 1). The paper's trainer, whose batches never span epochs, records an
    example once per step: its two groups make one record, the accuracy over all its samples."""
    drawn = one_shot.batch_indices(1, 5, 4, seed=3)
    assert len(set(drawn)) < len(drawn), f"no repeat in {drawn}: the test would pass vacuously"
    accuracy = [0.25 * k for k in range(len(drawn))]  # groups of one: each group's reward is its accuracy
    history = {}
    one_shot.record_accuracy(history, [{"id": str(i)} for i in drawn], torch.tensor(accuracy), 1)
    assert sorted(history) == sorted({str(i) for i in drawn}) and all(len(v) == 1 for v in history.values()), history
    twice = next(i for i in drawn if drawn.count(i) == 2)
    expected = sum(a for i, a in zip(drawn, accuracy) if i == twice) / 2
    assert history[str(twice)] == [pytest.approx(expected)]


# ---- the entropy bonus and the ablations -----------------------------------------------------------------------
def mean_entropy(model, rollouts, pad_id):
    with torch.no_grad():
        _, entropy = one_shot.response_logprobs(model, one_shot.collate(rollouts, pad_id, "cpu"), 1.0, 64)
    return entropy.mean().item()


@pytest.mark.parametrize("coef", [0.001, -0.001])
def test_a_step_on_the_entropy_term_alone_moves_entropy_by_its_sign(tiny, coef):
    """The entropy-only ablation: zero advantages leave loss = -coef * entropy (the paper's 0.001; Adam makes the
    step size independent of its scale). A positive bonus raises the entropy of the same responses, a negative one
    (the control: the test can fail) lowers it."""
    base, tokenizer = tiny
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    model.train()
    args = one_shot.Args(samples_per_prompt=2, max_new_tokens=16, entropy_coef=coef, kl_coef=0.0, lr=1e-3,
                         mini_batch=16, micro_batch=8)
    batch = one_shot.tokenize_prompts(evaluation.toy_splits()[0][:8], tokenizer, args)
    rollouts = one_shot.generate(None, model, tokenizer, batch, args, step=0, rank=0)
    before = mean_entropy(model, rollouts, tokenizer.pad_token_id)
    optimizer, scheduler = one_shot.make_optimizer(model, args, 1)
    one_shot.update_policy(model, None, rollouts, torch.zeros(len(rollouts)), optimizer, scheduler, args,
                           torch.autocast("cpu", enabled=False), tokenizer.pad_token_id, torch.device("cpu"))
    after = mean_entropy(model, rollouts, tokenizer.pad_token_id)
    print(f"coef {coef}: entropy {before:.4f} -> {after:.4f}")
    assert (after - before) * coef > 0, f"entropy {before:.4f} -> {after:.4f} with coefficient {coef}"


def test_ablations_reach_the_loss_and_the_metrics(tmp_path, monkeypatch):
    """Two examples, one relabelled (label noise), trained on the entropy term alone: the loss is -coef * entropy
    even though the correctly labelled example's rewards vary (its advantages would not be zero)."""
    scored = []  # every (golds, scores) the run asks the checker for

    def recording_score_batch(texts, golds, **kwargs):
        scores = real_score_batch(texts, golds, **kwargs)
        scored.append((list(golds), scores))
        return scores
    real_score_batch = one_shot.verify.score_batch
    monkeypatch.setattr(one_shot.verify, "score_batch", recording_score_batch)
    args = one_shot.parse_args(["--example-index", "1", "3", "--label", "1", "99", "--entropy-only", "--kl-coef", "0",
                                "--prompts-per-step", "2", "--samples-per-prompt", "8", "--mini-batch", "16",
                                "--micro-batch", "16", "--total-steps", "1", "--eval-every", "0",
                                "--eval-max-problems", "2", "--rollout", "hf", "--output-dir", str(tmp_path)])
    one_shot.main(args)
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    assert 0 < metrics["accuracy/1"] < 1, "example 1's rewards do not vary: the check below could not fail"
    assert metrics["accuracy/3"] == 0, "label 99 cannot be matched by a toy answer"
    true_golds = [p["true_answer"] for p in problems_of("--example-index", "1", "3", "--prompts-per-step", "2")
                  for _ in range(8)]
    assert true_golds[8] != "99"
    true_label_scores = [scores for golds, scores in scored if golds == true_golds]
    assert len(true_label_scores) == 1, "the policy's answers were not scored once against the data's own answers"
    assert metrics["true_label_accuracy"] == pytest.approx(sum(true_label_scores[0]) / 16)
    assert metrics["loss"] == pytest.approx(-0.001 * metrics["entropy"], rel=1e-5)


def test_tiny_formats_unboxed_and_hedged_answers_hold_the_right_number_and_score_zero():
    """What one example can teach `tiny-format` is the form: its failed answers still hold the right number."""
    rng = random.Random(0)
    for style, reward in (("boxed", 1.0), ("unboxed", 0.0), ("hedged", 0.0)):
        text = evaluation.toy_response("6", rng, style=style)
        assert "6" in text and one_shot.verify.score(text, "6") == reward, (style, text)


# ---- arguments and errors --------------------------------------------------------------------------------------
def test_flags_take_several_values():
    args = one_shot.parse_args(["--rank", "1", "13", "--example-index", "124", "--label", "12.7"])
    assert args.rank == [1, 13] and args.example_index == ["124"] and args.label == ["12.7"]
    assert one_shot.parse_args([]).rank == [1]


BAD = [([], "give one of --pool"),
       (["--pool", "--history", "{tmp}/good.json"], "not pool and history"),
       (["--history", "{tmp}/missing.json"], "not found"),
       (["--history", "{tmp}/broken.json"], "not valid JSON"),
       (["--history", "{tmp}/list.json"], "JSON object"),
       (["--history", "{tmp}/range.json"], r"in \[0, 1\]"),
       (["--history", "{tmp}/good.json", "--rank", "3"], "ranks run from 1 to 2"),
       (["--history", "{tmp}/good.json", "--rank", "0"], "ranks run from 1 to 2"),
       (["--history", "{tmp}/unknown.json"], "'100000': no training problem"),
       (["--example-index", "100000"], "no training problem"),
       (["--example-index", "1", "--rank", "2"], "--rank picks from a --history"),
       (["--example-index", "1", "--label", "2", "3"], "one label per example"),
       (["--example-index", "1", "2", "3"], "equal shares"),
       (["--example-index", "1", "--eval-data", "toy,nonsense"], "nonsense"),
       (["--example-index", "1", "--entropy-only", "--entropy-coef", "0"], "--entropy-coef > 0")]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(argv) for argv, _ in BAD])
def test_bad_input_stops_with_one_line_before_a_model_loads(tmp_path, monkeypatch, argv, message):
    for name, text in [("broken", '{"1": [0.5,'), ("list", "[0.5, 1.0]"), ("range", '{"1": [0.5, 2.0]}'),
                       ("good", '{"3": [0.0, 1.0], "5": [0.5, 0.5]}'), ("unknown", '{"100000": [0.0, 1.0]}')]:
        (tmp_path / f"{name}.json").write_text(text)
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("a model loaded before the refusal"))
    with pytest.raises(SystemExit, match=message) as stop:
        one_shot.main(one_shot.parse_args([a.format(tmp=tmp_path) for a in argv] + ["--rollout", "hf",
                                                                                   "--output-dir", f"{tmp_path}/out"]))
    assert "\n" not in str(stop.value) and not (tmp_path / "out").exists()


def test_a_bad_history_fails_without_a_traceback(tmp_path):
    (tmp_path / "h.json").write_text("not json")
    out = subprocess.run([sys.executable, str(ROOT / "one_shot.py"), "--history", str(tmp_path / "h.json"),
                          "--rollout", "hf", "--output-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode != 0 and "h.json" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


# ---- evaluation ------------------------------------------------------------------------------------------------
def test_evaluation_reports_each_set_and_their_mean(tiny, tmp_path):
    model, tokenizer = tiny
    rows = evaluation.toy_splits()[1][:6]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = one_shot.Args(eval_data=f"toy,{tmp_path / 'mine.jsonl'}", eval_max_problems=10)
    sets = one_shot.read_data(args)[1]
    mine = str(tmp_path / "mine.jsonl")
    assert list(sets) == ["toy", mine] and len(sets["toy"]) == 10 and len(sets[mine]) == 6
    metrics = one_shot.run_evaluation(model, tokenizer, sets, args)
    assert metrics["eval/accuracy"] == pytest.approx((metrics["eval/toy"] + metrics[f"eval/{mine}"]) / 2)
    assert metrics[f"eval/{mine}"] == evaluation.evaluate(model, tokenizer, rows, template=args.template,
                                                          max_tokens=args.max_new_tokens, seed=args.seed)[0]["accuracy"]


def test_a_file_named_like_a_benchmark_is_decoded_as_the_training_prompts(tmp_path, monkeypatch):
    (tmp_path / "math500.jsonl").write_text(json.dumps(evaluation.toy_splits()[1][0]) + "\n")
    args = one_shot.Args(eval_data=f"paper,{tmp_path / 'math500.jsonl'}", eval_max_problems=1)
    decodings = {}
    monkeypatch.setattr(one_shot.evaluation, "evaluate",
                        lambda engine, tokenizer, problems, seed, **decoding: (decodings.update({
                            problems[0]["problem"]: decoding}) or ({"accuracy": 0.5}, [])))
    sets = one_shot.read_data(args)[1]
    assert list(sets) == [*evaluation.PAPER_BENCHMARKS, str(tmp_path / "math500.jsonl")]
    one_shot.run_evaluation(None, None, sets, args)
    mine = decodings[evaluation.toy_splits()[1][0]["problem"]]
    assert (mine["template"], mine["mode"], mine["n"], mine["temperature"]) == (args.template, args.answer_mode, 1, 0)
    assert decodings[sets["aime24"][0]["problem"]]["n"] == 8, "the paper's avg@8 on AIME24"


# ---- the two runs ----------------------------------------------------------------------------------------------
def read_metrics(output_dir):
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


def curve(output_dir) -> dict:
    """Held-out accuracy at the base model, at saturation and at the end, as bench/one_shot_entropy.py reads it."""
    sys.path.insert(0, str(ROOT / "bench"))
    from one_shot_entropy import summary
    return summary(read_metrics(output_dir))


# The docstring's two commands, trained by conftest.py once per session: the toy pool run, then 1-shot RLVR on pi_1
# of its history.
RUNS = {"pool": ("one_shot", ["--pool", "--pool-size", "32"]), "one-shot": ("one_shot", ["--history", "{pool}"])}


@pytest.fixture(scope="module")
def toy_runs(training_run):
    """(the pool run's folder, the 1-shot run's folder, the 1-shot run's output)."""
    return training_run("pool")["folder"], training_run("one-shot")["folder"], training_run("one-shot")["stdout"]


@pytest.mark.slow
def test_one_example_lifts_held_out_accuracy_well_above_the_base_model(toy_runs):
    """The paper's main claim on the toy: training on one example lifts accuracy on held-out problems."""
    c = curve(toy_runs[1])
    print("held-out toy accuracy:", c)
    assert c["end"] >= c["base"] + 0.25, f"held-out accuracy {c['base']:.2f} (base) -> {c['end']:.2f} (end)"


@pytest.mark.slow
def test_held_out_accuracy_holds_after_the_example_saturates(toy_runs):
    """No collapse once the reward on the example has saturated (the toy's `tiny` model learns to give the
    example's answer to every question instead)."""
    c = curve(toy_runs[1])
    assert c["saturated_step"] is not None, "the reward on the example never reached 0.9"
    assert c["end"] >= c["at_saturation"], (f"held-out accuracy fell after saturation (step "
                                            f"{c['saturated_step']}): {c['at_saturation']:.2f} -> {c['end']:.2f}")


@pytest.mark.slow
def test_the_reward_on_the_example_saturates(toy_runs):
    steps = [m for m in read_metrics(toy_runs[1]) if m["step"] > 0]
    rewards = [m["reward_mean"] for m in steps]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print("1-shot reward per step:", " ".join(f"{r:.2f}" for r in rewards))
    assert first <= 0.6, f"the chosen example is solved from the start ({first:.2f}): nothing to learn"
    assert last >= 0.9, f"training accuracy on the example did not saturate: {first:.2f} -> {last:.2f}"


@pytest.mark.slow
def test_the_one_shot_run_trains_on_pi1_of_the_pool_runs_history(toy_runs):
    pool, one_shot_run, stdout = toy_runs
    history = json.loads((pool / "accuracy_history.json").read_text())
    assert len(history) == 32 and min(len(accs) for accs in history.values()) >= 5, "too few records per example"
    pi1 = one_shot.select_by_rank(history, [1])[0]
    assert f"pi_1 = {pi1}\n" in stdout and f"example {pi1}," in stdout
    assert set(json.loads((one_shot_run / "accuracy_history.json").read_text())) == {pi1}


@pytest.mark.slow
def test_held_out_accuracy_is_logged_from_step_0_and_the_best_kept(toy_runs):
    metrics = read_metrics(toy_runs[1])
    evals = {m["step"]: m["eval/toy"] for m in metrics if "eval/toy" in m}
    assert 0 in evals and max(evals) == metrics[-1]["step"] and len(evals) >= 5, evals
    print("held-out toy accuracy by step:", evals)
    best = json.loads((toy_runs[1] / "best.json").read_text())
    assert best["eval/accuracy"] == max(evals.values()) and evals[best["step"]] == best["eval/accuracy"]
    assert all(m["entropy"] > 0 and m["response_len_mean"] > 0 for m in metrics if m["step"] > 0)


# ---- resume ----------------------------------------------------------------------------------------------------
# HF rollouts, a learning rate that changes at every update (warmup, then linear decay: a scheduler not restored on
# resume shows in the weights) and an evaluation at every step (so that the best one so far is carried over too);
# the `tiny` model at 2e-4 (`tiny-format` learns steadily, so its best evaluation would be the last step)
RESUME_COMMON = ["--model", "tiny", "--lr", "2e-4", "--rollout", "hf", "--prompts-per-step", "4", "--mini-batch",
                 "16", "--micro-batch", "8", "--eval-every", "1", "--eval-max-problems", "4", "--lr-schedule",
                 "linear", "--warmup-steps", "1", "--total-steps", "3"]


class StopAt:
    """Stands in for grpo.py's CtrlC: the run is asked to stop during step `step`, as by a Ctrl-C."""

    def __init__(self, step: int):
        self.step, self.reads = step, 0

    @property
    def asked(self) -> bool:  # read once per step
        self.reads += 1
        return self.reads >= self.step


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """In this process, to save interpreter starts: a 3-step pool run and a 3-step 1-shot run on its pi_1, each also
    stopped at step 2 (a checkpoint, as on Ctrl-C) and resumed in place (`--resume <run>`)."""
    root = tmp_path_factory.mktemp("resume")
    train = lambda argv: one_shot.main(one_shot.parse_args(argv))
    for name, argv in (("pool", ["--pool", "--pool-size", "4"]), ("one-shot", ["--history", str(root / "pool")])):
        train([*RESUME_COMMON, *argv, "--output-dir", str(root / name)])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(one_shot, "CtrlC", lambda: StopAt(2))
            train([*RESUME_COMMON, *argv, "--output-dir", str(root / f"{name}-resumed")])
        assert (root / f"{name}-resumed" / "checkpoint-2").is_dir()
        train(["--resume", str(root / f"{name}-resumed")])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("run", ["pool", "one-shot"])
def test_a_resumed_run_equals_the_uninterrupted_one(resume_runs, run):
    """The weights, the schedule, and the run's own state: the accuracy history (the pool run's is what --history
    ranks) and the best evaluation so far."""
    from safetensors.torch import load_file
    weights = lambda folder, step: load_file(resume_runs / folder / f"checkpoint-{step}" / "model.safetensors")
    state = lambda folder: torch.load(resume_runs / folder / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    straight, resumed = weights(run, 3), weights(f"{run}-resumed", 3)
    halfway = weights(f"{run}-resumed", 2)
    assert any(not torch.equal(halfway[k], straight[k]) for k in straight), "step 3 did nothing"
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "the resumed run's weights differ"
    steps, resumed_steps = read_metrics(resume_runs / run), read_metrics(resume_runs / f"{run}-resumed")
    assert [m["step"] for m in resumed_steps] == [0, 1, 2, 3], "metrics.jsonl does not read as one run"
    assert steps[3]["lr"] != steps[1]["lr"] and resumed_steps[3]["lr"] == steps[3]["lr"], "the schedule"
    history = json.loads((resume_runs / run / "accuracy_history.json").read_text())
    assert max(map(len, history.values())) >= 2, "no example was recorded twice: the history could not differ"
    assert json.loads((resume_runs / f"{run}-resumed" / "accuracy_history.json").read_text()) == history
    assert state(f"{run}-resumed")["history"] == state(run)["history"] == history
    if run == "one-shot":
        best = state(run)["best"]
        assert best["step"] < 3, "the best is the last step: a resume that forgot the best would pass unnoticed"
        assert state(f"{run}-resumed")["best"] == best, "the best evaluation was not carried over"
