"""Chat templates: rendering and ids against transformers' apply_chat_template, the assistant-only loss mask,
end-of-turn EOS, and their use in the iterators."""

import json
import os
import shutil

import numpy as np
import pytest

from instructgpt_jax.data import chat
from instructgpt_jax.data import iterators as pipeline
from instructgpt_jax.data.tokenizer import load_tokenizer
from instructgpt_jax.errors import UserError

from test_tokenizers import make_bpe, make_llama2

transformers = pytest.importorskip("transformers")

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "the cat?"},
    {"role": "assistant", "content": "sat on a mat"},
    {"role": "user", "content": "and the dogs?"},
    {"role": "assistant", "content": "ran past"},
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    out = {style: make_bpe(str(root / style), style)[0] for style in ("qwen2", "llama3")}
    out["llama2"] = make_llama2(str(root / "llama2"))
    # A base model's tokenizer: EOS <|endoftext|> only, so <|im_end|> is not yet an EOS.
    base = str(root / "qwen2_base")
    shutil.copytree(out["qwen2"], base)
    os.remove(os.path.join(base, "generation_config.json"))
    cfg = json.load(open(os.path.join(base, "tokenizer_config.json")))
    cfg.update(eos_token="<|endoftext|>", pad_token=None)
    json.dump(cfg, open(os.path.join(base, "tokenizer_config.json"), "w"))
    out["qwen2_base"] = base
    return out


@pytest.fixture(scope="module")
def toks(dirs):
    return {k: load_tokenizer(d) for k, d in dirs.items()}


def hf_ids(hf, messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_ids_equal_apply_chat_template(style, dirs, toks):
    tok, hf = toks[style], transformers.AutoTokenizer.from_pretrained(dirs[style])
    template = chat.resolve("auto", tok)
    assert template.name == "tokenizer" and template.source == hf.chat_template
    msgs = CONV[:2] + [{"role": "assistant", "content": "naïve café 你好  ok\n"}] + CONV[3:]
    ids, mask = chat.sft_ids(template, msgs, tok)
    assert ids == hf_ids(hf, msgs) and len(mask) == len(ids)
    assert chat.prompt_ids(template, msgs[:4], tok) == hf_ids(hf, msgs[:4], add_generation_prompt=True)
    assert chat.render(template, msgs, tok) == hf.apply_chat_template(msgs, tokenize=False)


def test_assistant_only_mask_exact_tokens(toks):
    tok = toks["qwen2"]
    ids, mask = chat.sft_ids(chat.resolve("chatml"), CONV, tok)
    im_end, nl = tok.token_to_id("<|im_end|>"), tok.encode("\n")
    masked = [i for i, m in zip(ids, mask) if m]
    assert masked == tok.encode("sat on a mat") + [im_end] + tok.encode("ran past") + [im_end]
    # Each span starts right after the assistant header and stops at <|im_end|>: its "\n" is not trained.
    header = tok.encode("<|im_start|>assistant\n")
    starts = [k for k in range(1, len(mask)) if mask[k] and not mask[k - 1]]
    ends = [k for k in range(len(mask) - 1) if mask[k] and not mask[k + 1]] + [len(mask) - 2]
    assert len(starts) == 2
    for s in starts:
        assert ids[s - len(header) : s] == header
    for e in ends:
        assert ids[e] == im_end and ids[e + 1 : e + 1 + len(nl)] == nl and not mask[e + 1]
    # The generation prompt ends with the assistant header.
    p = chat.prompt_ids(chat.resolve("chatml"), CONV[:2], tok)
    assert p[-len(header) :] == header and p[: -len(header)] == ids[: len(p) - len(header)]
    # Scoring: prompt up to the header, response up to its end-of-turn token.
    prompt, body, end = chat.scoring_ids(chat.resolve("chatml"), CONV[:2], "sat on a mat", tok)
    assert prompt == p and body == tok.encode("sat on a mat") and end == im_end


def test_llama2_template_on_sentencepiece(dirs, toks):
    tok = toks["llama2"]
    template = chat.resolve("llama2")
    text = chat.render(template, CONV, tok)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nthe cat? [/INST] sat on a mat </s>"
                    "<s>[INST] and the dogs? [/INST] ran past </s>")
    ids, mask = chat.sft_ids(template, CONV, tok)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 2  # the template's BOS, not doubled
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == "sat on a mat " and masked.count(tok.eos_id) == 2  # ' sat on a mat </s>' x 2
    assert ids == hf_ids(transformers.AutoTokenizer.from_pretrained(dirs["llama2"]), CONV)
    assert chat.end_of_turn_ids(template, tok) == {tok.eos_id}


def test_end_of_turn_becomes_eos(toks, tmp_path):
    base = toks["qwen2_base"]
    im_end, eot = base.token_to_id("<|im_end|>"), base.token_to_id("<|endoftext|>")
    assert base.eos_ids == {eot} and base.pad_id != eot
    with_eot = chat.with_end_of_turn(base, chat.resolve("chatml"))
    assert with_eot.eos_ids == {eot, im_end} and base.eos_ids == {eot}  # a copy
    assert with_eot.pad_id not in with_eot.eos_ids
    assert chat.with_end_of_turn(with_eot, chat.resolve("chatml")) is with_eot
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="holds no special token of this tokenizer, so sampling could never stop"):
        chat.with_end_of_turn(base, chat.resolve(str(plain)))


def test_resolve_names_and_errors(toks, tmp_path):
    qwen, llama2_own = toks["qwen2"], toks["qwen2_base"]
    assert chat.resolve("none", qwen) is None and chat.resolve(None, qwen) is None
    assert chat.resolve("", qwen).source == qwen.chat_template
    for name in ("chatml", "llama2", "llama3"):
        assert chat.resolve(name).source == chat.BUILTIN[name]
    f = tmp_path / "t.jinja"
    f.write_text(chat.CHATML)
    assert chat.resolve(str(f)) == chat.resolve("chatml")
    no_template = type("T", (), {"chat_template": None})()
    assert chat.resolve("auto", no_template) is None
    with pytest.raises(ValueError, match=r"chat_template='chatlm'.*valid choices: 'auto', 'none', 'chatml', 'llama2'"):
        chat.resolve("chatlm", llama2_own)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="Jinja syntax error"):
        chat.resolve(str(bad))
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        chat.render(chat.resolve("llama2"), [{"role": "assistant", "content": "x"}], qwen)


def test_prefix_error_names_the_row(toks, tmp_path):
    f = tmp_path / "last.jinja"  # renders the last message differently: no span can be found
    f.write_text("{% for m in messages %}{% if loop.last and loop.index > 2 %}LAST {% endif %}{{ m['content'] }}"
                 "<|im_end|>{% endfor %}")  # a two-turn probe passes, longer conversations do not
    row = {"prompt": "the cat?", "response": "sat", "messages": CONV}
    with pytest.raises(ValueError, match=r"row with prompt 'the cat\?'.*renders the conversation up to message 2"):
        pipeline.lm_example(row, toks["qwen2"], kind="demonstrations", seq_len=64, chat_template=str(f))


def test_iterators_render_templates(toks):
    tok = toks["qwen2_base"]  # <|im_end|> joins the EOS ids inside the iterators
    template = chat.resolve("chatml")
    im_end = tok.token_to_id("<|im_end|>")
    eot_tok = chat.with_end_of_turn(tok, template)
    rows = [{"prompt": "the cat?", "response": "sat on a mat", "messages": CONV},
            {"prompt": "the dogs?", "response": "ran"}]  # plain row: user = prompt, assistant = response
    (b,) = list(pipeline.lm_batches(rows, tok, kind="demonstrations", global_batch_size=2, seed=0, seq_len=96,
                                    pack=False, shuffle=False, num_epochs=1, chat_template="chatml"))
    for r, row in enumerate(rows):
        ids, mask = chat.sft_ids(template, chat.as_messages(row, with_response=True), eot_tok)
        assert mask[-2:] == [1, 0]  # <|im_end|> trained, its "\n" not
        n = len(ids) - 1
        np.testing.assert_array_equal(b["tokens"][r, :n], ids[:-1])
        np.testing.assert_array_equal(b["targets"][r, :n], ids[1:])
        np.testing.assert_array_equal(b["loss_mask"][r, :n], mask[1:])
        assert b["loss_mask"][r, n:].sum() == 0
    # Truncation: the response is cut on the right (no end-of-turn learned), the prompt on the left.
    (b,) = list(pipeline.lm_batches(rows[1:], tok, kind="demonstrations", global_batch_size=1, seed=0, seq_len=96,
                                    pack=False, shuffle=False, num_epochs=1, chat_template="chatml",
                                    max_response_len=1, max_prompt_len=4))
    assert b["loss_mask"].sum() == 1 and b["segment_ids"].sum() == 4
    (p,) = list(pipeline.prompt_batches(rows, tok, global_batch_size=2, seed=0, max_prompt_len=48, shuffle=False,
                                        num_epochs=1, chat_template="chatml"))
    want = chat.prompt_ids(template, [{"role": "user", "content": "the dogs?"}], tok)
    np.testing.assert_array_equal(p["prompt_tokens"][1, -len(want):], want)
    assert p["prompt_mask"][1].sum() == len(want)
    comps = [{"prompt": "q", "completions": ["a b", "c"], "ranks": [0, 1], "messages": CONV[:2]}]
    (c,) = list(pipeline.comparison_batches(comps, tok, global_batch_size=1, seed=0, seq_len=40, max_prompt_len=30,
                                            max_k=2, shuffle=False, num_epochs=1, chat_template="chatml"))
    for k, text in enumerate(["a b", "c"]):
        last, start = c["last_index"][0, k], c["prompt_len"][0, k]
        assert c["tokens"][0, k, last] == im_end
        assert tok.decode(c["tokens"][0, k, start:last]) == text
    row = pipeline.scoring_example("q", "a b", tok, seq_len=40, max_prompt_len=30, chat_template="chatml",
                                   messages=CONV[:2])
    np.testing.assert_array_equal(row["tokens"], c["tokens"][0, 0])


def test_all_rows_skipped_is_one_line_error(toks):
    rows = [{"prompt": "p", "completions": ["a", "b"], "ranks": [1, 1]}] * 3
    with pytest.raises(UserError, match=r"^the list of 3 rows: every row was skipped \(3 rows read, 3 with no "
                                        r"untied pair \(all ranks equal\)\); check the data"):
        pipeline.comparison_batches(rows, toks["qwen2"], global_batch_size=1, seed=0, seq_len=16, max_prompt_len=8)
    rows = [{"prompt": "p " * 20, "response": "r"}, {"prompt": "q", "response": ""}]
    with pytest.raises(UserError, match=r"\(2 rows read, 1 with an empty response, 1 whose prompt leaves no room "
                                        r"for a response in seq_len\)"):
        pipeline.lm_batches(rows, toks["qwen2"], kind="demonstrations", global_batch_size=1, seed=0, seq_len=8)


def test_a_conversation_without_any_template_is_a_clear_error():
    """{messages} rows with chat_template 'none' and a tokenizer without one: an error naming the fix, not a
    silently empty (skipped) row."""
    from instructgpt_jax.data import iterators
    from instructgpt_jax.data.tokenizer import train_tokenizer
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(["hello there friend"] * 30, f"{d}/sp.model", 300)
    row = {"prompt": "", "response": "", "messages": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Yes"}]}
    with pytest.raises(ValueError, match="no chat template is set and the tokenizer has none"):
        iterators.lm_example(row, tok, kind="demonstrations", seq_len=32, max_prompt_len=16)
