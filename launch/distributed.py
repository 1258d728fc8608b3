"""Join a multi-process run through JAX's own multi-controller runtime (`jax.distributed`).

Every entry point calls `initialize_from_env_or_flags(args)` before any JAX computation. A run is
multi-process when one of these says so (the first that applies wins):

1. `--coordinator HOST:PORT --num-processes N --process-id I`, or the same in NNXLM_COORDINATOR,
   NNXLM_NUM_PROCESSES and NNXLM_PROCESS_ID (launch.local_cluster sets these; any launcher can).
2. SLURM: inside an `srun` step with more than one task.
3. Open MPI: under `mpirun` with more than one rank.
4. A Cloud TPU VM (GCE or GKE): the TPU runtime knows the slice and any other slices.

For 2-4, jax.distributed.initialize() reads the coordinator, process count and index itself.
NNXLM_DISTRIBUTED=on forces the call with jax's auto-detection, and NNXLM_DISTRIBUTED=off skips it.
NNXLM_CPU_DEVICES=D gives this process D CPU devices (the one-machine rehearsal).

No silent hangs: the timeout (--distributed-timeout or NNXLM_DISTRIBUTED_TIMEOUT, seconds) bounds how
long a process waits for the others to arrive, how long a process that stops sending heartbeats
(killed, preempted, hung host) is waited for, and how long a finished process waits for the rest at
shutdown. When it runs out, the runtime stops every surviving process with a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping

from lm.errors import UserError

COORDINATOR = "NNXLM_COORDINATOR"
NUM_PROCESSES = "NNXLM_NUM_PROCESSES"
PROCESS_ID = "NNXLM_PROCESS_ID"
CPU_DEVICES = "NNXLM_CPU_DEVICES"
TIMEOUT = "NNXLM_DISTRIBUTED_TIMEOUT"
MODE = "NNXLM_DISTRIBUTED"
DEFAULT_TIMEOUT = 120


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process starts. `source` names what made it multi-process (flags, env, slurm, mpi,
    tpu, forced); None means a single process. Unset fields are left to jax's auto-detection."""

    source: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cpu_devices: int | None = None
    timeout: int = DEFAULT_TIMEOUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The start-up flags, shared by every entry point that can run as one process of many."""
    g = parser.add_argument_group("multi-process runs (normally detected: TPU pod, SLURM, launch.local_cluster)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help=f"process 0's address (or ${COORDINATOR})")
    g.add_argument("--num-processes", type=int, metavar="N", help=f"processes in the run (or ${NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, metavar="I", help=f"this process, 0..N-1 (or ${PROCESS_ID})")
    g.add_argument(
        "--distributed-timeout",
        type=int,
        metavar="SECONDS",
        help=f"exit non-zero when a process is missing or silent this long (or ${TIMEOUT}; default {DEFAULT_TIMEOUT})",
    )


def _int(text, name: str, minimum: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UserError(f"{name}={text!r} is not an integer") from None
    if value < minimum:
        raise UserError(f"{name}={value} must be at least {minimum}")
    return value


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM. jax works this out when it is imported (TPU chips and libtpu present)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect(
    env: Mapping[str, str],
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int | None = None,
    on_cloud_tpu=_on_cloud_tpu_vm,
) -> Launch:
    """Decide how this process starts from flags (which win) and the environment; starts nothing."""
    mode = env.get(MODE, "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise UserError(f"{MODE}={env[MODE]!r} must be auto, on or off")
    timeout = _int(timeout if timeout is not None else env.get(TIMEOUT, DEFAULT_TIMEOUT), "distributed timeout", 1)
    cpu_devices = _int(env[CPU_DEVICES], CPU_DEVICES, 1) if env.get(CPU_DEVICES) else None
    base = Launch(cpu_devices=cpu_devices, timeout=timeout)
    if mode == "off":
        return base

    explicit = {
        "--coordinator": (coordinator, env.get(COORDINATOR) or None),
        "--num-processes": (num_processes, env.get(NUM_PROCESSES) or None),
        "--process-id": (process_id, env.get(PROCESS_ID) or None),
    }
    given = {
        flag: flag_value if flag_value is not None else env_value for flag, (flag_value, env_value) in explicit.items()
    }
    if any(v is not None for v in given.values()):
        missing = [flag for flag, v in given.items() if v is None]
        if missing:
            raise UserError(
                f"--coordinator, --num-processes and --process-id go together (or ${COORDINATOR}, ${NUM_PROCESSES}, "
                f"${PROCESS_ID}); {', '.join(missing)} is missing"
            )
        address = str(given["--coordinator"])
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"coordinator {address!r} must be HOST:PORT, e.g. 10.0.0.2:8476")
        n = _int(given["--num-processes"], "--num-processes", 1)
        i = _int(given["--process-id"], "--process-id", 0)
        if i >= n:
            raise UserError(f"--process-id={i} must be in 0..{n - 1} for --num-processes={n}")
        if n == 1:
            return base
        source = "flags" if any(flag_value is not None for flag_value, _ in explicit.values()) else "env"
        return dataclasses.replace(base, source=source, coordinator=address, num_processes=n, process_id=i)

    if mode == "on":
        return dataclasses.replace(base, source="forced")
    slurm_step = all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"))
    # The batch script itself (no srun) has no SLURM_STEP_NODELIST: it is one process, whatever --ntasks says.
    if slurm_step and _int(env.get("SLURM_NTASKS", "1"), "SLURM_NTASKS", 1) > 1:
        return dataclasses.replace(base, source="slurm")
    if "OMPI_MCA_orte_hnp_uri" in env and _int(env.get("OMPI_COMM_WORLD_SIZE", "1"), "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return dataclasses.replace(base, source="mpi")
    if on_cloud_tpu():
        return dataclasses.replace(base, source="tpu")
    return base


def configure_logging(process_index: int, process_count: int) -> None:
    """Warnings and errors (Python's `logging` and `warnings`, which jax, orbax and grain use) carry
    the process index, so interleaved logs from many hosts say who saw what."""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(levelname)s [process {process_index}/{process_count}] %(name)s: %(message)s",
        force=True,
    )
    logging.captureWarnings(True)


def start(launch: Launch) -> None:
    """Apply `launch`: CPU device count, then jax.distributed.initialize() for a multi-process run."""
    import jax

    if launch.cpu_devices:
        jax.config.update("jax_num_cpu_devices", launch.cpu_devices)
    if launch.source is None:
        return
    # CPU collectives across processes go over gloo (TCP); accelerators use ICI/NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    who = f"process {launch.process_id}/{launch.num_processes}" if launch.process_id is not None else "this process"
    where = launch.coordinator or f"the coordinator found by {launch.source} detection"
    print(f"[{who}] joining the run at {where}; waiting up to {launch.timeout} s for every process", file=sys.stderr)
    try:
        jax.distributed.initialize(
            coordinator_address=launch.coordinator,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            initialization_timeout=launch.timeout,
            heartbeat_timeout_seconds=launch.timeout,
            shutdown_timeout_seconds=launch.timeout,
        )
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"jax.distributed.initialize failed ({launch.source}): {first}") from None
    configure_logging(jax.process_index(), jax.process_count())


def initialize_from_env_or_flags(args: argparse.Namespace | None = None) -> Launch:
    """Detect how this process starts (flags from `add_arguments`, then the environment) and start it."""
    launch = detect(
        os.environ,
        coordinator=getattr(args, "coordinator", None),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
        timeout=getattr(args, "distributed_timeout", None),
    )
    start(launch)
    return launch
