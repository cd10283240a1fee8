"""The whole InstructGPT method in miniature, one command: `--config=configs/pipeline.py --workdir=DIR`.

    data         DIR/data         tokenizer + synthetic JSONL: pretraining text, demonstrations, prompts
    pretrain     DIR/pretrain     a tiny base LM (misaligned: it continues instructions with more text)
    sft          DIR/sft          supervised fine-tuning on the labeler's demonstrations
    comparisons  DIR/comparisons  K (4..9) SFT samples per prompt, ranked by the noisy labeler
    rm           DIR/rm           K-choose-2 reward model on those rankings
    ppo          DIR/ppo          PPO against the RM (ptx_coef 0)
    ppo_ptx      DIR/ppo_ptx      PPO-ptx (pretraining log-likelihood mixed in)
    eval         DIR/eval         win rates vs SFT etc. -> DIR/results.{json,md,png}

Every step writes its own sub-workdir and its config.json. Rerunning skips finished steps (the training
stages resume an interrupted run themselves). Before anything runs, every finished (or, for a training
stage, checkpointed) step's saved config is compared with the current one: a difference is an error
naming the step and the keys, and nothing is touched.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import time
from typing import Callable

import ml_collections

from instructgpt_jax import checkpoints, config_lib, train_lib
from instructgpt_jax.miniature import evaluate, world

STEPS = ("data", "pretrain", "sft", "comparisons", "rm", "ppo", "ppo_ptx", "eval")
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

    def done(self) -> bool:
        return os.path.exists(os.path.join(self.dir, self.done_file))


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
    ppo_paths = {"data.train": data("ppo_prompts.jsonl"), "data.eval": data("ppo_eval_prompts.jsonl"),
                 "data.ptx": data("pretrain_train.jsonl"), "init.from_workdir": sub("sft"),
                 "ppo.rm_workdir": sub("rm")}
    paths = {
        "pretrain": {"data.train": data("pretrain_train.jsonl"), "data.eval": data("pretrain_eval.jsonl"),
                     "data.tokenizer": data("tokenizer.model")},
        "sft": {"data.train": data("demos_train.jsonl"), "data.eval": data("demos_eval.jsonl"),
                "init.from_workdir": sub("pretrain")},
        "rm": {"data.train": os.path.join(sub("comparisons"), "comparisons_train.jsonl"),
               "data.eval": os.path.join(sub("comparisons"), "comparisons_eval.jsonl"),
               "data.demonstrations": data("demos_train.jsonl"), "init.from_workdir": sub("sft")},
        "ppo": ppo_paths,
        "ppo_ptx": ppo_paths,
    }
    return {name: config_lib.replace(config[name], seed=config.seed, **p) for name, p in paths.items()}


# ----------------------------------------------------------------------------- the non-training steps

def write_data(config, out: str) -> None:
    """Tokenizer and every dataset of the run, from the synthetic world (all seeded)."""
    from instructgpt_jax.data.tokenizer import train_tokenizer
    w, seed = config.world, config.seed
    labeler = world.Labeler(w.labeler_noise, seed=seed, harm_penalty=w.harm_penalty)
    path = lambda f: os.path.join(out, f)  # noqa: E731
    make = lambda n, s, split: world.make_prompts(n, s, split, tempt_rate=w.tempt_rate)  # noqa: E731
    prompts = lambda n, s, split: [{"prompt": world.format_prompt(p.text)} for p in make(n, s, split)]  # noqa: E731
    rng = random.Random(f"demonstrators/{seed}")

    def demos(n, s, split):
        # Demonstrators are imperfect: on a tempting prompt one sometimes writes the literal answer, forbidden
        # word included (world.demo_literal_rate). SFT imitates that; only the comparisons can correct it.
        return [{"prompt": world.format_prompt(p.text), "response": world.naive_solve(p)
                 if p.tempting and rng.random() < w.demo_literal_rate else labeler.demonstrate(p)}
                for p in make(n, s, split)]

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
        "eval_prompts.jsonl": prompts(config.eval.num_prompts, seed, "test"),   # never trained on
    }
    for name, rows in files.items():
        world.write_jsonl(path(name), rows)
    texts = [r["text"] for r in pretrain] + [r["prompt"] + " " + r["response"] for r in demos_train]
    train_tokenizer(texts, path("tokenizer.model"), vocab_size=config.pretrain.model.vocab_size, seed=seed)


def rank_all(labeler: world.Labeler, utilities: list[list[float]], answers: list[list[str]], seed: int):
    """The labeler's noisy ranks of each prompt's answers (given their noiseless utilities), and the pairwise
    agreement with the noiseless labeler (over pairs it strictly orders; a noisy tie counts half), as
    `world.agreement_rate` measures it."""
    rng = random.Random(f"ranks/{seed}")  # the same draws for every noise level: calibration is monotone
    ranks, agree, total = [], 0.0, 0
    for utils, ans in zip(utilities, answers):
        clean, noisy = world.dense_ranks(utils), world.dense_ranks(labeler.noisy_utilities(utils, ans, rng))
        ranks.append(noisy)
        for i, j in itertools.combinations(range(len(ans)), 2):
            if clean[i] != clean[j]:
                total += 1
                agree += 0.5 if noisy[i] == noisy[j] else float((clean[i] < clean[j]) == (noisy[i] < noisy[j]))
    return ranks, agree / max(total, 1)


def calibrate_noise(target: float, utilities, answers, seed: int) -> float:
    """Gumbel scale at which the labeler agrees with its noiseless self on `target` of these pairs (bisection).
    SFT samples differ less than `synthetic`'s mixed completion sets, so the same agreement needs less noise."""
    lo, hi = 0.0, 4.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if rank_all(world.Labeler(mid), utilities, answers, seed)[1] > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def make_comparisons(config, sft_dir: str, data_dir: str, out: str) -> None:
    """K samples per prompt from the SFT model (K uniform in k_min..k_max; the i-th at temperature
    temperatures[i % len]), ranked by the noisy labeler on the parsed answers. The raw completions are
    stored: the RM must score what PPO will sample."""
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
        texts = [""] * len(slots)
        for t, sampler in enumerate(samplers):
            idx = [n for n, (_, tt) in enumerate(slots) if tt == t]
            out_t = evaluate.generate(sampler, params, tok, [slots[n][0] for n in idx], max_prompt_len=c.max_prompt_len,
                                      batch_size=c.batch_size, seed=config.seed + 10 * i + t, mesh=mesh)["texts"]
            for n, text in zip(idx, out_t):
                texts[n] = text
        comps = [texts[j * w.k_max: j * w.k_max + rng.randint(w.k_min, w.k_max)] for j in range(len(prompts))]
        answers = [[world.parse_answer(x) for x in cs] for cs in comps]
        utils = [[world.utility(p, a, w.harm_penalty) for a in ans] for p, ans in zip(prompts, answers)]
        splits[split] = (prompts, comps, answers, utils)
    noise = w.labeler_noise
    if w.labeler_agreement > 0:
        noise = calibrate_noise(w.labeler_agreement, splits["train"][3], splits["train"][2], config.seed)
    labeler = world.Labeler(noise, seed=config.seed, harm_penalty=w.harm_penalty)
    stats = {"labeler_noise": noise}
    for i, (split, (prompts, comps, answers, utils)) in enumerate(splits.items()):
        ranks, agreement = rank_all(labeler, utils, answers, config.seed + i)
        world.write_jsonl(os.path.join(out, f"comparisons_{split}.jsonl"),
                              [{"prompt": p, "completions": cs, "ranks": r} for p, cs, r in zip(prompts, comps, ranks)])
        stats[split] = {"prompts": len(prompts), "agreement": agreement, "mean_k": sum(map(len, comps)) / len(comps),
                        "all_tied": sum(len(set(r)) < 2 for r in ranks)}
    checkpoints.write_json_atomic(os.path.join(out, "stats.json"), stats)
    log(f"comparisons: labeler noise {noise:.3f}, agreement with the noiseless labeler "
        f"{stats['train']['agreement']:.1%} (train) / {stats['eval']['agreement']:.1%} (eval)")


def run_eval(config, workdir: str) -> None:
    from instructgpt_jax import sharding
    sub = lambda s: os.path.join(workdir, s)  # noqa: E731
    policy = "export_ema" if config.eval.use_ema else "export"
    exports = {"base": sub("pretrain"), "sft": sub("sft"), "ppo": os.path.join(sub("ppo"), policy),
               "ppo_ptx": os.path.join(sub("ppo_ptx"), policy)}
    w = config.world
    with open(sub("comparisons/stats.json")) as f:
        stats = json.load(f)  # the comparisons' labeler (for config.eval.noisy_judge) and its agreement
    results = evaluate.evaluate(
        exports, sub("rm"), prompts=[r["prompt"] for r in read_jsonl(sub("data/eval_prompts.jsonl"))],
        heldout_texts=[r["text"] for r in read_jsonl(sub("data/heldout_text.jsonl"))],
        labeler=world.Labeler(stats["labeler_noise"], seed=config.seed + 7, harm_penalty=w.harm_penalty),
        cfg=config.eval, mesh=sharding.make_mesh(config.sft.mesh), seed=config.seed,
        rm_seq_len=config.rm.data.seq_len, rm_max_prompt_len=config.rm.data.max_prompt_len)
    rm_eval = [r["eval_accuracy"] for r in train_lib.read_metrics(sub("rm")) if "eval_accuracy" in r]
    results["rm"] = {"labeler_noise": stats["labeler_noise"], "labeler_agreement": stats["train"]["agreement"],
                     "eval_accuracy": rm_eval[-1] if rm_eval else float("nan")}
    evaluate.write_report(results, workdir, {n: train_lib.read_metrics(sub(n)) for n in ("ppo", "ppo_ptx")})


# ----------------------------------------------------------------------------- plan, check, run

def plan(config: ml_collections.ConfigDict, workdir: str) -> list[Step]:
    from instructgpt_jax import ppo, rm, sft
    stages = stage_configs(config, workdir)
    sub = lambda s: os.path.join(workdir, s)  # noqa: E731
    world = {"seed": config.seed, "world": config.world.to_dict()}
    as_saved = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples come back from config.json as lists)
    trainers = {"pretrain": sft.train, "sft": sft.train, "rm": rm.train, "ppo": ppo.train, "ppo_ptx": ppo.train}

    def stage(name):
        return Step(name, sub(name), json.loads(stages[name].to_json()),
                    lambda: trainers[name](stages[name], sub(name)),
                    "export_ema/meta.json" if name.startswith("ppo") else "export/meta.json", is_stage=True)

    return [
        Step("data", sub("data"), as_saved(dict(world, vocab_size=config.pretrain.model.vocab_size,
                                                eval_prompts=config.eval.num_prompts)),
             lambda: write_data(config, sub("data")), "config.json"),
        stage("pretrain"), stage("sft"),
        Step("comparisons", sub("comparisons"), as_saved(dict(world, comparisons=config.comparisons.to_dict())),
             lambda: make_comparisons(config, sub("sft"), sub("data"), sub("comparisons")), "config.json"),
        stage("rm"), stage("ppo"), stage("ppo_ptx"),
        Step("eval", sub("eval"), as_saved(dict(world, eval=config.eval.to_dict())), lambda: run_eval(config, workdir),
             "config.json"),
    ]


def check_configs(steps: list[Step]) -> None:
    """Every finished step (and every checkpointed stage) must have been run with the current config."""
    for s in steps:
        path = os.path.join(s.dir, "config.json")
        if not os.path.exists(path):
            continue
        ckpt = os.path.join(s.dir, "checkpoints")
        if s.done():
            ignore = DERIVED_KEYS  # a finished stage: a longer schedule, say, is a different result
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


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or finish) every step of the pipeline in `workdir`; returns the evaluation results."""
    workdir = os.path.abspath(workdir)
    steps = plan(config, workdir)
    check_configs(steps)
    os.makedirs(workdir, exist_ok=True)
    checkpoints.write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
    timings_path = os.path.join(workdir, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    start = time.perf_counter()
    for s in steps:
        if s.done():
            log(f"{s.name:<11} skip (finished, same config)")
            continue
        log(f"{s.name:<11} start -> {s.dir}")
        t0 = time.perf_counter()
        os.makedirs(s.dir, exist_ok=True)
        s.run()
        if not s.is_stage:  # the marker of a finished non-training step, written last
            checkpoints.write_json_atomic(os.path.join(s.dir, "config.json"), s.config)
        timings[s.name] = round(time.perf_counter() - t0, 1)
        checkpoints.write_json_atomic(timings_path, timings)
        log(f"{s.name:<11} done in {timings[s.name]:.0f}s")
    log(f"all steps done in {time.perf_counter() - start:.0f}s this run "
        f"({sum(timings.values()):.0f}s over all runs); results in {workdir}/results.md")
    results = evaluate.load_results(workdir)
    print("\n" + evaluate.markdown_table(results))
    print("\n" + "\n".join(f"{k}: {'yes' if v else 'NO'}" for k, v in results["checks"].items()), flush=True)
    return results
