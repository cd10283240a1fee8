"""Reward model on ranked comparisons {prompt, completions, ranks}: `--config=configs/rm.py:<preset>`.

Paper (Ouyang et al. 2022, appendix C.2): the 6B RM is trained for 1 epoch at lr 9e-6 (cosine to
10 %) on batches of 64 prompts, each with all its K (4..9) ranked completions. Start from the SFT
stage with `--config.init.from_workdir=SFT_WORKDIR`.
"""
import ml_collections

from instructgpt_jax import config_lib


def get_config(preset: str = "tiny"):
    preset = config_lib.check_preset(preset)
    cpu = config_lib.is_cpu_preset(preset)
    config = config_lib.base_config("rm", preset)
    # Paper: ~33k comparison prompts, 1 epoch / 64 prompts per batch = ~520 steps.
    config.train = config_lib.train_config(num_steps=120 if cpu else 520, batch_size=16 if cpu else 64, cpu=cpu)
    config.optim = config_lib.optim_config(1e-3 if cpu else 9e-6, warmup_steps=10 if cpu else 0)
    ctx = config.model.max_len
    config.data = config_lib.data_config(seq_len=ctx, max_prompt_len=ctx // 2, max_response_len=ctx // 2)
    del config.data["max_response_len"], config.data["pack"]  # completions are never packed
    if preset == config_lib.FINETUNE:
        # The paper's RM recipe (appendix C.2; also OpenRLHF's for 7B-8B RMs): lr 9e-6, cosine to 10 %,
        # 1 epoch (more overfits), 64 prompts with all their completions per batch; 3 % warmup.
        config_lib.finetune_schedule(config, lr=9e-6, epochs=1, batch_size=64, warmup_frac=0.03, end_lr_frac=0.1)
    config.data.max_k = 9                  # most completions per prompt (paper: K = 4..9)
    config.data.demonstrations = ""        # {prompt, response} / {messages} file for the bias ('' = the SFT stage's data)
    config.data.builtin_size = 2000        # built-in comparison prompts when data.train is 'builtin'
    config.rm = ml_collections.ConfigDict(dict(
        bias_examples=2000,  # demonstrations scored to fix the bias (mean reward 0 on them)
    ))
    return config
