"""From `config.data` to a tokenizer and iterators: the one place stages get their data.

Resolves the tokenizer (config path -> previous stage's -> this workdir's -> trained on the
training text), writes the built-in synthetic corpus when no JSONL is given, builds the TFDS
ArrayRecord datasets, and hands out deterministic, resumable, per-process iterators.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax

from instructgpt_jax import checkpoints
from instructgpt_jax.miniature import world as synthetic
from instructgpt_jax.data import builders, iterators
from instructgpt_jax.data.tokenizer import Tokenizer, train_tokenizer

HELD_OUT = "5%"  # eval split carved from the training file when config.data.eval is ''


def builtin_rows(kind: str, n: int, seed: int, split: str) -> list[dict]:
    """The built-in synthetic corpus (instructgpt_jax.synthetic) for one split."""
    seed = seed if split == "train" else seed + 1_000_003
    if kind == "text":
        return synthetic.pretraining(n, seed)
    if kind == "demonstrations":
        return synthetic.demonstrations(n, seed)
    if kind == "comparisons":
        return synthetic.comparisons(n, k=(4, 9), seed=seed)
    if kind == "prompts":
        return [{"prompt": r["prompt"]} for r in synthetic.prompts(n, seed, split=split)]
    raise ValueError(f"unknown data kind {kind!r}")


def _texts(kind: str, row: dict) -> list[str]:
    if kind == "text":
        return [row["text"]]
    if kind == "comparisons":
        return [row["prompt"], *row["completions"]]
    return [v for k, v in row.items() if k in ("prompt", "response") and isinstance(v, str)]


def init_source(config) -> Optional[str]:
    """The previous stage's export this stage starts from, or None."""
    if config.init.from_workdir:
        return checkpoints.export_path(config.init.from_workdir)
    return None


def resolve_tokenizer(config, workdir: str, training_texts: Callable[[], list[str]]) -> str:
    """Path of the tokenizer this stage uses (copied into its export for the next stage)."""
    if config.data.tokenizer:
        if not os.path.exists(config.data.tokenizer):
            raise FileNotFoundError(f"config.data.tokenizer={config.data.tokenizer!r} does not exist")
        return config.data.tokenizer
    source = init_source(config)
    if source and os.path.exists(os.path.join(source, "tokenizer.model")):
        return os.path.join(source, "tokenizer.model")
    own = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(own):
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            train_tokenizer(training_texts(), own, vocab_size=config.model.vocab_size, seed=config.seed)
        checkpoints.sync("tokenizer")
    return own


@dataclasses.dataclass
class StageData:
    """A stage's tokenizer and the factories of its train / eval iterators."""
    tokenizer: Tokenizer
    tokenizer_path: str
    train_source: object
    eval_source: object
    make_train: Callable
    make_eval: Callable
    extra_sources: dict = dataclasses.field(default_factory=dict)
    _train_iter: object = None

    def train_iterator(self):
        self._train_iter = self.make_train(self.train_source)
        return self._train_iter

    def eval_iterator(self):
        return self.make_eval(self.eval_source)

    def stats(self) -> dict:
        return dict(getattr(self._train_iter, "stats", {}) or {})


def build_sources(config, workdir: str, kind: str, train_path: str, eval_path: str):
    """Build (or reuse) the TFDS datasets; returns (train_source, eval_source, texts_fn)."""
    data_dir = config.data.dir or os.path.join(workdir, "tfds")
    if not train_path:  # built-in corpus, written once by process 0
        root = os.path.join(workdir, "builtin_data")
        train_path, eval_path = os.path.join(root, f"{kind}_train.jsonl"), os.path.join(root, f"{kind}_eval.jsonl")
        if jax.process_index() == 0 and not os.path.exists(eval_path):
            n = config.data.builtin_size
            synthetic.write_jsonl(train_path, builtin_rows(kind, n, config.seed, "train"))
            synthetic.write_jsonl(eval_path, builtin_rows(kind, max(n // 20, 16), config.seed, "valid"))
        checkpoints.sync("builtin_data")
    splits = {"train": train_path}
    if eval_path:
        splits["eval"] = eval_path
    max_k = config.data.get("max_k", 9)
    if jax.process_index() == 0:
        builders.build(kind, splits, data_dir, max_k=max_k)
    checkpoints.sync("tfds_build")
    if eval_path:
        train_src = builders.load(kind, data_dir, "train", max_k=max_k)
        eval_src = builders.load(kind, data_dir, "eval", max_k=max_k)
    else:
        train_src = builders.load(kind, data_dir, f"train[:-{HELD_OUT}]", max_k=max_k)
        eval_src = builders.load(kind, data_dir, f"train[-{HELD_OUT}:]", max_k=max_k)

    def texts():
        out = []
        for i in range(min(len(train_src), 20_000)):
            out.extend(_texts(kind, train_src[i]))
        return out
    return train_src, eval_src, texts


def prepare(config, workdir: str, kind: str) -> StageData:
    """Tokenizer + iterators for an LM stage ('text' = pretraining, 'demonstrations' = SFT)."""
    train_src, eval_src, texts = build_sources(config, workdir, kind, config.data.train, config.data.eval)
    tok_path = resolve_tokenizer(config, workdir, texts)
    tokenizer = Tokenizer.load(tok_path)
    d = config.data
    common = dict(kind=kind, seq_len=d.seq_len, max_prompt_len=d.max_prompt_len or None,  # 0: no prompt (text)
                  max_response_len=d.max_response_len,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  global_batch_size=config.train.batch_size)
    make_train = lambda src: iterators.lm_batches(src, tokenizer, seed=config.seed, pack=d.pack, **common)  # noqa: E731
    make_eval = lambda src: iterators.eval_batches(src, tokenizer, pack=d.pack, **common)  # noqa: E731
    return StageData(tokenizer, tok_path, train_src, eval_src, make_train, make_eval)


def _demonstrations_path(config) -> str:
    """SFT demonstrations for the RM bias: config.data.demonstrations, else the SFT stage's own."""
    if config.data.demonstrations:
        return config.data.demonstrations
    if config.init.from_workdir:
        import json
        sft_dir = os.path.abspath(config.init.from_workdir)
        if os.path.basename(sft_dir) == checkpoints.EXPORT_DIR:
            sft_dir = os.path.dirname(sft_dir)
        cfg_path = os.path.join(sft_dir, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                train = json.load(f).get("data", {}).get("train", "")
            if train:
                return train
        builtin = os.path.join(sft_dir, "builtin_data", "demonstrations_train.jsonl")
        if os.path.exists(builtin):
            return builtin
    return ""  # the built-in synthetic demonstrations


def prepare_comparisons(config, workdir: str) -> StageData:
    """Tokenizer + iterators for the reward model, plus the demonstrations that fix its bias."""
    train_src, eval_src, texts = build_sources(config, workdir, "comparisons", config.data.train, config.data.eval)
    demo_src, _, _ = build_sources(config, workdir, "demonstrations", _demonstrations_path(config), "")
    tok_path = resolve_tokenizer(config, workdir, texts)
    tokenizer = Tokenizer.load(tok_path)
    d = config.data
    common = dict(seq_len=d.seq_len, max_prompt_len=d.max_prompt_len, process_index=jax.process_index(),
                  process_count=jax.process_count(), global_batch_size=config.train.batch_size)
    make_train = lambda src: iterators.comparison_batches(src, tokenizer, seed=config.seed, max_k=d.max_k,  # noqa: E731
                                                         **common)
    make_eval = lambda src: iterators.eval_batches(src, tokenizer, kind="comparisons", max_k=d.max_k,  # noqa: E731
                                                  **common)
    return StageData(tokenizer, tok_path, train_src, eval_src, make_train, make_eval,
                     extra_sources={"demonstrations": demo_src})


@dataclasses.dataclass
class PPOData:
    """Tokenizer, rollout prompts (train / eval) and pretraining text for the ptx term."""
    tokenizer: Tokenizer
    tokenizer_path: str
    prompts: object
    eval_prompts_source: object
    make_eval_prompts: Callable
    ptx: Optional[object]

    def eval_prompts(self):
        return self.make_eval_prompts(self.eval_prompts_source)


def prepare_ppo(config, workdir: str) -> PPOData:
    d = config.data
    train_src, eval_src, texts = build_sources(config, workdir, "prompts", d.train, d.eval)
    tok_path = resolve_tokenizer(config, workdir, texts)
    tokenizer = Tokenizer.load(tok_path)
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    prompts = iterators.prompt_batches(train_src, tokenizer, global_batch_size=config.train.batch_size,
                                      seed=config.seed, max_prompt_len=d.max_prompt_len, **proc)
    make_eval = lambda src: iterators.eval_batches(src, tokenizer, kind="prompts",  # noqa: E731
                                                  global_batch_size=config.train.batch_size,
                                                  max_prompt_len=d.max_prompt_len, **proc)
    ptx = None
    if config.ppo.ptx_coef > 0:
        ptx_src, _, _ = build_sources(config, workdir, "text", d.ptx, "")
        ptx = iterators.lm_batches(ptx_src, tokenizer, kind="text", global_batch_size=config.ppo.ptx_batch_size,
                                  seed=config.seed + 1, seq_len=d.ptx_seq_len, **proc)
    return PPOData(tokenizer, tok_path, prompts, eval_src, make_eval, ptx)
