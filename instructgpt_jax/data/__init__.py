"""Data layer: tokenizer, TFDS ArrayRecord builders, grain batch iterators."""

from instructgpt_jax.data.builders import KINDS, Source, build, fingerprint, load
from instructgpt_jax.data.iterators import (
    STAT_KEYS,
    BatchIterator,
    comparison_batches,
    eval_batches,
    lm_batches,
    prompt_batches,
)
from instructgpt_jax.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "KINDS",
    "STAT_KEYS",
    "BatchIterator",
    "Source",
    "Tokenizer",
    "build",
    "comparison_batches",
    "eval_batches",
    "fingerprint",
    "lm_batches",
    "load",
    "prompt_batches",
    "train_tokenizer",
]
