"""Hugging Face import and export, checked against transformers itself on checkpoints the tests build."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import CASES, build_hf, hf_logits, sample_tokens, save_hf_checkpoint

from lm.errors import UserError
from lm.hf import config_from_hf, load_hf, save_hf

pytest.importorskip("transformers")


def our_logits(model, tokens: np.ndarray) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(model(jnp.asarray(tokens), positions))


def flat_params(model) -> dict:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """(family, folder, transformers' logits on sample_tokens())."""
    folder = tmp_path_factory.mktemp(request.param)
    model = save_hf_checkpoint(request.param, folder)
    return request.param, folder, hf_logits(model, sample_tokens())


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_imported_logits_match_transformers(checkpoint, scan):
    family, folder, want = checkpoint
    model = load_hf(folder, scan_layers=scan)
    np.testing.assert_allclose(our_logits(model, sample_tokens()), want, atol=1e-4, rtol=0)


def test_export_loads_in_transformers_unchanged_with_same_logits(checkpoint, tmp_path):
    import transformers

    family, folder, want = checkpoint
    save_hf(load_hf(folder), tmp_path)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(back).__name__ == json.loads((folder / "config.json").read_text())["architectures"][0]
    np.testing.assert_allclose(hf_logits(back, sample_tokens()), want, atol=1e-5, rtol=0)


def test_import_export_import_is_bit_exact(checkpoint, tmp_path):
    family, folder, _ = checkpoint
    first = load_hf(folder, scan_layers=False)
    save_hf(first, tmp_path)
    second = load_hf(tmp_path, scan_layers=False)
    a, b = flat_params(first), flat_params(second)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype and np.array_equal(a[path], b[path]), path
    assert config_from_hf(folder) == config_from_hf(tmp_path)


def _tensors(folder) -> dict:
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.mark.parametrize("family, dtype", [("llama", "bfloat16"), ("gemma2", "bfloat16"), ("qwen2", "float16")])
def test_half_precision_checkpoint_keeps_its_exact_bits(tmp_path, family, dtype):
    save_hf_checkpoint(family, tmp_path / "in", dtype=dtype)
    model = load_hf(tmp_path / "in")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(dtype)}
    save_hf(model, tmp_path / "out")
    original, exported = _tensors(tmp_path / "in"), _tensors(tmp_path / "out")
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype
        assert np.array_equal(exported[name].view(np.uint16), tensor.view(np.uint16)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype


def test_sharded_index_checkpoint_imports_and_exports_sharded(tmp_path):
    model = save_hf_checkpoint("qwen3", tmp_path / "in", max_shard_size="20KB")
    assert (tmp_path / "in" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "in").glob("*.safetensors"))) > 2
    ours = load_hf(tmp_path / "in")
    np.testing.assert_allclose(our_logits(ours, sample_tokens()), hf_logits(model, sample_tokens()), atol=1e-4)
    save_hf(ours, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files and len(files) > 2
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _tensors(tmp_path / "out").values())


def test_sliding_window_and_softcap_actually_change_the_logits(tmp_path):
    """The family cases would pass vacuously if the window or the caps never bit."""
    import dataclasses

    from lm.model import Transformer

    save_hf_checkpoint("gemma2", tmp_path)
    cfg = config_from_hf(tmp_path)
    assert cfg.sliding_layers == (True, False, True) and cfg.sliding_window < sample_tokens().shape[1]
    model = load_hf(tmp_path)
    base = our_logits(model, sample_tokens())
    for change in (dict(sliding_window=None), dict(attn_softcap=None), dict(final_softcap=None)):
        other = Transformer(dataclasses.replace(cfg, **change), rngs=nnx.Rngs(0))
        nnx.update(other, nnx.state(model, nnx.Param))
        assert np.abs(our_logits(other, sample_tokens()) - base).max() > 1e-3, change


@pytest.mark.slow
def test_sliding_window_in_cached_decode_equals_full_forward(tmp_path):
    """Decode past the window: the cache mask must drop the keys that left it, on the right layers."""
    save_hf_checkpoint("gemma2", tmp_path)
    for scan in (True, False):
        model = load_hf(tmp_path, scan_layers=scan)
        tokens = sample_tokens(length=14)
        full = our_logits(model, tokens)
        model.init_cache(2, 16)
        positions = jnp.broadcast_to(jnp.arange(14), (2, 14))
        model(jnp.asarray(tokens[:, :6]), positions[:, :6], mode="prefill")
        for t in range(6, 14):
            step = model(jnp.asarray(tokens[:, t : t + 1]), positions[:, t : t + 1], mode="decode")
            np.testing.assert_allclose(np.asarray(step[:, 0]), full[:, t], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the option and its value.


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_unknown_architecture_is_refused(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    _edit_config(tmp_path, model_type="phi3", architectures=["Phi3ForCausalLM"])
    with pytest.raises(UserError, match="model_type='phi3' is not supported"):
        load_hf(tmp_path)


def test_unsupported_rope_type_is_refused(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(UserError, match="rope_type='longrope' is not supported"):
        config_from_hf(tmp_path)
    # transformers 4.x spelling
    _edit_config(tmp_path, rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(UserError, match="rope_type='dynamic'"):
        config_from_hf(tmp_path)


def test_transformers_4_rope_keys_are_read(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    new = config_from_hf(tmp_path)
    params = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    theta = params.pop("rope_theta")
    _edit_config(tmp_path, rope_parameters=None, rope_theta=theta, rope_scaling=params)
    assert config_from_hf(tmp_path) == new


def test_missing_shard_is_refused(tmp_path):
    save_hf_checkpoint("qwen2", tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=f"lacks shard {shard.name}"):
        load_hf(tmp_path)


def test_wrong_tensor_shape_is_refused(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    _edit_config(tmp_path, intermediate_size=80)
    with pytest.raises(UserError, match=r"mlp.gate_proj.weight has shape \[96, 48\]"):
        load_hf(tmp_path)


def test_missing_and_leftover_tensors_are_refused(tmp_path):
    from safetensors.numpy import save_file

    save_hf_checkpoint("llama", tmp_path)
    tensors = _tensors(tmp_path)
    dropped = tensors.pop("model.layers.1.post_attention_layernorm.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.layers.1.post_attention_layernorm.weight is missing"):
        load_hf(tmp_path)
    tensors["model.layers.1.post_attention_layernorm.weight"] = dropped
    tensors["model.layers.9.extra.weight"] = dropped
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.layers.9.extra.weight"):
        load_hf(tmp_path)


def test_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(build_hf("gpt2").config.to_dict()))
    with pytest.raises(UserError, match="holds no model.safetensors"):
        load_hf(tmp_path)


HF_PRESETS = (
    "llama3_2_1b",
    "llama3_1_8b",
    "mistral_7b",
    "qwen2_5_0_5b",
    "qwen2_5_7b_yarn",
    "qwen3_0_6b",
    "gemma_2b",
    "gemma2_2b",
    "gpt2_124m",
    "mixtral_8x7b",
    "qwen3_30b_a3b",
)


@pytest.mark.parametrize("name", HF_PRESETS)
def test_family_presets_write_a_config_that_reads_back_the_same(name):
    """config_to_hf checks the read-back itself; transformers must also accept the file."""
    import transformers

    from lm.config import preset
    from lm.hf import config_to_hf

    written = config_to_hf(preset(name))
    config = transformers.AutoConfig.for_model(**written)
    assert type(config).__name__.lower().startswith(written["model_type"].replace("_", ""))


def test_option_without_a_hugging_face_equivalent_is_refused_on_export(tiny_cfg, tmp_path):
    import dataclasses

    from lm.model import Transformer

    cfg = dataclasses.replace(tiny_cfg, n_layers=3, sliding_window=4, sliding_window_every=2)  # Mistral: all layers
    with pytest.raises(UserError, match="mistral checkpoint: .*sliding_window_every=2"):
        save_hf(Transformer(cfg, rngs=nnx.Rngs(0)), tmp_path)
    assert not list(tmp_path.iterdir())


def test_truncated_safetensors_file_is_refused(tmp_path):
    save_hf_checkpoint("gpt2", tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf(tmp_path)


def test_save_hf_replaces_weights_only_once_the_new_ones_are_written(tiny_cfg, tmp_path, monkeypatch):
    import safetensors.numpy

    from lm.model import Transformer

    model = Transformer(tiny_cfg, rngs=nnx.Rngs(0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_ema.safetensors").write_bytes(b"not ours")  # matches model*.safetensors, but is not the weights
    save_hf(model, out, max_shard_bytes=20_000)  # several shards and an index
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "model.safetensors.index.json" in old and sum(n.startswith("model-0") for n in old) > 1

    writes = []

    def failing(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)

    real = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, out, max_shard_bytes=20_000)
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # the earlier export whole, no leftovers

    monkeypatch.setenv("HOME", str(tmp_path))
    save_hf(model, "~/out")  # one file now: the old shards and their index go, model_ema stays
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "model_ema.safetensors"]
    assert (out / "model_ema.safetensors").read_bytes() == b"not ours"
    want, got = flat_params(model), flat_params(load_hf(out, scan_layers=tiny_cfg.scan_layers))
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path])


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(truncate=False, beta_fast=8.0, beta_slow=0.5),
        dict(mscale=0.707, mscale_all_dim=1.0),  # DeepSeek's form of the attention factor
        dict(attention_factor=1.5),
    ],
    ids=["defaults", "untruncated", "mscale", "explicit"],
)
def test_yarn_frequencies_and_attention_factor_match_transformers(tmp_path, extra):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lm.model.attention import rope_attention_factor, rope_frequencies

    rope = dict(rope_type="yarn", rope_theta=500.0, factor=8.0, original_max_position_embeddings=64, **extra)
    hf = transformers.Qwen2Config(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, rope_parameters=rope
    )
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    hf.save_pretrained(tmp_path)
    cfg = config_from_hf(tmp_path)
    np.testing.assert_allclose(rope_frequencies(cfg), want_freq.numpy(), rtol=1e-6)
    assert rope_attention_factor(cfg) == pytest.approx(want_factor, rel=1e-7)
    assert cfg.rope_type == "yarn" and cfg.rope_scaling == 8.0 and cfg.rope_original_max_len == 64
