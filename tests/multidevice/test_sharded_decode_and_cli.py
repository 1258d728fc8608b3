"""On 8 fake CPU devices: tensor-parallel decode, and the train CLI on an fsdp x tensor mesh."""

import json
import os

import jax
import numpy as np
from flax import nnx
from helpers import run_cli, tiny_train_args

from lm.config import MeshConfig, ModelConfig
from lm.infer.decode import generate
from lm.model import Transformer
from sharding.mesh import Layout
from sharding.partition import create_sharded

CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=128)


def test_tensor_sharded_decode_equals_single_device():
    prompts = [np.random.default_rng(0).integers(4, 256, n).tolist() for n in (1, 7, 30)]
    single = generate(Transformer(CFG, rngs=nnx.Rngs(0)), prompts, max_new_tokens=16).tokens
    layout = Layout.build(MeshConfig(data=1, fsdp=1, tensor=4), jax.devices()[:4])
    with layout:
        model = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), layout)
        assert model.blocks.attn.key.kernel[...].addressable_shards[0].data.shape[2] == 1  # 4 kv heads / 4
        sharded = generate(model, prompts, max_new_tokens=16).tokens
    assert sharded == single


def test_train_cli_on_fsdp4_tensor2(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    env = {"XLA_FLAGS": os.environ["XLA_FLAGS"]}
    out = run_cli(*tiny_train_args(tiny_corpus, run_dir, "mesh.fsdp=4", "mesh.tensor=2"), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    mesh = "mesh {'data': 1, 'fsdp': 4, 'context': 1, 'tensor': 2, 'expert': 1} over 8 cpu devices"
    assert mesh in out.stdout + out.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and (run_dir / "checkpoints" / "6").is_dir()
    assert "--- sample ---" in out.stdout
