"""Data: corpus discovery, tokenizer, on-disk token files, and the grain batch pipeline."""

from lm.data.corpus import expand_inputs, iter_documents, split_files, stdlib_files
from lm.data.pipeline import PackedWindows, make_dataset
from lm.data.prepare import prepare_corpus
from lm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from lm.data.tokens import TokenFile, write_tokens

__all__ = [
    "PackedWindows",
    "TokenFile",
    "Tokenizer",
    "expand_inputs",
    "iter_documents",
    "load_tokenizer",
    "make_dataset",
    "prepare_corpus",
    "split_files",
    "stdlib_files",
    "train_tokenizer",
    "write_tokens",
]
