"""The planner's view of a model: its shapes, parameter count and FLOPs.

`gpt` is GPT-3-style: LayerNorm (gain and bias), a GeLU MLP of `ffn_hidden` (4h),
learned positions, biases on every linear, dropout, attention scores materialized unless
`flash_attention`. `llama` is meshpar's own model: RMSNorm, SwiGLU of `ffn_hidden`,
RoPE, grouped-query attention, flash attention, no biases, no dropout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from meshpar.model.config import PRESETS as MESHPAR_PRESETS, ModelConfig

ARCHS = ("gpt", "llama")


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    tie_embeddings: bool = False
    flash_attention: bool = True
    experts: int = 0  # a mixture of experts in every block (0: a dense MLP); each expert is ffn_hidden wide
    experts_per_token: int = 2
    shared_experts: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self, active: bool = False) -> int:
        """A block's parameters; `active`: those one token's forward uses (its k experts)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        if self.arch == "gpt":  # qkv + proj with biases, two MLP linears with biases, two LayerNorms
            return (4 * h * h + 4 * h) + (2 * h * self.ffn_hidden + self.ffn_hidden + h) + 4 * h
        mlp = 3 * h * self.ffn_hidden
        if self.experts:  # the routed experts (all, or the token's k), the shared ones, the router
            mlp = mlp * ((self.experts_per_token if active else self.experts) + self.shared_experts) + h * self.experts
        return (2 * h * h + 2 * h * kv) + mlp + 2 * h

    def expert_params(self) -> int:
        """A block's routed experts' parameters (0 for a dense model): what expert
        parallelism splits and tensor parallelism leaves whole."""
        return self.experts * 3 * self.hidden * self.ffn_hidden

    def embedding_params(self) -> int:
        """Input side: token embeddings (and learned positions for gpt)."""
        return self.vocab * self.hidden + (self.seq_len * self.hidden if self.arch == "gpt" else 0)

    def head_params(self) -> int:
        """Output side: the final norm and, unless tied, the output projection."""
        norm = 2 * self.hidden if self.arch == "gpt" else self.hidden
        return norm + (0 if self.tie_embeddings else self.vocab * self.hidden)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params()

    def active_params(self) -> int:
        """The parameters one token's forward uses (a mixture of experts: its k experts)."""
        return self.layers * self.layer_params(active=True) + self.embedding_params() + self.head_params()

    def flops_per_token(self) -> float:
        """Model FLOPs of a training step per token (forward and backward, no
        recomputation): 6 per weight of every matmul - the layers and the output
        projection; embedding lookups are no matmul; of a mixture of experts, the token's
        k experts - plus 12 L h s for attention scores and their weighted sum (PaLM,
        Chowdhery et al. 2022, Appendix B)."""
        matmul_weights = self.layers * self.layer_params(active=True) + self.vocab * self.hidden
        return 6 * matmul_weights + 12 * self.layers * self.hidden * self.seq_len

    def as_meshpar(self) -> ModelConfig:
        """The same shapes as meshpar's model config (llama only)."""
        return ModelConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_layers=self.layers,
                           num_heads=self.heads, num_kv_heads=self.kv_heads, ffn_hidden_size=self.ffn_hidden,
                           max_seq_len=self.seq_len, tie_embeddings=self.tie_embeddings)

    def problems(self) -> list[str]:
        found = [f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1"
                 for name in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len")
                 if getattr(self, name) < 1]
        if self.arch not in ARCHS:
            found.append(f"--arch {self.arch}: choose one of {', '.join(ARCHS)}")
        if not found and self.hidden % self.heads:
            found.append(f"--heads {self.heads} does not divide --hidden {self.hidden}")
        if not found and self.heads % self.kv_heads:
            found.append(f"--kv-heads {self.kv_heads} must divide --heads {self.heads}")
        if self.experts and not 1 <= self.experts_per_token <= self.experts:
            found.append(f"experts_per_token={self.experts_per_token} must be between 1 and experts={self.experts}")
        return found


def from_meshpar(cfg: ModelConfig, seq_len: int | None = None) -> ModelSpec:
    return ModelSpec("llama", cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.ffn_hidden_size, cfg.vocab_size, seq_len or cfg.max_seq_len, cfg.tie_embeddings,
                     experts=cfg.num_experts, experts_per_token=cfg.experts_per_token,
                     shared_experts=cfg.shared_experts)


def _gpt(layers: int, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec("gpt", layers, hidden, heads, heads, 4 * hidden, 50257, 2048, flash_attention=False)


PRESETS: dict[str, ModelSpec] = {
    **{name: from_meshpar(cfg) for name, cfg in MESHPAR_PRESETS.items()},
    # GPT-3 (Brown et al. 2020, Table 2.1)
    "gpt3-1.3b": _gpt(24, 2048, 16),
    "gpt3-13b": _gpt(40, 5120, 40),  # the paper lists 5140, which 40 heads of 128 do not make
    "gpt3-175b": _gpt(96, 12288, 96),
}


def from_hf_config(path: str | Path) -> ModelSpec:
    """A Hugging Face config.json (Llama-style or GPT-2-style)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the model config {path}: {err}") from None
    try:
        if "n_embd" in raw:  # GPT-2 naming
            h = raw["n_embd"]
            return ModelSpec("gpt", raw["n_layer"], h, raw["n_head"], raw["n_head"], raw.get("n_inner") or 4 * h,
                             raw["vocab_size"], raw.get("n_positions", 1024), raw.get("tie_word_embeddings", True),
                             flash_attention=False)
        heads = raw["num_attention_heads"]
        return ModelSpec("llama", raw["num_hidden_layers"], raw["hidden_size"], heads,
                         raw.get("num_key_value_heads", heads), raw["intermediate_size"], raw["vocab_size"],
                         raw.get("max_position_embeddings", 4096), raw.get("tie_word_embeddings", False))
    except KeyError as err:
        raise ValueError(f"{path} lacks {err}: expected a Llama-style or GPT-2-style config.json") from None


def with_seq_len(spec: ModelSpec, seq_len: int | None) -> ModelSpec:
    return spec if seq_len is None else replace(spec, seq_len=seq_len)
