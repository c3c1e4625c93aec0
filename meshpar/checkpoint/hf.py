"""Hugging Face Llama directories (config.json + safetensors): export and import.

meshpar's model is Llama's architecture with two differences of convention, both
undone here: parameter names, and the rotary embedding's pairing - meshpar rotates
interleaved pairs (0,1), (2,3), ... of each head, transformers' Llama the two halves
(0, d/2), (1, d/2+1), ... - so each head's rows of wq and wk are permuted on the way.
Nothing here imports transformers: the files are the interface.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from meshpar.checkpoint.regions import Box, CheckpointError, fill_box
from meshpar.model.config import ModelConfig

WEIGHTS = "model.safetensors"
_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
          "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
          "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj",
          "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """meshpar parameter name -> transformers' LlamaForCausalLM name."""
    names = {"embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        for ours, theirs in _LAYER.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def _heads_of(name: str, cfg: ModelConfig) -> int | None:
    """Heads whose rows need the rotary permutation (wq, wk), else None."""
    if name.endswith("attention.wq.weight"):
        return cfg.num_heads
    if name.endswith("attention.wk.weight"):
        return cfg.num_kv_heads
    return None


def to_hf_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from interleaved pairs (meshpar) to halves (transformers)."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, d // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def from_hf_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    d = weight.shape[0] // heads
    return weight.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(weight.shape)


def hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
            "torch_dtype": "float32"}


def model_config_from_hf(raw: dict, where: str) -> ModelConfig:
    """meshpar's ModelConfig for a transformers Llama config; CheckpointError naming what
    meshpar's model does not have."""
    problems = []
    if raw.get("model_type") != "llama":
        problems.append(f"model_type {raw.get('model_type')!r} (meshpar's own model reads llama)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} (meshpar has plain RoPE)")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if raw.get(key, ok) != ok:
            problems.append(f"{key}={raw[key]!r} (meshpar has {ok!r})")
    heads = raw["num_attention_heads"]
    if raw.get("head_dim", raw["hidden_size"] // heads) * heads != raw["hidden_size"]:
        problems.append("head_dim x num_attention_heads != hidden_size")
    if problems:
        raise CheckpointError(f"{where}: not a model meshpar's own can take: " + "; ".join(problems)
                              + f"; train the transformers model as it is with --model {Path(where).parent}")
    return ModelConfig(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                       num_layers=raw["num_hidden_layers"], num_heads=heads,
                       num_kv_heads=raw.get("num_key_value_heads", heads),
                       ffn_hidden_size=raw["intermediate_size"],
                       max_seq_len=raw.get("max_position_embeddings", 2048),
                       rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
                       norm_eps=raw.get("rms_norm_eps", 1e-5),
                       tie_embeddings=raw.get("tie_word_embeddings", False),
                       init_std=raw.get("initializer_range", 0.02))


def is_hf_directory(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def export_hf(reader, cfg: ModelConfig, destination: str | os.PathLike) -> Path:
    """Write `reader`'s parameters (full tensors) as a transformers Llama directory."""
    out = Path(destination)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for ours, theirs in hf_names(cfg).items():
        weight = reader.read_full(ours).float()
        heads = _heads_of(ours, cfg)
        tensors[theirs] = (to_hf_rotary(weight, heads) if heads else weight).contiguous()
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
    return out


class HFReader:
    """Reads a transformers directory like a checkpoint's parameters (no training
    state), cut to any box: a Llama's under meshpar's names, for meshpar's model; or,
    `native`, any family's under its own names, for the same transformers model trained
    through meshpar (`meshpar train --model DIR --init-from DIR`)."""

    def __init__(self, path: str | os.PathLike, native: bool = False):
        self.path, self.native = Path(path), native
        try:
            raw = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.path / 'config.json'}: unreadable ({err})") from None
        if native:
            from meshpar.hf.directory import HFDirectory

            directory = HFDirectory(self.path, raw)
            if directory.problems():
                raise CheckpointError("; ".join(directory.problems()))
            self.cfg = directory.shape()
        else:
            self.cfg = model_config_from_hf(raw, str(self.path / "config.json"))
        self.meta = {"step": 0, "model": {"name": raw.get("_name_or_path") or self.path.name,
                                          **{f: getattr(self.cfg, f) for f in ModelConfig.__dataclass_fields__}},
                     "layout": None, "train": None}
        self.bytes_read = 0  # tensor bytes read by this process (boxes, not whole tensors)
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise CheckpointError(f"{self.path}: no *.safetensors weights (pytorch_model.bin is not read)")
        self.where: dict[str, Path] = {}
        for file in self.files:
            try:
                with safe_open(file, framework="pt") as handle:
                    self.where.update({key: file for key in handle.keys()})
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
        self.hf_name = {name: name for name in self.where} if native else hf_names(self.cfg)
        missing = [theirs for theirs in self.hf_name.values() if theirs not in self.where]
        if missing:
            raise CheckpointError(f"{self.path}: lacks {len(missing)} weight(s) of a Llama model, "
                                  f"e.g. {', '.join(missing[:3])}")

    @property
    def step(self) -> int:
        return 0

    def names(self, kind: str = "param") -> list[str]:
        return sorted(self.hf_name) if kind == "param" else []

    def has(self, name: str, kind: str) -> bool:
        return kind == "param" and name in self.hf_name

    def full_shape(self, name: str, kind: str = "param") -> tuple[int, ...]:
        with safe_open(self.where[self.hf_name[name]], framework="pt") as handle:
            return tuple(handle.get_slice(self.hf_name[name]).get_shape())

    def _require(self, name: str, kind: str) -> None:
        if not self.has(name, kind):
            raise CheckpointError(f"{self.path}: holds no {kind} of {name} (a Hugging Face directory has "
                                  f"parameters only)")

    def read_full(self, name: str, kind: str = "param") -> torch.Tensor:
        self._require(name, kind)
        return self.read(name, kind, Box.whole(self.full_shape(name)))

    def read(self, name: str, kind: str, target: Box) -> torch.Tensor:
        """`target`'s elements only, through safetensors' slices: a rank reads its own box
        (rounded out to whole heads for wq and wk, whose rows the rotary convention
        permutes within each head), never the whole tensor."""
        self._require(name, kind)
        if target.volume() == 0:  # padding only (a vocabulary cut's tail)
            return torch.zeros(target.local_shape)
        theirs, file = self.hf_name[name], self.where[self.hf_name[name]]
        lo = list(target.offsets)
        hi = [o + v for o, v in zip(target.offsets, target.valid)]
        heads = None if self.native else _heads_of(name, self.cfg)
        if heads:
            d = target.full_shape[0] // heads
            lo[0], hi[0] = lo[0] // d * d, -(-hi[0] // d) * d
        try:
            with safe_open(file, framework="pt") as handle:
                part = handle.get_slice(theirs)[tuple(slice(a, b) for a, b in zip(lo, hi))]
            self.bytes_read += part.numel() * part.element_size()
            part = part.float()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: {theirs} unreadable ({err})") from None
        if heads:
            part = from_hf_rotary(part, part.shape[0] // d)
        shape = tuple(b - a for a, b in zip(lo, hi))
        if tuple(lo) == target.offsets and shape == target.local_shape:  # read exactly the box: no copy
            return part
        return fill_box(target, [(Box(target.full_shape, tuple(lo), shape, shape), part)], f"{kind} of {name}")
