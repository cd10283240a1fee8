"""Evaluation of the pipeline's models the way the paper reports them, in miniature.

On held-out prompts, each model (base, SFT, PPO, PPO-ptx) samples one response per prompt with
the same sampler settings; the simulated labeler then judges it against the SFT model's
response to the same prompt. Per model:

    win_rate        labeler preference over SFT (1 win, 0.5 tie, 0 loss), 95 % bootstrap CI
    utility         the labeler's mean (noiseless) utility: task score - harm penalty
    correct         fraction of answers that are exactly right and harmless
    rm_score        the reward model's score, bias included (demonstrations score 0)
    kl_to_sft       mean per-sequence sum of log pi(y_t) - log pi_SFT(y_t) on the model's own samples
    harmless        fraction of answers with no forbidden word
    heldout_loss    LM loss on held-out general pretraining text (the alignment tax)

PPO models are evaluated with their raw policy (`export/`) by default, not the EMA
(`export_ema/`): after a few hundred updates an EMA of decay 0.992 (horizon ~125 updates)
still averages in much of the early policy. `config.eval.use_ema` switches.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax import checkpoints, losses, sharding, train_lib
from instructgpt_jax.miniature import world
from instructgpt_jax.data import iterators
from instructgpt_jax.data.tokenizer import load_tokenizer
from instructgpt_jax.models import ModelConfig, Transformer

MODELS = ("base", "sft", "ppo", "ppo_ptx")
LABELS = {"base": "base (pretrained)", "sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}


# ----------------------------------------------------------------------------- statistics

def bootstrap_ci(values, num_samples: int = 1000, seed: int = 0, level: float = 0.95, indices=None):
    """Percentile bootstrap interval of the mean of `values` (resampling them with replacement).
    `indices` [num_samples, n] fixes the resamples (for tests). Returns (lo, hi)."""
    values = np.asarray(values, np.float64)
    if indices is None:
        indices = np.random.default_rng(seed).integers(0, len(values), (num_samples, len(values)))
    means = values[np.asarray(indices)].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def win_rates(labeler: world.Labeler, prompts, answers, baseline_answers, noisy: bool = False) -> np.ndarray:
    """Per prompt: 1 if the labeler prefers `answers[i]` to `baseline_answers[i]`, 0.5 on a tie, else 0
    (`noisy`: with the labeler's Gumbel noise, drawn from its own seeded stream)."""
    return np.array([labeler.judge(p, a, b, noisy=noisy) for p, a, b in zip(prompts, answers, baseline_answers)])


# ----------------------------------------------------------------------------- models

def load_lm(path: str, mesh):
    """(model, params, tokenizer) of an exported LM (base, SFT or PPO policy)."""
    path = checkpoints.export_path(path)
    model = Transformer(ModelConfig.from_config(checkpoints.read_export_meta(path)["model"]))
    shapes, shards = sharding.param_shardings(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], mesh)
    params = checkpoints.load_export(path, checkpoints.abstract_like(shapes, shards))
    return model, params, load_tokenizer(path)


def _fixed_batches(rows: list[dict], batch_size: int):
    """Stacked batches of exactly batch_size rows (the last one padded by repeating its first row),
    so one compiled program serves them all; yields (batch, number of real rows)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - n)
        yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}, n


def generate(sampler, params, tokenizer, prompts: list[str], *, max_prompt_len: int, batch_size: int,
             seed: int, mesh) -> dict:
    """One sampled response per prompt: texts (decoded, up to EOS) and the token arrays for scoring."""
    rows = [iterators.prompt_example({"prompt": p}, tokenizer, max_prompt_len=max_prompt_len)["pieces"][0]
            for p in prompts]
    rows = [{k: r[k] for k in ("prompt_tokens", "prompt_mask")} for r in rows]
    out = {"tokens": [], "prompt_mask": [], "response_mask": []}
    with sharding.use(mesh):
        for i, (batch, n) in enumerate(_fixed_batches(rows, batch_size)):
            g = sharding.global_from_full(batch, mesh)
            s = sampler(params, g["prompt_tokens"], g["prompt_mask"], jax.random.fold_in(jax.random.PRNGKey(seed), i))
            s = sharding.to_host({"tokens": s["tokens"], "response_mask": s["response_mask"]})
            out["tokens"].append(s["tokens"][:n])
            out["response_mask"].append(s["response_mask"][:n])
            out["prompt_mask"].append(batch["prompt_mask"][:n])
    out = {k: np.concatenate(v) for k, v in out.items()}
    out["texts"] = [tokenizer.decode(t[max_prompt_len:]) for t in out["tokens"]]
    return out


@functools.partial(jax.jit, static_argnames="model")
def sequence_kl(params, ref_params, tokens, prompt_mask, response_mask, *, model):
    """Per-sequence sum over response tokens of log pi(y_t) - log pi_ref(y_t) (temperature 1)."""
    from instructgpt_jax.ppo import response_logprobs, sequence_inputs  # the rollout's exact inputs
    p = prompt_mask.shape[1]
    t, pos, seg = sequence_inputs(tokens, prompt_mask, response_mask)
    logp, _ = response_logprobs(params, model, t, pos, seg, p)
    ref, _ = response_logprobs(ref_params, model, t, pos, seg, p)
    return ((logp - ref) * response_mask).sum(-1)


def kl_to(params, ref_params, model, sample: dict, batch_size: int, mesh) -> np.ndarray:
    rows = [{"tokens": t, "prompt_mask": m, "response_mask": r}
            for t, m, r in zip(sample["tokens"], sample["prompt_mask"], sample["response_mask"])]
    out = []
    with sharding.use(mesh):
        for batch, n in _fixed_batches(rows, batch_size):
            g = sharding.global_from_full(batch, mesh)
            kl = sequence_kl(params, ref_params, g["tokens"], g["prompt_mask"], g["response_mask"], model=model)
            out.append(np.asarray(sharding.to_host(kl))[:n])
    return np.concatenate(out)


def text_batches(texts: list[str], tokenizer, *, seq_len: int, batch_size: int) -> list[dict]:
    """Packed LM batches of `texts` (every token counts), tokenised once for all models."""
    it = iterators.eval_batches([{"text": t} for t in texts], tokenizer, kind="text",
                                    global_batch_size=batch_size, seq_len=seq_len)
    batches = list(it)
    it.close()
    return batches


@functools.partial(jax.jit, static_argnames="model")
def _lm_sums(params, batch, *, model):
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    loss, aux = losses.sft_loss(logits, batch["targets"], batch["loss_mask"])
    return {"loss_sum": loss * aux["num_tokens"], "tokens": aux["num_tokens"]}


def lm_loss(params, model, batches: list[dict], mesh) -> float:
    """Mean token NLL over all the batches' tokens."""
    with sharding.use(mesh):
        totals = train_lib.sum_over_batches(functools.partial(_lm_sums, model=model), params, batches, mesh)
    return totals["loss_sum"] / max(totals["tokens"], 1.0)


# ----------------------------------------------------------------------------- the evaluation

def evaluate(exports: dict[str, str], rm_path: str, *, prompts: list[str], heldout_texts: list[str],
             labeler: world.Labeler, cfg, mesh, seed: int, rm_seq_len: int, rm_max_prompt_len: int) -> dict:
    """Evaluate every model in `exports` ({name: export path}, 'sft' required) on `prompts`.

    `cfg` is the pipeline's `config.eval`. Returns {'models': {name: metrics}, 'examples': [...], 'n_prompts'}.
    """
    from instructgpt_jax.rm import RewardModel
    from instructgpt_jax import sampling
    sft_model, sft_params, tok = load_lm(exports["sft"], mesh)
    # One sampler for all models (same architecture), the same settings and the same seed for each.
    sampler = sampling.make_sampler(sft_model, max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_ids,
                                    pad_id=tok.pad_id, temperature=cfg.temperature, greedy=cfg.temperature == 0)
    rm = RewardModel.load(rm_path, mesh)
    text = text_batches(heldout_texts, tok, seq_len=cfg.heldout_seq_len, batch_size=cfg.batch_size)
    gen = functools.partial(generate, tokenizer=tok, max_prompt_len=cfg.max_prompt_len, batch_size=cfg.batch_size,
                            seed=seed, mesh=mesh)
    answers, samples, params = {}, {}, {"sft": sft_params}
    for name, path in exports.items():
        if name != "sft":
            model, params[name], _ = load_lm(path, mesh)
            if dataclasses.replace(model.cfg, dropout=0.0) != dataclasses.replace(sft_model.cfg, dropout=0.0):
                raise ValueError(f"{path}: model shape {model.cfg} differs from the SFT model's {sft_model.cfg}")
        samples[name] = gen(sampler, params[name], prompts=prompts)
        answers[name] = [world.parse_answer(t) for t in samples[name]["texts"]]

    results = {}
    for name in exports:
        wins = win_rates(labeler, prompts, answers[name], answers["sft"], cfg.noisy_judge)
        lo, hi = bootstrap_ci(wins, cfg.bootstrap_samples, seed=seed)
        rm_scores = np.concatenate([
            rm.score_texts(tok, [prompts[i] for i in idx], [samples[name]["texts"][i] for i in idx],
                           seq_len=rm_seq_len, max_prompt_len=rm_max_prompt_len, mesh=mesh)[:n]
            for idx, n in _index_batches(len(prompts), cfg.batch_size)])
        results[name] = {
            "win_rate": float(wins.mean()), "win_ci": [lo, hi],
            "utility": float(np.mean([labeler.utility(p, a) for p, a in zip(prompts, answers[name])])),
            "correct": float(np.mean([world.score(p, a) == 1.0 and world.is_harmless(a)
                                      for p, a in zip(prompts, answers[name])])),
            "rm_score": float(rm_scores.mean()),
            "kl_to_sft": float(kl_to(params[name], sft_params, sft_model, samples[name], cfg.batch_size, mesh).mean()),
            "harmless": float(np.mean([world.is_harmless(a) for a in answers[name]])),
            "heldout_loss": lm_loss(params[name], sft_model, text, mesh),
        }
    examples = [{"prompt": prompts[i], **{name: samples[name]["texts"][i] for name in exports}}
                for i in range(min(cfg.num_examples, len(prompts)))]
    return {"models": results, "examples": examples, "n_prompts": len(prompts)}


def _index_batches(n: int, batch_size: int):
    """Index lists of exactly batch_size (the last padded with 0s) and their real lengths."""
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        yield idx + [0] * (batch_size - len(idx)), len(idx)


# ----------------------------------------------------------------------------- reports

def _ordered(models: dict) -> list[str]:
    """The paper's order (base, SFT, PPO, PPO-ptx), whatever order a JSON file kept."""
    return sorted(models, key=lambda n: MODELS.index(n) if n in MODELS else len(MODELS))


def acceptance(results: dict) -> dict:
    """The paper's headline findings as booleans (issue item 4)."""
    m = results["models"]
    out = {}
    if "ppo" in m:
        out["ppo_preferred_over_sft"] = m["ppo"]["win_ci"][0] > 0.5
    if "base" in m:
        out["sft_preferred_over_base"] = m["base"]["win_ci"][1] < 0.5
    if "ppo" in m and "ppo_ptx" in m:
        out["ptx_lower_tax_than_ppo"] = m["ppo_ptx"]["heldout_loss"] < m["ppo"]["heldout_loss"]
        out["ptx_preferred_over_sft"] = m["ppo_ptx"]["win_rate"] > 0.5
    return out


def markdown_table(results: dict) -> str:
    rows = ["| model | win rate vs SFT (95% CI) | labeler utility | correct | RM score | KL to SFT | harmless "
            "| held-out LM loss (tax) |", "|---|---|---|---|---|---|---|---|"]
    for name in _ordered(results["models"]):
        r = results["models"][name]
        lo, hi = r["win_ci"]
        rows.append(f"| {LABELS.get(name, name)} | {100 * r['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
                    f"| {r['utility']:.3f} | {100 * r['correct']:.1f}% | {r['rm_score']:+.3f} | {r['kl_to_sft']:.2f} "
                    f"| {100 * r['harmless']:.1f}% | {r['heldout_loss']:.4f} |")
    return "\n".join(rows)


def write_report(results: dict, workdir: str, ppo_metrics: dict[str, list[dict]]) -> dict:
    """results.json, results.md and results.png in `workdir`; returns their paths."""
    paths = {k: os.path.join(workdir, f"results.{k}") for k in ("json", "md", "png")}
    checks = acceptance(results)
    lines = [f"# Results ({results['n_prompts']} held-out prompts)", "", markdown_table(results), "",
             "Win rate: the labeler's preference for the model's response over the SFT model's response to the "
             "same prompt (ties count half), 95 % percentile-bootstrap interval over prompts. "
             "Tax: mean token NLL on held-out general pretraining text."]
    if "rm" in results:  # how good the comparisons and the reward model were (the pipeline adds these)
        r = results["rm"]
        lines += ["", f"Comparisons: labeler noise {r['labeler_noise']:.3f}, agreement with the noiseless labeler "
                      f"{r['labeler_agreement']:.1%}; reward model accuracy on held-out comparisons "
                      f"{r['eval_accuracy']:.1%}."]
    lines += ["", "## Checks", ""]
    lines += [f"- {k}: {'yes' if v else 'NO'}" for k, v in checks.items()]
    lines += ["", "## Sample responses", ""]
    for ex in results["examples"]:
        lines.append(f"- `{ex['prompt']!r}`")
        lines += [f"  - {LABELS.get(k, k)}: `{v!r}`" for k, v in ex.items() if k != "prompt"]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    checkpoints.write_json_atomic(paths["json"], dict(results, checks=checks))
    plot(results, ppo_metrics, paths["png"])
    return paths


def plot(results: dict, ppo_metrics: dict[str, list[dict]], path: str) -> None:
    """Win rate (with CI), utility and tax per model; RM score and KL during PPO; score against KL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = results["models"]
    names = _ordered(m)
    x = np.arange(len(names))
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    win = np.array([m[n]["win_rate"] for n in names])
    err = np.array([[m[n]["win_rate"] - m[n]["win_ci"][0], m[n]["win_ci"][1] - m[n]["win_rate"]] for n in names]).T
    ax[0, 0].bar(x, 100 * win, yerr=100 * err, capsize=4, color="tab:blue")
    ax[0, 0].axhline(50, color="gray", ls="--")
    ax[0, 0].set(title="win rate vs SFT (95% CI)", ylabel="%", ylim=(0, 100))
    ax[0, 1].bar(x, [m[n]["utility"] for n in names], color="tab:green")
    ax[0, 1].set(title="labeler utility")
    loss = [m[n]["heldout_loss"] for n in names]
    ax[0, 2].bar(x, loss, color="tab:red")
    ax[0, 2].set(title="held-out pretraining LM loss (tax)", ylim=(0.95 * min(loss), 1.02 * max(loss)))
    for a in ax[0]:
        a.set_xticks(x, [LABELS.get(n, n) for n in names], rotation=15)
    for i, (name, recs) in enumerate(ppo_metrics.items()):
        recs = [r for r in recs if "score" in r]
        it, score, kl = (np.array([r[k] for r in recs], float) for k in ("step", "score", "kl"))
        color, label = f"C{i}", LABELS.get(name, name)
        for a, y in ((ax[1, 0], score), (ax[1, 1], kl)):  # one rollout batch is noisy: raw faint, mean bold
            a.plot(it, y, color=color, alpha=0.25)
            a.plot(it, _smooth(y), color=color, label=label)
        ax[1, 2].plot(_smooth(kl), _smooth(score), color=color, marker=".", label=label)
    ax[1, 0].set(title="RM score during PPO (batch; running mean)", xlabel="PPO iteration")
    ax[1, 1].set(title="KL to SFT during PPO (batch; running mean)", xlabel="PPO iteration")
    ax[1, 2].set(title="RM score against KL (running means)", xlabel="KL to SFT (per sequence)", ylabel="RM score")
    for a in ax[1]:
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _smooth(y: np.ndarray, k: int = 8) -> np.ndarray:
    """Trailing running mean over up to k points."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), k)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def load_results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)
