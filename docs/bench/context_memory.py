"""XLA's compiled memory per device against the planner's estimate, with mesh.context 1/2/4/8 on 8
fake CPU devices, at sequences of 4k and 8k (the numbers in docs/benchmarks.md, "Context parallelism").

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python docs/bench/context_memory.py [ring|allgather]

Each context size c uses data = 8 / c and a batch of 8 / c rows, so every device holds one row's
1/c share of the tokens; the model is the 'small' preset (6 layers, width 384, 6 heads, vocab 8192)
at remat=full, with XLA attention (the context kernel runs XLA in each shard).
"""

import json
import sys

from lm.bench import compile_memory
from lm.config import load_recipe
from lm.plan import estimate

mode = sys.argv[1] if len(sys.argv) > 1 else "ring"
rows = []
for seq in (4096, 8192):
    for c in (1, 2, 4, 8):
        recipe = load_recipe(
            "small",
            [f"train.seq_len={seq}", "model.max_seq_len=8192", f"mesh.data={8 // c}", "mesh.fsdp=1",
             f"mesh.context={c}", f"train.batch_size={8 // c}", "train.grad_accum=1", "model.remat=full",
             "model.attention_impl=xla", f"model.context_parallel={mode}"],
        )  # fmt: skip
        xla = compile_memory(recipe)
        plan = estimate(recipe, devices=8)
        row = dict(seq=seq, context=c, mode=mode, xla_total=xla["total_bytes"], xla_temp=xla["temp_bytes"],
                   plan_total=plan.memory.total)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
