"""Public dataset shapes (JSONL and Parquet) -> the canonical rows `builders.load` hands the iterators.

One TFDS build per kind (each shape is a split of it) plus one build with renamed columns per
kind, all module-scoped: TFDS builds dominate the runtime.
"""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructgpt_jax.data import builders
from instructgpt_jax.errors import UserError


def write(path, rows):
    """JSONL or Parquet by extension; JSONL rows may be raw strings (malformed lines)."""
    path = str(path)
    if path.endswith(".parquet"):
        keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist reads the first row's keys only
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    else:
        with open(path, "w") as f:
            f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return path


def msg(role, content):
    return {"role": role, "content": content}


def loaded(data_dir, kind, split):
    src = builders.load(kind, data_dir, split)
    rows = [src[i] for i in range(len(src))]
    for r in rows:
        if "ranks" in r:
            assert r["ranks"].dtype.name == "int32"
            r["ranks"] = r["ranks"].tolist()
            assert r.pop("completion_ids") == []  # no file here gives token ids
    return rows


CHAT = [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "2+2?"),
        msg("assistant", "4")]
HH_PREFIX = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
HH_TURNS = [msg("user", "Hi there"), msg("assistant", "Hello! How can I help?"), msg("user", "Tell me a joke.")]


def rating(helpfulness, honesty, truthfulness):
    """UltraFeedback's fine-grained annotations (ratings are strings there, 'N/A' when missing)."""
    return {aspect: {"Rating": r, "Rationale": "because"}
            for aspect, r in [("helpfulness", helpfulness), ("honesty", honesty), ("truthfulness", truthfulness)]}


SHAPES = {
    "demonstrations": {
        "chat.jsonl": [{"messages": CHAT}, {"prompt": "ignored: messages win", "messages": CHAT[1:3]}],
        "pairs.parquet": [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": ""}],
        "chat.parquet": [{"messages": CHAT[1:3], "id": 7}],
    },
    "prompts": {
        "plain.jsonl": [{"prompt": "q1"}, {"prompt": "q2", "messages": CHAT}],  # the string wins
        "chat.parquet": [{"messages": CHAT}, {"messages": CHAT[:2]}],
    },
    "comparisons": {
        "kwise.jsonl": [{"prompt": "p", "completions": ["a", "b", "c"], "ranks": [2, 0, 1]}],
        "pairs.jsonl": [
            {"prompt": "Q", "chosen": "good", "rejected": "bad"},
            {"prompt": [msg("system", "S"), msg("user", "U")], "chosen": "c", "rejected": "r"},
            {"prompt": "Q3", "chosen": [msg("assistant", "c3")], "rejected": [msg("assistant", "r3")]},
        ],
        # UltraFeedback-binarized: the message lists repeat the prompt conversation.
        "pairs_lists.parquet": [{"prompt": "Q2", "chosen": [msg("user", "Q2"), msg("assistant", "good2")],
                                 "rejected": [msg("user", "Q2"), msg("assistant", "bad2")]}],
        "hh_text.jsonl": [
            {"chosen": HH_PREFIX + "\n\nAssistant: Why did the chicken cross the road?",
             "rejected": HH_PREFIX + "\n\nAssistant: No."},
            {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
             "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"},
        ],
        "hh_msgs.parquet": [{"chosen": HH_TURNS + [msg("assistant", "A joke.")],
                             "rejected": HH_TURNS + [msg("assistant", "Later.")]}],
        "uf.jsonl": [
            {"prompt": "u1", "completions": [
                {"response": "A", "overall_score": 7.5}, {"response": "B", "overall_score": 9},
                {"response": "C", "overall_score": 7.5}, {"response": "D", "overall_score": 3}]},
            # overall_score comes before the fine-grained annotations.
            {"prompt": "u2", "completions": [
                {"response": "E", "overall_score": 2, "annotations": rating("5", "5", "5")},
                {"response": "F", "overall_score": 6, "annotations": rating("1", "1", "1")}]},
            {"prompt": "u3", "completions": [{"response": "G", "ratings": [1, 2]}, {"response": "H", "ratings": [4, 5]},
                                             {"response": "I", "ratings": {"a": 2, "b": "1", "c": "N/A"}}]},
        ],
        # Fine-grained only: mean of the numeric ratings (N/A skipped): 4.5, 2.0, 4.5.
        "uf_fine.parquet": [{"prompt": "f1", "completions": [
            {"response": "J", "annotations": rating("4", "5", "N/A")},
            {"response": "K", "annotations": rating("2", "3", "1")},
            {"response": "L", "annotations": rating("5", "4", "N/A")}]}],
    },
}

EXPECTED = {
    ("demonstrations", "chat_jsonl"): [
        {"prompt": "", "response": "", "messages": CHAT},
        {"prompt": "", "response": "", "messages": CHAT[1:3]},
    ],
    ("demonstrations", "pairs_parquet"): [
        {"prompt": "p1", "response": "r1", "messages": []},
        {"prompt": "p2", "response": "", "messages": []},
    ],
    ("demonstrations", "chat_parquet"): [{"prompt": "", "response": "", "messages": CHAT[1:3]}],
    ("prompts", "plain_jsonl"): [{"prompt": "q1", "messages": []}, {"prompt": "q2", "messages": []}],
    ("prompts", "chat_parquet"): [{"prompt": "", "messages": CHAT[:4]}, {"prompt": "", "messages": CHAT[:2]}],
    ("comparisons", "kwise_jsonl"): [
        {"prompt": "p", "messages": [], "completions": ["a", "b", "c"], "ranks": [2, 0, 1]}],
    ("comparisons", "pairs_jsonl"): [
        {"prompt": "Q", "messages": [], "completions": ["good", "bad"], "ranks": [0, 1]},
        {"prompt": "", "messages": [msg("system", "S"), msg("user", "U")], "completions": ["c", "r"], "ranks": [0, 1]},
        {"prompt": "Q3", "messages": [], "completions": ["c3", "r3"], "ranks": [0, 1]},
    ],
    ("comparisons", "pairs_lists_parquet"): [
        {"prompt": "", "messages": [msg("user", "Q2")], "completions": ["good2", "bad2"], "ranks": [0, 1]}],
    ("comparisons", "hh_text_jsonl"): [
        {"prompt": "", "messages": HH_TURNS, "completions": ["Why did the chicken cross the road?", "No."],
         "ranks": [0, 1]},
        {"prompt": "", "messages": [msg("user", "What is 2+2?")], "completions": ["4", "5"], "ranks": [0, 1]},
    ],
    ("comparisons", "hh_msgs_parquet"): [
        {"prompt": "", "messages": HH_TURNS, "completions": ["A joke.", "Later."], "ranks": [0, 1]}],
    ("comparisons", "uf_jsonl"): [
        {"prompt": "u1", "messages": [], "completions": ["A", "B", "C", "D"], "ranks": [1, 0, 1, 2]},
        {"prompt": "u2", "messages": [], "completions": ["E", "F"], "ranks": [1, 0]},
        # ratings means 1.5, 4.5, 1.5 -> dense ranks
        {"prompt": "u3", "messages": [], "completions": ["G", "H", "I"], "ranks": [1, 0, 1]},
    ],
    ("comparisons", "uf_fine_parquet"): [
        {"prompt": "f1", "messages": [], "completions": ["J", "K", "L"], "ranks": [0, 1, 0]}],
}

# Renamed columns: (fields, file, rows, expected canonical rows).
RENAMED = {
    "demonstrations": (
        "prompt:question, response:answer,messages:conversations",  # ShareGPT {from, value} turns too
        "renamed.parquet",
        [{"question": "q", "answer": "a", "response": "not this one"},
         {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                            {"from": "gpt", "value": "yo"}]}],
        [{"prompt": "q", "response": "a", "messages": []},
         {"prompt": "", "response": "", "messages": [msg("system", "S"), msg("user", "hi"), msg("assistant", "yo")]}],
    ),
    "comparisons": (
        {"prompt": "instruction", "chosen": "rejected", "rejected": "chosen"},  # a swap reads the original columns
        "renamed.jsonl",
        [{"instruction": "i", "chosen": "x", "rejected": "y"}],
        [{"prompt": "i", "messages": [], "completions": ["y", "x"], "ranks": [0, 1]}],
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for kind, files in SHAPES.items():
        splits = {name.replace(".", "_"): write(root / f"{kind}_{name}", rows) for name, rows in files.items()}
        out[kind] = builders.build(kind, splits, str(root / "data"))
    for kind, (fields, name, rows, _) in RENAMED.items():
        builders.build(kind, {"train": write(root / f"{kind}_{name}", rows)}, str(root / "renamed"), fields=fields)
    return root


@pytest.mark.parametrize("kind,split", list(EXPECTED))
def test_public_shapes_become_canonical_rows(built, kind, split):
    assert loaded(str(built / "data"), kind, split) == EXPECTED[kind, split]


@pytest.mark.parametrize("kind", list(RENAMED))
def test_fields_rename_columns(built, kind):
    fields, name, _, expected = RENAMED[kind]
    assert loaded(str(built / "renamed"), kind, "train") == expected
    path = str(built / f"{kind}_{name}")
    # The mapping is part of the fingerprint, whichever way it is written.
    assert builders.fingerprint(kind, {"train": path}, fields=fields) != builders.fingerprint(kind, {"train": path})
    as_dict = builders.parse_fields(kind, fields)
    assert builders.fingerprint(kind, {"train": path}, fields=as_dict) == builders.fingerprint(
        kind, {"train": path}, fields=",".join(f"{k}:{v}" for k, v in reversed(list(as_dict.items()))))


def test_parse_fields():
    assert builders.parse_fields("demonstrations", " prompt:question ,response:answer,") == {
        "prompt": "question", "response": "answer"}
    assert builders.parse_fields("text", "") == {} == builders.parse_fields("text", None)
    with pytest.raises(UserError, match="fields: unknown field 'answer' for demonstrations data; "
                                        "valid: prompt, response, messages"):
        builders.parse_fields("demonstrations", "answer:response")
    with pytest.raises(UserError, match="valid: prompt, completions, ranks, chosen, rejected"):
        builders.parse_fields("comparisons", {"response": "x"})
    with pytest.raises(UserError, match=r"'prompt=question' is not 'canonical:column'"):
        builders.parse_fields("prompts", "prompt=question")
    with pytest.raises(UserError, match="'prompt' is mapped twice"):
        builders.parse_fields("prompts", "prompt:a,prompt:b")


GOOD = {"demonstrations": {"prompt": "p", "response": "r"}, "prompts": {"prompt": "p"},
        "comparisons": {"prompt": "p", "chosen": "a", "rejected": "b"}}

# (kind, bad row, expected message after "file:line: ")
BAD_ROWS = [
    ("demonstrations", {"messages": [msg("user", "hi"), msg("bot", "yo")]},
     r"field 'messages\[1\]\.role' is 'bot'; valid roles: system, user, assistant, tool"),
    ("demonstrations", {"messages": [msg("system", "s"), msg("user", "hi")]},
     r"field 'messages' has no assistant turn"),
    ("demonstrations", {"messages": [{"role": "user", "content": 3}]},
     r"field 'messages\[0\]\.content' must be a string, got int"),
    ("demonstrations", {"messages": "hi"}, r"field 'messages' must be a list of messages, got str"),
    ("prompts", {"messages": [msg("assistant", "only me")]}, r"field 'messages' has only assistant turns"),
    ("prompts", {"text": "hi"}, r"missing field 'prompt' or 'messages' \(row has: text;"),
    ("demonstrations", {"instruction": "hi", "output": "yo"},
     r"missing field 'prompt'\+'response' or 'messages' \(row has: instruction, output;"),
    ("comparisons", {"chosen": HH_PREFIX + "\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
     r"'chosen' and 'rejected' transcripts differ before their last assistant turn"),
    ("comparisons", {"chosen": "just text", "rejected": "more text"}, r"field 'chosen' is not an HH transcript"),
    ("comparisons", {"chosen": [msg("user", "q"), msg("assistant", "a")], "rejected": [msg("user", "q")]},
     r"field 'rejected' must end with an assistant turn, ends with 'user'"),
    ("comparisons", {"prompt": "p", "completions": [{"response": "a", "overall_score": 1}, {"response": "b"}]},
     r"field 'completions\[1\]' has no score; give one of overall_score, fine-grained_score, annotations, ratings"),
    ("comparisons", {"prompt": "p", "completions": [{"response": "a", "overall_score": "high"},
                                                    {"response": "b", "overall_score": 1}]},
     r"field 'completions\[0\]\.overall_score' must be a finite number, got 'high'"),
    ("comparisons", {"prompt": "p", "completions": [{"response": 1, "overall_score": 1},
                                                    {"response": "b", "overall_score": 2}]},
     r"field 'completions\[0\]\.response' must be a string, got int"),
    ("comparisons", {"prompt": "p", "completions": ["a", "b"]},
     r"missing field 'ranks' \(row has: completions, prompt"),
    ("comparisons", {"question": "p"},
     r"missing field 'completions' .*or 'chosen' and 'rejected' \(row has: question\)"),
]


@pytest.mark.parametrize("kind,bad,message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, kind, bad, message):
    path = write(tmp_path / "bad.jsonl", [GOOD[kind], "", bad])  # line 3: the blank line counts
    with pytest.raises(UserError, match=rf"bad\.jsonl:3: {message}"):
        builders.build(kind, {"train": path}, str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "data")  # validated before TFDS wrote anything


def test_parquet_errors_name_the_row_and_the_renamed_column(tmp_path):
    path = write(tmp_path / "bad.parquet", [{"question": "q", "answer": "a"}, {"question": "q2", "answer": None}])
    with pytest.raises(UserError, match=r"bad\.parquet:row 1: missing field 'answer' \(as 'response'\) "
                                        r"\(row has: question; rename columns with fields"):
        builders.build("demonstrations", {"train": path}, str(tmp_path / "d"), fields="prompt:question,response:answer")
    path = write(tmp_path / "bad2.parquet", [{"prompt": "p", "answers": [{"response": "a", "overall_score": 1.0},
                                                                      {"response": None, "overall_score": 2.0}]}])
    with pytest.raises(UserError, match=r"bad2\.parquet:row 0: field 'answers\[1\]' \(as 'completions\[1\]'\) "
                                        r"has no 'response'"):
        builders.build("comparisons", {"train": path}, str(tmp_path / "d"), fields={"completions": "answers"})


def test_file_level_errors(tmp_path):
    with pytest.raises(UserError, match=r"t\.csv: unknown data file type '\.csv'; valid: \.jsonl, \.json"):
        builders.build("text", {"train": write(tmp_path / "t.csv", [{"text": "a"}])}, str(tmp_path / "d"))
    (tmp_path / "array.json").write_text('[\n{"text": "a"}\n]\n')
    with pytest.raises(UserError, match=r"array\.json:1: invalid JSON .*one JSON object per line"):
        builders.build("text", {"train": str(tmp_path / "array.json")}, str(tmp_path / "d"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"junk\.parquet: not a readable Parquet file"):
        builders.build("text", {"train": str(tmp_path / "junk.parquet")}, str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="no such file"):  # a UserError too
        builders.build("text", {"train": str(tmp_path / "missing.jsonl")}, str(tmp_path / "d"))
    with pytest.raises(UserError, match="unknown data kind 'txt'; valid kinds: text, demonstrations"):
        builders.build("txt", {"train": str(tmp_path / "t.csv")}, str(tmp_path / "d"))


def test_comparisons_keep_their_token_ids(tmp_path):
    """Sampled completions keep their ids: the RM trains on the ids PPO sampled, not on a re-encoding."""
    from instructgpt_jax.data import builders, iterators
    from instructgpt_jax.data.tokenizer import train_tokenizer
    path = tmp_path / "c.jsonl"
    rows = [{"prompt": "Q: x\nA:", "completions": ["a b", "c"], "ranks": [0, 1], "completion_ids": [[7, 8, 9], [10]]},
            {"prompt": "Q: y\nA:", "completions": ["d", "e"], "ranks": [1, 0]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builders.build("comparisons", {"train": str(path)}, str(tmp_path / "tfds"))
    src = builders.load("comparisons", str(tmp_path / "tfds"), "train")
    assert src[0]["completion_ids"] == [[7, 8, 9], [10]] and src[1]["completion_ids"] == []
    tok = train_tokenizer(["Q: x A: a b c d e y"] * 20, str(tmp_path / "sp.model"), 300)
    ex = iterators.comparison_example(src[0], tok, seq_len=16, max_prompt_len=8, max_k=2)["pieces"][0]
    p = int(ex["prompt_len"][0])
    np.testing.assert_array_equal(ex["tokens"][0, p:p + 4], [7, 8, 9, tok.eos_id])
    np.testing.assert_array_equal(ex["tokens"][1, p:p + 2], [10, tok.eos_id])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(rows[0], completion_ids=[[1]])) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'completion_ids' must be one list of token ids"):
        builders.build("comparisons", {"train": str(bad)}, str(tmp_path / "tfds2"))
