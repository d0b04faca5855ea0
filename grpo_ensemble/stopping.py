"""Stop signals (SIGINT, SIGTERM) in a run: what each one does depends on where the run is.

- Between and during steps a signal asks the run to stop after the step (it then writes a
  checkpoint); a second SIGINT stops at once.
- A reward scorer's call that has not returned `GRACE_S` seconds after such a request is
  abandoned: a scorer that hangs must not keep the run from stopping. Nothing of the step has
  changed the weights yet, so the run keeps a checkpoint of the step before.
- Anywhere else (start-up, an evaluation, saving the final model) it stops at once.

Stopping at once raises `Stop`, a BaseException: a library's `except Exception` around the
code a signal interrupts must not swallow it (Python's own KeyboardInterrupt is one for the
same reason, but typer turns a KeyboardInterrupt into a silent exit code).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# how long a reward scorer's call may go on after a stop request: a healthy one returns well
# within it, and a pre-empting scheduler (30 s between SIGTERM and SIGKILL on Kubernetes)
# leaves time to write the checkpoint after it
GRACE_S = 5.0


class Stop(BaseException):
    """A stop signal ended what was running. `clean`: it was raised where nothing of the current
    step had changed the run's state (a wait on a reward scorer)."""

    def __init__(self, signum: int, clean: bool = False, waiting_on: str = ""):
        self.signum = signum
        self.clean = clean
        self.waiting_on = waiting_on
        super().__init__(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _Requests:
    """The process's stop requests: whether to stop at once, and the signal asked for."""

    def __init__(self):
        self.at_once = True
        self.signum: int | None = None
        self.since = 0.0  # time.monotonic() of the request

    def handle(self, signum, frame) -> None:
        if self.at_once or (self.signum == signal.SIGINT and signum == signal.SIGINT):
            raise Stop(signum)  # (a second SIGINT: asked twice)
        if self.signum is None:
            self.since = time.monotonic()
        self.signum = signum


_requests: _Requests | None = None


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Stop signals handled as above inside the block (stopping at once until `after_steps`
    says otherwise); the previous handlers after it. Outside the main thread signals cannot be
    caught, and this does nothing."""
    global _requests
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    requests, outer = _Requests(), _requests
    previous = {sig: signal.signal(sig, requests.handle) for sig in SIGNALS}
    _requests = requests
    try:
        yield
    finally:
        _requests = outer
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def after_steps() -> Iterator[None]:
    """Inside the block a signal is a request to stop after the current step."""
    if _requests is None:
        yield
        return
    _requests.at_once = False
    try:
        yield
    finally:
        _requests.at_once = True


def requested() -> int | None:
    """The signal that asked the run to stop after this step, if any."""
    return _requests.signum if _requests is not None else None


def wait(thread: threading.Thread, timeout: float | None, what: str) -> None:
    """Join `thread` for at most `timeout` seconds (None: no limit). When a stop is requested
    and the thread has not ended `GRACE_S` seconds after both the request and the start of the
    wait, it is abandoned with a clean `Stop`."""
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    while thread.is_alive():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return
        r = _requests
        if r is not None and r.signum is not None and now - max(r.since, start) >= GRACE_S:
            raise Stop(r.signum, clean=True, waiting_on=what)
        thread.join(0.05 if deadline is None else min(0.05, deadline - now))
