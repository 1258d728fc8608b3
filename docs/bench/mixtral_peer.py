"""transformers' MixtralForCausalLM on this CPU, at the shape `launch.bench` measures on our side (the
numbers in docs/benchmarks.md, "Mixture of experts against transformers' Mixtral").

    python docs/bench/mixtral_peer.py train  [--compile] [--experts-impl grouped_mm|eager|batched_mm] --out OUT.json
    python docs/bench/mixtral_peer.py generate --out OUT.json

The shape is the peer yardstick's "small" (6 layers, width 384, 6 heads, vocab 8192, untied head,
batch 8 x 256) with 8 experts of width 768, top 2: the active parameters equal the dense small
shape's. Random init, float32, 2 threads (torch.set_num_threads), dropless (transformers' Mixtral
never drops). train: forward, cross-entropy, backward and AdamW, median and fastest of --steps after
--warmup steps. generate: greedy `generate` with the KV cache, prompt 32, 256 new tokens, batch 1 and
8; the decode rate subtracts a 1-token generate (prefill), as ../shared/bench/peer_bench.py does.
Needs torch and transformers only (no nnx-lm import).
"""

import argparse
import json
import os
import statistics
import sys
import time


def config(args):
    import transformers

    c = transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.moe_d_ff,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        head_dim=args.d_model // args.n_heads, num_local_experts=args.n_experts,
        num_experts_per_tok=args.experts_per_token, max_position_embeddings=1024, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False, output_router_logits=False, router_aux_loss_coef=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    c._attn_implementation = "sdpa"
    c._experts_implementation = args.experts_impl
    return c


def model(args):
    import torch
    import transformers

    torch.manual_seed(0)
    m = transformers.MixtralForCausalLM(config(args)).float()
    return m, getattr(m.config, "_experts_implementation", args.experts_impl)


def train(args) -> dict:
    import torch
    import torch.nn.functional as F

    m, impl = model(args)
    m.train()
    decay = [p for p in m.parameters() if p.dim() >= 2]
    other = [p for p in m.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95))  # fmt: skip
    fwd = torch.compile(m) if args.compile else m
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    times, cpu, first = [], [], None
    for i in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = fwd(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - start
        first = dt if i == 0 else first
        if i >= args.warmup:
            times.append(dt)
            cpu.append(time.process_time() - cpu_start)
        print(f"step {i} {dt:.3f}s loss {loss.item():.4f}", file=sys.stderr, flush=True)
    tokens = args.batch * args.seq_len
    return {
        "compile": args.compile, "experts_implementation": impl, "params": sum(p.numel() for p in m.parameters()),
        "tokens_per_step": tokens, "step_s_median": statistics.median(times), "step_s_min": min(times),
        "step_s_all": [round(t, 4) for t in times], "tokens_per_s": tokens / statistics.median(times),
        "tokens_per_s_best": tokens / min(times), "first_step_s": first,
        "cpu_s_per_step_median": statistics.median(cpu),
    }  # fmt: skip


def generate(args) -> dict:
    import torch

    m, impl = model(args)
    m.eval()
    g = torch.Generator().manual_seed(2)
    out = {"experts_implementation": impl, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}

    def run(ids, n):
        start = time.perf_counter()
        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, use_cache=True, pad_token_id=0, num_beams=1)  # fmt: skip
        return time.perf_counter() - start

    with torch.inference_mode():
        for b in (1, 8):
            ids = torch.randint(0, args.vocab, (b, args.prompt_len), generator=g)
            run(ids, 8)  # warm-up
            prefill = min(run(ids, 1) for _ in range(3))
            total = min(run(ids, args.new_tokens) for _ in range(args.gen_reps))
            out[f"batch{b}"] = {
                "total_s": total, "prefill_plus_1_s": prefill, "new_tokens_per_s": b * args.new_tokens / total,
                "decode_tokens_per_s": b * (args.new_tokens - 1) / (total - prefill),
                "ms_per_step": 1e3 * (total - prefill) / (args.new_tokens - 1),
            }  # fmt: skip
            print(f"batch {b}: {out[f'batch{b}']}", file=sys.stderr, flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["train", "generate"])
    p.add_argument("--out", required=True, help="write the JSON here (a .jsonl file: append one line)")
    p.add_argument("--compile", action="store_true", help="train: torch.compile the model")
    p.add_argument("--experts-impl", default="grouped_mm", choices=["grouped_mm", "eager", "batched_mm"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gen-reps", type=int, default=2, help="generate: timed runs per batch (fastest kept)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    for name, default in [("n_layers", 6), ("d_model", 384), ("n_heads", 6), ("vocab", 8192), ("seq_len", 256),
                          ("batch", 8), ("n_experts", 8), ("experts_per_token", 2), ("moe_d_ff", 768)]:  # fmt: skip
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    args = p.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    result = {
        "mode": args.mode, "model": "transformers MixtralForCausalLM", "dtype": "float32",
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_avg_start": list(os.getloadavg()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "shape": {k: getattr(args, k) for k in ("n_layers", "d_model", "n_heads", "vocab", "seq_len", "batch",
                                                "n_experts", "experts_per_token", "moe_d_ff")},
    }  # fmt: skip
    result.update(train(args) if args.mode == "train" else generate(args))
    result["load_avg_end"] = list(os.getloadavg())
    with open(args.out, "a" if args.out.endswith(".jsonl") else "w") as f:  # .jsonl: one line per run
        f.write(json.dumps(result) + "\n" if args.out.endswith(".jsonl") else json.dumps(result, indent=1))
    line = {k: v for k, v in result.items() if k in ("tokens_per_s", "tokens_per_s_best", "batch1", "batch8")}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
