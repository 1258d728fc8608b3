"""Throughput, MFU and the metrics log (metrics.jsonl plus wandb)."""

import json
import pathlib
import time

import jax
import jax.numpy as jnp

from lm.hardware import DEVICES

# Dense bf16 peak TFLOP/s per device, from the data sheets in lm.hardware, matched by device_kind prefix.
PEAK_TFLOPS = {kind: d.peak_tflops for d in DEVICES.values() for kind in d.kinds if d.peak_tflops}


def measure_peak_tflops(n: int = 1024, repeats: int = 5) -> float:
    """A float32 matmul's TFLOP/s on this device: the CPU's 'peak' (no data sheet applies)."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(x).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def peak_tflops_per_device(configured: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number came from)."""
    if configured:
        return configured, "configured"
    kind = jax.devices()[0].device_kind
    for prefix, tflops in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return tflops, f"data sheet ({kind})"
    return measure_peak_tflops(), f"measured float32 matmul ({kind})"


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to wandb.

    Only process 0 writes; other processes get a disabled log.
    """

    def __init__(self, run_dir: pathlib.Path, config: dict, *, wandb_mode: str, project: str, enabled: bool):
        self.enabled = enabled
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if enabled and wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=project,
                dir=str(run_dir),
                config=config,
                mode=wandb_mode,
                name=pathlib.Path(run_dir).name,
                resume="allow",
                settings=wandb.Settings(silent=True, console="off"),
            )

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint: those steps are about to be redone."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
