"""Host memory of a Hugging Face import: write a synthetic sharded Llama checkpoint (~1.3 GB float32,
4 shards), import it with lm.hf.load_hf in a fresh process, and report that process's peak RSS
against the file size and the model's own bytes (which, on the CPU backend, live in host memory too).

    python tests/support/hf_memory.py [--dir /tmp/hf_memory] [--keep]

Not a test: it writes more than a gigabyte. The folder is deleted afterwards unless --keep.
"""

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np

CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
    dtype="float32",
)

MEASURE = """
import json, sys, time
import jax
from lm.hf import load_hf
def status(key):  # bytes, from /proc/self/status (VmRSS: now, VmHWM: peak)
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) * 1024
jax.block_until_ready(jax.numpy.zeros(1))  # the backend is up before the baseline
base = status("VmRSS")
start = time.perf_counter()
model = load_hf(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(model))
seconds = time.perf_counter() - start
model_bytes = sum(x.nbytes for x in jax.tree.leaves(model))
peak = status("VmHWM")
print(json.dumps(dict(rss_before_load=base, peak_rss=peak, model_bytes=model_bytes, load_seconds=round(seconds, 1))))
"""


def tensors(cfg: dict):
    """(name, shape) of every tensor, in the order transformers writes them."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,)
        yield p + "self_attn.q_proj.weight", (d, d)
        yield p + "self_attn.k_proj.weight", (kv, d)
        yield p + "self_attn.v_proj.weight", (kv, d)
        yield p + "self_attn.o_proj.weight", (d, d)
        yield p + "post_attention_layernorm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (f, d)
        yield p + "mlp.up_proj.weight", (f, d)
        yield p + "mlp.down_proj.weight", (d, f)
    yield "model.norm.weight", (d,)
    yield "lm_head.weight", (v, d)


def write(folder: pathlib.Path, shards: int = 4) -> int:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    specs = list(tensors(CONFIG))
    total = sum(4 * int(np.prod(s)) for _, s in specs)
    rng = np.random.default_rng(0)
    weight_map, shard, size, k = {}, {}, 0, 0
    for n, (name, shape) in enumerate(specs):
        shard[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        size += shard[name].nbytes
        if size >= total / shards or n == len(specs) - 1:
            k += 1
            file = f"model-{k:05d}-of-{shards:05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, size = {}, 0
    assert k == shards, k
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/hf_memory")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    folder = pathlib.Path(args.dir)
    try:
        write(folder)
        file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        root = pathlib.Path(__file__).resolve().parents[2]
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(folder)], cwd=root, capture_output=True, text=True, check=True
        )
        largest = max(4 * int(np.prod(shape)) for _, shape in tensors(CONFIG))
        result = {"file_bytes": file_bytes, "shards": 4, "largest_tensor_bytes": largest}
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
        result["peak_minus_before_minus_model"] = result["peak_rss"] - result["rss_before_load"] - result["model_bytes"]
        print(json.dumps(result, indent=2))
        gib = 2**30
        print(
            f"file {file_bytes / gib:.2f} GiB; peak RSS {result['peak_rss'] / gib:.2f} GiB = "
            f"{result['rss_before_load'] / gib:.2f} GiB before loading + {result['model_bytes'] / gib:.2f} GiB model "
            f"+ {result['peak_minus_before_minus_model'] / gib:.2f} GiB transient "
            f"(largest tensor {largest / gib:.2f} GiB)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
