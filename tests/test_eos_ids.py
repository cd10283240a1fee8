"""EOS ids come from the checkpoint: the tokenizer files' eos token plus every `eos_token_id` of
generation_config.json and config.json. They all end assistant turns (chat templates, SFT loss mask) and stop
sampling; PAD is never one of them. Tokenizers are built here (SentencePiece / tokenizers trained on a small
corpus), nothing is downloaded."""

import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from instructgpt_jax.data import chat
from instructgpt_jax.data import iterators
from instructgpt_jax.data.tokenizer import load_tokenizer

from test_hf_e2e import GEMMA_TEMPLATE
from test_tokenizers import CORPUS, _write, make_bpe

EOS, BOS, PAD = 1, 2, 0  # Gemma's ids


def make_gemma_user_defined(d, generation_eos=None, config_eos=None):
    """A Gemma-shaped SentencePiece directory whose <start_of_turn> / <end_of_turn> are user-defined pieces,
    not control tokens, and that tokenizer_config.json does not mark special: only generation_config.json
    (`generation_eos`) or config.json (`config_eos`) makes <end_of_turn> an EOS. Returns (dir, its id)."""
    os.makedirs(d, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe", pad_id=PAD, eos_id=EOS,
        bos_id=BOS, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    eot = sp.PieceToId("<end_of_turn>")
    assert not sp.IsControl(eot)  # the case at hand: an ordinary (user-defined) piece
    _write(d, "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "GemmaTokenizer",
        "chat_template": GEMMA_TEMPLATE})
    if generation_eos is not None:
        _write(d, "generation_config.json", {"bos_token_id": BOS, "eos_token_id": generation_eos(eot),
                                             "pad_token_id": PAD})
    if config_eos is not None:
        _write(d, "config.json", {"model_type": "gemma", "eos_token_id": config_eos(eot)})
    return d, eot


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    d, eot = make_gemma_user_defined(str(tmp_path_factory.mktemp("gemma")), generation_eos=lambda e: [EOS, e])
    return load_tokenizer(d), eot


def test_generation_config_eos_ids_join_the_tokenizers_eos(gemma):
    tok, eot = gemma
    assert tok.eos_id == EOS and tok.eos_ids == {EOS, eot}
    assert tok.pad_id == PAD and tok.pad_id not in tok.eos_ids
    assert tok.encode("<end_of_turn>") == [eot]
    assert tok.decode(tok.encode("the cat") + [eot] + tok.encode("sat")) == "the cat"  # a stop id


def test_config_json_eos_ids_count_too(tmp_path):
    d, eot = make_gemma_user_defined(str(tmp_path / "list"), config_eos=lambda e: [EOS, e])
    assert load_tokenizer(d).eos_ids == {EOS, eot}
    d, eot = make_gemma_user_defined(str(tmp_path / "int"), config_eos=lambda e: e)  # an int, not a list
    assert load_tokenizer(d).eos_ids == {EOS, eot}
    # Both files: the union; a PAD listed among them is no EOS (another pad is chosen).
    d, eot = make_gemma_user_defined(str(tmp_path / "both"), generation_eos=lambda e: [EOS, PAD],
                                     config_eos=lambda e: e)
    tok = load_tokenizer(d)
    assert tok.eos_ids == {EOS, PAD, eot} and tok.pad_id not in tok.eos_ids


def test_template_ending_turns_with_a_user_defined_eos_is_accepted(gemma, tmp_path):
    tok, eot = gemma
    template = chat.resolve("auto", tok)
    assert template is not None and template.source == GEMMA_TEMPLATE
    assert chat.end_of_turn_ids(template, tok) == {eot}
    assert chat.with_end_of_turn(tok, template) is tok  # already an EOS: sampling stops there
    # Without the checkpoint's generation_config.json, <end_of_turn> is an ordinary piece: refused.
    d, _ = make_gemma_user_defined(str(tmp_path / "no_generation_config"))
    plain = load_tokenizer(d)
    assert plain.eos_ids == {EOS}
    with pytest.raises(ValueError, match=r"ends with '<end_of_turn>\\n', which holds no special token"):
        chat.end_of_turn_ids(chat.resolve("auto", plain), plain)


def test_sft_example_ends_the_assistant_turn_with_that_eos_and_trains_it(gemma):
    tok, eot = gemma
    messages = [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "sat on a mat"},
                {"role": "user", "content": "and the dogs?"}, {"role": "assistant", "content": "ran past"}]
    rows = [{"prompt": "", "response": "", "messages": messages}]
    (b,) = list(iterators.lm_batches(rows, tok, kind="demonstrations", global_batch_size=1, seed=0, seq_len=96,
                                     pack=False, shuffle=False, num_epochs=1, chat_template="auto"))
    targets, mask = b["targets"][0], b["loss_mask"][0]
    n = int(b["segment_ids"][0].sum())
    ends = np.flatnonzero(targets[:n] == eot)
    assert len(ends) == 4  # two user turns, two assistant turns
    assert [bool(mask[k]) for k in ends] == [False, True, False, True]  # only the assistant turns' end is trained
    assert all(not mask[k + 1] for k in ends[1::2] if k + 1 < n)  # the "\n" after it is not
    # The trained spans: each reply, then its end of turn, and nothing else.
    spans = np.split(np.flatnonzero(mask[:n]), np.flatnonzero(np.diff(np.flatnonzero(mask[:n])) > 1) + 1)
    assert [tok.decode(targets[s[:-1]]) for s in spans] == ["sat on a mat", "ran past"]
    assert [int(targets[s[-1]]) for s in spans] == [eot, eot]


def test_saved_tokenizer_keeps_them_and_adds_a_configs_new_ones(gemma, tmp_path):
    tok, eot = gemma
    out = str(tmp_path / "export")
    tok.save(out)
    again = load_tokenizer(out)
    assert again.eos_ids == {EOS, eot} and again.pad_id == PAD
    # An export next to a model config listing one more EOS (e.g. generation_config.json edited by hand).
    mask = tok.token_to_id("<mask>")
    _write(out, "generation_config.json", {"eos_token_id": [EOS, eot, mask]})
    assert load_tokenizer(out).eos_ids == {EOS, eot, mask}


def test_tokenizer_json_with_a_non_special_added_turn_token(tmp_path):
    """The same with a tokenizers tokenizer.json: a plain (non-special) added <|im_end|> listed in config.json."""
    import tokenizers

    d, ids = make_bpe(str(tmp_path / "bpe"), "gpt2")
    tk = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    tk.add_tokens([tokenizers.AddedToken("<|im_start|>", special=False), tokenizers.AddedToken("<|im_end|>",
                                                                                                special=False)])
    tk.save(os.path.join(d, "tokenizer.json"))
    im_end, eot = tk.token_to_id("<|im_end|>"), ids["<|endoftext|>"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"eos_token_id": [eot, im_end]}, f)
    tok = load_tokenizer(d)
    assert tok.eos_ids == {eot, im_end} and tok.pad_id not in tok.eos_ids
    template = chat.resolve("chatml", tok)
    assert chat.end_of_turn_ids(template, tok) == {im_end}
    ids_, mask = chat.sft_ids(template, [{"role": "user", "content": "the cat?"},
                                         {"role": "assistant", "content": "sat"}], tok)
    trained = [i for i, m in zip(ids_, mask) if m]
    assert trained[-1] == im_end and tok.decode(trained[:-1]) == "sat"
