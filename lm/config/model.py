"""ModelConfig: one frozen dataclass describes every model family the repo builds."""

import dataclasses
from typing import Literal

import jax.numpy as jnp

from lm.errors import UserError
from lm.hardware import is_accelerator

# The options that change speed and memory but never the numbers: they may differ between training
# and inference, and between a run and the source its weights come from (init.from, an HF folder).
EXECUTION = (
    "dtype", "param_dtype", "scan_layers", "remat", "attention_impl", "max_segments", "loss_chunk", "prefill_chunk",
    "context_parallel", "moe_impl",
)  # fmt: skip
# Of those, the ones a checkpoint's stored layout depends on: a resumed run keeps them.
STORED = ("param_dtype", "scan_layers")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 512
    max_seq_len: int = 256
    head_dim: int | None = None  # None: d_model // n_heads

    # Family options.
    norm: Literal["rms", "rms_plus_one", "layer"] = "rms"  # rms_plus_one: Gemma's (1 + w) scale, w starts at 0
    norm_eps: float = 1e-6
    mlp: Literal["swiglu", "geglu", "gelu"] = "swiglu"  # geglu: Gemma's gated GELU (tanh)
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10_000.0
    rope_scaling: float = 1.0  # the RoPE scaling factor; default and linear divide positions by it
    # llama3: Llama 3.1's per-frequency scaling; yarn: YaRN (Qwen 2.5/3's long context), which also
    # scales the attention logits by rope_attention_factor squared.
    rope_type: Literal["default", "linear", "llama3", "yarn"] = "default"
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 and yarn: the context the model was pre-trained with
    rope_beta_fast: float = 32.0  # yarn only: rotations below which a frequency is interpolated ...
    rope_beta_slow: float = 1.0  # yarn only: ... and above which it is kept; the band between is blended
    rope_attention_factor: float | None = None  # yarn only: cos/sin multiplier; None: 0.1 ln(factor) + 1
    rope_truncate: bool = True  # yarn only: round the blended band outwards to whole dimensions
    qkv_bias: bool = False  # Qwen2
    mlp_bias: bool = False  # GPT-2
    attn_out_bias: bool = False  # GPT-2: a bias on the attention output projection
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's queries and keys
    tie_embeddings: bool = False
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(d_model), in the compute dtype
    post_norms: bool = False  # Gemma 2: also normalise the attention and MLP outputs before each residual add
    query_pre_attn_scalar: float | None = None  # Gemma 2: scores scaled by this**-0.5 instead of head_dim**-0.5
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    # Sliding-window attention (Mistral, Gemma 2, Qwen2): a query sees at most this many keys, itself
    # included, on layers first, first + every, first + 2 * every, ...; the other layers see everything.
    sliding_window: int | None = None
    sliding_window_first: int = 0
    sliding_window_every: int = 1  # Gemma 2: 2 (even layers slide, odd layers are global)
    init_std: float = 0.02

    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): n_experts > 0 replaces the MLP of the layers
    # `moe_layers` names with experts_per_token of n_experts routed experts, each moe_d_ff wide.
    n_experts: int = 0  # 0: dense
    experts_per_token: int = 2
    moe_d_ff: int | None = None  # None: d_ff
    n_shared_experts: int = 0  # Qwen2-MoE: experts every token passes, behind a sigmoid gate
    shared_expert_d_ff: int | None = None  # their total width; None: n_shared_experts * moe_d_ff
    moe_layer_step: int = 1  # layer i has experts when (i + 1) % step == 0 (transformers' decoder_sparse_step)
    dense_layers: tuple[int, ...] = ()  # layers kept dense (transformers' mlp_only_layers)
    router_norm_topk: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral, Qwen3-MoE); Qwen2-MoE: no
    router_aux_loss: float = 0.0  # load-balancing loss coefficient (transformers' router_aux_loss_coef)
    router_z_loss: float = 0.0  # router z-loss coefficient (ST-MoE)
    capacity_factor: float | None = None  # None: dropless (grouped matmuls); else tokens per expert capped

    # Execution options (EXECUTION): they change speed and memory, never the numbers.
    dtype: str = "auto"  # compute dtype of activations and matmuls; auto: bfloat16 on GPU/TPU, float32 on CPU
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # auto: cuDNN flash attention on GPU, splash on TPU, XLA elsewhere or where a kernel can't do the
    # layer (lm.kernels.choose_attention_impl); splash_interpret runs splash in the Pallas interpreter.
    attention_impl: Literal["auto", "xla", "cudnn", "splash", "splash_interpret"] = "auto"
    max_segments: int = 32  # packed documents per row that cuDNN keeps apart (more: NaN loss, not mixing)
    # Sequence positions per cross-entropy chunk (the full [batch, length, vocab] logits never exist);
    # None: automatic (see loss_chunk_for); 0: never chunk.
    loss_chunk: int | None = None
    # Prompt tokens per prefill step: a longer prompt fills the KV cache chunk by chunk, so prefill
    # memory follows the chunk rather than the prompt (lm.infer.decode); 0: the whole prompt at once.
    prefill_chunk: int = 0
    # Attention when mesh.context > 1 splits the sequence (lm.kernels.context): allgather gathers
    # K/V whole on every device; ring passes K/V blocks around the devices (two blocks in memory).
    context_parallel: Literal["allgather", "ring"] = "allgather"
    # Grouped matmul of the dropless MoE dispatch: auto is megablox on TPU where its tiles fit, a tiled
    # scan on CPU, XLA's ragged_dot elsewhere (lm.kernels.grouped_matmul); megablox_interpret runs the
    # kernel interpreted.
    moe_impl: Literal["auto", "ragged_dot", "tiled", "megablox", "megablox_interpret"] = "auto"

    def __post_init__(self):
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "max_segments")
        for name in sizes:
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name}={getattr(self, name)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
                f"use n_kv_heads in {_divisors(self.n_heads)}"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "change one of them or set model.head_dim"
            )
        if self.attention_impl == "cudnn" and self.dtype == "float32":
            raise UserError(
                "model.attention_impl=cudnn needs model.dtype=bfloat16 (or auto on a GPU); cuDNN flash "
                "attention has no float32 kernel"
            )
        if self.prefill_chunk < 0:
            raise UserError(f"model.prefill_chunk={self.prefill_chunk} must be >= 0 (0: prefill in one pass)")
        if self.loss_chunk is not None and self.loss_chunk < 0:
            raise UserError(f"model.loss_chunk={self.loss_chunk} must be >= 0 (0: never chunk the loss)")
        if self.positions == "rope" and self.dim_per_head % 2:
            raise UserError(f"RoPE needs an even head_dim, got {self.dim_per_head}")
        for name in ("sliding_window", "attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"model.{name}={getattr(self, name)} must be positive (or none to turn it off)")
        if self.sliding_window_first < 0 or self.sliding_window_every < 1:
            raise UserError(
                f"model.sliding_window_first={self.sliding_window_first} must be >= 0 and "
                f"model.sliding_window_every={self.sliding_window_every} >= 1"
            )
        if self.rope_scaling <= 0:
            raise UserError(f"model.rope_scaling={self.rope_scaling} must be positive (1 = no scaling)")
        if self.rope_type == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise UserError(
                f"model.rope_low_freq_factor={self.rope_low_freq_factor} must be positive and below "
                f"model.rope_high_freq_factor={self.rope_high_freq_factor} for rope_type=llama3"
            )
        if self.rope_type == "yarn" and not 0 < self.rope_beta_slow < self.rope_beta_fast:
            raise UserError(
                f"model.rope_beta_slow={self.rope_beta_slow} must be positive and below "
                f"model.rope_beta_fast={self.rope_beta_fast} for rope_type=yarn"
            )
        if self.rope_attention_factor is not None and self.rope_attention_factor <= 0:
            raise UserError(f"model.rope_attention_factor={self.rope_attention_factor} must be positive (or none)")
        self._check_moe()
        for name, allowed in (
            ("norm", ("rms", "rms_plus_one", "layer")),
            ("mlp", ("swiglu", "geglu", "gelu")),
            ("rope_type", ("default", "linear", "llama3", "yarn")),
            ("positions", ("rope", "learned")),
            ("remat", ("none", "full", "dots", "dots_no_batch")),
            ("attention_impl", ("auto", "xla", "cudnn", "splash", "splash_interpret")),
            ("context_parallel", ("allgather", "ring")),
            ("moe_impl", ("auto", "ragged_dot", "tiled", "megablox", "megablox_interpret")),
            ("dtype", ("auto", "float32", "bfloat16", "float16")),
            ("param_dtype", ("float32", "bfloat16", "float16")),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")

    def _check_moe(self):
        if self.n_experts < 0:
            raise UserError(f"model.n_experts={self.n_experts} must be >= 0 (0: a dense model)")
        if not self.n_experts:
            return
        if not self.gated_mlp:
            raise UserError(f"model.n_experts={self.n_experts} needs model.mlp=swiglu or geglu, got {self.mlp}")
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise UserError(
                f"model.experts_per_token={self.experts_per_token} must be in 1..model.n_experts={self.n_experts}"
            )
        for name in ("moe_d_ff", "shared_expert_d_ff"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"model.{name}={getattr(self, name)} must be positive (or none for the default)")
        if self.n_shared_experts < 0 or self.moe_layer_step < 1:
            raise UserError(
                f"model.n_shared_experts={self.n_shared_experts} must be >= 0 and "
                f"model.moe_layer_step={self.moe_layer_step} >= 1"
            )
        bad = [i for i in self.dense_layers if not 0 <= i < self.n_layers]
        if bad:
            raise UserError(f"model.dense_layers={list(self.dense_layers)} names layers outside 0..{self.n_layers - 1}")
        if not any(self.moe_layers):
            raise UserError(
                f"model.n_experts={self.n_experts} but model.moe_layer_step={self.moe_layer_step} and "
                f"model.dense_layers={list(self.dense_layers)} leave no layer with experts; set model.n_experts=0"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UserError(f"model.capacity_factor={self.capacity_factor} must be positive (or none: dropless)")
        if self.router_aux_loss < 0 or self.router_z_loss < 0:
            raise UserError(
                f"model.router_aux_loss={self.router_aux_loss} and model.router_z_loss={self.router_z_loss} "
                "must be >= 0"
            )

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """Per layer: whether its MLP is a mixture of experts."""
        return tuple(
            self.n_experts > 0 and (i + 1) % self.moe_layer_step == 0 and i not in self.dense_layers
            for i in range(self.n_layers)
        )

    @property
    def layer_runs(self) -> tuple[tuple[tuple[bool, ...], int], ...]:
        """The layer scan's runs, in order: (period, repeats), where period says per layer whether it
        has experts, and the run is that period repeated. Layers are cut into periods of
        moe_layer_step (MaxText's interleaved MoE) and equal neighbours merge, so a leading dense run
        (DeepSeek's first dense layers) and a short tail get runs of their own. One run of one layer
        for a model whose layers are all alike."""
        step = self.moe_layer_step if self.n_experts else 1
        runs: list[list] = []
        for start in range(0, self.n_layers, step):
            period = self.moe_layers[start : start + step]
            if runs and runs[-1][0] == period:
                runs[-1][1] += 1
            else:
                runs.append([period, 1])
        return tuple((period, repeats) for period, repeats in runs)

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    @property
    def shared_d_ff(self) -> int:
        """Total width of the shared experts (0: none)."""
        if not self.n_shared_experts:
            return 0
        return self.shared_expert_d_ff or self.n_shared_experts * self.expert_d_ff

    @property
    def compute_dtype(self):
        """The dtype matmuls run in here; parameters stay in param_dtype and logits in float32."""
        return self.compute_dtype_on(None)

    def compute_dtype_on(self, platform: str | None):
        """The compute dtype on `platform` (None: this process's): auto is bfloat16 on accelerators."""
        if self.dtype == "auto":
            return jnp.bfloat16 if is_accelerator(platform) else jnp.float32
        return jnp.dtype(self.dtype)

    def execution(self) -> dict:
        """The execution options (EXECUTION) by name."""
        return {k: getattr(self, k) for k in EXECUTION}

    def with_execution_of(self, other: "ModelConfig") -> "ModelConfig":
        """This architecture run with `other`'s execution options (a source's model in a run's recipe)."""
        return dataclasses.replace(self, **other.execution())

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it uses the sliding window."""
        first, every = self.sliding_window_first, self.sliding_window_every
        return tuple(
            self.sliding_window is not None and i >= first and (i - first) % every == 0 for i in range(self.n_layers)
        )

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def n_params(self) -> int:
        """Parameter count, computed from the shapes (the model's own count is tested against it)."""
        d, f, h, kv, hd = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.dim_per_head
        attn = d * hd * (h + 2 * kv) + h * hd * d
        if self.qkv_bias:
            attn += hd * (h + 2 * kv)
        if self.attn_out_bias:
            attn += d
        mlp = (3 if self.gated_mlp else 2) * d * f
        if self.mlp_bias:
            mlp += f * (2 if self.gated_mlp else 1) + d
        norm = d * (2 if self.norm == "layer" else 1)
        qk = 2 * hd if self.qk_norm else 0
        block = attn + (4 if self.post_norms else 2) * norm + qk
        mlps = sum(self._moe_params(active=False) if moe else mlp for moe in self.moe_layers)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = self.max_seq_len * d if self.positions == "learned" else 0
        return self.n_layers * block + mlps + embed + pos + norm

    @property
    def n_active_params(self) -> int:
        """Parameters one token passes through: each MoE layer counts experts_per_token experts."""
        inactive = self._moe_params(active=False) - self._moe_params(active=True)
        return self.n_params - sum(self.moe_layers) * inactive

    def _moe_params(self, *, active: bool) -> int:
        """One MoE layer's parameters (router, routed experts, shared experts and their gate)."""
        d, experts = self.d_model, self.experts_per_token if active else self.n_experts
        shared = 3 * d * self.shared_d_ff + d if self.shared_d_ff else 0
        return d * self.n_experts + experts * 3 * d * self.expert_d_ff + shared

    def loss_chunk_for(self, length: int) -> int:
        """Positions per loss chunk for sequences of `length`; 0 means one unchunked pass.

        Automatic: vocabularies of 32k and more are chunked so that a chunk's logits hold at most
        2**25 values per batch row (128 MiB in float32): 256 positions for Llama 3's 128k vocabulary,
        1024 for 32k. Smaller vocabularies compute the logits in one pass, which avoids recomputing
        them in the backward pass.
        """
        chunk = self.loss_chunk
        if chunk is None:
            chunk = 1 << ((1 << 25) // self.vocab_size).bit_length() - 1 if self.vocab_size >= 32000 else 0
        return chunk if 0 < chunk < length else 0

    def logical_dims(self) -> dict[str, tuple[int, str]]:
        """Sizes of the logical axes the mesh must divide, with the recipe key that sets each."""
        return {
            "vocab": (self.vocab_size, "model.vocab_size"),
            "embed": (self.d_model, "model.d_model"),
            "heads": (self.n_heads, "model.n_heads"),
            "kv_heads": (self.n_kv_heads, "model.n_kv_heads"),
            "mlp": (self.d_ff, "model.d_ff"),
            **({"expert": (self.n_experts, "model.n_experts")} if self.n_experts else {}),
            **({"expert_mlp": (self.expert_d_ff, "model.moe_d_ff")} if self.n_experts else {}),
        }

    def flops_per_token(
        self, seq_len: int, convention: Literal["palm", "maxtext"] = "palm", *, adapter_params: int | None = None
    ) -> float:
        """Training FLOPs per token: 6 * (non-embedding params + LM head) + 12 * layers * seq_len * heads * head_dim.

        "palm" (the headline MFU) is the PaLM / nanoGPT formula (Chowdhery et al. 2022, appendix B):
        causal attention counted as a full square. "maxtext" is MaxText's
        calculate_tflops_training_per_device: matmul weights only (no norms or biases), the
        unembedding but not the embedding lookup, and causal attention halved (6 instead of 12).

        Both count what is computed. A weight costs 2 FLOPs per token forward, 2 for its input's
        gradient and 2 for its own gradient, the last only where it trains: a LoRA run
        (adapter_params, the adapters' size) counts 4 per frozen base weight and 6 per adapter weight.
        With experts, only the active parameters count (n_active_params).
        """
        per_weight = 6 if adapter_params is None else 4
        adapters = 6 * (adapter_params or 0)
        if convention == "maxtext":
            d, f, h, kv, hd = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.dim_per_head
            dense = (3 if self.gated_mlp else 2) * d * f
            mlps = sum(self._moe_params(active=True) if moe else dense for moe in self.moe_layers)
            matmul = self.n_layers * d * hd * (2 * h + 2 * kv) + mlps
            return per_weight * (matmul + d * self.vocab_size) + adapters + 6 * self.n_layers * seq_len * h * hd
        n = self.n_active_params - self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        n += self.vocab_size * self.d_model  # the LM head is a matmul even when tied
        if self.positions == "learned":
            n -= self.max_seq_len * self.d_model
        attn = 12 * self.n_layers * seq_len * self.n_heads * self.dim_per_head
        return per_weight * n + adapters + attn


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
