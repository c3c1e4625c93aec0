"""Model shapes: a dataclass and the named presets."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dropout: float = 0.0  # on each block's output before the residual add
    # Mixture of experts (meshpar/model/moe.py): 0 experts is a dense MLP. Each expert is a
    # SwiGLU of ffn_hidden_size; shared experts are as wide as that many experts together.
    num_experts: int = 0
    experts_per_token: int = 2
    shared_experts: int = 0
    aux_loss_coef: float = 0.01  # the load-balancing loss's weight
    capacity_factor: float | None = None  # None: dropless; c: each expert takes at most c x its even share

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameter count, computed from the shapes alone (no tensors built)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.ffn_hidden_size
        if self.num_experts:
            mlp = mlp * (self.num_experts + self.shared_experts) + h * self.num_experts  # and the router
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    def problems(self) -> list[str]:
        """Everything wrong with these shapes, as messages for a user."""
        found = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "ffn_hidden_size", "max_seq_len"):
            if getattr(self, name) < 1:
                found.append(f"model.{name}={getattr(self, name)} must be at least 1")
        if found:
            return found
        if self.hidden_size % self.num_heads:
            found.append(f"model.num_heads={self.num_heads} does not divide "
                         f"hidden_size={self.hidden_size}")
        elif self.head_dim % 2:
            found.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 0 <= self.dropout < 1:
            found.append(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.num_experts < 0 or self.shared_experts < 0:
            found.append("model.num_experts and model.shared_experts must be at least 0")
        elif self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            found.append(f"model.experts_per_token={self.experts_per_token} must be between 1 and "
                         f"num_experts={self.num_experts}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            found.append(f"model.capacity_factor={self.capacity_factor} must be above 0 (leave it out for dropless "
                         f"routing)")
        if self.aux_loss_coef < 0:
            found.append(f"model.aux_loss_coef={self.aux_loss_coef} must be at least 0")
        if self.num_heads % self.num_kv_heads:
            found.append(f"model.num_kv_heads={self.num_kv_heads} must divide "
                         f"num_heads={self.num_heads}")
        return found


PRESETS: dict[str, ModelConfig] = {
    # CPU demos and tests: ~430k parameters, 8 layers (divisible by 2, 4 and 8 for
    # pipeline stages), 8 heads (tp up to 8), byte-level vocabulary.
    "tiny": ModelConfig(vocab_size=256, hidden_size=64, num_layers=8, num_heads=8,
                        num_kv_heads=4, ffn_hidden_size=192, max_seq_len=256),
    # ~6M parameters: still trains on a CPU, big enough to see throughput effects.
    "small": ModelConfig(vocab_size=256, hidden_size=256, num_layers=8, num_heads=8,
                         num_kv_heads=4, ffn_hidden_size=704, max_seq_len=512),
    # 1.36B parameters, the GPU benchmark's model (benchmarks/gpu_step.py): TinyLlama's
    # width, 24 layers, full multi-head attention, Llama 2's 32k vocabulary.
    "llama-1.4b": ModelConfig(vocab_size=32000, hidden_size=2048, num_layers=24, num_heads=16,
                              num_kv_heads=16, ffn_hidden_size=5632, max_seq_len=2048),
    # Real shapes (Llama 3 paper, Table 3), for the planner; never built on a CPU.
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32,
                             num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
                             max_seq_len=8192, rope_theta=500000.0),
    "llama3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, num_layers=80,
                              num_heads=64, num_kv_heads=8, ffn_hidden_size=28672,
                              max_seq_len=8192, rope_theta=500000.0),
    "llama3-405b": ModelConfig(vocab_size=128256, hidden_size=16384, num_layers=126,
                               num_heads=128, num_kv_heads=8, ffn_hidden_size=53248,
                               max_seq_len=8192, rope_theta=500000.0),
    # Mixtral 8x7B's shape (Jiang et al. 2024), for the planner: 46.7B parameters, 12.9B
    # of them used per token.
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                                num_kv_heads=8, ffn_hidden_size=14336, max_seq_len=4096,
                                rope_theta=1e6, num_experts=8, experts_per_token=2),
    # tiny with a mixture of 8 experts (top-2) in every block: ~1.3M parameters.
    "tiny-moe": ModelConfig(vocab_size=256, hidden_size=64, num_layers=8, num_heads=8,
                            num_kv_heads=4, ffn_hidden_size=96, max_seq_len=256, num_experts=8,
                            experts_per_token=2),
}

# Presets too large to instantiate on a CPU run.
LARGE_PRESETS = frozenset({"llama-1.4b", "llama3-8b", "llama3-70b", "llama3-405b", "mixtral-8x7b"})


def model_config(name: str, **overrides) -> ModelConfig:
    """The preset called `name`, with any fields replaced by `overrides`."""
    if name not in PRESETS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
