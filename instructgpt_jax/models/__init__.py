"""Model code: the decoder-only transformer and its heads."""
from instructgpt_jax.models.transformer import (CACHE_LOGICAL_AXES, ModelConfig, Transformer, init_cache,
                                                param_count, rope)

__all__ = ["CACHE_LOGICAL_AXES", "ModelConfig", "Transformer", "init_cache", "param_count", "rope"]
