"""Shared by the test files: the whole training runs that tests read (each algorithm's default run; PCL's beside
uniform prompts; 1-shot's pool run and the 1-shot run on its history), each once per pytest session. One core trains
them, one after another, while the other runs every test that reads none; then the tests that read them run, and
this core trains whichever run the other has not started (so both cores finish together)."""
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS: dict[str, Future] = {}  # name -> {"folder", "stdout", "metrics"}
SPECS: dict[str, tuple[str, list[str]]] = {}  # name -> (script, argv)
TRAINER = ThreadPoolExecutor(max_workers=1)  # one run at a time, in the order of the files
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
    for name in list(RUNS):  # a run named in argv was submitted, so trained (or claimed), before this one
        if any(f"{{{name}}}" in a for a in argv):
            argv = [a.replace(f"{{{name}}}", str(result(name)["folder"])) for a in argv]
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


def claim(name: str) -> None:
    """Train a queued run in this thread, unless the trainer thread has just started it."""
    mine = Future()
    if not RUNS[name].cancel():
        return
    RUNS[name] = mine
    mine.set_running_or_notify_cancel()
    try:
        mine.set_result(train(*SPECS[name]))
    except BaseException as e:
        mine.set_exception(e)  # the tests that read it fail with it
        if not isinstance(e, Exception):  # ^C
            raise


def result(name: str) -> dict:
    """A run's result. Until it is done this thread trains the runs the trainer thread has not started, this one
    first, then the last queued: no core waits while the other trains and a run is left."""
    while not (RUNS[name].done() and not RUNS[name].cancelled()):  # cancelled: being claimed by the other thread
        queued = [n for n in (name, *reversed(SPECS)) if not (RUNS[n].running() or RUNS[n].done())]
        if queued:
            claim(queued[0])
        else:
            time.sleep(0.2)
    return RUNS[name].result()


def pytest_collection_finish(session):
    """The runs that the selected tests read (tests asking for training_run) start now, in the order of the files,
    after their built-in models are built (in parallel, one core each); those tests move to the end, the last
    file's first, so that this core claims the runs queued last."""
    reads = lambda item: "training_run" in getattr(item, "fixturenames", ())  # noqa: E731
    modules = list(dict.fromkeys(item.module for item in session.items if reads(item)))
    if not modules:
        return
    sys.path.insert(0, str(ROOT))
    for module in modules:
        SPECS.update(runs_of(module))
    import eval as evaluation
    groups: dict[str, list[str]] = {}  # models that share a first stage (tiny, tiny-format): one process, in turn
    for model in sorted({importlib.import_module(script).Args().model for script, _ in SPECS.values()}):
        groups.setdefault(repr(evaluation.TINY_MODELS.get(model, {}).get("fillers")), []).append(model)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a tiny model's build gains little from a second thread
    builds = [subprocess.Popen([sys.executable, "-c", f"import eval; [eval.resolve_model_path(m) for m in {group!r}]"],
                               cwd=ROOT, env=env) for group in groups.values()]
    # one core trains the runs from now on: a second thread here, or in the processes tests start, would only contend
    # for it (measured: both sides ~15% slower)
    import torch
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    # the runs start when the first build ends and frees a core; by then the other process has built `tiny` (its first
    # model), which the first run reads (were it not there, that run would build it itself: slower, not wrong)
    while all(build.poll() is None for build in builds):
        time.sleep(0.2)
    for name, (script, argv) in SPECS.items():
        RUNS[name] = TRAINER.submit(train, script, argv)
    assert all(build.wait() == 0 for build in builds), "a built-in model failed to build"
    session.items[:] = [item for item in session.items if not reads(item)] + \
        [item for module in reversed(modules) for item in session.items if reads(item) and item.module is module]


def pytest_sessionfinish(session):
    """A session that ends early (-x, ^C) neither starts the runs left nor waits for the one training."""
    TRAINER.shutdown(wait=False, cancel_futures=True)
    for child in list(CHILDREN):
        child.terminate()


@pytest.fixture(scope="session")
def training_run():
    """training_run("grpo"): a run of the test file's RUNS (or its script's default run), trained once per session
    and shared by every test that reads it: {"folder", "stdout", "metrics": one dict per logged step}."""
    return result


@pytest.fixture(scope="module")
def launch(request, tmp_path_factory) -> Path:
    """The test file's worker on 2 ranks (`torchrun <file> worker FOLDER`), once per file: its folder."""
    from test_distributed import torchrun
    root = tmp_path_factory.mktemp("two-ranks")
    torchrun(request.module.__file__, "worker", root, timeout=900)
    return root
