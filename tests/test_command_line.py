"""Bad input on the command line: one clear line (SystemExit) before anything is written, and no traceback.

In-process: each script's parse_args and main, as `python <script> argv` calls them, so a case costs no fresh
interpreter; two real command lines show what a user sees."""
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
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
    ("grpo", ["--lr-schedule", "linaer"], r"invalid choice.*linear", False),
    ("grpo", ["--loss-agg", "mean"], r"invalid choice.*token-mean", False),
    ("grpo", ["--answer-mode", "strict"], r"invalid choice.*boxed", False),
    ("grpo", ["--template", "qwen"], r"invalid choice.*plain", False),
    ("grpo", ["--rollout", "sglang"], r"invalid choice.*hf", False),
    ("grpo", ["--samples-per-prompt", "1"], r"at least 2", False),
    ("grpo", ["--prompts-per-step", "0"], r"--prompts-per-step 0: must be at least 1", False),
    ("grpo", ["--prompts-per-step=-4"], r"--prompts-per-step -4: must be at least 1", False),
    ("grpo", ["--mini-batch", "48"], r"--mini-batch 48 must divide the batch", False),
    ("grpo", ["--resume", "{tmp}/checkpoint-2"], r"neither a run folder", False),
    ("grpo", ["--resume", "{tmp}/finished"], r"finished \(2 of 2 steps\); add --total-steps", False),
    ("grpo", ["--resume", "{tmp}/finished/checkpoint-1"], r"an older checkpoint, which keeps its weights only", False),
    ("grpo", ["--output-dir", "{tmp}/finished"], r"holds a run: continue it with --resume", False),
    ("grpo", ["--output-dir", "{tmp}/bad.jsonl"], r"a file", False),
    ("grpo", ["--model", "missing/model"], r"--model missing/model: no such folder", False),
    ("grpo", ["--model", "./missing/model"], r"no such folder", False),
    ("grpo", ["--model", "{tmp}"], r"not a model folder", False),
    ("grpo", ["--train-data", "{tmp}/missing.jsonl"], r"missing\.jsonl", False),
    ("grpo", ["--train-data", "{tmp}/bad.jsonl", "--rollout", "hf"], r"--problem-key", False),
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
    ("eval", ["--model", "missing/model"], r"--model missing/model: no such folder", False),
    ("eval", ["--model", "{tmp}"], r"not a model folder", False),
    ("eval", ["--output-dir", "{tmp}/bad.jsonl"], r"is a file or holds results", False),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run folder as a finished 2-step run leaves it (what the refusals read: args.json, each checkpoint's
    trainer_state.pt, and only the latest keeping its optimizer state); save_checkpoint's own layout is the resume
    tests'."""
    import torch
    import grpo
    folder = tmp_path_factory.mktemp("runs") / "finished"
    for step in (1, 2):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        torch.save({"step": step, "world_size": 1}, folder / f"checkpoint-{step}" / "trainer_state.pt")
    (folder / "checkpoint-2" / "optimizer").mkdir()
    args = grpo.Args(total_steps=2, save_every=1, output_dir=str(folder))
    (folder / "args.json").write_text(json.dumps(dataclasses.asdict(args)))
    return folder


@pytest.mark.parametrize("script,argv,message,loads", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_command_line_stops_with_one_line_and_writes_nothing(script, argv, message, loads, tmp_path,
                                                                 monkeypatch, capsys, request):
    module = importlib.import_module(script)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    if any("{tmp}/finished" in a for a in argv):  # a real run, built once for the cases that need one
        shutil.copytree(request.getfixturevalue("finished_run"), tmp_path / "finished")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable here anyway; offline, it is so at once
    loaded = []
    for name in ("resolve_model_path", "load_model"):  # eval.py's, which every script loads its models through
        real = getattr(evaluation, name)
        monkeypatch.setattr(evaluation, name, lambda *a, real=real, **k: loaded.append(a) or real(*a, **k))
    argv = [a.format(tmp=tmp_path) for a in argv]
    output = [] if "--output-dir" in argv else ["--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        module.main(module.parse_args(argv + output))
    # argparse's refusals (a choice) print a short usage line and the error line, and exit with status 2
    text = capsys.readouterr().err.strip().splitlines()[-1] if isinstance(stop.value.code, int) else str(stop.value)
    assert stop.value.code not in (0, None) and "\n" not in text, text
    assert re.search(message, text), f"{text!r} does not say {message!r}"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "it wrote before refusing"
    assert loads or not loaded, f"a model was loaded before the refusal: {loaded}"


@pytest.mark.parametrize("script,argv,message", [
    ("grpo.py", ["--train-data", "{tmp}/missing.jsonl"], "missing.jsonl"),
    ("grpo.py", ["--model", "Qwen/Qwen2.5-Math-1.5B"], "the hub cannot be reached"),
    ("eval.py", ["--benchmarks", "aime24", "--data-dir", "{tmp}/missing"], "does not exist"),
])
def test_a_real_command_line_shows_the_line_and_no_traceback(script, argv, message, tmp_path):
    """HF_HUB_OFFLINE: a machine with a network would otherwise download the model; without one (CI, here) the hub
    check fails as fast (0.3 s measured), where transformers retried for 51 s."""
    start = time.time()
    out = subprocess.run([sys.executable, str(ROOT / script), *[a.format(tmp=tmp_path) for a in argv],
                          "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert time.time() - start < 60, "a refusal should take seconds"
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "out").exists()
