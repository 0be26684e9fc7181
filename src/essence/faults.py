"""A test hook: ESSENCE_FAULT makes the process die, or a write fail, at a named point.

The fault-injection tests set, for example,

    ESSENCE_FAULT="step-3=exit"              die (os._exit, like kill -9) after optimizer step 3
    ESSENCE_FAULT="save-4-state=exit"        die while checkpoint step-4 is half written
    ESSENCE_FAULT="write-summary.json=enospc" the summary write fails with a full disk

Points (glob patterns allowed, comma-separated `point=action` pairs):
step-K; save-K-{model,state,manifest,rename,latest,prune} for checkpoint step-K and
save-model-{model,manifest,rename} for the final model; write-<file name> for every other
file a run or a cache build writes (write-.essence.lock: its folder lock). Actions: exit,
enospc, erofs (OSError), torch-enospc (the RuntimeError torch.save raises on a full disk),
wait-stop (block until Ctrl-C/SIGTERM has asked for a stop; the tests of stopping send it from
outside) and hang (block until a second signal interrupts; both give up after 60 s).
Unset, every call is one dictionary lookup.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import time

EXIT_CODE = 87


def fault_point(name: str) -> None:
    """Act on ESSENCE_FAULT if one of its patterns matches `name`; otherwise do nothing."""
    spec = os.environ.get("ESSENCE_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        pattern, _, action = item.strip().partition("=")
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        if action == "exit":
            os._exit(EXIT_CODE)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        if action == "erofs":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)
        if action == "torch-enospc":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 "
                               "vs 598")
        if action in ("wait-stop", "hang"):
            _wait(until_stop=action == "wait-stop")
            continue
        raise ValueError(f"ESSENCE_FAULT: unknown action {action!r} in {item!r}")


def _wait(until_stop: bool) -> None:
    from essence.stopping import stop_requested

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (until_stop and stop_requested()):
        time.sleep(0.01)
