"""Preemption, numerical faults and agreement: stop at a safe point, never save a bad state, and
stop every process of a run together with the same message."""

import math
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm.errors import UserError

_MESSAGE_BYTES = 1024


def first_error(message: str | None) -> str | None:
    """Every process brings its own error (or None); every process gets back the first process's
    error, so all of them stop together, with the same message. A collective: every process of the
    run must call it at the same point. One process: the message itself."""
    if jax.process_count() == 1:
        return message
    row = np.zeros(_MESSAGE_BYTES, np.uint8)
    if message is not None:
        data = message.encode()[: _MESSAGE_BYTES - 1]
        row[0] = 1
        row[1 : 1 + len(data)] = np.frombuffer(data, np.uint8)
    for gathered in np.asarray(multihost_utils.process_allgather(row)):
        if gathered[0]:
            return bytes(gathered[1:]).rstrip(b"\0").decode(errors="replace")
    return None


def agreed(decide, *args, only_first: bool = False, **kwargs):
    """Run a decision that can stop the run, then share its outcome: a UserError on any process
    (or on process 0 alone with only_first=True, for what only it can see or should do) is raised on
    every process with the same message. Returns decide's result (None where only_first skipped it)."""
    error, result = None, None
    if not only_first or jax.process_index() == 0:
        try:
            result = decide(*args, **kwargs)
        except UserError as e:
            error = str(e)
    error = first_error(error)
    if error is not None:
        raise UserError(error)
    return result


class Preemption:
    """SIGTERM, or a TPU maintenance notice, asks the loop to checkpoint and exit cleanly.

    One process: a SIGTERM handler sets a flag. Several processes: JAX's coordination service
    already listens for SIGTERM and `reached_preemption_sync_point` answers True on every process
    at the same step, so the collective save happens at one agreed step.
    """

    def __init__(self):
        self.signalled = False
        self.multihost = jax.process_count() > 1
        self.previous = None
        if not self.multihost and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    def reached(self, step: int) -> bool:
        if self.multihost:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service on this cluster
                return False
        return self.signalled

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class NonFiniteGuard:
    """Checks the losses and norms of recent steps in one device-to-host transfer.

    The values are global (replicated) arrays, so every process sees the same numbers and stops at
    the same step with the same message: the decision is shared by construction.

    The jitted step skips updates whose gradients are not finite (optax.apply_if_finite) up to
    `max_bad_steps` in a row; past that, or if the parameters themselves stop being finite, the run
    stops before anything is saved, so the last checkpoint stays the last good one.
    """

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.pending: list[tuple[int, dict]] = []
        self.in_a_row = 0
        self.skipped: list[int] = []

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def check(self, last_good_step: int | None, where: str) -> None:
        rows, self.pending = jax.device_get(self.pending), []
        for step, m in rows:
            values = {k: float(m[k]) for k in ("loss", "grad_norm", "param_norm")}
            if all(math.isfinite(v) for v in values.values()):
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            if self.in_a_row <= self.max_bad_steps and math.isfinite(values["param_norm"]):
                self.skipped.append(step)
                continue
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise UserError(
                f"non-finite values at step {step} ({shown}); stopped without saving, the last good checkpoint "
                f"is {'step ' + str(last_good_step) if last_good_step else 'none'} in {where}; lower optimizer.lr, "
                "check the data, or set train.max_bad_steps to skip isolated bad steps"
            )
