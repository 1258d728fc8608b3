"""GPT-2 small (124M) on one GPU, with nanoGPT's and llm.c's hyper-parameters.

Data: OpenWebText or FineWeb shards tokenized by `python -m launch.prepare --input 'owt/*.jsonl'
--out data/openwebtext --vocab-size 50257` (a sentencepiece BPE of GPT-2's size, not GPT-2's own BPE,
so losses are comparable only in spirit). Target: llm.c reaches val loss ~3.28 on FineWeb after 10B
tokens (19,073 steps of 524,288 tokens); nanoGPT reaches ~2.85 on OpenWebText after 300B tokens.
Batch 512 x 1024 tokens = 524,288 per step, as 32 microbatches of 16 on one GPU.
"""

from recipes._common import gpt2_124m


def recipe():
    return gpt2_124m("a100-80gb", grad_accum=32)
