"""Score held-out text or token ids: token count, mean negative log-likelihood, perplexity, bits per byte.

Texts are encoded with the model's tokenizer and scored by the rule in lm/infer/score.py: each token is
predicted from what precedes it (the first from the BOS, or the EOS where the tokenizer adds no BOS),
and a document longer than --window tokens (default min(context, 4096)) is scored in windows that start
every --stride tokens (default half a window). --context N splits each sequence over N devices
(context parallelism) for documents too long for one. --token-ids scores an int array [batch, length] as given
and needs no tokenizer. In a multi-process job every process computes and process 0 prints and writes.
"""

import argparse
import json
import sys

from launch.cli import ArgumentParser, OutputFile, add_model_source, add_overwrite, is_writer, main_guard
from launch.distributed import add_arguments, initialize_from_env_or_flags
from lm.errors import UserError


def parse(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m launch.score", description=__doc__)
    add_model_source(p)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--input",
        help="a .txt file (one document), a .jsonl file (one document per 'text' field), or chat/instruction "
        "JSONL ('messages' or 'prompt'/'completion': only the replies are scored)",
    )
    data.add_argument("--token-ids", help="a .npy int array [batch, length] of token ids (no tokenizer needed)")
    p.add_argument("--dump-logits", help="write float32 logits [batch, length, vocab] to this .npy (with --token-ids)")
    add_overwrite(p)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--window", type=int, help="tokens per scoring window of a long document (default min(context, 4096))"
    )
    p.add_argument("--stride", type=int, help="tokens between window starts (default half the window)")
    p.add_argument(
        "--tensor",
        type=int,
        default=1,
        help="tensor-parallel devices for a model too large for one (several processes: the model is split over "
        "every device, --tensor of them on the tensor axis and the rest on fsdp)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=1,
        help="devices each sequence is split over (context parallelism, for long documents; it must divide the "
        "window); the NLL is one device's",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_arguments(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size={args.batch_size} must be at least 1")
    if args.window is not None and args.window < 2:
        p.error(f"--window={args.window} must be at least 2")
    if args.context < 1:
        p.error(f"--context={args.context} must be at least 1")
    if args.stride is not None and args.stride < 1:
        p.error(f"--stride={args.stride} must be at least 1")
    if args.stride is not None and args.window is not None and args.stride >= args.window:
        p.error(f"--stride={args.stride} must be in [1, {args.window - 1}] for --window={args.window}")
    if args.dump_logits and not args.token_ids:
        p.error("--dump-logits needs --token-ids (logits are written for a given [batch, length] array)")
    return args


def read_token_ids(path: str):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--token-ids {path} does not exist") from None
    except (ValueError, OSError) as e:
        raise UserError(f"--token-ids {path} is not a .npy array ({str(e).splitlines()[0][:100]})") from None


@main_guard
def main(argv=None):
    args = parse(argv)
    import contextlib
    import pathlib

    import numpy as np

    from lm.data.corpus import iter_documents
    from lm.data.instruct import first_record_format, iter_records
    from lm.infer.load import load_model
    from lm.infer.score import (
        check_token_ids,
        check_window,
        logits_of,
        score_examples,
        score_texts,
        score_token_ids,
    )

    if args.input and not pathlib.Path(args.input).is_file():
        raise UserError(f"--input {args.input} does not exist; pass a .txt or .jsonl file")
    dump = (
        OutputFile(args.dump_logits, "--dump-logits", args.overwrite, inputs=(args.token_ids,))
        if args.dump_logits
        else None
    )
    ids = read_token_ids(args.token_ids) if args.token_ids else None
    initialize_from_env_or_flags(args)
    writer = is_writer()
    loaded = load_model(
        args.run_dir, args.checkpoint, args.hf, tensor=args.tensor, context=args.context, need_tokenizer=ids is None
    )
    cfg = loaded.model.cfg
    check_window(args.window, args.stride, cfg.max_seq_len)  # bad input before any work
    with loaded.layout:
        if ids is not None:
            ids = check_token_ids(ids, cfg.vocab_size, cfg.max_seq_len, f"--token-ids {args.token_ids}")
            score = score_token_ids(loaded.model, ids, batch_size=args.batch_size)
            if dump:
                with dump.writing() if writer else contextlib.nullcontext() as path:
                    out = path and np.lib.format.open_memmap(
                        path, mode="w+", dtype=np.float32, shape=(*ids.shape, cfg.vocab_size)
                    )
                    for i, block in logits_of(loaded.model, ids, batch_size=args.batch_size):
                        if out is not None:
                            out[i : i + len(block)] = block
                    if out is not None:
                        out.flush()
                        del out
        elif args.input.endswith((".jsonl", ".jsonl.gz")) and first_record_format(args.input) != "text":
            # Instruction/chat data: the loss on the completions or assistant turns, as fine-tuning evaluates.
            records = iter_records([args.input])
            score = score_examples(loaded.model, loaded.tokenizer, records, batch_size=args.batch_size)
        else:
            score = score_texts(
                loaded.model,
                loaded.tokenizer,
                iter_documents([args.input]),
                batch_size=args.batch_size,
                window=args.window,
                stride=args.stride,
            )
    if not writer:
        return
    if args.json:
        print(json.dumps({"model": loaded.name, **score.to_dict()}))
        return
    line = (
        f"{loaded.name}: {score.tokens:,} tokens in {score.documents} document(s), mean NLL {score.mean_nll:.4f} "
        f"nats, perplexity {score.perplexity:.3f}"
    )
    if score.bits_per_byte is not None:
        line += f", {score.bits_per_byte:.4f} bits per byte"
    print(line)
    if args.dump_logits:
        print(f"logits {tuple(ids.shape) + (cfg.vocab_size,)} float32 -> {args.dump_logits}", file=sys.stderr)


if __name__ == "__main__":
    main()
