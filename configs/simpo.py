"""SimPO on ranked comparisons {prompt, completions, ranks}: `--config=configs/simpo.py:<preset>`.

SimPO (Meng, Xia, Chen 2024): reference-free preference optimisation; the reward is β times the average
log-prob of a completion's tokens, the loss −log σ(r_w − r_l − γ) over all untied pairs (K-wise, as DPO).
The DPO config's data, schedule and optimizer; start from the SFT stage: `--config.init.from_workdir=SFT_DIR`.
"""
import ml_collections

from instructgpt_jax import config_lib


def get_config(preset: str = "tiny"):
    config = config_lib.load("dpo", preset)  # DPO's data, schedule, optimizer and dropout 0
    config.stage = "simpo"
    del config["dpo"]
    config.simpo = ml_collections.ConfigDict(dict(
        beta=2.0,    # reward scale β (SimPO's Llama-3-Base setting; its authors also use 2.5 and 10)
        gamma=1.0,   # target margin γ: γ/β = 0.5, the Llama-3-Base setting and the authors' suggested start
    ))
    if preset == config_lib.FINETUNE:
        # SimPO's published Llama-3-8B-Base recipe (β 2.0, γ/β 0.5): lr 6e-7, 10 % warmup then cosine to 0,
        # 1 epoch, 128 pairs per batch (its other 7-8B runs: lr 3e-7 to 1e-6).
        config_lib.finetune_schedule(config, lr=6e-7, epochs=1, batch_size=128, warmup_frac=0.1)
    return config
