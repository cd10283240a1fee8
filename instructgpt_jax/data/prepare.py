"""From `config.data` to a tokenizer and iterators: the one place stages get their data.

Resolves the tokenizer (config path -> previous stage's -> this workdir's -> trained on the
training text), builds the TFDS ArrayRecord datasets, and hands out deterministic, resumable,
per-process iterators. When a data path is '' the caller may supply built-in rows:
`builtin(kind, n, seed, split) -> rows` (the command line passes the miniature world's,
`instructgpt_jax.miniature.world.builtin_rows`); this module knows no world of its own.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import jax

from instructgpt_jax import checkpoints
from instructgpt_jax.data import builders, chat, iterators
from instructgpt_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from instructgpt_jax.errors import UserError

HELD_OUT = "5%"  # eval split carved from the training file when config.data.eval is ''
Builtin = Optional[Callable[[str, int, int, str], list]]  # (kind, n, seed, split) -> rows
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what an export or a Hugging Face directory holds
TEMPLATE_FILE = "chat_template.jinja"  # the template a run used, saved with its export


def _texts(kind: str, row: dict) -> list[str]:
    """The strings of one row a tokenizer is trained on (chat rows: every message)."""
    if kind == "text":
        return [row["text"]]
    out = [m["content"] for m in row.get("messages") or [] if isinstance(m.get("content"), str)]
    if kind == "comparisons":
        return out + [row["prompt"], *row["completions"]]
    return out + [v for k, v in row.items() if k in ("prompt", "response") and isinstance(v, str) and v]


def resolve_tokenizer(config, workdir: str, training_texts: Callable[[], list[str]]) -> Tokenizer:
    """The stage's tokenizer: config.data.tokenizer (a .model / tokenizer.json file or a directory) ->
    the previous stage's export -> this workdir's -> a SentencePiece model trained on the training text."""
    if config.data.tokenizer:
        if not os.path.exists(config.data.tokenizer):
            raise UserError(f"config.data.tokenizer={config.data.tokenizer!r} does not exist")
        return load_tokenizer(config.data.tokenizer)
    source = checkpoints.previous_export(config)
    if source and any(os.path.exists(os.path.join(source, f)) for f in TOKENIZER_FILES):
        return load_tokenizer(source)
    own = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(own):
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            train_tokenizer(training_texts(), own, vocab_size=config.model.vocab_size, seed=config.seed)
        checkpoints.sync("tokenizer")
    return load_tokenizer(own)


def resolve_chat_template(config, tok: Tokenizer):
    """(template or None, tokenizer whose eos_ids hold the template's end-of-turn token).

    config.data.chat_template: '' / 'auto' = the previous stage's (saved with its export), else the
    tokenizer's own, else none; 'none'; a built-in name; or a .jinja file."""
    value = config.data.get("chat_template", "")
    source = checkpoints.previous_export(config)
    if value in ("", "auto") and source and os.path.exists(os.path.join(source, TEMPLATE_FILE)):
        value = os.path.join(source, TEMPLATE_FILE)
    try:
        template = chat.resolve(value, tok)
    except ValueError as e:
        raise UserError(str(e)) from None
    return template, chat.with_end_of_turn(tok, template)


def end_id(tok: Tokenizer, template) -> int:
    """The token that closes a completion in reward-model rows: the template's end of turn, else EOS."""
    return min(chat.end_of_turn_ids(template, tok)) if template is not None else tok.eos_id


def save_tokenizer(directory: str, tok: Tokenizer, template) -> None:
    """Tokenizer files (+ the chat template the run used) into an export, for the next stage and `hf`."""
    tok.save(directory)
    if template is not None:
        with open(os.path.join(directory, TEMPLATE_FILE), "w", encoding="utf-8") as f:
            f.write(template.source)


@dataclasses.dataclass
class StageData:
    """A stage's tokenizer, chat template and the factories of its train / eval iterators."""
    tokenizer: Tokenizer
    chat_template: object
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

    def save_tokenizer(self, directory: str) -> None:
        save_tokenizer(directory, self.tokenizer, self.chat_template)


def _write_jsonl(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def build_sources(config, workdir: str, kind: str, train_path: str, eval_path: str, builtin: Builtin = None,
                  key: str = "config.data.train"):
    """Build (or reuse) the TFDS datasets; returns (train_source, eval_source, texts_fn)."""
    data_dir = config.data.dir or os.path.join(workdir, "tfds")
    if not train_path:  # built-in rows, written once by process 0
        if builtin is None:
            raise UserError(f"{key} is empty: give a JSONL or Parquet file of {kind} (built-in data exists only "
                            f"for the command line's CPU presets)")
        root = os.path.join(workdir, "builtin_data")
        train_path, eval_path = os.path.join(root, f"{kind}_train.jsonl"), os.path.join(root, f"{kind}_eval.jsonl")
        if jax.process_index() == 0 and not os.path.exists(eval_path):
            n = config.data.builtin_size
            _write_jsonl(train_path, builtin(kind, n, config.seed, "train"))
            _write_jsonl(eval_path, builtin(kind, max(n // 20, 16), config.seed + 1_000_003, "valid"))
        checkpoints.sync("builtin_data")
    splits = {"train": train_path}
    if eval_path:
        splits["eval"] = eval_path
    max_k = config.data.get("max_k", 9)
    if jax.process_index() == 0:
        builders.build(kind, splits, data_dir, max_k=max_k, fields=config.data.get("fields", "") or None)
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


def prepare(config, workdir: str, kind: str, builtin: Builtin = None) -> StageData:
    """Tokenizer + iterators for an LM stage ('text' = pretraining, 'demonstrations' = SFT)."""
    train_src, eval_src, texts = build_sources(config, workdir, kind, config.data.train, config.data.eval, builtin)
    template, tokenizer = resolve_chat_template(config, resolve_tokenizer(config, workdir, texts))
    d = config.data
    common = dict(kind=kind, seq_len=d.seq_len, max_prompt_len=d.max_prompt_len or None,  # 0: no prompt (text)
                  max_response_len=d.max_response_len, chat_template=template if kind != "text" else None,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  global_batch_size=config.train.batch_size)
    make_train = lambda src: iterators.lm_batches(src, tokenizer, seed=config.seed, pack=d.pack, **common)  # noqa: E731
    make_eval = lambda src: iterators.eval_batches(src, tokenizer, pack=d.pack, **common)  # noqa: E731
    return StageData(tokenizer, template, train_src, eval_src, make_train, make_eval)


def prepare_comparisons(config, workdir: str, builtin: Builtin = None, demonstrations: bool = True) -> StageData:
    """Tokenizer + iterators for the reward model / DPO, plus (`demonstrations`) the SFT demonstrations
    that fix the RM's bias: config.data.demonstrations, else the SFT stage's own training data."""
    train_src, eval_src, texts = build_sources(config, workdir, "comparisons", config.data.train, config.data.eval,
                                               builtin)
    extra = {}
    if demonstrations:
        path = config.data.demonstrations or (config.init.from_workdir and
                                              checkpoints.stage_train_data(config.init.from_workdir))
        extra["demonstrations"], _, _ = build_sources(config, workdir, "demonstrations", path, "", builtin,
                                                      key="config.data.demonstrations")
    template, tokenizer = resolve_chat_template(config, resolve_tokenizer(config, workdir, texts))
    d = config.data
    common = dict(seq_len=d.seq_len, max_prompt_len=d.max_prompt_len, process_index=jax.process_index(),
                  process_count=jax.process_count(), global_batch_size=config.train.batch_size,
                  chat_template=template)
    make_train = lambda src: iterators.comparison_batches(src, tokenizer, seed=config.seed, max_k=d.max_k,  # noqa: E731
                                                         **common)
    make_eval = lambda src: iterators.eval_batches(src, tokenizer, kind="comparisons", max_k=d.max_k,  # noqa: E731
                                                  **common)
    return StageData(tokenizer, template, train_src, eval_src, make_train, make_eval, extra_sources=extra)


@dataclasses.dataclass
class PPOData:
    """Tokenizer, chat template, rollout prompts (train / eval) and pretraining text for the ptx term."""
    tokenizer: Tokenizer
    chat_template: object
    prompts: object
    eval_prompts_source: object
    make_eval_prompts: Callable
    ptx: Optional[object]

    def eval_prompts(self):
        return self.make_eval_prompts(self.eval_prompts_source)

    def save_tokenizer(self, directory: str) -> None:
        save_tokenizer(directory, self.tokenizer, self.chat_template)


def prepare_ppo(config, workdir: str, builtin: Builtin = None) -> PPOData:
    d = config.data
    train_src, eval_src, texts = build_sources(config, workdir, "prompts", d.train, d.eval, builtin)
    template, tokenizer = resolve_chat_template(config, resolve_tokenizer(config, workdir, texts))
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    n_prompts = config.train.batch_size // config.ppo.group_size  # each is sampled group_size times
    prompts = iterators.prompt_batches(train_src, tokenizer, global_batch_size=n_prompts, chat_template=template,
                                       seed=config.seed, max_prompt_len=d.max_prompt_len, **proc)
    make_eval = lambda src: iterators.eval_batches(src, tokenizer, kind="prompts",  # noqa: E731
                                                   global_batch_size=n_prompts, chat_template=template,
                                                   max_prompt_len=d.max_prompt_len, **proc)
    ptx = None
    if config.ppo.ptx_coef > 0:
        ptx_src, _, _ = build_sources(config, workdir, "text", d.ptx, "", builtin, key="config.data.ptx")
        ptx = iterators.lm_batches(ptx_src, tokenizer, kind="text", global_batch_size=config.ppo.ptx_batch_size,
                                  seed=config.seed + 1, seq_len=d.ptx_seq_len, **proc)
    return PPOData(tokenizer, template, prompts, eval_src, make_eval, ptx)
