"""Bad input on the command line: one clear line (SystemExit) before anything is written, and no traceback.

In-process: each script's parse_args and main, as `python <script> argv` calls them, so a case costs no fresh
interpreter; two real command lines show what a user sees."""
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402

# (script, argv, message, may a model load first): {tmp} is the test's folder, which holds bad.jsonl (a file
# without a "problem" column); the exit text must hold the message (a regular expression)
CASES = [
    ("grpo", ["--temperature", "0"], r"must be > 0", False),
    ("grpo", ["--top-p", "1.5"], r"\(0, 1\]", False),
    ("grpo", ["--lr-schedule", "linaer"], r"linear", False),
    ("grpo", ["--loss-agg", "mean"], r"token-mean", False),
    ("grpo", ["--answer-mode", "strict"], r"boxed", False),
    ("grpo", ["--template", "qwen"], r"plain", False),
    ("grpo", ["--rollout", "sglang"], r"hf", False),
    ("grpo", ["--samples-per-prompt", "1"], r"at least 2", False),
    ("grpo", ["--vllm-tensor-parallel", "2"], r"needs torchrun", False),
    ("grpo", ["--resume", "{tmp}/checkpoint-2"], r"no trainer_state\.pt", False),
    ("grpo", ["--train-data", "{tmp}/missing.jsonl"], r"missing\.jsonl", True),
    ("grpo", ["--train-data", "{tmp}/bad.jsonl", "--rollout", "hf"], r"--problem-key", True),
    ("hapo", ["--length-weight", "2"], r"--length-weight 2\.0: at most 1", False),
    ("hapo", ["--length-weight=-0.1"], r"--length-weight -0\.1: must be at least 0", False),
    ("hapo", ["--length-reward", "sigmoid"], r"--length-reward: invalid choice: 'sigmoid'", False),
    ("hapo", ["--history-mode", "max"], r"--history-mode: invalid choice: 'max'", False),
    ("hapo", ["--train-problems=-2"], r"--train-problems -2: must be at least 0", False),
    ("ppo", ["--gamma", "1.5"], r"--gamma", False),
    ("ppo", ["--lam=-0.1"], r"--lam", False),
    ("ppo", ["--value-clip", "0"], r"--value-clip", False),
    ("ppo", ["--critic-warmup-steps", "100"], r"--critic-warmup-steps", False),
    ("ppo", ["--kl-coef=-0.1"], r"--kl-coef", False),
    ("ppo", ["--rollout", "hf", "--critic-model", "/nonexistent/critic"], r"/nonexistent/critic", True),
    ("eval", ["--benchmarks", "math500,math5000"], r"unknown benchmark 'math5000'", False),
    ("eval", ["--benchmarks", "math500", "--data-dir", "/nonexistent/eval"], r"/nonexistent/eval .*does not exist",
     False),
    ("eval", ["--benchmarks", "math500", "--n", "8", "--temperature", "0"], r"same greedy response", False),
    ("eval", ["--engine", "hf", "--tensor-parallel-size", "2"], r"--engine vllm", False),
]


@pytest.mark.parametrize("script,argv,message,loads", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_command_line_stops_with_one_line_and_writes_nothing(script, argv, message, loads, tmp_path,
                                                                 monkeypatch):
    module = importlib.import_module(script)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    loaded = []
    for name in ("resolve_model_path", "load_model"):  # eval.py's, which every script loads its models through
        real = getattr(evaluation, name)
        monkeypatch.setattr(evaluation, name, lambda *a, real=real, **k: loaded.append(a) or real(*a, **k))
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        module.main(module.parse_args([a.format(tmp=tmp_path) for a in argv] + ["--output-dir", str(output)]))
    text = str(stop.value)
    assert stop.value.code not in (0, None) and "\n" not in text, text
    assert re.search(message, text), f"{text!r} does not say {message!r}"
    assert not output.exists(), "it set up the run's folder before refusing"
    assert loads or not loaded, f"a model was loaded before the refusal: {loaded}"


@pytest.mark.parametrize("script,argv,message", [
    ("grpo.py", ["--train-data", "{tmp}/missing.jsonl"], "missing.jsonl"),
    ("eval.py", ["--benchmarks", "aime24", "--data-dir", "{tmp}/missing"], "does not exist"),
])
def test_a_real_command_line_shows_the_line_and_no_traceback(script, argv, message, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / script), *[a.format(tmp=tmp_path) for a in argv],
                          "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "out").exists()
