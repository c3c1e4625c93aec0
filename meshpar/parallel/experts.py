"""Expert parallelism: each rank of an `ep` group (consecutive dp ranks, mesh.py) holds
num_experts / ep of every mixture-of-experts layer's experts, and each token goes to the
ranks of its experts and back by all-to-all.

A plan names the experts modules (`Plan.experts`): a module whose parameters are the
experts' weights stacked along dim 0, with forward(x (T, H), experts (T, k), weights
(T, k)) -> (T, H), each token's experts' outputs weighted and summed - meshpar's
`Experts` and transformers' Mixtral experts alike. `split_experts` keeps this rank's
experts (ShardSpec over "ep": checkpoints, the gradient norm and the initialization read
it) and replaces the module's forward by the exchange:

    1. the (token, choice) pairs sorted by expert; how many go to each rank exchanged
       (an all-to-all of counts), then the tokens' hidden states (an all-to-all of
       uneven parts: routing is dropless, so the counts vary)
    2. the tokens received run through this rank's experts - the module's own forward,
       each token with its one expert and weight 1
    3. the outputs return by the reverse all-to-all, are weighted by the router's
       weights, and are summed per token in expert order (as one device sums them)

Backward runs the same exchanges reversed. The experts' gradients are then summed over
`edp`, the dp ranks holding the same experts (parallel/zero: such buckets reduce over
it), the rest of the model's over dp as before.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh, divisors
from meshpar.parallel.sharding import SPEC_ATTR, ShardSpec

if TYPE_CHECKING:
    from meshpar.config import Config


class _Exchange(torch.autograd.Function):
    """All-to-all of uneven parts over ep, its backward the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mesh: ParallelMesh, send: list[int], recv: list[int], tag: str):
        ctx.mesh, ctx.send, ctx.recv, ctx.tag = mesh, send, recv, tag
        return comm.all_to_all_uneven(mesh, "ep", x, send, recv, tag=tag)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return comm.all_to_all_uneven(ctx.mesh, "ep", grad.contiguous(), ctx.recv, ctx.send,
                                      tag=f"{ctx.tag}_grad"), None, None, None, None


def _dispatched(module: nn.Module, compute, mesh: ParallelMesh, per_rank: int):
    """The experts module's forward under expert parallelism (see the module docstring)."""
    def forward(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k = experts.shape[-1]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs by expert; a token's in its choices' order
        expert = flat[order]
        token = order // k
        send = torch.bincount(expert // per_rank, minlength=mesh.size("ep"))
        recv = comm.all_to_all(mesh, "ep", send, tag="expert_counts")
        send, recv = send.tolist(), recv.tolist()
        local = comm.all_to_all_uneven(mesh, "ep", expert % per_rank, send, recv, tag="expert_ids")
        received = _Exchange.apply(x[token], mesh, send, recv, "expert_tokens")
        out = compute(received, local[:, None], torch.ones(len(local), 1, dtype=weights.dtype, device=x.device))
        if received.requires_grad and not len(received):
            # No token came: the (empty) output does not depend on what came, and backward
            # would skip the exchange that brought it - which the peers run. Joined to it.
            out = out + received.sum() * 0
        back = _Exchange.apply(out, mesh, recv, send, "expert_outputs")
        weight = weights.reshape(-1)[order, None].to(back.dtype)
        return torch.zeros_like(x).index_add(0, token, back * weight)
    return forward


def split_experts(model: nn.Module, pattern: str, mesh: ParallelMesh) -> list[nn.Module]:
    """Every experts module matching `pattern`, made ready for the mesh: under ep, this
    rank's num_experts / ep experts and the exchange that routes their tokens; in any
    layout, every expert's weights kept in the graph of each forward (a zero gradient
    where no token came), because which experts a batch reaches varies by rank and the
    data-parallel reductions, started by gradient hooks, must fire alike everywhere.
    Works on the meta device; returns the modules."""
    from meshpar.parallel.apply import named_matching

    ep, mine = mesh.size("ep"), mesh.index("ep")
    modules = [m for _, m in named_matching(model, [pattern])]
    for module in modules:
        compute = types.MethodType(type(module).forward, module)
        if ep > 1:
            compute = _dispatched(module, compute, mesh, _keep_share(module, ep, mine))
        module.forward = _every_expert_in_graph(module, compute)
    return modules


def _keep_share(module: nn.Module, ep: int, mine: int) -> int:
    """Keep rank `mine`'s experts of the module's stacked weights; the experts per rank."""
    params = dict(module.named_parameters(recurse=False))
    counts = {p.shape[0] for p in params.values()}
    if len(counts) != 1:
        raise ValueError(f"experts module {type(module).__name__}: its parameters should stack the experts "
                         f"along dim 0, their first sizes differ: {sorted(counts)}")
    total = counts.pop()
    if total % ep:
        raise ValueError(f"ep={ep} does not divide the {total} experts")
    per_rank = total // ep
    for name, p in params.items():
        local = nn.Parameter(p.detach()[mine * per_rank:(mine + 1) * per_rank].clone(), requires_grad=p.requires_grad)
        setattr(local, SPEC_ATTR, ShardSpec.even("ep", 0, total, ep))
        setattr(module, name, local)
    if isinstance(getattr(module, "num_experts", None), int):  # the experts it holds (transformers' own count)
        module.num_experts = per_rank
    return per_rank


def _every_expert_in_graph(module: nn.Module, forward):
    def in_graph(*args, **kwargs):
        out = forward(*args, **kwargs)
        if torch.is_grad_enabled():
            out = out + sum(p.sum() for p in module.parameters()).to(out.dtype) * 0
        return out
    return in_graph


def expert_parallel_problems(cfg: Config) -> list[str]:
    """The rules of --ep and of a mixture of experts with the other axes."""
    found = []
    ep, dp = cfg.mesh.ep, cfg.mesh.dp
    if ep < 1 or dp < 1:
        return found
    if dp % ep:
        found.append(f"--ep {ep} must divide --dp {dp}: expert parallelism splits the data-parallel ranks "
                     f"into groups of ep")
    model = cfg.model_config()
    if model is None:
        return found
    experts = model.num_experts
    if ep > 1 and not experts:
        found.append(f"--ep {ep} needs a mixture-of-experts model (model.num_experts above 0, e.g. --model tiny-moe)")
    elif experts and experts % ep:
        found.append(f"--ep {ep} must divide the {experts} experts; use one of "
                     f"{', '.join(map(str, divisors(experts)))}")
    if experts and cfg.tensor.sequence_parallel:
        found.append("a mixture of experts with --sequence-parallel is not supported yet: its load-balancing "
                     "loss is per sequence, and sequence parallelism splits them over tp")
    return found
