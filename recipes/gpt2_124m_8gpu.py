"""GPT-2 small (124M) on 8 GPUs (data parallel: the model fits one GPU), with nanoGPT's and llm.c's
hyper-parameters: the same global batch as recipes/gpt2_124m.py, 4 microbatches of 16 rows per GPU.

Data and target: see recipes/gpt2_124m.py.
"""

from recipes._common import gpt2_124m


def recipe():
    return gpt2_124m("h100-80gb x8", grad_accum=4)
