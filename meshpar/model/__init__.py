"""A plain, single-device Llama-style decoder. Nothing here imports torch.distributed."""

from meshpar.model.config import LARGE_PRESETS, PRESETS, ModelConfig, model_config
from meshpar.model.llama import Transformer, TransformerBlock, build_model
from meshpar.model.loss import cross_entropy_sum

__all__ = ["LARGE_PRESETS", "PRESETS", "ModelConfig", "Transformer", "TransformerBlock",
           "build_model", "cross_entropy_sum", "model_config"]
