"""Prepare a corpus for training: python -m launch.prepare --input PATH_OR_GLOB... --out DIR."""

import argparse

from launch.cli import ArgumentParser, add_overwrite, main_guard
from lm.data import prepare_corpus


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m launch.prepare",
        description="Train (or copy) a sentencepiece tokenizer and write train/eval token files to --out. "
        "Re-running with the same arguments reuses the output; other earlier contents of --out are replaced only "
        "with --overwrite, and a run directory never.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        metavar="PATH_OR_GLOB",
        help="files, folders or globs (.txt, .py, .jsonl, .jsonl.gz); 'stdlib' or omitted: the Python standard library",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--tokenizer", metavar="SPM_MODEL", help="use this sentencepiece .model instead of training one")
    vocab.add_argument(
        "--vocab-size", type=int, default=8192, help="vocabulary of the trained tokenizer (default 8192)"
    )
    p.add_argument("--text-field", default="text", help="JSON key of the text in .jsonl inputs (default 'text')")
    p.add_argument("--eval-fraction", type=float, default=0.02, help="share held out for eval, by file (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and tokenizer sampling (default 0)")
    p.add_argument("--workers", type=int, default=2, help="encoding processes (default 2)")
    add_overwrite(p)
    return p.parse_args(argv)


def summary(meta: dict, out: str) -> str:
    train, held = meta["splits"]["train"], meta["splits"]["eval"]
    n_tokens = train["n_tokens"] + held["n_tokens"]
    n_bytes = train["n_bytes"] + held["n_bytes"]
    seconds = meta["seconds"]
    how = (
        "reused the prepared data"
        if meta["cached"]
        else (
            f"took {seconds['total']:.1f} s "
            f"(tokenizer {seconds['tokenizer']:.1f} s, encoding {seconds['encode']:.1f} s)"
        )
    )
    return (
        f"{out}: {', '.join(meta['sources'])} ({meta['args']['n_files']} files) -> "
        f"train {train['n_docs']:,} docs / {train['n_tokens']:,} tokens, "
        f"eval {held['n_docs']:,} docs / {held['n_tokens']:,} tokens; vocab {meta['vocab_size']}, "
        f"{n_tokens / max(n_bytes, 1):.3f} tokens/byte; {how}."
    )


@main_guard
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = prepare_corpus(
        args.input,
        args.out,
        tokenizer_path=args.tokenizer,
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print(summary(meta, args.out))


if __name__ == "__main__":
    main()
