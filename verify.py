"""Is a model's final answer mathematically equal to the gold answer? math-verify decides the equivalence.

The reward of every RLVR script and the accuracy of eval.py come from here. API:

    last_boxed(text) -> str | None
        Content of the last \\boxed{...} or \\fbox{...} (nested braces and escaped \\{ \\} handled; `\\boxed {x}`
        and the bare `\\boxed 5` style accepted). None when there is none or the last one is unclosed.
    extract_answer(text, mode="boxed") -> str | None
        "boxed": the last box only (training reward: an unboxed answer earns nothing).
        "flex":  the last box, else what follows the last "the answer is" / "final answer is" (up to the end
                 of the sentence, or the $...$ right after it), else the last number (`-3`, `1,000`, `2.5`, `3/4`).
    score(response, gold, mode="boxed", timeout=5.0) -> 1.0 | 0.0
    score_batch(responses, golds, mode="boxed", workers=None, timeout=5.0) -> list[float]
        Same as `score` item by item, in parallel worker processes (None: one per CPU, at most 8), order kept.
        A pair (answer, gold) seen twice is checked once: finished verdicts are remembered (GRPO groups repeat).
    gold_is_parseable(gold, timeout=5.0) -> bool | None
        Whether math-verify can parse the gold at all; a gold that cannot be parsed scores 0 against anything
        (and is logged once, with its text). None: unknown, the parse timed out or its worker died (ask again).

What counts as correct: the extracted answer, wrapped as `\\boxed{answer}`, parses (LaTeX only) to something that
math-verify's `verify` finds equal to the gold, itself parsed as `\\boxed{gold}`. A gold that gives no sympy object
makes every response wrong. Two shortcuts skip math-verify's ~2-5 ms parse of the answer: the gold's own text (up
to whitespace, \\dfrac/\\tfrac and \\left/\\right) scores 1 when the gold parses, and two plain integers are
compared as integers.

Safety, because model text is hostile input:
  - Nothing is ever executed: only math-verify's LaTeX parser sees model text (its plain-expression extractor,
    which goes through sympy's eval-based `parse_expr`, is never used), and extraction is linear-time.
  - An extracted answer longer than MAX_ANSWER_CHARS, or one with a NUL byte or a lone surrogate, scores 0.
  - math-verify runs only in worker processes started with `python verify.py --worker` (they import this file
    and math-verify, nothing of the caller: not torch, not vLLM), kept alive between calls and killed at exit.
    Each item gets `timeout` seconds by an interval timer inside the worker; a worker stuck in C code past
    `timeout + KILL_GRACE_S` is killed and replaced, and so is one that dies; its item scores 0.
  - So this works the same from the main thread, from threads (math-verify's own signal.alarm timeouts would
    raise there; they are switched off and ours live in the worker) and from other processes.
The timeout counts from when a worker takes the item, not the one-time worker start (~0.5 s) after a kill.
Concurrent calls from several threads are served one after another. Caller bugs (lengths that differ, an unknown
mode, a timeout <= 0) raise ValueError; a gold that is not a string (or a number) raises TypeError.
"""

import atexit
import collections
import functools
import logging
import math
import os
import re
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait

log = logging.getLogger(__name__)

MODES = ("boxed", "flex")
MAX_ANSWER_CHARS = 1000  # longest MATH500 gold is 53 chars; 400 nested parentheses already take math-verify ~3.5 s
KILL_GRACE_S = 0.5  # a worker gets this long past its own timer before it is killed
WORKER_START_TIMEOUT_S = 60.0
MAX_FAILED_STARTS = 3
WORKER_MEMORY_LIMIT_BYTES = 3 * 2**30  # address space; a worker idles at ~65 MB
MAX_DEFAULT_WORKERS = 8  # more processes than this only pay start-up and memory for a rollout-sized batch
MAX_REMEMBERED_VERDICTS = 2**15  # ~40 MB at worst, every answer at the length cap
ITEMS_PER_MESSAGE = 16  # cuts pickling round trips; workers still answer item by item, so timeouts stay per item


# ---- extracting the final answer (plain Python, linear time) -----------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped \{ or \} is not a group delimiter
_BARE_BOX_TOKEN = re.compile(r"[^\s$]+")
_ANSWER_PHRASE = re.compile(r"(?:final answer|the answer)\s+is\b", re.IGNORECASE)
_LAST_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_MATH_DELIMITED = re.compile(r"\$\$?([^$]*)\$|\\\((.*?)\\\)|\\\[(.*?)\\\]", re.DOTALL)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|;|\n|,\s+(?=[A-Za-z]{2})")  # "7, not 8" ends at the comma; "(3, x)" does not


_TOO_LONG = object()  # a box longer than the caller's max_chars: the last box, but not worth reading


def last_boxed(text: str) -> str | None:
    return _last_boxed(text, max_chars=None)


def _last_boxed(text, max_chars):
    """Scans only from the last box command, so thousands of unclosed `\\boxed{` cost one pass."""
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    after = start + len(command)
    brace = after
    while brace < len(text) and text[brace] in " \t\n":
        brace += 1
    if brace < len(text) and text[brace] == "{":
        return _braced_content(text, brace, max_chars)
    if brace > after:  # `\boxed 5`: one token, as older MATH solutions write it
        token = _BARE_BOX_TOKEN.match(text, brace)
        return token.group(0) if token else None
    return None  # `\boxedfoo` is some other macro


def _braced_content(text, open_at, max_chars):
    depth = 0
    for m in _BRACE_OR_ESCAPE.finditer(text, open_at):
        if max_chars is not None and m.start() - open_at > max_chars + 1:
            return _TOO_LONG  # scores 0 anyway: stop scanning a 2 MB tail
        token = m.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : m.start()]
    return None


def extract_answer(text: str, mode: str = "boxed") -> str | None:
    _check_mode(mode)
    return _extract(text, mode, max_chars=None)


def _extract(text, mode, max_chars):
    if not isinstance(text, str):
        return None
    boxed = _last_boxed(text, max_chars)
    if boxed is not None or mode == "boxed":
        return boxed
    return _after_answer_phrase(text) or _last_number(text)


def _after_answer_phrase(text):
    last = None
    for last in _ANSWER_PHRASE.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end() : last.end() + 4 * MAX_ANSWER_CHARS].lstrip(" \t:*")
    delimited = _MATH_DELIMITED.match(tail)
    if delimited:
        answer = next(g for g in delimited.groups() if g is not None)
    else:
        end = _SENTENCE_END.search(tail)
        answer = tail[: end.start()] if end else tail
    return answer.lstrip(string.whitespace + "*").rstrip(string.whitespace + "*.") or None  # **bold**, full stop


def _last_number(text):
    last = None
    for last in _LAST_NUMBER.finditer(text):
        pass
    return last.group(0) if last else None


def _answer_worth_checking(response, mode):
    """The extracted answer, or None when it scores 0 without asking math-verify."""
    try:
        answer = _extract(response, mode, max_chars=MAX_ANSWER_CHARS)
        if answer is None or answer is _TOO_LONG or len(answer) > MAX_ANSWER_CHARS:
            return None
        if not answer.strip() or "\x00" in answer:
            return None
        answer.encode("utf-8")  # raises on a lone surrogate: no real answer has one
        return answer
    except Exception:  # model text must never make scoring raise
        return None


# ---- scoring: the public entry points ----------------------------------------------------------------------


def score(response: str, gold: str, mode: str = "boxed", timeout: float = 5.0) -> float:
    return score_batch([response], [gold], mode=mode, workers=1, timeout=timeout)[0]


def score_batch(
    responses: list[str], golds: list[str], mode: str = "boxed", workers: int | None = None, timeout: float = 5.0
) -> list[float]:
    _check_mode(mode)
    _check_timeout(timeout)
    if len(responses) != len(golds):
        raise ValueError(f"score_batch got {len(responses)} responses but {len(golds)} golds; they pair up one to one")
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    golds = [_gold_text(g) for g in golds]
    answers = [_answer_worth_checking(response, mode) for response in responses]
    checked = [i for i, answer in enumerate(answers) if answer is not None]
    verdicts = _check_pairs([(answers[i], golds[i]) for i in checked], workers or _default_workers(), timeout)
    scores = [0.0] * len(responses)
    for i, (item_score, gold_ok) in zip(checked, verdicts):
        scores[i] = item_score
        if gold_ok is False:
            _report_unparseable_gold(golds[i])
    return scores


def gold_is_parseable(gold: str, timeout: float = 5.0) -> bool | None:
    _check_timeout(timeout)
    [(_, gold_ok)] = _check_pairs([(None, _gold_text(gold))], 1, timeout)
    return gold_ok


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_timeout(timeout):
    if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def _gold_text(gold):
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return str(gold)  # AMC-style numeric golds
    if not isinstance(gold, str):
        raise TypeError(f"a gold answer must be a string, got {type(gold).__name__}: {gold!r}")
    return gold


_reported_golds = set()


def _report_unparseable_gold(gold):
    if gold not in _reported_golds:
        _reported_golds.add(gold)
        log.warning("math-verify cannot parse the gold answer %r; every response to it scores 0", gold)


# ---- what a worker does with one item (the only code that imports math-verify) -----------------------------


class _ItemTimeout(BaseException):
    """A BaseException, so that math-verify's `except Exception` blocks do not swallow it."""


def _check_item(answer, gold):
    """(score, gold parses?) for one item; answer None only asks about the gold."""
    gold_parsed = _parse_gold(gold)
    if gold_parsed is None:
        return 0.0, False
    if answer is None:
        return 0.0, True
    if _squash(answer) == _squash(gold):
        return 1.0, True
    if _PLAIN_INTEGER.fullmatch(answer.strip()) and _PLAIN_INTEGER.fullmatch(gold.strip()):
        return float(int(answer) == int(gold)), True  # what math-verify would say, without a 5 ms parse
    from math_verify import verify

    return float(bool(verify(gold_parsed, _parse_latex(answer), timeout_seconds=None))), True


_PLAIN_INTEGER = re.compile(r"-?\d{1,300}")
_SIZING_COMMAND = re.compile(r"\\(?:left|right)(?![A-Za-z])|(?<=\\)[dt](?=frac(?![A-Za-z]))")
_WHITESPACE = re.compile(r"\s+")


def _squash(latex):
    """Spellings that are the same LaTeX: whitespace runs, \\left( vs (, \\dfrac vs \\frac."""
    return _WHITESPACE.sub(" ", _SIZING_COMMAND.sub("", latex)).strip()


def _parse_gold(gold):
    """Parsed gold, or None when math-verify gets no sympy object out of it (its raw-string fallback alone would
    let a response that repeats an unparseable gold count as correct)."""
    from sympy import Basic, MatrixBase

    parsed = _parse_latex(gold)
    return parsed if any(isinstance(p, (Basic, MatrixBase)) for p in parsed) else None


@functools.lru_cache(maxsize=4096)  # a gold is parsed once for its whole group, an answer once for all golds
def _parse_latex(latex):
    from math_verify import LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    return parse("\\boxed{" + latex + "}", extraction_config=config, parsing_timeout=None)


def _check_item_within(answer, gold, timeout):
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return _check_item(answer, gold)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return 0.0, None
    except Exception:  # RecursionError on deep nesting, MemoryError on power towers, ...
        return 0.0, None


def _raise_item_timeout(signum, frame):
    raise _ItemTimeout


def _worker_main(fd):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller, who then kills us
    signal.signal(signal.SIGALRM, _raise_item_timeout)
    logging.disable(logging.CRITICAL)  # math-verify warns on every timeout; the caller only needs the scores
    _limit_memory(WORKER_MEMORY_LIMIT_BYTES)
    if os.environ.get("VERIFY_TEST_FAULTS") == "1":
        _install_test_faults()
    conn = Connection(fd)
    _check_item("\\frac{1}{2}", "0.5")  # imports and warms the parser, so the first real item is not slower
    try:
        conn.send(("ready",))
        while True:
            chunk, timeout = conn.recv()
            for item_id, answer, gold in chunk:
                conn.send((item_id, *_check_item_within(answer, gold, timeout)))
    except (EOFError, OSError):  # the caller closed the pool, or died
        return


def _limit_memory(max_bytes):
    """A power tower should end in MemoryError inside the worker, not in the machine swapping."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    except (ImportError, ValueError, OSError):
        pass


def _install_test_faults():
    """Test hook (VERIFY_TEST_FAULTS=1): gold "<crash>" kills the worker, gold "<hang>" blocks it in a way no
    signal interrupts, like sympy stuck in C."""
    global _check_item
    real_check = _check_item

    def check_with_faults(answer, gold):
        if gold == "<crash>":
            os._exit(3)
        if gold == "<hang>":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)
        return real_check(answer, gold)

    _check_item = check_with_faults


# ---- the worker pool: lazily started, kept between calls, replaced when stuck or dead ---------------------


def _default_workers():
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_WORKERS))


class _Worker:
    def __init__(self):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.ready = False
        self.in_flight = collections.deque()  # ids sent and not answered yet, in the order the worker takes them
        self.deadline = time.monotonic() + WORKER_START_TIMEOUT_S

    def send(self, chunk, timeout):
        self.conn.send((chunk, timeout))
        self.in_flight.extend(item[0] for item in chunk)
        self.deadline = time.monotonic() + timeout + KILL_GRACE_S

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.conn.close()


class _Batch:
    """One call's items (id, answer, gold): those still to hand out, and the outcomes come back."""

    def __init__(self, items, timeout):
        self.by_id = {item[0]: item for item in items}
        self.pending = collections.deque(items)
        self.outcomes = {}  # id -> (score, gold parses? or None when unknown)
        self.timeout = timeout

    def done(self):
        return len(self.outcomes) == len(self.by_id)


class _Pool:
    def __init__(self):
        self.pid = os.getpid()
        self.workers = []
        self.failed_starts = 0

    def run(self, items, n_workers, timeout):
        while len(self.workers) < n_workers:
            self.workers.append(_Worker())
        slots = sorted(range(len(self.workers)), key=lambda s: not self.workers[s].ready)[:n_workers]
        batch = _Batch(items, timeout)
        try:
            while not batch.done():
                self._hand_out(batch, slots)
                self._wait_for_messages(batch, slots)
                for s in slots:
                    if self.workers[s].deadline < time.monotonic():
                        self._give_up_on(s, batch, why="got stuck")
        except BaseException:
            # A result still on its way would be read as the answer to a later call's item: drop those workers.
            for s in slots:
                if self.workers[s].in_flight:
                    self._replace(s)
            raise
        return batch.outcomes

    def _hand_out(self, batch, slots):
        idle = [s for s in slots if self.workers[s].ready and not self.workers[s].in_flight]
        for k, s in enumerate(idle):
            if not batch.pending:
                return
            if self.workers[s].process.poll() is not None:  # killed from outside while idle: no item to blame
                self._replace(s)
                continue
            share = min(math.ceil(len(batch.pending) / (len(idle) - k)), ITEMS_PER_MESSAGE)
            self.workers[s].send([batch.pending.popleft() for _ in range(share)], batch.timeout)

    def _wait_for_messages(self, batch, slots):
        waiting_on = [s for s in slots if self.workers[s].in_flight or not self.workers[s].ready]
        soonest = min((self.workers[s].deadline for s in waiting_on), default=time.monotonic())
        ready = wait([self.workers[s].conn for s in waiting_on], timeout=max(0.0, soonest - time.monotonic()))
        for s in waiting_on:
            if self.workers[s].conn in ready:
                self._receive(s, batch)

    def _receive(self, s, batch):
        worker = self.workers[s]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._give_up_on(s, batch, why="died")
            return
        if message == ("ready",):
            worker.ready, worker.deadline = True, math.inf
            self.failed_starts = 0
            return
        item_id, item_score, gold_ok = message
        assert item_id == worker.in_flight[0], "a worker answered out of order"
        worker.in_flight.popleft()
        batch.outcomes[item_id] = (item_score, gold_ok)
        worker.deadline = time.monotonic() + batch.timeout + KILL_GRACE_S if worker.in_flight else math.inf

    def _give_up_on(self, s, batch, why):
        worker = self.workers[s]
        self._replace(s)
        if not worker.ready:  # killed from outside (OOM killer) is worth a retry; an import error is not
            self.failed_starts += 1
            if self.failed_starts >= MAX_FAILED_STARTS:
                raise RuntimeError(f"verify workers {why} while starting, {self.failed_starts} times in a row")
            return
        culprit, *rest = worker.in_flight
        gold = batch.by_id[culprit][2]
        log.warning("a verify worker %s on an item (gold %r): it scores 0, the worker is replaced", why, gold)
        batch.outcomes[culprit] = (0.0, None)
        batch.pending.extendleft(batch.by_id[i] for i in reversed(rest))

    def _replace(self, s):
        self.workers[s].kill()
        self.workers[s] = _Worker()

    def close(self):
        for worker in self.workers:
            worker.kill()
        self.workers = []


_pool = None
_pool_lock = threading.Lock()


_verdicts = collections.OrderedDict()  # (answer, gold) -> (score, gold parses?), for checks that finished


def _check_pairs(pairs, n_workers, timeout):
    """(score, gold parses? or None when unknown) for each (answer, gold). Each distinct pair is checked once and a
    finished check is remembered: a GRPO group's samples often share their answer, and epochs repeat."""
    global _pool
    with _pool_lock:
        todo = list(dict.fromkeys(pair for pair in pairs if pair not in _verdicts))
        # The pairs of one gold (a GRPO group) travel together, so one worker parses that gold once.
        gold_order = {gold: k for k, (_, gold) in reversed(list(enumerate(todo)))}
        todo.sort(key=lambda pair: gold_order[pair[1]])
        fresh = {}
        if todo:
            if _pool is None or _pool.pid != os.getpid():
                _pool = _Pool()
            outcomes = _pool.run([(k, answer, gold) for k, (answer, gold) in enumerate(todo)], n_workers, timeout)
            fresh = {pair: outcomes[k] for k, pair in enumerate(todo)}
        results = [fresh[pair] if pair in fresh else _verdicts[pair] for pair in pairs]
        for pair in pairs:
            if pair in _verdicts:
                _verdicts.move_to_end(pair)
        for pair, outcome in fresh.items():
            if outcome[1] is not None:  # a timeout or a crash is not a verdict
                _verdicts[pair] = outcome
        while len(_verdicts) > MAX_REMEMBERED_VERDICTS:
            _verdicts.popitem(last=False)
        return results


def _shutdown_pool():
    global _pool
    if _pool is not None and _pool.pid == os.getpid():
        _pool.close()
    _pool = None


def _forget_parents_pool():
    """A forked child must not talk to, or kill, its parent's workers."""
    global _pool, _pool_lock
    if _pool is not None:
        for worker in _pool.workers:
            worker.conn.close()
    _pool, _pool_lock = None, threading.Lock()


atexit.register(_shutdown_pool)
os.register_at_fork(after_in_child=_forget_parents_pool)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(int(sys.argv[2]))
