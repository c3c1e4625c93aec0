"""transformers' causal LMs through meshpar: their plan (`hf_plan`), their attention
routed through meshpar's core, and their directories (config, weights) read and written."""

from meshpar.hf.plan import UnsupportedModel, hf_plan

__all__ = ["UnsupportedModel", "hf_plan"]
