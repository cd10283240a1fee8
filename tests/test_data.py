"""Tests of the data layer: tokenizer, TFDS builders, grain batch iterators (CPU, fast)."""

import json
import os
import random

import numpy as np
import pytest
import sentencepiece as spm

from instructgpt_jax import data
from instructgpt_jax.data import iterators as pipeline

BOS, EOS = 2, 3


class CharTok:
    """Character-level stand-in tokenizer (id = ord(c)) so expected ids are written by hand."""

    pad_id, unk_id, bos_id, eos_id, vocab_size = 0, 1, 2, 3, 128

    def encode(self, s):
        return [ord(c) for c in s]


TOK = CharTok()


def ids(s):
    return [ord(c) for c in s]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def rand_text(rng, lo, hi):
    return "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    words = "the cat sat on a mat while 12 dogs ran past quickly and slowly".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 14))) for _ in range(2000)]


@pytest.fixture(scope="module")
def sp_tok(corpus, tmp_path_factory):
    return data.train_tokenizer(corpus, str(tmp_path_factory.mktemp("tok") / "tok.model"), 320)


# ---------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_roundtrip_and_special_ids(sp_tok, corpus, tmp_path):
    tok = data.Tokenizer.load(sp_tok.path)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert 260 < tok.vocab_size <= 320
    for s in ["the cat sat", "  two  spaces\nand a newline", "unseen: ü€😀 Ω 98765", ""]:
        enc = tok.encode(s)
        assert tok.decode(enc) == s
        assert BOS not in enc and EOS not in enc and 1 not in enc  # no specials, nothing UNK
    enc = tok.encode("the cat")
    assert tok.decode([0, BOS] + enc + [EOS] + tok.encode("dog") + [0]) == "the cat"
    # Deterministic training, atomic write to the requested path.
    again = data.train_tokenizer(corpus, str(tmp_path / "again.model"), 320)
    assert open(again.path, "rb").read() == open(sp_tok.path, "rb").read()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []
    with pytest.raises(ValueError, match="vocab_size=256 is too small"):
        data.train_tokenizer(corpus, str(tmp_path / "small.model"), 256)


def test_every_process_meets_at_the_tokenizer_barrier(sp_tok, tmp_path, monkeypatch):
    """A process other than 0 that finds the tokenizer process 0 has just written still joins the barrier
    (it once skipped it, and the processes then met at different barriers), and never trains one itself."""
    import shutil

    import jax
    from ml_collections import ConfigDict

    from instructgpt_jax import checkpoints
    from instructgpt_jax.data import prepare

    synced = []
    monkeypatch.setattr(checkpoints, "sync", synced.append)
    monkeypatch.setattr(checkpoints, "previous_export", lambda config: None)
    config = ConfigDict({"data": {"tokenizer": ""}, "model": {"vocab_size": 320}, "seed": 0})
    never = lambda: pytest.fail("only process 0 trains the tokenizer")  # noqa: E731
    for exists in (False, True):  # process 0 is still writing it / has written it
        workdir = tmp_path / str(exists)
        workdir.mkdir()
        if exists:
            shutil.copy(sp_tok.path, workdir / "tokenizer.model")
        monkeypatch.setattr(jax, "process_index", lambda: 1)
        monkeypatch.setattr(prepare, "load_tokenizer", lambda path: path)
        assert prepare.resolve_tokenizer(config, str(workdir), never) == str(workdir / "tokenizer.model")
    assert synced == ["tokenizer", "tokenizer"]


def test_tokenizer_takes_other_special_ids(corpus, tmp_path):
    prefix = str(tmp_path / "default")  # SentencePiece defaults: unk 0, bos 1, eos 2, no pad
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=30, minloglevel=2)
    tok = data.Tokenizer.load(prefix + ".model")
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (0, 1, 2, {2}, True)
    assert tok.pad_id == 0  # no pad: the unk token, never an EOS
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ValueError, match="junk.model: not a SentencePiece model"):
        data.Tokenizer.load(str(tmp_path / "junk.model"))


# ---------------------------------------------------------------------------
# Builders


def test_build_and_load_each_kind(tmp_path):
    d = str(tmp_path / "data")
    rows = {
        "text": [{"text": "hello"}, {"text": "é ü"}],
        "demonstrations": [{"prompt": "p", "response": "r", "extra": 1}],
        "prompts": [{"prompt": "q1"}, {"prompt": ""}],
        "comparisons": [
            {"prompt": "p", "completions": ["a", "b", "c"], "ranks": [0, 2, 1]},
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
        ],
    }
    for kind, rs in rows.items():
        path = write_jsonl(tmp_path / f"{kind}.jsonl", [""] + rs[:1] + ["  "] + rs[1:])  # blanks skipped
        data.build(kind, {"train": path, "validation": path}, d)
        src = data.load(kind, d, "train")
        assert len(src) == len(rs) and len(data.load(kind, d, "validation")) == len(rs)
        got = [src[i] for i in range(len(src))]
        if kind == "comparisons":
            assert got[0]["completions"] == ["a", "b", "c"] and got[0]["ranks"].tolist() == [0, 2, 1]
            assert got[1]["completions"] == ["good", "bad"] and got[1]["ranks"].tolist() == [0, 1]
            assert got[0]["ranks"].dtype == np.int32
        else:
            # File order, str fields; plain prompts carry an empty conversation.
            assert got == [{k: r.get(k, []) for k in got[0]} for r in rs]
            assert kind == "text" or all(g["messages"] == [] for g in got)
    with pytest.raises(ValueError, match="no split 'test'.*valid splits: train, validation"):
        data.load("text", d, "test")
    with pytest.raises(ValueError, match="unknown data kind 'txt'"):
        data.build("txt", {"train": path}, d)


def test_rebuild_is_noop_and_new_files_get_new_dir(tmp_path):
    d = str(tmp_path / "data")
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    first = data.build("text", {"train": path}, d)
    stamp = os.stat(os.path.join(first, "dataset_info.json")).st_mtime_ns
    assert data.build("text", {"train": path}, d) == first
    assert os.stat(os.path.join(first, "dataset_info.json")).st_mtime_ns == stamp
    write_jsonl(tmp_path / "t.jsonl", [{"text": "three"}])
    second = data.build("text", {"train": path}, d)
    assert second != first and os.path.exists(os.path.join(first, "dataset_info.json"))
    assert data.load("text", d, "train")[0] == {"text": "three"}  # latest build
    old = data.load("text", d, "train", config=os.path.basename(os.path.dirname(first)))
    assert len(old) == 2
    # max_k is part of the fingerprint.
    cpath = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert data.build("comparisons", {"train": cpath}, d) != data.build("comparisons", {"train": cpath}, d, max_k=4)
    assert len(data.load("comparisons", d, "train", max_k=4)) == 1
    with pytest.raises(ValueError, match="has max_k=4, not 9"):
        data.load("comparisons", d, "train", max_k=9)


def test_load_takes_tfds_split_slices(tmp_path):
    d = str(tmp_path / "data")
    data.build("prompts", {"train": write_jsonl(tmp_path / "p.jsonl", [{"prompt": str(i)} for i in range(40)])}, d)
    head, tail = data.load("prompts", d, "train[:-5%]"), data.load("prompts", d, "train[-5%:]")
    assert (len(head), len(tail)) == (38, 2) and tail[0] == {"prompt": "38", "messages": []}
    with pytest.raises(ValueError, match="no split 'eval'"):
        data.load("prompts", d, "eval[:10]")


COMPARE_OK = {"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1]}


@pytest.mark.parametrize(
    "kind,bad,message",
    [
        ("text", '{"text": "unterminated', r"invalid JSON"),
        ("text", "[1, 2]", r"expected a JSON object, got list"),
        ("text", '{"txt": "a"}', r"missing field 'text'"),
        ("demonstrations", '{"prompt": "a"}', r"missing field 'response'"),
        ("demonstrations", '{"prompt": 3, "response": "x"}', r"field 'prompt' must be a string, got int"),
        ("prompts", '{"prompt": null}', r"field 'prompt' must be a string, got null"),
        (
            "comparisons",
            '{"prompt": "p", "completions": ["a", "b"], "ranks": [true, false]}',
            r"field 'ranks\[0\]' must be an integer, got bool",
        ),
        (
            "comparisons",
            '{"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1.5]}',
            r"field 'ranks\[1\]' must be an integer, got float",
        ),
        (
            "comparisons",
            '{"prompt": "p", "completions": ["a", 7], "ranks": [0, 1]}',
            r"field 'completions\[1\]' must be a string, got int",
        ),
        (
            "comparisons",
            '{"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1, 2]}',
            r"'ranks' has 3 entries but 'completions' has 2",
        ),
        (
            "comparisons",
            '{"prompt": "p", "completions": ["a", "b", "c", "d"], "ranks": [0, 1, 2, 3]}',
            r"4 completions exceed max_k=3",
        ),
        (
            "comparisons",
            '{"prompt": "p", "completions": ["a"], "ranks": [0]}',
            r"a comparison needs at least 2 completions, got 1",
        ),
        ("comparisons", '{"prompt": "p", "chosen": "a"}', r"missing field 'rejected'"),
        ("comparisons", '{"prompt": "p"}', r"missing field 'completions'"),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, kind, bad, message):
    good = {
        "text": {"text": "ok"},
        "demonstrations": {"prompt": "p", "response": "r"},
        "prompts": {"prompt": "p"},
        "comparisons": COMPARE_OK,
    }[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", bad, good])  # line 3 (blank line counted)
    d = str(tmp_path / "data")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):
        data.build(kind, {"train": path}, d, max_k=3)
    # Nothing was written.
    assert not os.path.exists(d)  # validated before TFDS wrote anything


def test_bad_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid UTF-8"):
        data.build("text", {"train": str(path)}, str(tmp_path / "data"))


# ---------------------------------------------------------------------------
# LM batches: packing and truncation, hand-checked with the character tokenizer.


def single_pass(fn, rows, bsz, **kw):
    return list(fn(rows, TOK, global_batch_size=bsz, seed=0, num_epochs=1, shuffle=False, **kw))


def test_packing_never_crosses_example_boundaries():
    rows = [{"text": "ab"}, {"text": "cde"}, {"text": "fghij"}]
    (b,) = single_pass(pipeline.lm_batches, rows, 1, kind="text", seq_len=8)[:1]
    # "ab" -> 2 a b 3 and "cde" -> 2 c d e 3 share a row; "fghij" no longer fits.
    np.testing.assert_array_equal(b["tokens"][0], [BOS, *ids("ab"), BOS, *ids("cde"), 0])
    np.testing.assert_array_equal(b["targets"][0], [*ids("ab"), EOS, *ids("cde"), EOS, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2, 2, 2, 2, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 1, 1, 1, 1, 1, 0])
    assert {k: v.dtype for k, v in b.items()} == {
        "tokens": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "loss_mask": np.float32,
    }
    # Demonstrations: loss only on response + EOS; the last token of one example
    # (its EOS) is never an input predicting the next example's BOS.
    rows = [{"prompt": "ab", "response": "c"}, {"prompt": "d", "response": "ef"}]
    (b,) = single_pass(pipeline.lm_batches, rows, 1, kind="demonstrations", seq_len=8)
    np.testing.assert_array_equal(b["tokens"][0], [BOS, *ids("abc"), BOS, *ids("def")])
    np.testing.assert_array_equal(b["targets"][0], [*ids("abc"), EOS, *ids("def"), EOS])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 2])


def test_long_text_is_chunked_with_one_token_overlap():
    (b,) = single_pass(pipeline.lm_batches, [{"text": "abcdefgh"}], 2, kind="text", seq_len=4, pack=False)
    seq = [BOS, *ids("abcdefgh"), EOS]  # 10 tokens -> inputs 0:4, 4:8, 8:9
    np.testing.assert_array_equal(b["tokens"], [seq[0:4], seq[4:8]])
    np.testing.assert_array_equal(b["targets"], [seq[1:5], seq[5:9]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3]] * 2)


def test_truncation_policy_and_skip_counts():
    rows = [
        {"prompt": "abcdef", "response": "xy"},  # prompt cropped on the left
        {"prompt": "p", "response": "uvwxyz"},  # response cut on the right, no EOS
        {"prompt": "q", "response": ""},  # skipped: empty response
        {"prompt": "s", "response": "t"},
    ]
    it = pipeline.lm_batches(
        rows,
        TOK,
        kind="demonstrations",
        global_batch_size=3,
        seed=0,
        num_epochs=1,
        shuffle=False,
        seq_len=10,
        max_prompt_len=4,
        max_response_len=4,
        pack=False,
    )
    (b,) = list(it)
    np.testing.assert_array_equal(b["tokens"][0, :6], [BOS, *ids("def"), *ids("xy")])
    np.testing.assert_array_equal(b["targets"][0, :6], [*ids("def"), *ids("xy"), EOS])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["tokens"][1, :5], [BOS, *ids("puvw")])
    np.testing.assert_array_equal(b["targets"][1, :5], ids("puvwx"))
    np.testing.assert_array_equal(b["loss_mask"][1], [0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["segment_ids"][1], [1] * 5 + [0] * 5)
    np.testing.assert_array_equal(b["tokens"][2, :3], [BOS, *ids("st")])
    assert it.stats["examples"] == 4 and it.stats["cropped_prompts"] == 1
    assert it.stats["truncated_responses"] == 1 and it.stats["skipped_empty_response"] == 1
    # Without a prompt limit, a prompt filling seq_len + 1 leaves no room: skipped;
    # one leaving 2 tokens gets a 2-token response.
    rows = [{"prompt": "a" * 10, "response": "z"}, {"prompt": "b" * 8, "response": "xyz"}]
    it = pipeline.lm_batches(
        rows,
        TOK,
        kind="demonstrations",
        global_batch_size=1,
        seed=0,
        num_epochs=1,
        shuffle=False,
        seq_len=10,
        pack=False,
    )
    (b,) = list(it)
    np.testing.assert_array_equal(b["targets"][0], [*ids("b" * 8), *ids("xy")])
    assert it.stats["skipped_no_room"] == 1 and it.stats["truncated_responses"] == 1


# ---------------------------------------------------------------------------
# Comparisons and prompts.


def test_comparisons_ragged_truncated_and_untied():
    rows = [
        {"prompt": "ab", "completions": ["x", "yyyyyyyy", "z"], "ranks": [0, 2, 1]},
        {"prompt": "c", "completions": ["a", "b"], "ranks": [1, 1]},  # no untied pair
        {"prompt": "d", "completions": ["e", "f"], "ranks": [0, 1]},
    ]  # pairwise form, stored
    it = pipeline.comparison_batches(
        rows, TOK, global_batch_size=2, seed=0, num_epochs=1, shuffle=False, seq_len=8, max_prompt_len=4, max_k=4
    )
    (b,) = list(it)
    assert b["tokens"].shape == (2, 4, 8) and b["last_index"].shape == (2, 4)
    np.testing.assert_array_equal(b["tokens"][0, 0], [BOS, *ids("abx"), EOS, 0, 0, 0])
    np.testing.assert_array_equal(b["tokens"][0, 1], [BOS, *ids("abyyyy"), EOS])  # EOS kept
    np.testing.assert_array_equal(b["last_index"][0], [4, 7, 4, 0])
    assert (b["tokens"][0, [0, 1, 2], b["last_index"][0, :3]] == EOS).all()
    np.testing.assert_array_equal(b["segment_ids"][0, 0], [1] * 5 + [0] * 3)
    np.testing.assert_array_equal(b["positions"][0, 1], np.arange(8))
    np.testing.assert_array_equal(b["ranks"], [[0, 2, 1, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(b["valid"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert b["valid"].dtype == np.float32 and b["ranks"].dtype == np.int32
    np.testing.assert_array_equal(b["tokens"][1, 1, :4], [BOS, *ids("df"), EOS])
    assert it.stats["skipped_no_untied_pair"] == 1 and it.stats["truncated_completions"] == 1
    with pytest.raises(ValueError, match="5 completions but max_k=4"):
        pipeline.comparison_example(
            {"prompt": "", "completions": list("abcde"), "ranks": [0] * 5}, TOK, seq_len=8, max_prompt_len=4, max_k=4
        )


def test_prompts_left_padded_and_cropped():
    rows = [{"prompt": "ab"}, {"prompt": "abcdef"}]
    it = pipeline.prompt_batches(rows, TOK, global_batch_size=2, seed=0, num_epochs=1, shuffle=False, max_prompt_len=4)
    (b,) = list(it)
    np.testing.assert_array_equal(b["prompt_tokens"], [[0, BOS, *ids("ab")], [BOS, *ids("def")]])
    np.testing.assert_array_equal(b["prompt_mask"], [[0, 1, 1, 1], [1, 1, 1, 1]])
    assert b["prompt_text"].dtype == object and list(b["prompt_text"]) == ["ab", "abcdef"]
    assert it.stats["cropped_prompts"] == 1


# ---------------------------------------------------------------------------
# Determinism, resumption, sharding, evaluation.


def make_rows(kind, n=37, seed=0):
    rng = random.Random(seed)
    if kind == "text":
        return [{"text": rand_text(rng, 0, 30)} for _ in range(n)]
    if kind == "demonstrations":
        return [{"prompt": rand_text(rng, 0, 12), "response": rand_text(rng, 0, 9)} for _ in range(n)]
    if kind == "prompts":
        return [{"prompt": rand_text(rng, 0, 12)} for _ in range(n)]
    rows = []
    for _ in range(n):
        k = rng.randint(2, 4)
        rows.append(
            {
                "prompt": rand_text(rng, 0, 8),
                "completions": [rand_text(rng, 0, 10) for _ in range(k)],
                "ranks": [rng.randint(0, 2) for _ in range(k)],
            }
        )
    return rows


ITERATORS = {
    "text": lambda rows, **kw: pipeline.lm_batches(rows, TOK, kind="text", seq_len=8, **kw),
    "demonstrations": lambda rows, **kw: pipeline.lm_batches(
        rows, TOK, kind="demonstrations", seq_len=12, max_prompt_len=6, max_response_len=6, **kw
    ),
    "unpacked": lambda rows, **kw: pipeline.lm_batches(rows, TOK, kind="text", seq_len=8, pack=False, **kw),
    "comparisons": lambda rows, **kw: pipeline.comparison_batches(
        rows, TOK, seq_len=12, max_prompt_len=5, max_k=4, **kw
    ),
    "prompts": lambda rows, **kw: pipeline.prompt_batches(rows, TOK, max_prompt_len=6, **kw),
}


def rows_for(name):
    return make_rows("text" if name == "unpacked" else name)


@pytest.mark.parametrize("name", list(ITERATORS))
def test_resume_is_exact(name):
    rows, make = rows_for(name), ITERATORS[name]
    ref = make(rows, global_batch_size=4, seed=3)
    full = take(ref, 14)  # several epochs of the 37 rows
    again = take(make(rows, global_batch_size=4, seed=3), 14)
    assert_batches_equal(full, again)  # deterministic
    for n in (1, 4, 9):
        it = make(rows, global_batch_size=4, seed=3)
        take(it, n)
        state = json.loads(json.dumps(it.get_state()))
        stats = dict(it.stats)
        fresh = make(rows, global_batch_size=4, seed=3)
        fresh.set_state(state)
        assert fresh.stats == stats
        assert_batches_equal(take(fresh, 5), full[n : n + 5])
        take(it, 5)
        assert fresh.stats == it.stats
    other = make(rows, global_batch_size=4, seed=4)
    with pytest.raises(ValueError, match="different settings.*seed"):
        other.set_state(state)


@pytest.mark.parametrize("name", list(ITERATORS))
def test_processes_get_slices_of_the_global_batch(name):
    rows, make = rows_for(name), ITERATORS[name]
    single = take(make(rows, global_batch_size=4, seed=1), 6)
    its = [make(rows, global_batch_size=4, seed=1, process_index=p, process_count=2) for p in (0, 1)]
    for want in single:
        parts = [next(it) for it in its]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k], err_msg=k)
    assert its[0].stats == its[1].stats
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        make(rows, global_batch_size=4, seed=1, process_index=0, process_count=3)


def test_epochs_reshuffle_and_finite_passes_end():
    rows = [{"prompt": str(i)} for i in range(10)]
    it = pipeline.prompt_batches(rows, TOK, global_batch_size=5, seed=0, max_prompt_len=4, num_epochs=2)
    texts = [list(b["prompt_text"]) for b in it]
    assert len(texts) == 4
    first, second = texts[0] + texts[1], texts[2] + texts[3]
    assert sorted(first) == sorted(second) == sorted(str(i) for i in range(10))
    assert first != second
    assert (
        len(list(pipeline.prompt_batches(rows, TOK, global_batch_size=4, seed=0, max_prompt_len=4, num_epochs=1))) == 2
    )  # remainder dropped


def test_eval_covers_each_example_once():
    rows = [{"prompt": f"p{i}"} for i in range(10)]
    seen = []
    for p in (0, 1):
        batches = list(
            pipeline.eval_batches(rows, TOK, global_batch_size=4, process_index=p, process_count=2, max_prompt_len=5)
        )
        assert len(batches) == 3 and all(b["prompt_tokens"].shape == (2, 5) for b in batches)
        for b in batches:
            real = b["prompt_mask"].sum(1) > 0
            assert all(t == "" for t in b["prompt_text"][~real])
            seen += list(b["prompt_text"][real])
    assert sorted(seen) == sorted(r["prompt"] for r in rows)
    # Other kinds: padding rows carry zero masks.
    comps = make_rows("comparisons", n=7)
    batches = list(
        pipeline.eval_batches(
            comps, TOK, kind="comparisons", global_batch_size=4, seq_len=12, max_prompt_len=5, max_k=4
        )
    )
    kept = sum(len(set(r["ranks"])) > 1 for r in comps)
    assert sum(int(b["valid"].any(1).sum()) for b in batches) == kept
    assert len(batches) == -(-kept // 4)
    demos = [{"prompt": "p", "response": str(i)} for i in range(5)]
    batches = list(
        pipeline.eval_batches(demos, TOK, kind="demonstrations", global_batch_size=4, seq_len=12, pack=False)
    )
    assert len(batches) == 2 and batches[-1]["loss_mask"][1:].sum() == 0
    assert batches[-1]["segment_ids"][1:].sum() == 0 and batches[-1]["loss_mask"][0].sum() == 2


def test_built_dataset_feeds_pipeline(tmp_path, sp_tok, corpus):
    rows = [{"prompt": corpus[i], "response": corpus[i + 1]} for i in range(0, 40, 2)]
    d = str(tmp_path / "data")
    data.build("demonstrations", {"train": write_jsonl(tmp_path / "d.jsonl", rows)}, d)
    src = data.load("demonstrations", d, "train")
    (b,) = take(
        data.lm_batches(
            src, sp_tok, kind="demonstrations", global_batch_size=2, seed=0, seq_len=64, pack=False, shuffle=False
        ),
        1,
    )
    # The loss-masked targets decode back to the response text (EOS ends it).
    resp = b["targets"][0][b["loss_mask"][0] > 0]
    assert sp_tok.decode(resp) == rows[0]["response"] and resp[-1] == EOS
