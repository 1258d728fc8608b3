"""Rehearse a multi-host launch on one machine: P processes with D CPU devices each, joined by
jax.distributed and gloo collectives, exactly as hosts of a pod would be.

    python -m launch.local_cluster --processes 2 --devices-per-process 4 -- \\
        python -m launch.train --recipe stdlib_tiny --set mesh.fsdp=4 --set mesh.tensor=2

Each process gets NNXLM_COORDINATOR (127.0.0.1 and a free port), NNXLM_NUM_PROCESSES,
NNXLM_PROCESS_ID and NNXLM_CPU_DEVICES, which launch.distributed reads. Their output comes back
line by line prefixed with [pI]. If one process fails, the others are given --grace seconds to
notice (jax.distributed stops them itself within --timeout) and are then stopped; the exit status
is the first failure's. SIGINT and SIGTERM are passed on to every process.
"""

import argparse
import codecs
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from launch.cli import ArgumentParser, main_guard
from launch.distributed import COORDINATOR, CPU_DEVICES, NUM_PROCESSES, PROCESS_ID, TIMEOUT
from lm.errors import UserError

KILL_AFTER = 10.0  # seconds between SIGTERM and SIGKILL when stopping processes


def parse(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m launch.local_cluster",
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s --processes P --devices-per-process D [options] -- COMMAND...",
        epilog="A leading `python` in COMMAND is this interpreter (the project's environment), whatever PATH says.",
    )
    p.add_argument("--processes", type=int, required=True, metavar="P", help="processes to start (the 'hosts')")
    p.add_argument("--devices-per-process", type=int, required=True, metavar="D", help="CPU devices each process sees")
    p.add_argument(
        "--timeout",
        type=int,
        metavar="SECONDS",
        help="passed to each process as NNXLM_DISTRIBUTED_TIMEOUT: how long a missing or dead process is waited for",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after one process fails, or a signal is passed on, how long processes may take to exit by themselves "
        "before they are stopped (default 30)",
    )
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.command = argv[split + 1 :]
    if not args.command:
        p.error("put the command to run after --, e.g. -- python -m launch.train --recipe stdlib_tiny")
    if args.processes < 1 or args.devices_per_process < 1:
        raise UserError(
            f"--processes={args.processes} and --devices-per-process={args.devices_per_process} must be at least 1"
        )
    if args.timeout is not None and args.timeout < 1:
        raise UserError(f"--timeout={args.timeout} must be at least 1 second")
    return args


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Forwarder(threading.Thread):
    """Copies one child stream to ours, starting every line with the process prefix. A carriage
    return ends a line too, so progress bars redraw in place under their prefix."""

    lock = threading.Lock()
    # gloo announces every connection it makes on stdout: dozens of lines that say nothing.
    noise = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number .*\n")

    def __init__(self, source, sink, prefix: str):
        super().__init__(daemon=True)
        self.source, self.sink, self.prefix = source, sink, prefix

    def write(self, segments: list[str]) -> None:
        text = "".join(s if s in ("\r", "\n") else self.prefix + s for s in segments if not self.noise.fullmatch(s))
        with self.lock:
            self.sink.write(text)
            self.sink.flush()

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while chunk := os.read(self.source.fileno(), 65536):
            *lines, pending = re.split(r"(?<=[\r\n])", pending + decoder.decode(chunk))
            self.write(lines)
        self.write([pending + decoder.decode(b"", final=True)] if pending else [])
        self.source.close()


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def exit_status(code: int) -> int:
    """A shell's convention: 128 + N for death by signal N."""
    return 128 - code if code < 0 else code


class Cluster:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.procs: list[subprocess.Popen] = []
        self.threads: list[Forwarder] = []
        self.signalled = 0
        self.stop_deadline: float | None = None

    def say(self, message: str) -> None:
        with Forwarder.lock:
            print(f"[local_cluster] {message}", file=sys.stderr, flush=True)

    def start(self) -> None:
        a = self.args
        command = list(a.command)
        # "python" means this interpreter (the project's venv), not whatever is first on PATH.
        if command[0] in ("python", "python3"):
            command[0] = sys.executable
        coordinator = f"127.0.0.1:{free_port()}"
        for i in range(a.processes):
            env = {
                **os.environ,
                COORDINATOR: coordinator,
                NUM_PROCESSES: str(a.processes),
                PROCESS_ID: str(i),
                CPU_DEVICES: str(a.devices_per_process),
                "JAX_PLATFORMS": "cpu",
                "PYTHONUNBUFFERED": "1",
            }
            if a.timeout is not None:
                env[TIMEOUT] = str(a.timeout)
            try:
                # Its own session, so a signal reaches a process and its children together, from us alone.
                proc = subprocess.Popen(
                    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
                )
            except OSError as e:
                self.stop(signal.SIGKILL)
                raise UserError(f"cannot start {command[0]!r}: {e.strerror}") from None
            self.procs.append(proc)
            for source, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                thread = Forwarder(source, sink, f"[p{i}] ")
                thread.start()
                self.threads.append(thread)
        pids = ", ".join(f"p{i}={p.pid}" for i, p in enumerate(self.procs))
        self.say(
            f"{a.processes} processes x {a.devices_per_process} CPU devices, coordinator {coordinator}; pids {pids}"
        )

    def stop(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def on_signal(self, signum, frame) -> None:
        self.signalled += 1
        if self.signalled == 1:
            # Ctrl-C becomes SIGTERM: the children treat it as preemption (checkpoint, then exit 0).
            self.say(f"{signal.Signals(signum).name}: sending SIGTERM to every process")
            self.stop(signal.SIGTERM)
            self.stop_deadline = time.monotonic() + self.args.grace  # time to save a checkpoint
        else:
            self.stop(signal.SIGKILL)

    def wait(self) -> int:
        """Wait for every process; returns the exit status (the first failure's, or 0)."""
        reported: set[int] = set()
        first_failure: tuple[int, int] | None = None
        failed_at = terminated_at = None
        while len(reported) < len(self.procs):
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None or i in reported:
                    continue
                reported.add(i)
                if code != 0 or first_failure is not None:
                    self.say(f"process {i} {describe(code)}")
                if code != 0 and first_failure is None:
                    first_failure, failed_at = (i, code), time.monotonic()
            now = time.monotonic()
            if failed_at is not None and terminated_at is None and now - failed_at > self.args.grace:
                self.say(f"stopping the others: process {first_failure[0]} failed {self.args.grace:.0f} s ago")
                self.stop(signal.SIGTERM)
                terminated_at = now
            deadline = self.stop_deadline or (terminated_at + KILL_AFTER if terminated_at else None)
            if deadline is not None and now > deadline:
                self.stop(signal.SIGKILL)
            time.sleep(0.05)
        for thread in self.threads:
            thread.join(timeout=KILL_AFTER)  # a grandchild could hold a pipe open
        return exit_status(first_failure[1]) if first_failure else 0


@main_guard
def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    cluster = Cluster(args)
    signal.signal(signal.SIGINT, cluster.on_signal)
    signal.signal(signal.SIGTERM, cluster.on_signal)
    cluster.start()
    sys.exit(cluster.wait())


if __name__ == "__main__":
    main()
