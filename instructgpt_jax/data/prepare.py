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
import math
import os
from typing import Callable, Optional

import jax
import numpy as np

from instructgpt_jax import checkpoints
from instructgpt_jax.data import builders, chat, iterators
from instructgpt_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from instructgpt_jax.errors import UserError

HELD_OUT = "5%"  # eval split carved from the training file when config.data.eval is ''
BUILTIN = "builtin"  # a data path with this value reads the caller's built-in rows (never implied by '')
Builtin = Optional[Callable[[str, int, int, str], list]]  # (kind, n, seed, split) -> rows
TOKENIZER_FILES, TEMPLATE_FILE = checkpoints.TOKENIZER_FILES, checkpoints.TEMPLATE_FILE


# What each kind of file holds, for error messages (the full list of shapes: data/builders.py).
SHAPES = {"text": "{text} rows", "demonstrations": "{prompt, response} or {messages} rows",
          "comparisons": "{prompt, completions, ranks}, {prompt, chosen, rejected}, HH or UltraFeedback rows",
          "prompts": "{prompt} or {messages} rows"}


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
    if source and source.has_tokenizer:
        return load_tokenizer(source.path)
    own = os.path.join(workdir, "tokenizer.model")
    # Only process 0 looks: another process may see the file process 0 just wrote and skip the barrier.
    if jax.process_index() == 0 and not os.path.exists(own):
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
    if value in ("", "auto") and source and source.template_file:
        value = source.template_file
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
    fitted: dict = dataclasses.field(default_factory=dict)  # lengths / steps derived from the data (fit_to_data)
    _train_iter: object = None

    def train_iterator(self):
        self._train_iter = self.make_train(self.train_source)
        return self._train_iter

    def eval_iterator(self):
        return self.make_eval(self.eval_source)

    def stats(self) -> dict:
        """The train iterator's counters + the malformed rows the build skipped (bad_rows, bad_row_examples)."""
        return {**(getattr(self._train_iter, "stats", {}) or {}), **self.train_source.stats()}

    def check_rows(self) -> "StageData":
        """Makes each iterator once: a file whose every row is skipped is a one-line UserError now, before
        anything is trained or saved, not at the first batch or the first evaluation."""
        for make, source in ((self.make_train, self.train_source), (self.make_eval, self.eval_source)):
            make(source).close()
        return self

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
    if not train_path:
        raise UserError(f"{key} is empty: give a JSONL or Parquet file of {kind} ({SHAPES[kind]}), "
                        f"or {key}={BUILTIN} for the built-in synthetic world's")
    if train_path == BUILTIN:  # built-in rows, written once by process 0
        if builtin is None:
            raise UserError(f"{key}={BUILTIN}: built-in rows exist only on the command line and in the miniature "
                            f"pipeline; from Python pass builtin_data=instructgpt_jax.miniature.world.builtin_rows")
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
        builders.build(kind, splits, data_dir, max_k=max_k, fields=config.data.get("fields", "") or None,
                       max_bad_rows=config.data.get("max_bad_rows", 0))
    checkpoints.sync("tfds_build")
    if eval_path:
        train_src = builders.load(kind, data_dir, "train", max_k=max_k)
        eval_src = builders.load(kind, data_dir, "eval", max_k=max_k)
    else:  # TFDS rounds 5% of 10 rows or fewer to no row (an empty training split): then hold out one
        n = len(builders.load(kind, data_dir, "train", max_k=max_k))
        cut = f"-{HELD_OUT}" if n > 10 else "-1"
        one = n == 1  # a single row is trained and evaluated on
        train_src = builders.load(kind, data_dir, "train" if one else f"train[:{cut}]", max_k=max_k)
        eval_src = builders.load(kind, data_dir, "train" if one else f"train[{cut}:]", max_k=max_k)

    def texts():
        out = []
        for i in range(min(len(train_src), 20_000)):
            out.extend(_texts(kind, train_src[i]))
        return out
    return train_src, eval_src, texts


MEASURED_ROWS = 20_000  # rows tokenised to derive lengths / steps from the data (more are extrapolated)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def measure(kind: str, source, tokenizer, template) -> dict:
    """Token lengths of a training source, nothing cropped: rows, longest prompt and sequence, total tokens."""
    n = len(source)
    step = max(1, n // MEASURED_ROWS)  # an even spread when there are more rows than we tokenise
    lengths = np.array([iterators.token_lengths(kind, source[i], tokenizer, template) for i in range(0, n, step)]
                       or [(0, 0)])
    return {"rows": n, "longest_prompt": int(lengths[:, 0].max()), "longest": int(lengths[:, 1].max()),
            "lengths": lengths[:, 1], "scale": n / len(lengths)}


def fit_to_data(config, kind: str, source, tokenizer, template) -> dict:
    """Lengths and schedule left 0 by a config (the finetune presets) derived from the training data, in place:
    data.seq_len = the longest example rounded up to 64, at most the model's context; data.max_prompt_len = the
    longest prompt when every example fits, else half the row; PPO's max_prompt_len = the longest prompt (up to
    context - max_new_tokens); train.num_steps = train.num_epochs passes over the data (packed rows: tokens /
    (seq_len x batch)). Returns what was measured and derived (for the startup summary), {} when nothing was."""
    d, t = config.data, config.train
    lengths_needed = d.get("seq_len", 1) == 0 or (
        kind != "text" and d.get("max_prompt_len", 1) == 0)
    if not lengths_needed and not t.get("num_epochs", 0):
        return {}
    m = measure(kind, source, tokenizer, template)
    ctx, derived = config.model.max_len, {}
    if d.get("seq_len", 1) == 0:
        derived["data.seq_len"] = min(_round_up(max(m["longest"] - (kind in ("text", "demonstrations")), 1), 64), ctx)
    seq_len = derived.get("data.seq_len", d.get("seq_len", ctx))
    if kind == "prompts" and d.max_prompt_len == 0:
        derived["data.max_prompt_len"] = max(1, min(_round_up(m["longest_prompt"], 8), ctx - config.ppo.max_new_tokens))
    elif kind in ("demonstrations", "comparisons") and d.max_prompt_len == 0:
        fits = m["longest"] <= seq_len + (kind == "demonstrations")
        derived["data.max_prompt_len"] = max(1, min(m["longest_prompt"], seq_len - 1)) if fits else seq_len // 2
    if kind == "demonstrations" and d.get("max_response_len", 1) == 0:
        derived["data.max_response_len"] = seq_len
    if t.get("num_epochs", 0) > 0:
        if kind in ("text", "demonstrations") and d.get("pack", False):  # packed rows of seq_len tokens
            tokens = float(np.minimum(m["lengths"] - 1, seq_len).sum()) * m["scale"]
            rows = tokens / seq_len
        else:  # one prompt (comparisons, rollouts: group_size samples of it) per batch row
            rows = m["rows"] * (config.ppo.group_size if kind == "prompts" else 1)
        derived["train.num_steps"] = max(1, math.ceil(t.num_epochs * rows / t.batch_size))
    for key, value in derived.items():
        group, name = key.split(".")
        config[group][name] = value
    return {"measured_rows": m["rows"], "longest_prompt": m["longest_prompt"], "longest": m["longest"], **derived}


def prepare(config, workdir: str, kind: str, builtin: Builtin = None) -> StageData:
    """Tokenizer + iterators for an LM stage ('text' = pretraining, 'demonstrations' = SFT)."""
    train_src, eval_src, texts = build_sources(config, workdir, kind, config.data.train, config.data.eval, builtin)
    template, tokenizer = resolve_chat_template(config, resolve_tokenizer(config, workdir, texts))
    fitted = fit_to_data(config, kind, train_src, tokenizer, template if kind != "text" else None)
    d = config.data
    common = dict(kind=kind, seq_len=d.seq_len, max_prompt_len=d.max_prompt_len or None,  # 0: no prompt (text)
                  max_response_len=d.max_response_len, chat_template=template if kind != "text" else None,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  global_batch_size=config.train.batch_size)
    make_train = lambda src: iterators.lm_batches(src, tokenizer, seed=config.seed, pack=d.pack, **common)  # noqa: E731
    make_eval = lambda src: iterators.eval_batches(src, tokenizer, pack=d.pack, **common)  # noqa: E731
    return StageData(tokenizer, template, train_src, eval_src, make_train, make_eval, fitted=fitted).check_rows()


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
    fitted = fit_to_data(config, "comparisons", train_src, tokenizer, template)
    d = config.data
    common = dict(seq_len=d.seq_len, max_prompt_len=d.max_prompt_len, process_index=jax.process_index(),
                  process_count=jax.process_count(), global_batch_size=config.train.batch_size,
                  chat_template=template)
    make_train = lambda src: iterators.comparison_batches(src, tokenizer, seed=config.seed, max_k=d.max_k,  # noqa: E731
                                                         **common)
    make_eval = lambda src: iterators.eval_batches(src, tokenizer, kind="comparisons", max_k=d.max_k,  # noqa: E731
                                                  **common)
    return StageData(tokenizer, template, train_src, eval_src, make_train, make_eval, extra_sources=extra,
                     fitted=fitted).check_rows()


@dataclasses.dataclass
class PPOData:
    """Tokenizer, chat template, rollout prompts (train / eval) and pretraining text for the ptx term."""
    tokenizer: Tokenizer
    chat_template: object
    prompts: object
    eval_prompts_source: object
    make_eval_prompts: Callable
    ptx: Optional[object]
    train_source: object = None
    ptx_source: object = None
    fitted: dict = dataclasses.field(default_factory=dict)  # lengths / steps derived from the data (fit_to_data)

    def eval_prompts(self):
        return self.make_eval_prompts(self.eval_prompts_source)

    def save_tokenizer(self, directory: str) -> None:
        save_tokenizer(directory, self.tokenizer, self.chat_template)


def prepare_ppo(config, workdir: str, builtin: Builtin = None) -> PPOData:
    d = config.data
    train_src, eval_src, texts = build_sources(config, workdir, "prompts", d.train, d.eval, builtin)
    template, tokenizer = resolve_chat_template(config, resolve_tokenizer(config, workdir, texts))
    fitted = fit_to_data(config, "prompts", train_src, tokenizer, template)
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    n_prompts = config.train.batch_size // config.ppo.group_size  # each is sampled group_size times
    prompts = iterators.prompt_batches(train_src, tokenizer, global_batch_size=n_prompts, chat_template=template,
                                       seed=config.seed, max_prompt_len=d.max_prompt_len, **proc)
    make_eval = lambda src: iterators.eval_batches(src, tokenizer, kind="prompts",  # noqa: E731
                                                   global_batch_size=n_prompts, chat_template=template,
                                                   max_prompt_len=d.max_prompt_len, **proc)
    ptx, ptx_src = None, None
    if config.ppo.ptx_coef > 0:
        ptx_src, _, _ = build_sources(config, workdir, "text", d.ptx, "", builtin, key="config.data.ptx")
        if d.ptx_seq_len == 0:  # the longest document, up to the context (as data.seq_len 0 elsewhere)
            longest = measure("text", ptx_src, tokenizer, None)["longest"]
            fitted["data.ptx_seq_len"] = d.ptx_seq_len = min(_round_up(longest - 1, 64), config.model.max_len)
        ptx = iterators.lm_batches(ptx_src, tokenizer, kind="text", global_batch_size=config.ppo.ptx_batch_size,
                                  seed=config.seed + 1, seq_len=d.ptx_seq_len, **proc)
    return PPOData(tokenizer, template, prompts, eval_src, make_eval, ptx, train_src, ptx_src, fitted)
