"""Hugging Face interop: config.json <-> ModelConfig and *.safetensors <-> parameters through one
mapping table per family (`convert`), and PEFT adapters out (`peft`)."""

from lm.hf.convert import (
    FAMILIES,
    checkpoint_bytes,
    config_from_hf,
    config_to_hf,
    family_of,
    hf_tensors,
    load_hf,
    save_hf,
)
from lm.hf.peft import peft_adapter, save_peft
