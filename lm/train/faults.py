"""Preemption and numerical faults: stop at a safe point, and never save a bad state."""

import math
import signal
import threading

import jax
from jax.experimental import multihost_utils

from lm.errors import UserError


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
