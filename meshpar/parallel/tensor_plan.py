"""Which layer of meshpar's Llama model gets which tensor-parallel style, and the
rewrite that applies it in place, slicing the full (reference) weights.

    embedding            vocab-parallel (rows), vocabulary padded to a multiple of tp
    attention wq wk wv   column-parallel by heads; KV heads replicated when kv_heads < tp
    attention wo         row-parallel
    mlp w_gate w_up      column-parallel
    mlp w_down           row-parallel
    output               column-parallel over the vocabulary; vocab-parallel loss
    norms                replicated; with sequence parallelism they see a sequence shard,
                         so their weight gradients are summed over tp after backward
"""

from __future__ import annotations

import math

import torch
from torch import nn

from meshpar import comm
from meshpar.mesh import ParallelMesh
from meshpar.model.config import ModelConfig
from meshpar.model.llama import Transformer
from meshpar.parallel.sharding import SPEC_ATTR, ShardSpec
from meshpar.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, bracket,
                                     sum_grads_over_tp, vocab_parallel_cross_entropy)

SEQUENCE_PARALLEL_GRAD_ATTR = "meshpar_sequence_parallel_grad"


def tensor_parallel_problems(cfg: ModelConfig, tp: int, sequence_parallel: bool, seq_len: int) -> list[str]:
    """Why this model cannot be split `tp` ways (empty if it can)."""
    if tp == 1:
        return ["--sequence-parallel needs --tp above 1"] if sequence_parallel else []
    divisors = [d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0]
    found = []
    if cfg.num_heads % tp:
        found.append(f"--tp={tp} does not divide num_heads={cfg.num_heads}; use one of "
                     f"{', '.join(map(str, divisors))}")
    elif cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        found.append(f"--tp={tp} and num_kv_heads={cfg.num_kv_heads}: one must divide the other "
                     f"(kv heads are split, or replicated when fewer than tp)")
    if cfg.ffn_hidden_size % tp:
        found.append(f"--tp={tp} does not divide ffn_hidden_size={cfg.ffn_hidden_size}")
    if sequence_parallel and seq_len % tp:
        found.append(f"--sequence-parallel: --tp={tp} must divide --seq-len={seq_len}")
    return found


def _param(local: torch.Tensor, spec: ShardSpec | None) -> nn.Parameter:
    param = nn.Parameter(local.detach().clone())
    if spec is not None:
        setattr(param, SPEC_ATTR, spec)
    return param


def _rows(full: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return full[start:start + count]


class TensorParallelLlama:
    """Applies the plan above to a Transformer in place; keeps what the trainer needs
    afterwards: the vocab-parallel loss and the gradient synchronisation."""

    def __init__(self, model: Transformer, mesh: ParallelMesh, sequence_parallel: bool):
        cfg = model.cfg
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        t, r = mesh.size("tp"), mesh.index("tp")
        self.replicated_kv: list[nn.Parameter] = []
        self.kv_head_index = 0

        # Vocabulary: pad to a multiple of tp; padded rows are zeros that no token selects
        # and whose logits the loss masks out.
        rows = math.ceil(cfg.vocab_size / t)
        self.vocab_start = r * rows
        self.num_valid_local = max(0, min(rows, cfg.vocab_size - self.vocab_start))
        vocab_spec = ShardSpec.even("tp", 0, cfg.vocab_size, t)

        def vocab_slice(full: torch.Tensor) -> torch.Tensor:
            padded = full.new_zeros(rows * t, full.shape[1])
            padded[:cfg.vocab_size] = full.detach()
            return _rows(padded, self.vocab_start, rows)

        embedding = VocabParallelEmbedding(vocab_slice(model.embedding.weight), self.vocab_start, mesh,
                                           sequence_parallel)
        embedding.weight = _param(embedding.weight, vocab_spec)
        output = ColumnParallelLinear(vocab_slice(model.output.weight), mesh, sequence_parallel)
        output.weight = embedding.weight if cfg.tie_embeddings else _param(output.weight, vocab_spec)
        model.embedding, model.output = embedding, output

        for layer in model.layers:
            self._shard_attention(layer.attention, cfg, t, r)
            self._shard_mlp(layer.mlp, cfg, t, r)
        self.sequence_parallel_params = []
        if sequence_parallel:
            norms = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
            for norm in norms:
                setattr(norm.weight, SEQUENCE_PARALLEL_GRAD_ATTR, True)
                self.sequence_parallel_params.append(norm.weight)

    def _column(self, full: nn.Linear, start: int, count: int, spec: ShardSpec) -> ColumnParallelLinear:
        layer = ColumnParallelLinear(_rows(full.weight.detach(), start, count), self.mesh,
                                     self.sequence_parallel, enter=False)
        layer.weight = _param(layer.weight, spec)
        return layer

    def _row(self, full: nn.Linear, start: int, count: int, spec: ShardSpec) -> RowParallelLinear:
        layer = RowParallelLinear(full.weight.detach()[:, start:start + count], self.mesh,
                                  self.sequence_parallel, leave=False)
        layer.weight = _param(layer.weight, spec)
        return layer

    def _shard_attention(self, attention: nn.Module, cfg: ModelConfig, t: int, r: int):
        hd = cfg.head_dim
        heads = cfg.num_heads // t
        attention.wq = self._column(attention.wq, r * heads * hd, heads * hd,
                                    ShardSpec.even("tp", 0, cfg.num_heads * hd, t))
        attention.wo = self._row(attention.wo, r * heads * hd, heads * hd,
                                 ShardSpec.even("tp", 1, cfg.num_heads * hd, t))
        if cfg.num_kv_heads % t == 0:
            kv_heads = cfg.num_kv_heads // t
            spec = ShardSpec.even("tp", 0, cfg.num_kv_heads * hd, t)
            first = r * kv_heads
        else:  # fewer kv heads than ranks: each rank holds the one its query heads read
            kv_heads, replicas = 1, t // cfg.num_kv_heads
            first = r // replicas
            spec = ShardSpec("tp", 0, cfg.num_kv_heads * hd,
                             tuple(j * replicas for j in range(cfg.num_kv_heads)), replicas)
        attention.wk = self._column(attention.wk, first * hd, kv_heads * hd, spec)
        attention.wv = self._column(attention.wv, first * hd, kv_heads * hd, spec)
        if spec.replicas > 1:
            self.replicated_kv += [attention.wk.weight, attention.wv.weight]
            self.kv_head_index = first
        attention.num_heads, attention.num_kv_heads = heads, kv_heads
        bracket(attention, self.mesh, self.sequence_parallel)  # Q, K, V share one entered input

    def _shard_mlp(self, mlp: nn.Module, cfg: ModelConfig, t: int, r: int):
        f = cfg.ffn_hidden_size // t
        spec = ShardSpec.even("tp", 0, cfg.ffn_hidden_size, t)
        mlp.w_gate = self._column(mlp.w_gate, r * f, f, spec)
        mlp.w_up = self._column(mlp.w_up, r * f, f, spec)
        mlp.w_down = self._row(mlp.w_down, r * f, f, ShardSpec.even("tp", 1, cfg.ffn_hidden_size, t))
        bracket(mlp, self.mesh, self.sequence_parallel)

    def loss(self, logits_local: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed per-token cross entropy, from vocab-sharded logits."""
        return vocab_parallel_cross_entropy(logits_local, targets, self.vocab_start,
                                            self.num_valid_local, self.mesh).sum()

    def sync_grads(self, params: list[torch.nn.Parameter] | None = None):
        """After backward: sum over tp the gradients that are partial there - norm weights
        under sequence parallelism, and replicated KV heads (each holder saw only its own
        query heads' share). `params`: only those among them (one gradient bucket); the tp
        ranks of one slice call this for the same buckets in the same order."""
        # Under pipeline parallelism a rank holds some layers only: the others have no
        # gradient here (and the tp ranks of one stage hold the same layers).
        wanted = None if params is None else {id(p) for p in params}
        norms = [p for p in self.sequence_parallel_params if wanted is None or id(p) in wanted]
        replicated_kv = [p for p in self.replicated_kv
                         if p.grad is not None and (wanted is None or id(p) in wanted)]
        sum_grads_over_tp(norms, self.mesh, "sp_norm_grads")
        if replicated_kv:
            # Each holder writes its head's gradient into a zeroed full-size slot; one sum
            # over tp then gives every head its total.
            rows = replicated_kv[0].shape[0]
            head = slice(self.kv_head_index * rows, (self.kv_head_index + 1) * rows)
            full_rows = getattr(replicated_kv[0], SPEC_ATTR).full_size
            slots = replicated_kv[0].grad.new_zeros(len(replicated_kv), full_rows, *replicated_kv[0].shape[1:])
            for slot, p in zip(slots, replicated_kv):
                slot[head] = p.grad
            comm.all_reduce(self.mesh, "tp", slots, tag="kv_grads")
            for slot, p in zip(slots, replicated_kv):
                p.grad.copy_(slot[head])
