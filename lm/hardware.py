"""Accelerator data sheets in one place: memory, peak FLOP/s and bandwidths per device, and the
named topologies (a TPU slice, a GPU box) that recipes are planned against.

Numbers are the vendors' published per-device figures (Cloud TPU system-architecture pages, NVIDIA
data sheets), dense bf16 without sparsity. Bandwidths are bytes/s per device in one direction: ICI
(TPU) or NVLink (GPU) inside a slice or box, DCN (the data-centre network: host NICs divided by the
devices they serve) across slices or boxes. They are round numbers for planning, not measurements.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp

from lm.errors import UserError

GB = 10**9


def platform(name: str | None = None) -> str:
    """'cpu', 'gpu' or 'tpu' (ROCm stays 'rocm'): jax's backend names for an NVIDIA GPU ('gpu',
    'cuda') folded into one. The one place platform names are compared; default: this process's."""
    name = jax.default_backend() if name is None else name
    return "gpu" if name in ("gpu", "cuda") else name


def is_accelerator(name: str | None = None) -> bool:
    """GPUs and TPUs: where the compute dtype defaults to bfloat16."""
    return platform(name) in ("gpu", "tpu", "rocm")


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    kinds: tuple[str, ...]  # jax `device_kind` prefixes that identify it
    hbm_bytes: int
    peak_tflops: float  # dense bf16 per device; 0 means "measure it" (CPU)
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # ICI / NVLink per device
    dcn_bytes_per_s: float  # per device, across slices or hosts
    mfu: float  # the MFU a well-tuned dense LLM step reaches here, used for predicted step times

    def __post_init__(self):
        if self.hbm_bytes <= 0 or self.peak_tflops < 0 or not 0 < self.mfu <= 1:
            raise ValueError(f"bad device spec {self}")


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        # Cloud TPU: v5e and v6e tables on cloud.google.com/tpu/docs/v6e; v5p on .../v5p. DCN per chip
        # is the host's NICs over its chips (v5e 2x100 Gb/s, v6e 4x200 Gb/s per 8 chips; v5p 200 Gb/s per 4).
        Device("tpu-v4", ("TPU v4",), 32 * GB, 275.0, 1200 * GB, 300 * GB, 6.25 * GB, 0.5),
        Device("tpu-v5e", ("TPU v5 lite", "TPU v5e"), 16 * GB, 197.0, 800 * GB, 200 * GB, 3.125 * GB, 0.5),
        Device("tpu-v5p", ("TPU v5p", "TPU v5"), 95 * GB, 459.0, 2765 * GB, 600 * GB, 6.25 * GB, 0.5),
        Device("tpu-v6e", ("TPU v6 lite", "TPU v6e"), 32 * GB, 918.0, 1600 * GB, 400 * GB, 12.5 * GB, 0.5),
        # NVIDIA SXM parts: NVLink 4 = 900 GB/s and NVLink 3 = 600 GB/s both directions together;
        # DCN = one 400 Gb/s (H100/H200) or 200 Gb/s (A100) InfiniBand NIC per GPU, as in DGX boxes.
        Device("h100-80gb", ("NVIDIA H100",), 80 * GB, 989.0, 3350 * GB, 450 * GB, 50 * GB, 0.4),
        Device("h200-141gb", ("NVIDIA H200", "NVIDIA GH200"), 141 * GB, 989.0, 4800 * GB, 450 * GB, 50 * GB, 0.4),
        Device("a100-80gb", ("NVIDIA A100",), 80 * GB, 312.0, 2039 * GB, 300 * GB, 25 * GB, 0.4),
        Device("a100-40gb", ("NVIDIA A100-SXM4-40GB",), 40 * GB, 312.0, 1555 * GB, 300 * GB, 25 * GB, 0.4),
        Device("b200-180gb", ("NVIDIA B200",), 180 * GB, 2250.0, 8000 * GB, 900 * GB, 50 * GB, 0.4),
        # A 24 GB PCIe card (no NVLink: PCIe 4.0 x16) - the workstation GPU people try first.
        Device("l4-24gb", ("NVIDIA L4",), 24 * GB, 121.0, 300 * GB, 32 * GB, 3 * GB, 0.4),
        # This machine: memory is host RAM; peak is measured (measure_peak_tflops);
        # fake devices exchange data through host memory.
        Device("cpu", ("cpu",), 16 * GB, 0.0, 10 * GB, 10 * GB, 1 * GB, 0.5),
    )
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """n_devices devices of one kind; slices > 1 means that many ICI/NVLink domains joined by DCN."""

    name: str
    device: Device
    n_devices: int
    slices: int = 1

    def __post_init__(self):
        if self.n_devices <= 0 or self.slices <= 0 or self.n_devices % self.slices:
            raise UserError(f"topology {self.name}: {self.n_devices} devices do not split into {self.slices} slices")


def _tpu(version: str, chips: int, slices: int = 1) -> Topology:
    name = f"{version}-{chips}" + (f" x{slices}" if slices > 1 else "")
    return Topology(name, DEVICES[f"tpu-{version}"], chips * slices, slices)


# Cloud TPU names count chips for v5e/v6e and TensorCores for v4/v5p (2 per chip: v5p-128 is 64 chips).
TOPOLOGIES: dict[str, Topology] = {
    t.name: t
    for t in (
        *(_tpu("v5e", n) for n in (1, 4, 8, 16, 32, 64, 128, 256)),
        *(_tpu("v6e", n) for n in (1, 4, 8, 16, 32, 64, 128, 256)),
        *(Topology(f"v5p-{2 * n}", DEVICES["tpu-v5p"], n) for n in (4, 8, 16, 32, 64, 128, 256)),
        *(Topology(f"v4-{2 * n}", DEVICES["tpu-v4"], n) for n in (4, 8, 16, 32, 64, 128)),
    )
}


def topology(name: str) -> Topology:
    """A TPU slice ('v5p-128', 'v5e-256', or 'v5e-256 x2' for two slices over DCN), a GPU box
    ('h100-80gb x8', 'a100-80gb', 'h100-80gb x16' is two 8-GPU hosts), or 'cpu' / 'cpu x8'."""
    text = " ".join(name.lower().split())
    base, _, count = text.partition(" x")
    if count and not count.isdigit():
        raise UserError(f"topology {name!r}: expected NAME or 'NAME xN', e.g. 'h100-80gb x8' or 'v5e-256 x2'")
    n = int(count) if count else 1
    if n <= 0:
        raise UserError(f"topology {name!r}: the count must be positive")
    if base in TOPOLOGIES:
        t = TOPOLOGIES[base]
        return Topology(text, t.device, t.n_devices * n, n)
    if base in DEVICES:
        dev = DEVICES[base]
        if dev.name == "cpu":
            # Fake CPU devices share the host's memory.
            return Topology(text, dataclasses.replace(dev, hbm_bytes=host_memory_bytes() // n), n)
        per_host = 8  # GPU boxes: NVLink inside 8 GPUs, DCN between boxes
        slices = max(1, n // per_host) if n % per_host == 0 else 1
        return Topology(text, dev, n, slices)
    known = sorted(TOPOLOGIES) + sorted(DEVICES)
    raise UserError(f"unknown topology {name!r}; choose one of {known} (optionally with ' xN')")


def device_for_kind(kind: str) -> Device | None:
    """The data sheet for a jax `device_kind` string (longest matching prefix), or None."""
    matches = [(p, d) for d in DEVICES.values() for p in d.kinds if kind.startswith(p) and d.peak_tflops]
    return max(matches, key=lambda m: len(m[0]))[1] if matches else None


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return DEVICES["cpu"].hbm_bytes


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
