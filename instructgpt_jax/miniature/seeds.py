"""Several seeds of the miniature side by side: each seed's figures, their mean and spread, and each finding
stated as "holds in n of N seeds".

    python -m instructgpt_jax.miniature.seeds RUN_SEED0 RUN_SEED1 RUN_SEED2 [--split test|validation]

Each RUN is a finished `configs/pipeline.py` (or `:methods`) workdir of one `--config.seed`. Prints markdown.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

from instructgpt_jax.errors import UserError

NAMES = {"base": "base (pretrained)", "sft": "SFT", "sft_large": "SFT 3.6x", "ppo": "PPO", "ppo_ema": "PPO (EMA)",
         "ppo_ptx": "PPO-ptx", "ppo_ptx_ema": "PPO-ptx (EMA)", "dpo": "DPO", "dpo_pl": "DPO-PL", "grpo": "GRPO",
         "grpo_verifier": "GRPO-verifier", "ppo_lora": "PPO-LoRA"}


def load(workdir: str, split: str = "test") -> dict:
    """model -> its figures on `split` (results.json: the test split at the top, validation under 'validation')."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        raise UserError(f"{path}: no results; has that pipeline finished?")
    with open(path) as f:
        r = json.load(f)
    models = r["models"] if split == "test" else r["validation"]["models"]
    seed = "?"
    if os.path.exists(os.path.join(workdir, "config.json")):
        with open(os.path.join(workdir, "config.json")) as f:
            seed = json.load(f).get("seed", "?")
    return {"seed": seed, "models": models}


FINDINGS = {  # name -> (models it needs, test on one seed's models)
    "SFT preferred to the base model (base's interval below 50 %)": (("base",), lambda m: m["base"]["win_ci"][1] < .5),
    "PPO preferred to SFT (interval above 50 %)": (("ppo",), lambda m: m["ppo"]["win_ci"][0] > .5),
    "PPO-ptx preferred to SFT (interval above 50 %)": (("ppo_ptx",), lambda m: m["ppo_ptx"]["win_ci"][0] > .5),
    "PPO-ptx within 5 points of PPO's win rate": (
        ("ppo", "ppo_ptx"), lambda m: abs(m["ppo_ptx"]["win_rate"] - m["ppo"]["win_rate"]) <= 0.05),
    "PPO-ptx's tax below PPO's (held-out LM loss)": (("ppo", "ppo_ptx"), lambda m: m["ppo_ptx"]["tax"] < m["ppo"]["tax"]),
    "small PPO preferred to the 3.6x SFT model (interval above 50 %)": (
        ("ppo", "sft_large"), lambda m: m["ppo"]["vs_large"]["win_ci"][0] > .5),
    "PPO's win rate above DPO's": (("ppo", "dpo"), lambda m: m["ppo"]["win_rate"] > m["dpo"]["win_rate"]),
    "PPO's win rate above GRPO-verifier's": (
        ("ppo", "grpo_verifier"), lambda m: m["ppo"]["win_rate"] > m["grpo_verifier"]["win_rate"]),
    "PPO-LoRA (rank 8) preferred to SFT (interval above 50 %)": (
        ("ppo_lora",), lambda m: m["ppo_lora"]["win_ci"][0] > .5),
    "PPO-LoRA within 5 points of PPO's win rate": (
        ("ppo", "ppo_lora"), lambda m: abs(m["ppo_lora"]["win_rate"] - m["ppo"]["win_rate"]) <= 0.05),
    "GRPO (RM) over-optimises: higher RM score, lower utility than PPO": (
        ("ppo", "grpo"), lambda m: m["grpo"]["rm_score"] > m["ppo"]["rm_score"]
        and m["grpo"]["utility"] < m["ppo"]["utility"]),
}


def _findings(m: dict) -> dict:
    """Each finding on one seed: True / False, or None when a model or figure it needs is missing (a stage that
    did not run; the tax and the comparison with the larger model exist on the test split only)."""
    out = {}
    for name, (needs, test) in FINDINGS.items():
        try:
            out[name] = bool(test(m)) if all(k in m for k in needs) else None
        except KeyError:
            out[name] = None
    return out


def _spread(xs) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def summarize(workdirs, split: str = "test") -> str:
    runs = [load(w, split) for w in workdirs]
    seeds = [str(r["seed"]) for r in runs]
    models = [k for k in NAMES if any(k in r["models"] for r in runs)]
    out = [f"Win rate vs SFT (%, ties half, {split} split) per seed, then mean ± standard deviation over seeds; "
           f"KL to SFT and tax vs SFT (nats) as means.", "",
           "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | KL to SFT | tax |",
           "|---|" + "---|" * (len(seeds) + 3)]
    for k in models:
        rows = [r["models"].get(k) for r in runs]
        have = [x for x in rows if x]
        cells = [f"{100 * x['win_rate']:.1f} [{100 * x['win_ci'][0]:.1f}, {100 * x['win_ci'][1]:.1f}]" if x else "–"
                 for x in rows]
        mean = lambda key, fmt: (fmt.format(statistics.mean(x[key] for x in have))  # noqa: E731
                                 if all(key in x for x in have) else "–")  # the tax: test split only
        out.append(f"| {NAMES[k]} | " + " | ".join(cells) + f" | {_spread([100 * x['win_rate'] for x in have])} | "
                   f"{mean('kl_to_sft', '{:.2f}')} | {mean('tax', '{:+.3f}')} |")
    out += ["", "| finding | holds in |", "|---|---|"]
    per_seed = [_findings(r["models"]) for r in runs]
    for name in per_seed[0]:
        vals = [f[name] for f in per_seed if f[name] is not None]
        out.append(f"| {name} | " + (f"{sum(vals)} of {len(vals)} seeds" if vals else "not measured") + " |")
    return "\n".join(out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = "test"
    for a in list(argv):
        if a.startswith("--split="):
            split = a.split("=", 1)[1]
            argv.remove(a)
    if split not in ("test", "validation") or not argv:
        sys.stderr.write("usage: python -m instructgpt_jax.miniature.seeds RUN [RUN ...] [--split=test|validation]\n")
        sys.exit(2)
    try:
        print(summarize(argv, split))
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
