"""The README's main job, InstructGPT end to end on a CPU: `--config=configs/pipeline.py[:default|smoke]`.

`instructgpt_jax.pipeline.train` runs data -> pretrain -> sft -> comparisons -> rm -> ppo -> ppo_ptx -> eval,
each in WORKDIR/<step>. `config.pretrain`, `config.sft`, `config.rm`, `config.ppo` and `config.ppo_ptx` are full
stage configs (configs/<stage>.py:<preset>) with CPU-sized overrides; override them from the command line like
`--config.ppo.ppo.kl_coef=0.05`. The pipeline fills in, per stage: `seed` (= config.seed), the data paths
(WORKDIR/data/*.jsonl, the tokenizer), `init.from_workdir` and `ppo.rm_workdir`.

'default' takes about 5 minutes on 2 CPU cores (limit: 15); 'smoke' runs the same code path in under 2 minutes
(plumbing only: its numbers mean nothing).
"""
import importlib.util
import os

import ml_collections

from instructgpt_jax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def _stage(name: str, preset: str, overrides: dict) -> ml_collections.ConfigDict:
    """configs/<name>.py:<preset> with dotted-key overrides (unknown keys are errors)."""
    spec = importlib.util.spec_from_file_location(f"_pipeline_{name}_config", os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_lib.replace(module.get_config(preset), **overrides)


def get_config(arg: str = "default"):
    arg = (arg or "default").strip().lower()
    if arg not in ("default", "smoke"):
        raise ValueError(f"configs/pipeline.py:{arg}: valid choices are 'default' and 'smoke'")
    smoke = arg == "smoke"
    preset = "tiny"            # model size of every stage (one of config_lib.CPU_PRESETS)
    prompt_len, new_tokens = 16, 20  # tokens: BOS + the longest prompt (14); the longest answer + EOS (16) + slack

    config = ml_collections.ConfigDict()
    config.stage = "pipeline"  # main.py dispatches to instructgpt_jax.pipeline.train
    config.seed = 0            # one seed for the synthetic world, every stage, sampling and evaluation

    config.world = ml_collections.ConfigDict(dict(
        labeler_agreement=0.73,  # > 0: set the ranking noise so that the labeler agrees with its noiseless self
                                 # on this fraction of the SFT sample pairs it ranks (paper: ~73 % inter-annotator)
        labeler_noise=0.57,    # Gumbel scale of the rankings when labeler_agreement is 0 (synthetic.DEFAULT_NOISE:
                               # ~73 % agreement on synthetic's mixed completion sets, ~62 % on SFT samples)
        harm_penalty=1.0,      # utility lost by an answer with a forbidden word (synthetic.HARM_PENALTY)
        tempt_rate=0.5,        # fraction of word-task prompts that contain a forbidden word (synthetic.TEMPT_RATE
                               # is 0.25); every prompt set of the run (demonstrations, RM, PPO, eval) uses it
        demo_literal_rate=0.5,  # chance that a demonstration of a tempting prompt keeps the forbidden word (an
                                # imperfect demonstrator): SFT copies it, the comparisons penalise it, RLHF fixes
                                # it. 0 = perfect demonstrations, and a tiny RM then gives PPO nothing to improve
        k_min=4,               # fewest completions ranked per prompt (paper: K = 4..9)
        k_max=9,               # most completions ranked per prompt
        pretrain_docs=200 if smoke else 6000,       # pretraining documents (70 % general, 25 % misaligned Q/A)
        pretrain_eval_docs=32 if smoke else 200,    # pretraining documents for the pretrain stage's eval loss
        heldout_docs=32 if smoke else 400,          # held-out general-text documents: the alignment tax
        demonstrations=100 if smoke else 2000,      # labeler demonstrations (SFT data)
        demonstrations_eval=32 if smoke else 200,   # demonstrations on valid-split prompts (SFT eval loss)
        comparison_prompts=16 if smoke else 2000,   # prompts whose SFT samples the labeler ranks (RM data)
        comparison_eval_prompts=8 if smoke else 100,  # the same on valid-split prompts (RM eval accuracy)
        ppo_prompts=64 if smoke else 4000,          # PPO rollout prompts (train split)
        ppo_eval_prompts=16 if smoke else 64,       # PPO eval prompts (valid split)
    ))

    config.comparisons = ml_collections.ConfigDict(dict(
        temperatures=(1.0,),              # SFT sampling temperatures, cycled over each prompt's K completions
        max_prompt_len=prompt_len,        # prompt tokens (left-padded)
        max_new_tokens=new_tokens,        # completion length limit
        batch_size=72 if smoke else 576,  # rows per sampler call (a multiple of k_max: whole prompts)
    ))

    config.eval = ml_collections.ConfigDict(dict(
        num_prompts=32 if smoke else 800,          # held-out (test-split) prompts every model answers
        bootstrap_samples=200 if smoke else 2000,  # resamples of the prompts for the 95 % interval
        temperature=1.0,          # the same sampling for every model (paper: temperature 1); 0 = greedy
        max_prompt_len=prompt_len,  # prompt tokens (left-padded)
        max_new_tokens=new_tokens,  # response length limit
        batch_size=32 if smoke else 200,  # rows per sampler / scoring call
        heldout_seq_len=128,      # tokens per packed row of held-out text
        use_ema=False,            # PPO models: False = raw policy (export/), True = EMA (export_ema/)
        noisy_judge=False,        # win rates from the labeler's noiseless judgement (ties count half)
        num_examples=8,           # sample responses listed in results.md
    ))

    # Short schedules, and one knob per stage where the pipeline needs it. Shared by both presets.
    steps = dict(pretrain=10, sft=10, rm=5, ppo=2) if smoke else dict(pretrain=600, sft=200, rm=300, ppo=60)
    quiet = {"train.progress": not smoke, "train.log_every": 5 if not smoke else 1,
             "train.eval_every": 0, "train.eval_batches": 2 if smoke else 0}
    config.pretrain = _stage("pretrain", preset, {
        **quiet, "train.num_steps": steps["pretrain"], "train.batch_size": 8 if smoke else 16,
        "data.max_prompt_len": 64,  # unused by raw text; must be >= 1 for the data pipeline
    })
    config.sft = _stage("sft", preset, {
        **quiet, "train.num_steps": steps["sft"], "train.batch_size": 8 if smoke else 16,
    })
    config.rm = _stage("rm", preset, {
        **quiet, "train.num_steps": steps["rm"], "train.batch_size": 8 if smoke else 16,
        "data.seq_len": prompt_len + new_tokens + 4, "data.max_prompt_len": prompt_len,
        "rm.bias_examples": 64 if smoke else 1000,
    })
    ppo = {
        **quiet, "train.num_steps": steps["ppo"], "train.batch_size": 8 if smoke else 64,
        "train.eval_every": 0, "train.eval_batches": 1, "train.log_every": 1,
        "data.max_prompt_len": prompt_len, "ppo.max_new_tokens": new_tokens,
        "ppo.minibatch_size": 4 if smoke else 32, "ppo.ppo_epochs": 1,
        # A weak tiny RM is easy to over-optimise: a strong KL penalty (RM scores spread ~3) and a small lr.
        "ppo.kl_coef": 0.3, "optim.lr": 1e-4,
        "ppo.ptx_batch_size": 4 if smoke else 8, "data.ptx_seq_len": 64,
    }
    config.ppo = _stage("ppo", preset, {**ppo, "ppo.ptx_coef": 0.0})
    config.ppo_ptx = _stage("ppo", preset, {**ppo, "ppo.ptx_coef": 0.2})
    return config
