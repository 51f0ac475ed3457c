"""The algorithm scripts are forks of grpo.py: a block that a fork copies must stay identical to grpo.py's.

Every top-level function or class that a fork defines under the same name as grpo.py must have the same source,
unless it is listed below with the reason it differs. The list is the map of what each paper changes."""
import ast
import functools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORKS = ["hapo.py", "one_shot.py", "pcl.py", "ppo.py"]
# Every script carries its own copy of these (the project's shape): a fork that drops one fails.
REQUIRED = ["ChunkedLogprobEntropy", "gemm_dtype", "matmul", "chunk_length", "logprobs_and_entropy",
            "make_rollout_engine", "push_weights", "parse_args", "check_args", "save_checkpoint", "load_checkpoint",
            "CtrlC", "Args", "main"]
# Differ in every fork by nature: each script's hyperparameters and its main loop.
ALWAYS_DIFFERENT = {"Args", "main"}
# (fork, name): why that block differs from grpo.py's.
MEANT_TO_DIFFER: dict[tuple[str, str], str] = {
    ("pcl.py", "Experiment"): "60 steps on the toy (the paper trains until the validation accuracy plateaus)",
    ("pcl.py", "ModelData"): "the PCL paper's models and data (Qwen3 bases, MATH, DeepScaleR); its template and prompt "
                             "limit are not in our notes",
    ("pcl.py", "Rollout"): "the PCL paper's values (m = 512 prompts x n = 16 samples, 4,096 tokens)",
    ("pcl.py", "GRPO"): "the PCL paper's GRPO: no std normalisation, no KL, no entropy bonus, seq-mean-token-mean, "
                        "one optimizer step per batch (the ratio stays 1, so the clip is idle)",
    ("pcl.py", "Optimisation"): "the PCL paper's learning rate, weight decay and clip are not in our notes; the clip "
                                "is V's too",
    ("ppo.py", "Experiment"): "60 steps by default: the toy saturates by step ~45, and the critic makes a step dearer",
    ("ppo.py", "check_args"): "a critic needs no group (--samples-per-prompt 1 is fine); PPO's own flags: gamma and "
                              "lambda at most 1, a positive value clip, the critic's warm-up within the run, the "
                              "critic's mini-batch, --critic-model",
    ("hapo.py", "run_evaluation"): "HAPO measures length: adds the mean and p90 length of the right responses "
                                   "(right and not truncated, as the reward counts them) from eval.py's samples",
    ("hapo.py", "Experiment"): "the paper's value: 1,250 steps (5 epochs over 2,000 problems at 8 per step)",
    ("hapo.py", "ModelData"): "the default model is tiny-verbose (longer idle sentences: something for the length "
                              "reward to cut); the paper's values (R1-Distill-Qwen-1.5B, 2,000 DeepScaleR problems, "
                              "the hapo template, prompts cut to 512)",
    ("hapo.py", "Rollout"): "the paper's values (8 prompts x 2 samples, T 0.7, 32k tokens); a truncated response is "
                            "wrong, not 0",
    ("hapo.py", "GRPO"): "the paper's values (KL 0.04, no entropy bonus, seq-mean-token-mean, 16 responses a step)",
    ("hapo.py", "Optimisation"): "the paper's values (no weight decay, linear decay to 0)",
    ("one_shot.py", "Experiment"): "the toy's 1-shot run: 20 steps, evaluated every 2 (post-saturation "
                                   "generalisation is a curve)",
    ("one_shot.py", "ModelData"): "tiny-format (what one example can teach it is the answer's form); --eval-data "
                                  "takes several sets, `paper` by default on a real model",
    ("one_shot.py", "GRPO"): "the paper's KL and entropy coefficients (0.001 each) on by default",
    ("one_shot.py", "Optimisation"): "lr 1e-4: tiny-format at 2e-4 drifts toward its example's answer",
    ("one_shot.py", "read_data"): "several evaluation sets by name (`paper`: the paper's six benchmarks), not one",
    ("one_shot.py", "run_evaluation"): "evaluates every set with eval.py's protocol for it, and eval/accuracy is "
                                       "their mean: the paper's six-benchmark average, by which it picks its "
                                       "reported checkpoint",
}


@functools.cache  # each script parsed once per session, not once per listed difference
def top_level_blocks(path: Path) -> dict[str, str]:
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    # the blocks' own lines: ast.get_source_segment splits the whole file again for every block
    return {node.name: "".join(lines[node.lineno - 1:node.end_lineno]) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def present_forks() -> list[str]:
    return [f for f in FORKS if (ROOT / f).exists()]


def test_grpo_has_every_required_block():
    blocks = top_level_blocks(ROOT / "grpo.py")
    assert not [n for n in REQUIRED if n not in blocks]


@pytest.mark.parametrize("fork", FORKS)
def test_fork_keeps_grpo_blocks_identical(fork):
    if not (ROOT / fork).exists():
        pytest.skip(f"{fork} is not written yet")
    reference, blocks = top_level_blocks(ROOT / "grpo.py"), top_level_blocks(ROOT / fork)
    missing = [n for n in REQUIRED if n not in blocks]
    assert not missing, f"{fork} lacks its own copy of {missing}"
    drifted = [n for n in blocks if n in reference and blocks[n] != reference[n]
               and n not in ALWAYS_DIFFERENT and (fork, n) not in MEANT_TO_DIFFER]
    assert not drifted, (f"{fork} changed {drifted} against grpo.py: copy grpo.py's version, or add it to "
                         "MEANT_TO_DIFFER with the reason")


def test_every_listed_difference_is_real():
    """A stale entry would hide a future drift: each listed block must exist in both files and differ."""
    stale = []
    for (fork, name), reason in MEANT_TO_DIFFER.items():
        assert reason.strip(), f"({fork}, {name}) needs a reason"
        if not (ROOT / fork).exists():
            continue
        reference, blocks = top_level_blocks(ROOT / "grpo.py"), top_level_blocks(ROOT / fork)
        if name not in reference or name not in blocks or reference[name] == blocks[name]:
            stale.append((fork, name))
    assert not stale, f"listed as different but identical or absent: {stale}"


def test_the_check_catches_a_drift(tmp_path):
    """Guard against a comparison that cannot fail: a one-character change to a copied block is seen."""
    source = (ROOT / "grpo.py").read_text()
    changed = source.replace("return centered.view(-1)", "return centered.view((-1))", 1)
    assert changed != source
    (tmp_path / "fork.py").write_text(changed)
    original, edited = top_level_blocks(ROOT / "grpo.py"), top_level_blocks(tmp_path / "fork.py")
    assert [n for n in original if original[n] != edited[n]] == ["group_advantages"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
