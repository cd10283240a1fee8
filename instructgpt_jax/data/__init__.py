"""Data layer: tokenizers (SentencePiece, Hugging Face tokenizers), chat templates, TFDS ArrayRecord
builders (JSONL / Parquet in the public formats), grain batch iterators."""

from instructgpt_jax.data.builders import KINDS, Source, build, fingerprint, load
from instructgpt_jax.data.iterators import (
    STAT_KEYS,
    BatchIterator,
    comparison_batches,
    eval_batches,
    lm_batches,
    prompt_batches,
)
from instructgpt_jax.data import chat
from instructgpt_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "KINDS",
    "STAT_KEYS",
    "BatchIterator",
    "Source",
    "Tokenizer",
    "build",
    "chat",
    "comparison_batches",
    "eval_batches",
    "fingerprint",
    "lm_batches",
    "load",
    "load_tokenizer",
    "prompt_batches",
    "train_tokenizer",
]
