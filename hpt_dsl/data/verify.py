"""Rule-based rewards: reward(response, answer) -> 1.0 when the response's answer is right.

``make_reward(settings.data)`` builds one of

    "boxed"            the last ``\\boxed{...}`` of the response, equal to the reference after
                       light normalisation (spaces, ``$``, ``\\left``/``\\right``, ``\\dfrac``,
                       units in ``\\text{}``, ``^\\circ``, ``\\%``, ``x =``), or numerically equal
                       (``0.5 = 1/2 = \\frac{1}{2}``, ``27.0 = 27``, ``1,000 = 1000``);
    "math_verify"      Hugging Face's math-verify: the response's answer and the reference are
                       parsed to sympy and compared for mathematical equivalence;
    "module:function"  any function importable by that path, with the signature
                           def reward(response: str, answer: str) -> float
                       returning a finite score (1.0 = correct; bools are taken as 0/1).

Symbolic comparison can hang (``\\boxed{9^{9^{9^{9}}}}`` never finishes), so "math_verify"
and custom rewards run in worker processes (``data.reward_workers``): a worker that
exceeds ``data.reward_timeout`` seconds on one answer is killed and replaced, and that
answer scores 0. Scoring a batch (``Reward.batch``) spreads it over the workers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

from hpt_dsl.data.base import RewardFn
from hpt_dsl.errors import InputError
from hpt_dsl.settings import DataSettings


class RewardError(InputError):
    """A reward that cannot be built or that failed; the message names it and the fix."""


# ── \boxed{} extraction and light normalisation ────────────────────────────────

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")


def _braced(text: str, start: int) -> int:
    """Index just past the brace group opening at ``text[start] == '{'``, or -1 if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def last_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{...}`` (or ``\\fbox``, or ``\\boxed 5``); None if none.

    Nested boxes are looked through: ``\\boxed{\\boxed{5}}`` gives ``5``. An unclosed box
    (a truncated response) gives None.
    """
    found: str | None = None
    pos = 0
    while (m := _BOX.search(text, pos)) is not None:
        body = m.end()
        if body < len(text) and text[body] == "{":
            end = _braced(text, body)
            if end < 0:
                break
            found, pos = text[body + 1 : end - 1], end
        else:
            word = re.match(r"[^\s$]+", text[body:])
            found, pos = (word.group(0) if word else None), body + (word.end() if word else 0)
    if found is not None:
        inner = found.strip()
        m = _BOX.match(inner)
        if m and inner.endswith("}") and _braced(inner, m.end()) == len(inner):
            return last_boxed(inner)
        return inner
    return None


_REMOVE = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\quad", r"\displaystyle", "\\$", "$")
_UNIT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\s*\{[^{}]*\}")
_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|\\circ|°")
_LHS = re.compile(r"^[a-zA-Z]\s*=(?!=)")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?", re.I)


def normalize(answer: str) -> str:
    """A light canonical form of an answer string (no symbolic algebra)."""
    s = answer.strip()
    for wrapper in (r"\(", r"\)", r"\[", r"\]"):
        s = s.replace(wrapper, "")
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").replace("~", " ")
    s = _DEGREE.sub("", s).replace(r"\%", "").replace("%", "")
    if (only := _UNIT.fullmatch(s.strip())) is not None:  # \text{Monday}: the text is the answer
        s = only.group(0)[only.group(0).index("{") + 1 : -1]
    else:  # 10 \text{ cm}: the text is a unit
        s = _UNIT.sub("", s)
    s = _LHS.sub("", s.strip())
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> float | None:
    """A plain number, ``a/b`` or ``\\frac{a}{b}`` (already normalised) as a float."""
    if _NUMBER.fullmatch(s):
        return float(s)
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|(-?[\d.]+)/(-?[\d.]+)", s)
    if m:
        sign, a, b = m.group(1) or "", m.group(2) or m.group(4), m.group(3) or m.group(5)
        try:
            value = float(a) / float(b)
        except (ValueError, ZeroDivisionError):
            return None
        return -value if sign else value
    return None


def same_answer(predicted: str, reference: str) -> bool:
    """Equal after ``normalize``, or equal as numbers (relative tolerance 1e-6)."""
    p, r = normalize(predicted), normalize(reference)
    if p == r:
        return True
    x, y = _as_number(p), _as_number(r)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def boxed_reward(response: str, answer: str) -> float:
    """1.0 if the response's last ``\\boxed{}`` equals the answer (``same_answer``), else 0.0."""
    predicted = last_boxed(response)
    return 1.0 if predicted is not None and same_answer(predicted, answer) else 0.0


def math_verify_reward(response: str, answer: str, timeout: float | None = None) -> float:
    """1.0 if math-verify finds the response's answer equivalent to the reference, else 0.0.

    ``timeout`` is math-verify's own (signal-based, main thread only) limit; it cannot stop
    a computation stuck inside one C call, which is why workers have a hard limit too.
    """
    from math_verify import parse, verify

    in_main = threading.current_thread() is threading.main_thread()  # signals work there only
    seconds = max(1, math.ceil(timeout)) if timeout and in_main else None
    reference = answer if "\\boxed" in answer or "$" in answer else f"${answer}$"
    try:
        gold = parse(reference, parsing_timeout=seconds)
        pred = parse(response, parsing_timeout=seconds)
        return 1.0 if gold and pred and verify(gold, pred, timeout_seconds=seconds) else 0.0
    except Exception:  # math-verify raises on some malformed LaTeX: an unparsable answer is wrong
        return 0.0


BUILTIN: dict[str, Callable[..., float]] = {"boxed": boxed_reward, "math_verify": math_verify_reward}


def resolve(spec: str) -> Callable[[str, str], Any]:
    """The scoring function named by ``data.reward``: a built-in name or ``module:function``."""
    if spec == "math_verify" and importlib.util.find_spec("math_verify") is None:
        raise RewardError("data.reward = 'math_verify' needs math-verify; fix: pip install math-verify")
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, attr = spec.rpartition(":")
    if module_name.endswith(".py"):  # a plugin file's reward: /path/to/plugin.py:function
        return _from_file(spec, module_name, attr)
    if not sep or not module_name or not attr:
        raise RewardError(
            f"data.reward = '{spec}' is not a known reward; fix: use one of {sorted(BUILTIN)} "
            "or a 'module:function' import path"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"data.reward = '{spec}': cannot import module '{module_name}' ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"data.reward = '{spec}': module '{module_name}' has no function '{attr}'")
    return fn


def _from_file(spec: str, path: str, attr: str) -> Callable[[str, str], Any]:
    """The function ``attr`` of the Python file ``path`` (a plugin's reward)."""
    name = "hpt_reward_" + "".join(c if c.isalnum() else "_" for c in path)
    module = sys.modules.get(name)
    if module is None:
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            raise RewardError(f"data.reward = '{spec}': cannot import {path}")
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"data.reward = '{spec}': importing {path} failed ({type(e).__name__}: {e})") from e
        sys.modules[name] = module
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"data.reward = '{spec}': {path} has no function '{attr}'")
    return fn


def scorer(spec: str, timeout: float | None = None) -> Callable[[str, str], Any]:
    """``resolve(spec)``, with math-verify's own timeout set to ``timeout``."""
    fn = resolve(spec)
    if fn is math_verify_reward:
        return lambda response, answer: math_verify_reward(response, answer, timeout)
    return fn


def _checked(spec: str, value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardError(
            f"reward '{spec}' returned {value!r}; fix: return a finite float (1.0 = correct, 0.0 = wrong)"
        )
    return float(value)


# ── worker processes with a hard per-answer timeout ───────────────────────────
#
# A worker is a fresh Python process (``python -c "...; _serve()"``) that reads one JSON
# task a line on stdin and writes one JSON reply a line on a private copy of stdout.
# A plain subprocess, unlike multiprocessing's spawn, never re-imports the caller's
# ``__main__``, so scripts need no ``if __name__ == "__main__"`` guard.


def _serve() -> None:
    """Worker loop: argv = [spec, timeout]; task [response, answer] -> ["ok", score] | ["error", text]."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever the reward prints goes to stderr, never into the replies
    sys.stdout = sys.stderr
    spec, timeout = sys.argv[1], float(sys.argv[2])
    try:
        score = scorer(spec, timeout)
        reply: list[Any] = ["ready", None]
    except Exception as e:
        reply = ["error", f"{type(e).__name__}: {e}"]
    out.write(json.dumps(reply) + "\n")
    out.flush()
    for line in sys.stdin:
        response, answer = json.loads(line)
        try:
            value = score(response, answer)
            plain = value is None or isinstance(value, (bool, int, float, str))
            reply = ["ok", value if plain else repr(value)]
        except Exception as e:
            reply = ["error", f"{type(e).__name__}: {e}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Worker:
    def __init__(self, spec: str, timeout: float) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        code = "import sys; from hpt_dsl.data.verify import _serve; _serve()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, spec, repr(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, encoding="utf-8",
        )
        self.ready = False
        self.task: int | None = None
        self.started = time.monotonic()  # start-up, then the current task

    def send(self, response: str, answer: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([response, answer]) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> list[Any] | None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        w.kill()
    workers.clear()


class Reward:
    """A ``RewardFn`` (``reward(response, answer) -> float``) that also scores batches.

    With ``workers == 0`` it scores in this process; otherwise in that many worker
    processes, each answer limited to ``timeout`` seconds (then it scores 0 and
    ``timeouts`` counts it). A worker may take ``start_timeout`` seconds to start.
    """

    def __init__(self, spec: str, workers: int = 0, timeout: float = 5.0, start_timeout: float = 120.0
                 ) -> None:
        self.spec, self.workers, self.timeout, self.start_timeout = spec, workers, timeout, start_timeout
        self.fn = scorer(spec, timeout)  # fails here, in the caller, with a clear message
        self.timeouts = 0
        self._pool: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)

    def __call__(self, response: str, answer: str) -> float:
        return self.batch([response], [answer])[0]

    def batch(self, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Scores of ``responses[i]`` against ``answers[i]``, in order."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        if self.workers == 0:
            return [self._one(r, a) for r, a in zip(responses, answers, strict=True)]
        try:
            return self._pooled(list(zip(responses, answers, strict=True)))
        except BaseException:  # replies still in flight would be read by the next batch
            self.close()
            raise

    def _one(self, response: str, answer: str) -> float:
        try:
            value = self.fn(response, answer)
        except Exception as e:  # the same report as from a worker
            raise RewardError(f"reward '{self.spec}' failed: {type(e).__name__}: {e}") from e
        return _checked(self.spec, value)

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is collected)."""
        _shutdown(self._pool)

    def _pooled(self, tasks: list[tuple[str, str]]) -> list[float]:
        while len(self._pool) < min(self.workers, len(tasks)):
            self._pool.append(_Worker(self.spec, self.timeout))
        scores: list[float] = [0.0] * len(tasks)
        todo = list(range(len(tasks)))[::-1]
        while todo or any(w.task is not None for w in self._pool):
            for w in self._pool:
                if w.ready and w.task is None and todo:
                    w.task, w.started = todo.pop(), time.monotonic()
                    w.send(*tasks[w.task])
            limits = [w.started + (self.timeout if w.ready else self.start_timeout) for w in self._pool]
            pause = max(0.0, min(limits) - time.monotonic())
            ready = wait([w.proc.stdout for w in self._pool], timeout=pause)  # type: ignore[misc]
            for i, w in enumerate(self._pool):
                if w.proc.stdout in ready:
                    reply = w.receive()
                    if reply is None:
                        raise RewardError(f"reward '{self.spec}': a worker exited (its error is above)")
                    kind, value = reply
                    if kind == "error":
                        raise RewardError(f"reward '{self.spec}' failed: {value}")
                    if kind == "ready":
                        w.ready = True
                    else:
                        scores[w.task] = _checked(self.spec, value)  # type: ignore[index]
                        w.task = None
                elif not w.ready and time.monotonic() - w.started >= self.start_timeout:
                    raise RewardError(f"reward '{self.spec}': no worker started in {self.start_timeout:.0f}s")
                elif w.task is not None and time.monotonic() - w.started >= self.timeout:
                    self.timeouts += 1  # the answer keeps its 0.0; the stuck worker is replaced
                    w.kill()
                    self._pool[i] = _Worker(self.spec, self.timeout)
        return scores


def default_workers(spec: str) -> int:
    """Worker processes when ``data.reward_workers`` is unset: math_verify min(4, cpus), else 0."""
    return min(4, os.cpu_count() or 1) if spec == "math_verify" else 0


def make_reward(data: DataSettings) -> Reward:
    """The reward named by ``data.reward`` (see the module docstring)."""
    workers = getattr(data, "reward_workers", None)
    if workers is None:
        workers = default_workers(data.reward)
    if data.reward == "boxed":
        workers = 0  # a regex and string compare: nothing to time out
    return Reward(data.reward, workers=workers, timeout=data.reward_timeout)


def score_batch(reward: RewardFn, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Score many responses with any ``RewardFn``, in parallel when it is a pooled ``Reward``."""
    batch = getattr(reward, "batch", None)
    if callable(batch):
        return list(batch(responses, answers))
    return [float(reward(r, a)) for r, a in zip(responses, answers, strict=True)]
