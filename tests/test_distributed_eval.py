"""eval.py under torchrun (2 CPU ranks, gloo): each rank evaluates a share of the problems and rank 0 gathers them,
so the results equal one process's over all problems."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval as evaluation  # noqa: E402
from test_distributed import HAS_GLOO, torchrun  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = pytest.mark.skipif(not HAS_GLOO, reason="torch.distributed with the gloo backend is not available")
# 25 problems: rank 0 takes 12, rank 1 takes 13, so an off-by-one in the shards or the re-indexing shows
SMALL = ["--limit", "25", "--max-tokens", "24"]


def one_process(*args):
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def read_run(folder: Path) -> tuple[dict, list[dict]]:
    results = json.loads((folder / "results.json").read_text())
    return results, [json.loads(line) for line in open(folder / "samples.jsonl")]


def without_timing(benchmark: dict) -> dict:
    return {k: v for k, v in benchmark.items() if k != "seconds"}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """eval.py in one process on the 25 problems, per engine, run once and shared: (results, samples)."""
    runs = {}

    def run(engine: str):
        if engine not in runs:
            folder = tmp_path_factory.mktemp(f"one-{engine}")
            one_process(*SMALL, "--engine", engine, "--output-dir", folder)
            runs[engine] = read_run(folder)
        return runs[engine]
    return run


def test_shards_cover_every_problem_once():
    for count in (0, 1, 5, 25, 181):
        for shards in (1, 2, 3, 8):
            bounds = [evaluation.shard_bounds(count, s, shards) for s in range(shards)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


# eval.py's command lines that the worker runs on 2 ranks, each into its folder
CLI_RUNS = {"greedy": [*SMALL, "--engine", "hf"],
            "pass-at-k": [*SMALL, "--engine", "hf", "--samples", "4", "--temperature", "1", "--k", "1,2,4"]}


@pytest.mark.slow
def test_two_ranks_greedy_equal_one_process(launch, one_process_run):
    """Greedy decoding: the same samples, in the same order with the same indices, and the same metrics. (A vLLM
    engine per rank goes through the same sharding and gathering in eval.evaluate: the training-time test below.)"""
    one, one_samples = one_process_run("hf")
    two, two_samples = read_run(launch / "greedy")
    assert two["data_parallel_shards"] == 2 and one["data_parallel_shards"] == 1
    assert [s["index"] for s in two_samples] == list(range(25))
    assert two_samples == one_samples
    assert without_timing(two["benchmarks"]["toy"]) == without_timing(one["benchmarks"]["toy"])
    accuracy = two["benchmarks"]["toy"]["accuracy"]
    assert 0 < accuracy < 1, f"accuracy {accuracy}: every sample alike, so a mix-up of samples could not show"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_one_engine_over_two_ranks_equals_one_process(tmp_path, one_process_run):
    """--tensor-parallel-size 2: one vLLM engine split over both ranks (each holds half of every layer) evaluates
    all 25 problems; greedy, it gives one process's samples."""
    torchrun(ROOT / "eval.py", *SMALL, "--engine", "vllm", "--tensor-parallel-size", "2", "--output-dir",
             tmp_path / "tp", timeout=600)
    one, one_samples = one_process_run("vllm")
    split, split_samples = read_run(tmp_path / "tp")
    assert split["data_parallel_shards"] == 1
    assert split_samples == one_samples
    assert without_timing(split["benchmarks"]["toy"]) == without_timing(one["benchmarks"]["toy"])


@pytest.mark.slow
def test_two_ranks_sampled_pass_at_k_over_all_samples(launch):
    """n samples per problem from both ranks: pass@k is computed on rank 0 from all 25 x 4 samples."""
    results, samples = read_run(launch / "pass-at-k")
    toy = results["benchmarks"]["toy"]
    assert [s["index"] for s in samples] == [i for i in range(25) for _ in range(4)]
    counts = [sum(s["correct"] for s in samples[4 * i:4 * i + 4]) for i in range(25)]
    for k in (1, 2, 4):
        assert toy[f"pass@{k}"] == pytest.approx(sum(evaluation.pass_at_k(4, int(c), k) for c in counts) / 25)
    assert toy["accuracy"] == pytest.approx(sum(counts) / 100)


def evaluate_worker(root: str) -> None:
    """eval.py's CLI_RUNS through eval.main, as `torchrun eval.py` would run them. Then what a training script does
    at evaluation under torchrun: every rank calls eval.evaluate, each must generate only its share, and every rank
    get all 25 results. First "hf" (--rollout hf): the policy sharded by FSDP on both ranks; batches of 4 give rank 0
    (12 prompts) 3 generate calls to rank 1's 4, so rank 0 must add a filler call to stay in the collectives. Then
    "vllm" where installed: a vLLM engine per rank (external_launcher), which joins the trainer's process group as in
    a training run. All in one process group: a launch starts three interpreters."""
    join = torch.distributed.init_process_group
    torch.distributed.init_process_group = lambda *a, **k: torch.distributed.is_initialized() or join(*a, **k)
    leave, evaluation.leave_process_group = evaluation.leave_process_group, torch.distributed.barrier
    for name, argv in CLI_RUNS.items():
        evaluation.main(evaluation.parse_args([*argv, "--output-dir", str(Path(root) / name)]))
    import grpo
    _, world, device = grpo.init_distributed()
    model, tokenizer = evaluation.load_model("tiny")
    engines = {"hf": grpo.shard_model(model, device, world)}
    if HAS_VLLM:
        engines["vllm"] = lambda: evaluation.make_engine(evaluation.resolve_model_path("tiny"), seed=0)
    generated = []
    real_generate = evaluation.generate
    evaluation.generate = lambda engine, tokenizer, prompts, **kw: generated.extend(prompts) or \
        real_generate(engine, tokenizer, prompts, **kw)
    results = {}
    for kind, engine in engines.items():
        engine = engine() if kind == "vllm" else engine
        generated.clear()
        metrics, samples = evaluation.evaluate(engine, tokenizer, evaluation.load_benchmark("toy")[:25],
                                               template="qwen-math-train", max_tokens=24, mode="boxed", batch_size=4)
        share = len(generated)
        # one problem for two ranks: rank 0's share is empty, yet it must join rank 1's collectives (a vLLM engine's
        # data-parallel steps, FSDP's forwards) or rank 1 waits for ever
        _, one_sample = evaluation.evaluate(engine, tokenizer, evaluation.load_benchmark("toy")[:1],
                                            template="qwen-math-train", max_tokens=24, mode="boxed", batch_size=4)
        results[kind] = {"metrics": metrics, "samples": samples, "generated": share, "one_sample": one_sample}
    Path(root, f"evaluate.rank{torch.distributed.get_rank()}").write_text(json.dumps(results))
    if not HAS_VLLM:  # a vLLM engine tears the process group down itself
        leave()


@pytest.mark.slow
def test_training_time_evaluation_splits_the_set_between_ranks(launch, one_process_run):
    for rank, share in ((0, 12), (1, 13)):
        results = json.loads((launch / f"evaluate.rank{rank}").read_text())
        assert list(results) == (["hf", "vllm"] if HAS_VLLM else ["hf"])
        for kind, result in results.items():
            one, one_samples = one_process_run(kind)
            assert result["generated"] == share, f"{kind}: rank {rank} generated {result['generated']}, not {share}"
            assert result["samples"] == [{k: v for k, v in s.items() if k != "benchmark"} for s in one_samples]
            assert result["one_sample"] == result["samples"][:1]
            assert result["metrics"]["accuracy"] == one["benchmarks"]["toy"]["accuracy"]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    evaluate_worker(sys.argv[2])
