"""The stage configs (`get_config(preset)` each), installed as `instructgpt_jax.configs`."""
