"""What every entry point shares: one-line errors for bad input, quiet start-up, and huge-page malloc."""

import argparse
import contextlib
import faulthandler
import functools
import os
import pathlib
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


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def _with_huge_pages() -> None:
    """Re-execute this process once with glibc's malloc asking for transparent huge pages.

    XLA:CPU allocates a step's buffers afresh each call, and glibc maps every large block with mmap
    and unmaps it on free, so each training step faulted its ~1 GB of buffers back in 4 KiB at a
    time: 150k page faults and a quarter of a second of kernel time per step of the small benchmark.
    With huge pages the faults fall 24x and the step takes 15% less (docs/benchmarks.md). glibc reads
    the tunable only at start-up, hence the exec; the process keeps its pid, arguments and files.
    NNX_LM_MALLOC=default turns it off (other C libraries ignore the tunable).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or "glibc.malloc.hugetlb" in tunables or os.environ.get("NNX_LM_MALLOC") == "default":
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES])))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


HF_FOLDER = "a Hugging Face model folder (config.json, *.safetensors, tokenizer files)"


def add_model_source(p: argparse.ArgumentParser, *, hf_flag: str = "--hf", hf_help: str = HF_FOLDER):
    """The one way a command names a model: --run-dir, --checkpoint or a Hugging Face folder (--hf; the
    importer calls it --hf-in). Returns the group, which takes one of them."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="a run directory written by launch.train (its latest finished checkpoint)")
    src.add_argument("--checkpoint", help="a checkpoint folder, e.g. runs/x/checkpoints/300")
    src.add_argument(hf_flag, help=hf_help)
    return src


def is_writer() -> bool:
    """Process 0 of a multi-process job (or the only process) writes the user's outputs; the others
    compute alongside it."""
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


class OutputFile:
    """A file the user asked for, written safely: an existing file is refused unless --overwrite (checked
    before any work), the content goes to a temporary file beside it, and a rename puts it in place, so
    a failed or interrupted command never leaves half a file where a good one was."""

    def __init__(self, path: str, flag: str, overwrite: bool, *, inputs: tuple[str, ...] = ()):
        self.path, self.flag = pathlib.Path(path).expanduser(), flag
        if any(self.path.resolve() == pathlib.Path(i).expanduser().resolve() for i in inputs if i):
            raise UserError(f"{flag} {path} is this command's input; write to another file")
        if self.path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name")
        if self.path.exists() and not overwrite:
            raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another file")
        if not self.path.parent.is_dir():
            raise UserError(f"{flag} {path}: the folder {self.path.parent} does not exist")
        self.temp = self.path.with_name(f".{self.path.name}.partial")

    @contextlib.contextmanager
    def writing(self, keep_partial: bool = False):
        """Yields the temporary path; renamed into place on success (and on failure with keep_partial,
        when something was written: the results so far)."""
        try:
            yield self.temp
        except BaseException:
            if keep_partial and self.temp.is_file() and self.temp.stat().st_size:
                os.replace(self.temp, self.path)
                print(f"{self.flag} {self.path} holds the results written before the error", file=sys.stderr)
            else:
                self.temp.unlink(missing_ok=True)
            raise
        os.replace(self.temp, self.path)


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def load_recipe(name_or_file: str, overrides: list[str]):
    """(recipe, init source): the recipe with `--set` applied and init.from resolved, once."""
    from lm.config import load_recipe
    from lm.state.source import resolve_init

    return resolve_init(load_recipe(name_or_file, overrides), overrides)


def tree_mode() -> None:
    """NNX_LM_TREE_MODE=1: run in NNX tree mode (flax's planned default), set before anything runs."""
    if os.environ.get("NNX_LM_TREE_MODE") == "1":
        from flax.nnx import graphlib

        graphlib.set_graph_mode(False)
        graphlib.set_graph_updates(False)


def main_guard(fn):
    """Run a CLI main: bad input becomes `error: <one line>` on stderr and exit code 2. A real
    process (argv None) first re-executes itself with huge-page malloc (_with_huge_pages)."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        if argv is None:
            _with_huge_pages()
            faulthandler.enable()  # a crash in native code prints every thread's Python stack
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        tree_mode()
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
