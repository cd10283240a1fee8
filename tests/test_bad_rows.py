"""Rows a stage cannot use: a file whose every row is skipped (empty responses, prompts leaving no room, comparisons
with no untied pair) is one UserError naming the file and the counts, before any checkpoint; malformed rows are
errors unless config.data.max_bad_rows lets that many be skipped (counted in the export's data_stats)."""
import json
import logging
import os

import pytest
from conftest import stage_config

from instructgpt_jax import checkpoints, errors, rm, sft
from instructgpt_jax.data import builders, prepare
from instructgpt_jax.errors import UserError

GOOD = [{"prompt": f"what is {i} plus {i}?", "response": f"it is {2 * i}"} for i in range(24)]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def assert_refused_before_any_checkpoint(train, config, workdir, *patterns):
    with pytest.raises(UserError) as info:
        train(config, workdir)
    message = str(info.value)
    assert errors.one_line(info.value) == message, message
    for p in patterns:
        assert p in message, message
    steps = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(steps) or not [d for d in os.listdir(steps) if d.isdigit()], os.listdir(steps)
    assert not os.path.exists(os.path.join(workdir, "export"))
    return message


# --- every row skipped -------------------------------------------------------------------------------------


def test_demonstrations_whose_responses_are_all_empty(tmp_path):
    train = write_jsonl(tmp_path / "empty.jsonl", [dict(r, response="") for r in GOOD[:12]])
    config = stage_config("sft", **{"data.train": train, "data.eval": write_jsonl(tmp_path / "eval.jsonl", GOOD)})
    assert_refused_before_any_checkpoint(sft.train, config, str(tmp_path / "run"),
                                         f"{train}: every row was skipped (12 rows read, 12 with an empty response)")


def test_prompts_that_all_leave_no_room(tmp_path):
    rows = [dict(r, prompt=" ".join(["the cat sat on a mat"] * 20)) for r in GOOD[:8]]
    train = write_jsonl(tmp_path / "long.jsonl", rows)  # no eval file: one of its 8 rows is held out
    config = stage_config("sft", **{"data.train": train, "data.seq_len": 16, "data.max_prompt_len": 40})
    assert_refused_before_any_checkpoint(
        sft.train, config, str(tmp_path / "run"),
        f"{train} (train[:-1]): every row was skipped (7 rows read, 7 whose prompt leaves no room for a response "
        "in seq_len)")


def test_comparisons_that_all_tie(tmp_path):
    ties = [{"prompt": r["prompt"], "completions": [r["response"], "no idea"], "ranks": [1, 1]} for r in GOOD[:10]]
    train = write_jsonl(tmp_path / "ties.jsonl", ties)
    config = stage_config("rm", **{"data.train": train,
                                   "data.eval": write_jsonl(tmp_path / "eval.jsonl", [dict(ties[0], ranks=[0, 1])]),
                                   "data.demonstrations": write_jsonl(tmp_path / "demos.jsonl", GOOD)})
    assert_refused_before_any_checkpoint(rm.train, config, str(tmp_path / "run"),
                                         f"{train}: every row was skipped (10 rows read, 10 with no untied pair")


def test_an_eval_file_whose_every_row_is_skipped_is_refused_up_front_too(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [dict(r, response="") for r in GOOD[:3]])
    config = stage_config("sft", **{"data.train": write_jsonl(tmp_path / "train.jsonl", GOOD), "data.eval": evals})
    assert_refused_before_any_checkpoint(sft.train, config, str(tmp_path / "run"),
                                         f"{evals}: every row was skipped (3 rows read, 3 with an empty response)")


# --- malformed rows and config.data.max_bad_rows -------------------------------------------------------------


def with_two_bad_rows(path) -> str:
    rows = list(GOOD[:10])
    rows[3] = '{"prompt": "unterminated'  # line 4: not JSON
    rows[7] = json.dumps({"prompt": "q", "answer": "a"})  # line 8: no response
    return write_jsonl(path, rows)


def test_max_bad_rows_jsonl(tmp_path, caplog):
    path = with_two_bad_rows(tmp_path / "demos.jsonl")
    data = str(tmp_path / "tfds")
    with pytest.raises(UserError, match=rf"^{path}:4: invalid JSON"):  # default 0: the first one is the error
        builders.build("demonstrations", {"train": path}, data)
    with pytest.raises(UserError) as info:
        builders.build("demonstrations", {"train": path}, data, max_bad_rows=1)
    assert str(info.value).startswith(f"{path}: more than config.data.max_bad_rows=1 malformed rows (malformed row "
                                      f"2: {path}:8: missing field 'response'")
    with caplog.at_level(logging.WARNING):
        builders.build("demonstrations", {"train": path}, data, max_bad_rows=2)
    assert f"{path}: skipped 2 malformed rows (config.data.max_bad_rows=2), e.g. {path}:4: invalid JSON" in caplog.text
    src = builders.load("demonstrations", data, "train")
    assert len(src) == 8 and [src[i]["response"] for i in (3, 6)] == ["it is 8", "it is 16"]  # rows 4 and 8
    stats = src.stats()
    assert stats["bad_rows"] == 2 and [e.split(": ")[0] for e in stats["bad_row_examples"]] == [f"{path}:4",
                                                                                               f"{path}:8"]
    # The limit decides which rows a build holds: it is part of the fingerprint.
    assert builders.fingerprint("demonstrations", {"train": path}, max_bad_rows=2) != builders.fingerprint(
        "demonstrations", {"train": path}, max_bad_rows=3)
    with pytest.raises(UserError, match="max_bad_rows=-1 must be an integer >= 0"):
        builders.build("demonstrations", {"train": path}, data, max_bad_rows=-1)


def test_max_bad_rows_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r) for r in GOOD[:6]]
    rows[1]["response"] = None  # null: absent
    rows[4]["response"] = None
    path = str(tmp_path / "demos.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(UserError, match=rf"^{path}:row 1: missing field 'response'"):
        builders.build("demonstrations", {"train": path}, str(tmp_path / "a"))
    with pytest.raises(UserError, match=rf"^{path}: more than config.data.max_bad_rows=1 malformed rows"):
        builders.build("demonstrations", {"train": path}, str(tmp_path / "b"), max_bad_rows=1)
    builders.build("demonstrations", {"train": path}, str(tmp_path / "c"), max_bad_rows=5)
    src = builders.load("demonstrations", str(tmp_path / "c"), "train")
    assert len(src) == 4 and src.stats()["bad_rows"] == 2
    assert [e.split(": ")[0] for e in src.stats()["bad_row_examples"]] == [f"{path}:row 1", f"{path}:row 4"]


def test_a_file_of_only_malformed_rows_is_one_error(tmp_path):
    path = write_jsonl(tmp_path / "junk.jsonl", ["[1, 2]", "not json"])
    with pytest.raises(UserError, match=rf"^{path}: every row is malformed \(2 rows skipped under "
                                        rf"config.data.max_bad_rows=5; the first: {path}:1: expected a JSON object"):
        builders.build("demonstrations", {"train": path}, str(tmp_path / "tfds"), max_bad_rows=5)


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_bad_rows_reach_the_stage_data_stats(tmp_path):
    path = with_two_bad_rows(tmp_path / "demos.jsonl")
    assert stage_config("sft").data.max_bad_rows == 0 and stage_config("ppo").data.max_bad_rows == 0
    workdir = str(tmp_path / "run")
    config = stage_config("sft", **{"data.train": path})
    with pytest.raises(UserError, match=rf"^{path}:4: invalid JSON"):
        sft.train(config, workdir)
    config = stage_config("sft", **{"data.train": path, "data.max_bad_rows": 2, "train.num_steps": 2,
                                    "train.checkpoint_every": 2})
    sft.train(config, workdir)
    stats = checkpoints.read_export_meta(workdir)["data_stats"]
    assert stats["bad_rows"] == 2 and len(stats["bad_row_examples"]) == 2
    assert stats["bad_row_examples"][0].startswith(f"{path}:4: invalid JSON")
    assert stats["examples"] > 0  # the iterator's counters are still there
    # The StageData API the stages use, without training.
    data = prepare.prepare(config, str(tmp_path / "run2"), "demonstrations")
    assert data.stats()["bad_rows"] == 2


def test_a_byte_order_mark_is_not_data(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'.encode("utf-8"))
    rows = list(builders.read_rows(str(path), "demonstrations"))
    assert [r["prompt"] for _, r in rows] == ["a", "c"]
