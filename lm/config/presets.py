"""Named model presets: the recipes' models and the Hugging Face families as their config.json files
state them (lm.hf reads those). Each architecture is written once; its variants are derived from it."""

from dataclasses import replace

from lm.config.model import ModelConfig
from lm.errors import UserError

# Width and depth first (vocab, d_model, layers, heads, kv heads, d_ff, context), then the family.
LLAMA3 = dict(vocab_size=128256, n_heads=32, n_kv_heads=8, max_seq_len=8192, norm_eps=1e-5, rope_theta=500_000.0,
              dtype="bfloat16")  # fmt: skip
LLAMA3_1B = ModelConfig(d_model=2048, n_layers=16, d_ff=8192, tie_embeddings=True, **LLAMA3)
LLAMA3_8B = ModelConfig(d_model=4096, n_layers=32, d_ff=14336, remat="dots_no_batch", **LLAMA3)
GEMMA = dict(vocab_size=256000, n_heads=8, max_seq_len=8192, head_dim=256, norm="rms_plus_one", mlp="geglu",
             scale_embeddings=True, tie_embeddings=True, dtype="bfloat16")  # fmt: skip

PRESETS: dict[str, ModelConfig] = {
    # The embedded default: a few million parameters, trains in minutes on a 2-core CPU.
    "stdlib_tiny": ModelConfig(4096, 128, 4, 4, 2, 384, 256, tie_embeddings=True),
    # The 'small config' of the benchmarks: 6 layers, width 384, 6 heads, vocab 8192.
    "small": ModelConfig(8192, 384, 6, 6, 6, 1024, 1024),
    "gpt2_124m": ModelConfig(
        50257, 768, 12, 12, 12, 3072, 1024, norm="layer", norm_eps=1e-5, mlp="gelu", positions="learned",
        mlp_bias=True, qkv_bias=True, attn_out_bias=True, tie_embeddings=True,
    ),  # fmt: skip
    "llama3_1b": LLAMA3_1B,
    "llama3_8b": LLAMA3_8B,
    "qwen3_0_6b": ModelConfig(
        151936, 1024, 28, 16, 8, 3072, 40960, head_dim=128, rope_theta=1_000_000.0, qk_norm=True,
        tie_embeddings=True, dtype="bfloat16",
    ),  # fmt: skip
    "mistral_7b": replace(LLAMA3_8B, vocab_size=32768, max_seq_len=32768, rope_theta=1_000_000.0),
    # Mixtures of experts, as their config.json files state them.
    "mixtral_8x7b": replace(
        LLAMA3_8B, vocab_size=32000, max_seq_len=32768, rope_theta=1_000_000.0, n_experts=8, experts_per_token=2,
    ),  # fmt: skip
    "qwen3_30b_a3b": ModelConfig(
        151936, 2048, 48, 32, 4, 6144, 40960, head_dim=128, rope_theta=1_000_000.0, qk_norm=True, n_experts=128,
        experts_per_token=8, moe_d_ff=768, router_aux_loss=0.001, dtype="bfloat16",
    ),  # fmt: skip
    # Hugging Face families, as their config.json files state them (lm.hf.config_from_hf reads those).
    "llama3_2_1b": replace(LLAMA3_1B, max_seq_len=131072, rope_type="llama3", rope_scaling=32.0),
    "llama3_1_8b": replace(LLAMA3_8B, max_seq_len=131072, rope_type="llama3", rope_scaling=8.0),
    "qwen2_5_0_5b": ModelConfig(
        151936, 896, 24, 14, 2, 4864, 32768, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True,
        dtype="bfloat16",
    ),  # fmt: skip
    "qwen2_5_1_5b": ModelConfig(
        151936, 1536, 28, 12, 2, 8960, 32768, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True,
        dtype="bfloat16",
    ),  # fmt: skip
    # Qwen's long-context setting (its model card adds rope_scaling yarn, factor 4 over 32,768 to config.json).
    "qwen2_5_7b_yarn": ModelConfig(
        152064, 3584, 28, 28, 4, 18944, 131072, rope_theta=1_000_000.0, qkv_bias=True, dtype="bfloat16",
        rope_type="yarn", rope_scaling=4.0, rope_original_max_len=32768,
    ),  # fmt: skip
    "gemma_2b": ModelConfig(d_model=2048, n_layers=18, n_kv_heads=1, d_ff=16384, **GEMMA),
    "gemma2_2b": ModelConfig(
        d_model=2304, n_layers=26, n_kv_heads=4, d_ff=9216, post_norms=True, query_pre_attn_scalar=256.0,
        attn_softcap=50.0, final_softcap=30.0, sliding_window=4096, sliding_window_every=2, **GEMMA,
    ),  # fmt: skip
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
