"""The miniature's several-seed summary: per-seed cells, mean ± sd, and findings counted per seed."""
import json

import pytest

from instructgpt_jax.miniature import seeds


def run(tmp_path, seed, ppo_win, ppo_lo, dpo_win=None):
    d = tmp_path / f"s{seed}"
    d.mkdir()
    row = lambda w, lo, **kw: {**dict(win_rate=w, win_ci=[lo, w + 0.03], kl_to_sft=1.0, tax=0.1,  # noqa: E731
                                      rm_score=0.0, utility=0.0), **kw}
    models = {"base": row(0.34, 0.31), "sft": row(0.5, 0.5), "ppo": row(ppo_win, ppo_lo, tax=0.2),
              "ppo_ptx": row(ppo_win - 0.01, ppo_lo, tax=-0.5)}
    if dpo_win is not None:
        models["dpo"] = row(dpo_win, dpo_win - 0.03)
    (d / "results.json").write_text(json.dumps({"models": models, "validation": {"models": models}}))
    (d / "config.json").write_text(json.dumps({"seed": seed}))
    return str(d)


def test_summary_counts_each_finding_per_seed(tmp_path):
    dirs = [run(tmp_path, 0, 0.64, 0.61, dpo_win=0.70), run(tmp_path, 1, 0.60, 0.57, dpo_win=0.50),
            run(tmp_path, 2, 0.52, 0.49)]
    text = seeds.summarize(dirs)
    assert "| seed 0 | seed 1 | seed 2 |" in text
    assert "| PPO | 64.0 [61.0, 67.0] | 60.0 [57.0, 63.0] | 52.0 [49.0, 55.0] | 58.7 ± 6.1 |" in text
    assert "| PPO preferred to SFT (interval above 50 %) | 2 of 3 seeds |" in text  # seed 2's interval starts at 49
    assert "| PPO's win rate above DPO's | 1 of 2 seeds |" in text  # DPO ran in two seeds, PPO won one
    assert "| PPO-ptx's tax below PPO's (held-out LM loss) | 3 of 3 seeds |" in text
    assert "GRPO-verifier's | not measured |" in text


def test_missing_results_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        seeds.main([str(tmp_path)])
    assert e.value.code == 2 and "no results" in capsys.readouterr().err
