"""jax.profiler traces of chosen training steps, and a summary of a trace by op class.

`train.profile_steps=a:b` traces steps a..b (inclusive) into <run_dir>/profile; `launch.bench train
--profile DIR` traces the timed steps. `summarize` reads the trace's per-op events (the XLA
instruction names) and groups them with the compiled HLO into the classes of docs/benchmarks.md.
"""

import collections
import gzip
import json
import pathlib
import re

import jax

CLASSES = (
    "matmul forward",
    "matmul backward",
    "attention",
    "elementwise and norms",
    "optimizer",
    "copies and transposes",
    "scan slicing",
    "other",
)


class StepProfiler:
    """Starts a trace before step `first` and stops it after step `last` (inclusive).

    `settle` (the checkpointer's wait) runs before the trace starts and stops, so no checkpoint is
    being written in the background then: the trace shows training steps, not a save's copies, and
    the profiler's start and stop never race orbax's threads. A run in CI died with SIGSEGV on the
    first traced step, right after a background save had begun (once in ~180 repeats here).
    """

    def __init__(self, steps: tuple[int, int] | None, out_dir: pathlib.Path, settle=lambda: None):
        self.steps, self.out_dir, self.settle, self.active = steps, pathlib.Path(out_dir), settle, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.settle()
            jax.profiler.start_trace(str(self.out_dir), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs=None) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.settle()
            self.close()

    def close(self) -> None:
        """Stop a trace still running (the loop's `finally`: no waiting on a save that may have failed)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = [^ ]+ ([\w\-]+)\((.*)$")


def _instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """name -> (opcode, op_name metadata, called computation) for every HLO instruction."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        out[name] = (opcode, op_name.group(1) if op_name else "", calls.group(1) if calls else "")
    return out


def _computations(hlo_text: str) -> dict[str, str]:
    comps, name, body = {}, None, []
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if m and line.rstrip().endswith("{"):
            name, body = m.group(1), []
        elif line.startswith("}") and name:
            comps[name] = "\n".join(body)
            name = None
        elif name:
            body.append(line)
    return comps


def classify(name: str, opcode: str, op_name: str, body: str) -> str:
    backward = "transpose(jvp" in op_name
    in_model = "jvp(" in op_name
    attention = any(s in op_name for s in ("BNTS", "BTNH", "BSNH", "dot_product_attention", "softmax"))
    has_dot = opcode in ("dot", "convolution") or " dot(" in body or " convolution(" in body
    if has_dot:
        if attention:
            return "attention"
        return "matmul backward" if backward else "matmul forward"
    if not in_model and opcode not in ("while", "call", "conditional"):
        return "optimizer"
    if "dynamic-slice" in name or "dynamic-update-slice" in name or opcode in ("dynamic-slice", "dynamic-update-slice"):
        return "scan slicing"
    if name.startswith(("copy", "transpose")) or opcode in ("copy", "transpose"):
        return "copies and transposes"
    if attention:
        return "attention"
    return "elementwise and norms"


def summarize(trace_dir: str | pathlib.Path, hlo_text: str, steps: int) -> dict:
    """Milliseconds per step by op class (summed over XLA's threads), plus the ten costliest ops."""
    files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    instrs, comps = _instructions(hlo_text), _computations(hlo_text)
    by_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in instrs:
            by_op[e["name"]] += e["dur"] / 1e3 / steps
    by_class = collections.Counter()
    for name, ms in by_op.items():
        opcode, op_name, calls = instrs[name]
        if opcode in ("while", "call", "conditional"):
            continue  # containers: their bodies' ops are counted themselves
        by_class[classify(name, opcode, op_name, comps.get(calls, ""))] += ms
    total = sum(by_class.values())
    return {
        "ms_per_step_by_class": {c: round(by_class[c], 1) for c in CLASSES if by_class[c]},
        "ms_per_step_total": round(total, 1),
        "top_ops": [
            {"op": n, "class": classify(n, *instrs[n][:2], comps.get(instrs[n][2], "")), "ms_per_step": round(ms, 1),
             "source": instrs[n][1][-90:]}
            for n, ms in by_op.most_common(12)
            if instrs[n][0] not in ("while", "call", "conditional")
        ],
    }
