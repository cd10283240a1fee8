"""DPO family on ranked comparisons {prompt, completions, ranks}: `--config=configs/dpo.py:<preset>`.

Start from the SFT stage (policy and frozen reference): `--config.init.from_workdir=SFT_DIR`. Reads every
comparison format the reward model reads, K-wise: sigmoid DPO (Rafailov et al. 2023) over all untied pairs,
IPO (Azar et al. 2023), or listwise Plackett–Luce over the whole ranking (`--config.dpo.loss_type`).
"""
import ml_collections

from instructgpt_jax import config_lib


def get_config(preset: str = "tiny"):
    config = config_lib.load("rm", preset)  # the RM's data, schedule and optimizer
    config.stage = "dpo"
    del config["rm"]
    del config.data["demonstrations"]
    cpu = config_lib.is_cpu_preset(preset)
    config.model.dropout = 0.0  # the policy's log-ratio must equal the reference's at step 0
    config.optim = config_lib.optim_config(1e-4 if cpu else 5e-7, warmup_steps=10 if cpu else 150)
    config.optim.end_lr_frac = 0.0 if not cpu else 0.1  # Rafailov et al.: warmup then linear decay; cosine here
    config.dpo = ml_collections.ConfigDict(dict(
        beta=0.1,              # strength of the implicit KL constraint (Rafailov et al.: 0.1)
        loss_type="sigmoid",   # 'sigmoid' (DPO), 'ipo' or 'plackett_luce' (listwise; ties: Breslow)
        ipo_token_mean=False,  # ipo: False = the IPO paper's summed log-ratios; True = per-token means (TRL's)
        pl_normalize=True,     # plackett_luce: True = mean over a prompt's K-1 stages; False = their sum (the paper)
    ))
    if preset == config_lib.FINETUNE:
        # DPO on 7B chat models (Zephyr, Tunstall et al. 2023; Tulu 2 DPO): lr 5e-7, 10 % warmup, beta 0.1,
        # 1 epoch (the alignment-handbook recipe), 64 prompts per batch.
        config_lib.finetune_schedule(config, lr=5e-7, epochs=1, batch_size=64, warmup_frac=0.1)
    return config
