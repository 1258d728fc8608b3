"""Tiny random-init transformers checkpoints, one per supported family, built by the tests themselves.

Norm weights and biases are perturbed first: transformers starts them at 1 (Gemma: 0) and 0, so a
dropped or misplaced one would otherwise go unnoticed.
"""

import pathlib

import numpy as np

COMMON = dict(vocab_size=160, initializer_range=0.1)

# Each case covers a property the issue asks for; the comment says which.
CASES = {
    # GQA ratio 3 (not a power of two), odd layer count, untied head, llama3 RoPE with all three bands.
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10_000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    # A single KV head, a sliding window (5) shorter than the sequence, linear RoPE scaling.
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=5,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="linear", rope_theta=10_000.0, factor=2.0),
        ),
    ),
    # q/k/v biases without an output bias, tied head.
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    # YaRN past the original context: sample_tokens() has 16 positions, the original context is 8;
    # theta 10, head_dim 16 and the betas put a blended band (dimensions 0..6) between the kept and
    # the interpolated frequencies; the default attention factor (0.1 ln 4 + 1) scales cos and sin.
    "qwen2_yarn": (
        "Qwen2Config",
        dict(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10.0,
                factor=4.0,
                original_max_position_embeddings=8,
                beta_fast=4.0,
                beta_slow=0.25,
            ),
        ),
    ),
    # q/k norms and an explicit head_dim (heads * head_dim != hidden size).
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
        ),
    ),
    # GeGLU, (1 + w) norms, embeddings scaled by sqrt(d), one KV head, tied head.
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
        ),
    ),
    # Soft-capping small enough to bite, post-norms, query_pre_attn_scalar, windows on alternating
    # layers (3 layers: sliding, full, sliding), window 4 shorter than the sequence.
    "gemma2": (
        "Gemma2Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            sliding_window=4,
        ),
    ),
    # Mixture of experts, each with GQA, an odd layer count and routers drawn at random (build_hf).
    # Mixtral: top-2 of 4 experts, softmax over the top-k logits.
    "mixtral": (
        "MixtralConfig",
        dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen3-MoE: top-3 of 6, renormalised, q/k norms, a head_dim of its own; layer 0 dense
    # (mlp_only_layers: a dense run, then an expert run, under the layer scan).
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2-MoE: top-2 of 4 not renormalised, q/k/v biases, a shared expert behind a sigmoid gate;
    # experts in every second layer (decoder_sparse_step: a (dense, experts) run, then a dense tail).
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            tie_word_embeddings=False,
        ),
    ),
    # Conv1D [in, out] weights, fused c_attn, learned positions, LayerNorm, biases, tied head.
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)),
}


def build_hf(family: str, seed: int = 0, dtype: str = "float32"):
    """A random-init transformers model of the family, with perturbed norms and biases."""
    import torch
    import transformers

    config_cls, kwargs = CASES[family]
    config = getattr(transformers, config_cls)(**COMMON, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norm scales and biases
                param.add_(torch.randn_like(param) * 0.3)
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):  # MoE routers
                param.copy_(torch.randn_like(param))  # decisive picks: top-k far from ties
    return model.to(getattr(torch, dtype)).eval()


def save_hf_checkpoint(family: str, folder: pathlib.Path, dtype: str = "float32", **save_kwargs):
    model = build_hf(family, dtype=dtype)
    model.save_pretrained(folder, **save_kwargs)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def sample_tokens(batch: int = 2, length: int = 16, vocab: int = COMMON["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)
