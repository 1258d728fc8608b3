"""Qwen2.5 7B (Instruct or base) at its long-context setting: YaRN, factor 4 over the 32,768 positions
it was trained on, for 131,072-token documents (Qwen's model card: add
`"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}` to
config.json). Imported from that folder (init.from, required), scored, and fine-tuned with LoRA on
long documents, each sequence split over the 8 GPUs of one H100 node (mesh.context=8, all-gather
attention: 4 K/V heads make the gathered keys small).

Plan it first: python -m launch.plan --recipe qwen2_5_7b_yarn_128k
Score a long document: python -m launch.score --hf DIR --input long.txt --window 131072 --context 8
"""

import dataclasses

from lm.config import LoraConfig, MeshConfig
from recipes._finetune import finetune


def recipe():
    base = finetune(
        "qwen2_5_7b_yarn_128k",
        "qwen2_5_7b_yarn",  # beta_fast 32, beta_slow 1, attention factor 0.1 ln 4 + 1: Qwen's (the defaults)
        "h100-80gb x8",
        "Qwen2.5 7B with YaRN x4 (128k context), LoRA r16 on long documents (data/long.jsonl) split over 8 H100s "
        "by context parallelism; bf16 base",
        lora=LoraConfig(rank=16, alpha=32.0, base_dtype="bfloat16"),
        seq_len=131072,
        batch_size=8,
        grad_accum=8,
        lr=1e-4,
        remat="dots_no_batch",
    )
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, context_parallel="allgather"),
        mesh=MeshConfig(data=1, fsdp=1, context=8),
        data=dataclasses.replace(base.data, inputs=("data/long.jsonl",), format="text"),
    )
