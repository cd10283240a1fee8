"""The one-command pipeline on configs/pipeline.py:smoke: plumbing and result files (not the science),
skipping on rerun, the changed-config error, the compute accounting and the evaluation statistics."""
import json
import os

import numpy as np
import pytest

from instructgpt_jax import config_lib
from instructgpt_jax.miniature import evaluate, pipeline, world as synthetic

METRICS = {"wins", "ties", "losses", "win_rate", "win_ci", "decisive_win_rate", "decisive_ci", "true_win_rate",
           "true_win_ci", "utility", "utility_ci", "violations", "correct", "rm_score", "rm_ci", "kl_to_sft", "kl_ci",
           "heldout_loss", "tax", "tax_vs_base", "vs_large"}


def pipeline_config(arg="smoke", **overrides):
    return config_lib.load("pipeline", arg, **overrides)


def smoke_workdir(tmp_path_factory) -> str:
    """One smoke run per test session, shared with test_notebooks (a rerun skips every step)."""
    return str(tmp_path_factory.getbasetemp() / "pipeline_smoke")


def snapshot(root):
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_mtime_ns, os.stat(os.path.join(d, f)).st_size)
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def smoke_default(tmp_path_factory):
    """The smoke run without the methods (test_notebooks' run when it made one: then every step skips)."""
    workdir = smoke_workdir(tmp_path_factory)
    return workdir, pipeline.train(pipeline_config(), workdir)


@pytest.fixture(scope="module")
def smoke(smoke_default):
    """The same workdir with `methods` on: only the methods' stages and the evaluation run."""
    workdir, _ = smoke_default
    before = snapshot(workdir)
    results = pipeline.train(pipeline_config(methods=True), workdir)
    return workdir, results, before


def test_default_runs_instructgpt_and_methods_add_only_their_stages(smoke_default, smoke):
    workdir, default_results = smoke_default
    assert set(default_results["models"]) == set(evaluate.MODELS) - set(pipeline.METHODS)
    names = [s.name for s in pipeline.plan(pipeline_config(), workdir)]
    assert not set(pipeline.METHODS) & set(names) and names[-1] == "eval"
    _, results, before = smoke
    after = snapshot(workdir)
    changed = {os.path.relpath(p, workdir).split(os.sep)[0] for p in after if before.get(p) != after[p]}
    # the new stages, the redone evaluation and its reports; no finished stage of the default is touched
    assert changed == {*pipeline.METHODS, "eval", "results.json", "results.md", "results.png", "timings.json",
                       "config.json"}
    for name in ("sft", "ppo", "sft_large"):  # the evaluation is deterministic: the default's rows are unchanged
        assert results["models"][name] == default_results["models"][name]


def test_default_and_smoke_configs_share_the_code_path():
    default, smoke_cfg = pipeline_config("default"), pipeline_config("smoke")
    assert default.stage == smoke_cfg.stage == "pipeline"
    assert default.to_dict().keys() == smoke_cfg.to_dict().keys()
    assert [default[s].stage for s in pipeline.TRAINED] == [
        "pretrain", "sft", "rm", "ppo", "ppo", "dpo", "dpo", "ppo", "ppo", "ppo", "pretrain", "sft"]
    assert default.ppo_lora.lora.rank == 8 and default.ppo.lora.rank == 0  # only the LoRA row has adapters
    assert not default.methods and pipeline_config("methods").methods
    assert default.ppo.ppo.ptx_coef == 0 < default.ppo_ptx.ppo.ptx_coef
    assert (default.dpo.dpo.loss_type, default.dpo_pl.dpo.loss_type) == ("sigmoid", "plackett_luce")
    assert default.grpo.ppo.advantage_estimator == "grpo" and default.grpo_verifier.ppo.reward == "verifier"
    # the larger SFT model: about 4x the parameters of the tiny one (embeddings included)
    count = lambda m: m.num_layers * (4 * m.d_model ** 2 + 2 * m.d_model * m.mlp_dim) + (  # noqa: E731
        m.vocab_size + m.max_len) * m.d_model
    assert 3.0 < count(default.sft_large.model) / count(default.sft.model) < 4.5
    assert default.sft.optim.lr < default.pretrain.optim.lr / 5  # SFT must not wash out pretraining
    assert not default.sweep.enabled and pipeline_config("sweep").sweep.enabled
    with pytest.raises(ValueError, match="smoke"):
        pipeline_config("nope")


def test_compute_tokens_hand_counts():
    config = pipeline_config("smoke")
    # PPO-ptx: 2 iterations x 8 rows x (16 + 20) tokens, 1 epoch, 2 minibatches each with 4 ptx rows of 64
    assert pipeline.compute_tokens(config.ppo_ptx) == {
        "policy_train": 2 * 8 * 36 + 2 * 2 * 4 * 64,
        "forward": 2 * 8 * (36 + 2 * 36 + 36 + 37),  # sampling, old + reference log-probs, values, RM (+ EOS)
        "other_train": 2 * 8 * 36}                   # the value model
    assert pipeline.compute_tokens(config.grpo_verifier) == {  # no value model, no RM
        "policy_train": 2 * 8 * 36, "forward": 2 * 8 * 3 * 36, "other_train": 0}
    assert pipeline.compute_tokens(config.dpo) == {"policy_train": 3 * 8 * 9 * 40, "forward": 3 * 8 * 9 * 40,
                                                   "other_train": 0}
    assert pipeline.compute_tokens(config.sft)["policy_train"] == 10 * 8 * 128


def test_smoke_run_writes_every_stage_and_the_results(smoke):
    workdir, results, _ = smoke
    for step in pipeline.STEPS:
        assert os.path.exists(os.path.join(workdir, step, "config.json")), step
    for stage in pipeline.TRAINED:
        assert os.path.exists(os.path.join(workdir, stage, "export", "meta.json")), stage
    for stage in pipeline.RL_STAGES:
        assert os.path.exists(os.path.join(workdir, stage, "export_ema", "meta.json")), stage
    assert set(results["models"]) == set(evaluate.MODELS)
    n = results["n_prompts"]
    for name, m in results["models"].items():
        assert set(m) == METRICS, name
        assert m["win_ci"][0] <= m["win_rate"] <= m["win_ci"][1]
        assert m["wins"] + m["ties"] + m["losses"] == n
        assert m["win_rate"] == pytest.approx((m["wins"] + 0.5 * m["ties"]) / n)
        assert set(m["violations"]) == set(synthetic.DIMENSIONS)
    sft = results["models"]["sft"]
    assert (sft["wins"], sft["ties"], sft["tax"]) == (0, n, 0.0) and sft["kl_to_sft"] == 0.0
    assert results["models"]["sft_large"]["vs_large"]["ties"] == n
    assert set(results["compute"]) == set(evaluate.MODELS)
    assert set(results["rm_accuracy"]["dimensions"]) == set(synthetic.DIMENSIONS)
    assert {"ppo_win_rate_at_least_65", "ptx_tax_at_most_half_of_ppo", "rm_accuracy_at_least_65",
            "base_below_sft"} <= set(results["checks"])
    assert results == json.load(open(os.path.join(workdir, "results.json")))
    md = open(os.path.join(workdir, "results.md")).read()
    assert all(f"| {label} |" in md for label in evaluate.LABELS.values())
    assert os.path.getsize(os.path.join(workdir, "results.png")) > 10_000
    comparisons = pipeline.read_jsonl(os.path.join(workdir, "comparisons", "comparisons_train.jsonl"))
    assert all(4 <= len(r["completions"]) == len(r["ranks"]) <= 9 for r in comparisons)


def _strings(value):
    """Every string inside a JSON row (prompts, responses, texts, completions)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_held_out_data_never_occurs_in_training_text(smoke):
    workdir, results, _ = smoke
    splits = results["splits"]
    sub = lambda p: os.path.join(workdir, p)  # noqa: E731
    assert set(splits) == {"test_prompts", "validation_prompts", "heldout_text", "training_text"}
    assert set(splits["training_text"]) == {  # every file a model of the run trained on (methods on)
        "data/pretrain_train.jsonl", "data/demos_train.jsonl", "data/comparison_prompts_train.jsonl",
        "comparisons/comparisons_train.jsonl", "data/ppo_prompts.jsonl"}
    config = pipeline_config()
    held = {}
    for split, n in (("test_prompts", config.eval.num_prompts), ("validation_prompts", config.eval.validation_prompts)):
        prompts = [r["prompt"] for r in pipeline.read_jsonl(sub(splits[split]))]
        assert len(prompts) == len(set(prompts)) == n, split  # distinct prompts, as many as configured
        held[split] = prompts
    assert not set(held["test_prompts"]) & set(held["validation_prompts"])
    assert results["n_prompts"] == config.eval.num_prompts
    assert results["validation"]["n_prompts"] == config.eval.validation_prompts
    texts = {synthetic.parse_prompt(p).text for ps in held.values() for p in ps}
    for path in splits["training_text"]:
        strings = [x for row in pipeline.read_jsonl(sub(path)) for x in _strings(row)]
        assert strings, path
        for x in strings:
            assert not any(synthetic.format_prompt(t) in x for t in texts), (path, x)
            lines = {line.strip().removeprefix("Q:").removeprefix("A:").strip() for line in x.split("\n")}
            assert not lines & texts, (path, x)  # no held-out instruction as a line of its own either
    pretraining = [r["text"] for r in pipeline.read_jsonl(sub("data/pretrain_train.jsonl"))]
    heldout = [r["text"] for r in pipeline.read_jsonl(sub(splits["heldout_text"]))]
    assert heldout and not any(h in d for h in heldout for d in pretraining)
    for name, value in results["checks"].items():
        assert value is None or type(value) is bool, (name, value)


def test_validation_is_evaluated_like_test(smoke):
    workdir, results, _ = smoke
    val = results["validation"]
    assert set(val["models"]) == set(results["models"])
    n = val["n_prompts"]
    for name, m in val["models"].items():
        assert set(m) == METRICS - {"heldout_loss", "tax", "tax_vs_base"}, name  # one held-out text: with test
        assert m["wins"] + m["ties"] + m["losses"] == n
        assert m["win_ci"][0] <= m["win_rate"] <= m["win_ci"][1]
    assert val["models"]["sft"]["ties"] == n and val["models"]["sft"]["kl_to_sft"] == 0.0
    fams = results["prompt_families"]
    assert sum(c["prompts"] for c in fams["test"].values()) == results["n_prompts"]
    assert sum(c["prompts"] for c in fams["validation"].values()) == n
    md = open(os.path.join(workdir, "results.md")).read()
    assert "## Validation and test side by side" in md and "| win rate vs SFT: validation [CI] | test [CI] |" in md
    side = md.split("## Validation and test side by side")[1].split("## Test split")[0]
    assert all(f"| {evaluate.LABELS[name]} |" in side for name in results["models"])


def test_rm_scores_the_sampled_ids(smoke):
    """The evaluation's RM rows from sampled ids are the RM's training rows (no decode -> encode round trip)."""
    from instructgpt_jax import checkpoints, scoring
    from instructgpt_jax.data import iterators
    from instructgpt_jax.data.tokenizer import load_tokenizer
    workdir, _, _ = smoke
    tok = load_tokenizer(checkpoints.export_path(os.path.join(workdir, "sft")))
    rm = scoring.RewardModel.load(os.path.join(workdir, "rm"))
    assert scoring.Retokenizer.load(os.path.join(workdir, "rm"), rm, tok) is None  # the RM shares the tokenizer
    config = pipeline_config()
    seq, plen = config.rm.data.seq_len, config.rm.data.max_prompt_len
    for row in pipeline.read_jsonl(os.path.join(workdir, "comparisons", "comparisons_eval.jsonl"))[:4]:
        trained = iterators.comparison_example(row, tok, seq_len=seq, max_prompt_len=plen, max_k=9)["pieces"]
        if not trained:  # an all-tied row: the RM never trains on it
            continue
        for j, (text, ids) in enumerate(zip(row["completions"], row["completion_ids"])):
            scored = iterators.scoring_example(row["prompt"], text, tok, seq_len=seq, max_prompt_len=plen,
                                               completion_ids=ids)
            np.testing.assert_array_equal(scored["tokens"], trained[0]["tokens"][j])
            assert scored["last_index"] == trained[0]["last_index"][j]
    ids = [[5, 6, 7], []]
    by_ids = evaluate.rm_scores(rm, tok, ["Q: add: 1 + 2\nA:"] * 2, ["ignored", "ignored"], ids=ids, batch_size=2,
                                seq_len=seq, max_prompt_len=plen, mesh=None)
    rows = [iterators.scoring_example("Q: add: 1 + 2\nA:", "", tok, seq_len=seq, max_prompt_len=plen,
                                      completion_ids=i) for i in ids]
    direct = rm(*(np.stack([r[k] for r in rows]) for k in ("tokens", "segment_ids", "positions", "last_index")))
    np.testing.assert_allclose(by_ids, np.asarray(direct), rtol=1e-6)


def _check_results(dimensions, probes=None, win=0.7):
    ppo = {"win_rate": win, "win_ci": [win - 0.05, win + 0.05], "tax": 0.1}
    r = {"models": {"ppo": ppo, "ppo_ptx": dict(ppo, tax=0.01), "base": dict(ppo, win_ci=[0.3, 0.4])},
         "rm_accuracy": {"vs_labels": 0.7, "dimensions": dimensions}}
    if probes is not None:
        r["rm_accuracy"]["probes"] = probes
    return evaluate.acceptance(r)


def test_checks_without_data_are_null_never_true():
    good = {d: {"accuracy": 0.8, "pairs": 10} for d in synthetic.DIMENSIONS}
    assert all(v is True for v in _check_results(good, good).values())
    empty = dict(good, echo={"accuracy": float("nan"), "pairs": 0})
    checks = _check_results(empty, {d: {"accuracy": float("nan"), "pairs": 0} for d in synthetic.DIMENSIONS})
    assert checks["rm_above_chance_on_every_dimension"] is None and checks["rm_above_chance_on_every_probe"] is None
    below = dict(empty, task={"accuracy": 0.4, "pairs": 10})  # a failure is a failure, missing data or not
    assert _check_results(below)["rm_above_chance_on_every_dimension"] is False
    checks = _check_results(good, win=float("nan"))
    assert checks["ppo_win_rate_at_least_65"] is None and checks["ptx_win_rate_within_3_points_of_ppo"] is None
    assert evaluate.every([]) is None and evaluate.every([True, None]) is None
    assert evaluate.every([None, False]) is False
    assert [evaluate.check_word(v) for v in (True, False, None)] == ["yes", "NO", "n/a"]


def test_rerun_skips_every_step(smoke, capsys):
    workdir, results, _ = smoke
    before = snapshot(workdir)
    assert pipeline.train(pipeline_config(methods=True), workdir)["models"] == results["models"]
    out = capsys.readouterr().out
    assert all(f"{step:<14} skip" in out for step in pipeline.STEPS), out
    assert " start " not in out and "| PPO-ptx |" in out and "| GRPO-verifier |" in out
    after = snapshot(workdir)
    changed = [p for p in after if before.get(p) != after[p] and not p.endswith(os.sep + "config.json")]
    assert not changed  # only the top-level record of the config is rewritten


def test_changed_config_of_a_finished_stage_is_an_error_that_touches_nothing(smoke):
    workdir, _, _ = smoke
    config = pipeline_config(methods=True)
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


def test_bootstrap_ratio_ci_hand_case():
    # wins / decisive over resamples: [0/1, 1/2, 1/1, 0/0 dropped] -> sorted [0, .5, 1]
    lo, hi = evaluate.bootstrap_ratio_ci([0, 1, 0], [1, 1, 0], indices=[[0, 0, 2], [0, 1, 2], [1, 2, 2], [2, 2, 2]])
    assert lo == pytest.approx(0.025) and hi == pytest.approx(0.975)


def test_preference_stats_counts_and_intervals():
    out = evaluate.preference_stats([1.0, 0.5, 0.0, 1.0], indices=np.array([[0, 1, 2, 3]] * 3))
    assert (out["wins"], out["ties"], out["losses"]) == (2, 1, 1)
    assert out["win_rate"] == 0.625 and out["win_ci"] == [0.625, 0.625]
    assert out["decisive_win_rate"] == pytest.approx(2 / 3) and out["decisive_ci"] == pytest.approx([2 / 3, 2 / 3])


def test_held_out_judges_are_reproducible_noisy_and_tie_identical_answers():
    judges = synthetic.labeler_population(3, 0.35, seed=0, group="heldout")
    prompts = ["Q: reverse: cat dog\nA:"] * 200
    a = evaluate.judge_all(judges, prompts, ["dog cat"] * 200, ["cat dog"] * 200, seed=0, tag="x")
    assert np.array_equal(a, evaluate.judge_all(judges, prompts, ["dog cat"] * 200, ["cat dog"] * 200, 0, "x"))
    assert 0.6 < a.mean() < 1.0  # the right answer usually wins, but the judges are noisy
    assert (evaluate.judge_all(judges, prompts[:5], ["cat dog"] * 5, ["cat dog"] * 5, 0, "x") == 0.5).all()


def test_sweep_runs_cover_the_grid_and_the_oracle(tmp_path):
    config = pipeline_config("sweep")
    runs = pipeline.sweep_runs(config, str(tmp_path))
    grid = [(b, n) for b in config.sweep.kl_coefs for n in config.sweep.num_steps]
    assert len(runs) == len(grid) + 1
    swept = [(r.ppo.kl_coef, r.train.num_steps) for t, r in runs.items() if not t.startswith("oracle")]
    assert sorted(swept) == sorted(grid)
    oracle = next(r for t, r in runs.items() if t.startswith("oracle"))
    assert oracle.ppo.reward == "verifier" and oracle.ppo.verifier.endswith("world:oracle")
    assert oracle.ppo.rm_workdir == os.path.join(str(tmp_path), "rm")  # the value model starts from the RM
    assert [s.name for s in pipeline.plan(config, str(tmp_path))][-1] == "sweep"
    assert "sweep" not in [s.name for s in pipeline.plan(pipeline_config(), str(tmp_path))]


def test_rm_probes_violate_exactly_their_dimension():
    prompts = [synthetic.format_prompt(p.text) for p in synthetic.make_prompts(200, 0, "test", tempt_rate=0.5)]
    probes = evaluate.probe_pairs(prompts, seed=0)
    assert set(probes) == set(synthetic.DIMENSIONS) and all(len(v) > 20 for v in probes.values())
    for d, pairs in probes.items():
        for prompt, good, bad in pairs:
            assert synthetic.verify(prompt, good) == 1.0
            v = synthetic.violations(prompt, bad)
            assert v[d] > 0 and {o for o, x in v.items() if x > 0} <= {d, "task"}
    assert all(synthetic.parse_prompt(p).caps for p, _, _ in probes["format"])


def test_compilation_cache_is_scoped_to_the_run_and_respects_the_users(tmp_path):
    import jax
    saved = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)  # as in a user's process without the env var
        with pipeline.compilation_cache(str(tmp_path / "cache")):
            assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
            jax.jit(lambda x: x * 3.0 + 1.0)(np.arange(7.0)).block_until_ready()
        assert jax.config.jax_compilation_cache_dir is None and os.listdir(tmp_path / "cache")
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
        with pipeline.compilation_cache(str(tmp_path / "other")):  # the user's own cache wins
            assert jax.config.jax_compilation_cache_dir == str(tmp_path / "users")
        assert not os.path.exists(tmp_path / "other")
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
        from jax.experimental.compilation_cache import compilation_cache as cc
        cc.reset_cache()


def test_sweep_plot_reads_every_tag(tmp_path):
    assert pipeline._tag_value("oracle_kl0.01_it120", "kl") == 0.01 and pipeline._tag_value("kl1_it30", "it") == 30
    point = {"kl_to_sft": 4.0, "utility": 0.1, "rm_score": 1.0, "win_rate": 0.6, "win_ci": [0.5, 0.7]}
    points = {"sft": dict(point, kl_to_sft=0.0), "kl0.1_it30": point, "kl0.1_it120": point, "kl1_it30": point,
              "oracle_kl0.1_it120": point}
    pipeline.plot_sweep(points, str(tmp_path / "sweep.png"))
    assert os.path.getsize(tmp_path / "sweep.png") > 10_000
