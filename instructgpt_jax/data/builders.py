"""TFDS builders: user JSONL / Parquet -> ArrayRecord datasets of canonical rows (no TensorFlow).

One builder per kind. Rows are stored as text, untokenised, so one built dataset serves any
tokenizer. A dataset lives at

    data_dir/instructgpt_<kind>/<fingerprint>/1.0.0/

where the fingerprint hashes the file bytes, split names, kind, max_k, the `fields` mapping and
the format version: building the same files again is a no-op, different files go to a new
directory, and a good dataset is never overwritten (TFDS writes into an `incomplete.*` directory
and renames it on success). `data_dir/instructgpt_<kind>/latest.json` names the most recent
build, which `load` reads.

Input files: JSON lines (`.jsonl`, `.json`: one object per line) or Parquet (`.parquet`; a null
column value counts as absent). `fields` renames columns, canonical name <- file column:
"prompt:question,response:answer" or {"prompt": "question", "response": "answer"}.

Shapes recognised per kind, and the canonical row each becomes (what `Source[i]` returns):

  text            {text}                                   -> {text}
  demonstrations  {prompt, response}                       -> {prompt, response, messages: []}
                  {messages: [{role, content}, ...]}       -> {prompt: "", response: "", messages}
                    (multi-turn, at least one assistant turn; `messages` wins when both shapes
                    are present, so {prompt, messages} rows such as UltraChat's are chats)
  prompts         {prompt}                                 -> {prompt, messages: []}
                  {messages} (or a message-list prompt)    -> {prompt: "", messages}
                    (a conversation to continue: trailing assistant turns are dropped; a string
                    `prompt` wins when both are present)
  comparisons     -> {prompt, messages, completions: [K str], ranks: [K int], completion_ids},
                  ranks 0 = best, equal ranks tie; messages == [] when the prompt is plain text,
                  else the prompt conversation (then prompt == ""); completion_ids: optional
                  [K [ids]], the completions' own token ids (sampled ids: the iterators use them
                  instead of re-encoding the text, which need not give them back), [] when absent:
                  {prompt, completions: [K str], ranks: [K]}
                  {prompt, chosen, rejected}: chosen / rejected strings or message lists ending
                    with the assistant's reply; turns before that reply, when given, must agree
                    and are the prompt conversation (the `prompt` field is then ignored);
                    prompt a string or a message list
                  {chosen, rejected} full transcripts (Anthropic HH-RLHF): plain text
                    "\n\nHuman: ...\n\nAssistant: ..." or message lists; the turns before the
                    last assistant turn must agree and are the prompt, the two last assistant
                    replies the completions
                  {prompt, completions: [{response, <score>}]} (UltraFeedback): K-wise ranks
                    from the scores, higher score = better = lower rank, equal scores tie (dense
                    ranks). The score of a completion is the first of these every completion
                    of the row has: `overall_score`; `fine-grained_score`; `annotations`
                    (UltraFeedback's fine-grained {aspect: {"Rating": "4", ...}}: the mean of the
                    numeric ratings, "N/A" skipped); `ratings` (a list of numbers, or
                    {aspect: number}: their mean).
Messages are {role, content} with role in system / user / assistant / tool (ShareGPT's
{from: human|gpt|system, value} is read too). Unknown fields are ignored. Every error names
file:line (JSONL, 1-based) or file:row N (Parquet, 0-based as in pandas) and the field.

Malformed rows (invalid JSON, not an object, or a row the checks above refuse) are errors, unless
`max_bad_rows` > 0: then up to that many per file are skipped, counted, and the first few recorded
(`BadRows`); the build's `metadata.json` keeps them, and `Source.stats()` reports them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from instructgpt_jax.errors import MissingFileError, UserError

KINDS = ("text", "demonstrations", "comparisons", "prompts")
_FORMAT_VERSION = "3"  # bump when validation/normalisation changes the stored rows
_SPLIT_RE = re.compile(r"^\w+$")
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
# Canonical input columns a `fields` mapping may rename, per kind.
FIELDS = {
    "text": ("text",),
    "demonstrations": ("prompt", "response", "messages"),
    "prompts": ("prompt", "messages"),
    "comparisons": ("prompt", "completions", "ranks", "chosen", "rejected", "completion_ids"),
}
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SCORE_KEYS = ("overall_score", "fine-grained_score", "annotations", "ratings")  # UltraFeedback, in order
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def parse_fields(kind: str, fields: str | Mapping[str, str] | None) -> dict[str, str]:
    """`fields` ("canonical:column,..." or {canonical: column}) -> {canonical: column}.

    Canonical names must be among FIELDS[kind]; '' / None / {} mean no renaming.
    """
    _check_kind(kind)
    if not fields:
        return {}
    if isinstance(fields, str):
        out = {}
        for item in fields.split(","):
            if not item.strip():
                continue
            canonical, sep, column = (x.strip() for x in item.partition(":"))
            if not sep or not canonical or not column:
                raise UserError(f"fields: {item.strip()!r} is not 'canonical:column' (e.g. 'prompt:question')")
            if canonical in out:
                raise UserError(f"fields: {canonical!r} is mapped twice")
            out[canonical] = column
    elif isinstance(fields, Mapping):
        out = dict(fields)
        for canonical, column in out.items():
            if not isinstance(canonical, str) or not isinstance(column, str) or not column:
                raise UserError(f"fields: {canonical!r}: {column!r} must map a name to a column name")
    else:
        raise UserError(f"fields must be a 'canonical:column,...' string or a dict, got {_type_name(fields)}")
    for canonical in out:
        if canonical not in FIELDS[kind]:
            raise UserError(f"fields: unknown field {canonical!r} for {kind} data; valid: {', '.join(FIELDS[kind])}")
    return out


class _Row:
    """One input row after renaming, with what error messages need: where it is, and which file
    column each canonical name came from."""

    def __init__(self, obj: dict, where: str, names: Mapping[str, str]):
        self.where, self.names = where, names
        self.obj = {k: v for k, v in obj.items() if k not in names}
        for canonical, column in names.items():
            if column in obj:
                self.obj[canonical] = obj[column]
        self.columns = sorted(obj)

    def __contains__(self, key) -> bool:
        return key in self.obj

    def name(self, path: str) -> str:
        """How messages quote a field path ('completions[1].response'), with the file's column when
        `fields` renamed it: "'answers[1].response' (as 'completions[1].response')"."""
        key = path.split("[", 1)[0].split(".", 1)[0]
        column = self.names.get(key, key)
        return f"'{path}'" if column == key else f"'{column}{path[len(key):]}' (as '{path}')"

    def error(self, msg: str) -> UserError:
        return UserError(f"{self.where}: {msg}")

    def get(self, key: str):
        if key not in self.obj:
            raise self.error(f"missing field {self.name(key)} (row has: {', '.join(self.columns) or 'nothing'}; "
                             f"rename columns with fields / config.data.fields, e.g. '{key}:<column>')")
        return self.obj[key]

    def string(self, key: str, value=None, path: str | None = None) -> str:
        """The row's `key` as a string; or, when `path` is given, `value` (found at `path`)."""
        value = self.get(key) if path is None else value
        if not isinstance(value, str):
            raise self.error(f"field {self.name(path or key)} must be a string, got {_type_name(value)}")
        return value

    def require_one_of(self, *shapes: tuple[str, ...]):
        """Raises naming every accepted shape when the row has none of their fields."""
        if not any(k in self.obj for shape in shapes for k in shape):
            names = " or ".join("+".join(self.name(k) for k in shape) for shape in shapes)
            raise self.error(f"missing field {names} (row has: {', '.join(self.columns) or 'nothing'}; "
                             "rename columns with fields / config.data.fields)")

    def list(self, key: str) -> list:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.error(f"field {self.name(key)} must be a list, got {_type_name(value)}")
        return value

    def messages(self, value, path: str) -> list[dict]:
        """A validated conversation [{role, content}, ...] (non-empty)."""
        if not isinstance(value, list):
            raise self.error(f"field {self.name(path)} must be a list of messages, got {_type_name(value)}")
        if not value:
            raise self.error(f"field {self.name(path)} is an empty conversation")
        out = []
        for i, m in enumerate(value):
            p = f"{path}[{i}]"
            if not isinstance(m, dict):
                raise self.error(f"field {self.name(p)} must be a message {{role, content}}, got {_type_name(m)}")
            sharegpt = m.get("role") is None and m.get("from") is not None
            role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
            if m.get(role_key) is None:
                raise self.error(f"field {self.name(p)} has no 'role'")
            role = self.string("", m[role_key], f"{p}.{role_key}")
            role = _SHAREGPT_ROLES.get(role, role) if sharegpt else role
            if role not in ROLES:
                raise self.error(f"field {self.name(p + '.' + role_key)} is {role!r}; valid roles: {', '.join(ROLES)}")
            if content_key not in m:
                raise self.error(f"field {self.name(p)} has no '{content_key}'")
            out.append({"role": role, "content": self.string("", m[content_key], f"{p}.{content_key}")})
        return out

    def prompt(self, key: str = "prompt") -> tuple[str, list]:
        """A prompt given as a string -> (text, []) or as a message list -> ("", messages)."""
        value = self.get(key)
        if isinstance(value, list):
            return "", self.messages(value, key)
        return self.string(key), []


def _ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks: the highest score gets 0, equal scores share a rank."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def _number(v) -> float | None:
    """A finite number from a number or numeric string ('N/A' and the like -> None)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def _score(row: _Row, item: dict, key: str, path: str) -> float:
    v = item[key]
    p = f"{path}.{key}"
    if key in ("overall_score", "fine-grained_score"):
        s = None if isinstance(v, str) else _number(v)
        if s is None:
            raise row.error(f"field {row.name(p)} must be a finite number, got {v!r}")
        return s
    if key == "annotations":  # {aspect: {"Rating": "4", "Rationale": ...}} or {aspect: rating}
        if not isinstance(v, dict):
            raise row.error(f"field {row.name(p)} must be a dict of aspect ratings, got {_type_name(v)}")
        values = [a.get("Rating") if isinstance(a, dict) else a for a in v.values()]
    elif isinstance(v, dict):  # ratings {aspect: number}
        values = list(v.values())
    elif isinstance(v, list):  # ratings [number, ...]
        values = v
    else:
        raise row.error(f"field {row.name(p)} must be a list or dict of ratings, got {_type_name(v)}")
    numbers = [x for x in map(_number, values) if x is not None]
    if not numbers:
        raise row.error(f"field {row.name(p)} has no numeric rating")
    return sum(numbers) / len(numbers)


def _scored_completions(row: _Row, completions: list) -> tuple[list[str], list[int]]:
    """UltraFeedback completions [{response, <score>}] -> (texts, dense ranks)."""
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            raise row.error(f"field {row.name(f'completions[{i}]')} must be a dict like the others "
                            f"({{response, overall_score}}), got {_type_name(c)}")
    present = lambda c, k: c.get(k) is not None  # noqa: E731  (Parquet structs fill absent keys with null)
    key = next((k for k in SCORE_KEYS if all(present(c, k) for c in completions)), None)
    if key is None:
        i = next(i for i, c in enumerate(completions) if not any(present(c, k) for k in SCORE_KEYS))
        raise row.error(f"field {row.name(f'completions[{i}]')} has no score; give one of {', '.join(SCORE_KEYS)}")
    texts, scores = [], []
    for i, c in enumerate(completions):
        path = f"completions[{i}]"
        if c.get("response") is None:
            raise row.error(f"field {row.name(path)} has no 'response'")
        texts.append(row.string("", c["response"], f"{path}.response"))
        scores.append(_score(row, c, key, path))
    return texts, _ranks_from_scores(scores)


def _parse_hh(row: _Row, text: str, key: str) -> list[dict]:
    """An HH-RLHF transcript "\n\nHuman: ...\n\nAssistant: ..." -> messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise row.error(f"field {row.name(key)} is not an HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...'); "
                        "give a 'prompt' field for a plain completion")
    return [{"role": "user" if who == "Human" else "assistant", "content": c}
            for who, c in zip(parts[1::2], parts[2::2])]


def _split_reply(row: _Row, messages: list[dict], key: str) -> tuple[list[dict], str]:
    """A conversation ending with the assistant's reply -> (turns before it, reply)."""
    if messages[-1]["role"] != "assistant":
        raise row.error(f"field {row.name(key)} must end with an assistant turn, "
                        f"ends with {messages[-1]['role']!r}")
    return messages[:-1], messages[-1]["content"]


def _pair(row: _Row) -> tuple[str, list, list[str]]:
    """{prompt, chosen, rejected} or HH-style {chosen, rejected} -> (prompt, messages, [chosen, rejected])."""
    values = {k: row.get(k) for k in ("chosen", "rejected")}
    transcripts = "prompt" not in row
    before, replies = {}, []
    for k, v in values.items():
        if isinstance(v, list):
            before[k], reply = _split_reply(row, row.messages(v, k), k)
        elif transcripts:
            before[k], reply = _split_reply(row, _parse_hh(row, row.string(k), k), k)
        else:
            before[k], reply = [], row.string(k)
        replies.append(reply)
    if before["chosen"] != before["rejected"]:
        what = "transcripts" if transcripts else "message lists"
        raise row.error(f"{row.name('chosen')} and {row.name('rejected')} {what} differ before their last "
                        "assistant turn (they must share the prompt)")
    if before["chosen"]:
        return "", before["chosen"], replies
    if transcripts:
        raise row.error(f"{row.name('chosen')} has no turn before its last assistant turn, and there is no "
                        f"{row.name('prompt')} field")
    prompt, messages = row.prompt()
    return prompt, messages, replies


def _comparison(row: _Row, max_k: int) -> dict:
    if "completions" in row:
        if "chosen" in row or "rejected" in row:
            raise row.error("give either 'completions' or 'chosen'+'rejected', not both")
        completions = row.list("completions")
        if any(isinstance(c, dict) for c in completions):
            if "ranks" in row:
                raise row.error(f"field {row.name('ranks')} given with scored completions; give one or the other")
            completions, ranks = _scored_completions(row, completions)
        else:
            ranks = row.list("ranks")
            for i, c in enumerate(completions):
                row.string("", c, f"completions[{i}]")
            for i, r in enumerate(ranks):
                if isinstance(r, bool) or not isinstance(r, int):  # bool is an int subclass
                    raise row.error(f"field {row.name(f'ranks[{i}]')} must be an integer, got {_type_name(r)}")
            if len(ranks) != len(completions):
                raise row.error(f"{row.name('ranks')} has {len(ranks)} entries but {row.name('completions')} "
                                f"has {len(completions)}")
        prompt, messages = row.prompt()
    elif "chosen" in row or "rejected" in row:
        prompt, messages, completions = _pair(row)
        ranks = [0, 1]
    else:
        raise row.error("missing field 'completions' (with 'ranks', or scored {response, overall_score} dicts), "
                        f"or 'chosen' and 'rejected' (row has: {', '.join(row.columns) or 'nothing'})")
    if len(completions) < 2:
        raise row.error(f"a comparison needs at least 2 completions, got {len(completions)}")
    if len(completions) > max_k:
        raise row.error(f"{len(completions)} completions exceed max_k={max_k}")
    if any(not -(2**31) <= r < 2**31 for r in ranks):
        raise row.error(f"field {row.name('ranks')} values must fit in int32")
    ids = row.list("completion_ids") if "completion_ids" in row else []
    if ids and (len(ids) != len(completions) or not all(
            isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x) for x in ids)):
        raise row.error(f"field {row.name('completion_ids')} must be one list of token ids per completion "
                        f"({len(completions)})")
    return {"prompt": prompt, "messages": messages, "completions": completions, "ranks": ranks,
            "completion_ids": ids}


def validate_row(kind: str, obj, where: str, max_k: int = 9, fields: Mapping[str, str] | None = None) -> dict:
    """Checks one parsed row and returns its canonical form (see the module docstring).

    `where` ("file:line" / "file:row N") prefixes every error; `fields` is the parsed
    {canonical: column} renaming (`parse_fields`). Raises UserError.
    """
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    row = _Row(obj, where, fields or {})
    if kind == "text":
        return {"text": row.string("text")}
    if kind == "demonstrations":
        row.require_one_of(("prompt", "response"), ("messages",))
        if "messages" in row:
            messages = row.messages(row.get("messages"), "messages")
            if not any(m["role"] == "assistant" for m in messages):
                raise row.error(f"field {row.name('messages')} has no assistant turn (nothing to learn from)")
            return {"prompt": "", "response": "", "messages": messages}
        return {"prompt": row.string("prompt"), "response": row.string("response"), "messages": []}
    if kind == "prompts":
        row.require_one_of(("prompt",), ("messages",))
        if "prompt" in row or "messages" not in row:
            prompt, messages = row.prompt()
            key = "prompt"
        else:
            prompt, messages = "", row.messages(row.get("messages"), "messages")
            key = "messages"
        while messages and messages[-1]["role"] == "assistant":  # continue the conversation, not the reply
            messages = messages[:-1]
            if not messages:
                raise row.error(f"field {row.name(key)} has only assistant turns; a prompt needs a turn to answer")
        return {"prompt": prompt, "messages": messages}
    assert kind == "comparisons", kind
    return _comparison(row, max_k)


def _file_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise UserError(f"{path}: unknown data file type {ext or '(no extension)'!r}; valid: .jsonl, .json "
                        "(JSON lines), .parquet")
    return EXTENSIONS[ext]


def _jsonl_objects(path: str) -> Iterator[tuple[int, str, object]]:
    """(line number, "file:line", parsed object); a line that does not parse comes as its UserError,
    so that `read_rows` can skip it like any other malformed row."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark (Windows tools) is not data
            except UnicodeDecodeError as e:
                yield n, where, UserError(f"{where}: not valid UTF-8 ({e})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                hint = ("; the file must hold one JSON object per line (JSON lines)"
                        if n == 1 and line.strip() in ("[", "{") else "")
                obj = UserError(f"{where}: invalid JSON ({e}){hint}")
            yield n, where, obj


def _parquet_objects(path: str) -> Iterator[tuple[int, str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    n = 0
    for batch in batches:
        for obj in batch.to_pylist():
            # A column is null where the row has no value: treat it as absent.
            yield n, f"{path}:row {n}", {k: v for k, v in obj.items() if v is not None}
            n += 1


class BadRows:
    """The malformed rows of one file skipped under `limit` (config.data.max_bad_rows): how many, and
    the first few 'file:line: reason'. Limit 0: the first malformed row is the error, unchanged."""

    EXAMPLES = 5

    def __init__(self, path: str, limit: int = 0):
        self.path, self.limit, self.count, self.examples = path, limit, 0, []

    def skip(self, error: UserError) -> None:
        """Counts one malformed row; raises once there are more than `limit`."""
        self.count += 1
        if self.limit == 0:
            raise error
        if self.count > self.limit:
            raise UserError(f"{self.path}: more than config.data.max_bad_rows={self.limit} malformed rows "
                            f"(malformed row {self.count}: {error})")
        if len(self.examples) < self.EXAMPLES:
            self.examples.append(str(error))


def read_rows(path: str, kind: str, max_k: int = 9, fields: Mapping[str, str] | None = None,
              bad: BadRows | None = None) -> Iterator[tuple[int, dict]]:
    """Yields (key, canonical row) from a JSONL (key = line number, blank lines skipped) or
    Parquet (key = row index) file; `fields` is the parsed {canonical: column} renaming.
    A malformed row raises UserError, or with `bad` is counted there and skipped (up to its limit)."""
    objects = _parquet_objects(path) if _file_type(path) == "parquet" else _jsonl_objects(path)
    for n, where, obj in objects:
        try:
            if isinstance(obj, UserError):  # a line that is not JSON
                raise obj
            row = validate_row(kind, obj, where, max_k, fields)
        except UserError as e:
            if bad is None:
                raise
            bad.skip(e)
            continue
        yield n, row


def _encode(row: dict) -> dict:
    """Canonical row -> TFDS example: the conversation as a JSON string ('' when there is none)."""
    for key in ("messages", "completion_ids"):
        if key in row:
            row = dict(row, **{key: json.dumps(row[key], ensure_ascii=False) if row[key] else ""})
    return row


def _features(kind: str) -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    if kind == "text":
        spec = {"text": text()}
    elif kind == "prompts":
        spec = {"prompt": text(), "messages": text()}
    elif kind == "demonstrations":
        spec = {"prompt": text(), "response": text(), "messages": text()}
    else:
        spec = {
            "prompt": text(),
            "messages": text(),  # the prompt conversation as JSON, '' when the prompt is plain text
            "completions": tfds.features.Sequence(text()),
            "ranks": tfds.features.Sequence(np.int32),
            "completion_ids": text(),  # the completions' token ids as JSON (sampled ids), '' when absent
        }
    return tfds.features.FeaturesDict(spec)


class _RowsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: one split per JSONL / Parquet file. Not registered globally, so
    re-importing the module (notebooks) never clashes in the TFDS registry."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Raw text rows from user JSONL.",
        "2.0.0": "JSONL or Parquet, renamed columns, chat / HH / UltraFeedback shapes; 'messages' as JSON.",
    }
    KIND: str = ""

    def __init__(self, *, splits: Mapping[str, str] | None = None, max_k: int = 9,
                 fields: Mapping[str, str] | None = None, max_bad_rows: int = 0, **kwargs):
        self._splits = dict(splits or {})
        self._max_k = max_k
        self._fields = dict(fields or {})
        self._max_bad_rows = max_bad_rows
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=_features(self.KIND),
            description=f"instructgpt_jax {self.KIND} rows (max_k={self._max_k}).",
            disable_shuffling=True,  # keep file order: index i is the i-th row
            metadata=tfds.core.MetadataDict(),  # the malformed rows skipped, per split (metadata.json)
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(path) for name, path in self._splits.items()}

    def _generate_examples(self, path):
        bad = BadRows(path, self._max_bad_rows)
        for n, row in read_rows(path, self.KIND, self._max_k, self._fields, bad):
            yield n, _encode(row)  # the line number / row index is a unique key


class TextBuilder(_RowsBuilder, skip_registration=True):
    name = "instructgpt_text"
    KIND = "text"


class DemonstrationsBuilder(_RowsBuilder, skip_registration=True):
    name = "instructgpt_demonstrations"
    KIND = "demonstrations"


class ComparisonsBuilder(_RowsBuilder, skip_registration=True):
    name = "instructgpt_comparisons"
    KIND = "comparisons"


class PromptsBuilder(_RowsBuilder, skip_registration=True):
    name = "instructgpt_prompts"
    KIND = "prompts"


BUILDERS = {b.KIND: b for b in (TextBuilder, DemonstrationsBuilder, ComparisonsBuilder, PromptsBuilder)}


def _check_kind(kind: str):
    if kind not in BUILDERS:
        raise UserError(f"unknown data kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def fingerprint(kind: str, splits: Mapping[str, str], max_k: int = 9,
                fields: str | Mapping[str, str] | None = None, max_bad_rows: int = 0) -> str:
    """Content hash naming the build: file bytes + split names + kind + max_k + fields + max_bad_rows
    (which rows are kept) + format version."""
    mapping = json.dumps(sorted(parse_fields(kind, fields).items()))
    h = hashlib.sha256(f"{_FORMAT_VERSION}|{kind}|{max_k}|{mapping}|{max_bad_rows}".encode())
    for name in sorted(splits):
        h.update(f"|{name}|".encode())
        with open(splits[name], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS announces every build on stdout and warns about 'custom data configurations' (ours are
    content fingerprints, by design); keep both out of the stage's progress output."""
    tfds_logger = logging.getLogger("absl")
    level = tfds_logger.level
    tfds_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds_logger.setLevel(level)


def build(kind: str, splits: Mapping[str, str], data_dir: str, *, max_k: int = 9,
          fields: str | Mapping[str, str] | None = None, max_bad_rows: int = 0) -> str:
    """Builds (or reuses) the `kind` dataset from {split_name: path}, paths JSONL or Parquet.

    `fields` renames columns ("prompt:question,response:answer" or {"prompt": "question"};
    canonical names per kind in FIELDS). Returns the dataset directory. Every row is validated
    before anything is written; errors (UserError) name file:line or file:row N and the field.
    `max_bad_rows` > 0 skips up to that many malformed rows per file (counted in the build's
    metadata and logged as a warning); one more is an error. Safe to call from several processes
    at once, but prefer building on process 0 followed by a barrier.
    """
    _check_kind(kind)
    mapping = parse_fields(kind, fields)
    if isinstance(max_bad_rows, bool) or not isinstance(max_bad_rows, int) or max_bad_rows < 0:
        raise UserError(f"config.data.max_bad_rows={max_bad_rows!r} must be an integer >= 0")
    if not splits:
        raise UserError(f"build: no {kind} splits given")
    for name, path in splits.items():
        if not _SPLIT_RE.match(name):
            raise UserError(f"split name {name!r} must be letters, digits or '_'")
        if not os.path.isfile(path):
            raise MissingFileError(f"{kind} split {name!r}: no such file {path}")
        _file_type(path)
    config = tfds.core.BuilderConfig(name=fingerprint(kind, splits, max_k, mapping, max_bad_rows))
    with _quiet_tfds():
        builder = BUILDERS[kind](splits=splits, max_k=max_k, fields=mapping, max_bad_rows=max_bad_rows,
                                 data_dir=data_dir, config=config, file_format="array_record")
    done = builder.data_path / "dataset_info.json"
    if not done.exists():
        skipped = {}
        for name, path in splits.items():  # validate everything before TFDS writes
            bad = BadRows(path, max_bad_rows)
            if sum(1 for _ in read_rows(path, kind, max_k, mapping, bad)) == 0:
                if bad.count:
                    raise UserError(f"{path}: every row is malformed ({bad.count} rows skipped under "
                                    f"config.data.max_bad_rows={max_bad_rows}; the first: {bad.examples[0]})")
                raise UserError(f"{path}: no examples (empty file, or only blank lines)")
            skipped[name] = {"file": os.fspath(path), "count": bad.count, "examples": bad.examples}
        builder.info.metadata["bad_rows"] = skipped  # written with the dataset (metadata.json)
        tfds.disable_progress_bar()  # the stage's own progress bar is the one to watch
        with tempfile.TemporaryDirectory() as dl_dir, _quiet_tfds():
            try:
                builder.download_and_prepare(download_dir=dl_dir)
            except OSError:
                if not done.exists():  # not a concurrent build of the same content
                    raise
    pointer = os.path.join(data_dir, BUILDERS[kind].name, "latest.json")
    _atomic_write(
        pointer,
        json.dumps(
            {"config": config.name, "max_k": max_k, "fields": mapping, "max_bad_rows": max_bad_rows,
             "splits": {k: os.fspath(v) for k, v in splits.items()}}, indent=1
        ),
    )
    for name, path in splits.items():  # also when the build is reused: every run says what it lacks
        count, examples = _bad_rows(os.fspath(builder.data_path), name, path)
        if count:
            absl_logging.warning("%s: skipped %d malformed rows (config.data.max_bad_rows=%d), e.g. %s",
                                 path, count, max_bad_rows, examples[0])
    return os.fspath(builder.data_path)


def _bad_rows(dataset_dir: str, split: str, file: str | None = None) -> tuple[int, list[str]]:
    """(count, first few 'file:line: reason') of the malformed rows the build skipped in `split`,
    the examples naming `file` when given (the same bytes may have been built from another path)."""
    path = os.path.join(dataset_dir, "metadata.json")
    if not os.path.exists(path):  # built before bad rows were recorded: none were skipped
        return 0, []
    with open(path) as f:
        info = json.load(f).get("bad_rows", {}).get(split)
    if not info:
        return 0, []
    old = info["file"]
    examples = [file + e[len(old):] if file and e.startswith(old) else e for e in info["examples"]]
    return int(info["count"]), examples


def _atomic_write(path: str, text: str):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Source:
    """Random-access view of one split: `len(src)`, `src[i]` -> the canonical row (module
    docstring): str fields decoded, `messages` a list of {role, content} dicts ([] when the
    prompt is plain text), ranks an int32 array. Works with `grain.MapDataset.source`.

    `path` is the dataset directory, `file` the user's file it was built from (None when unknown),
    `bad_rows` / `bad_row_examples` the malformed rows the build skipped in that file."""

    def __init__(self, data_source, kind: str, path: str, split: str, file: str | None = None,
                 bad_rows: int = 0, bad_row_examples: list[str] | None = None):
        self._ds, self.kind, self.path, self.split = data_source, kind, path, split
        self.file, self.bad_rows, self.bad_row_examples = file, bad_rows, list(bad_row_examples or [])

    def stats(self) -> dict:
        """What the build skipped, for a stage's data statistics."""
        return {"bad_rows": self.bad_rows, "bad_row_examples": list(self.bad_row_examples)}

    def __len__(self) -> int:
        return len(self._ds)

    def _decode(self, row: dict) -> dict:
        out = {}
        for k, v in row.items():
            if k in ("messages", "completion_ids"):
                v = v.decode("utf-8") if isinstance(v, bytes) else v
                v = json.loads(v) if v else []
            elif isinstance(v, bytes):
                v = v.decode("utf-8")
            elif k == "completions":
                v = [c.decode("utf-8") for c in v]
            elif k == "ranks":
                v = np.asarray(v, np.int32)
            out[k] = v
        return out

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows")
        return self._decode(self._ds[i % len(self)])

    def __getitems__(self, indices):
        return [self._decode(r) for r in self._ds.__getitems__(list(indices))]

    def __repr__(self):
        return f"Source(kind={self.kind!r}, split={self.split!r}, len={len(self)}, path={self.path!r})"


def load(kind: str, data_dir: str, split: str, *, config: str | None = None, max_k: int | None = None) -> Source:
    """Opens `split` of the latest `kind` build in `data_dir` (or of build `config`).

    `split` takes TFDS's split syntax too, e.g. 'train[:-5%]' or 'train[-5%:]'.
    `max_k`, when given, must match the build's (it is part of the fingerprint).
    """
    _check_kind(kind)
    base = os.path.join(data_dir, BUILDERS[kind].name)
    latest = {}
    if config is None:
        pointer = os.path.join(base, "latest.json")
        if not os.path.exists(pointer):
            raise MissingFileError(f"no {kind} dataset built in {data_dir} (missing {pointer}); run build() first")
        with open(pointer) as f:
            latest = json.load(f)
        config = latest["config"]
        if max_k is not None and latest["max_k"] != max_k:
            raise UserError(
                f"the latest {kind} build in {data_dir} has max_k={latest['max_k']}, "
                f"not {max_k}; rebuild with max_k={max_k}"
            )
    path = os.path.join(base, config, str(_RowsBuilder.VERSION))
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        raise MissingFileError(f"no {kind} dataset at {path} (built by an older version? build it again)")
    builder = tfds.builder_from_directory(path)
    names = sorted(builder.info.splits.keys())
    base_splits = re.findall(r"(?:^|\+)\s*(\w+)", split)
    for base_split in base_splits:
        if base_split not in names:
            raise UserError(f"{kind} dataset at {path} has no split {base_split!r}; valid splits: {', '.join(names)}")
    # The user's file, for messages: latest.json names the files of the latest build (ours when config was None).
    file = latest.get("splits", {}).get(base_splits[0]) if len(base_splits) == 1 else None
    count, examples = _bad_rows(path, base_splits[0], file) if len(base_splits) == 1 else (0, [])
    return Source(builder.as_data_source(split), kind, path, split, file, count, examples)
