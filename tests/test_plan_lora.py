"""Memory plan with LoRA / QLoRA (config.lora): adapter and base sizes by hand, the PPO-ptx state, rank 0."""
import os
import subprocess
import sys

import pytest

from instructgpt_jax import config_lib, plan
from instructgpt_jax.models import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny: gpt arch, 2 layers, d_model 64, 4 heads (= kv heads) of 16, MLP 256 (wi, wo), vocab 512, 128 positions
TINY = ModelConfig.from_config(config_lib.model_config("tiny"))
# the same, llama arch (gated MLP: wi_gate, wi_up, wo; no biases) with 2 kv heads (k, v: 64 -> 32)
TINY_LLAMA = ModelConfig.from_config({**config_lib.model_config("tiny"), "arch": "llama", "num_kv_heads": 2})
ONE = plan.abstract_mesh((1, 1, 1))
TINY_PARAMS = 141_056  # tests/test_scale.py: test_plan_param_bytes_by_hand
KERNELS = 2 * (4 * 64 * 64 + 2 * 64 * 256)  # the blocks' projection kernels: q, k, v, o, wi, wo
REST = TINY_PARAMS - KERNELS  # embeddings, positions, LayerNorms, biases: float32 whatever base_dtype


def test_adapter_counts_by_hand():
    # rank 4: A [in, 4] + B [4, out] per targeted projection and layer
    qv = plan.lora_shards(TINY, "lm", ONE, 4, "q,v")
    assert qv.total_adapters == qv.adapters == 2 * 2 * 4 * (64 + 64)
    every = plan.lora_shards(TINY, "lm", ONE, 4, "all-linear")  # gpt: q, k, v, o, up (wi), down (wo)
    assert every.total_adapters == 2 * (4 * 4 * (64 + 64) + 2 * 4 * (64 + 256))
    assert plan.lora_shards(TINY, "lm", ONE, 4, "q,k,v,o,up,down") == every
    llama = plan.lora_shards(TINY_LLAMA, "lm", ONE, 4, "all-linear")  # q, o 64 -> 64; k, v 64 -> 32; 3 MLP
    assert llama.total_adapters == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 256))
    assert plan.lora_shards(TINY_LLAMA, "lm", ONE, 8, "k").adapters == 2 * 8 * (64 + 32)
    assert every.head == 0 and plan.lora_shards(TINY, "scalar", ONE, 4).head == 64 + 1  # scalar head kernel + bias


def test_adapters_shard_like_the_kernel_they_adapt():
    # q, v: A [layers, embed, r] splits embed over fsdp; B [layers, r, heads, head_dim] heads over tensor
    for mesh, per_projection in (((1, 2, 1), 32 * 4 + 4 * 64), ((1, 1, 2), 64 * 4 + 4 * 32),
                                 ((1, 2, 2), 32 * 4 + 4 * 32)):
        s = plan.lora_shards(TINY, "lm", plan.abstract_mesh(mesh), 4, "q,v")
        assert s.adapters == 2 * 2 * per_projection, mesh
        assert s.total_adapters == 2 * 2 * 4 * (64 + 64)


def test_lora_targets():
    assert plan.lora_modules("llama", "all-linear") == ("query", "key", "value", "out", "wi_gate", "wi_up", "wo")
    assert plan.lora_modules("gpt", "all-linear") == ("query", "key", "value", "out", "wi", "wo")
    assert plan.lora_modules("neox", " q, v ") == ("query", "value")
    for arch, bad in (("gpt", "gate"), ("llama", "q,x"), ("llama", "")):
        with pytest.raises(ValueError, match="config.lora.targets"):
            plan.lora_modules(arch, bad)


def test_base_bytes_by_hand():
    """Block projection kernels in base_dtype (+ int8 scales per output channel, nf4 absmax per 64 weights);
    everything else float32."""
    def base(dtype):
        return plan.lora_shards(TINY, "lm", ONE, 4, "q", dtype).base_bytes

    assert base("float32") == 4 * TINY_PARAMS
    assert base("bfloat16") == 2 * KERNELS + 4 * REST
    # output channels per layer: q, k, v, o 64 each, wi 256, wo 64
    assert base("int8") == KERNELS + 4 * 2 * (4 * 64 + 256 + 64) + 4 * REST
    assert base("nf4") == KERNELS // 2 + 4 * (KERNELS // 64) + 4 * REST
    with pytest.raises(ValueError, match="base_dtype"):
        base("fp8")
    odd = ModelConfig.from_config({**config_lib.model_config("tiny"), "num_heads": 3, "num_kv_heads": 3})  # o: 48 in
    with pytest.raises(ValueError, match="nf4 needs"):
        plan.lora_shards(odd, "lm", ONE, 4, "q", "nf4")
    assert plan.lora_shards(odd, "lm", ONE, 4, "q", "int8").base_bytes > 0


@pytest.mark.slow  # builds both models' bases and adapters: default-suite budget (CI runs `pytest -m slow`)
@pytest.mark.parametrize("model,head", [(TINY, "lm"), (TINY_LLAMA, "scalar")], ids=["gpt", "llama"])
def test_sizes_match_what_lora_py_builds(model, head):
    """The plan counts what the stages hold: lora.init_adapters' adapters and lora.store_base's frozen base
    (bytes of every leaf) on one device. (Checked by hand on 8 simulated devices too: meshes (1,2,1), (1,1,2),
    (1,2,2), (1,8,1), (2,2,2) give the per-device shards lora_shards computes.)"""
    import jax
    import ml_collections

    from instructgpt_jax import lora, sharding
    from instructgpt_jax.models import Transformer
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
    for targets in ("q,v", "all-linear"):
        lora_cfg = ml_collections.ConfigDict(dict(rank=4, alpha=16.0, dropout=0.0, targets=targets, rslora=False))
        adapted = Transformer(ModelConfig.from_config(model.__dict__, lora_cfg))
        built = sum(x.size for x in jax.tree.leaves(lora.init_adapters(adapted, jax.random.PRNGKey(0), mesh)))
        assert built == plan.lora_shards(model, "lm", ONE, 4, targets).adapters, targets
    params = sharding.init_model(Transformer(model, head=head), jax.random.PRNGKey(0), mesh)
    for dtype in plan.BASE_DTYPES:
        built = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lora.store_base(params, dtype)))
        assert built == plan.lora_shards(model, head, ONE, 4, "q", dtype).base_bytes, dtype


def _config(stage, **lora):
    return config_lib.replace(plan.stage_config(stage, "tiny"), **{f"lora.{k}": v for k, v in lora.items()})


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_rank_zero_is_todays_plan(stage):
    """rank 0 (the default) plans exactly what a config without a `lora` block plans, whatever its targets
    (a base_dtype other than float32 needs rank > 0: lora.check_config)."""
    without = plan.stage_config(stage, "tiny")
    del without["lora"]
    today = plan.plan(without, (1, 1, 1))
    for config in (_config(stage), _config(stage, rank=0, targets="q", alpha=8.0)):
        p = plan.plan(config, (1, 1, 1))
        assert (p.resident, p.phases, p.notes) == (today.resident, today.phases, today.notes)


def test_lora_trainable_holds_adapters_and_head_state_only():
    s = plan.lora_shards(TINY, "scalar", ONE, 4, "all-linear", "nf4")
    rm = plan.plan(_config("rm", rank=4, base_dtype="nf4"), (1, 1, 1))
    assert rm.resident == {"reward model base params": s.base_bytes, "reward model adapter params": 4 * s.adapters,
                           "reward model gradients": 4 * (s.adapters + 65),
                           "reward model Adam mu+nu": 8 * (s.adapters + 65)}
    full = plan.plan(_config("rm"), (1, 1, 1))
    assert rm.phases == full.phases  # activations as without LoRA
    dpo = plan.plan(_config("dpo", rank=4), (1, 1, 1))
    assert "reference params" not in dpo.resident  # the reference is the base with the adapters off
    lm = plan.lora_shards(TINY, "lm", ONE, 4)
    assert dpo.resident["policy gradients"] == 4 * lm.adapters and dpo.resident["policy base params"] == 4 * TINY_PARAMS


def test_lora_ppo_ptx_holds_two_bases():
    """Policy base (= reference) + adapters, Adam and EMA of the adapters; RM base (= value trunk) + value
    adapters, head and their Adam: two models instead of four, well below full fine-tuning."""
    lm, sc = (plan.lora_shards(TINY, h, ONE, 4, "all-linear", "bfloat16") for h in ("lm", "scalar"))
    p = plan.plan(_config("ppo", rank=4, base_dtype="bfloat16"), (1, 1, 1))
    assert p.resident == {
        "policy base params": lm.base_bytes, "policy adapter params": 4 * lm.adapters,
        "policy gradients": 4 * lm.adapters, "policy Adam mu+nu": 8 * lm.adapters,
        "policy EMA adapter params": 4 * lm.adapters, "reward model base params": sc.base_bytes,
        "value adapter params": 4 * sc.adapters, "value head params": 4 * 65,
        "value gradients": 4 * (sc.adapters + 65), "value Adam mu+nu": 8 * (sc.adapters + 65)}
    full = plan.plan(_config("ppo"), (1, 1, 1))
    assert p.phases == full.phases  # KV cache and activations as without LoRA
    assert sum(p.resident.values()) < 0.2 * sum(full.resident.values())
    grpo = plan.plan(_config("grpo", rank=4), (1, 1, 1))
    assert "reward model base params" in grpo.resident and not any(k.startswith("value") for k in grpo.resident)
    verifier = plan.plan(config_lib.replace(_config("grpo", rank=4), **{"ppo.reward": "verifier"}), (1, 1, 1))
    assert not any(k.startswith(("value", "reward")) for k in verifier.resident)


def test_llama3_8b_ppo_ptx_table():
    """The README's LoRA rows: Llama-3-8B PPO-ptx fits one 80 GB GPU / a TPU v5e-8 only with adapters."""
    full, qlora = (plan.lora_plan("llama3-8b", o, (1, 1, 1)) for o in ({}, {"lora.rank": 16, "lora.base_dtype": "nf4"}))
    assert sum(qlora.resident.values()) < 0.06 * sum(full.resident.values())
    # two nf4 bases: 2 x 7.0B block weights x 0.5625 bytes + float32 embeddings (2) and LM head (1) of 0.53B
    assert abs(qlora.resident["policy base params"] + qlora.resident["reward model base params"]
               - (2 * 6.98e9 * 0.5625 + 3 * 128256 * 4096 * 4)) < 0.05e9
    rows = plan.lora_table().splitlines()
    assert len(rows) == 2 + len(plan.LORA_METHODS)
    assert rows[2].count("does not fit") == 2 and rows[-1].count("| fits") == 2


def test_command_line_lora_overrides():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "instructgpt_jax.plan", *args], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    ok = run("--config=configs/sft.py:tiny", "--stage=dpo", "--mesh=1,1,1", "--config.lora.rank=4",
             "--config.lora.base_dtype=nf4", "--config.lora.targets=q,v")
    assert ok.returncode == 0, ok.stderr
    assert "policy base params" in ok.stdout and "reference params" not in ok.stdout
    assert "LoRA rank 4 on q,v (query, value)" in ok.stdout and "in nf4" in ok.stdout
