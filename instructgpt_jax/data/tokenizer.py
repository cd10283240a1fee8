"""SentencePiece tokenizer with fixed special ids (PAD=0, UNK=1, BOS=2, EOS=3).

PAD is never EOS: padding is masked everywhere while EOS is a real, learned token
(the RM reads its reward there and PPO stops on it).
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_SPECIAL = {"pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}


class Tokenizer:
    """Thin wrapper over `SentencePieceProcessor`; ids are plain python ints."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._proto = model_proto
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        found = {k: getattr(self._sp, k)() for k in _SPECIAL}
        if found != _SPECIAL:
            raise ValueError(
                f"tokenizer {path or '<in-memory>'} has special ids {found}; "
                f"instructgpt_jax needs {_SPECIAL} (train it with train_tokenizer or "
                "pass pad_id=0 unk_id=1 bos_id=2 eos_id=3 to SentencePieceTrainer)"
            )

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto, path=os.fspath(path))
        except RuntimeError as e:  # SentencePiece's own parse error
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from e

    # Pickled as the model bytes, so grain worker processes can carry it.
    def __getstate__(self):
        return {"proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["path"])

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    pad_id = property(lambda self: PAD_ID)
    unk_id = property(lambda self: UNK_ID)
    bos_id = property(lambda self: BOS_ID)
    eos_id = property(lambda self: EOS_ID)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS are added."""
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: PAD/BOS dropped, everything from the first EOS on cut."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(i)
        return self._sp.decode(out)

    def __repr__(self):
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def train_tokenizer(
    texts: Iterable[str], model_path: str, vocab_size: int, seed: int = 0, model_type: str = "bpe"
) -> Tokenizer:
    """Trains a SentencePiece model on in-memory `texts` and writes `model_path`.

    Deterministic for a given (texts, vocab_size, seed). Byte fallback is on, so
    nothing maps to UNK; digits are split; normalisation is the identity, so
    `decode(encode(s)) == s` exactly. The vocabulary may come out smaller than
    `vocab_size` on a small corpus (size models from `tokenizer.vocab_size`); it
    needs at least 4 specials + 256 bytes + the corpus' distinct characters.
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
    tok = Tokenizer(buf.getvalue(), path=os.fspath(model_path))
    # Atomic write: a crash never leaves a truncated model at model_path.
    d = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_tokenizer_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, model_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return tok
