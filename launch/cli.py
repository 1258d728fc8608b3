"""What every entry point shares: one-line errors for bad input, and quiet start-up."""

import argparse
import functools
import os
import sys

from lm.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line and exit 2, like every other bad input."""

    def error(self, message: str) -> None:
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def _quiet_shutdown() -> None:
    """The error line stays the last thing printed: background threads that are still winding down
    (orbax's writers after a failed save, say) can print tracebacks while the interpreter exits,
    and they would say nothing the line did not. Exit handlers still run; only their output goes."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def main_guard(fn):
    """Run a CLI main: bad input becomes `error: <one line>` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            return fn(argv)
        except UserError as e:
            jax = sys.modules.get("jax")
            multi = jax is not None and jax.distributed.is_initialized()
            who = f"[process {jax.process_index()}/{jax.process_count()}] " if multi else ""
            print(f"error: {who}{e}", file=sys.stderr)
            if argv is None:  # a real process (tests call main(argv) in-process and keep their stderr)
                _quiet_shutdown()
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
