"""DPO stage: sigmoid and Plackett–Luce from the SFT export on the built-in K-wise comparisons; the first
step's log-ratios are 0 (policy = reference), the loss falls, the export loads like an SFT export."""
import numpy as np
import pytest
from conftest import BUILTIN, stage_config

from instructgpt_jax import checkpoints, config_lib, dpo, train_lib


@pytest.mark.parametrize("loss_type", ["sigmoid", pytest.param("plackett_luce", marks=pytest.mark.slow)])
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


def test_dpo_options_that_do_not_apply_are_refused():
    for overrides, match in (({"dpo.loss_type": "kto"}, "valid: sigmoid, ipo, plackett_luce"),
                             ({"dpo.ipo_token_mean": True}, "ipo_token_mean=True applies to loss_type='ipo'"),
                             ({"dpo.loss_type": "ipo", "dpo.pl_normalize": False}, "pl_normalize=False")):
        with pytest.raises(ValueError, match=match):
            dpo.check_config(stage_config("dpo", **overrides))
    assert config_lib.load("dpo", "tiny").dpo.ipo_token_mean is False  # defaults: the IPO paper's summed log-ratios,
    assert config_lib.load("dpo", "tiny").dpo.pl_normalize is True     # per-prompt mean over Plackett–Luce stages


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_dpo_loss_fn_passes_each_completions_token_count():
    """ipo_token_mean divides each Δ by its completion's response tokens: prompt_len .. last_index inclusive
    (EOS included), counted here from the batch's indices, not from the stage's mask."""
    import jax
    import jax.numpy as jnp
    from instructgpt_jax import losses, scoring
    from instructgpt_jax.models import ModelConfig, Transformer
    model = Transformer(ModelConfig.from_config(config_lib.load("dpo", "tiny").model))
    init = lambda seed: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]  # noqa: E731
    policy, reference = init(0), init(1)
    b, k, t = 2, 3, 10
    prompt_len, last = np.array([[3, 3, 3], [2, 2, 2]]), np.array([[5, 9, 3], [8, 4, 2]])  # 3, 7, 1 / 7, 3, 1 tokens
    seg = (np.arange(t) <= last[..., None]).astype(np.int32)
    batch = {"tokens": np.random.default_rng(0).integers(4, 500, (b, k, t)).astype(np.int32) * seg,
             "segment_ids": seg, "positions": np.broadcast_to(np.arange(t), (b, k, t)).astype(np.int32) * seg,
             "prompt_len": prompt_len, "last_index": last, "ranks": np.array([[0, 1, 2], [2, 0, 1]]),
             "valid": np.array([[1, 1, 1], [1, 1, 0]])}
    loss, aux = dpo.loss_fn(policy, batch, None, reference, model=model, beta=0.5, loss_type="ipo", ipo_token_mean=True)
    lengths = last - prompt_len + 1
    delta = scoring.completion_logprobs(policy, model, batch) - scoring.completion_logprobs(reference, model, batch)
    want, want_aux = losses.dpo_loss(delta / lengths, np.zeros((b, k)), batch["ranks"], batch["valid"], 0.5, "ipo")
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["margin"], want_aux["margin"], rtol=1e-5)
    summed, _ = dpo.loss_fn(policy, batch, None, reference, model=model, beta=0.5, loss_type="ipo")
    np.testing.assert_allclose(summed, losses.dpo_loss(delta, np.zeros((b, k)), batch["ranks"], batch["valid"], 0.5,
                                                       "ipo")[0], rtol=1e-5)
