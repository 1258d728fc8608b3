"""The model a newcomer reads: attention (flax's MultiHeadAttention with RoPE and the KV cache),
the blocks, and the transformer. It names logical axes and calls `lm.kernels.attention`; it knows no
platform, LoRA or Hugging Face detail."""

from lm.model.attention import Attention, Mode, rope, rope_frequencies
from lm.model.blocks import MLP, Block, make_norm
from lm.model.transformer import Transformer, layer_paths, unembed
