"""Which layer of meshpar's Llama model gets which tensor-parallel style: its `Plan`,
applied by the one engine every model goes through (meshpar/parallel/plan.py).

    embedding            vocab-parallel (rows), vocabulary padded to a multiple of tp
    attention wq wk wv   column-parallel by heads; KV heads replicated when kv_heads < tp
    attention wo         row-parallel
    mlp w_gate w_up      column-parallel
    mlp w_down           row-parallel
    mixture of experts   the router and experts whole on each tp rank (expert parallelism
                         splits the experts over ep instead); shared experts as the mlp
    output               column-parallel over the vocabulary; vocab-parallel loss
    norms                replicated; with sequence parallelism they see a sequence shard,
                         so their weight gradients are summed over tp after backward

As a pipeline: the embedding on the first stage, the final norm and the output layer on
the last, the rotary tables on every stage (each block takes cos and sin of its tokens'
positions).

Sequence parallelism runs from the embedding's output (its partial lookups
reduce-scattered) to the output layer's input (all-gathered as it enters), so the final
norm also sees 1/tp of the tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from meshpar.mesh import divisors
from meshpar.model.config import ModelConfig
from meshpar.parallel.plan import PipelinePlan, Plan


def tensor_parallel_problems(cfg: ModelConfig, tp: int, sequence_parallel: bool, seq_len: int) -> list[str]:
    """Why this model cannot be split `tp` ways (empty if it can)."""
    if tp == 1:
        return []
    found = []
    if cfg.num_heads % tp:
        found.append(f"--tp={tp} does not divide num_heads={cfg.num_heads}; use one of "
                     f"{', '.join(map(str, divisors(cfg.num_heads)))}")
    elif cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        found.append(f"--tp={tp} and num_kv_heads={cfg.num_kv_heads}: one must divide the other "
                     f"(kv heads are split, or replicated when fewer than tp)")
    if cfg.ffn_hidden_size % tp:
        found.append(f"--tp={tp} does not divide ffn_hidden_size={cfg.ffn_hidden_size}")
    if sequence_parallel and seq_len % tp:
        found.append(f"--sequence-parallel: --tp={tp} must divide --seq-len={seq_len}")
    return found


def llama_plan(cfg: ModelConfig) -> Plan:
    """The plan above, for a model of `cfg`."""
    attention, mlp = "layers.*.attention", "layers.*.mlp"
    if cfg.num_experts:  # the router and experts stay whole under tp; shared experts split as an MLP
        mlp = f"{mlp}.shared" if cfg.shared_experts else None
    return Plan(column=[f"{attention}.wq", f"{attention}.wk", f"{attention}.wv",
                        *([f"{mlp}.w_gate", f"{mlp}.w_up"] if mlp else [])],
                row=[f"{attention}.wo", *([f"{mlp}.w_down"] if mlp else [])],
                heads={f"{attention}.wq": cfg.num_heads, f"{attention}.w[kv]": cfg.num_kv_heads},
                vocab_embedding=["embedding"], vocab_output="output",
                divide_by_tp={attention: ["num_heads", "num_kv_heads"]},
                blocks="layers", tp_regions=[attention, *([mlp] if mlp else [])],
                sequence_start="embedding", sequence_end="output", sequence_sharded=["norm"],
                attention=attention, positions="positions",
                experts="layers.*.mlp.experts" if cfg.num_experts else None,
                pipeline=PipelinePlan(blocks="layers", first=["embedding"], last=["norm", "output"],
                                      embed=_embed, head=_head, hidden_size=cfg.hidden_size,
                                      block_args=_rotary, every_stage=["rope_cos", "rope_sin"]))


def _embed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model.embedding(tokens)


def _head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.output(model.norm(hidden))


def _rotary(model: nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.rope_cos[positions], model.rope_sin[positions]
