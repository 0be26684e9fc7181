"""math-verify equivalence checks run in a worker process, so a slow comparison can be cut off.

math-verify's own timeouts use SIGALRM, which raises when called off the main thread, and a
signal cannot interrupt a long C-level operation anyway (`10^{10^{10}}` hangs inside integer
arithmetic). So the checks run with math-verify's timeouts disabled in a child process that
speaks JSON lines on stdin/stdout; when an answer takes longer than its budget the child is
killed and the next check starts a fresh one. This works from any thread of the parent.

Run as `python -m essence.eval.verifier` it is the worker itself.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

from essence.errors import EssenceError

# Starting the worker imports sympy and latex2sympy (under a second here); only a hung check
# pays that again.
_STARTUP_TIMEOUT_S = 60.0


def grade(response: str, gold: str | None, timeout_s: float) -> tuple[bool, str | None, str | None]:
    """math-verify's grading of `response` against `gold`: (equal, extracted, error or None).

    response: free text, parsed with math-verify's default extraction (the answer it finds);
    gold: bare LaTeX (no `$`, no `\\boxed`), or None to extract only. A timeout or a crash of
    math-verify counts as not equal and is reported in the error string.
    """
    return _worker().grade(response, gold, timeout_s)


class _Worker:
    """One long-lived child process; requests are serialized by a lock (one pipe, one answer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None

    def grade(self, response: str, gold: str | None,
              timeout_s: float) -> tuple[bool, str | None, str | None]:
        with self._lock:
            proc = self._ensure_started()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps({"response": response, "gold": gold}) + "\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._stop()
                return False, None, "grading worker exited unexpectedly"
            line = _read_line(proc, timeout_s)
            if line is None:
                self._stop()  # it may be stuck in C code: only killing it frees the CPU
                return False, None, f"math-verify timed out after {timeout_s:g}s"
            if not line:
                self._stop()
                return False, None, "grading worker exited unexpectedly"
            reply = json.loads(line)
            return bool(reply["equal"]), reply["extracted"], reply["error"]

    def _ensure_started(self) -> subprocess.Popen[str]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ)
        # The child must import this package whether it is installed or run from a checkout.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "essence.eval.verifier"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = _read_line(proc, _STARTUP_TIMEOUT_S)
        if not ready or json.loads(ready).get("ready") is not True:
            proc.kill()
            proc.wait()
            err = proc.stderr.read().strip().splitlines() if proc.stderr else []
            detail = err[-1] if err else "no reply"
            raise EssenceError(
                f"could not start the math-verify grading worker ({detail}); "
                "check that `math-verify` is installed in this environment (pip install math-verify)"
            )
        # Its stderr is only needed for the startup message above; draining it in a thread
        # keeps math-verify's warnings from filling the pipe and blocking the child.
        threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
        self._proc = proc
        return proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str | None:
    """The child's next line; None if none came within `timeout_s`, "" if the child exited."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        return None
    # The child writes whole lines and one per request, so readline does not block here.
    return proc.stdout.readline()


def _drain(stream) -> None:
    for _ in stream:
        pass


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
            atexit.register(_WORKER._stop)
        return _WORKER


# ---------------------------------------------------------------- the worker process side


def _extracted_text(parsed: list) -> str | None:
    """The answer text math-verify extracted: its string fallback, else the parsed value."""
    if not parsed:
        return None
    text = next((p for p in reversed(parsed) if isinstance(p, str)), None)
    return text if text is not None else str(parsed[0])


def _grade(response: str, gold: str | None) -> tuple[bool, str | None, str | None]:
    from math_verify import parse, verify

    answer = parse(response, parsing_timeout=None)
    extracted = _extracted_text(answer)
    if gold is None or not answer:
        return False, extracted, None
    # A box around the gold makes math-verify read all of it as one answer.
    gold_parsed = parse(f"$\\boxed{{{gold}}}$", parsing_timeout=None)
    if not gold_parsed:
        return False, extracted, f"math-verify could not parse the gold answer {gold!r}"
    return bool(verify(gold_parsed, answer, timeout_seconds=None)), extracted, None


def _serve() -> None:
    import logging

    # math-verify warns once that its timeouts are off; the parent enforces them instead.
    logging.disable(logging.WARNING)
    import math_verify  # noqa: F401  (fail at startup, not on the first answer)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            equal, extracted, error = _grade(request["response"], request["gold"])
        except Exception as exc:  # any math-verify failure is a wrong answer, never a crash
            equal, extracted, error = False, None, f"math-verify failed: {type(exc).__name__}: {exc}"
        print(json.dumps({"equal": equal, "extracted": extracted, "error": error}), flush=True)


if __name__ == "__main__":
    _serve()
