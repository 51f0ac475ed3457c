"""hapo.py: the length-reward table, the history's update order, resume with the history, and the default run."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import hapo  # noqa: E402

C = math.cos(math.pi / 4)  # c(0.5) = -c(1.5)


# ---- the reward table ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x,if_correct,if_wrong", [
    # c(x) = cos(x pi/2) for x < 2, else -1; correct: max(-0.7, c); wrong: min(0, c)
    (0.0, 1.0, 0.0),
    (0.5, C, 0.0),
    (1.0, 0.0, 0.0),
    (1.5, -0.7, -C),
    (2.0, -0.7, -1.0),
    (3.0, -0.7, -1.0),
])
def test_cosine_length_reward_by_hand(x, if_correct, if_wrong):
    h = 20
    assert hapo.length_reward(int(x * h), h, True) == pytest.approx(if_correct, abs=1e-12)
    assert hapo.length_reward(int(x * h), h, False) == pytest.approx(if_wrong, abs=1e-12)
    assert hapo.length_reward(int(x * h), h, True, weight=0.5) == pytest.approx(0.5 * if_correct, abs=1e-12)
    assert hapo.length_reward(int(x * h), h, False, weight=0.5) == pytest.approx(0.5 * if_wrong, abs=1e-12)


@pytest.mark.parametrize("x,if_correct,if_wrong", [
    # 1 - x below h (correct only), 0 up to 1.1 h, then -(x - 1.1) floored at -0.7 (correct) / -1 (wrong)
    (0.0, 1.0, 0.0),
    (0.5, 0.5, 0.0),
    (1.0, 0.0, 0.0),
    (1.05, 0.0, 0.0),
    (1.5, -0.4, -0.4),
    (2.0, -0.7, -0.9),
    (3.0, -0.7, -1.0),
])
def test_linear_length_reward_by_hand(x, if_correct, if_wrong):
    h = 20
    assert hapo.length_reward(round(x * h), h, True, "linear") == pytest.approx(if_correct, abs=1e-12)
    assert hapo.length_reward(round(x * h), h, False, "linear") == pytest.approx(if_wrong, abs=1e-12)


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_no_history_no_length_reward(shape):
    for length in (0, 1, 7, 1000):
        assert hapo.length_reward(length, None, True, shape) == 0.0
        assert hapo.length_reward(length, None, False, shape) == 0.0


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_any_correct_response_outscores_any_wrong_one_for_weights_up_to_1(shape):
    lengths, h = range(0, 200, 3), 17
    for w in (0.0, 0.3, 1.0):
        worst_right = min(1 + hapo.length_reward(n, h, True, shape, w) for n in lengths)
        best_wrong = max(0 + hapo.length_reward(n, h, False, shape, w) for n in lengths)
        assert worst_right >= 0.3 - 1e-12 and best_wrong <= 0.0, (w, worst_right, best_wrong)


# ---- the history -----------------------------------------------------------------------------------------------
def test_batch_is_scored_against_the_history_from_before_it():
    args = hapo.Args()
    history = {"q0": (10, 1)}  # keyed by the problem's text, as main keeps it
    # problem q0 (h = 10) and problem q1 (no history yet), two responses each
    rewards = hapo.history_length_rewards(history, problems=["q0", "q0", "q1", "q1"], lengths=[5, 8, 6, 9],
                                          correct=[True, True, True, False], args=args)
    # the 8 is scored against 10, not against the 5 of the same batch (which would give cos(0.8 pi) < 0)
    expected = [math.cos(0.5 * math.pi / 2), math.cos(0.8 * math.pi / 2), 0.0, 0.0]
    assert rewards == pytest.approx(expected, abs=1e-12)
    assert history == {"q0": (5, 3), "q1": (6, 1)}, "after the batch: h = min(h, shortest correct in the batch)"


def test_history_takes_only_correct_lengths_and_never_grows_in_min_mode():
    args = hapo.Args()
    history = {"q0": (10, 2)}
    hapo.history_length_rewards(history, ["q0", "q0", "q1"], [4, 12, 3], [False, True, False], args)
    assert history == {"q0": (10, 3)}, "a wrong 4 must not lower h, a correct 12 must not raise it; q1 has none"


def test_history_mean_mode_is_the_running_mean_of_correct_lengths():
    args = hapo.Args(history_mode="mean")
    history = {}
    hapo.history_length_rewards(history, ["q0", "q0", "q0"], [10, 20, 99], [True, True, False], args)
    assert history == {"q0": (15, 2)}
    rewards = hapo.history_length_rewards(history, ["q0", "q0"], [15, 30], [True, True], args)
    assert rewards == pytest.approx([0.0, -0.7])  # x = 1 and x = 2 against the mean 15
    assert history["q0"] == pytest.approx((75 / 4, 4))


def test_response_length_does_not_count_the_stop_token():
    assert hapo.response_length({"response_ids": [5, 6, 7, 2], "truncated": False}) == 3
    assert hapo.response_length({"response_ids": [5, 6, 7, 8], "truncated": True}) == 4, \
        "a truncated response has no stop token to drop"


# ---- the training problems -----------------------------------------------------------------------------------
def test_the_default_cuts_only_the_toy_task_and_every_cut_is_printed(capsys):
    problems = [{"problem": f"q{i}", "answer": str(i)} for i in range(500)]
    assert hapo.training_problems(problems, hapo.Args()) == problems[:320], "toy default: 320 problems, 5 visits each"
    assert "training on the first 320 of 500 problems" in capsys.readouterr().out
    from_file = hapo.training_problems(problems, hapo.Args(train_data="dsr.json"))
    assert from_file == problems, "a --train-data file must not be cut to the toy's 320 by default"
    assert capsys.readouterr().out == ""
    assert hapo.training_problems(problems, hapo.Args(train_data="dsr.json", train_problems=10)) == problems[:10]
    assert "training on the first 10 of 500 problems (--train-problems)" in capsys.readouterr().out
    assert hapo.training_problems(problems, hapo.Args(train_problems=500)) == problems
    assert hapo.training_problems(problems, hapo.Args(train_problems=600)) == problems
    assert "only 500 problems" in capsys.readouterr().out


# ---- whole runs ------------------------------------------------------------------------------------------------
def read_metrics(output_dir):
    """The training steps' metrics (step 0 holds the evaluation before training only)."""
    return [m for line in open(Path(output_dir) / "metrics.jsonl") if (m := json.loads(line))["step"] > 0]


def tenths(metrics, key):
    values = [m[key] for m in metrics]
    tenth = max(1, len(values) // 10)
    return sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth


@pytest.fixture(scope="module")
def hapo_run(training_run):
    """The default run (no arguments), shared by the assertions below: it is the expensive part of this file."""
    return [m for m in training_run("hapo")["metrics"] if m["step"] > 0]  # step 0: the evaluation before training


@pytest.mark.slow
def test_default_run_accuracy_climbs(hapo_run):
    first, last = tenths(hapo_run, "accuracy")
    print(f"accuracy first tenth {first:.3f}, last tenth {last:.3f}")
    assert first <= 0.5, f"the task is too easy at the start: {first:.3f}"  # step 0: ~0.25 (eval.build_tiny_model)
    assert last >= 0.85 and last - first >= 0.3, f"the default run did not learn to answer: {first:.3f} -> {last:.3f}"


@pytest.mark.slow
def test_default_run_responses_get_shorter(hapo_run):
    """The toy's shortest right answer is 9 tokens with the stop token, and hapo.py's default model (tiny-verbose)
    starts at 17.5-18.7 by padding it with 0-3 filler sentences. GRPO keeps most of them (bench seed 1: 17.5 over
    its first tenth, 15.1 over its last). The issue's bar, HAPO 30% below GRPO at the same accuracy, is checked
    against a real GRPO run by bench/hapo_vs_grpo.py; running grpo.py here too would double this file's time, so the
    test asks for 30% below HAPO's own start instead."""
    for key in ("response_len_mean", "correct_len_mean"):
        first, last = tenths(hapo_run, key)
        print(f"{key} first tenth {first:.2f}, last tenth {last:.2f}")
        assert last <= 0.7 * first, f"the length reward did not shorten responses: {key} {first:.2f} -> {last:.2f}"
        assert last <= 10.0, f"{key} {last:.2f} over the last tenth: the fillers were not cut (answer alone: 9)"


@pytest.mark.slow
def test_default_run_builds_a_history_that_shrinks(hapo_run):
    assert hapo_run[-1]["history_share"] >= 0.95, "nearly every training problem should have a correct answer"
    assert hapo_run[-1]["scored_with_history"] >= 0.95
    first, last = tenths([m for m in hapo_run if m["history_share"] > 0], "history_len_mean")
    print(f"mean h_i first tenth {first:.2f}, last tenth {last:.2f}")
    assert last <= first - 0.5, f"h_i should fall as shorter correct answers are found: {first:.2f} -> {last:.2f}"
    assert {"eval/correct_len_mean", "eval/response_len_p90", "correct_len_p90"} <= set(hapo_run[-1])


# 4 problems, 4 per step: every step revisits every problem, so from step 2 on the history shapes the rewards. The rate
# warms up over the first 3 updates (2 per step), so a schedule not restored on resume would log step 1's at step 3.
RESUME_RUN = ["--rollout", "hf", "--prompts-per-step", "4", "--train-problems", "4", "--mini-batch", "16",
              "--micro-batch", "8", "--eval-every", "0", "--eval-max-problems", "4", "--warmup-steps", "3"]


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run_weights_history_and_lr(tmp_path):
    """4 steps straight; 2 steps, then that run resumed in place to 4 (its folder and --total-steps 4 alone: the
    run's own args.json and latest checkpoint bring back the rest, the history included). In this process, to save
    interpreter starts."""
    for steps, run in (("4", "straight"), ("2", "resumed")):
        hapo.main(hapo.parse_args([*RESUME_RUN, "--total-steps", steps, "--output-dir", str(tmp_path / run)]))
    hapo.main(hapo.parse_args(["--resume", str(tmp_path / "resumed"), "--total-steps", "4"]))
    resumed_steps, straight_steps = read_metrics(tmp_path / "resumed"), read_metrics(tmp_path / "straight")
    assert [m["step"] for m in resumed_steps] == [1, 2, 3, 4], "metrics.jsonl should read as one run"
    assert resumed_steps[2]["scored_with_history"] > 0, "the resumed run's first step saw no history: not restored"
    assert any(m["length_reward_mean"] != 0 for m in resumed_steps[2:]), "the history changed no reward: vacuous"
    steady = lambda steps: [{k: v for k, v in m.items() if not k.startswith(("time_", "tokens_per_s", "eval/"))}
                            for m in steps]
    assert steady(resumed_steps) == steady(straight_steps), "the resumed run logged other numbers"
    assert straight_steps[2]["lr"] != straight_steps[0]["lr"], "the rate did not change: the check is vacuous"
    state = lambda run: torch.load(tmp_path / run / "checkpoint-4" / "trainer_state.pt", weights_only=False)
    assert state("straight")["history"], "no history was saved"
    assert state("resumed")["history"] == state("straight")["history"]
    from safetensors.torch import load_file
    straight = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors")
    halfway = load_file(tmp_path / "resumed" / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(halfway[k], straight[k]) for k in straight), "steps 3-4 changed nothing"
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"{k} differs after resume"


def test_evaluation_counts_no_truncated_response_in_correct_lengths(monkeypatch):
    """As in training: a truncated response with a right answer counts for accuracy, not for correct_len_*."""
    samples = [{"length": 5, "correct": 1.0, "truncated": False}, {"length": 40, "correct": 1.0, "truncated": True},
               {"length": 7, "correct": 0.0, "truncated": False}]
    monkeypatch.setattr(hapo.evaluation, "evaluate", lambda *a, **k: ({"accuracy": 2 / 3}, samples))
    metrics = hapo.run_evaluation(None, None, [], hapo.Args())
    assert metrics["eval/accuracy"] == pytest.approx(2 / 3)
    assert metrics["eval/correct_len_mean"] == 5 and metrics["eval/correct_len_p90"] == 5, metrics


@pytest.mark.slow
def test_truncated_right_answers_are_not_counted_as_correct_lengths(tmp_path):
    """With 8 new tokens the tiny model's shortest right answer ("The answer is \\boxed{x}.") fits but its stop
    token does not: verify.py marks it right, the reward (and so correct_len) treats it as wrong."""
    hapo.main(hapo.parse_args(["--rollout", "hf", "--total-steps", "1", "--prompts-per-step", "4", "--mini-batch",
                               "32", "--micro-batch", "16", "--max-new-tokens", "8", "--eval-every", "0",
                               "--eval-max-problems", "4", "--output-dir", str(tmp_path)]))
    step = read_metrics(tmp_path)[0]
    assert step["truncated_share"] == 1.0 and step["accuracy"] > 0, "no truncated right answer: vacuous test"
    assert step["reward_mean"] == 0.0
    assert "correct_len_mean" not in step and "correct_len_p90" not in step, step


def test_help_lists_the_hapo_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        hapo.parse_args(["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--length-weight", "--length-reward", "--history-mode", "--train-problems"):
        assert flag in shown
# ---- fidelity (issue 21) ---------------------------------------------------------------------------------------
def test_the_hapo_template_is_the_papers_system_turn_and_the_bare_question():
    """HAPO's train_grpo.py sends prompting_utils.py's SYSTEM_PROMPT as the system turn and the question alone as the
    user turn, through the model's chat template. The source writes "\\\\boxed{}": one backslash reaches the model.
    Through a Qwen-style chat template that is, byte for byte, Qwen2.5-Math's own evaluation prompt."""
    from test_eval import llama_style_tokenizer
    tokenizer = llama_style_tokenizer()
    tokenizer.chat_template = evaluation.CHAT_TEMPLATE  # the tiny model's: Qwen2's frame without a default system
    prompt = evaluation.build_prompt("What is 1+1?", tokenizer, "hapo")
    assert prompt == ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                      "<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == evaluation.build_prompt("What is 1+1?", None, "qwen25-math-cot")
    assert hapo.parse_args(["--template", "hapo"]).template == "hapo"
