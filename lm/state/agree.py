"""Agreement across processes: a decision that can stop a run is shared, so every process of a
multi-process run stops at the same point with the same message."""

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
