"""Shared by the test files: each algorithm's default run, once per pytest session, trained while the other tests
run."""
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
RUNS: dict[str, Future] = {}  # script -> its default run's metrics
TRAINER = ThreadPoolExecutor(max_workers=1)  # one run at a time, in the order the tests read them
CHILDREN: set[subprocess.Popen] = set()


def train(script: str, threads: int = 0) -> list[dict]:
    """`python <script>.py` (its output folder aside, no arguments) and the run's metrics; a failed run fails the test
    that reads it, with its output's tail. threads: torch's intra-op threads (0: its default)."""
    folder = Path(tempfile.mkdtemp(prefix=f"default-{script}-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with subprocess.Popen([sys.executable, str(ROOT / f"{script}.py"), "--output-dir", str(folder)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        CHILDREN.add(child)
        try:
            stdout, stderr = child.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
        finally:
            CHILDREN.discard(child)
    assert child.returncode == 0, f"{script}.py failed: {stdout[-3000:]}{stderr[-3000:]}"
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def pytest_collection_finish(session):
    """The default runs that the selected tests read (test_<script>.py's tests asking for default_run) start now, one
    after another on one core, while the other tests take the other: on 2 cores the runs cost little wall time."""
    scripts = [Path(str(item.fspath)).stem.removeprefix("test_") for item in session.items
               if "default_run" in getattr(item, "fixturenames", ())]
    if not scripts:
        return
    sys.path.insert(0, str(ROOT))
    import eval as evaluation
    for script in dict.fromkeys(scripts):
        # a built-in model is built here on a fresh cache (on both cores), not by each process that needs it at once
        evaluation.resolve_model_path(importlib.import_module(script).Args().model)
        RUNS[script] = TRAINER.submit(train, script, threads=1)


def pytest_sessionfinish(session):
    """A session that ends early (-x, ^C) neither starts the runs left nor waits for the one training."""
    TRAINER.shutdown(wait=False, cancel_futures=True)
    for child in list(CHILDREN):
        child.terminate()


@pytest.fixture(scope="session")
def default_run():
    """default_run("grpo"): `python grpo.py` with no arguments (but its output folder), run once per session and
    shared by every test that reads it: the run's metrics, one dict per logged step."""
    def run(script: str) -> list[dict]:
        if script not in RUNS:  # a run the collection did not foresee: trained now
            RUNS[script] = TRAINER.submit(train, script)
        return RUNS[script].result()
    return run
