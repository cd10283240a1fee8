"""instructgpt_jax: InstructGPT (Ouyang et al. 2022) end to end in JAX/Flax.

`from instructgpt_jax import losses, rl` gives the pure objectives; stages live in sft.py, rm.py, ppo.py.
"""
__version__ = "0.1.0"
