"""Evaluation of the pipeline's models the way the paper reports them, in miniature.

On distinct held-out prompts of the test split (what is reported) and of the validation split (what anything
is selected or tuned on; the same metrics, side by side in results.md) every model samples one response per
prompt with the same sampler settings and seed; a held-out labeler population (never used for training data)
judges it against the SFT model's response to the same prompt, with its noise: a win, a tie (identical answers, or
equal noisy utilities) or a loss. Per model:

    wins / ties / losses   counts over prompts
    win_rate               ties count half, 95 % percentile-bootstrap interval over prompts
    decisive_win_rate      wins / (wins + losses), its interval (the ratio recomputed per resample)
    true_win_rate          the same with the noiseless reference labeler (world.WEIGHTS)
    utility                the reference labeler's mean noiseless utility, and its interval
    violations             per quality dimension (world.DIMENSIONS): the rate of answers violating it
                           ('task': the rate of answers that are not exactly right)
    correct                answers exactly right and violating nothing (world.verify)
    rm_score               the reward model's score (bias included: demonstrations average 0) of the sampled ids
    kl_to_sft              mean per-sequence sum of log pi(y_t) - log pi_SFT(y_t) on the model's samples
    heldout_loss           LM loss on held-out general text (sentences never in pretraining); tax = its
                           change from SFT (test metrics only: one held-out text)
    vs_large               the same judgement against the larger SFT model (scale vs alignment)

`rm_accuracy` measures the reward model on held-out comparisons: against the noisy training labels,
against a held-out labeler's ranks and per quality dimension (pairs that differ in that dimension
only: does the RM prefer the completion that does not violate it?).
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import random

import jax
import numpy as np

from instructgpt_jax import checkpoints, losses, sampling, scoring, sharding, train_lib
from instructgpt_jax.data import iterators
from instructgpt_jax.data.tokenizer import load_tokenizer
from instructgpt_jax.miniature import world
from instructgpt_jax.models import ModelConfig, Transformer

MODELS = ("base", "sft", "sft_large", "ppo", "ppo_ema", "ppo_ptx", "ppo_ptx_ema", "dpo", "dpo_pl", "grpo",
          "grpo_verifier", "ppo_lora")
LABELS = {"base": "base (pretrained)", "sft": "SFT", "sft_large": "SFT 3.6x", "ppo": "PPO", "ppo_ema": "PPO (EMA)",
          "ppo_ptx": "PPO-ptx", "ppo_ptx_ema": "PPO-ptx (EMA)", "dpo": "DPO", "dpo_pl": "DPO-PL", "grpo": "GRPO",
          "grpo_verifier": "GRPO-verifier", "ppo_lora": "PPO-LoRA"}


# ----------------------------------------------------------------------------- statistics

def bootstrap_indices(n: int, num_samples: int, seed: int) -> np.ndarray:
    """[num_samples, n] resamples of n prompts with replacement (one set shared by every statistic)."""
    return np.random.default_rng(seed).integers(0, n, (num_samples, n))


def bootstrap_ci(values, num_samples: int = 1000, seed: int = 0, level: float = 0.95, indices=None):
    """Percentile bootstrap interval of the mean of `values` (resampling them with replacement).
    `indices` [num_samples, n] fixes the resamples (for tests). Returns (lo, hi)."""
    values = np.asarray(values, np.float64)
    if indices is None:
        indices = bootstrap_indices(len(values), num_samples, seed)
    means = values[np.asarray(indices)].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def bootstrap_ratio_ci(num, den, num_samples: int = 1000, seed: int = 0, level: float = 0.95, indices=None):
    """Percentile bootstrap interval of sum(num) / sum(den) over resampled items (resamples with a zero
    denominator are dropped). Returns (lo, hi); (nan, nan) if every resample has a zero denominator."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if indices is None:
        indices = bootstrap_indices(len(num), num_samples, seed)
    n, d = num[indices].sum(1), den[indices].sum(1)
    ratios = n[d > 0] / d[d > 0]
    if not len(ratios):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


def judge_all(judges: list, prompts, answers, baseline_answers, seed: int, tag: str) -> np.ndarray:
    """Per prompt i: 1 if judges[i % len] prefers `answers[i]` to `baseline_answers[i]` (with its noise,
    from a stream seeded by (seed, tag, i): reproducible and independent across models), 0.5 on a tie,
    else 0. A noiseless judge (noise 0) gives the true preference."""
    out = []
    for i, (p, a, b) in enumerate(zip(prompts, answers, baseline_answers)):
        rng = random.Random(f"judge/{seed}/{tag}/{i}")
        out.append(judges[i % len(judges)].judge(p, a, b, noisy=True, rng=rng))
    return np.array(out)


def win_rates(labeler: world.Labeler, prompts, answers, baseline_answers, noisy: bool = False) -> np.ndarray:
    """Per prompt: 1 if the labeler prefers `answers[i]` to `baseline_answers[i]`, 0.5 on a tie, else 0
    (`noisy`: with the labeler's Gumbel noise, drawn from its own seeded stream)."""
    return np.array([labeler.judge(p, a, b, noisy=noisy) for p, a, b in zip(prompts, answers, baseline_answers)])


def preference_stats(outcomes, indices) -> dict:
    """Wins / ties / losses, the ties-half win rate and the decisive win rate, each with its interval."""
    o = np.asarray(outcomes, np.float64)
    wins, ties, losses_ = (o == 1.0), (o == 0.5), (o == 0.0)
    decisive = wins.sum() + losses_.sum()
    return {"wins": int(wins.sum()), "ties": int(ties.sum()), "losses": int(losses_.sum()),
            "win_rate": float(o.mean()), "win_ci": list(bootstrap_ci(o, indices=indices)),
            "decisive_win_rate": float(wins.sum() / decisive) if decisive else float("nan"),
            "decisive_ci": list(bootstrap_ratio_ci(wins, wins | losses_, indices=indices))}


# ----------------------------------------------------------------------------- models

def load_lm(path: str, mesh):
    """(model, params, tokenizer) of an exported LM (base, SFT, DPO or an RL policy)."""
    export = checkpoints.Export.open(path)
    model = Transformer(ModelConfig.from_config(export.model))
    return model, export.params(model, mesh), load_tokenizer(export.path)


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
    """One sampled response per prompt: texts (decoded, up to EOS), their ids (EOS dropped) and the token
    arrays for scoring."""
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
    # The sampled response ids without their EOS: what the RM's rows will hold (it appends the EOS itself).
    out["ids"] = [[int(i) for i in t[max_prompt_len:][m > 0] if int(i) not in tokenizer.eos_ids]
                  for t, m in zip(out["tokens"], out["response_mask"])]
    return out


@functools.partial(jax.jit, static_argnames="model")
def sequence_logprob(params, tokens, prompt_mask, response_mask, *, model):
    """Per-sequence sum of log pi(y_t) over the response tokens (temperature 1), as the RL stage computes it."""
    p = prompt_mask.shape[1]
    t, pos, seg = scoring.sequence_inputs(tokens, prompt_mask, response_mask)
    logp, _ = scoring.response_logprobs(params, model, t, pos, seg, p)
    return (logp * response_mask).sum(-1)


def logprobs_of(params, model, sample: dict, batch_size: int, mesh) -> np.ndarray:
    """`sequence_logprob` of every row of a `generate` sample under (model, params)."""
    rows = [{"tokens": t, "prompt_mask": m, "response_mask": r}
            for t, m, r in zip(sample["tokens"], sample["prompt_mask"], sample["response_mask"])]
    out = []
    with sharding.use(mesh):
        for batch, n in _fixed_batches(rows, batch_size):
            g = sharding.global_from_full(batch, mesh)
            lp = sequence_logprob(params, g["tokens"], g["prompt_mask"], g["response_mask"], model=model)
            out.append(np.asarray(sharding.to_host(lp))[:n])
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


def rm_scores(rm, tok, prompts, texts, *, batch_size: int, seq_len: int, max_prompt_len: int, mesh,
              ids: list | None = None, chat_template=None) -> np.ndarray:
    """The RM's scores of (prompt, completion) pairs, in fixed-size batches (one compiled program). With `ids`
    (each completion's sampled token ids, EOS dropped) the RM reads those ids (+ its EOS), as it was trained
    on the comparisons' sampled ids and as PPO scores its rollouts; else it encodes `texts` with `tok`."""
    from instructgpt_jax.data import iterators
    out = []
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        n = len(idx)
        idx += [idx[0]] * (batch_size - n)
        rows = [iterators.scoring_example(prompts[i], texts[i], tok, seq_len=seq_len, max_prompt_len=max_prompt_len,
                                          chat_template=chat_template,
                                          completion_ids=None if ids is None else ids[i]) for i in idx]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if mesh is not None and sharding.divides_batch(len(rows), mesh):
            batch = sharding.global_from_full(batch, mesh)
        scores = rm(batch["tokens"], batch["segment_ids"], batch["positions"], batch["last_index"])
        out.append(np.asarray(sharding.to_host(scores))[:n])
    return np.concatenate(out) if out else np.zeros(0)


def rm_accuracy(rm, tok, rows: list[dict], heldout_judge: world.Labeler, *, batch_size: int, seq_len: int,
                max_prompt_len: int, mesh, seed: int, use_ids: bool = True, chat_template=None) -> dict:
    """The RM on held-out comparison rows {prompt, completions, ranks}: pairwise accuracy against the
    rows' (noisy training-labeler) ranks, against a held-out labeler's noisy ranks and the noiseless
    reference ranks (ties skipped; an RM tie counts half), and per quality dimension over pairs that
    differ in that dimension only. Returns {'vs_labels', 'vs_heldout', 'vs_true', 'dimensions': {d: {'accuracy',
    'pairs'}}}. The RM reads the rows' sampled `completion_ids` when they have them and `use_ids` (the RM
    shares the sampling model's tokenizer), exactly as it was trained on them; else the completions' text."""
    flat = [(i, j) for i, r in enumerate(rows) for j in range(len(r["completions"]))]
    ids = None
    if use_ids and all(r.get("completion_ids") for r in rows):
        ids = [rows[i]["completion_ids"][j] for i, j in flat]
    scores = rm_scores(rm, tok, [rows[i]["prompt"] for i, _ in flat], [rows[i]["completions"][j] for i, j in flat],
                       ids=ids, chat_template=chat_template, batch_size=batch_size, seq_len=seq_len,
                       max_prompt_len=max_prompt_len, mesh=mesh)
    tallies = {k: [0.0, 0] for k in ("vs_labels", "vs_heldout", "vs_true", *world.DIMENSIONS,
                                     *(f"strict/{d}" for d in world.DIMENSIONS))}
    rng, pos = random.Random(f"rm_accuracy/{seed}"), 0

    def tally(key, better, worse):  # better / worse: indices into this row's completions
        s_b, s_w = scores[pos + better], scores[pos + worse]
        tallies[key][0] += 1.0 if s_b > s_w else 0.5 if s_b == s_w else 0.0
        tallies[key][1] += 1

    for r in rows:
        comps, k = r["completions"], len(r["completions"])
        answers = [world.parse_answer(c) for c in comps]
        viol = [world.violations(r["prompt"], a) for a in answers]
        true = [world.utility_of(v) for v in viol]
        heldout = world.dense_ranks(heldout_judge.noisy_utilities(
            [heldout_judge.utility(r["prompt"], a) for a in answers], answers, rng))
        for i, j in itertools.combinations(range(k), 2):
            for key, ranks in (("vs_labels", r["ranks"]), ("vs_heldout", heldout)):
                if ranks[i] != ranks[j]:
                    tally(key, *((i, j) if ranks[i] < ranks[j] else (j, i)))
            if abs(true[i] - true[j]) > 1e-9:
                tally("vs_true", *((i, j) if true[i] > true[j] else (j, i)))
            differ = [d for d in world.DIMENSIONS if abs(viol[i][d] - viol[j][d]) > 1e-9]
            if len(differ) == 1:  # the pair differs in this dimension only (task score included)
                d = differ[0]
                tally(f"strict/{d}", *((i, j) if viol[i][d] < viol[j][d] else (j, i)))
            checkable = [d for d in differ if d != "task"]
            if len(checkable) == 1:  # one checkable dimension differs (the task score may differ too)
                d = checkable[0]
                tally(d, *((i, j) if viol[i][d] < viol[j][d] else (j, i)))
        pos += k
    out = {k: (a / n if n else float("nan")) for k, (a, n) in tallies.items() if k.startswith("vs_")}
    out["pairs"] = tallies["vs_labels"][1]

    def rate(key):
        return {"accuracy": tallies[key][0] / tallies[key][1] if tallies[key][1] else float("nan"),
                "pairs": tallies[key][1]}

    out["dimensions"] = {d: rate(f"strict/{d}" if d == "task" else d) for d in world.DIMENSIONS}
    out["dimensions_strict"] = {d: rate(f"strict/{d}") for d in world.DIMENSIONS}
    return out


def probe_pairs(prompts: list[str], seed: int) -> dict[str, list[tuple[str, str, str]]]:
    """Controlled probes per dimension: (prompt, the correct answer, the same answer with that one dimension
    violated) on held-out prompts; 'task': one random edit that violates nothing else, 'format': only
    "(caps)" prompts. Every variant is checked to violate its dimension and no other checkable one."""
    rng, out = random.Random(f"probes/{seed}"), {d: [] for d in world.DIMENSIONS}
    for text in prompts:
        p = world.parse_prompt(text)
        good = world.solve(p)
        variants = {
            "task": world.corrupt(good, rng),
            "harmful": world.naive_solve(p) if p.tempting else world.synthetic_completion(p, rng, "harmful")[1],
            "hallucination": world._hallucinate(p, good, rng),
            "chatter": world._chatter(good, rng),
            "echo": f"{p.family}: {good}",
            "format": good.lower() if p.caps else None,
        }
        for d, bad in variants.items():
            if bad is None:
                continue
            v = world.violations(p, bad)
            if v[d] > 0 and not any(v[o] > 0 for o in world.DIMENSIONS if o not in (d, "task")):
                out[d].append((text, good, bad))
    return out


def rm_probe_accuracy(rm, tok, prompts: list[str], *, batch_size: int, seq_len: int, max_prompt_len: int, mesh,
                      seed: int, chat_template=None) -> dict:
    """{dimension: {'accuracy', 'pairs'}}: how often the RM scores the correct answer above its one-violation
    variant (`probe_pairs`; a tie counts half)."""
    out = {}
    for d, pairs in probe_pairs(prompts, seed).items():
        if not pairs:
            out[d] = {"accuracy": float("nan"), "pairs": 0}
            continue
        ps = [x[0] for x in pairs] * 2
        s = rm_scores(rm, tok, ps, [x[1] for x in pairs] + [x[2] for x in pairs], batch_size=batch_size,
                      seq_len=seq_len, max_prompt_len=max_prompt_len, mesh=mesh, chat_template=chat_template)
        good, bad = s[:len(pairs)], s[len(pairs):]
        out[d] = {"accuracy": float(np.mean((good > bad) + 0.5 * (good == bad))), "pairs": len(pairs)}
    return out


# ----------------------------------------------------------------------------- the evaluation

def evaluate(exports: dict[str, str], rm_path: str, *, prompts: list[str], heldout_texts: list[str],
             judges: list[world.Labeler], cfg, mesh, seed: int, rm_seq_len: int, rm_max_prompt_len: int,
             comparisons_eval: list[dict] | None = None, large: str = "sft_large",
             validation_prompts: list[str] | None = None) -> dict:
    """Evaluate every model in `exports` ({name: export path}, 'sft' required) on the test `prompts` and, when
    given, on `validation_prompts` the same way (their own sampling seed, judge streams and resamples),
    judged by the held-out labeler population `judges`. `cfg` is the pipeline's `config.eval`. Returns
    {'models': {name: test metrics}, 'n_prompts', 'examples' (test), 'validation': {'models', 'n_prompts'}
    (when `validation_prompts`; no held-out LM loss: that text is one set), 'rm_accuracy' (when
    `comparisons_eval`)}. The RM scores the sampled token ids themselves when it shares the policy's tokenizer
    (always in the miniature: no decode -> encode round trip, as PPO scores them), else the decoded text."""
    mesh_models, samplers, rm_tok = {}, {}, {}
    rm = scoring.RewardModel.load(rm_path, mesh)
    sets = {"test": (prompts, seed, "")}
    if validation_prompts:
        sets["validation"] = (validation_prompts, seed + 1, "validation/")
    samples, heldout = {split: {} for split in sets}, {}
    text, tok = None, None
    for name, path in exports.items():
        model, params, tok_i = load_lm(path, mesh)
        tok = tok or tok_i
        retok = scoring.Retokenizer.load(rm_path, rm, tok_i)  # None: the RM shares the policy's tokenizer
        # (the RM's tokenizer, its chat template, whether it reads the sampled ids)
        rm_tok[name] = (tok_i, None, True) if retok is None else (retok.tokenizer, retok.chat_template, False)
        key = model.cfg
        if key not in samplers:  # one sampler per architecture, the same settings and seed for every model
            samplers[key] = sampling.make_sampler(model, max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_ids,
                                                  pad_id=tok.pad_id, temperature=cfg.temperature,
                                                  greedy=cfg.temperature == 0)
        if text is None:
            text = text_batches(heldout_texts, tok, seq_len=cfg.heldout_seq_len, batch_size=cfg.batch_size)
        mesh_models[name] = (model, params)
        for split, (ps, s, _) in sets.items():
            samples[split][name] = generate(samplers[key], params, tok, ps, max_prompt_len=cfg.max_prompt_len,
                                            batch_size=cfg.batch_size, seed=s, mesh=mesh)
        heldout[name] = lm_loss(params, model, text, mesh)

    def split_metrics(ps, smp, tag):
        answers = {name: [world.parse_answer(t) for t in smp[name]["texts"]] for name in exports}
        sft_model, sft_params = mesh_models["sft"]
        indices = bootstrap_indices(len(ps), cfg.bootstrap_samples, seed)
        reference = [world.Labeler(noise=0.0)]
        results = {}
        for name in exports:
            model, params = mesh_models[name]
            stats = preference_stats(judge_all(judges, ps, answers[name], answers["sft"], seed, tag + name), indices)
            true = judge_all(reference, ps, answers[name], answers["sft"], seed, tag + name)
            viol = [world.violations(p, a) for p, a in zip(ps, answers[name])]
            util = np.array([world.utility_of(v) for v in viol])
            rtok, template, use_ids = rm_tok[name]
            rm_s = rm_scores(rm, rtok, ps, smp[name]["texts"], ids=smp[name]["ids"] if use_ids else None,
                             chat_template=template, batch_size=cfg.batch_size, seq_len=rm_seq_len,
                             max_prompt_len=rm_max_prompt_len, mesh=mesh)
            # KL(pi || SFT) on pi's samples: each model's log-probs under its own architecture (SFT's own: 0)
            kl = np.zeros(len(ps)) if name == "sft" else (
                logprobs_of(params, model, smp[name], cfg.batch_size, mesh)
                - logprobs_of(sft_params, sft_model, smp[name], cfg.batch_size, mesh))
            results[name] = dict(
                stats, true_win_rate=float(true.mean()), true_win_ci=list(bootstrap_ci(true, indices=indices)),
                utility=float(util.mean()), utility_ci=list(bootstrap_ci(util, indices=indices)),
                violations={d: float(np.mean([v[d] > 0 for v in viol])) for d in world.DIMENSIONS},
                correct=float(np.mean([world.verify(p, a) for p, a in zip(ps, answers[name])])),
                rm_score=float(rm_s.mean()), rm_ci=list(bootstrap_ci(rm_s, indices=indices)),
                kl_to_sft=float(kl.mean()), kl_ci=list(bootstrap_ci(kl, indices=indices)))
            if large in answers:
                results[name]["vs_large"] = preference_stats(
                    judge_all(judges, ps, answers[name], answers[large], seed, f"{tag}{name}/vs/{large}"), indices)
        return results

    results = split_metrics(prompts, samples["test"], "")
    for name in exports:  # the held-out LM loss: one text, reported with the test metrics
        results[name].update(heldout_loss=heldout[name], tax=heldout[name] - heldout["sft"],
                             tax_vs_base=heldout[name] - heldout["base"] if "base" in heldout else float("nan"))
    out = {"models": results, "n_prompts": len(prompts),
           "examples": [{"prompt": prompts[i], **{n: samples["test"][n]["texts"][i] for n in exports}}
                        for i in range(min(cfg.num_examples, len(prompts)))]}
    if "validation" in sets:
        out["validation"] = {"models": split_metrics(validation_prompts, samples["validation"], "validation/"),
                             "n_prompts": len(validation_prompts)}
    if comparisons_eval:
        # The comparisons hold the SFT model's sampled ids; the probes are text (no model sampled them).
        rtok, template, use_ids = rm_tok["sft"]
        out["rm_accuracy"] = rm_accuracy(rm, rtok, comparisons_eval, judges[0], batch_size=cfg.batch_size,
                                         seq_len=rm_seq_len, max_prompt_len=rm_max_prompt_len, mesh=mesh, seed=seed,
                                         use_ids=use_ids, chat_template=template)
        out["rm_accuracy"]["probes"] = rm_probe_accuracy(rm, rtok, prompts, batch_size=cfg.batch_size,
                                                         seq_len=rm_seq_len, max_prompt_len=rm_max_prompt_len,
                                                         mesh=mesh, seed=seed, chat_template=template)
    return out


# ----------------------------------------------------------------------------- reports

def _ordered(models: dict) -> list[str]:
    """The table's order (base, SFT, the larger SFT, then the methods), whatever order a JSON file kept."""
    return sorted(models, key=lambda n: MODELS.index(n) if n in MODELS else len(MODELS))


def _known(*xs) -> bool:
    """Whether every number is a measurement (not nan: no data behind it)."""
    return all(x == x for x in xs)


def _check(ok, *inputs):
    """A check's value: None (JSON null, "n/a") when any input is nan, else the bool."""
    return bool(ok) if _known(*inputs) else None


def every(values) -> bool | None:
    """Three-valued 'all': False if any is False, else None if any is None (no data) or there are none,
    else True. A check over dimensions without pairs is never vacuously true."""
    values = list(values)
    if any(v is False for v in values):
        return False
    return None if not values or any(v is None for v in values) else True


def acceptance(results: dict) -> dict:
    """The paper's findings checked at fixed thresholds on the test split (the `## Checks` of results.md;
    absent when the models they need are absent). Each is True, False or None: None when the data to
    decide it is missing (a nan, or a dimension without pairs), never a vacuous True."""
    m, out = results["models"], {}
    for name in ("ppo", "ppo_ptx"):
        if name in m:
            out[f"{name}_win_rate_at_least_65"] = _check(m[name]["win_rate"] >= 0.65, m[name]["win_rate"])
            out[f"{name}_preferred_over_sft"] = _check(m[name]["win_ci"][0] > 0.5, m[name]["win_ci"][0])
    if "base" in m:
        out["base_below_sft"] = _check(m["base"]["win_ci"][1] < 0.5, m["base"]["win_ci"][1])
    if "ppo" in m and "ppo_ptx" in m:
        ppo_tax, ptx_tax = m["ppo"]["tax"], m["ppo_ptx"]["tax"]
        out["ptx_tax_at_most_half_of_ppo"] = _check(ppo_tax > 0 and ptx_tax <= 0.5 * ppo_tax, ppo_tax, ptx_tax)
        out["ptx_win_rate_within_3_points_of_ppo"] = _check(m["ppo_ptx"]["win_rate"] >= m["ppo"]["win_rate"] - 0.03,
                                                            m["ppo_ptx"]["win_rate"], m["ppo"]["win_rate"])
    if "rm_accuracy" in results:
        r = results["rm_accuracy"]
        out["rm_accuracy_at_least_65"] = _check(r["vs_labels"] >= 0.65, r["vs_labels"])

        def above_chance(v):
            return _check(v["accuracy"] > 0.5, v["accuracy"]) if v["pairs"] else None

        out["rm_above_chance_on_every_dimension"] = every(above_chance(v) for v in r["dimensions"].values())
        if "probes" in r:
            out["rm_above_chance_on_every_probe"] = every(above_chance(v) for v in r["probes"].values())
    return out


def check_word(value) -> str:
    """A check as results.md writes it: yes, NO or n/a (no data to decide it)."""
    return "n/a" if value is None else "yes" if value else "NO"


def _pct(x) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def markdown_table(results: dict) -> str:
    rows = ["| model | W / T / L vs SFT | win rate vs SFT (ties ½) [95% CI] | decisive win rate [CI] | true win rate "
            "| utility [CI] | exact | RM score [CI] | KL to SFT [CI] | tax (nats) | vs SFT 3.6x (ties ½) [CI] |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in _ordered(results["models"]):
        r = results["models"][name]
        ci = lambda k: f"[{_pct(r[k][0])}, {_pct(r[k][1])}]"  # noqa: E731
        large = r.get("vs_large")
        large = f"{_pct(large['win_rate'])}% [{_pct(large['win_ci'][0])}, {_pct(large['win_ci'][1])}]" if large else "-"
        rows.append(
            f"| {LABELS.get(name, name)} | {r['wins']} / {r['ties']} / {r['losses']} | {_pct(r['win_rate'])}% "
            f"{ci('win_ci')} | {_pct(r['decisive_win_rate'])}% {ci('decisive_ci')} | {_pct(r['true_win_rate'])}% "
            f"| {r['utility']:+.3f} [{r['utility_ci'][0]:+.3f}, {r['utility_ci'][1]:+.3f}] "
            f"| {_pct(r['correct'])}% | {r['rm_score']:+.2f} [{r['rm_ci'][0]:+.2f}, {r['rm_ci'][1]:+.2f}] "
            f"| {r['kl_to_sft']:.2f} [{r['kl_ci'][0]:.2f}, {r['kl_ci'][1]:.2f}] | {r['tax']:+.4f} | {large} |")
    return "\n".join(rows)


def dimensions_table(results: dict) -> str:
    dims = world.DIMENSIONS
    rows = ["| model | " + " | ".join(f"{d} %" for d in dims) + " | held-out LM loss | tax vs base |",
            "|---|" + "---|" * (len(dims) + 2)]
    for name in _ordered(results["models"]):
        r = results["models"][name]
        rows.append(f"| {LABELS.get(name, name)} | " + " | ".join(_pct(r["violations"][d]) for d in dims)
                    + f" | {r['heldout_loss']:.4f} | {r['tax_vs_base']:+.4f} |")
    return "\n".join(rows)


def splits_table(results: dict) -> str:
    """Validation and test side by side, per model (results['validation'] and results['models'])."""
    val, test = results["validation"]["models"], results["models"]
    rows = ["| model | win rate vs SFT: validation [CI] | test [CI] | true win rate: validation | test "
            "| utility: validation | test | exact: validation | test | RM score: validation | test "
            "| KL to SFT: validation | test |", "|---|" + "---|" * 12]
    for name in _ordered(test):
        v, t = val.get(name), test[name]
        if v is None:
            continue
        win = lambda r: f"{_pct(r['win_rate'])}% [{_pct(r['win_ci'][0])}, {_pct(r['win_ci'][1])}]"  # noqa: E731
        rows.append(f"| {LABELS.get(name, name)} | {win(v)} | {win(t)} | {_pct(v['true_win_rate'])}% "
                    f"| {_pct(t['true_win_rate'])}% | {v['utility']:+.3f} | {t['utility']:+.3f} "
                    f"| {_pct(v['correct'])}% | {_pct(t['correct'])}% | {v['rm_score']:+.2f} | {t['rm_score']:+.2f} "
                    f"| {v['kl_to_sft']:.2f} | {t['kl_to_sft']:.2f} |")
    return "\n".join(rows)


def families_line(results: dict) -> str:
    """The family mix of the distinct evaluation prompts (a family with a small pool gets fewer)."""
    fams = results.get("prompt_families")
    if not fams:
        return ""
    names = sorted(fams["test"])
    parts = [f"{f} {fams['test'][f]['prompts']} / {fams.get('validation', {}).get(f, {}).get('prompts', '-')}"
             for f in names]
    short = [f for f in names if any(c[f]["repeats"] > c[f]["prompts"] for c in fams.values() if f in c)]
    note = (f" {', '.join(short)}: fewer, as that family's pool in the held-out splits is (nearly) used up "
            f"(every prompt counts once; more repeats were skipped than prompts drawn)." if short else "")
    return f"Distinct prompts per family (test / validation): {', '.join(parts)}.{note}"


def compute_table(results: dict) -> str:
    comp = results.get("compute", {})
    rows = ["| model | policy fwd+bwd tokens | forward-only tokens (sampling, reference, RM, value) "
            "| other trained tokens (RM / value / ptx) |", "|---|---|---|---|"]
    for name in _ordered({k: 0 for k in comp}):
        c = comp[name]
        rows.append(f"| {LABELS.get(name, name)} | {c['policy_train']:,} | {c['forward']:,} | {c['other_train']:,} |")
    return "\n".join(rows)


def write_report(results: dict, workdir: str, rl_metrics: dict[str, list[dict]]) -> dict:
    """results.json, results.md and results.png in `workdir`; returns their paths."""
    paths = {k: os.path.join(workdir, f"results.{k}") for k in ("json", "md", "png")}
    checks = acceptance(results)
    val = results.get("validation")
    sizes = f"{results['n_prompts']} distinct test prompts" + (
        f", {val['n_prompts']} distinct validation prompts" if val else "")
    lines = [f"# Results ({sizes}, judged by held-out labelers)", ""]
    if val:
        lines += ["## Validation and test side by side", "", splits_table(results), "",
                  "Validation: what anything is selected or tuned on; test: what is reported (the tables below). "
                  "Both splits are disjoint from each other and from every training text (`splits` in "
                  "results.json names the files).", ""]
    if families_line(results):
        lines += [families_line(results), ""]
    lines += ["## Test split", "", markdown_table(results), "",
             "W / T / L: the held-out labelers' judgement of the model's response against the SFT model's response "
             "to the same prompt (with their noise; identical answers tie). Win rate counts ties half; the decisive "
             "win rate is wins / (wins + losses); true win rate: the noiseless reference labeler. Intervals: 95 % "
             "percentile bootstrap over prompts. Utility: the reference labeler's noiseless utility (1 = exactly "
             "right, no violation). Tax: change of the LM loss on held-out general text (sentence types that never "
             "occur in pretraining) from SFT's (nats per token).",
             "", "## Quality dimensions (fraction of answers violating each)", "", dimensions_table(results)]
    if "rm_accuracy" in results:
        r = results["rm_accuracy"]
        dims = ", ".join(f"{d} {_pct(v['accuracy'])}% ({v['pairs']} pairs)" for d, v in r["dimensions"].items())
        probes = ", ".join(f"{d} {_pct(v['accuracy'])}% ({v['pairs']})" for d, v in r.get("probes", {}).items())
        lines += ["", "## Reward model and labelers", "",
                  f"RM pairwise accuracy on held-out comparisons ({r['pairs']} pairs): {_pct(r['vs_labels'])}% vs the "
                  f"training labelers' noisy ranks, {_pct(r['vs_heldout'])}% vs a held-out labeler, "
                  f"{_pct(r['vs_true'])}% vs the noiseless reference. Per dimension, on pairs of SFT samples that "
                  f"differ in that checkable dimension only (the task score may differ too; 'task': pairs differing in "
                  f"the task score only): {dims}. Controlled probes (a held-out prompt's correct answer vs the same "
                  f"answer with one dimension violated): {probes}."]
    if "labelers" in results:
        a = results["labelers"]
        lines += ["", f"Labelers: noise {a['noise']:.3f}; agreement on SFT sample pairs: training-training "
                      f"{_pct(a['train_train'])}%, training-held-out {_pct(a['train_heldout'])}%, held-out-held-out "
                      f"{_pct(a['heldout_heldout'])}%."]
    if "compute" in results:
        lines += ["", "## Compute (tokens through the policy in its own stage; SFT's cost is shared)", "",
                  compute_table(results)]
    lines += ["", "## Checks (test split)", ""] + [f"- {k}: {check_word(v)}" for k, v in checks.items()]
    lines += ["", "## Sample responses", ""]
    for ex in results["examples"]:
        lines.append(f"- `{ex['prompt']!r}`")
        lines += [f"  - {LABELS.get(k, k)}: `{v!r}`" for k, v in ex.items() if k != "prompt"]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    checkpoints.write_json_atomic(paths["json"], dict(results, checks=checks))
    plot(results, rl_metrics, paths["png"])
    return paths


def plot(results: dict, rl_metrics: dict[str, list[dict]], path: str) -> None:
    """Win rate (with CI), utility and tax per model; RM score and KL during RL; score against KL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = results["models"]
    names = _ordered(m)
    x = np.arange(len(names))
    fig, ax = plt.subplots(2, 3, figsize=(17, 9))
    win = np.array([m[n]["win_rate"] for n in names])
    err = np.array([[m[n]["win_rate"] - m[n]["win_ci"][0], m[n]["win_ci"][1] - m[n]["win_rate"]] for n in names]).T
    ax[0, 0].bar(x, 100 * win, yerr=100 * np.maximum(err, 0), capsize=4, color="tab:blue")
    ax[0, 0].axhline(50, color="gray", ls="--")
    ax[0, 0].set(title="win rate vs SFT, held-out labelers (95% CI)", ylabel="%", ylim=(0, 100))
    ax[0, 1].bar(x, [m[n]["utility"] for n in names], color="tab:green")
    ax[0, 1].set(title="labeler utility")
    ax[0, 2].bar(x, [m[n]["tax"] for n in names], color="tab:red")
    ax[0, 2].set(title="alignment tax: held-out LM loss - SFT's (nats)")
    for a in ax[0]:
        a.set_xticks(x, [LABELS.get(n, n) for n in names], rotation=35, ha="right")
    for i, (name, recs) in enumerate(rl_metrics.items()):
        recs = [r for r in recs if "score" in r]
        if not recs:
            continue
        it, score, kl = (np.array([r[k] for r in recs], float) for k in ("step", "score", "kl"))
        color, label = f"C{i}", LABELS.get(name, name)
        for a, y in ((ax[1, 0], score), (ax[1, 1], kl)):  # one rollout batch is noisy: raw faint, mean bold
            a.plot(it, y, color=color, alpha=0.25)
            a.plot(it, _smooth(y), color=color, label=label)
        ax[1, 2].plot(_smooth(kl), _smooth(score), color=color, marker=".", label=label)
    ax[1, 0].set(title="reward during RL (batch; running mean)", xlabel="iteration")
    ax[1, 1].set(title="KL to SFT during RL (batch; running mean)", xlabel="iteration")
    ax[1, 2].set(title="reward against KL (running means)", xlabel="KL to SFT (per sequence)", ylabel="reward")
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
