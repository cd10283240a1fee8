"""Model code: the decoder-only transformer and its heads."""
from instructgpt_jax.models.transformer import (ARCHS, CACHE_LOGICAL_AXES, ModelConfig, Transformer, init_cache,
                                                lm_head_logits, param_count, rope, rope_inv_freq)

__all__ = ["ARCHS", "CACHE_LOGICAL_AXES", "ModelConfig", "Transformer", "init_cache", "lm_head_logits", "param_count", "rope",
           "rope_inv_freq"]
