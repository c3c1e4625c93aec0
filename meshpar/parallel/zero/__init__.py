"""Data parallelism over the `dp` axis, replicated or sharded (ZeRO stages 0-3).

    stage  parameters          gradients                       optimizer states + update
    0      full                full, all-reduced               full, every rank
    1      full                full, reduce-scattered          1/N: each rank its shard,
    2      full                1/N: reduce-scattered, the        then the parameters are
                               full buffer freed                 all-gathered
    3      1/N, gathered per   1/N, as stage 2                 1/N, no gather after it
           unit for its forward and again for its backward

With N = dp ranks, the wire bytes per rank and step (ring-equivalent) are 2(N-1)/N of the
gradient bytes for stages 0-2 (all-reduce, or reduce-scatter + all-gather) and 3(N-1)/N
for stage 3 (two gathers and a reduce-scatter), once per step when there is one
micro-batch; with m micro-batches stage 3 gathers 2m times. Under bf16/fp16 stage 3's
gathers carry the linear weights in 16 bits (about 2(N-1)/N in all).

The pieces, each with the state it owns:

    options.py        ZeroOptions: the stage and what is offloaded, and their rules
    buckets.py        which parameters share a flat bucket; the buffers that hold them
    reduction.py      the gradients from backward's hooks to this rank's reduced shard
                      (stages 0-2, and 3's gradients), overlapped with backward
    gathering.py      ZeRO-3: parameters gathered around each unit's use, prefetched
    offload.py        the optimizer's step in host memory
    data_parallel.py  ShardedDataParallel, which puts them together
"""

from meshpar.parallel.zero.buckets import Bucket, units_of
from meshpar.parallel.zero.data_parallel import OptimizerPiece, ShardedDataParallel
from meshpar.parallel.zero.options import OFFLOADS, STAGES, ZeroOptions
from meshpar.parallel.zero.reduction import MAX_IN_FLIGHT

__all__ = ["Bucket", "MAX_IN_FLIGHT", "OFFLOADS", "OptimizerPiece", "STAGES", "ShardedDataParallel", "ZeroOptions",
           "units_of"]
