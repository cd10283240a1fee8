"""PPO / PPO-ptx against a frozen reward model: `--config=configs/ppo.py:<preset>`.

Start from the SFT stage (policy and frozen reference: `--config.init.from_workdir=SFT_DIR`) and
the RM stage (frozen reward model, and the value model's init: `--config.ppo.rm_workdir=RM_DIR`).
Paper (Ouyang et al. 2022, appendix C.4): beta 0.02, gamma_ptx 27.8, batch 512, minibatch 64,
1 inner epoch, clip 0.2, temperature 1, value lr 9e-6, 10-iteration warmup from 1/10 of the peak,
policy EMA 0.992, 256k episodes, 8x as many pretraining examples as RL episodes.
`--config.ppo.ptx_coef=0` gives plain PPO.
"""
import ml_collections

from instructgpt_jax import config_lib


def get_config(preset: str = "tiny"):
    preset = config_lib.check_preset(preset)
    cpu = config_lib.is_cpu_preset(preset)
    config = config_lib.base_config("ppo", preset)
    config.model.dropout = 0.0  # the first PPO ratio must be exactly 1: no dropout in the policy
    # train.num_steps counts PPO iterations (one rollout batch + its updates); 256k episodes / 512.
    # The lr schedules count optimizer updates: warmup_steps iterations = warmup_steps x minibatches x epochs.
    config.train = config_lib.train_config(num_steps=30 if cpu else 500, batch_size=32 if cpu else 512, cpu=cpu)
    config.train.log_every = 1
    config.train.eval_every = 10 if cpu else 50
    config.train.eval_batches = 2 if cpu else 8
    config.train.checkpoint_every = 10 if cpu else 50
    config.optim = config_lib.optim_config(3e-4 if cpu else 9.65e-6, warmup_steps=10)
    config.optim.warmup_init_frac = 0.1   # paper: warm up from 1/10 of the peak over 10 iterations
    config.optim.end_lr_frac = 1.0        # then constant
    config.value_optim = config_lib.optim_config(3e-4 if cpu else 9e-6, warmup_steps=10)
    config.value_optim.warmup_init_frac = 0.1
    config.value_optim.end_lr_frac = 1.0
    ctx = config.model.max_len
    config.data = ml_collections.ConfigDict(dict(
        train="",            # JSONL / Parquet of {prompt} or {messages} for rollouts ('builtin' = built-in prompts)
        eval="",             # held-out prompts JSONL ('' = the last 5 % of the training split)
        ptx="",              # pretraining text JSONL {text} for PPO-ptx ('builtin' = built-in synthetic corpus)
        dir="",              # where TFDS writes ArrayRecord files ('' = WORKDIR/tfds)
        tokenizer="",        # .model, tokenizer.json or a checkpoint directory ('' = the SFT stage's)
        chat_template="",    # '' = the SFT stage's / the tokenizer's, 'none', a built-in name or a .jinja file
        fields="",           # column renames 'prompt:question' (canonical:column)
        max_bad_rows=0,      # malformed rows skipped (counted in data_stats) before one is an error
        max_prompt_len=ctx // 2,        # prompts are cropped from the left to this many tokens
        ptx_seq_len=ctx,     # tokens per pretraining row
        builtin_size=4000,   # built-in prompts / pretraining documents when the paths are 'builtin'
    ))
    config.ppo = ml_collections.ConfigDict(dict(
        rm_workdir="",           # reward-model stage workdir (or its export): frozen RM, value init
        reward="rm",             # 'rm' (the trained reward model) or 'verifier' (config.ppo.verifier)
        verifier="",             # 'module:function' (prompt, response) -> float, for reward='verifier'
        advantage_estimator="gae",  # 'gae' (value model, the paper's) or critic-free 'grpo', 'dr_grpo', 'rloo'
        group_size=1,            # samples per prompt (consecutive rows); >= 2 for the critic-free estimators
        max_new_tokens=ctx // 2,  # response length limit
        temperature=1.0,         # sampling temperature (paper: 1); log-probs use the same temperature
        top_k=0,                 # 0 = no top-k filter
        top_p=1.0,               # 1 = no nucleus filter
        minibatch_size=8 if cpu else 64,  # episodes per gradient step
        rollout_chunk=0,         # rows per sampler call and per rollout forward pass (0 = minibatch_size)
        ppo_epochs=1 if not cpu else 2,   # passes over each rollout batch
        clip_eps=0.2,            # policy ratio clip
        loss_agg="",             # policy / KL loss weighting (losses.AGGREGATIONS); '' = as in the estimator's paper
        value_clip_eps=0.2,      # value clip around the rollout values
        gamma=1.0,               # discount (paper: 1)
        gae_lambda=0.95,         # GAE lambda
        kl_coef=0.02,            # beta: KL penalty coefficient against the SFT model
        kl_penalty="reward",     # 'reward': -beta*k1 per token in the reward (the paper's); 'loss': beta*KL loss term
        kl_estimator="k1",       # k1 for kl_penalty='reward' (the only correct one there); k3 or k2 for 'loss'
        kl_target=0.0,           # > 0: adaptive beta towards this KL per sequence (Ziegler et al. 2019)
        kl_horizon=10000,        # adaptive controller horizon, in episodes
        ptx_coef=0.0 if cpu else 27.8,   # gamma: pretraining log-likelihood weight (0 = plain PPO)
        ptx_batch_size=32 if cpu else 512,  # pretraining rows per minibatch (paper: 8x the episodes)
        ptx_microbatch=0,        # ptx rows per gradient micro-batch (0 = automatic: plan.ptx_microbatch)
        whiten_rewards=False,    # whiten per-token rewards over the batch before GAE
        penalize_no_eos=False,   # subtract no_eos_penalty from the score of responses without an EOS
        no_eos_penalty=1.0,      # how much lower a truncated response scores (RM units; demonstrations mean 0)
        ema_decay=0.992,         # EMA of policy weights (bias-corrected), exported as export_ema/
        value_coef=1.0,          # weight of the value loss (separate network and optimizer)
    ))
    if preset == config_lib.FINETUNE:
        # One pass over the prompts; policy lr 1e-6 (OpenRLHF's 7B-8B PPO: 5e-7; TRL: 3e-6), value lr 9e-6 (the
        # paper's, OpenRLHF's critic); the paper's beta 0.02, clip 0.2, 1 inner epoch, 10-iteration warmup from
        # 1/10 then constant; 64 rollouts of <= 256 tokens, minibatch 16. Plain PPO: PPO-ptx needs
        # --config.data.ptx=FILE --config.ppo.ptx_coef=G.
        config_lib.finetune_schedule(config, lr=1e-6, epochs=1, batch_size=64, warmup_frac=0.0, end_lr_frac=1.0)
        config.optim.warmup_steps = 10
        config.value_optim.lr = 9e-6
        config.ppo.update(max_new_tokens=256, minibatch_size=16, ppo_epochs=1, ptx_coef=0.0, ptx_batch_size=16)
    return config
