"""Shared by the test files: the whole training runs that tests read (each algorithm's default run; PCL's beside
uniform prompts; 1-shot's pool run and the 1-shot run on its history), each once per pytest session, trained one
after another on one core while the other tests take the other."""
import importlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS: dict[str, Future] = {}  # name -> {"folder", "stdout", "metrics"}
TRAINER = ThreadPoolExecutor(max_workers=1)  # one run at a time, in the order the tests read them
CHILDREN: set[subprocess.Popen] = set()


def runs_of(module) -> dict[str, tuple[str, list[str]]]:
    """A test file's runs: its RUNS ({name: (script, argv)}; "{name}" in argv is that earlier run's folder), else
    its script's default run (`python <script>.py`)."""
    script = Path(module.__file__).stem.removeprefix("test_")
    return getattr(module, "RUNS", {script: (script, [])})


def train(script: str, argv: list[str]) -> dict:
    """`python <script>.py argv` on one thread, its output folder aside; a failed run fails the tests that read it,
    with its output's tail."""
    folder = Path(tempfile.mkdtemp(prefix=f"run-{script}-"))
    for name, run in list(RUNS.items()):  # a run named in argv was submitted, so trained, before this one
        argv = [a.replace(f"{{{name}}}", str(run.result()["folder"])) if f"{{{name}}}" in a else a for a in argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with subprocess.Popen([sys.executable, str(ROOT / f"{script}.py"), *argv, "--output-dir", str(folder)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        CHILDREN.add(child)
        try:
            stdout, stderr = child.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
        finally:
            CHILDREN.discard(child)
    assert child.returncode == 0, f"{script}.py {' '.join(argv)} failed: {stdout[-3000:]}{stderr[-3000:]}"
    metrics = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    return {"folder": folder, "stdout": stdout, "metrics": metrics}


def pytest_collection_finish(session):
    """The runs that the selected tests read (tests asking for training_run) start now, in the order of the files."""
    modules = [item.module for item in session.items if "training_run" in getattr(item, "fixturenames", ())]
    if not modules:
        return
    sys.path.insert(0, str(ROOT))
    import eval as evaluation
    for module in dict.fromkeys(modules):
        for name, (script, argv) in runs_of(module).items():
            # a built-in model is built here on a fresh cache (on both cores), not by each process that needs it
            evaluation.resolve_model_path(importlib.import_module(script).Args().model)
            RUNS[name] = TRAINER.submit(train, script, argv)


def pytest_sessionfinish(session):
    """A session that ends early (-x, ^C) neither starts the runs left nor waits for the one training."""
    TRAINER.shutdown(wait=False, cancel_futures=True)
    for child in list(CHILDREN):
        child.terminate()


@pytest.fixture(scope="session")
def training_run():
    """training_run("grpo"): a run of the test file's RUNS (or its script's default run), trained once per session
    and shared by every test that reads it: {"folder", "stdout", "metrics": one dict per logged step}."""
    return lambda name: RUNS[name].result()
