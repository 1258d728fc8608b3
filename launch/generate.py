"""Generate text from a trained run or a Hugging Face folder: prefill each prompt batch in one pass,
then a cached decode loop. Prompts get the tokenizer's BOS rule (as transformers' tokenizer(text)) and
rows stop at any of its stop ids (every eos id of generation_config.json)."""

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys

from launch.cli import ArgumentParser, OutputFile, add_model_source, add_overwrite, is_writer, main_guard
from launch.distributed import add_arguments, initialize_from_env_or_flags
from lm.errors import UserError


def parse(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m launch.generate", description=__doc__)
    add_model_source(p)
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", action="append", help="a prompt (repeatable; prompts are batched)")
    text.add_argument("--prompts-file", help="one prompt per line, or a .jsonl with a 'prompt' field")
    text.add_argument("--interactive", action="store_true", help="read prompts from stdin, keeping the model loaded")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message in the tokenizer's chat template (with the assistant's header)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); it is cut from the output")
    p.add_argument(
        "--kv-cache",
        choices=["on", "off"],
        default="on",
        help="off recomputes the whole sequence every step (to verify and measure the cache)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="prompts per batch")
    p.add_argument(
        "--tensor",
        type=int,
        default=1,
        help="tensor-parallel devices for a model too large for one (several processes: the model is split over "
        "every device, --tensor of them on the tensor axis and the rest on fsdp)",
    )
    p.add_argument(
        "--context", type=int, default=1,
        help="devices a long prompt's prefill is split over (context parallelism); decoding reads the whole cache",
    )  # fmt: skip
    p.add_argument("--output", help="write one JSON object per prompt to this .jsonl file, batch by batch")
    add_overwrite(p)
    add_arguments(p)
    args = p.parse_args(argv)
    if not (args.prompt or args.prompts_file or args.interactive):
        p.error("give --prompt, --prompts-file or --interactive")
    if args.batch_size < 1:
        p.error(f"--batch-size={args.batch_size} must be at least 1")
    if args.context < 1:
        p.error(f"--context={args.context} must be at least 1")
    if any(not s for s in args.stop):
        p.error("--stop takes a non-empty string")
    args.stop = [unescape(s) for s in args.stop]
    return args


def read_prompts(path: str) -> list[str]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read --prompts-file {path}: {e.strerror}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(unescape(line))
            continue
        try:
            prompts.append(json.loads(line)["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number} is not a JSON object with a 'prompt' field") from None
    if not prompts:
        raise UserError(f"--prompts-file {path} holds no prompts")
    return prompts


def unescape(text: str) -> str:
    """'\\n' and '\\t' typed on a command line or in a prompts file mean a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@main_guard
def main(argv=None):
    args = parse(argv)
    output = OutputFile(args.output, "--output", args.overwrite, inputs=(args.prompts_file,)) if args.output else None
    initialize_from_env_or_flags(args)
    import jax

    from lm.infer.decode import complete
    from lm.infer.load import load_model
    from lm.infer.sampling import Sampling
    from lm.kernels import resolve_attention_impl

    writer = is_writer()  # every process computes; process 0 alone prints and writes
    say = print if writer else lambda *a, **k: None
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    loaded = load_model(args.run_dir, args.checkpoint, args.hf, tensor=args.tensor, context=args.context)
    model, tokenizer = loaded.model, loaded.tokenizer
    # Reported with the speeds at the end, so that bad input still gets exactly one line.
    impl, why = resolve_attention_impl(
        model.cfg, jax.default_backend(), model.cfg.max_seq_len, packed=False, context_devices=args.context
    )
    attention = f"attention {impl} ({why})"

    def run(prompts: list[str], stream: bool, batch: int):
        texts = prompts
        if args.chat:  # each prompt is a user turn; the template writes its own BOS and special tokens
            texts = [
                tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                for p in prompts
            ]
        with loaded.layout:
            completions, gen = complete(
                model,
                tokenizer,
                texts,
                max_new_tokens=args.max_new_tokens,
                sampling=sampling,
                seed=args.seed,
                batch_index=batch,
                stop=args.stop,
                use_cache=args.kv_cache == "on",
                stream=(lambda s: say(s, end="", flush=True)) if stream else None,
                add_bos=False if args.chat else None,
            )
        return [dataclasses.replace(c, prompt=p) for c, p in zip(completions, prompts)], gen

    if args.interactive:
        say(f"{loaded.name} ({attention}): type a prompt, end with an empty line; Ctrl-D quits.", file=sys.stderr)
        for turn in itertools.count():
            lines = []
            for line in sys.stdin:
                if not line.strip():
                    break
                lines.append(line)
            else:
                if not lines:
                    return
            if lines:
                prompt = "".join(lines).rstrip("\n")
                say(prompt, end="", flush=True)
                run([prompt], stream=True, batch=turn)
                say("\n")

    prompts = args.prompt or read_prompts(args.prompts_file)
    sep = "\n" if args.chat else ""
    single = len(prompts) == 1
    with contextlib.ExitStack() as stack:
        # Streamed batch by batch: a failure in a later batch keeps the earlier batches' results.
        path = stack.enter_context(output.writing(keep_partial=True)) if output and writer else None
        f = stack.enter_context(open(path, "w", encoding="utf-8")) if path else None
        for i in range(0, len(prompts), args.batch_size):
            batch = prompts[i : i + args.batch_size]
            if single:
                say(batch[0], end="\n" if args.chat else "", flush=True)
            completions, gen = run(batch, stream=single, batch=i // args.batch_size)
            for c in completions:
                if not single:
                    say(f"--- {c.prompt!r}\n{c.prompt}{sep}{c.completion}\n")
                row = {
                    "prompt": c.prompt,
                    "completion": c.completion,
                    "tokens": c.tokens,
                    "prefill_tokens_per_s": gen.prefill_tokens_per_s,
                    "decode_tokens_per_s": gen.decode_tokens_per_s,
                }
                if f:
                    f.write(json.dumps(row) + "\n")
            if f:
                f.flush()
    if single:
        say()
    say(
        f"[prefill {gen.prefill_tokens_per_s:,.0f} tokens/s, decode {gen.decode_tokens_per_s:,.0f} "
        f"tokens/s, kv-cache {args.kv_cache}, {attention}; the first batch includes compilation, "
        "see launch.bench decode]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
