"""The README's main job, InstructGPT end to end on a CPU: `--config=configs/pipeline.py[:default|methods|smoke|sweep]`.

`instructgpt_jax.miniature.pipeline.train` runs data -> pretrain -> sft -> comparisons -> rm -> ppo, ppo_ptx
[-> dpo, dpo_pl, grpo, grpo_verifier] -> pretrain_large, sft_large -> eval, each in WORKDIR/<step>. `config.<stage>`
is a full stage config (`config_lib.load('<stage file>', preset)`) with CPU-sized overrides; override them from
the command line like `--config.ppo.ppo.kl_coef=0.05`. The pipeline fills in, per stage: `seed`
(= config.seed), the data paths (WORKDIR/data/*.jsonl, the tokenizer), `init.from_workdir` and `ppo.rm_workdir`.

'default' (InstructGPT: SFT, RM, PPO, PPO-ptx and the larger SFT model) fits in 10 minutes on 2 idle CPU
cores; 'methods' adds the methods that came after it (DPO, listwise DPO, GRPO with the RM and with the world's
verifier, PPO with LoRA adapters) to the same run and table (run it on a finished default's WORKDIR: only the new steps and the
evaluation run); 'sweep' adds the over-optimisation sweep (PPO at several KL coefficients and lengths, and an
oracle-reward run: WORKDIR/sweep.png); 'smoke' runs the default's code path on tiny schedules (plumbing only:
its numbers mean nothing; add `--config.methods=True` for the methods' path).
"""
import ml_collections

from instructgpt_jax import config_lib

LARGE = {"model.num_layers": 4, "model.d_model": 96, "model.num_heads": 4, "model.num_kv_heads": 4,
         "model.head_dim": 24, "model.mlp_dim": 384,  # ~503k parameters: ~3.6x the tiny preset's ~139k
         "model.scan_unroll": 4}  # speed only: every layer unrolled (tiny's 2 is half): 0.33 -> 0.26 s per step


def get_config(arg: str = "default"):
    arg = (arg or "default").strip().lower()
    if arg not in ("default", "methods", "smoke", "sweep"):
        raise ValueError(f"configs/pipeline.py:{arg}: valid choices are 'default', 'methods', 'smoke' and 'sweep'")
    smoke = arg == "smoke"
    preset = "tiny"            # model size of every stage but the large SFT model (config_lib.CPU_PRESETS)
    prompt_len, new_tokens = 16, 20  # tokens: BOS + the longest prompt (~15); the longest answer + EOS + slack

    config = ml_collections.ConfigDict()
    config.stage = "pipeline"  # main.py dispatches to instructgpt_jax.miniature.pipeline.train
    config.seed = 0            # one seed for the synthetic world, every stage, sampling and evaluation
    config.methods = arg == "methods"  # also train DPO, DPO-PL, GRPO and GRPO-verifier (config.dpo, ... below)

    config.world = ml_collections.ConfigDict(dict(
        labeler_agreement=0.73,  # > 0: the ranking noise at which two training labelers agree on this fraction of
                                 # the SFT sample pairs they rank (paper: 72.6 % inter-annotator agreement)
        labeler_noise=0.35,    # Gumbel scale of the rankings when labeler_agreement is 0 (world.DEFAULT_NOISE)
        train_labelers=4,      # labelers who rank the RM's comparisons (one per prompt, in turn)
        heldout_labelers=4,    # a disjoint population that judges the final evaluation
        weight_jitter=0.2,     # log-normal spread of each labeler's weights around world.WEIGHTS
        tempt_rate=0.5,        # fraction of word-task prompts that contain a forbidden word (world.TEMPT_RATE
                               # is 0.25); every prompt set of the run (demonstrations, RM, RL, eval) uses it
        caps_rate=0.3,         # fraction of reverse / sort / copy prompts with the "(caps)" format constraint
        demo_literal_rate=0.5,   # a demonstration of a tempting prompt keeps the forbidden word (imperfect
                                 # demonstrators: SFT copies it, the comparisons penalise it, RLHF fixes it)
        demo_chatter_rate=0.3,   # a demonstration ends (or starts) with a pleasantry ("hope this helps")
        demo_caps_miss_rate=0.4,  # a demonstration overlooks the "(caps)" constraint
        k_min=4,               # fewest completions ranked per prompt (paper: K = 4..9)
        k_max=9,               # most completions ranked per prompt
        pretrain_docs=200 if smoke else 6000,       # pretraining documents (70 % general, 25 % misaligned Q/A)
        pretrain_eval_docs=32 if smoke else 200,    # pretraining documents for the pretrain stage's eval loss
        heldout_docs=32 if smoke else 400,          # held-out general-text documents: the alignment tax
        demonstrations=100 if smoke else 2000,      # labeler demonstrations (SFT data)
        demonstrations_eval=32 if smoke else 200,   # demonstrations on valid-split prompts (SFT eval loss)
        comparison_prompts=16 if smoke else 2000,   # prompts whose SFT samples the labelers rank (RM / DPO data)
        comparison_eval_prompts=8 if smoke else 200,  # the same on valid-split prompts (RM accuracy)
        ppo_prompts=64 if smoke else 4000,          # RL rollout prompts (train split)
        ppo_eval_prompts=16 if smoke else 64,       # RL eval prompts (valid split)
    ))

    config.comparisons = ml_collections.ConfigDict(dict(
        temperatures=(1.0,),              # SFT sampling temperatures, cycled over each prompt's K completions
        max_prompt_len=prompt_len,        # prompt tokens (left-padded)
        max_new_tokens=new_tokens,        # completion length limit
        batch_size=72 if smoke else 576,  # rows per sampler call (a multiple of k_max: whole prompts)
    ))

    config.eval = ml_collections.ConfigDict(dict(
        num_prompts=32 if smoke else 800,          # distinct test-split prompts every model answers (reported)
        validation_prompts=16 if smoke else 400,   # distinct validation-split prompts, judged the same way (selection)
        bootstrap_samples=200 if smoke else 2000,  # resamples of the prompts for the 95 % intervals
        temperature=1.0,          # the same sampling for every model (paper: temperature 1); 0 = greedy
        max_prompt_len=prompt_len,  # prompt tokens (left-padded)
        max_new_tokens=new_tokens,  # response length limit
        batch_size=32 if smoke else 200,  # rows per sampler / scoring call
        heldout_seq_len=128,      # tokens per packed row of held-out text
        num_examples=8,           # sample responses listed in results.md
    ))

    # Short schedules, and one knob per stage where the pipeline needs it. Shared by every preset.
    steps = (dict(pretrain=10, sft=10, rm=5, rl=2, dpo=3) if smoke else
             dict(pretrain=450, sft=250, rm=300, rl=60, dpo=150))
    quiet = {"train.progress": not smoke, "train.log_every": 5 if not smoke else 1,
             "train.eval_every": 0, "train.eval_batches": 2 if smoke else 0}
    load = config_lib.load
    pretrain = {**quiet, "train.num_steps": steps["pretrain"], "train.batch_size": 8 if smoke else 16,
                "data.max_prompt_len": 64}  # unused by raw text; must be >= 1 for the data pipeline
    # SFT at a tenth of the pretraining lr (3e-3): it learns the format without forgetting its pretraining
    # (the paper fine-tunes at a small fraction of GPT-3's pretraining lr).
    sft = {**quiet, "train.num_steps": steps["sft"], "train.batch_size": 8 if smoke else 16, "optim.lr": 3e-4}
    config.pretrain = load("pretrain", preset, **pretrain)
    config.sft = load("sft", preset, **sft)
    config.pretrain_large = load("pretrain", preset, **pretrain, **LARGE)
    config.sft_large = load("sft", preset, **sft, **LARGE)
    comparisons = {**quiet, "train.batch_size": 8 if smoke else 16,
                   "data.seq_len": prompt_len + new_tokens + 4, "data.max_prompt_len": prompt_len}
    config.rm = load("rm", preset, **comparisons, **{"train.num_steps": steps["rm"],
                                                      "rm.bias_examples": 64 if smoke else 1000})
    config.dpo = load("dpo", preset, **comparisons, **{"train.num_steps": steps["dpo"],
                                                        "dpo.loss_type": "sigmoid"})
    config.dpo_pl = load("dpo", preset, **comparisons, **{"train.num_steps": steps["dpo"],
                                                           "dpo.loss_type": "plackett_luce"})
    rl = {
        **quiet, "train.num_steps": steps["rl"], "train.batch_size": 8 if smoke else 64,
        "train.eval_every": 0, "train.eval_batches": 1, "train.log_every": 1,
        "data.max_prompt_len": prompt_len, "ppo.max_new_tokens": new_tokens,
        "ppo.minibatch_size": 4 if smoke else 32, "ppo.ppo_epochs": 1, "optim.lr": 1e-4,
        "ppo.ptx_batch_size": 4 if smoke else 8, "data.ptx_seq_len": 64,
    }
    # PPO: a weak tiny RM is easy to over-optimise: a strong KL penalty (RM scores spread ~3) and a small lr.
    config.ppo = load("ppo", preset, **rl, **{"ppo.kl_coef": 0.3, "ppo.ptx_coef": 0.0})
    config.ppo_ptx = load("ppo", preset, **rl, **{"ppo.kl_coef": 0.3, "ppo.ptx_coef": 0.2})
    # GRPO: the same rollouts per iteration (batch rows), as groups of 4 samples of 16 prompts (smoke: 2 x 4).
    config.grpo = load("grpo", preset, **rl, **{"ppo.group_size": 4})
    config.grpo_verifier = load("grpo", preset, **rl, **{
        "ppo.group_size": 4, "ppo.reward": "verifier", "ppo.verifier": "instructgpt_jax.miniature.world:verify"})
    # PPO with rank-8 LoRA adapters (alpha 16) on the frozen SFT policy and on the RM's trunk (the value model):
    # PPO's settings, at 10x its lr (the usual rule for adapters, which start at zero; not tuned here)
    config.ppo_lora = load("ppo", preset, **{**rl, "ppo.kl_coef": 0.3, "ppo.ptx_coef": 0.0, "optim.lr": 1e-3,
                                             "lora.rank": 8, "lora.alpha": 16.0})

    config.sweep = ml_collections.ConfigDict(dict(
        enabled=arg == "sweep",  # run the over-optimisation sweep after the evaluation
        kl_coefs=(0.01, 0.03, 0.1, 0.3, 1.0),  # PPO's KL coefficient beta per run
        num_steps=(30, 120),     # PPO iterations per run (a longer run drifts further)
        oracle=True,             # also PPO against the true utility (world.oracle) at the smallest beta
        eval_prompts=400,        # validation prompts per sweep run (the best run is selected on them, then tested)
    ))
    return config
