"""Deterministic, resumable, per-process batch iterators built on grain.

Pipeline (the same in every process):

    MapDataset.source -> shuffle(seed) -> repeat(num_epochs) -> map(tokenise + truncate)
      -> to_iter_dataset (threaded reads) -> _Unroll (skip / split examples, carry stats)
      -> [_FirstFitPack] -> batch(global_batch_size) -> thread prefetch -> rows of this process

Every process computes the whole *global* batch and keeps its own slice
[p*b, (p+1)*b). Tokenising the global batch costs little next to a train step, and
it buys exactness: an N-process run sees the same global batches as a 1-process run,
and the iterator state does not depend on the process count.

Per-example counters (skips, crops, truncations) travel inside the elements and are
summed when a batch is emitted, so `stats` only counts data that reached a batch
and is restored exactly with the state. At the end of a finite pass, examples in a
dropped partial batch (training) or skipped after the last batch are not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import json

import grain
import numpy as np

from instructgpt_jax.data import chat
from instructgpt_jax.errors import UserError

STAT_KEYS = (
    "examples",  # source rows read (including skipped ones)
    "skipped_empty_response",  # demonstrations with an empty response
    "skipped_no_room",  # the prompt leaves no room for a response in seq_len
    "skipped_no_untied_pair",  # comparisons whose ranks are all equal
    "cropped_prompts",  # prompts cropped from the left to max_prompt_len
    "truncated_responses",  # responses cut on the right (no EOS then)
    "truncated_completions",  # completions cut on the right (EOS kept)
    "chunked_texts",  # texts longer than seq_len + 1, split in chunks
)
_S = {k: i for i, k in enumerate(STAT_KEYS)}


def _stats(**counts) -> np.ndarray:
    v = np.zeros(len(STAT_KEYS), np.int64)
    for k, n in counts.items():
        v[_S[k]] = n
    return v


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else x


def _head(tok) -> list[int]:
    """[BOS] when the tokenizer starts sequences with it (`add_bos`; stand-ins without the
    attribute do), else []."""
    return [tok.bos_id] if getattr(tok, "add_bos", True) and tok.bos_id is not None else []


def _crop(ids: list[int], max_len: int | None, tok) -> tuple[list[int], bool]:
    """`ids` cropped from the LEFT to at most max_len tokens (the end of a prompt, next to the
    response, matters most); a leading BOS is kept."""
    if max_len is None or len(ids) <= max_len:
        return ids, False
    if tok.bos_id is not None and ids[0] == tok.bos_id:
        return [ids[0]] + ids[len(ids) - (max_len - 1) :], True
    return ids[len(ids) - max_len :], True


def _crop_prompt(tok, prompt: str, max_prompt_len: int | None) -> tuple[list[int], bool]:
    """BOS (per `add_bos`) + prompt, cropped from the left to max_prompt_len tokens."""
    return _crop(_head(tok) + tok.encode(_text(prompt)), max_prompt_len, tok)


def _where(row: dict) -> str:
    if not row.get("prompt") and row.get("messages"):
        return f"row with messages starting {str(row['messages'][0].get('content', ''))[:40]!r}"
    return f"row with prompt {_text(row.get('prompt', ''))[:40]!r}"


def _template(chat_template, tok):
    """(template or None, tokenizer with the template's end-of-turn token among its EOS ids)."""
    template = chat.resolve(chat_template, tok)
    return template, chat.with_end_of_turn(tok, template)


def _check_chat(row: dict, template) -> None:
    """A conversation needs a template to become tokens: without one it would silently be an empty row."""
    if template is None and row.get("messages"):
        raise ValueError(f"{_where(row)} is a conversation ({{messages}}) but no chat template is set and the "
                         f"tokenizer has none: set config.data.chat_template to 'chatml', 'llama2', 'llama3' or a "
                         f".jinja file whose assistant turns end with one of the tokenizer's special tokens")


# ---------------------------------------------------------------------------
# Per-example transforms: row -> {"pieces": [element, ...], "stats": int64[S]}.
# Zero pieces = skipped; several = a long text split in chunks.


def _lm_piece(seq: list[int], first_target: int) -> dict:
    """Inputs/targets of one sequence; loss on targets whose index >= first_target.
    Shifting per example (not per packed row) means no target crosses a boundary."""
    seq = np.asarray(seq, np.int32)
    mask = (np.arange(len(seq) - 1) >= first_target).astype(np.float32)
    return {"tokens": seq[:-1], "targets": seq[1:], "loss_mask": mask}


def lm_example(
    row: dict,
    tok,
    *,
    kind: str,
    seq_len: int,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    chat_template=None,
) -> dict:
    """One source row -> LM pieces (unpadded) and its counters.

    text: BOS + text + EOS, cut into pieces of seq_len + 1 tokens that overlap by one
    (so every token is predicted once); loss on all targets.
    demonstrations: BOS + prompt + response + EOS; prompt cropped from the left to
    max_prompt_len (BOS included), response (EOS included) cut on the right to
    max_response_len and to what fits in seq_len + 1 tokens, in which case the EOS
    is dropped (the model never learns to stop mid-answer); loss on response + EOS.
    BOS only when `tok.add_bos`.

    With `chat_template` (a `chat.ChatTemplate`, a name or a path; None = 'none' = the above):
    the row's `messages` (or user = prompt, assistant = response) rendered and tokenised once
    (`chat.sft_ids`), loss on every assistant turn and its end-of-turn token. "Prompt" is then
    everything before the first assistant token (cropped from the left, BOS kept), "response"
    everything from it on (cut on the right as above; earlier turns keep their end-of-turn).
    A conversation whose assistant turns are all empty counts as an empty response.
    """
    eos = tok.eos_id
    if kind == "text":
        seq = _head(tok) + tok.encode(_text(row["text"])) + [eos]
        pieces = [_lm_piece(seq[s : s + seq_len + 1], 0) for s in range(0, len(seq) - 1, seq_len)]
        return {"pieces": pieces, "stats": _stats(examples=1, chunked_texts=int(len(pieces) > 1))}
    template, tok = _template(chat_template, tok)
    _check_chat(row, template)
    if template is not None:
        return _chat_lm_example(row, tok, template, seq_len, max_prompt_len, max_response_len)
    response = tok.encode(_text(row["response"]))
    if not response:
        return {"pieces": [], "stats": _stats(examples=1, skipped_empty_response=1)}
    prompt, cropped = _crop_prompt(tok, row["prompt"], max_prompt_len)
    room = seq_len + 1 - len(prompt)
    if room < 1:
        return {"pieces": [], "stats": _stats(examples=1, skipped_no_room=1)}
    limit = room if max_response_len is None else min(room, max_response_len)
    body = response + [eos]
    truncated = len(body) > limit
    if truncated:
        body = response[:limit]
    piece = _lm_piece(prompt + body, len(prompt) - 1)
    return {
        "pieces": [piece],
        "stats": _stats(examples=1, cropped_prompts=int(cropped), truncated_responses=int(truncated)),
    }


def _chat_lm_example(row, tok, template, seq_len, max_prompt_len, max_response_len) -> dict:
    messages = chat.as_messages(row, with_response=True)
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return {"pieces": [], "stats": _stats(examples=1, skipped_empty_response=1)}
    ids, mask = chat.sft_ids(template, messages, tok, where=_where(row))
    first = mask.index(1)
    prompt, cropped = _crop(ids[:first], max_prompt_len, tok)
    room = seq_len + 1 - len(prompt)
    if room < 1:
        return {"pieces": [], "stats": _stats(examples=1, skipped_no_room=1)}
    limit = room if max_response_len is None else min(room, max_response_len)
    truncated = len(ids) - first > limit
    body, body_mask = ids[first : first + limit], mask[first : first + limit]
    seq = np.asarray(prompt + body, np.int32)
    loss = np.asarray([0] * len(prompt) + body_mask, np.float32)
    piece = {"tokens": seq[:-1], "targets": seq[1:], "loss_mask": loss[1:]}
    return {
        "pieces": [piece],
        "stats": _stats(examples=1, cropped_prompts=int(cropped), truncated_responses=int(truncated)),
    }


def _pad_lm(piece: dict, seq_len: int) -> dict:
    """Unpacked row: one example, right-padded (PAD = 0, masks 0)."""
    n = len(piece["tokens"])
    out = {k: np.pad(v, (0, seq_len - n)) for k, v in piece.items()}
    out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    out["positions"] = np.where(out["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
    return out


def _scored_sequence(prompt: list[int], completion, tok, room: int, end: int | None = None) -> tuple[list[int], bool]:
    """BOS + prompt + completion + EOS with the completion cut to `room` tokens (EOS always kept).
    `completion` is text, or ids (chat: the assistant turn) with `end` its end-of-turn EOS."""
    ids = tok.encode(_text(completion)) if end is None else completion
    truncated = len(ids) > room
    return prompt + ids[:room] + [tok.eos_id if end is None else end], truncated


def _scored_parts(row: dict, completion, tok, template, max_prompt_len) -> tuple[list[int], bool, object, int | None]:
    """(cropped prompt ids, cropped?, completion text or ids, end id or None) of one completion."""
    if template is None:
        prompt, cropped = _crop_prompt(tok, row["prompt"], max_prompt_len)
        return prompt, cropped, completion, None
    messages = chat.as_messages(row, with_response=False)
    prompt, body, end = chat.scoring_ids(template, messages, _text(completion), tok, where=_where(row))
    prompt, cropped = _crop(prompt, max_prompt_len, tok)
    return prompt, cropped, body, end


def scoring_example(
    prompt: str, completion: str, tok, *, seq_len: int, max_prompt_len: int, chat_template=None, messages=None,
    completion_ids=None,
) -> dict:
    """One (prompt, completion) formatted exactly as in reward-model training, right-padded to
    seq_len: tokens, segment_ids, positions [seq_len] and last_index (the EOS) for scoring.
    With `chat_template`, the prompt conversation is `messages` (or user = prompt) and the
    completion its assistant reply (`chat.scoring_ids`); the EOS is then the end-of-turn token.
    `completion_ids` (the sampled ids, no EOS) replace the completion's encoding, as in
    `comparison_example` with a row's `completion_ids`: no decode -> encode round trip."""
    template, tok = _template(chat_template, tok)
    row = {"prompt": prompt, "messages": messages or []}
    _check_chat(row, template)
    prompt_ids, _, body, end = _scored_parts(row, completion, tok, template, max_prompt_len)
    if completion_ids is not None:
        body, end = list(completion_ids), tok.eos_id if end is None else end
    seq, _ = _scored_sequence(prompt_ids, body, tok, seq_len - len(prompt_ids) - 1, end)
    n = len(seq)
    return {
        "tokens": np.pad(np.asarray(seq, np.int32), (0, seq_len - n)),
        "segment_ids": (np.arange(seq_len) < n).astype(np.int32),
        "positions": np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32),
        "last_index": np.int32(n - 1),
    }


def comparison_example(
    row: dict, tok, *, seq_len: int, max_prompt_len: int, max_k: int, chat_template=None
) -> dict:
    """One prompt with its K completions -> [max_k, seq_len] arrays.

    Each completion is BOS + prompt + completion + EOS, right-padded; a long
    completion is cut on the right so that the EOS (where the reward is read,
    `last_index`) is always kept; `prompt_len` is where the completion starts (DPO's
    log-probs sum over tokens prompt_len..last_index). Rows K..max_k-1 are padding with valid = 0.
    With `chat_template`: the prompt conversation (`messages`, or user = prompt) with each
    completion as the assistant's reply, ending at its end-of-turn token (an EOS); prompt_len
    may then differ between completions (a token may straddle the prompt's end).
    """
    completions, ranks = row["completions"], np.asarray(row["ranks"], np.int32)
    k = len(completions)
    if k > max_k:
        raise ValueError(f"a comparison has {k} completions but max_k={max_k}")
    if len(np.unique(ranks)) < 2:
        return {"pieces": [], "stats": _stats(examples=1, skipped_no_untied_pair=1)}
    template, tok = _template(chat_template, tok)
    _check_chat(row, template)
    parts = [_scored_parts(row, c, tok, template, max_prompt_len) for c in completions]
    if row.get("completion_ids"):  # the sampled ids themselves: no decode -> encode round trip
        parts = [(p, c, list(ids), tok.eos_id if end is None else end)
                 for (p, c, _, end), ids in zip(parts, row["completion_ids"])]
    cropped = any(p[1] for p in parts)
    out = {
        "tokens": np.zeros((max_k, seq_len), np.int32),
        "segment_ids": np.zeros((max_k, seq_len), np.int32),
        "positions": np.zeros((max_k, seq_len), np.int32),
        "last_index": np.zeros(max_k, np.int32),
        "prompt_len": np.full(max_k, len(parts[0][0]), np.int32),  # BOS + prompt: where each completion starts
        "ranks": np.zeros(max_k, np.int32),
        "valid": np.zeros(max_k, np.float32),
    }
    n_trunc = 0
    for i, (prompt, _, body, end) in enumerate(parts):
        room = seq_len - len(prompt) - 1  # completion tokens that fit before the EOS
        seq, truncated = _scored_sequence(prompt, body, tok, room, end)
        n_trunc += truncated
        out["prompt_len"][i] = len(prompt)
        out["tokens"][i, : len(seq)] = seq
        out["segment_ids"][i, : len(seq)] = 1
        out["positions"][i, : len(seq)] = np.arange(len(seq))
        out["last_index"][i] = len(seq) - 1
    out["ranks"][:k] = ranks
    out["valid"][:k] = 1.0
    return {"pieces": [out], "stats": _stats(examples=1, cropped_prompts=int(cropped), truncated_completions=n_trunc)}


def prompt_example(row: dict, tok, *, max_prompt_len: int, chat_template=None) -> dict:
    """BOS + prompt, cropped from the left and LEFT-padded to max_prompt_len, so
    that generation continues every row from the same position. With `chat_template`:
    the conversation (`messages`, or user = prompt) with its generation prompt
    (`chat.prompt_ids`). A prompt of no tokens (no BOS, empty text) becomes [EOS], so
    that every row has a real token to sample from."""
    template, tok = _template(chat_template, tok)
    _check_chat(row, template)
    if template is None:
        prompt, cropped = _crop_prompt(tok, row["prompt"], max_prompt_len)
    else:
        messages = chat.as_messages(row, with_response=False)
        prompt, cropped = _crop(chat.prompt_ids(template, messages, tok), max_prompt_len, tok)
    if not prompt:
        prompt = [tok.eos_id]
    tokens = np.zeros(max_prompt_len, np.int32)
    mask = np.zeros(max_prompt_len, np.int32)
    tokens[max_prompt_len - len(prompt) :] = prompt
    mask[max_prompt_len - len(prompt) :] = 1
    conversation = json.dumps(list(row.get("messages") or []), ensure_ascii=False) if row.get("messages") else ""
    piece = {"prompt_tokens": tokens, "prompt_mask": mask, "prompt_text": _text(row["prompt"]),
             "prompt_messages": conversation}  # the conversation as JSON ('' = plain prompt), for a re-tokenizing RM
    return {"pieces": [piece], "stats": _stats(examples=1, cropped_prompts=int(cropped))}


# ---------------------------------------------------------------------------
# Grain plumbing.


class _UnrollIterDataset(grain.IterDataset):
    """Emits the pieces of each element (none for skipped ones). The counters of
    skipped elements ride on the next emitted piece, so they are counted exactly
    when that piece reaches a batch. (`_make` checked that some row is kept, so an
    endless repeat never loops without emitting.)"""

    def __iter__(self):
        return _UnrollIterator(self._parent.__iter__())


class _UnrollIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._pending: list = []  # pieces of the current element not yet emitted
        self._offset = 0  # pieces of it already emitted
        self._element_state = None  # parent state before the current element

    def __next__(self):
        stats = _stats()
        while not self._pending:
            self._element_state = self._parent.get_state()
            element = next(self._parent)
            stats = stats + element["stats"]
            if element["pieces"]:
                self._pending, self._offset = list(element["pieces"]), 0
        piece = dict(self._pending.pop(0), stats=stats)
        self._offset += 1
        return piece

    def get_state(self):
        if self._pending:  # part-way through an element: replay it, skip `offset` pieces
            return {"parent": self._element_state, "offset": self._offset}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending, self._offset = [], 0
        if state["offset"]:
            self._element_state = state["parent"]
            element = next(self._parent)
            self._pending = list(element["pieces"])[state["offset"] :]
            self._offset = state["offset"]


class _FirstFitPack(grain.IterDataset):
    """First-fit packing of pieces (tokens / targets / loss_mask of equal length <= `length`) into rounds
    of `num_bins` rows, the semantics of grain's FirstFitPackIterDataset: each piece goes into the first
    row with room; a piece that fits nowhere closes the round (its rows are emitted in order, then the
    piece opens the next round); the last round may have fewer rows. A row holds its pieces back to back
    (segment ids 1, 2, ..., positions from 0 in each; PAD = 0 after them) and the sum of their counters.
    grain's generic packer costs ~1 ms of Python per piece (as much as a tiny train step per batch); this
    one does the bookkeeping on ints and copies each piece once."""

    def __init__(self, parent: grain.IterDataset, length: int, num_bins: int):
        super().__init__(parent)
        self._length, self._num_bins = length, num_bins

    def __iter__(self):
        return _FirstFitPackIterator(self._parent.__iter__(), self._length, self._num_bins)


class _FirstFitPackIterator(grain.DatasetIterator):
    """State: the parent's state at the start of the current round and the rows of it already emitted
    (a restored iterator re-packs that round from the same pieces and skips them)."""

    def __init__(self, parent: grain.DatasetIterator, length: int, num_bins: int):
        super().__init__(parent)
        self._length, self._num_bins = length, num_bins
        self._round_state = parent.get_state()  # parent state before the current round's first piece
        self._rows: list[dict] = []  # the current round's packed rows
        self._emitted = 0  # rows of the current round already emitted
        self._carry = None  # (parent state before it, piece): the piece that closed the last round

    def _pack_round(self) -> None:
        bins: list[list[dict]] = [[] for _ in range(self._num_bins)]
        used = [0] * self._num_bins
        if self._carry is not None:
            (before, piece), self._carry = self._carry, None
        else:
            before, piece = self._parent.get_state(), next(self._parent, None)
        self._round_state = before
        while piece is not None:
            n = len(piece["tokens"])
            if n > self._length:
                raise ValueError(f"a piece of {n} tokens does not fit a packed row of {self._length}")
            row = next((i for i in range(self._num_bins) if used[i] + n <= self._length), None)
            if row is None:  # fits nowhere: it opens the next round
                self._carry = (before, piece)
                break
            bins[row].append(piece)
            used[row] += n
            before, piece = self._parent.get_state(), next(self._parent, None)
        self._rows = [self._row(b) for b in bins if b]
        self._emitted = 0

    def _row(self, pieces: list[dict]) -> dict:
        row = {k: np.zeros(self._length, np.asarray(pieces[0][k]).dtype) for k in ("tokens", "targets", "loss_mask")}
        row.update({k: np.zeros(self._length, np.int32) for k in ("segment_ids", "positions")})
        start = 0
        for seg, piece in enumerate(pieces, 1):
            end = start + len(piece["tokens"])
            for k in ("tokens", "targets", "loss_mask"):
                row[k][start:end] = piece[k]
            row["segment_ids"][start:end] = seg
            row["positions"][start:end] = np.arange(end - start)
            start = end
        row["stats"] = np.sum([p["stats"] for p in pieces], axis=0)
        return row

    def __next__(self):
        if self._emitted == len(self._rows):
            self._pack_round()
            if not self._rows:
                raise StopIteration
        self._emitted += 1
        return self._rows[self._emitted - 1]

    def get_state(self):
        if self._emitted == len(self._rows):  # between rounds: the next round starts where the parent is
            if self._carry is not None:
                return {"parent": self._carry[0], "emitted": 0}
            return {"parent": self._parent.get_state(), "emitted": 0}
        return {"parent": self._round_state, "emitted": self._emitted}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._rows, self._emitted, self._carry = [], 0, None
        if state["emitted"]:
            self._pack_round()
            self._emitted = state["emitted"]


_TEXT_KEYS = ("prompt_text", "prompt_messages")  # host-side strings: object arrays, never sent to devices


def _stack(rows: Sequence[dict], batch_size: int, pad: bool) -> dict:
    """Stacks rows into a batch; when `pad`, fills it up with all-zero rows (every
    mask 0, PAD tokens, empty prompt text) so a final partial batch keeps its shape."""
    rows = list(rows)
    if pad and len(rows) < batch_size:
        blank = {k: ("" if k in _TEXT_KEYS else np.zeros_like(v)) for k, v in rows[0].items()}
        rows += [blank] * (batch_size - len(rows))
    out = {}
    for k in rows[0]:
        if k == "stats":
            out[k] = np.sum([r[k] for r in rows], axis=0)
        elif k in _TEXT_KEYS:
            out[k] = np.empty(len(rows), object)
            out[k][:] = [r[k] for r in rows]
        else:
            out[k] = np.stack([r[k] for r in rows])
    return out


class BatchIterator:
    """Iterator over this process's rows of each global batch.

    `stats` holds cumulative counters (STAT_KEYS + 'batches') over emitted global
    batches. `get_state()` is a JSON-able dict; `set_state` on a fresh iterator
    built with the same arguments continues exactly where the saved one stopped.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        description: dict,
    ):
        self._dataset = dataset
        self._iter = iter(dataset)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self._lo = process_index * self.local_batch_size
        self.description = description  # arguments that must match on restore
        self.stats = dict.fromkeys(STAT_KEYS + ("batches",), 0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iter)
        for k, v in zip(STAT_KEYS, batch.pop("stats")):
            self.stats[k] += int(v)
        self.stats["batches"] += 1
        return {k: v[self._lo : self._lo + self.local_batch_size] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"grain": self._iter.get_state(), "stats": dict(self.stats), "description": self.description}

    def set_state(self, state: dict) -> None:
        saved = state.get("description")
        if saved is not None and saved != self.description:
            diff = {k: (saved.get(k), v) for k, v in self.description.items() if saved.get(k) != v}
            raise ValueError(f"data iterator state was saved with different settings (saved, now): {diff}")
        self._iter.set_state(state["grain"])
        self.stats = {k: int(v) for k, v in state["stats"].items()}

    def close(self) -> None:
        """Stops grain's read-ahead threads."""
        self._iter.close()


def _make(
    source,
    example_fn: Callable[[dict], dict],
    *,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    num_epochs: int | None,
    shuffle: bool,
    pack_len: int | None = None,
    pad_final: bool = False,
    description: dict,
) -> BatchIterator:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if len(source) == 0:
        raise ValueError(f"{_source_name(source)} has no rows")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    _check_not_all_skipped(source, example_fn)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # re-shuffled differently in each epoch by repeat()
    # Threads tokenise ahead of the consumer, about two global batches' worth.
    read = grain.ReadOptions(num_threads=8, prefetch_buffer_size=max(32, 2 * global_batch_size))
    ds = ds.repeat(num_epochs).map(example_fn).to_iter_dataset(read)
    ds = _UnrollIterDataset(ds)
    if pack_len is not None:
        ds = _FirstFitPack(ds, pack_len, num_bins=global_batch_size)  # one round of bins: one global batch
    ds = ds.batch(
        global_batch_size,
        drop_remainder=not pad_final,
        batch_fn=functools.partial(_stack, batch_size=global_batch_size, pad=pad_final),
    )
    # Packing and stacking run in Python: a thread prepares the next batches while a jitted step runs.
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
    description = dict(
        description,
        global_batch_size=global_batch_size,
        seed=seed,
        num_epochs=num_epochs,
        shuffle=shuffle,
        num_examples=len(source),
    )
    return BatchIterator(
        ds,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        description=description,
    )


def _template_description(template) -> dict:
    """The template is part of the settings a saved state must match (absent for 'none', so the
    states saved before templates existed still restore)."""
    return {} if template is None else {"chat_template": template.name}


def _source_name(source) -> str:
    """The user's file when the source knows it (a built dataset), with the part of it read when that is
    not all of it ('train[:-5%]': the rest is held out); else the dataset directory and split."""
    file, split = getattr(source, "file", None), getattr(source, "split", None)
    if file:
        return file + (f" ({split})" if split and "[" in split else "")
    path = getattr(source, "path", None)
    if path is not None:
        return f"{path}" + (f" (split {split!r})" if split else "")
    return f"the {type(source).__name__} of {len(source)} rows"


_SKIPPED = {  # why rows are skipped, as the error says it
    "skipped_empty_response": "with an empty response",
    "skipped_no_room": "whose prompt leaves no room for a response in seq_len",
    "skipped_no_untied_pair": "with no untied pair (all ranks equal)",
}


def _check_not_all_skipped(source, example_fn) -> None:
    """One-line UserError when every row of `source` is skipped, naming the file, the rows read and
    why they were skipped (reads rows in order until one is kept, so a usable source costs a row or a
    few); made when the iterator is, so a stage fails before training, not at its first batch."""
    stats = _stats()
    for i in range(len(source)):
        out = example_fn(source[i])
        if out["pieces"]:
            return
        stats = stats + out["stats"]
    reasons = ", ".join(f"{int(stats[_S[k]])} {why}" for k, why in _SKIPPED.items() if stats[_S[k]])
    raise UserError(
        f"{_source_name(source)}: every row was skipped ({len(source)} rows read, {reasons}); "
        "check the data and the length limits (config.data.seq_len, max_prompt_len)"
    )


def _check_row(source, fields: Sequence[str], what: str):
    row = source[0]
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(
            f"{what} needs rows with fields {list(fields)}; the source's rows have {sorted(row)} (missing {missing})"
        )


# ---------------------------------------------------------------------------
# Public iterators.


def lm_batches(
    source,
    tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    seq_len: int,
    kind: str = "text",
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    pack: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    chat_template=None,
    _pad_final: bool = False,
) -> BatchIterator:
    """Language-model batches for pretraining ('text') or SFT ('demonstrations').

    Yields {tokens, targets, segment_ids, positions: int32[b, seq_len],
    loss_mask: float32[b, seq_len]}, b = global_batch_size // process_count.
    targets[t] is the label of tokens[t]; with `pack`, several examples share a row
    (segment_ids 1, 2, ..., 0 = padding; positions restart at 0 per example) and no
    target or position crosses an example boundary. See `lm_example` for truncation.
    `chat_template` (demonstrations; see `chat.resolve`: None / 'none' = plain formatting,
    '' / 'auto', a built-in name, a .jinja path, or a `chat.ChatTemplate`) renders each row's
    `messages` (a plain row as user = prompt, assistant = response); loss on assistant turns.
    """
    if kind not in ("text", "demonstrations"):
        raise ValueError(f"lm_batches kind must be 'text' or 'demonstrations', got {kind!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_prompt_len is not None and max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1 (it counts BOS), got {max_prompt_len}")
    if max_response_len is not None and max_response_len < 1:
        raise ValueError(f"max_response_len must be >= 1, got {max_response_len}")
    _check_row(source, ["text"] if kind == "text" else ["prompt", "response"], f"lm_batches(kind={kind!r})")
    template, tok = _template(chat_template if kind == "demonstrations" else None, tokenizer)
    example = functools.partial(
        lm_example,
        tok=tok,
        kind=kind,
        seq_len=seq_len,
        max_prompt_len=max_prompt_len,
        max_response_len=max_response_len,
        chat_template=template,
    )
    if pack:
        fn = example
    else:

        def fn(row):
            out = example(row)
            return dict(out, pieces=[_pad_lm(p, seq_len) for p in out["pieces"]])

    return _make(
        source,
        fn,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        shuffle=shuffle,
        pack_len=seq_len if pack else None,
        pad_final=_pad_final,
        description=dict(
            kind=kind,
            seq_len=seq_len,
            max_prompt_len=max_prompt_len,
            max_response_len=max_response_len,
            pack=pack,
            vocab_size=tokenizer.vocab_size,
            **_template_description(template),
        ),
    )


def comparison_batches(
    source,
    tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    seq_len: int,
    max_prompt_len: int,
    max_k: int = 9,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    chat_template=None,
    _pad_final: bool = False,
) -> BatchIterator:
    """Reward-model batches, one prompt with all its completions per row.

    Yields tokens, segment_ids, positions: int32[b, max_k, seq_len];
    last_index, ranks: int32[b, max_k]; valid: float32[b, max_k].
    Prompts whose ranks are all equal (no untied pair) are skipped and counted.
    `chat_template` as in `lm_batches`: the prompt conversation with each completion as the
    assistant's reply, the reward read at its end-of-turn token.
    """
    if not 1 <= max_prompt_len < seq_len:
        raise ValueError(
            f"need 1 <= max_prompt_len < seq_len (room for the EOS), got "
            f"max_prompt_len={max_prompt_len}, seq_len={seq_len}"
        )
    if max_k < 2:
        raise ValueError(f"max_k must be >= 2, got {max_k}")
    _check_row(source, ["prompt", "completions", "ranks"], "comparison_batches")
    template, tok = _template(chat_template, tokenizer)
    fn = functools.partial(
        comparison_example, tok=tok, seq_len=seq_len, max_prompt_len=max_prompt_len, max_k=max_k,
        chat_template=template,
    )
    return _make(
        source,
        fn,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        shuffle=shuffle,
        pad_final=_pad_final,
        description=dict(
            kind="comparisons",
            seq_len=seq_len,
            max_prompt_len=max_prompt_len,
            max_k=max_k,
            vocab_size=tokenizer.vocab_size,
            **_template_description(template),
        ),
    )


def prompt_batches(
    source,
    tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    max_prompt_len: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    chat_template=None,
    _pad_final: bool = False,
) -> BatchIterator:
    """PPO / evaluation prompts: prompt_tokens, prompt_mask int32[b, max_prompt_len]
    (LEFT-padded BOS + prompt, mask 1 on real tokens) and prompt_text object[b] (str).
    `chat_template` as in `lm_batches`: the conversation with its generation prompt. Sample
    with `chat.with_end_of_turn(tokenizer, template).eos_ids` so responses stop at end of turn."""
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1 (it counts BOS), got {max_prompt_len}")
    _check_row(source, ["prompt"], "prompt_batches")
    template, tok = _template(chat_template, tokenizer)
    fn = functools.partial(prompt_example, tok=tok, max_prompt_len=max_prompt_len, chat_template=template)
    return _make(
        source,
        fn,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        shuffle=shuffle,
        pad_final=_pad_final,
        description=dict(
            kind="prompts", max_prompt_len=max_prompt_len, vocab_size=tokenizer.vocab_size,
            **_template_description(template),
        ),
    )


_ITERATORS = {
    "prompts": prompt_batches,
    "comparisons": comparison_batches,
    "demonstrations": functools.partial(lm_batches, kind="demonstrations"),
    "text": functools.partial(lm_batches, kind="text"),
}


def eval_batches(
    source,
    tokenizer,
    *,
    global_batch_size: int,
    kind: str = "prompts",
    process_index: int = 0,
    process_count: int = 1,
    **lengths,
) -> BatchIterator:
    """One ordered pass over `source` for evaluation, for any kind ('prompts',
    'comparisons', 'demonstrations', 'text'; lengths as in the matching iterator).

    The final partial batch is filled with padding rows whose masks are all 0
    (prompt_mask / valid / loss_mask and segment_ids), so every example is seen
    exactly once (skipped ones excepted, as in training) and shapes never change.
    """
    if kind not in _ITERATORS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(_ITERATORS)}")
    return _ITERATORS[kind](
        source,
        tokenizer,
        global_batch_size=global_batch_size,
        seed=0,
        process_index=process_index,
        process_count=process_count,
        num_epochs=1,
        shuffle=False,
        _pad_final=True,
        **lengths,
    )


def token_lengths(kind: str, row: dict, tokenizer, chat_template=None) -> tuple[int, int]:
    """(prompt tokens, whole sequence tokens) of one canonical row as the iterators format it, nothing cropped:
    what `seq_len` / `max_prompt_len` must hold for the row to fit (comparisons: the longest completion)."""
    template, tok = _template(chat_template, tokenizer)
    if kind == "text":
        return 0, len(_head(tok)) + len(tok.encode(_text(row["text"]))) + 1
    if kind == "prompts":
        return (n := int(prompt_example(row, tok, max_prompt_len=1 << 30, chat_template=template)["pieces"][0]
                         ["prompt_mask"].sum())), n
    if kind == "demonstrations":
        pieces = lm_example(row, tok, kind=kind, seq_len=1 << 30, chat_template=template)["pieces"]
        if not pieces:
            return 0, 0
        mask = pieces[0]["loss_mask"]
        return int(np.argmax(mask > 0)) + 1, len(mask) + 1
    prompt, longest = 0, 0
    for completion in row["completions"]:
        ids, _, body, _ = _scored_parts(row, completion, tok, template, None)
        body = tok.encode(_text(body)) if isinstance(body, str) else body
        prompt, longest = max(prompt, len(ids)), max(longest, len(ids) + len(body) + 1)
    return prompt, longest
