"""Shared by the test files: each algorithm's default run, once per pytest session."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python <script> args...` from the repository root; a failed run fails the test with its output's tail."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """default_run("grpo"): `python grpo.py` with no arguments (but its output folder), run once per session and
    shared by every test that reads it: the run's metrics, one dict per logged step."""
    runs = {}

    def run(script: str) -> list[dict]:
        if script not in runs:
            folder = tmp_path_factory.mktemp(f"default-{script}")
            run_script(f"{script}.py", "--output-dir", folder)
            runs[script] = read_metrics(folder)
        return runs[script]
    return run
