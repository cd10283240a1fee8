"""SFT / pretraining stage: a few-step smoke test on tiny, outputs on disk, exact resume, errors."""
import glob
import json
import os

import numpy as np
import pytest
from conftest import BUILTIN, Interrupt, interrupting, stage_config

from instructgpt_jax import checkpoints, sft, train_lib
from instructgpt_jax.data import prepare


def test_sft_trains_and_writes_everything(sft_workdir):
    records = train_lib.read_metrics(sft_workdir)
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    assert "eval_loss" in records[-1] and np.isfinite(records[-1]["eval_loss"])
    assert {"lr", "grad_norm", "tokens_per_sec"} <= set(records[-1])
    assert glob.glob(os.path.join(sft_workdir, "tb", "events.out.tfevents.*"))
    assert checkpoints.Manager(sft_workdir, stage_config("sft")).latest_step() == 30
    meta = checkpoints.read_export_meta(sft_workdir)
    assert meta["stage"] == "sft" and meta["step"] == 30 and meta["model"]["d_model"] == 64
    assert os.path.exists(os.path.join(sft_workdir, "export", "tokenizer.model"))


def test_resume_continues_exactly(tmp_path, sft_workdir, monkeypatch):
    """Interrupt at step 13 (last checkpoint: 10), rerun: steps 11..30 equal the uninterrupted run's."""
    config = stage_config("sft")
    workdir = str(tmp_path / "resumed")
    original = prepare.StageData.train_iterator

    def interrupted(self):
        return interrupting(original(self), after=13)

    monkeypatch.setattr(prepare.StageData, "train_iterator", interrupted)
    with pytest.raises(Interrupt):
        sft.train(config, workdir, builtin_data=BUILTIN)
    monkeypatch.setattr(prepare.StageData, "train_iterator", original)
    assert checkpoints.Manager(workdir, config).latest_step() == 10
    sft.train(config, workdir, builtin_data=BUILTIN)
    resumed = {r["step"]: r["loss"] for r in train_lib.read_metrics(workdir)}
    straight = {r["step"]: r["loss"] for r in train_lib.read_metrics(sft_workdir)}
    assert sorted(resumed) == list(range(1, 31))  # records past the checkpoint were replaced, not duplicated
    np.testing.assert_allclose([resumed[s] for s in range(11, 31)], [straight[s] for s in range(11, 31)],
                               rtol=1e-6)


def test_incompatible_workdir_is_refused_and_untouched(sft_workdir):
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(sft_workdir, "**"), recursive=True)}
    with pytest.raises(ValueError, match="model.d_model: 64 -> 128"):
        sft.train(stage_config("sft", **{"model.d_model": 128}), sft_workdir)
    after = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(sft_workdir, "**"), recursive=True)}
    assert before == after


def test_bad_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "demos.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"demos.jsonl:2"):
        sft.train(stage_config("sft", **{"data.train": str(bad)}), str(tmp_path / "w"))
    assert not glob.glob(str(tmp_path / "w" / "checkpoints" / "*"))


def test_mesh_that_does_not_fit_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="config.mesh"):
        sft.train(stage_config("sft", **{"mesh.data": 3, "mesh.fsdp": 1}), str(tmp_path))


def test_pretrain_counts_every_token(tmp_path):
    from instructgpt_jax import sharding
    config = stage_config("pretrain", **{"data.seq_len": 32})
    data = prepare.prepare(config, str(tmp_path), "text", BUILTIN)
    batch = next(data.train_iterator())
    # every real (non-padding) token is a target in pretraining
    np.testing.assert_array_equal(batch["loss_mask"] > 0, batch["segment_ids"] > 0)
    del sharding


def test_empty_data_path_without_builtin_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.data.train is empty"):
        sft.train(stage_config("sft", **{"data.train": ""}), str(tmp_path))
