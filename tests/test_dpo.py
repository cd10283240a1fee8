"""DPO stage: sigmoid and Plackett–Luce from the SFT export on the built-in K-wise comparisons; the first
step's log-ratios are 0 (policy = reference), the loss falls, the export loads like an SFT export."""
import numpy as np
import pytest
from conftest import BUILTIN, stage_config

from instructgpt_jax import checkpoints, dpo, train_lib


@pytest.mark.parametrize("loss_type", ["sigmoid", "plackett_luce"])
def test_dpo_trains_from_sft(tmp_path, sft_workdir, loss_type):
    config = stage_config("dpo", **{"init.from_workdir": sft_workdir, "dpo.loss_type": loss_type,
                                    "train.log_every": 1, "optim.lr": 3e-4})
    dpo.train(config, str(tmp_path), builtin_data=BUILTIN)
    records = [r for r in train_lib.read_metrics(str(tmp_path)) if "loss" in r]
    first = records[0]
    # step 1 evaluates the loss at policy = reference: Δ = 0 for every completion
    assert first["margin"] == pytest.approx(0.0, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    if loss_type == "sigmoid":
        assert first["loss"] == pytest.approx(np.log(2.0), abs=1e-5)
    assert records[-1]["margin"] > 0 and records[-1]["kl"] > 0  # the policy moved towards the preferred side
    assert {"eval_loss", "eval_accuracy", "eval_kl", "eval_margin"} <= set(records[-1])
    meta = checkpoints.read_export_meta(str(tmp_path))
    assert meta["stage"] == "dpo" and meta["loss_type"] == loss_type
    assert meta["model"] == checkpoints.read_export_meta(sft_workdir)["model"]


def test_dpo_needs_the_sft_export(tmp_path):
    with pytest.raises(ValueError, match="init.from_workdir"):
        dpo.train(stage_config("dpo"), str(tmp_path), builtin_data=BUILTIN)
