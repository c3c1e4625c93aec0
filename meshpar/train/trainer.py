"""The training loop, the same for every layout: the single-device reference is the
case where every mesh axis has size 1."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from dataclasses import dataclass

import torch

from meshpar import comm
from meshpar.config import Config
from meshpar.mesh import ParallelMesh
from meshpar.model import build_model
from meshpar.init import Materialization
from meshpar.model.llama import initialize
from meshpar.parallel.apply import ParallelModel, parallelize
from meshpar.parallel.compile import allow_split_backward, recast_weight_copies
from meshpar.parallel.dropout import dropout_seed
from meshpar.parallel.grad_reduce import GradReducer
from meshpar.parallel.zero import ShardedDataParallel
from meshpar.parallel.precision import PRECISIONS, DynamicLossScaler, LossScaleConfig, autocast
from meshpar.parallel.weight_casts import recasting, saved_tensor_hooks
from meshpar.parallel.sharding import model_names
from meshpar.pipeline.check import Costs, simulate
from meshpar.pipeline.runtime import PipelineRuntime
from meshpar.pipeline.schedules import add_communication, asynchronous, build_schedule
from meshpar.train.checks import check_replicas
from meshpar.train.data import BatchLoader, corpus_description, load_tokens
from meshpar.planner.hardware import device_peak_flops
from meshpar.planner.model import from_meshpar
from meshpar.train.metrics import MetricsLog, Progress, format_bytes, peak_memory
from meshpar.train.trace import Tracer
from meshpar.train.faults import Faults
from meshpar.checkpoint import CheckpointReader, latest_checkpoint, open_checkpoint
from meshpar.checkpoint.training import load_parameters, restore_training, save_training
from meshpar.train.plot import plot_losses
from meshpar.train.optim import adamw, clip_and_step, lr_at
from meshpar.train.step import TrainingStep


@dataclass
class TrainResult:
    steps: list[dict]  # one record per optimizer step
    evals: list[dict]  # {"step", "val_loss"}
    summary: dict
    parallel: ParallelModel  # this rank's final model and how to gather it


class Trainer:
    def __init__(self, cfg: Config, mesh: ParallelMesh, device: torch.device):
        self.cfg, self.mesh, self.device = cfg, mesh, device
        tr = cfg.train
        self.model_cfg = cfg.model.resolve()
        # The model is built on the meta device (shapes only) and sliced for this rank;
        # data parallelism then allocates this rank's share (under ZeRO-3 its shard) and
        # fills it with the reference initialization's values, unless a checkpoint is
        # about to overwrite them.
        par = cfg.parallel
        num_stages = par.pp * par.virtual_stages
        self.parallel = parallelize(build_model(self.model_cfg, tr.seed, "meta"), mesh,
                                    par.sequence_parallel, num_stages, par.pp_layers,
                                    par.recompute, par.recompute_every, par.cp_impl, tr.compile)
        self.resume_from = latest_checkpoint(tr.save_dir) if tr.resume and tr.save_dir else None
        loads = self.resume_from is not None or tr.init_from
        materialize = Materialization(device, mesh, None if loads else initialize(self.model_cfg, tr.seed))
        self.model = self.parallel.module
        torch.manual_seed(dropout_seed(tr.seed, mesh))  # dropout's masks
        dp, dp_rank = mesh.size("dp"), mesh.index("dp")
        train_tokens, val_tokens = load_tokens(tr.data)
        self.loader = BatchLoader(train_tokens, tr.seq_len, tr.global_batch_size, dp_rank, dp, tr.seed)
        self.val_tokens = val_tokens
        self.num_microbatches = tr.num_microbatches(dp)
        self.positions = self.parallel.local_positions(tr.seq_len, device)  # None without cp
        # Data parallelism (ZeRO stage 0-3) owns the gradients, the optimizer's view of the
        # parameters and the dp reduction, launched from backward hooks.
        self.data_parallel = ShardedDataParallel(
            self.model, mesh, par.zero, int(par.bucket_mb * 2**20), overlap=par.overlap,
            offload=par.offload, microbatches=self.num_microbatches, grad_sync=self.parallel.sync_grads,
            reducer=GradReducer(mesh, par.grad_compression, par.error_feedback, par.hierarchical_allreduce),
            compute_dtype=PRECISIONS[tr.precision], materialize=materialize)
        self.parallel.data_parallel = self.data_parallel
        self.optimizer = adamw(*self.data_parallel.optimizer_params(), tr)
        self.tokens_per_step = tr.global_batch_size * tr.seq_len
        self.is_logger = mesh.rank == 0
        self.step = 0
        self.pipeline = None
        self.compile_note = ""
        if self.parallel.pipelined:
            if par.schedule == "async":  # one stream over the whole run, cut into steps
                self.schedule = add_communication(asynchronous(par.pp, 1, self.num_microbatches, tr.steps))
            else:
                self.schedule = build_schedule(par.schedule, par.pp, par.virtual_stages, self.num_microbatches)
            if tr.compile and self.schedule.splits_backward:
                allow_split_backward()
                self.compile_note = " (caches off: the zero-bubble split)"
            micro_batch = tr.global_batch_size // dp // self.num_microbatches
            seq_shard = tr.seq_len // mesh.size("cp") // (mesh.size("tp") if par.sequence_parallel else 1)
            self.model.positions = self.positions
            self.pipeline = PipelineRuntime(self.schedule, self.model, mesh, self.parallel.loss_sum,
                                            (micro_batch, seq_shard, self.model_cfg.hidden_size), device,
                                            microbatches_per_step=self.num_microbatches,
                                            split_at_linears=not tr.compile)
            if self.pipeline.weight_grads is not None:
                self.data_parallel.free_after_input_grad = True
                self.data_parallel.deferred = frozenset(self.pipeline.weight_grads.deferrable)
        self.asynchronous = par.schedule == "async" and self.pipeline is not None
        # 16-bit weight copies cast again in backward, not kept, under ZeRO-3 and pipelines.
        recast = recasting(tr.precision, par.zero, par.schedule if self.pipeline else None)
        self.saved_tensor_hooks = saved_tensor_hooks(self.model, recast)
        if recast and tr.compile:  # the hooks cannot see inside a compiled graph
            recast_weight_copies()
        self.compute = functools.partial(autocast, tr.precision, device, cache=not recast)
        self.scaler = None
        if tr.precision == "fp16":
            self.scaler = DynamicLossScaler(LossScaleConfig(
                initial_scale=tr.loss_scale_initial, backoff_factor=tr.loss_scale_backoff,
                growth_interval=tr.loss_scale_growth_interval, hysteresis=tr.loss_scale_hysteresis))
        if self.pipeline:
            self.pipeline.compute_context = self.compute
            self.pipeline.saved_tensor_hooks = self.saved_tensor_hooks
        self.training_step = TrainingStep(
            self.model, mesh, self.data_parallel, self.optimizer, self.parallel.loss_sum,
            lambda x: self.model(x, self.positions), self.compute, self.saved_tensor_hooks, tr.max_grad_norm,
            self._param_names, self.scaler, self.pipeline)
        self.skipped_steps = 0
        self.peak_saved_bytes = 0  # activations held for backward (the pipeline counts its own)
        self.flops_per_token = from_meshpar(self.model_cfg, tr.seq_len).flops_per_token()
        self.peak_flops = device_peak_flops(device)  # None on a CPU: no MFU
        self.faults = Faults(mesh.rank)
        self.started_from = self._load_checkpoint()
        self.first_step = self.step  # of this process: 0 unless resumed

    def _load_checkpoint(self) -> str | None:
        """--resume: the newest complete checkpoint in --save-dir, whole; else --init-from:
        parameters only. Returns what was loaded (None: the seeded initialisation)."""
        tr = self.cfg.train
        if self.resume_from is not None:
            reader = CheckpointReader(self.resume_from)
            reader.verify(self.mesh)
            restore_training(self, reader)
            return f"resumed from {reader.path} (step {self.step})"
        if tr.init_from:
            reader = open_checkpoint(tr.init_from)
            if isinstance(reader, CheckpointReader):  # (a Hugging Face directory has no checksums)
                reader.verify(self.mesh)
            load_parameters(self, reader)
            return f"parameters from {tr.init_from}"
        return None

    def _microbatches(self, loader: BatchLoader) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's rows of the loader's next global batch (and under context parallelism
        its tokens of them), as micro-batches on the device."""
        inputs, targets = loader.next_batch()
        if self.positions is not None:
            inputs, targets = inputs[:, self.positions.cpu()], targets[:, self.positions.cpu()]
        return ([x.to(self.device) for x in inputs.chunk(self.num_microbatches)],
                [y.to(self.device) for y in targets.chunk(self.num_microbatches)])

    def _set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self) -> dict:
        waits_before = dict(self.mesh.ledger.wait_s)
        record = self.train_step_async() if self.asynchronous else self._train_step()
        waits = {axis: t - waits_before.get(axis, 0.0) for axis, t in self.mesh.ledger.wait_s.items()}
        bubble = waits.pop("pp", 0.0)  # waiting on pipeline receives
        record.update(compute_s=max(0.0, record["step_time_s"] - sum(waits.values()) - bubble),
                      comm_s=sum(waits.values()), bubble_s=bubble, memory_bytes=peak_memory(self.device))
        if self.peak_flops:
            record["mfu"] = self.flops_per_token * record["tokens_per_s"] / (self.mesh.world_size * self.peak_flops)
        return record

    def _train_step(self) -> dict:
        start = time.perf_counter()
        lr = self._set_lr(self.step)
        xs, ys = self._microbatches(self.loader)
        wait_before = self.pipeline.recv_wait_s if self.pipeline else 0.0
        scale = self.scaler.scale if self.scaler else None
        # The first step counts the activations saved for backward (one micro-batch's).
        measure = self.step == self.first_step and not self.pipeline
        result = self.training_step(xs, ys, self.tokens_per_step, self.step + 1,
                                    on_saved=self._saved if measure else None)
        if result.skipped:
            self.skipped_steps += 1
        loss_value = result.loss.item()  # synchronises a CUDA device before timing
        step_time = time.perf_counter() - start
        self.step += 1
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens": self.tokens_per_step, "step_time_s": step_time,
                  "tokens_per_s": self.tokens_per_step / step_time}
        if self.pipeline:
            record["pipeline_wait_s"] = self.pipeline.recv_wait_s - wait_before
        if self.scaler:
            record.update(loss_scale=scale, skipped=result.skipped)
        return record

    def _saved(self, nbytes: int) -> None:
        self.peak_saved_bytes = max(self.peak_saved_bytes, nbytes)

    def train_step_async(self) -> dict:
        """PipeDream-2BW: batch t runs on the weights of the start of step t; the update
        at the end of step t applies batch t-1's gradient (complete only now: its last
        backwards ran at the start of this step), with the learning rate of step t-1.
        The last step also applies its own gradient, so a run makes `steps` updates."""
        tr = self.cfg.train
        start = time.perf_counter()
        t = self.step
        last = t == tr.steps - 1
        xs, ys = self._microbatches(self.loader)
        wait_before = self.pipeline.recv_wait_s
        self.pipeline.begin_version(t)
        loss_sum = self.pipeline.run_segment(t, xs, ys, self.tokens_per_step, last)
        comm.all_reduce(self.mesh, "dp", loss_sum, tag="loss")
        comm.all_reduce(self.mesh, "cp", loss_sum, tag="loss")
        comm.all_reduce(self.mesh, "pp", loss_sum, tag="loss")
        grad_norm, lr = None, None
        for batch in ([t - 1] if t >= 1 else []) + ([t] if last else []):
            grad_norm, lr = self._apply_gradient(batch)
        loss_value = loss_sum.item()
        step_time = time.perf_counter() - start
        self.step += 1
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "tokens": self.tokens_per_step, "step_time_s": step_time,
                "tokens_per_s": self.tokens_per_step / step_time,
                "pipeline_wait_s": self.pipeline.recv_wait_s - wait_before}

    def _apply_gradient(self, batch: int) -> tuple[float, float]:
        """One optimizer update from batch `batch`'s gradient (async schedule)."""
        lr = self._set_lr(batch)
        self.data_parallel.zero_grad()
        self.pipeline.finish_version(batch)
        self.data_parallel.finish_reduction()
        return self._clip_and_update(), lr

    def _clip_and_update(self, loss_sum: torch.Tensor | None = None) -> float:
        """Clip by the global norm and step the optimizer (on this rank's shard under ZeRO);
        a loss or gradient that is not finite stops the run on every rank."""
        return clip_and_step(self.data_parallel, self.optimizer, self.mesh, self.cfg.train.max_grad_norm,
                             self.step + 1, self._param_names, loss_sum)

    def _param_names(self) -> dict[int, str]:
        return {id(p): name for name, p in model_names(self.model)}

    def check_consistency(self):
        """Replicated parameters identical on every rank (DivergenceError if not)."""
        check_replicas(self.model, self.mesh, self.step, params_sharded_over_dp=self.cfg.parallel.zero == 3)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the first eval_batches global batches of validation."""
        tr = self.cfg.train
        loader = BatchLoader(self.val_tokens, tr.seq_len, tr.global_batch_size,
                             self.mesh.index("dp"), self.mesh.size("dp"), tr.seed, shuffle=False)
        total_tokens = tr.eval_batches * self.tokens_per_step
        loss_sum = torch.zeros((), device=self.device)
        self.model.eval()
        for _ in range(tr.eval_batches):
            xs, ys = self._microbatches(loader)
            if self.pipeline:
                loss_sum += self.pipeline.forward_only(xs, ys, total_tokens)
            else:
                for x, y in zip(xs, ys):
                    with self.compute():
                        logits = self.model(x, self.positions)
                    loss_sum += self.parallel.loss_sum(logits, y) / total_tokens
        self.model.train()
        comm.all_reduce(self.mesh, "dp", loss_sum, tag="eval")
        comm.all_reduce(self.mesh, "cp", loss_sum, tag="eval")
        comm.all_reduce(self.mesh, "pp", loss_sum, tag="eval")
        return loss_sum.item()

    def _stop_requested(self, started: float) -> str | None:
        """Why the run stops early after this step (the same answer on every rank), or None."""
        tr = self.cfg.train
        if tr.stop_after_step is not None and self.step >= tr.stop_after_step and self.step < tr.steps:
            return f"--stop-after-step {tr.stop_after_step}"
        if tr.stop_after_minutes is not None and self.step < tr.steps:
            late = torch.tensor(float(time.monotonic() - started > 60 * tr.stop_after_minutes), device=self.device)
            comm.all_reduce(self.mesh, "world", late, tag="stop", op="max")  # rank clocks differ
            if late.item():
                return f"--stop-after-minutes {tr.stop_after_minutes:g}"
        return None

    def save_checkpoint(self) -> Path:
        """Collective: this step's checkpoint under --save-dir."""
        return save_training(self, before_publish=lambda: self.faults.at("save", self.step))

    def run(self) -> TrainResult:
        tr = self.cfg.train
        started = time.monotonic()
        log = MetricsLog(tr.metrics_file, self.is_logger, continue_after=self.step if self.started_from else None,
                         tensorboard_dir=tr.tensorboard_dir)
        if self.is_logger and tr.progress:
            print(self.banner(), flush=True)
        if self.is_logger and self.started_from:  # even without progress: a restarted job's log says so
            print(f"meshpar: {self.started_from}", flush=True)
        progress = Progress(tr.steps, tr.progress and self.is_logger, initial=self.step)
        steps, evals = [], []
        stopped = None
        tracer = Tracer(tr.trace_dir, self.mesh.rank, self.device, tr.steps) if tr.trace_dir else None
        try:
            while self.step < tr.steps and not stopped:
                if tracer:
                    tracer.before_step(self.step)
                record = self.train_step()
                if tracer:
                    tracer.after_step(self.step)
                if tr.check_consistency_every and self.step % tr.check_consistency_every == 0:
                    self.check_consistency()
                steps.append(record)
                log.write(record)
                progress.step(record)
                if (tr.eval_every and self.step % tr.eval_every == 0) or self.step == tr.steps:
                    val = {"step": self.step, "val_loss": self.evaluate()}
                    evals.append(val)
                    log.write(val)
                    progress.message(f"step {self.step:>5}  val_loss {val['val_loss']:.4f}")
                stopped = self._stop_requested(started)
                if tr.save_dir and (stopped or self.step == tr.steps
                                    or (tr.save_every and self.step % tr.save_every == 0)):
                    path = self.save_checkpoint()
                    progress.message(f"step {self.step:>5}  checkpoint {path}")
                self.faults.at("step", self.step)
        finally:
            progress.close()
            if tracer:
                tracer.close()
        if not steps:  # resumed at the last step: nothing left to train
            if self.is_logger and tr.progress:
                print(f"meshpar: nothing to train: {self.started_from}, and --steps is {tr.steps}", flush=True)
            log.close()
            return TrainResult(steps, evals, {"summary": True, "steps": 0, "started_from": self.started_from},
                               self.parallel)
        summary = self.summary(steps, evals)
        summary["started_from"] = self.started_from
        if stopped:
            summary["stopped"] = f"after step {self.step} ({stopped}); continue with --resume"
        if self.is_logger and tr.metrics_file:
            summary["loss_curve"] = plot_losses(steps, evals, Path(tr.metrics_file).with_name("loss.png"))
        log.write(summary)
        log.close()
        if self.is_logger and tr.progress:
            print(format_summary(summary), flush=True)
        return TrainResult(steps, evals, summary, self.parallel)

    def banner(self) -> str:
        tr, par = self.cfg.train, self.cfg.parallel
        reducer = self.data_parallel.reducer
        scheme = ("" if par.grad_compression == "none" else f", dp gradients in {par.grad_compression}"
                  + (" without error feedback" if par.grad_compression == "int8" and not par.error_feedback else ""))
        model = f"the model of {tr.init_from}" if tr.init_from else self.cfg.model.name
        return (f"meshpar: {model} ({self.model_cfg.num_params():,} parameters) on "
                f"{self.mesh.world_size} rank(s), {self.mesh.describe()}, ZeRO-{par.zero}"
                + (f" (offload {', '.join(self.data_parallel.offload)})" if self.data_parallel.offload else "")
                + scheme + (", hierarchical all-reduce" if reducer.hierarchical else "")
                + (f", blocks compiled{self.compile_note}" if tr.compile else "")
                + f", {self.device.type}; "
                f"global batch {tr.global_batch_size} x {tr.seq_len} tokens, "
                f"{self.num_microbatches} micro-batch(es) per rank; data: {corpus_description(tr.data)}"
                f"\nplacement: {format_placement(self.placement())}")

    def placement(self) -> dict:
        """Nodes and where each axis lies on them (tp inside a node, pp across nodes)."""
        k = self.mesh.ranks_per_node or self.mesh.world_size
        return {"ranks_per_node": k, "nodes": self.mesh.world_size // k,
                "axes": self.mesh.shape.placement(k)}

    def summary(self, steps: list[dict], evals: list[dict]) -> dict:
        """The final record: ledger per axis and model-state bytes of every rank."""
        ledger = self.mesh.ledger.summary()  # taken before the gather below adds to it
        state = self.data_parallel.state_bytes(self.optimizer)
        activations = self.pipeline.peak_saved_bytes if self.pipeline else self.peak_saved_bytes
        timed = steps[1:] or steps  # the first step pays for warm-up
        wait = (sum(s["pipeline_wait_s"] for s in timed) / sum(s["step_time_s"] for s in timed)
                if self.pipeline else None)
        split = {part: sum(s[part] for s in timed) / len(timed) for part in ("compute_s", "comm_s", "bubble_s")}
        per_rank = comm.all_gather_object(self.mesh, {"state": state, "ledger": ledger, "activations": activations,
                                                      "wait": wait, "time_split": split,
                                                      "peak_memory": peak_memory(self.device)}, tag="summary")
        return {
            "summary": True,
            "steps": len(steps),
            "final_loss": steps[-1]["loss"],
            "val_loss": evals[-1]["val_loss"] if evals else None,
            "tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["step_time_s"] for s in timed),
            "mesh": {axis: self.mesh.size(axis) for axis in ("pp", "dp", "cp", "tp")},
            "num_params": self.model_cfg.num_params(),
            "device": self.device.type,
            "precision": self.cfg.train.precision,
            "zero": self.cfg.parallel.zero,
            "offload": list(self.data_parallel.offload),
            "grad_compression": self.cfg.parallel.grad_compression,
            "error_feedback": self.data_parallel.reducer.error_feedback,
            "hierarchical_allreduce": self.data_parallel.reducer.hierarchical,
            "placement": self.placement(),
            **({"skipped_steps": self.skipped_steps, "final_loss_scale": self.scaler.scale} if self.scaler else {}),
            "comm": ledger,
            "comm_per_rank": [r["ledger"] for r in per_rank],
            "model_state_bytes_per_rank": [r["state"] for r in per_rank],
            "activation_bytes_per_rank": [r["activations"] for r in per_rank],
            # So far in the run: a GPU's peak allocated bytes, a CPU process's peak resident set.
            "peak_memory_bytes_per_rank": [r["peak_memory"] for r in per_rank],
            "time_split_per_rank_s": [r["time_split"] for r in per_rank],  # mean per step: compute, comm, bubble
            **({"trace_dir": self.cfg.train.trace_dir} if self.cfg.train.trace_dir else {}),
            **({"pipeline": self.pipeline_summary(timed, [r["wait"] for r in per_rank])} if self.pipeline else {}),
        }

    def pipeline_summary(self, timed: list[dict], wait_per_rank: list[float]) -> dict:
        """The simulator's bubble beside the executed one (each rank's time waiting on
        receives over its step time) and the live micro-batches, predicted and measured."""
        costs = Costs(forward=1.0, backward_input=1.0, backward_weight=1.0)
        sim = simulate(self.schedule, costs)
        return {
            "schedule": self.schedule.name,
            "stages": self.schedule.num_stages,
            "microbatches": self.schedule.num_microbatches,
            "predicted_bubble_fraction": sim.bubble_fraction,
            "measured_wait_fraction": sum(wait_per_rank) / len(wait_per_rank),  # mean over ranks
            "measured_wait_fraction_per_rank": wait_per_rank,
            "predicted_peak_inflight_microbatches": sim.peak_inflight_microbatches,
            "measured_peak_live_microbatches_rank0": self.pipeline.peak_live_microbatches,
        }


def format_placement(placement: dict) -> str:
    axes = ", ".join(f"{axis} {where}" for axis, where in placement["axes"].items()) or "one rank"
    return f"{placement['nodes']} node(s) x {placement['ranks_per_node']} ranks; {axes}"


def format_summary(summary: dict) -> str:
    lines = ["", "== summary " + "=" * 50,
             f"steps {summary['steps']}   final loss {summary['final_loss']:.4f}   "
             + ("" if summary["val_loss"] is None else f"val loss {summary['val_loss']:.4f}   ")
             + f"tokens/s {summary['tokens_per_s']:,.0f}"]
    for key in ("started_from", "stopped"):
        if summary.get(key):
            lines.append(f"{key.replace('_', ' ')}: {summary[key]}")
    axis_width = max(map(len, summary["comm"]), default=0)
    op_width = max((len(op) for ops in summary["comm"].values() for op in ops), default=0)
    for axis, ops in summary["comm"].items():
        for op, entry in ops.items():
            lines.append(f"comm rank 0  {axis:>{axis_width}} {op:<{op_width}} {entry['calls']:>6} calls  "
                         f"payload {format_bytes(entry['bytes']):>11}  wire {format_bytes(entry['wire_bytes']):>11}")
    if not summary["comm"]:
        lines.append("comm rank 0  none (a single rank)")
    if summary["placement"]["nodes"] > 1:
        inter = sum(e["inter_node_bytes"] for ops in summary["comm"].values() for e in ops.values())
        total = sum(e["wire_bytes"] for ops in summary["comm"].values() for e in ops.values())
        lines.append(f"placement: {format_placement(summary['placement'])}; rank 0 wire bytes inside its node "
                     f"{format_bytes(total - inter)}, across nodes {format_bytes(inter)}")
    if "pipeline" in summary:
        pipe = summary["pipeline"]
        lines.append(f"pipeline {pipe['schedule']}, {pipe['stages']} stages x {pipe['microbatches']} micro-batches: "
                     f"bubble predicted {pipe['predicted_bubble_fraction']:.1%} (unit costs), measured "
                     f"{pipe['measured_wait_fraction']:.1%} (time waiting on receives over step time, mean of "
                     f"{len(pipe['measured_wait_fraction_per_rank'])} ranks, "
                     f"{min(pipe['measured_wait_fraction_per_rank']):.1%}-"
                     f"{max(pipe['measured_wait_fraction_per_rank']):.1%}); peak in-flight micro-batches "
                     f"predicted {pipe['predicted_peak_inflight_microbatches']}, held on rank 0 "
                     f"{pipe['measured_peak_live_microbatches_rank0']}")
    states = summary["model_state_bytes_per_rank"]
    host = states[0]["host"]
    lines.append(f"model state per rank: {format_bytes(states[0]['total'])} "
                 f"(params {format_bytes(states[0]['params'])}, grads {format_bytes(states[0]['grads'])}, "
                 f"optimizer {format_bytes(states[0]['optimizer'])})"
                 + (f" + offloaded to host {format_bytes(host['total'])}" if host["total"] else "")
                 + ("" if all(s == states[0] for s in states) else " on rank 0; differs per rank"))
    split = summary["time_split_per_rank_s"]
    lines.append("time per step, mean over ranks: " + ", ".join(
        f"{part.removesuffix('_s')} {sum(r[part] for r in split) / len(split):.3f} s" for part in split[0])
        + f" (slowest rank's compute {max(r['compute_s'] for r in split):.3f} s)")
    if summary.get("trace_dir"):
        lines.append(f"traces (chrome://tracing, ui.perfetto.dev): {summary['trace_dir']}/rank*.json")
    acts = summary["activation_bytes_per_rank"]
    lines.append(f"activations held for backward, peak per rank: {format_bytes(min(acts))}"
                 + ("" if min(acts) == max(acts) else f" to {format_bytes(max(acts))}"))
    peaks = summary["peak_memory_bytes_per_rank"]
    lines.append(f"peak memory per rank ({'resident set' if summary.get('device') != 'cuda' else 'allocated'}): "
                 f"{format_bytes(min(peaks))} to {format_bytes(max(peaks))}, "
                 f"{format_bytes(sum(peaks))} summed over the ranks (each at its own moment)")
    if summary.get("loss_curve"):
        lines.append(f"loss curve: {summary['loss_curve']}")
    return "\n".join(lines)
