"""A Llama-style decoder on one device.

Plain PyTorch with no knowledge of distribution: parallelism is applied to this model
from outside (meshpar/parallel/), by swapping or wrapping its submodules. Attention and
MLP read their head counts from attributes so that a tensor-parallel rewrite can shrink
them to the local shard.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from meshpar.init import InitRule, initializer, materialize, meta_device
from meshpar.model.config import ModelConfig
from meshpar.model.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_compute_dtype(_RMSNorm.apply(x, self.weight, self.eps))


class _RMSNorm(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight, in fp32, keeping for backward only x and the
    rsqrt of each row. Autograd's graph of the same ops also keeps the normalised x - as
    large as x - for the weight's gradient; backward recomputes it from x instead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x_fp32 = x.float()
        rstd = torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return (x_fp32 * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = (grad * normed.type_as(x)).reshape(-1, weight.numel()).sum(0)
        grad_normed = (grad * weight).float()
        # d(x r)/dx with r = (mean(x^2) + eps)^-1/2, per row: r (g - x_hat mean(g x_hat))
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.type_as(x), grad_weight.to(weight.dtype), None


def to_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype autocast computes matmuls in (unchanged outside autocast). A norm's
    output feeds several matmuls (q, k and v; gate and up): autocast would cast it for
    each, and autograd would keep every copy. Cast once, they share one 16-bit input -
    and its gradients from the matmuls add up in 16 bits, as in Megatron-LM."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim/2), Su et al. 2021. Computed on the host
    even when the model is built on the meta device: they are a function, not weights."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device="cpu"), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_bnsd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (even, odd) of the last dim; cos/sin are (s, d/2) for the tokens in x,
    or (b, s, d/2) when each sequence has its own positions."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x_pairs = x_bnsd.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x_bnsd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x_bsh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_bsh.shape
        q = self.wq(x_bsh).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_bsh).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_bsh).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attend(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention core; context parallelism replaces this method's work."""
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x_bsh: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x_bsh)) * self.w_up(x_bsh))


class Dropout(nn.Module):
    """Inverted dropout whose mask is `rand(shape) >= p`: a rule simple enough that a
    sharded copy of this layer can draw the same mask and keep its slice."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand(x.shape, device=x.device) >= self.p) / (1 - self.p)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg) if not cfg.num_experts else \
            MoE(cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts, cfg.experts_per_token, cfg.shared_experts,
                cfg.aux_loss_coef, cfg.capacity_factor)
        self.attention_dropout = Dropout(cfg.dropout)
        self.mlp_dropout = Dropout(cfg.dropout)

    def forward(self, x_bsh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x_bsh + self.attention_dropout(self.attention(self.attention_norm(x_bsh), cos, sin))
        return h + self.mlp_dropout(self.mlp(self.mlp_norm(h)))


class Transformer(nn.Module):
    """Token ids (b, s) -> logits (b, s, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.embedding.weight
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`positions` (s,) are the tokens' global positions, or (b, s) each sequence's;
        default 0..s-1."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))


def init_rule(cfg: ModelConfig, name: str) -> InitRule:
    """How parameter `name` starts: norms at one, the rest normal with std init_std, the
    residual outputs (wo, w_down, the experts' w_down) scaled down by sqrt(2 x layers) as
    GPT-2's."""
    if name.endswith("norm.weight"):
        return InitRule("ones")
    if name.endswith(("wo.weight", "w_down.weight", "experts.w_down")):
        return InitRule("normal", cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    return InitRule("normal", cfg.init_std)


def initialize(cfg: ModelConfig, seed: int):
    """The reference initialization as a `materialize` fill: tile by tile (meshpar/init.py),
    so any rank fills its own boxes with exactly these values."""
    return initializer(functools.partial(init_rule, cfg), seed)


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> Transformer:
    """The reference model, initialised from `seed`, on `device` ("meta": shapes only)."""
    with meta_device():
        model = Transformer(cfg)
    if torch.device(device).type != "meta":
        materialize(model, None, device, initialize(cfg, seed))
    return model
