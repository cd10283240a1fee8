"""The whole InstructGPT method in miniature, one command: `--config=configs/pipeline.py --workdir=DIR`.

    data            DIR/data            tokenizer + synthetic JSONL: pretraining text, demonstrations, prompts
    pretrain        DIR/pretrain        a tiny base LM (misaligned: it continues instructions with more text)
    sft             DIR/sft             supervised fine-tuning on imperfect demonstrations
    comparisons     DIR/comparisons     K (4..9) SFT samples per prompt, ranked by the training labelers
    rm              DIR/rm              K-choose-2 reward model on those rankings
    ppo, ppo_ptx    DIR/ppo, ...        PPO against the RM; PPO-ptx (pretraining log-likelihood mixed in)
   (config.methods, `configs/pipeline.py:methods`:)
    dpo, dpo_pl     DIR/dpo, ...        DPO (sigmoid, all pairs) and listwise Plackett-Luce DPO on the same rankings
    grpo            DIR/grpo            critic-free GRPO against the RM
    grpo_verifier   DIR/grpo_verifier   GRPO against the world's programmatic verifier (no RM)
    ppo_lora        DIR/ppo_lora        PPO with rank-8 LoRA adapters (policy and value) on frozen SFT / RM weights
    pretrain_large  DIR/pretrain_large  a ~3.6x larger base LM on the same text ...
    sft_large       DIR/sft_large       ... fine-tuned on the same demonstrations (scale vs alignment)
    eval            DIR/eval            held-out labelers judge every model vs SFT on validation and test prompts
                                        -> DIR/results.{json,md,png} (results.json `splits`: the data files)

Held out means held out: the test and validation prompts (distinct, `world.distinct_prompts`) and the held-out
text never occur in any text a model of the run trains on (`world.split_of`, `world.text_split_of`). Anything
selected or tuned (the sweep's best run) is selected on validation; test is what is reported.

Every step writes its own sub-workdir and its config.json. Rerunning skips finished steps (the training
stages resume an interrupted run themselves). Before anything runs, every finished (or, for a training
stage, checkpointed) step's saved config is compared with the current one: a difference is an error
naming the step and the keys, and nothing is touched. The evaluation alone is redone when its config
changes (for example when `methods` adds models to a finished default run): nothing depends on it.

`configs/pipeline.py:sweep` adds the over-optimisation sweep (`sweep` step): PPO at several KL coefficients
and lengths, and the oracle-reward run, each evaluated for true utility and RM score against KL to SFT.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import time
from typing import Callable

import ml_collections
import numpy as np

from instructgpt_jax import checkpoints, config_lib, train_lib
from instructgpt_jax.miniature import evaluate, world

RL_STAGES = ("ppo", "ppo_ptx", "grpo", "grpo_verifier", "ppo_lora")
DPO_STAGES = ("dpo", "dpo_pl")
METHODS = ("dpo", "dpo_pl", "grpo", "grpo_verifier", "ppo_lora")  # the methods after InstructGPT: config.methods
TRAINED = ("pretrain", "sft", "rm", "ppo", "ppo_ptx", *METHODS, "pretrain_large", "sft_large")
STEPS = ("data", "pretrain", "sft", "comparisons", "rm", "ppo", "ppo_ptx", *METHODS, "pretrain_large", "sft_large",
         "eval")
# Keys the pipeline fills in from DIR (so a moved workdir still matches) or that only change display.
DERIVED_KEYS = ("data.train", "data.eval", "data.ptx", "data.tokenizer", "data.demonstrations", "data.dir",
                "init.from_workdir", "ppo.rm_workdir", "train.progress")


@dataclasses.dataclass
class Step:
    name: str
    dir: str
    config: dict                 # what DIR/<name>/config.json must hold
    run: Callable[[], None]
    done_file: str               # exists once the step has finished
    is_stage: bool = False       # a training stage (its checkpoints.Manager writes config.json)
    redo_if_changed: bool = False  # a changed config reruns the step (no other step depends on it)

    def done(self) -> bool:
        if not os.path.exists(os.path.join(self.dir, self.done_file)):
            return False
        if self.redo_if_changed:
            with open(os.path.join(self.dir, "config.json")) as f:
                return json.load(f) == self.config
        return True


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- config per stage

def stage_configs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """Each training stage's config: its block of `config` plus the seed and paths inside `workdir`."""
    data = lambda f: os.path.join(workdir, "data", f)  # noqa: E731
    sub = lambda s: os.path.join(workdir, s)  # noqa: E731
    comparisons = {"data.train": os.path.join(sub("comparisons"), "comparisons_train.jsonl"),
                   "data.eval": os.path.join(sub("comparisons"), "comparisons_eval.jsonl"),
                   "init.from_workdir": sub("sft")}
    rl = {"data.train": data("ppo_prompts.jsonl"), "data.eval": data("ppo_eval_prompts.jsonl"),
          "data.ptx": data("pretrain_train.jsonl"), "init.from_workdir": sub("sft"), "ppo.rm_workdir": sub("rm")}
    pretrain = {"data.train": data("pretrain_train.jsonl"), "data.eval": data("pretrain_eval.jsonl"),
                "data.tokenizer": data("tokenizer.model")}
    sft = {"data.train": data("demos_train.jsonl"), "data.eval": data("demos_eval.jsonl")}
    paths = {
        "pretrain": pretrain, "pretrain_large": pretrain,
        "sft": dict(sft, **{"init.from_workdir": sub("pretrain")}),
        "sft_large": dict(sft, **{"init.from_workdir": sub("pretrain_large")}),
        "rm": dict(comparisons, **{"data.demonstrations": data("demos_train.jsonl")}),
        "dpo": comparisons, "dpo_pl": comparisons,
        **{name: rl for name in RL_STAGES},
    }
    return {name: config_lib.replace(config[name], seed=config.seed, **p) for name, p in paths.items()}


def compute_tokens(stage: ml_collections.ConfigDict) -> dict[str, int]:
    """Tokens a stage runs through models, from its config (padded shapes: what the programs compute).
    policy_train: forward + backward through the policy (pretraining rows of PPO-ptx included);
    forward: forward-only passes (sampling, reference / old log-probs, RM scores, values);
    other_train: forward + backward through other models (the value model)."""
    t = stage.train
    if stage.stage in ("pretrain", "sft"):
        return {"policy_train": t.num_steps * t.batch_size * stage.data.seq_len, "forward": 0, "other_train": 0}
    if stage.stage == "dpo":
        n = t.num_steps * t.batch_size * stage.data.max_k * stage.data.seq_len
        return {"policy_train": n, "forward": n, "other_train": 0}  # the frozen reference sees every row
    c = stage.ppo
    b, seq = t.batch_size, stage.data.max_prompt_len + c.max_new_tokens
    gae, it = c.advantage_estimator == "gae", t.num_steps
    minibatches = b // c.minibatch_size
    ptx = it * c.ppo_epochs * minibatches * c.ptx_batch_size * stage.data.ptx_seq_len if c.ptx_coef > 0 else 0
    forward = it * b * (seq + 2 * seq + (seq if gae else 0) + ((seq + 1) if c.reward == "rm" else 0))
    return {"policy_train": it * c.ppo_epochs * b * seq + ptx, "forward": forward,
            "other_train": it * c.ppo_epochs * b * seq if gae else 0}


# ----------------------------------------------------------------------------- the non-training steps

def write_data(config, out: str) -> None:
    """Tokenizer and every dataset of the run, from the synthetic world (all seeded)."""
    from instructgpt_jax.data.tokenizer import train_tokenizer
    w, seed = config.world, config.seed
    path = lambda f: os.path.join(out, f)  # noqa: E731

    def make(n, s, split):
        return world.make_prompts(n, s, split, tempt_rate=w.tempt_rate, caps_rate=w.caps_rate)

    prompts = lambda n, s, split: [{"prompt": world.format_prompt(p.text)} for p in make(n, s, split)]  # noqa: E731
    rng = random.Random(f"demonstrators/{seed}")

    def demos(n, s, split):
        # Demonstrators are imperfect (world.demonstrate): SFT imitates their lapses; only the comparisons
        # can correct them.
        return [{"prompt": world.format_prompt(p.text),
                 "response": world.demonstrate(p, rng, literal_rate=w.demo_literal_rate,
                                               chatter_rate=w.demo_chatter_rate, caps_miss_rate=w.demo_caps_miss_rate)}
                for p in make(n, s, split)]

    def distinct(n, split, salt):
        # Evaluation sets: distinct prompts of a held-out split (a family with a small pool gets fewer; logged).
        ps, families = world.distinct_prompts(n, seed, split, tempt_rate=w.tempt_rate, caps_rate=w.caps_rate,
                                              _salt=salt)
        short = {f: c["prompts"] for f, c in families.items() if c["repeats"] > c["prompts"]}
        if short:
            log(f"data: {split}-split pool nearly used up for {short} (distinct prompts; other families fill "
                f"the {n})")
        return [{"prompt": world.format_prompt(p.text)} for p in ps], families

    test, test_families = distinct(config.eval.num_prompts, "test", "test")
    validation, validation_families = distinct(config.eval.validation_prompts, "valid", "validation")
    demos_train = demos(w.demonstrations, seed + 2, "train")
    pretrain = world.pretraining(w.pretrain_docs, seed)
    files = {
        "pretrain_train.jsonl": pretrain,
        "pretrain_eval.jsonl": world.pretraining(w.pretrain_eval_docs, seed + 1),
        "heldout_text.jsonl": [{"text": t} for t in world.heldout_pretraining_text(w.heldout_docs, seed)],
        "demos_train.jsonl": demos_train,
        "demos_eval.jsonl": demos(w.demonstrations_eval, seed + 2, "valid"),
        # Different seeds from the PPO prompts: the RM and PPO see different draws of the train split.
        "comparison_prompts_train.jsonl": prompts(w.comparison_prompts, seed + 1, "train"),
        "comparison_prompts_eval.jsonl": prompts(w.comparison_eval_prompts, seed + 1, "valid"),
        "ppo_prompts.jsonl": prompts(w.ppo_prompts, seed, "train"),
        "ppo_eval_prompts.jsonl": prompts(w.ppo_eval_prompts, seed, "valid"),
        # Never trained on (world.split_of: no training text of the run holds a valid- or test-split prompt):
        "test_prompts.jsonl": test,                # the reported evaluation
        "validation_prompts.jsonl": validation,    # what anything is selected or tuned on
    }
    for name, rows in files.items():
        world.write_jsonl(path(name), rows)
    checkpoints.write_json_atomic(path("eval_sets.json"), {"test": test_families, "validation": validation_families})
    texts = [r["text"] for r in pretrain] + [r["prompt"] + " " + r["response"] for r in demos_train]
    train_tokenizer(texts, path("tokenizer.model"), vocab_size=config.pretrain.model.vocab_size, seed=seed)


def populations(config, noise: float) -> tuple[list[world.Labeler], list[world.Labeler]]:
    """(training labelers, held-out labelers) of the run: disjoint groups, the same noise."""
    w = config.world
    return (world.labeler_population(w.train_labelers, noise, config.seed, "train", w.weight_jitter),
            world.labeler_population(w.heldout_labelers, noise, config.seed, "heldout", w.weight_jitter))


def _ranks(labeler: world.Labeler, viols: list[dict], answers: list[str], rng: random.Random) -> list[int]:
    utils = [world.utility_of(v, labeler.weights) for v in viols]
    return world.dense_ranks(labeler.noisy_utilities(utils, answers, rng))


def agreement(group_a, group_b, viols, answers, seed: int) -> float:
    """Pairwise agreement of two labelers on each prompt's answers: labeler a = group_a[j % len], b =
    group_b[(j + 1) % len] (a different one when the groups are the same), over pairs of distinct answers;
    a tie in either ranking counts half. Common random numbers: monotone in the noise (calibration)."""
    rng, agree, total = random.Random(f"agreement/{seed}"), 0.0, 0
    for j, (v, ans) in enumerate(zip(viols, answers)):
        ra = _ranks(group_a[j % len(group_a)], v, ans, rng)
        rb = _ranks(group_b[(j + 1) % len(group_b)], v, ans, rng)
        pairs = [(i, k) for i, k in itertools.combinations(range(len(ans)), 2) if ans[i] != ans[k]]
        a, n = world.pair_agreement(ra, rb, pairs)
        agree, total = agree + a, total + n
    return agree / max(total, 1)


def calibrate_noise(config, target: float, viols, answers) -> float:
    """Gumbel scale at which two training labelers agree on `target` of the pairs of these SFT samples
    (bisection). SFT samples differ less than world's mixed completion sets, so the noise differs too."""
    lo, hi = 0.0, 4.0
    for _ in range(16):
        mid = (lo + hi) / 2
        train, _ = populations(config, mid)
        if agreement(train, train, viols, answers, config.seed) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def make_comparisons(config, sft_dir: str, data_dir: str, out: str) -> None:
    """K samples per prompt from the SFT model (K uniform in k_min..k_max; the i-th at temperature
    temperatures[i % len]), ranked on the parsed answers by one training labeler per prompt (in turn).
    The raw completions are stored with their sampled token ids: the RM trains on exactly what PPO samples
    (decoding and re-encoding need not give the same ids back)."""
    from instructgpt_jax import sampling, sharding
    w, c = config.world, config.comparisons
    mesh = sharding.make_mesh(config.sft.mesh)
    model, params, tok = evaluate.load_lm(sft_dir, mesh)
    temps = list(c.temperatures)
    samplers = [sampling.make_sampler(model, max_new_tokens=c.max_new_tokens, eos_id=tok.eos_ids, pad_id=tok.pad_id,
                                      temperature=t) for t in temps]
    rng = random.Random(f"comparisons/{config.seed}")
    splits = {}
    for i, split in enumerate(("train", "eval")):
        prompts = [r["prompt"] for r in read_jsonl(os.path.join(data_dir, f"comparison_prompts_{split}.jsonl"))]
        slots = [(p, j % len(temps)) for p in prompts for j in range(w.k_max)]  # k_max samples per prompt
        texts, ids = [""] * len(slots), [[]] * len(slots)
        for t, sampler in enumerate(samplers):
            idx = [n for n, (_, tt) in enumerate(slots) if tt == t]
            out_t = evaluate.generate(sampler, params, tok, [slots[n][0] for n in idx], max_prompt_len=c.max_prompt_len,
                                      batch_size=c.batch_size, seed=config.seed + 10 * i + t, mesh=mesh)
            for n, text, sampled in zip(idx, out_t["texts"], out_t["ids"]):
                texts[n], ids[n] = text, sampled
        ks = [rng.randint(w.k_min, w.k_max) for _ in prompts]
        comps = [texts[j * w.k_max: j * w.k_max + k] for j, k in enumerate(ks)]
        comp_ids = [ids[j * w.k_max: j * w.k_max + k] for j, k in enumerate(ks)]
        answers = [[world.parse_answer(x) for x in cs] for cs in comps]
        viols = [[world.violations(p, a) for a in ans] for p, ans in zip(prompts, answers)]
        splits[split] = (prompts, comps, answers, viols, comp_ids)
    noise = w.labeler_noise
    if w.labeler_agreement > 0:
        noise = calibrate_noise(config, w.labeler_agreement, splits["train"][3], splits["train"][2])
    train, heldout = populations(config, noise)
    stats = {"labeler_noise": noise}
    for i, (split, (prompts, comps, answers, viols, comp_ids)) in enumerate(splits.items()):
        rank_rng = random.Random(f"ranks/{config.seed}/{split}")
        ranks = [_ranks(train[j % len(train)], v, a, rank_rng) for j, (v, a) in enumerate(zip(viols, answers))]
        world.write_jsonl(os.path.join(out, f"comparisons_{split}.jsonl"),
                          [{"prompt": p, "completions": cs, "ranks": r, "completion_ids": ci}  # the sampled ids
                           for p, cs, r, ci in zip(prompts, comps, ranks, comp_ids)])
        stats[split] = {"prompts": len(prompts), "mean_k": sum(map(len, comps)) / len(comps),
                        "all_tied": sum(len(set(r)) < 2 for r in ranks),
                        "train_train": agreement(train, train, viols, answers, config.seed + i),
                        "train_heldout": agreement(train, heldout, viols, answers, config.seed + i),
                        "heldout_heldout": agreement(heldout, heldout, viols, answers, config.seed + i)}
    checkpoints.write_json_atomic(os.path.join(out, "stats.json"), stats)
    s = stats["train"]
    log(f"comparisons: labeler noise {noise:.3f}; pairwise agreement training-training {s['train_train']:.1%}, "
        f"training-held-out {s['train_heldout']:.1%}, held-out-held-out {s['heldout_heldout']:.1%}")


def eval_models(config) -> dict[str, str]:
    """{model name: the stage that trained it} for everything the evaluation compares (PPO rows: the raw
    policy and its EMA)."""
    models = {"base": "pretrain", "sft": "sft", "sft_large": "sft_large", "ppo": "ppo", "ppo_ema": "ppo",
              "ppo_ptx": "ppo_ptx", "ppo_ptx_ema": "ppo_ptx"}
    return dict(models, **{n: n for n in METHODS}) if config.methods else models


def eval_exports(config, workdir: str) -> dict[str, str]:
    """{model name: export path} of everything the evaluation compares."""
    sub = lambda *s: os.path.join(workdir, *s)  # noqa: E731
    return {name: (sub(stage, "export_ema") if name.endswith("_ema") else
                   sub(stage, "export") if stage in RL_STAGES else sub(stage))
            for name, stage in eval_models(config).items()}


def trained_stages(config) -> list[str]:
    """The training stages of this run (the methods' when config.methods; the sweep's runs are PPO's configs)."""
    return [s for s in TRAINED if config.methods or s not in METHODS]


def splits(config, workdir: str) -> dict:
    """The run's data separation, paths relative to `workdir`: the test and validation prompts, the held-out
    text, and every file a model of the run trained on (`training_text`: each stage's training data, the
    PPO-ptx pretraining rows, the demonstrations the RM's bias is fitted on, and the prompts the comparisons
    were sampled for; the tokenizer is trained on pretraining text + demonstrations), so anyone can check
    that no held-out prompt or document occurs in training text (tests/test_pipeline.py does)."""
    stages = stage_configs(config, workdir)
    files = {os.path.join(workdir, "data", "comparison_prompts_train.jsonl")}
    for name in trained_stages(config):
        c = stages[name]
        files.add(c.data.train)
        if "ppo" in c and c.ppo.ptx_coef > 0:
            files.add(c.data.ptx)
        if name == "rm":
            files.add(c.data.demonstrations)
    rel = lambda p: os.path.relpath(p, workdir)  # noqa: E731
    return {"test_prompts": os.path.join("data", "test_prompts.jsonl"),
            "validation_prompts": os.path.join("data", "validation_prompts.jsonl"),
            "heldout_text": os.path.join("data", "heldout_text.jsonl"),
            "training_text": sorted(rel(f) for f in files)}


def run_eval(config, workdir: str) -> None:
    from instructgpt_jax import sharding
    sub = lambda s: os.path.join(workdir, s)  # noqa: E731
    with open(sub("comparisons/stats.json")) as f:
        stats = json.load(f)  # the labelers' calibrated noise and agreement
    _, heldout = populations(config, stats["labeler_noise"])
    files = splits(config, workdir)
    results = evaluate.evaluate(
        eval_exports(config, workdir), sub("rm"), prompts=[r["prompt"] for r in read_jsonl(sub(files["test_prompts"]))],
        validation_prompts=[r["prompt"] for r in read_jsonl(sub(files["validation_prompts"]))],
        heldout_texts=[r["text"] for r in read_jsonl(sub(files["heldout_text"]))], judges=heldout,
        cfg=config.eval, mesh=sharding.make_mesh(config.sft.mesh), seed=config.seed,
        rm_seq_len=config.rm.data.seq_len, rm_max_prompt_len=config.rm.data.max_prompt_len,
        comparisons_eval=read_jsonl(sub("comparisons/comparisons_eval.jsonl")))
    results["splits"] = files
    with open(sub("data/eval_sets.json")) as f:
        results["prompt_families"] = json.load(f)
    rm_eval = [r["eval_accuracy"] for r in train_lib.read_metrics(sub("rm")) if "eval_accuracy" in r]
    results["rm_accuracy"]["stage_eval_accuracy"] = rm_eval[-1] if rm_eval else float("nan")
    results["labelers"] = {"noise": stats["labeler_noise"],
                           **{k: stats["train"][k] for k in ("train_train", "train_heldout", "heldout_heldout")}}
    stages = stage_configs(config, workdir)
    models = eval_models(config)
    results["compute"] = {model: compute_tokens(stages[stage]) for model, stage in models.items()}
    results["timings"] = json.load(open(sub("timings.json"))) if os.path.exists(sub("timings.json")) else {}
    rl = [n for n in RL_STAGES if n in models.values()]
    evaluate.write_report(results, workdir, {n: train_lib.read_metrics(sub(n)) for n in rl})


# ----------------------------------------------------------------------------- over-optimisation sweep

def sweep_runs(config, workdir: str) -> dict[str, ml_collections.ConfigDict]:
    """{tag: RL stage config} of the sweep: PPO (config.ppo) at each KL coefficient x length, and the same
    against the oracle (the reference labeler's true utility as a verifier reward) at the smallest KL."""
    base = stage_configs(config, workdir)["ppo"]
    s, runs = config.sweep, {}
    for beta, steps in itertools.product(s.kl_coefs, s.num_steps):
        runs[f"kl{beta:g}_it{steps}"] = config_lib.replace(base, **{"ppo.kl_coef": beta, "train.num_steps": steps})
    if s.oracle:
        beta, steps = min(s.kl_coefs), max(s.num_steps)
        runs[f"oracle_kl{beta:g}_it{steps}"] = config_lib.replace(base, **{
            "ppo.kl_coef": beta, "train.num_steps": steps, "ppo.reward": "verifier",
            "ppo.verifier": "instructgpt_jax.miniature.world:oracle"})
    return runs


def run_sweep(config, workdir: str) -> None:
    """Train every sweep run (each resumable in DIR/sweep/<tag>), evaluate it against SFT on the first
    config.sweep.eval_prompts *validation* prompts, and plot true utility and RM score against KL to SFT
    (Gao et al. 2022) -> DIR/sweep.{json,png}. The best RM-reward run (highest validation utility; the
    oracle run is a bound, not a candidate) is selected on validation only, then evaluated once on as many
    test prompts: sweep.json = {"selected_on": "validation", "points": {tag: validation metrics},
    "best": {"tag", "validation", "test"}}."""
    from instructgpt_jax import ppo, sharding
    sub = lambda *s: os.path.join(workdir, *s)  # noqa: E731
    runs = sweep_runs(config, workdir)
    for tag, stage in runs.items():
        if not os.path.exists(sub("sweep", tag, "export_ema", "meta.json")):
            log(f"sweep: {tag}")
            ppo.train(stage, sub("sweep", tag))
    with open(sub("comparisons/stats.json")) as f:
        noise = json.load(f)["labeler_noise"]
    _, heldout = populations(config, noise)
    n = config.sweep.eval_prompts
    keys = ("kl_to_sft", "utility", "rm_score", "win_rate", "win_ci")

    def evaluate_on(split_file, exports):
        prompts = [r["prompt"] for r in read_jsonl(sub("data", split_file))][:n]
        res = evaluate.evaluate(exports, sub("rm"), prompts=prompts,
                                heldout_texts=[r["text"] for r in read_jsonl(sub("data/heldout_text.jsonl"))][:64],
                                judges=heldout, cfg=config.eval, mesh=sharding.make_mesh(config.sft.mesh),
                                seed=config.seed, rm_seq_len=config.rm.data.seq_len,
                                rm_max_prompt_len=config.rm.data.max_prompt_len)
        return {tag: {k: res["models"][tag][k] for k in keys} for tag in exports}

    points = evaluate_on("validation_prompts.jsonl",
                         {"sft": sub("sft"), **{tag: sub("sweep", tag, "export") for tag in runs}})
    best = max((t for t in runs if not t.startswith("oracle")), key=lambda t: points[t]["utility"])
    test = evaluate_on("test_prompts.jsonl", {"sft": sub("sft"), best: sub("sweep", best, "export")})
    checkpoints.write_json_atomic(sub("sweep.json"), {
        "selected_on": "validation", "points": points,
        "best": {"tag": best, "validation": points[best], "test": test[best]}})
    log(f"sweep: best RM-reward run on validation utility: {best} ({points[best]['utility']:+.3f}; test "
        f"{test[best]['utility']:+.3f})")
    plot_sweep(points, sub("sweep.png"))


def plot_sweep(points: dict, path: str) -> None:
    """True utility (gold) and RM score (proxy) against sqrt(KL to SFT), Gao et al. 2022's distance: one
    colour per KL coefficient, circles for the shorter runs and squares for the longer; the oracle-reward
    runs as stars (their proxy is the truth: an upper bound); SFT in grey at the origin."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    betas = sorted({_tag_value(t, "kl") for t in points if t != "sft"})
    steps = sorted({_tag_value(t, "it") for t in points if t != "sft"})
    colors = dict(zip(betas, plt.cm.viridis(np.linspace(0, 0.9, len(betas)))))
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for tag, p in points.items():
        x = np.sqrt(max(p["kl_to_sft"], 0.0))
        if tag == "sft":
            style = dict(color="gray", marker="o", label="SFT")
        elif tag.startswith("oracle"):
            style = dict(color="tab:purple", marker="*", s=160, label=f"oracle reward, {tag.split('_', 1)[1]}")
        else:
            beta, it = _tag_value(tag, "kl"), _tag_value(tag, "it")
            style = dict(color=colors[beta], marker="o" if it == steps[0] else "s",
                         label=f"beta {beta:g}, {it:g} it")
        ax[0].scatter(x, p["utility"], **style)
        ax[1].scatter(x, p["rm_score"], **style)
    ax[0].set(title="gold: true labeler utility (validation prompts)", xlabel="sqrt(KL to SFT per sequence)",
              ylabel="utility")
    ax[1].set(title="proxy: reward-model score (validation prompts)", xlabel="sqrt(KL to SFT per sequence)",
              ylabel="RM score")
    ax[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tag_value(tag: str, key: str) -> float:
    """The number after `key` in a sweep tag such as 'kl0.3_it120' or 'oracle_kl0.01_it120'."""
    return float(next(part[len(key):] for part in tag.split("_") if part.startswith(key)))


# ----------------------------------------------------------------------------- plan, check, run

def plan(config: ml_collections.ConfigDict, workdir: str) -> list[Step]:
    from instructgpt_jax import dpo, ppo, rm, sft
    stages = stage_configs(config, workdir)
    sub = lambda s: os.path.join(workdir, s)  # noqa: E731
    seeded = {"seed": config.seed, "world": config.world.to_dict()}
    as_saved = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples come back from config.json as lists)
    trainers = {"pretrain": sft.train, "sft": sft.train, "pretrain_large": sft.train, "sft_large": sft.train,
                "rm": rm.train, **{n: dpo.train for n in DPO_STAGES}, **{n: ppo.train for n in RL_STAGES}}

    def stage(name):
        return Step(name, sub(name), json.loads(stages[name].to_json()),
                    lambda: trainers[name](stages[name], sub(name)),
                    "export_ema/meta.json" if name in RL_STAGES else "export/meta.json", is_stage=True)

    steps = {
        "data": Step("data", sub("data"), as_saved(dict(seeded, vocab_size=config.pretrain.model.vocab_size,
                                                        eval_prompts=config.eval.num_prompts,
                                                        validation_prompts=config.eval.validation_prompts)),
                     lambda: write_data(config, sub("data")), "config.json"),
        "comparisons": Step("comparisons", sub("comparisons"),
                            as_saved(dict(seeded, comparisons=config.comparisons.to_dict())),
                            lambda: make_comparisons(config, sub("sft"), sub("data"), sub("comparisons")),
                            "config.json"),
        "eval": Step("eval", sub("eval"), as_saved(dict(seeded, eval=config.eval.to_dict(),
                                                        models=sorted(eval_models(config)))),
                     lambda: run_eval(config, workdir), "config.json", redo_if_changed=True),
        **{name: stage(name) for name in TRAINED},
    }
    out = [steps[name] for name in STEPS if config.methods or name not in METHODS]
    if config.sweep.enabled:
        out.append(Step("sweep", sub("sweep"), as_saved(dict(seeded, sweep=config.sweep.to_dict(),
                                                             ppo=json.loads(stages["ppo"].to_json()))),
                        lambda: run_sweep(config, workdir), "config.json"))
    return out


def check_configs(steps: list[Step]) -> None:
    """Every finished step (and every checkpointed stage) must have been run with the current config."""
    for s in steps:
        path = os.path.join(s.dir, "config.json")
        if not os.path.exists(path) or s.redo_if_changed:
            continue
        ckpt = os.path.join(s.dir, "checkpoints")
        if s.done():
            # a finished stage: a longer schedule, say, is a different result (tasks run alongside are not)
            ignore = DERIVED_KEYS + ("train.eval_tasks",)
        elif s.is_stage and os.path.isdir(ckpt) and os.listdir(ckpt):
            ignore = DERIVED_KEYS + checkpoints.RESUMABLE_KEYS  # the stage will resume: what it allows
        else:
            continue
        with open(path) as f:
            diff = checkpoints.config_diff(json.load(f), s.config, ignore=ignore)
        if diff:
            raise ValueError(
                f"stage {s.name!r} in {s.dir} was run with a different config; nothing was changed. Use a new "
                f"--workdir, restore these keys, or delete {s.dir} (and the stages after it) to redo it:\n  "
                + "\n  ".join(diff))


@contextlib.contextmanager
def compilation_cache(path: str):
    """XLA's persistent compilation cache in `path` for the block (unless JAX_COMPILATION_CACHE_DIR names
    one): the stages compile many identical programs (PPO and PPO-ptx sample and score alike, every sweep
    run, the evaluation's passes), and a rerun or resumed run compiles almost nothing."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        cc.reset_cache()


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or finish) every step of the pipeline in `workdir`; returns the evaluation results."""
    workdir = os.path.abspath(workdir)
    steps = plan(config, workdir)
    check_configs(steps)
    os.makedirs(workdir, exist_ok=True)
    with compilation_cache(os.path.join(workdir, "xla_cache")):
        return _run(config, workdir, steps)


def _run(config: ml_collections.ConfigDict, workdir: str, steps: list[Step]) -> dict:
    checkpoints.write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
    timings_path = os.path.join(workdir, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    start = time.perf_counter()
    for s in steps:
        if s.done():
            log(f"{s.name:<14} skip (finished, same config)")
            continue
        log(f"{s.name:<14} start -> {s.dir}")
        t0 = time.perf_counter()
        os.makedirs(s.dir, exist_ok=True)
        s.run()
        if not s.is_stage:  # the marker of a finished non-training step, written last
            checkpoints.write_json_atomic(os.path.join(s.dir, "config.json"), s.config)
        timings[s.name] = round(time.perf_counter() - t0, 1)
        checkpoints.write_json_atomic(timings_path, timings)
        log(f"{s.name:<14} done in {timings[s.name]:.0f}s")
    log(f"all steps done in {time.perf_counter() - start:.0f}s this run "
        f"({sum(timings.values()):.0f}s over all runs); results in {workdir}/results.md")
    results = evaluate.load_results(workdir)
    print("\n" + evaluate.markdown_table(results))
    print("\n" + evaluate.dimensions_table(results))
    print("\n" + "\n".join(f"{k}: {evaluate.check_word(v)}" for k, v in results["checks"].items()), flush=True)
    return results
