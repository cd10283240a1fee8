"""Reward-model stage: learns a learnable preference, exports a bias that centres the demonstrations."""
import jax
import numpy as np
import pytest
from conftest import BUILTIN, stage_config

from instructgpt_jax import checkpoints, rm, scoring, train_lib
from instructgpt_jax.data import builders, prepare
from instructgpt_jax.data.tokenizer import Tokenizer


def test_rm_accuracy_rises_above_chance(rm_workdir):
    records = [r for r in train_lib.read_metrics(rm_workdir) if "loss" in r]
    assert records[-1]["eval_accuracy"] > 0.58, records[-1]
    assert np.mean([r["accuracy"] for r in records[-4:]]) > 0.55  # one batch of 8 prompts is noisy
    assert {"reward_mean", "reward_std", "eval_loss"} <= set(records[-1])


def test_bias_makes_demonstrations_average_zero(rm_workdir, sft_workdir):
    meta = checkpoints.read_export_meta(rm_workdir)
    assert meta["bias_demonstrations"] == 64
    model = scoring.RewardModel.load(rm_workdir)
    assert model.bias == pytest.approx(meta["rm_bias"])
    config = stage_config("rm", **{"init.from_workdir": sft_workdir})
    demos = builders.load("demonstrations", f"{rm_workdir}/tfds", f"train[:-{prepare.HELD_OUT}]")
    rows = [demos[i] for i in range(64)]
    tok = Tokenizer.load(f"{rm_workdir}/export/tokenizer.model")
    r = model.score_texts(tok, [x["prompt"] for x in rows], [x["response"] for x in rows],
                          seq_len=config.data.seq_len, max_prompt_len=config.data.max_prompt_len)
    assert abs(float(np.mean(r))) < 1e-4


def test_rm_starts_from_sft_trunk(rm_workdir, sft_workdir):
    """Everything but the scalar head starts from SFT: with 0 steps the trunk equals the SFT export."""
    from instructgpt_jax import sharding
    from instructgpt_jax.models import ModelConfig, Transformer
    cfg = ModelConfig.from_config(stage_config("rm").model)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    params = checkpoints.init_with_trunk(Transformer(cfg, head="scalar"), Transformer(cfg), mesh,
                                         jax.random.PRNGKey(0), checkpoints.export_path(sft_workdir))
    sft_params = checkpoints.load_params(sft_workdir, Transformer(cfg), mesh)
    np.testing.assert_array_equal(params["embed"]["embedding"], sft_params["embed"]["embedding"])
    np.testing.assert_array_equal(params["scalar_head"]["bias"], 0.0)
    std = float(np.std(params["scalar_head"]["kernel"]))
    assert 0.5 / np.sqrt(65) < std < 2 / np.sqrt(65)


def test_later_stages_adopt_the_exports_model_and_refuse_a_contradicting_override(tmp_path, sft_workdir):
    from instructgpt_jax import harness
    for stage in ("rm", "dpo", "ppo", "grpo"):  # the config's own shape (128 wide, 4 layers) is replaced
        config = stage_config(stage, **{"init.from_workdir": sft_workdir, "model.d_model": 128,
                                        "model.num_layers": 4, "model.dropout": 0.0, "model.dtype": "bfloat16"})
        resolved = harness.resolve(config)
        assert (resolved.model.d_model, resolved.model.num_layers) == (64, 2)
        assert resolved.model.dtype == "bfloat16"  # runtime keys stay the run's own
        assert harness.resolve(resolved).to_dict() == resolved.to_dict()  # idempotent
    with pytest.raises(ValueError, match=r"config.model.d_model=128 contradicts the checkpoint .*d_model=64"):
        harness.resolve(stage_config("rm", **{"init.from_workdir": sft_workdir, "model.d_model": 128}),
                        explicit=["model.d_model", "train.num_steps"])
    # an override that agrees with the export is fine
    harness.resolve(stage_config("rm", **{"init.from_workdir": sft_workdir}), explicit=["model.d_model"])
