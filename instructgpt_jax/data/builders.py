"""TFDS builders: user JSONL -> ArrayRecord datasets of raw text (no TensorFlow).

One builder per kind. Rows are stored as text, untokenised, so one built dataset
serves any tokenizer. A dataset lives at

    data_dir/instructgpt_<kind>/<fingerprint>/1.0.0/

where the fingerprint hashes the JSONL bytes, split names, kind and max_k: building
the same files again is a no-op, different files go to a new directory, and a good
dataset is never overwritten (TFDS writes into an `incomplete.*` directory and
renames it on success). `data_dir/instructgpt_<kind>/latest.json` names the most
recent build, which `load` reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

KINDS = ("text", "demonstrations", "comparisons", "prompts")
_FORMAT_VERSION = "1"  # bump when validation/normalisation changes the stored rows
_SPLIT_RE = re.compile(r"^\w+$")


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _str_field(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise ValueError(f"{where}: missing field '{key}'")
    if not isinstance(obj[key], str):
        raise ValueError(f"{where}: field '{key}' must be a string, got {_type_name(obj[key])}")
    return obj[key]


def validate_row(kind: str, obj, where: str, max_k: int = 9) -> dict:
    """Checks one parsed JSONL row and returns it normalised for storage.

    `where` ("file:line") prefixes every error. Pairwise comparisons
    {prompt, chosen, rejected} become K=2 with ranks [0, 1]. Unknown fields are ignored.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    if kind == "text":
        return {"text": _str_field(obj, "text", where)}
    prompt = _str_field(obj, "prompt", where)
    if kind == "prompts":
        return {"prompt": prompt}
    if kind == "demonstrations":
        return {"prompt": prompt, "response": _str_field(obj, "response", where)}
    assert kind == "comparisons", kind
    if "completions" in obj or "ranks" in obj:
        if "chosen" in obj or "rejected" in obj:
            raise ValueError(f"{where}: give either 'completions'+'ranks' or 'chosen'+'rejected', not both")
        for key in ("completions", "ranks"):
            if key not in obj:
                raise ValueError(f"{where}: missing field '{key}'")
            if not isinstance(obj[key], list):
                raise ValueError(f"{where}: field '{key}' must be a list, got {_type_name(obj[key])}")
        completions, ranks = obj["completions"], obj["ranks"]
        for i, c in enumerate(completions):
            if not isinstance(c, str):
                raise ValueError(f"{where}: field 'completions[{i}]' must be a string, got {_type_name(c)}")
        for i, r in enumerate(ranks):
            if isinstance(r, bool) or not isinstance(r, int):  # bool is an int subclass
                raise ValueError(f"{where}: field 'ranks[{i}]' must be an integer, got {_type_name(r)}")
        if len(ranks) != len(completions):
            raise ValueError(f"{where}: 'ranks' has {len(ranks)} entries but 'completions' has {len(completions)}")
    elif "chosen" in obj or "rejected" in obj:
        completions = [_str_field(obj, "chosen", where), _str_field(obj, "rejected", where)]
        ranks = [0, 1]
    else:
        raise ValueError(f"{where}: missing field 'completions' (with 'ranks'), or 'chosen' and 'rejected'")
    if len(completions) < 2:
        raise ValueError(f"{where}: a comparison needs at least 2 completions, got {len(completions)}")
    if len(completions) > max_k:
        raise ValueError(f"{where}: {len(completions)} completions exceed max_k={max_k}")
    if any(not -(2**31) <= r < 2**31 for r in ranks):
        raise ValueError(f"{where}: field 'ranks' values must fit in int32")
    return {"prompt": prompt, "completions": completions, "ranks": ranks}


def read_jsonl(path: str, kind: str, max_k: int = 9) -> Iterator[tuple[int, dict]]:
    """Yields (line_number, normalised row); blank lines are skipped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from None
            yield n, validate_row(kind, obj, where, max_k)


def _features(kind: str) -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    if kind == "text":
        spec = {"text": text()}
    elif kind == "prompts":
        spec = {"prompt": text()}
    elif kind == "demonstrations":
        spec = {"prompt": text(), "response": text()}
    else:
        spec = {
            "prompt": text(),
            "completions": tfds.features.Sequence(text()),
            "ranks": tfds.features.Sequence(np.int32),
        }
    return tfds.features.FeaturesDict(spec)


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: one split per JSONL file. Not registered globally, so
    re-importing the module (notebooks) never clashes in the TFDS registry."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw text rows from user JSONL."}
    KIND: str = ""

    def __init__(self, *, splits: Mapping[str, str] | None = None, max_k: int = 9, **kwargs):
        self._splits = dict(splits or {})
        self._max_k = max_k
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=_features(self.KIND),
            description=f"instructgpt_jax {self.KIND} rows (max_k={self._max_k}).",
            disable_shuffling=True,
        )  # keep file order: index i is the i-th row

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(path) for name, path in self._splits.items()}

    def _generate_examples(self, path):
        for n, row in read_jsonl(path, self.KIND, self._max_k):
            yield n, row  # the line number is a unique key


class TextBuilder(_JsonlBuilder, skip_registration=True):
    name = "instructgpt_text"
    KIND = "text"


class DemonstrationsBuilder(_JsonlBuilder, skip_registration=True):
    name = "instructgpt_demonstrations"
    KIND = "demonstrations"


class ComparisonsBuilder(_JsonlBuilder, skip_registration=True):
    name = "instructgpt_comparisons"
    KIND = "comparisons"


class PromptsBuilder(_JsonlBuilder, skip_registration=True):
    name = "instructgpt_prompts"
    KIND = "prompts"


BUILDERS = {b.KIND: b for b in (TextBuilder, DemonstrationsBuilder, ComparisonsBuilder, PromptsBuilder)}


def _check_kind(kind: str):
    if kind not in BUILDERS:
        raise ValueError(f"unknown data kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def fingerprint(kind: str, splits: Mapping[str, str], max_k: int = 9) -> str:
    """Content hash naming the build: JSONL bytes + split names + kind + max_k."""
    h = hashlib.sha256(f"{_FORMAT_VERSION}|{kind}|{max_k}".encode())
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


def build(kind: str, splits: Mapping[str, str], data_dir: str, *, max_k: int = 9) -> str:
    """Builds (or reuses) the `kind` dataset from {split_name: jsonl_path}.

    Returns the dataset directory. Every row is validated before anything is
    written; errors name file:line and the field. Safe to call from several
    processes at once, but prefer building on process 0 followed by a barrier.
    """
    _check_kind(kind)
    if not splits:
        raise ValueError("build: no splits given")
    for name, path in splits.items():
        if not _SPLIT_RE.match(name):
            raise ValueError(f"split name {name!r} must be letters, digits or '_'")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{kind} split {name!r}: no such file {path}")
    config = tfds.core.BuilderConfig(name=fingerprint(kind, splits, max_k))
    with _quiet_tfds():
        builder = BUILDERS[kind](splits=splits, max_k=max_k, data_dir=data_dir, config=config,
                                 file_format="array_record")
    done = builder.data_path / "dataset_info.json"
    if not done.exists():
        for name, path in splits.items():  # validate everything before TFDS writes
            if sum(1 for _ in read_jsonl(path, kind, max_k)) == 0:
                raise ValueError(f"{path}: no examples (only blank lines)")
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
            {"config": config.name, "max_k": max_k, "splits": {k: os.fspath(v) for k, v in splits.items()}}, indent=1
        ),
    )
    return os.fspath(builder.data_path)


def _atomic_write(path: str, text: str):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Source:
    """Random-access view of one split: `len(src)`, `src[i]` -> dict with str fields
    decoded and ranks as an int32 array. Works with `grain.MapDataset.source`."""

    def __init__(self, data_source, kind: str, path: str, split: str):
        self._ds, self.kind, self.path, self.split = data_source, kind, path, split

    def __len__(self) -> int:
        return len(self._ds)

    def _decode(self, row: dict) -> dict:
        out = {}
        for k, v in row.items():
            if isinstance(v, bytes):
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
    if config is None:
        pointer = os.path.join(base, "latest.json")
        if not os.path.exists(pointer):
            raise FileNotFoundError(f"no {kind} dataset built in {data_dir} (missing {pointer}); run build() first")
        with open(pointer) as f:
            latest = json.load(f)
        config = latest["config"]
        if max_k is not None and latest["max_k"] != max_k:
            raise ValueError(
                f"the latest {kind} build in {data_dir} has max_k={latest['max_k']}, "
                f"not {max_k}; rebuild with max_k={max_k}"
            )
    path = os.path.join(base, config, str(_JsonlBuilder.VERSION))
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        raise FileNotFoundError(f"no {kind} dataset at {path}")
    builder = tfds.builder_from_directory(path)
    names = sorted(builder.info.splits.keys())
    for base_split in re.findall(r"(?:^|\+)\s*(\w+)", split):
        if base_split not in names:
            raise ValueError(f"{kind} dataset at {path} has no split {base_split!r}; valid splits: {', '.join(names)}")
    return Source(builder.as_data_source(split), kind, path, split)
