"""Tokenizer backends against `transformers.AutoTokenizer` on real-shaped tokenizers built here (no downloads):
a Llama-2-style SentencePiece model (unk 0, bos 1, eos 2, no pad) and byte-level BPEs with GPT-2 / Llama-3 /
Qwen2-style special tokens, configs and chat templates."""

import io
import json
import os
import pickle
import random

import pytest
import sentencepiece as spm

from instructgpt_jax.data import chat
from instructgpt_jax.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer,
                                            train_tokenizer)

transformers = pytest.importorskip("transformers")

_rng = random.Random(0)
_WORDS = "the cat sat on a mat while 12 dogs ran past quickly and slowly héllo wörld naïve café 你好".split()
CORPUS = [" ".join(_rng.choice(_WORDS) for _ in range(_rng.randint(2, 12))) for _ in range(300)]
TEXTS = ["the cat sat", "x  two  spaces\nand\ta newline ", "ü€😀 Ω 98765 你好", "", "trailing  ", "a\n\n\nb"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _added(tokens: dict) -> dict:
    return {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for c, i in tokens.items()}


def _write(d, name, obj):
    with open(os.path.join(d, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


def make_llama2(d):
    """SentencePiece BPE as Llama-2 ships it: unk 0, bos 1, eos 2, no pad, dummy prefix, byte fallback."""
    os.makedirs(d, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2,
        num_threads=1)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    tok = lambda c: {"__type": "AddedToken", "content": c, "lstrip": False, "normalized": False,  # noqa: E731
                     "rstrip": False, "single_word": False}
    _write(d, "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": tok("<s>"), "eos_token": tok("</s>"),
        "unk_token": tok("<unk>"), "pad_token": None, "legacy": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "tokenizer_class": "LlamaTokenizer", "sp_model_kwargs": {},
        "added_tokens_decoder": _added({"<unk>": 0, "<s>": 1, "</s>": 2}),
        "chat_template": chat.LLAMA2})
    return d


def make_bpe(d, style):
    """A byte-level BPE trained here, its special tokens appended after the learned vocabulary (as the
    real checkpoints have them), with tokenizer_config.json / generation_config.json of `style`."""
    from tokenizers import Regex, Tokenizer as TK, decoders, models, pre_tokenizers, processors, trainers

    os.makedirs(d, exist_ok=True)
    tk = TK(models.BPE())
    if style == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    specials = {"gpt2": ["<|endoftext|>"],
                "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[style]
    tk.add_special_tokens(specials)
    ids = {s: tk.token_to_id(s) for s in specials}
    if style == "llama3":
        bos = "<|begin_of_text|>"
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, ids[bos])])])
        config = {"bos_token": bos, "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
                  "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True}
        _write(d, "generation_config.json", {"bos_token_id": ids[bos],
                                             "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]})
    elif style == "qwen2":
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "chat_template": chat.CHATML, "tokenizer_class": "PreTrainedTokenizerFast", "errors": "replace",
                  "split_special_tokens": False, "add_prefix_space": False}
        _write(d, "generation_config.json", {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                                             "pad_token_id": ids["<|endoftext|>"]})
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "add_prefix_space": False, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024}
    config["added_tokens_decoder"] = _added(ids)
    _write(d, "tokenizer_config.json", config)
    tk.save(os.path.join(d, "tokenizer.json"))
    return d, ids


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    out = {"llama2": (make_llama2(str(root / "llama2")), {"<unk>": 0, "<s>": 1, "</s>": 2})}
    for style in ("gpt2", "llama3", "qwen2"):
        out[style] = make_bpe(str(root / style), style)
    return out


@pytest.fixture(scope="module")
def hf_tokenizers(dirs):
    return {k: transformers.AutoTokenizer.from_pretrained(d) for k, (d, _) in dirs.items()}


def expected_specials(style, ids):
    """(bos, eos, eos_ids, pad, add_bos) each checkpoint should give."""
    if style == "llama2":
        return 1, 2, {2}, 0, True  # no pad: the unk token
    if style == "gpt2":
        return ids["<|endoftext|>"], ids["<|endoftext|>"], {ids["<|endoftext|>"]}, 0, False  # no unk but EOS: id 0
    if style == "llama3":  # no pad: the lowest special that is neither EOS nor BOS
        return (ids["<|begin_of_text|>"], ids["<|eot_id|>"], {ids["<|eot_id|>"], ids["<|end_of_text|>"]},
                ids["<|reserved_special_token_0|>"], True)
    # Qwen: its pad <|endoftext|> is an EOS, so not the pad: <|im_start|>.
    return None, ids["<|im_end|>"], {ids["<|im_end|>"], ids["<|endoftext|>"]}, ids["<|im_start|>"], False


STYLES = ["llama2", "gpt2", "llama3", "qwen2"]


@pytest.mark.parametrize("style", STYLES)
def test_ids_specials_and_roundtrip_match_transformers(style, dirs, hf_tokenizers):
    d, ids = dirs[style]
    tok, hf = load_tokenizer(d), hf_tokenizers[style]
    assert isinstance(tok, SentencePieceTokenizer if style == "llama2" else HFTokenizer)
    bos, eos, eos_ids, pad, add_bos = expected_specials(style, ids)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == (bos, eos, eos_ids, pad, add_bos)
    assert tok.pad_id not in tok.eos_ids and tok.vocab_size == len(hf)
    assert tok.chat_template == hf.chat_template
    specials = [s for s in ids if s != "<unk>"]
    texts = TEXTS + [f"a{specials[-1]}b c", f"{specials[0]}x {specials[-1]} y"]
    for t in texts:
        want = hf(t)["input_ids"]
        assert [tok.bos_id] * tok.add_bos + tok.encode(t) == want, t
        assert tok.encode_with_offsets(t)[0] == tok.encode(t)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    # decode stops at any EOS and drops BOS / special pads.
    head = [bos] if add_bos else []
    for e in eos_ids:
        assert tok.decode(head + tok.encode("the cat") + [e] + tok.encode("dog")) == "the cat"
    assert tok.decode(tok.encode("the") + [tok.pad_id] * (tok.pad_id in tok.special_ids)) == "the"
    # Pickling keeps everything.
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(texts[-1]) == tok.encode(texts[-1]) and again.eos_ids == tok.eos_ids
    assert (again.pad_id, again.bos_id, again.add_bos, again.chat_template) == (pad, bos, add_bos, tok.chat_template)


def test_sentencepiece_leading_whitespace_follows_sentencepiece(dirs):
    """transformers 5 converts a bare .model to a Metaspace BPE that drops SentencePiece's doubled '▁' before
    leading whitespace; we keep SentencePiece's own ids (what the model was trained on; Llama-2's shipped
    tokenizer.json does the same)."""
    d, _ = dirs["llama2"]
    tok = load_tokenizer(os.path.join(d, "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    for t in [" the cat", "  two", "\tx"]:
        assert tok.encode(t) == sp.encode(t) and tok.decode(tok.encode(t)) == t


@pytest.mark.parametrize("style", STYLES)
def test_save_and_load_back(style, dirs, hf_tokenizers, tmp_path):
    tok = load_tokenizer(dirs[style][0]).with_eos_ids([5])  # an extra EOS survives the export
    tok.save(str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert type(back) is type(tok)
    for name in ("bos_id", "eos_id", "eos_ids", "pad_id", "add_bos", "chat_template", "vocab_size"):
        assert getattr(back, name) == getattr(tok, name), name
    assert 5 in back.eos_ids
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for t in TEXTS[:3]:
        assert hf(t)["input_ids"] == hf_tokenizers[style](t)["input_ids"]


def test_own_tokenizer_keeps_its_ids_and_exports(tmp_path):
    tok = train_tokenizer(CORPUS, str(tmp_path / "own" / "tokenizer.model"), 400)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (0, 1, 2, 3, {3}, True)
    assert isinstance(Tokenizer.load(tok.path), SentencePieceTokenizer) and tok.chat_template is None
    tok.save(str(tmp_path / "export"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    for t in ["the cat sat", "ü€😀 Ω 98765", "x  y\n"]:
        assert hf(t)["input_ids"] == [2] + tok.encode(t)
    assert load_tokenizer(str(tmp_path / "export")).pad_id == 0


def test_loader_paths_and_errors(dirs, tmp_path):
    d, ids = dirs["qwen2"]
    by_file = load_tokenizer(os.path.join(d, "tokenizer.json"))  # configs next to it are read
    assert by_file.eos_ids == load_tokenizer(d).eos_ids and by_file.chat_template
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.model"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text(open(os.path.join(d, "tokenizer.json")).read())
    with pytest.raises(ValueError, match="no EOS token"):
        load_tokenizer(str(bare))
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="eos_token '<\\|nope\\|>' is not in the vocabulary"):
        load_tokenizer(str(bare))
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ValueError, match="junk.model: not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
