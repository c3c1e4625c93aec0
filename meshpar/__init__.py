"""meshpar: train transformers too large for one device.

The public API - everything else is meshpar's own business and may change:

- `init_mesh`, `parallelize`, `Plan`, `PipelinePlan`, `Parallelized`: bring your own model
  and training loop (see meshpar/api.py and docs/api.md); `DivergenceError`, what a step
  raises on every rank when the loss or a gradient is not finite; `meta_device` and
  `InitRule`: build a model too large for one device and let each rank fill its share;
  `hf_plan`: the Plan of a transformers causal LM, read from its config;
- the option sections `parallelize` takes (the command line's, by feature):
  `TensorOptions`, `ContextOptions`, `PipelineOptions`, `RecomputeOptions`,
  `CompileOptions`, `ZeroOptions`, `ReduceOptions`, `PrecisionOptions`,
  `OptimizerOptions`;
- building blocks usable on their own: `ColumnLinear`, `RowLinear`, `VocabEmbedding`,
  `vocab_parallel_cross_entropy`, `ShardedDataParallel` (ZeRO 0-3), `RingAttention`
  (context parallelism), `build_schedule` and `simulate` (pipeline schedules as data and
  their simulator), `ParallelMesh`.
"""

__version__ = "0.1.0"

from meshpar.api import Parallelized, init_mesh, parallelize  # noqa: E402
from meshpar.parallel.compile import CompileOptions  # noqa: E402
from meshpar.parallel.context import ContextOptions  # noqa: E402
from meshpar.parallel.grad_reduce import ReduceOptions  # noqa: E402
from meshpar.parallel.precision import PrecisionOptions  # noqa: E402
from meshpar.parallel.recompute import RecomputeOptions  # noqa: E402
from meshpar.parallel.tensor import TensorOptions  # noqa: E402
from meshpar.parallel.zero import ZeroOptions  # noqa: E402
from meshpar.pipeline.options import PipelineOptions  # noqa: E402
from meshpar.train.optim import OptimizerOptions  # noqa: E402
from meshpar.hf import hf_plan  # noqa: E402
from meshpar.init import InitRule, meta_device  # noqa: E402
from meshpar.mesh import ParallelMesh  # noqa: E402
from meshpar.parallel.context import RingAttention  # noqa: E402
from meshpar.parallel.plan import ColumnLinear, PipelinePlan, Plan, RowLinear, VocabEmbedding  # noqa: E402
from meshpar.parallel.tensor import vocab_parallel_cross_entropy  # noqa: E402
from meshpar.parallel.zero import ShardedDataParallel  # noqa: E402
from meshpar.pipeline.check import simulate  # noqa: E402
from meshpar.pipeline.schedules import build_schedule  # noqa: E402
from meshpar.train.checks import DivergenceError  # noqa: E402

__all__ = ["init_mesh", "parallelize", "Plan", "PipelinePlan", "Parallelized", "ParallelMesh", "ColumnLinear",
           "RowLinear", "VocabEmbedding", "vocab_parallel_cross_entropy", "ShardedDataParallel", "RingAttention",
           "build_schedule", "simulate", "DivergenceError", "InitRule", "meta_device", "hf_plan", "TensorOptions",
           "ContextOptions", "PipelineOptions", "RecomputeOptions", "CompileOptions", "ZeroOptions", "ReduceOptions",
           "PrecisionOptions", "OptimizerOptions"]
