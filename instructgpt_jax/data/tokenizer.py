"""One tokenizer interface, two backends: SentencePiece (`tokenizer.model`) and Hugging Face
`tokenizers` (`tokenizer.json`: byte-level BPE of GPT-2 / Llama-3 / Qwen / Pythia, Metaspace BPE...).

    tok = load_tokenizer(path)   # a .model file, a tokenizer.json file, or a directory
    tok.encode(text) -> list[int]            no specials added
    tok.encode_batch(texts) -> list[list[int]]
    tok.decode(ids) -> str                   stops at the first id in eos_ids; special tokens dropped
    tok.bos_id (int | None)  tok.eos_id (int)  tok.eos_ids (frozenset)  tok.pad_id (int)  tok.unk_id
    tok.add_bos (sequences start with BOS)   tok.chat_template (str | None)   tok.vocab_size
    tok.save(directory)                      the files `load_tokenizer(directory)` reads back

Special tokens follow the checkpoint, read (first hit wins) from our own `instructgpt_tokenizer.json`
(written by `save`), `tokenizer_config.json` (bos/eos/pad/unk tokens, add_bos_token, added_tokens_decoder,
chat_template), `special_tokens_map.json`, `config.json` / `generation_config.json` (*_token_id), and
the backend (SentencePiece's own special ids; a `tokenizer.json` post-processor that adds BOS).
`eos_ids` = the primary EOS + every `eos_token_id` of generation_config.json and config.json (each an
int or a list; next to our own export too), e.g. Llama-3's <|eot_id|> and <|end_of_text|>, Qwen's <|im_end|>
and <|endoftext|>, Gemma's <end_of_turn> (an ordinary SentencePiece piece, an EOS only by generation_config.json).

PAD is never an EOS: padding is masked by segment ids, while an EOS is a learned token the RM reads
and sampling stops on. When the checkpoint has no pad token, or its pad token is an EOS, the pad is,
in this order: the unk token if it is not an EOS; else the lowest-id special token that is neither an
EOS nor the BOS; else the BOS if it is not an EOS; else id 0 if it is not an EOS; else the lowest id
that is not an EOS. (GPT-2: no unk apart from <|endoftext|> = EOS, no other special: id 0, '!'.)
`decode` drops the pad only when it is a special token, so such a pad never eats real text.

Text that contains a special token's string (e.g. '<|im_end|>' or '</s>') is encoded to that token,
as `transformers` does by default; after such a token SentencePiece adds no dummy-prefix space
(transformers' non-legacy behaviour; `"legacy": true` in tokenizer_config.json restores it).

The project's own tokenizer (`train_tokenizer`) is a SentencePiece model with PAD 0, UNK 1, BOS 2,
EOS 3. Tokenizers pickle as their file bytes plus the resolved metadata (grain may pickle them).
"""

from __future__ import annotations

import abc

import bisect
import dataclasses
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # the project's own SentencePiece models (train_tokenizer)
META_FILE = "instructgpt_tokenizer.json"  # our resolved special ids, written by save()
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json",
                 "chat_template.jinja", META_FILE)


@dataclasses.dataclass
class _Meta:
    """Resolved special-token facts shared by both backends (ids are ints or None)."""

    bos_id: int | None
    eos_id: int
    eos_ids: frozenset
    pad_id: int
    unk_id: int | None
    add_bos: bool
    chat_template: str | None
    special_ids: frozenset  # dropped by decode
    configs: dict  # file name -> parsed content (str for .jinja), copied by save()


def _token_content(value) -> str | None:
    """A token in a config: 'str', {'content': 'str', ...} (AddedToken) or None."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _read_configs(directory: str) -> dict:
    out = {}
    for name in _CONFIG_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if name.endswith(".jinja"):
            out[name] = text
            continue
        try:
            out[name] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    return out


def _template_of(configs: dict) -> str | None:
    """The chat template: chat_template.jinja, else tokenizer_config's chat_template (a string, or a
    list of {name, template} from which 'default' is taken)."""
    if "chat_template.jinja" in configs:
        return configs["chat_template.jinja"]
    t = configs.get("tokenizer_config.json", {}).get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


class Tokenizer(abc.ABC):
    """The interface; `load(path)` returns a `SentencePieceTokenizer` or an `HFTokenizer`."""

    backend = "?"
    path: str | None = None
    _meta: _Meta

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Same as `load_tokenizer(path)` (kept for existing callers)."""
        return load_tokenizer(path)

    # --- resolved special tokens (see module docstring) ---
    bos_id = property(lambda self: self._meta.bos_id)
    eos_id = property(lambda self: self._meta.eos_id)
    eos_ids = property(lambda self: self._meta.eos_ids)
    pad_id = property(lambda self: self._meta.pad_id)
    unk_id = property(lambda self: self._meta.unk_id)
    add_bos = property(lambda self: self._meta.add_bos)
    chat_template = property(lambda self: self._meta.chat_template)
    special_ids = property(lambda self: self._meta.special_ids)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS are added (special-token strings in it become those tokens)."""
        return self.encode_with_offsets(text)[0]

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, through the library's batch path."""
        ...

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, starts): starts[i] is the character index in `text` where token i begins (byte-level
        tokens of one character share its index)."""
        ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        ...

    @abc.abstractmethod
    def id_to_token(self, i: int) -> str:
        ...

    @abc.abstractmethod
    def _decode_kept(self, ids: list[int]) -> str:
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: everything from the first id in `eos_ids` on is cut; BOS, special pads and
        other special tokens are dropped, and so are ids past the vocabulary (a model's embedding table
        is often padded beyond its tokenizer, and an undertrained model may sample those rows)."""
        out = []
        n = self.vocab_size
        for i in ids:
            i = int(i)
            if i in self._meta.eos_ids:
                break
            if i not in self._meta.special_ids and 0 <= i < n:
                out.append(i)
        return self._decode_kept(out)

    def with_eos_ids(self, ids: Iterable[int]) -> "Tokenizer":
        """A copy whose `eos_ids` also hold `ids` (e.g. a chat template's end-of-turn token); self when
        nothing is new. The pad is re-chosen if it became an EOS."""
        new = frozenset(int(i) for i in ids) - self._meta.eos_ids
        if not new:
            return self
        out = self.__class__.__new__(self.__class__)
        out.__setstate__(self.__getstate__())
        eos_ids = self._meta.eos_ids | new
        pad = self._meta.pad_id
        if pad in eos_ids:
            pad = _choose_pad(None, eos_ids, self._meta.bos_id, self._meta.unk_id, self._meta.special_ids,
                              self.vocab_size)
        out._meta = dataclasses.replace(self._meta, eos_ids=eos_ids, pad_id=pad)
        return out

    # --- files ---
    @abc.abstractmethod
    def _backend_files(self) -> dict[str, bytes]:
        ...

    def save(self, directory: str) -> list[str]:
        """Writes the backend file (tokenizer.model or tokenizer.json), tokenizer_config.json (the
        checkpoint's, with our bos/eos/pad/unk, add_bos_token and chat_template; loadable by
        `transformers`), special_tokens_map.json / chat_template.jinja when the source had them, and
        META_FILE (the exact special ids, so `load_tokenizer(directory)` gives back this tokenizer).
        Returns the paths written. `generation_config.json` / `config.json` belong to the model export:
        their eos_token_id should be `sorted(eos_ids)` with `eos_id` first."""
        os.makedirs(directory, exist_ok=True)
        m = self._meta
        files = dict(self._backend_files())
        cfg = dict(m.configs.get("tokenizer_config.json", {}))
        name = lambda i: None if i is None else self.id_to_token(i)  # noqa: E731
        cfg.update(bos_token=name(m.bos_id), eos_token=name(m.eos_id), pad_token=name(m.pad_id),
                   add_bos_token=m.add_bos, add_eos_token=False)
        if m.unk_id is not None:
            cfg["unk_token"] = name(m.unk_id)
        if self.backend == "sentencepiece" and "tokenizer_class" not in cfg and self._is_bpe():
            cfg["tokenizer_class"] = "LlamaTokenizer"  # transformers converts a BPE .model with it
        if m.chat_template is not None and "chat_template.jinja" not in m.configs:
            cfg["chat_template"] = m.chat_template
        files["tokenizer_config.json"] = (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode()
        if "special_tokens_map.json" in m.configs:
            files["special_tokens_map.json"] = json.dumps(m.configs["special_tokens_map.json"], indent=2).encode()
        if "chat_template.jinja" in m.configs:
            files["chat_template.jinja"] = m.chat_template.encode()
        meta = {"backend": self.backend, "bos_id": m.bos_id, "eos_id": m.eos_id, "eos_ids": sorted(m.eos_ids),
                "pad_id": m.pad_id, "unk_id": m.unk_id, "add_bos": m.add_bos}
        files[META_FILE] = (json.dumps(meta, indent=1) + "\n").encode()
        written = []
        for fname, data in files.items():
            path = os.path.join(directory, fname)
            _atomic_write(path, data)
            written.append(path)
        return written

    def _is_bpe(self) -> bool:
        return False

    def __repr__(self):
        m = self._meta
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, bos={m.bos_id}, "
                f"eos={sorted(m.eos_ids)}, pad={m.pad_id}, add_bos={m.add_bos})")


def _atomic_write(path: str, data: bytes):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_tokenizer_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _choose_pad(pad, eos_ids, bos, unk, special_ids, vocab_size) -> int:
    """The rule of the module docstring."""
    if pad is not None and pad not in eos_ids:
        return pad
    if unk is not None and unk not in eos_ids:
        return unk
    others = sorted(i for i in special_ids if i not in eos_ids and i != bos)
    if others:
        return others[0]
    if bos is not None and bos not in eos_ids:
        return bos
    return next(i for i in range(vocab_size + len(eos_ids) + 1) if i not in eos_ids)


def _resolve(configs: dict, where: str, *, lookup, default_bos, default_eos, default_pad, default_unk,
             default_add_bos, backend_special: set[int], vocab_size: int) -> _Meta:
    """Special ids from the checkpoint's files (see module docstring); `lookup(str) -> id | None`."""
    tc = configs.get("tokenizer_config.json", {})
    stm = configs.get("special_tokens_map.json", {})
    gen = configs.get("generation_config.json", {})
    model_cfg = configs.get("config.json", {})
    saved = configs.get(META_FILE)

    def token(name: str, default):
        for src, file in ((tc, "tokenizer_config.json"), (stm, "special_tokens_map.json")):
            if name + "_token" in src:
                content = _token_content(src[name + "_token"])
                if content is None:
                    return None
                i = lookup(content)
                if i is None:
                    raise ValueError(f"{where}: {file} {name}_token {content!r} is not in the vocabulary")
                return i
        for src in (gen, model_cfg):
            ids = _as_ids(src.get(name + "_token_id"))
            if ids:
                return ids[0]
        return default

    special = set(backend_special)
    for i, d in tc.get("added_tokens_decoder", {}).items():
        if isinstance(d, dict) and d.get("special", False):
            special.add(int(i))
    model_eos = [*_as_ids(gen.get("eos_token_id")), *_as_ids(model_cfg.get("eos_token_id"))]
    if saved is not None:  # our own export: exact ids, plus any EOS a model config next to it lists
        bos, eos, pad, unk = saved["bos_id"], saved["eos_id"], saved["pad_id"], saved["unk_id"]
        eos_ids, add_bos = frozenset([eos, *saved["eos_ids"], *model_eos]), bool(saved["add_bos"])
        pad = _choose_pad(pad, eos_ids, bos, unk, special - {bos}, vocab_size)
    else:
        bos, unk = token("bos", default_bos), token("unk", default_unk)
        eos = token("eos", default_eos)
        if eos is None:
            raise ValueError(f"{where}: no EOS token (set eos_token in tokenizer_config.json or eos_token_id in "
                             "generation_config.json)")
        eos_ids = frozenset([eos, *model_eos])
        pad = _choose_pad(token("pad", default_pad), eos_ids, bos, unk, special - {bos}, vocab_size)
        add_bos = tc.get("add_bos_token", default_add_bos)
        add_bos = bool(add_bos) and bos is not None
    special |= {i for i in (bos, unk) if i is not None}
    if pad in eos_ids:
        raise ValueError(f"{where}: pad id {pad} is also an EOS id {sorted(eos_ids)}; PAD must never be an EOS")
    special |= eos_ids
    return _Meta(bos_id=bos, eos_id=eos, eos_ids=frozenset(eos_ids), pad_id=pad, unk_id=unk, add_bos=add_bos,
                 chat_template=_template_of(configs), special_ids=frozenset(special), configs=configs)


# ---------------------------------------------------------------------------
# SentencePiece backend.


def _char_starts(text: str) -> list[int]:
    """Byte offset of each character of `text` in its UTF-8 encoding."""
    out, b = [], 0
    for c in text:
        out.append(b)
        b += len(c.encode("utf-8"))
    return out


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with whatever special ids it has (Llama-2: unk 0, bos 1, eos 2, no pad)."""

    backend = "sentencepiece"

    def __init__(self, model_proto: bytes, path: str | None = None, configs: dict | None = None):
        self._proto = model_proto
        self.path = path
        self._configs = configs or {}
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        sp = self._sp
        n = sp.vocab_size()
        ids = lambda i: None if i < 0 else i  # noqa: E731  (SentencePiece: -1 = none)
        tc = self._configs.get("tokenizer_config.json", {})
        # Tokens added on top of the model (ids past its vocabulary are decoded from their content).
        self._added = {int(i): d["content"] for i, d in tc.get("added_tokens_decoder", {}).items()
                       if isinstance(d, dict) and d.get("content")}
        self._extra = {i: c for i, c in self._added.items() if i >= n}
        control = {i for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i)}
        self._meta = _resolve(self._configs, path or "<in-memory SentencePiece model>", lookup=self.token_to_id,
                              default_bos=ids(sp.bos_id()), default_eos=ids(sp.eos_id()),
                              default_pad=ids(sp.pad_id()), default_unk=ids(sp.unk_id()),
                              default_add_bos=True, backend_special=control, vocab_size=self.vocab_size)
        # Strings split out of the text before SentencePiece sees it (it never parses control symbols).
        split = {sp.IdToPiece(i): i for i in control} | {c: i for i, c in self._added.items()}
        split = {s: i for s, i in split.items() if s}
        self._split_ids = split
        self._split_re = re.compile("|".join(re.escape(s) for s in sorted(split, key=len, reverse=True)))
        self._legacy = bool(tc.get("legacy", False))
        # byte-fallback pieces <0xNN>: id -> byte, and byte -> id (for U+FFFD, see _decode_kept)
        self._byte_of = {i: int(sp.IdToPiece(i)[3:5], 16) for i in range(n) if sp.IsByte(i)}
        self._byte_id = {b: i for i, b in self._byte_of.items()}
        self._sp_after_special = self._sp
        if not self._legacy:
            from sentencepiece import sentencepiece_model_pb2

            m = sentencepiece_model_pb2.ModelProto()
            m.ParseFromString(model_proto)
            if m.normalizer_spec.add_dummy_prefix:
                m.normalizer_spec.add_dummy_prefix = False
                self._sp_after_special = spm.SentencePieceProcessor(model_proto=m.SerializeToString())

    def __getstate__(self):
        return {"proto": self._proto, "path": self.path, "configs": self._configs, "meta": self._meta}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["path"], state["configs"])
        self._meta = state["meta"]

    @property
    def vocab_size(self) -> int:
        return max([self._sp.vocab_size(), *(i + 1 for i in self._extra)])

    def _is_bpe(self) -> bool:
        from sentencepiece import sentencepiece_model_pb2

        m = sentencepiece_model_pb2.ModelProto()
        m.ParseFromString(self._proto)
        return m.trainer_spec.model_type == m.trainer_spec.BPE

    def token_to_id(self, token: str) -> int | None:
        for i, c in self._added.items():
            if c == token:
                return i
        i = self._sp.PieceToId(token)
        return i if self._sp.IdToPiece(i) == token else None

    def id_to_token(self, i: int) -> str:
        return self._extra[i] if i in self._extra else self._sp.IdToPiece(int(i))

    def _segments(self, text: str):
        """(start, piece_of_text, special id or None) in order."""
        pos = 0
        for m in self._split_re.finditer(text) if self._split_ids else ():
            if m.start() > pos:
                yield pos, text[pos:m.start()], None
            yield m.start(), m.group(), self._split_ids[m.group()]
            pos = m.end()
        if pos < len(text) or not text:
            yield pos, text[pos:], None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids, starts = [], []
        for start, piece, special in self._segments(text):
            if special is not None:
                ids.append(special)
                starts.append(start)
                continue
            if not piece:
                continue
            sp = self._sp if start == 0 else self._sp_after_special
            byte_starts = _char_starts(piece)
            for p in sp.encode(piece, return_type="proto").pieces:
                ids.append(p.id)
                starts.append(start + max(bisect.bisect_right(byte_starts, p.begin) - 1, 0))
        return ids, starts

    def encode(self, text: str) -> list[int]:
        if not self._split_ids or self._split_re.search(text) is None:
            return self._sp.encode(text)
        return self.encode_with_offsets(text)[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        plain = [i for i, t in enumerate(texts) if not self._split_ids or self._split_re.search(t) is None]
        out: list = [None] * len(texts)
        for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain]) if plain else []):
            out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self.encode_with_offsets(t)[0]
        return out

    def _replace_invalid_bytes(self, ids: list[int]) -> list[int]:
        """A run of byte-fallback pieces that is not valid UTF-8 decodes to one U+FFFD per byte, as transformers'
        (`tokenizers`) ByteFallback decoder does; SentencePiece alone would keep the run's valid bytes."""
        fffd = [self._byte_id.get(b) for b in "\ufffd".encode()]
        if not self._byte_of or None in fffd:
            return ids
        out, run = [], []
        for i in list(ids) + [None]:
            if i is not None and i in self._byte_of:
                run.append(i)
                continue
            if run:
                try:
                    bytes(self._byte_of[j] for j in run).decode("utf-8")
                    out += run
                except UnicodeDecodeError:
                    out += fffd * len(run)
                run = []
            if i is not None:
                out.append(i)
        return out

    def _decode_kept(self, ids: list[int]) -> str:
        ids = self._replace_invalid_bytes(ids)
        if not self._extra:
            return self._sp.decode(ids)
        parts, run = [], []
        for i in ids:
            if i in self._extra:
                parts += [self._sp.decode(run), self._extra[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts + [self._sp.decode(run)])

    def _backend_files(self) -> dict[str, bytes]:
        return {"tokenizer.model": self._proto}


# ---------------------------------------------------------------------------
# Hugging Face `tokenizers` backend.


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json (byte-level BPE included)."""

    backend = "tokenizers"

    def __init__(self, tokenizer_json: str, path: str | None = None, configs: dict | None = None):
        import tokenizers

        self._json = tokenizer_json
        self.path = path
        self._configs = configs or {}
        self._tk = tk = tokenizers.Tokenizer.from_str(tokenizer_json)
        tc = self._configs.get("tokenizer_config.json", {})
        # Tokens only tokenizer_config.json knows about are added, as transformers does.
        for i, d in sorted(tc.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if isinstance(d, dict) and d.get("content") and tk.token_to_id(d["content"]) is None:
                tok = tokenizers.AddedToken(d["content"], single_word=d.get("single_word", False),
                                            lstrip=d.get("lstrip", False), rstrip=d.get("rstrip", False),
                                            normalized=d.get("normalized", False), special=d.get("special", False))
                tk.add_tokens([tok])
        special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        # BOS is added iff the post-processor puts it in front (Llama-3's TemplateProcessing) unless
        # tokenizer_config.json says otherwise.
        with_specials = tk.encode("a", add_special_tokens=True).ids
        plain = tk.encode("a", add_special_tokens=False).ids
        first = with_specials[0] if len(with_specials) > len(plain) else None
        self._meta = _resolve(self._configs, path or "<in-memory tokenizer.json>", lookup=tk.token_to_id,
                              default_bos=first, default_eos=None, default_pad=None, default_unk=None,
                              default_add_bos=first is not None, backend_special=special,
                              vocab_size=self.vocab_size)

    def __getstate__(self):
        return {"json": self._json, "path": self.path, "configs": self._configs, "meta": self._meta}

    def __setstate__(self, state):
        self.__init__(state["json"], state["path"], state["configs"])
        self._meta = state["meta"]

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self._tk.id_to_token(int(i))

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        enc = self._tk.encode(text, add_special_tokens=False)
        return list(enc.ids), [s for s, _ in enc.offsets]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        fast = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)  # no offsets: faster
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def _decode_kept(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=False)

    def _backend_files(self) -> dict[str, bytes]:
        return {"tokenizer.json": self._json.encode("utf-8")}


# ---------------------------------------------------------------------------
# Loading.


def load_tokenizer(path: str) -> Tokenizer:
    """A `.model` file (SentencePiece), a `tokenizer.json` file, or a directory holding one of them
    (tokenizer.json preferred, as transformers does): a Hugging Face checkpoint or one of our exports.
    Config files next to a file named tokenizer.model / tokenizer.json are read too."""
    path = os.fspath(path)
    if os.path.isdir(path):
        directory = path
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                file = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    elif os.path.isfile(path):
        file, directory = path, None
        if os.path.basename(path) in ("tokenizer.json", "tokenizer.model"):
            directory = os.path.dirname(os.path.abspath(path))
    else:
        raise FileNotFoundError(f"tokenizer {path!r} does not exist")
    configs = _read_configs(directory) if directory else {}
    with open(file, "rb") as f:
        data = f.read()
    if file.endswith(".json"):
        try:
            return HFTokenizer(data.decode("utf-8"), path=file, configs=configs)
        except Exception as e:  # tokenizers' own parse error
            if isinstance(e, ValueError) and str(e).startswith(file):
                raise
            raise ValueError(f"{file}: not a tokenizers tokenizer.json ({e})") from e
    try:
        spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:  # SentencePiece's own parse error
        raise ValueError(f"{file}: not a SentencePiece model ({e})") from e
    return SentencePieceTokenizer(data, path=file, configs=configs)


def train_tokenizer(
    texts: Iterable[str], model_path: str, vocab_size: int, seed: int = 0, model_type: str = "bpe"
) -> Tokenizer:
    """Trains a SentencePiece model on in-memory `texts` and writes `model_path`.

    Special ids PAD 0, UNK 1, BOS 2, EOS 3. Deterministic for a given (texts, vocab_size, seed). Byte
    fallback is on, so nothing maps to UNK; digits are split; normalisation is the identity, so
    `decode(encode(s)) == s` exactly. The vocabulary may come out smaller than `vocab_size` on a small
    corpus (size models from `tokenizer.vocab_size`); it needs at least 4 specials + 256 bytes + the
    corpus' distinct characters.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty texts to train on")
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            byte_fallback=True,
            split_digits=True,
            character_coverage=0.9995,  # rarer characters go to byte pieces
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            hard_vocab_limit=False,  # tiny corpora may not fill the vocabulary
            max_sentence_length=1 << 16,
            num_threads=1,  # single-threaded training is reproducible
            minloglevel=2,
        )
    except RuntimeError as e:
        m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if m:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for this corpus: byte fallback "
                f"needs at least {m.group(2)} pieces (4 specials + 256 bytes + "
                "characters)"
            ) from e
        raise
    tok = SentencePieceTokenizer(buf.getvalue(), path=os.fspath(model_path))
    _atomic_write(model_path, buf.getvalue())  # a crash never leaves a truncated model at model_path
    return tok


__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer", "train_tokenizer",
           "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID", "META_FILE"]
