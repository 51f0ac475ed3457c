"""verify.py: what counts as a correct final answer, and that hostile model text cannot break scoring.

Every expectation below is what math-verify 0.9.0 does today; where it is wrong, the case sits in KNOWN_GAPS
(and the README) instead of being asserted as correct.
"""

import concurrent.futures
import json
import logging
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # verify.py sits in the repo root
import verify

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MATH500 = DATA / "eval" / "math500" / "test.jsonl"

HOSTILE_TIMEOUT = 0.5
SLACK = 3.0  # past its timeout: worker timer, kill grace, IPC, and a replacement worker's start (~1 s, busy 2 cores)


def reasoning(answer: str) -> str:
    """A response the way models write them: a few sentences of work, then the box."""
    return (
        "Let's think step by step. First we write down what is given and set up the equation. "
        "Multiplying both sides by the common denominator and collecting like terms gives a simpler form; "
        "checking the edge cases shows none of them is excluded, so the computation stands.\n\n"
        f"**Final Answer**\n\\[\n\\boxed{{{answer}}}\n\\]"
    )


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start the workers once, so that no timing below includes their start-up."""
    verify.score_batch([reasoning("1")] * 2, ["1"] * 2)


# ---- equal and not equal: the boxed answer against the gold --------------------------------------------------

EQUIVALENCE_TABLE = [
    # fractions and decimals
    ("\\dfrac{3}{7}", "\\frac{3}{7}", 1.0),
    ("\\tfrac{3}{7}", "\\frac{3}{7}", 1.0),
    ("\\frac37", "\\frac{3}{7}", 1.0),
    ("3/7", "\\frac{3}{7}", 1.0),
    ("\\frac12", "\\frac{1}{2}", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\frac{2}{4}", "\\frac{1}{2}", 1.0),
    ("1/2", "0.5", 1.0),
    ("0.428571", "\\frac{3}{7}", 1.0),
    ("\\frac{1}{3}", "\\frac{1}{2}", 0.0),
    ("0.43", "\\frac{3}{7}", 0.0),
    ("12.80", "12.8", 1.0),
    ("\\frac{64}{5}", "12.8", 1.0),
    ("12.9", "12.8", 0.0),
    ("27", "27.0", 1.0),
    ("6.0", "6", 1.0),
    ("06", "6", 1.0),
    # equations against values
    ("x=5", "5", 1.0),
    ("x = 5", "5", 1.0),
    ("5", "x=5", 1.0),
    ("y = 2x+3", "2x+3", 1.0),
    ("x=6", "5", 0.0),
    ("y=5", "x=5", 0.0),
    # degrees
    ("30^\\circ", "30^\\circ", 1.0),
    ("30", "30^\\circ", 1.0),
    ("30^{\\circ}", "30", 1.0),
    ("31^\\circ", "30^\\circ", 0.0),
    # multiple choice
    ("\\text{(B)}", "\\text{(B)}", 1.0),
    ("B", "\\text{(B)}", 1.0),
    ("(B)", "\\text{(B)}", 1.0),
    ("\\textbf{(B)}", "\\text{(B)}", 1.0),
    ("C", "\\text{(B)}", 0.0),
    # intervals
    ("(2, \\infty)", "(2,\\infty)", 1.0),
    ("(-\\infty,0]", "(-\\infty, 0]", 1.0),
    ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", 1.0),
    ("[-2,7]", "x \\in [-2,7]", 1.0),
    ("[2,\\infty)", "(2,\\infty)", 0.0),
    ("(-\\infty,0)", "(-\\infty, 0]", 0.0),
    # sets ignore order, tuples do not
    ("\\{1,2,3\\}", "\\{3,2,1\\}", 1.0),
    ("3, 1, 2", "1,2,3", 1.0),
    ("1,-2", "-2,1", 1.0),
    ("\\{1,2\\}", "\\{1,2,3\\}", 0.0),
    ("(3,-2)", "(3,-2)", 1.0),
    ("\\left(3, -2\\right)", "(3,-2)", 1.0),
    ("(-2,3)", "(3,-2)", 0.0),
    # percentages
    ("50\\%", "50\\%", 1.0),
    ("50", "50\\%", 1.0),
    ("0.5", "50\\%", 1.0),
    ("5\\%", "50\\%", 0.0),
    # thousands separators
    ("1,000", "1000", 1.0),
    ("1000", "1,000", 1.0),
    ("1{,}000", "1000", 1.0),
    ("10080", "10,\\!080", 1.0),
    ("1,001", "1000", 0.0),
    # units and currency
    ("5\\text{ cm}", "5", 1.0),
    ("5.4", "5.4 \\text{ cents}", 1.0),
    ("\\$32,348", "\\$32,\\!348", 1.0),
    ("6\\text{ cm}", "5", 0.0),
    # negative numbers
    ("-3", "-3", 1.0),
    ("-\\frac{1}{2}", "-0.5", 1.0),
    ("3", "-3", 0.0),
    # pi, e, infinity
    ("\\pi", "\\pi", 1.0),
    ("\\frac{\\pi}{2}", "\\frac{\\pi}2", 1.0),
    ("2\\pi", "\\pi", 0.0),
    ("3.14", "\\pi", 0.0),
    ("-\\infty", "\\infty", 0.0),
    # roots
    ("2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", 1.0),
    ("2^{1/2}", "\\sqrt{2}", 1.0),
    ("\\sqrt{2}", "\\sqrt{3}", 0.0),
    # matrices and vectors
    ("\\begin{pmatrix} 0.5 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1/2 \\\\ 2 \\end{pmatrix}", 1.0),
    ("\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 0.0),
    # expressions and complex numbers
    ("x^2+2x+1", "(x+1)^2", 1.0),
    ("x^2+1", "(x+1)^2", 0.0),
    ("y^2+2y+1", "(x+1)^2", 0.0),
    ("3i+2", "2+3i", 1.0),
    ("2-3i", "2+3i", 0.0),
    ("10^{3}", "1000", 1.0),
    ("1.5 \\times 10^{3}", "1500", 1.0),
    # words
    ("\\text{Evelyn}", "\\text{Evelyn}", 1.0),
    ("Evelyn", "\\text{Evelyn}", 1.0),
    ("\\text{Navin}", "\\text{Evelyn}", 0.0),
    # more than one answer in the box is not the answer
    ("5, 6", "5", 0.0),
    ("5 \\text{ or } 6", "5", 0.0),
]


@pytest.mark.parametrize(
    "answer, gold, expected", EQUIVALENCE_TABLE, ids=[f"{a} vs {g}" for a, g, _ in EQUIVALENCE_TABLE]
)
def test_boxed_answer_against_gold(answer, gold, expected):
    assert verify.score(reasoning(answer), gold) == expected


# ---- what the response looks like around the box -------------------------------------------------------------

RESPONSE_TABLE = [
    # (response, gold, mode, expected)
    ("The answer is 5.", "5", "boxed", 0.0),  # training reward: no box, no reward
    ("The answer is 5.", "5", "flex", 1.0),
    ("$\\boxed{5}$ wait, that is wrong: $\\boxed{6}$", "6", "boxed", 1.0),
    ("$\\boxed{5}$ wait, that is wrong: $\\boxed{6}$", "5", "boxed", 0.0),
    ("\\boxed{\\boxed{5}}", "5", "boxed", 1.0),
    ("\\fbox{5}", "5", "boxed", 1.0),
    ("so the answer is $\\boxed 5$.", "5", "boxed", 1.0),
    ("$\\boxed {5}$", "5", "boxed", 1.0),
    ("\\boxed{5", "5", "boxed", 0.0),
    ("\\boxed{}", "5", "flex", 0.0),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac12", "flex", 1.0),
    ("The answer is: **12**.", "12", "flex", 1.0),
    ("The answer is 7, not 8.", "7", "flex", 1.0),
    ("The answer is $x = 3$", "3", "flex", 1.0),
    ("So the answer is 3/4.", "\\frac{3}{4}", "flex", 1.0),
    ("the answer is \\(2\\sqrt{2}\\).", "\\sqrt{8}", "flex", 1.0),
    ("3 apples and 4 pears make 7 fruits in all", "7", "flex", 1.0),
    ("There are 1,000 ways to do it.", "1000", "flex", 1.0),
    ("We end up at -7 in the end", "-7", "flex", 1.0),
    ("$\\boxed{5}$, though the answer is 6", "5", "flex", 1.0),  # a box beats the phrase
    ("The answer is 5. $\\boxed{" + "1+" * 600 + "1}$", "5", "flex", 0.0),  # the last box, too long to score
    ("no numbers at all", "5", "flex", 0.0),
    ("", "5", "flex", 0.0),
]


@pytest.mark.parametrize(
    "response, gold, mode, expected", RESPONSE_TABLE, ids=[f"{m}: {r[:40]}" for r, _, m, _ in RESPONSE_TABLE]
)
def test_response_scoring(response, gold, mode, expected):
    assert verify.score(response, gold, mode=mode) == expected


def test_last_boxed_forms():
    assert verify.last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert verify.last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}", "escaped braces are not group delimiters"
    assert verify.last_boxed("\\boxed {x}") == "x"
    assert verify.last_boxed("$\\boxed 5$") == "5"
    assert verify.last_boxed("\\fbox{7}") == "7"
    assert verify.last_boxed("\\boxed{}") == ""
    assert verify.last_boxed("no box here") is None
    assert verify.last_boxed("\\boxed{1} then \\boxed{2") is None, "the last box is unclosed"


def test_extract_answer_modes():
    text = "We find 3 and 4, so the answer is 12."
    assert verify.extract_answer(text) is None
    assert verify.extract_answer(text, mode="flex") == "12"
    assert verify.extract_answer("sum is 3, then 4", mode="flex") == "4"
    assert verify.extract_answer("\\boxed{2} and the answer is 3", mode="flex") == "2"


# ---- math-verify's gaps: asserted as they are, so that an upgrade that fixes one shows up here -------------

KNOWN_GAPS = [
    # (answer, gold, what math-verify says, why that is wrong)
    ("5\\text{ m}", "5\\text{ cm}", 1.0, "units are dropped, never compared"),
    ("\\{1,2\\}", "(1,2)", 1.0, "the set {1, 2} equals the open interval (1, 2)"),
    ("x>2", "(2,\\infty)", 0.0, "an inequality is not matched to the interval it describes"),
    ("x \\ge 2", "[2,\\infty)", 0.0, "same, closed end"),
    ("\\frac{\\pi}{6}", "30^\\circ", 0.0, "radians against degrees"),
    ("\\varnothing", "\\emptyset", 0.0, "two spellings of the empty set"),
    ("1\\,000", "1000", 0.0, "a thin-space thousands separator"),
    ("1 000", "1000", 0.0, "a space thousands separator"),
    ("5.", "5", 0.0, "a full stop inside the box"),
    ("1e3", "1000", 0.0, "scientific e-notation"),
    ("0.4286", "\\frac{3}{7}", 0.0, "decimals must match to 6 places"),
    ("2.71828", "e", 0.0, "decimals must match to 6 places"),
    ("(1,2)", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 0.0, "a tuple against a column vector"),
    ("5 dollars", "5", 0.0, "plain-text units outside \\text{} are only known for some units (cm is, dollars is not)"),
    ("x = 5 = 6", "6", 1.0, "a chain of equalities counts as its last member"),
]


@pytest.mark.parametrize("answer, gold, says, why", KNOWN_GAPS, ids=[f"{a} vs {g}" for a, g, _, _ in KNOWN_GAPS])
def test_known_gap_of_math_verify(answer, gold, says, why):
    assert verify.score(reasoning(answer), gold) == says, f"math-verify changed on a known gap ({why}): update README"


# ---- golds --------------------------------------------------------------------------------------------------

# Golds that do not score 1.0 against themselves, with the reason. Empty for math-verify 0.9.0.
MATH500_SELF_MATCH_EXCEPTIONS = {}


def math500_golds():
    return [json.loads(line)["answer"] for line in MATH500.read_text().splitlines()]


def test_every_math500_gold_boxed_scores_one_against_itself():
    golds = math500_golds()
    scores = verify.score_batch([reasoning(g) for g in golds], golds)
    failing = {g for g, s in zip(golds, scores) if s != 1.0}
    assert failing == set(MATH500_SELF_MATCH_EXCEPTIONS)


def test_every_math500_gold_matches_itself_through_math_verify():
    """\\displaystyle is dropped by math-verify but not by verify's exact-text shortcut, so this is parse+verify."""
    golds = math500_golds()
    scores = verify.score_batch([reasoning("\\displaystyle " + g) for g in golds], golds)
    failing = {g for g, s in zip(golds, scores) if s != 1.0}
    assert failing == set(MATH500_SELF_MATCH_EXCEPTIONS)


def test_gold_is_parseable():
    assert verify.gold_is_parseable("\\frac{3}{7}")
    assert verify.gold_is_parseable("\\text{(B)}")
    assert not verify.gold_is_parseable("\\unknowncmd")
    assert not verify.gold_is_parseable("")


def test_unparseable_gold_never_makes_a_response_correct_and_is_logged_once(caplog):
    gold = "\\begin{cases} x \\end{cases}"
    with caplog.at_level(logging.WARNING, logger="verify"):
        assert verify.score(reasoning(gold), gold) == 0.0, "the same text as an unparseable gold is not correct"
        assert verify.score(reasoning(gold), gold) == 0.0
    assert [repr(gold) in r.getMessage() for r in caplog.records] == [True], "one warning, quoting the gold"


def test_numeric_gold_is_read_as_its_string():
    assert verify.score(reasoning("27"), 27.0) == 1.0


def test_caller_bugs_raise():
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        verify.score_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="mode"):
        verify.score("\\boxed{1}", "1", mode="strict")
    with pytest.raises(ValueError, match="mode"):
        verify.extract_answer("\\boxed{1}", mode="last")
    with pytest.raises(ValueError, match="timeout"):
        verify.score("\\boxed{1}", "1", timeout=0)
    with pytest.raises(ValueError, match="workers"):
        verify.score_batch(["\\boxed{1}"], ["1"], workers=0)
    with pytest.raises(TypeError, match="gold"):
        verify.score("\\boxed{1}", None)


# ---- hostile model text --------------------------------------------------------------------------------------

# name: (text, expected score in boxed mode, in flex mode); None where only the time limit decides (a fast machine
# may finish sympy's work on 300 nested parentheses and score the 5 inside them as right)
HOSTILE = {
    "2 MB of words then a box": ("word " * 400_000 + "\\boxed{5}", 1.0, 1.0),
    "2 MB of words, no box": ("word " * 400_000, 0.0, 0.0),
    "2 MB of digits": ("1" * 2_000_000, 0.0, 0.0),
    "2 MB of backslashes": ("\\" * 2_000_000, 0.0, 0.0),
    "10k nested parentheses": ("\\boxed{" + "(" * 10_000 + "5" + ")" * 10_000 + "}", 0.0, 0.0),  # over the length cap
    "300 nested parentheses (under the length cap)": ("\\boxed{" + "(" * 300 + "5" + ")" * 300 + "}", None, None),
    "10k nested braces": ("\\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}", 0.0, 0.0),
    "power tower": ("\\boxed{9^{9^{9^{9^{9^{9}}}}}}", 0.0, 0.0),
    "huge factorial": ("\\boxed{(10^{10})!}", 0.0, 0.0),
    "lone surrogates": ("\ud800\udfff \\boxed{5\udc00}", 0.0, 0.0),
    "NUL bytes": ("\x00" * 1000 + "\\boxed{5\x00}", 0.0, 0.0),
    "thousands of unclosed boxes": ("\\boxed{" * 5000, 0.0, 0.0),
    # boxed mode reads the last box, which never closes; flex mode falls back to the last closed one
    "a box then thousands of unclosed ones": ("\\boxed{5}" + "\\boxed{" * 5000, 0.0, 1.0),
    "an unclosed box then 2 MB of braces": ("\\boxed{" + "{" * 2_000_000, 0.0, 0.0),
    "the phrase 100k times": ("the answer is " * 100_000, 0.0, 0.0),
}


@pytest.mark.parametrize("mode", verify.MODES)
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_response_scores_within_timeout(name, mode):
    text, *expected = HOSTILE[name]
    start = time.monotonic()
    result = verify.score(text, "5", mode=mode, timeout=HOSTILE_TIMEOUT)
    elapsed = time.monotonic() - start
    expected = expected[verify.MODES.index(mode)]
    assert result in (0.0, 1.0) if expected is None else result == expected
    assert elapsed < HOSTILE_TIMEOUT + SLACK, f"{name} took {elapsed:.2f} s"


@pytest.mark.parametrize("mode", verify.MODES)
def test_code_in_the_response_is_never_executed(tmp_path, mode):
    marker = tmp_path / "executed"
    payload = f"__import__('os').system('touch {marker}')"
    verify.score(f"\\boxed{{{payload}}}", "0", mode=mode)
    verify.score(f"The answer is {payload}", "0", mode=mode)
    verify.score(f"The answer is {payload.replace('(', ' (')}", "0", mode=mode)
    assert not marker.exists()


def test_non_string_response_scores_zero():
    assert verify.score_batch([None, b"\\boxed{5}", 5], ["5", "5", "5"]) == [0.0, 0.0, 0.0]


# ---- score_batch: same as score, in parallel, robust to stuck and dying workers --------------------------------


def mixed_items():
    golds = math500_golds()[:50]
    responses, item_golds = [], []
    for k, gold in enumerate(golds):
        for response in (
            reasoning(gold),
            reasoning("\\displaystyle " + gold),
            reasoning(f"{gold} + {k + 1}"),
            f"So the answer is {gold}.",
            reasoning(golds[(k + 1) % len(golds)]),
            HOSTILE["the phrase 100k times"][0][:200] + str(k),
        ):
            responses.append(response)
            item_golds.append(gold)
    return responses, item_golds


@pytest.mark.parametrize("mode", verify.MODES)
def test_score_batch_equals_score_item_by_item(mode):
    responses, golds = mixed_items()
    verify._verdicts.clear()  # so that both sides really check, instead of reading each other's remembered verdicts
    one_by_one = [verify.score(r, g, mode=mode) for r, g in zip(responses, golds)]
    verify._verdicts.clear()
    assert verify.score_batch(responses, golds, mode=mode) == one_by_one
    verify._verdicts.clear()
    reversed_order = verify.score_batch(responses[::-1], golds[::-1], mode=mode)
    assert reversed_order[::-1] == one_by_one, "results must not depend on call order"
    assert verify.score_batch(responses, golds, mode=mode) == one_by_one, "remembered verdicts are the same verdicts"
    assert 0 < sum(one_by_one) < len(one_by_one)


def test_duplicate_items_are_checked_once_and_scored_alike():
    verify._verdicts.clear()
    responses = [reasoning("\\frac{2}{4}")] * 8 + [reasoning("\\frac{3}{4}")] * 8
    assert verify.score_batch(responses, ["0.5"] * 16) == [1.0] * 8 + [0.0] * 8
    assert len(verify._verdicts) == 2


def test_score_batch_from_threads():
    responses, golds = mixed_items()
    expected = verify.score_batch(responses, golds)
    verify._verdicts.clear()
    halves = [(responses[:150], golds[:150]), (responses[150:], golds[150:])]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda rg: verify.score_batch(*rg), halves + halves))
    assert results[0] + results[1] == expected
    assert results[2] + results[3] == expected


def test_score_from_a_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(verify.score(reasoning("\\dfrac12"), "0.5")))
    thread.start()
    thread.join()
    assert results == [1.0]


def score_in_child(_):
    return verify.score_batch([reasoning("\\frac{1}{2}"), reasoning("3")], ["0.5", "4"])


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_score_batch_from_a_worker_process(start_method):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(start_method)) as pool:
        assert list(pool.map(score_in_child, [0])) == [[1.0, 0.0]]
    assert verify.score(reasoning("2"), "2") == 1.0, "the parent's workers still serve the parent"


@pytest.fixture
def workers_with_test_faults(monkeypatch):
    """Fresh workers that crash on gold "<crash>" and hang uninterruptibly on gold "<hang>"."""
    monkeypatch.setenv("VERIFY_TEST_FAULTS", "1")
    verify._shutdown_pool()
    verify.score_batch([reasoning("1")] * 2, ["1"] * 2)
    yield
    verify._shutdown_pool()


def test_worker_that_dies_is_replaced_and_its_item_scores_zero(workers_with_test_faults):
    golds = [f"{k}.5" for k in range(10)] + ["<crash>"] + [f"{k}.5" for k in range(11, 21)]
    responses = [reasoning(f"\\frac{{{2 * k + 1}}}{{2}}") for k in range(21)]
    expected = [1.0] * 10 + [0.0] + [1.0] * 10
    assert verify.score_batch(responses, golds, workers=2) == expected, "the crash costs its own item only"
    assert verify.score(reasoning("4"), "4") == 1.0


def test_worker_stuck_in_c_code_is_killed_at_the_timeout(workers_with_test_faults):
    start = time.monotonic()
    assert verify.score(reasoning("3"), "<hang>", timeout=0.3) == 0.0
    assert time.monotonic() - start < 0.3 + SLACK
    golds = [f"{k}.5" for k in range(6)] + ["<hang>"] + [f"{k}.5" for k in range(7, 13)]
    responses = [reasoning(f"\\frac{{{2 * k + 1}}}{{2}}") for k in range(13)]
    assert verify.score_batch(responses, golds, timeout=0.3) == [1.0] * 6 + [0.0] + [1.0] * 6


def test_a_gold_whose_parse_times_out_or_kills_its_worker_is_unknown_not_unparseable(workers_with_test_faults):
    assert verify.gold_is_parseable("<hang>", timeout=0.3) is None
    assert verify.gold_is_parseable("<crash>") is None
    assert verify.gold_is_parseable("\\unknowncmd") is False and verify.gold_is_parseable("\\frac{3}{7}") is True


def started_workers(n):
    """The pool's workers once n of them have started (a remembered verdict reaches no worker: ask new ones)."""
    for k in range(1000):
        if verify._pool and len(verify._pool.workers) >= n and all(w.ready for w in verify._pool.workers):
            return verify._pool.workers
        verify.score_batch([reasoning(f"{k} + 0.25")], [f"{k}.25"], workers=n)
        time.sleep(0.05)
    raise AssertionError("workers did not start")


def test_worker_killed_while_idle_is_replaced_without_blaming_an_item():
    for worker in started_workers(2):
        worker.process.kill()
        worker.process.wait()
    responses = [reasoning(f"\\frac{{{2 * k + 1}}}{{2}}") for k in range(4)]
    assert verify.score_batch(responses, [f"{k}.5" for k in range(4)]) == [1.0] * 4
