"""Pretraining a base LM from scratch on raw text {text}: `--config=configs/pretrain.py:<preset>`.

The same loss as SFT with no prompt mask (every token counts). CPU presets train a small base
model (e.g. on the built-in synthetic corpus: `--config.data.train=builtin`); full-size presets use
GPT-3's schedule shape.
"""
from instructgpt_jax import config_lib


def get_config(preset: str = "tiny"):
    preset = config_lib.check_preset(preset)
    cpu = config_lib.is_cpu_preset(preset)
    config = config_lib.base_config("pretrain", preset)
    config.train = config_lib.train_config(num_steps=300 if cpu else 100_000, batch_size=16 if cpu else 512,
                                           cpu=cpu)
    config.optim = config_lib.optim_config(3e-3 if cpu else 6e-4, warmup_steps=20 if cpu else 375,
                                           weight_decay=0.1)
    ctx = config.model.max_len
    config.data = config_lib.data_config(seq_len=ctx, max_prompt_len=0, max_response_len=ctx)
    if preset == config_lib.FINETUNE:  # continued pretraining of a checkpoint: one pass at an SFT-like lr
        config_lib.finetune_schedule(config, lr=2e-5, epochs=1, batch_size=64, warmup_frac=0.03)
        config.data.max_response_len = 0
    return config
