"""meshpar from Python: bring your own model and your own loop.

    mesh = meshpar.init_mesh(dp=2, tp=2)                 # under torchrun
    model = meshpar.parallelize(MyModel(), mesh, my_plan, zero=1, lr=3e-4)
    for inputs, targets in batches:                       # this dp rank's rows
        loss = model.step(inputs, targets)                # forward, backward, update

`step` runs forward, backward, the dp reduction (ZeRO stage 0-3), global-norm clipping
and AdamW for any layout - tensor-parallel by the plan, a pipeline (any synchronous
schedule) when the mesh has pp > 1, data-parallel over dp. The loss is the mean
next-token cross entropy over the global batch, as one device would compute it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from meshpar import comm
from meshpar.checkpoint.store import CheckpointReader
from meshpar.checkpoint.training import restore_state, save_state
from meshpar.config import api_config
from meshpar.init import InitRule, Materialization, initializer
from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.parallel.apply import ParallelModel, split_model
from meshpar.parallel.compile import CompileOptions, allow_split_backward, recast_weight_copies
from meshpar.parallel.context import ContextOptions
from meshpar.parallel.dropout import dropout_seed
from meshpar.parallel.grad_reduce import GradReducer, ReduceOptions
from meshpar.parallel.precision import PRECISIONS, DynamicLossScaler, PrecisionOptions, autocast
from meshpar.parallel.plan import Plan
from meshpar.parallel.recompute import RecomputeOptions
from meshpar.parallel.sharding import model_names
from meshpar.parallel.tensor import TensorOptions
from meshpar.parallel.weight_casts import recasting, saved_tensor_hooks
from meshpar.parallel.zero import ShardedDataParallel, ZeroOptions
from meshpar.pipeline.options import PipelineOptions
from meshpar.pipeline.runtime import PipelineRuntime
from meshpar.pipeline.schedules import add_communication, asynchronous, build_schedule
from meshpar.train.optim import OptimizerOptions, adamw
from meshpar.train.nonfinite import NonFiniteWatch
from meshpar.train.step import StepResult, TrainingStep


def init_mesh(dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, *, ep: int = 1, backend: str | None = None,
              timeout_s: float = 300.0) -> ParallelMesh:
    """The mesh of this process's rank, from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); starts the default process group if none is running
    (gloo, or nccl when CUDA is available). One process and no torchrun: a single rank.
    The degrees must multiply to the world size; `ep` (expert parallelism) divides dp."""
    for name, value in (("dp", dp), ("tp", tp), ("pp", pp), ("cp", cp)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dp * tp * pp * cp != world:
        raise ValueError(f"dp*tp*pp*cp = {dp * tp * pp * cp} but the world has {world} rank(s); "
                         f"start with `torchrun --nproc-per-node {dp * tp * pp * cp} ...` or change the degrees")
    if world == 1:
        return ParallelMesh.single()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return ParallelMesh.build(MeshShape(pp=pp, dp=dp, cp=cp, tp=tp), int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                              ep=ep)


@dataclass
class Parallelized:
    """A model split over a mesh, its optimizer, and one training step. Build it with
    `parallelize`."""

    split: ParallelModel  # this rank's part of the model, its plan, loss and positions
    optimizer: torch.optim.Optimizer
    data_parallel: ShardedDataParallel
    microbatches: int
    max_grad_norm: float
    schedule: str
    virtual_stages: int = 1
    model_name: str = ""  # the user's model class (`module` may be this rank's pipeline stages)
    precision: str = "fp32"  # of the compute: fp32, or bf16/fp16 under autocast (fp32 weights)
    scaler: DynamicLossScaler | None = None  # fp16's dynamic loss scale
    sequence_parallel: bool = False  # the blocks run on 1/tp of the sequence
    pipeline: PipelineRuntime | None = None
    steps_taken: int = 0  # with the skipped ones
    skipped_steps: int = 0  # fp16: steps whose gradients overflowed (no update)
    extra: dict | None = None  # the caller's data from the checkpoint `load` restored
    recast: bool = False  # 16-bit weight copies cast again in backward, not kept (weight_casts.py)
    compiled: bool = False  # some modules run compiled: the zero-bubble split walks the graph twice
    positions: torch.Tensor | None = None  # context parallelism: this rank's tokens of the last batch
    steps: int | None = None  # the run's length: the async schedule is one stream over all of it

    def __post_init__(self):
        self.saved_tensor_hooks = saved_tensor_hooks(self.module, self.recast)
        self.compute = lambda: autocast(self.precision, self.device(), cache=not self.recast)
        self.training_step = TrainingStep(
            self.module, self.mesh, self.data_parallel, self.optimizer, self.loss_sum,
            lambda x: self.split.forward(x, self.positions), self.compute, self.saved_tensor_hooks,
            self.max_grad_norm, lambda: {id(p): name for name, p in self.named_parameters()},
            lambda: NonFiniteWatch(self.module, self.split.module_order, self.split.compiled), self.scaler)

    @property
    def module(self) -> nn.Module:
        """This rank's part of the model (its pipeline stages when pp is above 1)."""
        return self.split.module

    @property
    def mesh(self) -> ParallelMesh:
        return self.split.mesh

    @property
    def plan(self) -> Plan:
        return self.split.plan

    def device(self) -> torch.device:
        """Where this rank's parameters live."""
        return next(self.module.parameters()).device

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) for every parameter this rank holds, named as the whole model
        names it - also the last pipeline stage's copy of a weight tied to the first's."""
        return model_names(self.module)

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross entropy of a micro-batch (vocab-parallel when the
        plan splits the output layer)."""
        return self.split.loss_sum(logits, targets)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step on this dp rank's rows of the global batch (tokens and
        next-token targets, batch x sequence; under context parallelism each rank keeps
        its own tokens of them); returns the global batch's mean loss. A loss
        or gradient that is not finite raises DivergenceError on every rank, naming where
        it began, and leaves the parameters as they were - except under fp16, where
        overflowing gradients skip the update on every rank and lower the loss scale
        (counted in `skipped_steps`)."""
        seq, tp, cp = inputs.shape[1], self.mesh.size("tp"), self.mesh.size("cp")
        if cp > 1 and seq % (2 * cp):
            raise ValueError(f"context parallelism: 2 x cp = {2 * cp} must divide the sequence length {seq} "
                             f"(each rank holds two chunks, balancing the causal mask's work)")
        if self.sequence_parallel and (seq // cp) % tp:
            raise ValueError(f"sequence_parallel: tp={tp} must divide the sequence length {seq}"
                             + (f" over cp={cp}: each cp rank's {seq // cp} tokens" if cp > 1 else ""))
        self._check_same_batch(inputs, targets)
        tokens = targets.numel() * self.mesh.size("dp")
        self.use_positions(self.split.local_positions(inputs.shape[1], inputs.device))
        if self.positions is not None:
            inputs, targets = inputs[:, self.positions], targets[:, self.positions]
        xs, ys = list(inputs.chunk(self.microbatches)), list(targets.chunk(self.microbatches))
        if self.mesh.size("pp") > 1 and self.pipeline is None:
            self.build_pipeline(xs[0].shape, xs[0].device)
        return self.train_step(xs, ys, tokens).loss.item()

    def train_step(self, xs: list[torch.Tensor], ys: list[torch.Tensor], tokens: int,
                   on_saved: Callable[[int], None] | None = None,
                   set_lr: Callable[[int], None] | None = None) -> StepResult:
        """One optimizer step on this rank's micro-batches (its tokens of them under
        context parallelism, after `use_positions`) of a global batch of `tokens` target
        tokens; `on_saved` hears each micro-batch's saved activation bytes (no pipeline).
        The async schedule's update applies the previous batch's gradient, at the
        learning rate `set_lr(batch)` sets."""
        self.training_step.pipeline = self.pipeline
        if self.asynchronous:
            if self.steps_taken >= self.steps:
                raise ValueError(f"the async schedule's stream ends after steps={self.steps}")
            result = self.training_step.asynchronous(xs, ys, tokens, self.steps_taken,
                                                     self.steps_taken == self.steps - 1, set_lr)
        else:
            result = self.training_step(xs, ys, tokens, self.steps_taken + 1, on_saved)
        self.steps_taken += 1
        self.skipped_steps += result.skipped
        return result

    @property
    def asynchronous(self) -> bool:
        """PipeDream-2BW's delayed update (schedule='async' over pp above 1)."""
        return self.schedule == "async" and self.mesh.size("pp") > 1

    def use_positions(self, positions: torch.Tensor | None) -> None:
        """Context parallelism: the global positions of the tokens this rank is fed."""
        self.positions = positions
        if self.split.pipelined:
            self.module.positions = positions

    def build_pipeline(self, micro_batch_shape: tuple[int, int], device: torch.device) -> PipelineRuntime:
        """The pipeline runtime for micro-batches of `micro_batch_shape` tokens (this
        rank's, under context parallelism): the chosen schedule over one step, or the async
        schedule's one stream over the whole run, cut into steps."""
        pp = self.mesh.size("pp")
        seq = micro_batch_shape[1] // (self.mesh.size("tp") if self.sequence_parallel else 1)
        shape = (micro_batch_shape[0], seq, self.plan.pipeline.hidden_size)
        if self.asynchronous:
            schedule = add_communication(asynchronous(pp, 1, self.microbatches, self.steps))
        else:
            schedule = build_schedule(self.schedule, pp, self.virtual_stages, self.microbatches)
        self.pipeline = PipelineRuntime(schedule, self.module, self.mesh, self.loss_sum, shape, device,
                                        microbatches_per_step=self.microbatches,
                                        split_at_linears=not self.compiled)
        self.pipeline.compute_context = self.compute
        self.pipeline.saved_tensor_hooks = self.saved_tensor_hooks
        if self.pipeline.weight_grads is not None:  # ZeRO-3 counts their gradients apart
            self.data_parallel.deferred = frozenset(self.pipeline.weight_grads.deferrable)
        return self.pipeline

    def _check_same_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """ValueError, on every rank of the replica, unless its tp and pp ranks were all
        given the same batch: a pipeline's first stage would read one batch's inputs and
        its last another's targets, and nothing else would notice. Compared by a
        position-weighted checksum: one all-reduce of 12 numbers per axis and step."""
        axes = [axis for axis in ("tp", "pp") if self.mesh.size(axis) > 1]
        if not axes:
            return
        parts = []
        for t in (inputs, targets):
            flat = t.detach().flatten().double()
            where = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
            parts += [torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device), flat.sum(),
                      (flat * where).sum()]
        mine = torch.stack(parts)
        extremes = torch.cat([mine, -mine])  # the max of both halves: the largest and the smallest
        for axis in axes:
            comm.all_reduce(self.mesh, axis, extremes, tag="same_batch", op="max")
        if not torch.equal(extremes[:len(parts)], -extremes[len(parts):]):
            raise ValueError(
                "step(inputs, targets): the tp and pp ranks of a replica were given different batches; "
                "every rank of a replica needs the same rows. Draw them from a generator of their own "
                "(torch.Generator().manual_seed(...)) rather than the default one, which parallelize() "
                "seeds per dp rank and pipeline stage for dropout")

    def save(self, directory: str | os.PathLike, keep: int = 3, extra: dict | None = None) -> Path:
        """Collective: write a sharded checkpoint `step-<steps taken>` under `directory`
        (parameters, AdamW's state, the step count, fp16's loss scale, each rank's RNG
        states; the newest `keep` are kept). `extra`: the caller's own JSON data to keep
        with it - its data position, its learning-rate schedule's state (rank 0's is
        written). It loads into any layout of the same model and plan. Returns its
        directory. Not under the async schedule, which between two steps holds a batch's
        gradient half applied."""
        if self.asynchronous:
            raise ValueError("save() under schedule='async' is not supported: between two steps it holds a "
                             "batch's gradient half applied")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as err:
            raise TypeError(f"save(extra=...): the caller's data is kept as JSON, and this is not JSON: {err}") from None
        return save_state(self, directory, keep, {"name": self.model_name, "api": True}, {"extra": extra})

    def load(self, path: str | os.PathLike) -> int:
        """Restore the newest complete checkpoint under `path`, saved by `save` in any
        layout (dp, tp, pp, ZeRO stage); returns its step and leaves the `extra` it was
        saved with in `self.extra`. The RNG states come back in the layout that saved
        them; in another, each rank's generators are left as they are. Collective: every
        rank calls it (each checks its share of the files' sha256s)."""
        reader = CheckpointReader(path)
        reader.verify(self.mesh)
        saved, _ = restore_state(self, reader, "load() needs one that Parallelized.save wrote")
        self.extra = saved.get("extra")
        return self.steps_taken

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter at full (single-device) shape, from every pipeline stage, named
        as the whole model names it. Collective over tp, dp and pp."""
        with self.data_parallel.gathered():
            return self.split.full_state()


OptionSection = (TensorOptions | ContextOptions | PipelineOptions | RecomputeOptions | CompileOptions | ZeroOptions
                 | ReduceOptions | PrecisionOptions | OptimizerOptions)  # config.API_SECTIONS


def parallelize(model: nn.Module, mesh: ParallelMesh, plan: Plan, *sections: OptionSection, microbatches: int = 1,
                steps: int | None = None, init: Callable[[str], InitRule] | None = None, seed: int = 0,
                load: str | os.PathLike | None = None, device: torch.device | str | None = None,
                **options: Any) -> Parallelized:
    """Split `model` (built the same, from the same seed, on every rank) over `mesh` by
    `plan` - the one composition path, `meshpar train`'s too - with `microbatches`
    micro-batches per step, and build its optimizer and training step.

    The options are `meshpar train`'s, by the flag's name without dashes (`zero=1`,
    `grad_compression="bf16"`, `pp_layers=[3, 3, 2]`; docs/api.md lists them), or whole
    sections passed positionally (`meshpar.ZeroOptions(stage=3, offload=["optimizer"])`),
    and checked by the same rules with the same messages, naming options by their flags.
    What they mean over a user's model: tensor parallelism over tp (`sequence_parallel`:
    the plan's blocks run on 1/tp of the sequence between their column and row layers,
    see meshpar/parallel/plan.py), context parallelism over cp (the plan's `attention`
    cores; `cp_impl`), a pipeline of `schedule` over pp (the plan's `pipeline` part;
    `virtual_stages` chunks per rank under interleaved-1f1b; `pp_layers` blocks per
    stage, default balanced by their weights), ZeRO stage `zero` over dp with `offload`,
    the dp reduction (`bucket_mb`, `overlap`, `grad_compression`, `error_feedback`,
    `hierarchical_allreduce`), `precision` (fp32, or bf16/fp16 compute under autocast
    with fp32 weights, gradients and optimizer; fp16 scales the loss dynamically,
    `.scaler`, and skips a step whose gradients overflow on any rank), and AdamW (`lr`,
    `weight_decay`, `beta1`, `beta2`; matrices decayed, vectors not) with clipping at
    `max_grad_norm`. schedule='async' (PipeDream-2BW: each step's update applies the
    previous batch's gradient) is one stream over the whole run: give its `steps`.
    Beyond the command line: `compile` takes module-name patterns (fnmatch, as the plan's;
    the outermost module matched) as well as True for the blocks; `recompute` takes
    patterns of modules recomputed whole (["h.*"] for blocks, ["h.*.attn"] for attention
    alone) as well as "full" (every `recompute_every`-th block) or "selective" (the
    plan's attention cores); outside compiled code.

    A weight two modules share (a tied embedding and output layer) stays shared: split
    alike over tp, and held by both the first and the last pipeline stage, whose
    gradients of it are added up. Refused: between modules the plan splits differently,
    and between pipeline stages other than the first and the last.

    Dropout: the default generator is seeded last, from the seed the model was built
    with (`torch.initial_seed()`), one stream per dp rank and pipeline stage, shared by
    the tp ranks - they draw one mask together. So draw batches from a generator of
    their own: `step` refuses, on every rank, a batch that differs between the tp or pp
    ranks of a replica. A dropout inside a tp region sees whole tensors (replicated, or
    the row layer's partial sums, which one mask scales alike); under sequence or context
    parallelism one between regions draws the whole sequence's mask and keeps its
    tokens' rows. Not handled: a dropout on a tensor split over tp by heads (attention
    probabilities) - each rank would draw the same mask for its own heads.

    A model too large to build: build it on the meta device (`with meshpar.meta_device():
    model = MyModel()`, shapes only) and pass `init` - a rule per parameter name, e.g.
    `lambda name: InitRule("ones") if "norm" in name else InitRule("normal", 0.02)` - with
    `seed`, or `load`, a checkpoint `save` wrote (in any layout). Each rank then allocates
    on `device` (default: the current CUDA device if there is one, else the CPU) and fills
    only its own share, after the split; `init` draws each parameter tile by tile
    (meshpar/init.py), so every layout - one device included - starts from the same values."""
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
    cfg = api_config(mesh, sections, options, microbatches, steps, seed, torch.device(device).type)
    on_meta = _check_materialization(model, init, load)
    pp, pipe, precision, zero = mesh.size("pp"), cfg.pipeline, cfg.precision.precision, cfg.zero.stage
    schedule = pipe.schedule if pp > 1 else None
    split = split_model(model, mesh, plan, sequence_parallel=cfg.tensor.sequence_parallel,
                        num_stages=pp * pipe.virtual_stages, stage_layer_counts=pipe.pp_layers,
                        cp_impl=cfg.context.cp_impl, compile=cfg.compile.compile, recompute=cfg.recompute.recompute,
                        recompute_every=cfg.recompute.recompute_every)
    compiled = bool(cfg.compile.compile)
    recast = recasting(precision, zero, schedule)
    if compiled and recast:
        recast_weight_copies()  # the saved-tensor hooks cannot see inside a compiled graph
    if compiled and schedule not in (None, "async") and build_schedule(
            schedule, pp, pipe.virtual_stages, microbatches).splits_backward:
        allow_split_backward()
    materialize = None
    if on_meta:  # with the split done, ZeRO allocates this rank's share (under stage 3 its shard)
        materialize = Materialization(device, mesh, None if load else initializer(init, seed))
    reduce = cfg.reduce
    data_parallel = ShardedDataParallel(
        split.module, mesh, zero, int(reduce.bucket_mb * 2**20), overlap=reduce.overlap,
        offload=tuple(cfg.zero.offload), microbatches=microbatches, grad_sync=split.sync_grads,
        reducer=GradReducer(mesh, reduce.grad_compression, reduce.error_feedback, reduce.hierarchical_allreduce),
        compute_dtype=PRECISIONS[precision], materialize=materialize)
    optimizer = adamw(*data_parallel.optimizer_params(), cfg.optimizer)
    scaler = DynamicLossScaler(cfg.precision) if precision == "fp16" else None
    torch.manual_seed(dropout_seed(torch.initial_seed(), mesh) % 2**64)
    parallelized = Parallelized(split, optimizer, data_parallel, microbatches, cfg.optimizer.max_grad_norm,
                                pipe.schedule, pipe.virtual_stages, type(model).__name__, precision, scaler,
                                cfg.tensor.sequence_parallel, recast=recast, compiled=compiled, steps=steps)
    if load is not None:
        parallelized.load(load)
    return parallelized


def _check_materialization(model: nn.Module, init, load) -> bool:
    """Whether `model` is on the meta device (then `init` or `load` must say how its
    values come); ValueError, before anything changes, when the options do not fit."""
    on_meta = any(p.is_meta for p in model.parameters())
    if init is not None and load is not None:
        raise ValueError("init= and load= both given: the parameters come from one of them")
    if on_meta and init is None and load is None:
        raise ValueError("the model is on the meta device (shapes, no values): pass init= (a rule per parameter "
                         "name, meshpar.InitRule) or load= (a checkpoint saved by Parallelized.save)")
    if init is not None and not on_meta:
        raise ValueError("init= fills a model built on the meta device (with meshpar.meta_device()); this one "
                         "already has values - build it there, or drop init=")
    return on_meta
