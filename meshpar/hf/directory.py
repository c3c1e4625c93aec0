"""A transformers model directory as `meshpar train --model DIR` reads it: its
config.json (the family and shapes), the model built from it on the meta device, and how
each parameter starts when no weights are loaded.

Everything a user can get wrong - no such directory, no config.json, a family meshpar
does not split - is found from config.json alone, before any process starts; transformers
is imported only to build the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from meshpar.hf.plan import FAMILIES
from meshpar.init import InitRule, meta_device
from meshpar.model.config import PRESETS, ModelConfig

CONFIG = "config.json"


def names_a_directory(name: str) -> bool:
    """Whether a --model value is a path (a transformers directory), not a preset name (a
    preset wins over a folder of its name: `./tiny` names the folder)."""
    return name not in PRESETS and (os.sep in name or name.startswith(".") or Path(name).is_dir())


class DirectoryError(ValueError):
    """A --model directory meshpar cannot train, with why."""


@dataclass(frozen=True)
class HFDirectory:
    """A transformers model directory: `raw` is its config.json."""

    path: Path
    raw: dict

    @classmethod
    def read(cls, path: str | os.PathLike) -> HFDirectory:
        """The directory's config; DirectoryError when it has none or it is unreadable."""
        path = Path(path)
        if not path.is_dir():
            raise DirectoryError(f"--model {path}: no such directory (a transformers model directory holding "
                                 f"{CONFIG}, or a preset name)")
        if not (path / CONFIG).is_file():
            raise DirectoryError(f"--model {path}: the directory has no {CONFIG}, so it is no transformers "
                                 f"model directory")
        try:
            raw = json.loads((path / CONFIG).read_text())
        except (OSError, ValueError) as err:
            raise DirectoryError(f"--model {path}: {CONFIG} is unreadable ({err})") from None
        return cls(path, raw)

    @property
    def family(self) -> str | None:
        return self.raw.get("model_type")

    def problems(self) -> list[str]:
        """What keeps meshpar from training this model, from config.json alone."""
        where = f"--model {self.path}"
        if self.family not in FAMILIES:
            return [f"{where}: unknown architecture {self.family!r} "
                    f"({', '.join(self.raw.get('architectures') or ['no architectures listed'])}); meshpar trains "
                    f"the transformers families {', '.join(FAMILIES)}"]
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in self.raw]
        if missing:
            return [f"{where}: {CONFIG} lacks {', '.join(missing)}"]
        found = []
        if self.raw.get("attention_dropout", 0.0):
            found.append(f"{where}: attention_dropout={self.raw['attention_dropout']} (meshpar's attention core "
                         f"has none); set it to 0")
        if self.raw.get("use_sliding_window") and self.family == "qwen2":
            found.append(f"{where}: use_sliding_window (meshpar's attention is causal over the whole sequence)")
        return found

    def sliding_window(self) -> int | None:
        """The attention window a sequence must fit in (Mistral's), if any."""
        window = self.raw.get("sliding_window")
        return window if self.family == "mistral" and window else None

    def shape(self) -> ModelConfig:
        """The model's shape as meshpar's checks and planner read it: heads, KV heads, the
        MLP's width, layers, vocabulary (its parameter count: `num_params`)."""
        raw = self.raw
        heads = raw["num_attention_heads"]
        return ModelConfig(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                           num_layers=raw["num_hidden_layers"], num_heads=heads,
                           num_kv_heads=raw.get("num_key_value_heads") or heads,
                           ffn_hidden_size=raw["intermediate_size"],
                           max_seq_len=raw.get("max_position_embeddings", 2048),
                           norm_eps=raw.get("rms_norm_eps", 1e-6),
                           tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                           init_std=raw.get("initializer_range", 0.02))

    def config(self):
        """transformers' config object, from the config.json already read (`raw`): the
        same object from_pretrained gives, and it needs no directory - a checkpoint of a
        run keeps `raw` alone (the directory may be gone)."""
        from transformers import AutoConfig

        fields = {k: v for k, v in self.raw.items() if k != "model_type"}
        return AutoConfig.for_model(self.raw["model_type"], **fields)

    def build(self) -> nn.Module:
        """The model on the meta device (shapes only): each rank fills its share after the
        split. Its parameters are fp32 whatever dtype the config names (a Hub model's says
        bfloat16): meshpar keeps fp32 weights and computes in 16 bits under --precision.
        The rotary embedding, a buffer computed from the config, is built for real."""
        import torch
        from transformers import AutoModelForCausalLM

        config = self.config()
        with meta_device():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        base = getattr(model, model.base_model_prefix)
        for name, module in list(base.named_children()):
            if type(module).__name__.endswith("RotaryEmbedding"):
                setattr(base, name, type(module)(config=config))
        return model

    def init_rule(self, name: str) -> InitRule:
        """How parameter `name` starts without weights, as transformers initializes these
        families: norms at one, biases at zero, the rest normal with initializer_range."""
        if name.endswith("norm.weight"):
            return InitRule("ones")
        if name.endswith(".bias"):
            return InitRule("zeros")
        return InitRule("normal", self.raw.get("initializer_range", 0.02))

    def has_weights(self) -> bool:
        return any(self.path.glob("*.safetensors"))


def num_params(model: nn.Module) -> int:
    """Parameters of a (meta-built) model, a tied weight once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
