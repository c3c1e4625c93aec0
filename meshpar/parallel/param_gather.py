"""ZeRO-3's parameter gathers in 16 bits, changing no bit of the computation.

Under bf16 or fp16 autocast a linear layer's weight is read only through its 16-bit
copy: rounding fp32 to 16 bits is deterministic, so gathering each such weight already
rounded gives the matmul the very bits it would have cast itself, for half the bytes on
the wire. Every other parameter - norm gains, embedding tables, a weight two modules
share, anything of a module meshpar does not know - is read in fp32 and travels exactly.

So each rank sends, in one all-gather of 16-bit words, its whole shard cast to 16 bits
(s words), then its exact parameters' elements once more as fp32 (two words each),
padded to the largest such count on any rank (e): 2 (s + 2e) bytes per rank instead of
4 s. A Llama layer's exact elements are its two norm gains, 2h of some 12 h^2:
the wire bytes are half of fp32's to within 1/(6h). The receiver upcasts the first part
into the fp32 buffer the module's parameters are views of, then writes the exact
elements over their rounded values.

Which parameters a module reads only through F.linear: an `nn.Linear`'s weight and
bias, and the names a module lists in its `matmul_params` attribute (meshpar's parallel
linears). A parameter also held by another module (a tied embedding) is exact.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


def read_only_by_matmuls(module: nn.Module) -> set[int]:
    """ids of the parameters of `module` whose every use is a matmul's 16-bit copy."""
    owners: Counter[int] = Counter()
    linear: set[int] = set()
    for m in module.modules():
        names = ("weight", "bias") if isinstance(m, nn.Linear) else getattr(m, "matmul_params", ())
        for name, p in m.named_parameters(recurse=False):
            owners[id(p)] += 1
            if name in names:
                linear.add(id(p))
    return {i for i in linear if owners[i] == 1}


class SixteenBitGather:
    """The packing of one bucket's gather: `exact` marks the flat buffer's elements that
    travel as fp32; `n` ranks hold `size` elements each, this one from `rank * size`."""

    def __init__(self, exact: torch.Tensor, n: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.n, self.dtype = n, dtype
        self.size = exact.numel() // n
        per_rank = exact.view(n, self.size)
        counts = per_rank.sum(dim=1)
        self.extra = int(counts.max())  # fp32 elements sent by the rank with the most
        self.width = self.size + 2 * self.extra  # 16-bit words each rank sends
        self.mine = per_rank[rank].nonzero().flatten()  # this rank's exact elements, within its shard
        # Where each rank's exact values land: (rank, j) of the received fp32 block -> flat position.
        rows, cols = per_rank.nonzero(as_tuple=True)
        slot = torch.cat([torch.arange(int(c)) for c in counts]) if self.extra else cols[:0]
        self.source = (rows * self.extra + slot).to(device)
        self.target = (rows * self.size + cols).to(device)

    def pack(self, shard: torch.Tensor) -> torch.Tensor:
        """What this rank sends: its shard in 16 bits, then its exact elements in fp32."""
        out = torch.zeros(self.width, dtype=self.dtype, device=shard.device)
        out[:self.size] = shard
        if self.extra:
            if self.mine.device != shard.device:  # once: where the shard lives (the host, when offloaded)
                self.mine = self.mine.to(shard.device)
            exact = shard[self.mine]
            out[self.size:self.size + 2 * exact.numel()] = exact.view(self.dtype)
        return out

    def unpack(self, received: torch.Tensor, flat: torch.Tensor) -> None:
        """Every rank's parts into `flat` (the fp32 buffer): rounded, then exact where marked."""
        words = received.view(self.n, self.width)
        flat.view(self.n, self.size).copy_(words[:, :self.size])
        if self.extra:
            exact = words[:, self.size:].contiguous().view(torch.float32).reshape(-1)
            flat[self.target] = exact[self.source]
