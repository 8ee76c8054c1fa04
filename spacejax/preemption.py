"""Preemption: when a run is told to stop (SIGTERM, a preempted VM), every process stops at the
same point, saves what it has and exits with PREEMPTED_EXIT ("resume me").

The loop asks `Preemption.check()` at its check points: after every train step, every generated
batch and every scored batch. Every process of a run passes the same check points in the same
order (each is a collective program), so a count of checks names one point on all of them:

- one process: SIGTERM sets a flag (`watching()` installs the handler) and the next check
  answers True;
- several processes (`jax.distributed`): SIGTERM to any of them reaches the others through
  jax's preemption service, which picks the next check count that no process has passed yet
  (`multihost_utils.reached_preemption_sync_point`); every process answers True at that same
  count, so all of them enter the (collective) checkpoint save at the same step. The service
  installs its own SIGTERM handler when `jax.distributed` starts; `watching()` leaves it in place.

A check never waits for the device. What is saved where the run stops: the train state at the
current step (the trainer), the responses generated so far (the run store's generation chunks);
scoring is redone on resume.
"""

from __future__ import annotations

import contextlib
import logging
import signal

from jax._src import distributed
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, everything needed to resume is saved


class Preempted(Exception):
    """The run stopped at a preemption check; re-running the same command resumes."""


def _multi_process() -> bool:
    return distributed.global_state.client is not None


class Preemption:
    """Whether the run should stop now, agreed by every process (see the module doc)."""

    def __init__(self):
        self.requested = False  # one process: SIGTERM arrived
        self.checks = 0  # check points passed: the step id of jax's preemption service

    @contextlib.contextmanager
    def watching(self):
        """While inside, SIGTERM requests a stop (one process; several: jax's handler does)."""
        if _multi_process():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: stopping at the next check point, saving what is done, then exiting")
        self.requested = True

    def check(self) -> bool:
        """True at the check point where every process stops (then and at every later check)."""
        self.checks += 1
        if not self.requested and _multi_process():
            self.requested = multihost_utils.reached_preemption_sync_point(self.checks)
        return self.requested

    def stop_here(self, where: str) -> None:
        """Raise Preempted if this check point is where the run stops; `where` says what was saved."""
        if self.check():
            raise Preempted(f"preempted {where}: re-run the same command to resume")
