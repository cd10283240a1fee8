"""Supervised fine-tuning on demonstrations {prompt, response}: `--config=configs/sft.py:<preset>`.

Paper (Ouyang et al. 2022, appendix C.1): 16 epochs, residual dropout 0.2, cosine decay to 10 %
of a peak lr of 9.65e-6, batch 32. CPU presets (tiny, mini, small) get a short, fast schedule.
"""
from instructgpt_jax import config_lib


def get_config(preset: str = "tiny"):
    preset = config_lib.check_preset(preset)
    cpu = config_lib.is_cpu_preset(preset)
    config = config_lib.base_config("sft", preset)
    config.model.dropout = 0.0 if cpu else 0.2
    # Paper: ~13k demonstrations x 16 epochs / batch 32 = 6,500 steps.
    config.train = config_lib.train_config(num_steps=150 if cpu else 6500, batch_size=16 if cpu else 32, cpu=cpu)
    config.optim = config_lib.optim_config(3e-3 if cpu else 9.65e-6, warmup_steps=10 if cpu else 0)
    ctx = config.model.max_len
    config.data = config_lib.data_config(seq_len=ctx, max_prompt_len=ctx // 2, max_response_len=ctx // 2)
    if preset == config_lib.FINETUNE:
        # Published 0.5B-8B chat SFT recipes: lr 2e-5 with 3 % warmup and cosine decay (Alpaca; Tulu 2,
        # Ivison et al. 2023), 2 epochs (Tulu 2), ~128 examples per batch (both; ~2 examples per packed row).
        config_lib.finetune_schedule(config, lr=2e-5, epochs=2, batch_size=64, warmup_frac=0.03)
        config.data.max_response_len = 0  # 0: no separate response limit (the row length bounds it)
    return config
