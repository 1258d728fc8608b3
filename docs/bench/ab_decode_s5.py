import sys

import numpy as np
from flax import nnx

try:
    from lm.infer.decode import generate
except ImportError:
    from lm.decode import generate
from lm.config import ModelConfig
from lm.model import Transformer

cfg = ModelConfig(
    vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, d_ff=1536, max_seq_len=1024, tie_embeddings=True
)
try:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
except Exception:
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
out = {}
for batch in (8, 1):
    prompts = [list(np.random.default_rng(i).integers(1, 8192, 32)) for i in range(batch)]
    generate(model, prompts, max_new_tokens=256)  # compile
    ms = []
    for _ in range(3):
        g = generate(model, prompts, max_new_tokens=256)
        ms.append(g.decode_seconds / g.decode_steps * 1e3)
    out[batch] = min(ms)
print(sys.argv[1], " ".join(f"b{b} {v:.2f} ms/step" for b, v in out.items()), flush=True)
