"""Critic-free RL (GRPO, Shao et al. 2024): `--config=configs/grpo.py:<preset>`.

The RL stage (`instructgpt_jax.ppo`) with group-relative advantages instead of a value model: `group_size`
samples per prompt, advantage (r − mean_group) / (std_group + 1e-4) for every token of a response, and the KL to
the SFT model as a k3 loss term. `--config.ppo.advantage_estimator=dr_grpo` (Liu et al. 2025: no std division)
or `rloo` (Ahmadian et al. 2024: leave-one-out baseline). Start like PPO:
`--config.init.from_workdir=SFT --config.ppo.rm_workdir=RM`, or with a programmatic reward
`--config.ppo.reward=verifier --config.ppo.verifier=module:function`.
"""
from instructgpt_jax import config_lib


def get_config(preset: str = "tiny"):
    config = config_lib.load("ppo", preset)
    cpu = config_lib.is_cpu_preset(preset)
    config.ppo.advantage_estimator = "grpo"  # no value model: its params, optimizer and forward passes are saved
    config.ppo.group_size = 4 if cpu else 8  # samples per prompt (DeepSeekMath: 64; 8-16 is common)
    config.ppo.kl_penalty = "loss"           # beta * k3 as a loss term (its gradient is the KL's)
    config.ppo.kl_estimator = "k3"
    config.ppo.kl_coef = 0.04                # DeepSeekMath's beta
    config.ppo.ptx_coef = 0.0
    if preset == config_lib.FINETUNE:
        # DeepSeekMath's GRPO (Shao et al. 2024): lr 1e-6, beta 0.04, 1 update per rollout batch; 8 samples per
        # prompt (TRL's default), 64 rollouts per iteration.
        config.ppo.update(group_size=8, minibatch_size=16)
    return config
