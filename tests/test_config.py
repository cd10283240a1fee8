"""Configs: presets, overrides from the command line, clear errors."""
import os

import pytest
from absl import flags
from ml_collections import config_flags

from instructgpt_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The configs the package ships (DESIGN: configs/STAGE.py), plus whatever else is there: a missing one fails.
SHIPPED = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo", "pipeline")
STAGE_CONFIGS = sorted(set(SHIPPED) | set(config_lib.stage_names()))
# Presets of every stage config: CPU, GPT-3 sizes, a Hugging Face family, and 'finetune' (from a checkpoint).
PRESETS = ("tiny", "1.3b", "175b", "llama3-8b", config_lib.FINETUNE)
PIPELINE_ARGS = ("default", "methods", "smoke", "sweep")
STAGE_OF = {"grpo": "ppo"}  # configs that are another stage's options


def _parse(*args):
    fv = flags.FlagValues()
    argv = ["prog", *args]  # config_flags finds --config.* overrides in argv when the flag is defined
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_every_shipped_config_exists():
    assert set(SHIPPED) <= set(config_lib.stage_names()), sorted(set(SHIPPED) - set(config_lib.stage_names()))


@pytest.mark.parametrize("stage", STAGE_CONFIGS)
def test_every_stage_config_loads_for_every_preset(stage):
    """Through the command-line flag (a missing file is an error there too), and through each stage's own
    config check where it has one (PPO / GRPO / DPO: the defaults of every preset are valid together)."""
    from instructgpt_jax import dpo, ppo
    if stage == "pipeline":
        for arg in PIPELINE_ARGS:
            config = _parse(f"--config={ROOT}/configs/{stage}.py:{arg}")
            assert config.stage == "pipeline" and config.methods == (arg == "methods")
        return
    for preset in PRESETS:
        config = _parse(f"--config={ROOT}/configs/{stage}.py:{preset}")
        assert config.stage == STAGE_OF.get(stage, stage), (stage, preset)
        assert config.model.preset == (config_lib.FROM_CHECKPOINT if preset == config_lib.FINETUNE else preset)
        assert set(config.mesh) == {"data", "fsdp", "tensor"}
        if config.stage == "ppo":
            ppo.check_config(config_lib.replace(config, **{"ppo.rm_workdir": "rm"}))
        elif config.stage == "dpo":
            dpo.check_config(config)


def test_override_from_command_line():
    config = _parse(f"--config={ROOT}/configs/sft.py:tiny", "--config.train.num_steps=7", "--config.mesh.fsdp=2",
                    "--config.model.dtype=bfloat16")
    assert (config.train.num_steps, config.mesh.fsdp, config.model.dtype) == (7, 2, "bfloat16")


def test_unknown_override_key_is_an_error():
    with pytest.raises(Exception, match="nope"):
        _parse(f"--config={ROOT}/configs/sft.py:tiny", "--config.train.nope=1")


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets: .*tiny.*175b"):
        config_lib.model_config("176b")
    with pytest.raises(Exception, match="valid presets"):
        _parse(f"--config={ROOT}/configs/sft.py:huge")


def test_paper_defaults_for_full_size_sft():
    config = _parse(f"--config={ROOT}/configs/sft.py:1.3b")
    assert config.optim.lr == 9.65e-6 and config.optim.b2 == 0.95 and config.optim.end_lr_frac == 0.1
    assert config.model.dropout == 0.2 and config.train.batch_size == 32


def test_replace_rejects_unknown_keys():
    config = _parse(f"--config={ROOT}/configs/sft.py:tiny")
    assert config_lib.replace(config, **{"train.num_steps": 3}).train.num_steps == 3
    with pytest.raises(KeyError, match="valid keys here"):
        config_lib.replace(config, **{"train.num_stepz": 3})


def test_every_preset_builds_its_model():
    from instructgpt_jax.models import ModelConfig
    cfgs = {p: ModelConfig.from_config(config_lib.model_config(p)) for p in config_lib.PRESETS}  # validates every row
    assert set(config_lib.PRESET_KEYS) <= set(config_lib.PRESETS)
    for keys in config_lib.PRESET_KEYS.values():  # only real config.model keys, with their types
        assert set(keys) <= set(config_lib.model_config("tiny"))
    assert cfgs["qwen2.5-0.5b"].qkv_bias and cfgs["qwen2.5-0.5b"].tie_embeddings and not cfgs["qwen2.5-7b"].tie_embeddings
    assert cfgs["qwen3-8b"].qk_norm and cfgs["qwen3-8b"].head_dim * cfgs["qwen3-8b"].num_heads == 4096
    assert cfgs["gemma2-2b"].layer_windows[:3] == (4096, 0, 4096) and cfgs["gemma2-2b"].final_softcap == 30.0
    assert cfgs["gemma-2b"].activation == "gelu_tanh" and cfgs["gemma-2b"].embed_scale
    assert cfgs["mistral-7b"].layer_windows == (4096,) * 32
    assert (cfgs["pythia-1b"].arch, cfgs["pythia-1b"].rotary_dim, cfgs["pythia-1b"].parallel_residual) == ("neox", 64,
                                                                                                        True)
    assert (cfgs["tiny"].activation, cfgs["llama2-7b"].activation, cfgs["llama3-8b"].rope_theta) == (
        "gelu_tanh", "silu", 500000.0)


def test_family_key_override_from_command_line():
    config = _parse(f"--config={ROOT}/configs/sft.py:tiny", "--config.model.arch=llama",
                    "--config.model.sliding_window=16", "--config.model.sliding_pattern=SF")
    assert (config.model.sliding_window, config.model.sliding_pattern, config.model.activation) == (16, "SF", "")


def test_a_workdir_older_than_a_key_is_no_different_while_the_key_is_off():
    """config.json written before lora.* / init.adapter existed: resuming with them off is the same run; with LoRA
    on it is not. model.remat may change on resume (how, not what, the run computes)."""
    from instructgpt_jax import checkpoints
    current = config_lib.load("sft", "tiny").to_dict()
    old = {k: v for k, v in current.items() if k != "lora"}
    old["init"] = {k: v for k, v in current["init"].items() if k != "adapter"}
    assert checkpoints.config_diff(old, current) == []
    assert checkpoints.config_diff(old, {**current, "model": {**current["model"], "remat": "full"}}) == []
    on = {**current, "lora": {**current["lora"], "rank": 8}}
    assert [d.split(":")[0] for d in checkpoints.config_diff(old, on)] == [f"lora.{k}" for k in sorted(current["lora"])]
    adapter = {**current, "init": {**current["init"], "adapter": "/a"}}
    assert checkpoints.config_diff(old, adapter) == ["init.adapter: '<absent>' -> '/a'"]
    # a key present in both is compared as always
    assert checkpoints.config_diff(current, on) == ["lora.rank: 0 -> 8"]
