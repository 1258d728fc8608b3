"""nnx-lm: the library (model, decode, data, training).

Shardings are applied explicitly by `sharding/` (abstract init + jit out_shardings), so flax's eager
sharding is turned off: annotated variables then carry their logical axis names as metadata and can
also be created with no mesh at all (tests, export, single-device tools).
"""

from flax import nnx

nnx.use_eager_sharding(False)
