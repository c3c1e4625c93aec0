"""A mixture-of-experts MLP: a router choosing each token's top-k experts, the experts
(SwiGLU, their weights stacked), optional shared experts every token passes through, and
the load-balancing loss (Switch Transformer's, per sequence).

Routing is dropless by default: every token reaches its k experts, however many choose
the same one, so the result does not depend on how tokens are spread over ranks. With a
capacity factor c, each expert takes at most ceil(c x T x k / E) of a forward's T tokens'
pairs, first come (token order) first served; the rest are dropped - their weight zero -
and counted. Which pairs drop then depends on how the batch is split into micro-batches
and ranks. The router's probabilities are fp32 softmax over the experts; the top-k
weights are renormalized to sum to one (Mixtral's rule).

The load-balancing loss of a sequence of s tokens is E x sum_e f_e P_e, with f_e the
share of its (token, choice) pairs routed to expert e and P_e its mean router
probability for e; a layer's loss is its sequences' mean, times `aux_loss_coef`.
Computed per sequence, it is the same whatever the split of the batch over ranks and
micro-batches; a sequence split in parts (context parallelism) sums its parts' counts
through `sum_over_sequence_parts`, which whoever splits it sets. It is not added to the output: its gradient is added in backward
(`AuxLossGradient`) with the weight the training loss gives each token,
`loss_normalizer` per token (1 / the step's target tokens, set by the training step;
default 1: a summed loss), so pipeline stages need no second loss to carry back.

Nothing here knows about distribution; expert parallelism (meshpar/parallel/experts.py)
replaces `Experts.forward` and keeps a slice of the stacked experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities (T, E) in fp32, the top-k weights (T, k) renormalized, their
        experts (T, k)) for tokens x (T, H)."""
        probs = torch.softmax(F.linear(x, self.weight).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return probs, weights / weights.sum(-1, keepdim=True), experts


class Experts(nn.Module):
    """E SwiGLU experts, their weights stacked: w_gate, w_up (E, F, H), w_down (E, H, F)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.w_up = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(T, H): each token's experts' outputs, weighted and summed, for tokens x (T, H),
        their chosen experts (T, k) - indices into this module's experts - and weights (T, k)."""
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            token, choice = torch.where(experts == e)
            h = x[token]
            y = F.linear(F.silu(F.linear(h, self.w_gate[e])) * F.linear(h, self.w_up[e]), self.w_down[e])
            out.index_add_(0, token, y * weights[token, choice, None].to(y.dtype))
        return out


class SharedExperts(nn.Module):
    """Experts every token passes through: one SwiGLU as wide as `count` experts."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.w_gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class AuxLossGradient(torch.autograd.Function):
    """Identity on `out`; in backward, `aux` receives the gradient `scale` (the loss is
    aux x scale, added where `out` is used)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_full(ctx.aux_shape, ctx.scale, dtype=torch.float32), None


class MoE(nn.Module):
    """The MLP of a mixture-of-experts block, (b, s, H) -> (b, s, H). After each training
    forward, `aux_loss_sum` holds its load-balancing loss summed over the sequences' tokens
    (divide by the tokens for the loss) and `tokens_per_expert` the (token, choice) pairs
    each expert was routed and `dropped_tokens` the pairs a capacity dropped, all
    accumulated until `reset_statistics`."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int,
                 shared_experts: int = 0, aux_loss_coef: float = 0.0, capacity_factor: float | None = None):
        super().__init__()
        self.num_experts, self.top_k, self.aux_loss_coef = num_experts, top_k, aux_loss_coef
        self.capacity_factor = capacity_factor
        self.router = Router(hidden_size, num_experts, top_k)
        self.experts = Experts(num_experts, hidden_size, ffn_hidden_size)
        self.shared = SharedExperts(hidden_size, shared_experts * ffn_hidden_size) if shared_experts else None
        self.loss_normalizer = 1.0  # the training loss's weight per token (the step sets it)
        # When each sequence is split into parts over ranks: how many, and how a per-sequence
        # count is summed over them (context parallelism sets both).
        self.sequence_parts = 1
        self.sum_over_sequence_parts = None
        # statistics, not weights: made on the host even when the model is built on meta
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.long, device="cpu"),
                             persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros((), device="cpu"), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.long, device="cpu"), persistent=False)

    def reset_statistics(self) -> None:
        self.tokens_per_expert.zero_()
        self.aux_loss_sum.zero_()
        self.dropped_tokens.zero_()

    def within_capacity(self, chosen: torch.Tensor) -> torch.Tensor:
        """(T, k) whether each (token, choice) pair is within its expert's capacity: the
        first ceil(capacity_factor x T x k / E) pairs routed to it, in token order."""
        capacity = math.ceil(self.capacity_factor * chosen.numel() / self.num_experts)
        routed = F.one_hot(chosen.reshape(-1), self.num_experts)  # (T k, E)
        place = (routed.cumsum(0) * routed).sum(-1) - 1  # each pair's place in its expert's queue
        return (place < capacity).view_as(chosen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        # a forward recomputed inside backward (activation recomputation) counts nothing again
        counting = self.training and torch._C._current_graph_task_id() == -1
        probs, weights, chosen = self.router(flat)
        if self.capacity_factor is not None:
            kept = self.within_capacity(chosen)
            weights = weights * kept
            if counting:
                self.dropped_tokens += (~kept).sum().detach()
        out = self.experts(flat, chosen, weights)
        if self.shared is not None:
            out = out + self.shared(flat)
        counts = F.one_hot(chosen.view(b, s * self.top_k), self.num_experts).sum(1)  # (b, E)
        if counting:
            self.tokens_per_expert += counts.sum(0).detach()
        if self.training:
            if self.aux_loss_coef:
                # Each sequence's loss weighted as its tokens' losses are: s E f_e P_e summed
                # over e = E sum_e f_e (sum of the tokens' p_e). When the sequences are split
                # (context parallelism), f_e needs every part's counts; the probabilities'
                # sum splits, and each part adds its own.
                whole, length = counts.float(), s
                if self.sum_over_sequence_parts is not None:
                    whole, length = self.sum_over_sequence_parts(whole), s * self.sequence_parts
                share = whole / (length * self.top_k)  # f_e per sequence
                aux = self.aux_loss_coef * self.num_experts * (share * probs.view(b, s, -1).sum(1)).sum()
                if counting:
                    self.aux_loss_sum += aux.detach()
                out = AuxLossGradient.apply(out, aux, self.loss_normalizer)
        return out.view(b, s, h)
