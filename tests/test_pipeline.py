"""The one-command pipeline on configs/pipeline.py:smoke: plumbing and result files (not the science),
skipping on rerun, the changed-config error, and the evaluation statistics."""
import importlib.util
import json
import os

import numpy as np
import pytest

from instructgpt_jax.miniature import evaluate, pipeline, world as synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = {"win_rate", "win_ci", "utility", "correct", "rm_score", "kl_to_sft", "harmless", "heldout_loss"}


def pipeline_config(arg="smoke"):
    spec = importlib.util.spec_from_file_location("_pipeline_config", os.path.join(ROOT, "configs", "pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def smoke_workdir(tmp_path_factory) -> str:
    """One smoke run per test session, shared with test_notebooks (a rerun skips every step)."""
    return str(tmp_path_factory.getbasetemp() / "pipeline_smoke")


def snapshot(root):
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_mtime_ns, os.stat(os.path.join(d, f)).st_size)
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = smoke_workdir(tmp_path_factory)
    return workdir, pipeline.train(pipeline_config(), workdir)


def test_default_and_smoke_configs_share_the_code_path():
    default, smoke_cfg = pipeline_config("default"), pipeline_config("smoke")
    assert default.stage == smoke_cfg.stage == "pipeline"
    assert default.to_dict().keys() == smoke_cfg.to_dict().keys()
    assert [default[s].stage for s in ("pretrain", "sft", "rm", "ppo", "ppo_ptx")] == [
        "pretrain", "sft", "rm", "ppo", "ppo"]
    assert default.ppo.ppo.ptx_coef == 0 < default.ppo_ptx.ppo.ptx_coef
    with pytest.raises(ValueError, match="smoke"):
        pipeline_config("nope")


def test_smoke_run_writes_every_stage_and_the_results(smoke):
    workdir, results = smoke
    for step in pipeline.STEPS:
        assert os.path.exists(os.path.join(workdir, step, "config.json")), step
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_ptx"):
        assert os.path.exists(os.path.join(workdir, stage, "export", "meta.json")), stage
    assert set(results["models"]) == set(evaluate.MODELS)
    for name, m in results["models"].items():
        assert set(m) == METRICS, name
        assert m["win_ci"][0] <= m["win_rate"] <= m["win_ci"][1]
    assert results["models"]["sft"]["win_rate"] == 0.5 and results["models"]["sft"]["kl_to_sft"] == 0.0
    assert set(results["checks"]) == {"ppo_preferred_over_sft", "sft_preferred_over_base",
                                      "ptx_lower_tax_than_ppo", "ptx_preferred_over_sft"}
    assert results == json.load(open(os.path.join(workdir, "results.json")))
    md = open(os.path.join(workdir, "results.md")).read()
    assert all(f"| {label} |" in md for label in evaluate.LABELS.values())
    assert os.path.getsize(os.path.join(workdir, "results.png")) > 10_000
    comparisons = pipeline.read_jsonl(os.path.join(workdir, "comparisons", "comparisons_train.jsonl"))
    assert all(4 <= len(r["completions"]) == len(r["ranks"]) <= 9 for r in comparisons)


def test_rerun_skips_every_step(smoke, capsys):
    workdir, results = smoke
    before = snapshot(workdir)
    assert pipeline.train(pipeline_config(), workdir)["models"] == results["models"]
    out = capsys.readouterr().out
    assert all(f"{step:<11} skip" in out for step in pipeline.STEPS), out
    assert " start " not in out and "| PPO-ptx |" in out
    after = snapshot(workdir)
    changed = [p for p in after if before.get(p) != after[p] and not p.endswith(os.sep + "config.json")]
    assert not changed  # only the top-level record of the config is rewritten


def test_changed_config_of_a_finished_stage_is_an_error_that_touches_nothing(smoke):
    workdir, _ = smoke
    config = pipeline_config()
    config.sft.optim.lr = 0.123
    before = snapshot(workdir)
    with pytest.raises(ValueError, match=r"stage 'sft'.*different config") as e:
        pipeline.train(config, workdir)
    assert "optim.lr" in str(e.value) and "0.123" in str(e.value)
    assert snapshot(workdir) == before


def test_bootstrap_ci_hand_case():
    # Resample means 0, .5, 1, .5 -> sorted [0, .5, .5, 1]; numpy's linear percentiles at 2.5 / 97.5.
    lo, hi = evaluate.bootstrap_ci([0.0, 1.0], indices=[[0, 0], [0, 1], [1, 1], [1, 0]])
    assert lo == pytest.approx(0.075 * 0.5) and hi == pytest.approx(0.5 + 0.925 * 0.5)
    assert evaluate.bootstrap_ci([0.7] * 5, num_samples=50) == pytest.approx((0.7, 0.7))
    lo, hi = evaluate.bootstrap_ci(np.r_[np.ones(60), np.zeros(40)], num_samples=2000, seed=1)
    assert lo < 0.6 < hi and hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.24 / 100), abs=0.03)


def test_win_rate_counts_ties_half():
    labeler = synthetic.Labeler()
    prompts = ["Q: reverse: cat dog\nA:"] * 4
    ours = ["dog cat", "dog cat", "cat dog", "dog darn cat"]
    sft = ["cat dog", "dog cat", "dog cat", "cat dog"]  # win, tie, loss, loss (harmful vs wrong)
    wins = evaluate.win_rates(labeler, prompts, ours, sft)
    np.testing.assert_array_equal(wins, [1.0, 0.5, 0.0, 0.0])
    assert wins.mean() == 0.375
