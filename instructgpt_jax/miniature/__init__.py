"""The built-in world: a synthetic instruction-following task family, its programmatic labelers,
the whole pipeline on it (`configs/pipeline.py`) and its evaluation. Library modules never import it."""
