"""The training loop, the same for every layout: the single-device reference is the
case where every mesh axis has size 1."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from meshpar import comm
from meshpar.api import Parallelized, parallelize
from meshpar.checkpoint import CheckpointReader, latest_checkpoint, open_checkpoint
from meshpar.checkpoint.training import load_parameters, model_meta, restore_state, save_state
from meshpar.config import API_SECTIONS, Config
from meshpar.mesh import ParallelMesh
from meshpar.hf.directory import num_params
from meshpar.parallel.dropout import dropout_seed
from meshpar.parallel.sharding import model_names
from meshpar.pipeline.check import Costs, simulate
from meshpar.planner.hardware import device_peak_flops
from meshpar.planner.model import from_meshpar
from meshpar.train.checks import check_replicas
from meshpar.data.corpus import corpus_description, load_tokens
from meshpar.data.loader import BatchLoader
from meshpar.train.metrics import MetricsLog, Progress, format_placement, format_summary, peak_memory
from meshpar.train.optim import lr_at
from meshpar.train.plot import plot_losses
from meshpar.train.trace import Tracer


@dataclass
class TrainResult:
    steps: list[dict]  # one record per optimizer step
    evals: list[dict]  # {"step", "val_loss"}
    summary: dict
    parallel: Parallelized  # this rank's final model and how to gather it


class Trainer:
    def __init__(self, cfg: Config, mesh: ParallelMesh, device: torch.device):
        self.cfg, self.mesh, self.device = cfg, mesh, device
        data, run, saves = cfg.data, cfg.run, cfg.checkpoint
        self.model_cfg = cfg.model.resolve()
        dp = mesh.size("dp")
        self.num_microbatches = cfg.microbatches()
        # The model is built on the meta device (shapes only) and goes through the one
        # composition path (meshpar.parallelize) by its plan: sliced for this rank, then
        # data parallelism allocates this rank's share (under ZeRO-3 its shard) and fills it
        # with the reference initialization's values - drawn even when a checkpoint then
        # overwrites them (_load_checkpoint), which costs time, not memory.
        model = cfg.model.build(run.seed)
        self.num_params = num_params(model)
        self.parallel = parallelize(
            model, mesh, cfg.model.plan(model), *(getattr(cfg, name) for name in API_SECTIONS),
            microbatches=self.num_microbatches, steps=run.steps, init=cfg.model.init_rule(), seed=run.seed,
            device=device)
        self.model = self.parallel.module
        self.data_parallel, self.optimizer = self.parallel.data_parallel, self.parallel.optimizer
        self.scaler, self.compute = self.parallel.scaler, self.parallel.compute
        self.resume_from = latest_checkpoint(saves.save_dir) if saves.resume and saves.save_dir else None
        torch.manual_seed(dropout_seed(run.seed, mesh))  # dropout's masks
        train_tokens, val_tokens = load_tokens(data.data)
        self.loader = BatchLoader(train_tokens, data.seq_len, data.global_batch_size, mesh.index("dp"), dp, run.seed)
        self.val_tokens = val_tokens
        self.positions = self.parallel.split.local_positions(data.seq_len, device)  # None without cp
        self.parallel.use_positions(self.positions)
        self.tokens_per_step = data.global_batch_size * data.seq_len
        self.is_logger = mesh.rank == 0
        self.pipeline = None
        self.compile_note = ""
        if self.parallel.split.pipelined:
            micro_batch = data.global_batch_size // dp // self.num_microbatches
            self.pipeline = self.parallel.build_pipeline((micro_batch, data.seq_len // mesh.size("cp")), device)
            self.schedule = self.pipeline.schedule
            if cfg.compile.compile and self.schedule.splits_backward:
                self.compile_note = " (caches off: the zero-bubble split)"
            if self.pipeline.weight_grads is not None and cfg.model.directory() is None:
                # meshpar's blocks read their weights on the input's path only
                self.data_parallel.free_after_input_grad = True
        self.asynchronous = self.parallel.asynchronous
        self.peak_saved_bytes = 0  # activations held for backward (the pipeline counts its own)
        self.flops_per_token = from_meshpar(self.model_cfg, data.seq_len).flops_per_token()
        self.peak_flops = device_peak_flops(device)  # None on a CPU: no MFU
        self.started_from = self._load_checkpoint()
        self.first_step = self.step  # of this process: 0 unless resumed

    @property
    def step(self) -> int:
        """Steps taken (the model's count: a resumed run's starts where it stopped)."""
        return self.parallel.steps_taken

    @step.setter
    def step(self, value: int) -> None:
        self.parallel.steps_taken = value

    @property
    def skipped_steps(self) -> int:
        """fp16: steps whose gradients overflowed, so nothing was updated."""
        return self.parallel.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.parallel.skipped_steps = value

    def _load_checkpoint(self) -> str | None:
        """--resume: the newest complete checkpoint in --save-dir, whole; else --init-from:
        parameters only. Returns what was loaded (None: the seeded initialisation)."""
        cfg = self.cfg
        if self.resume_from is not None:
            reader = CheckpointReader(self.resume_from)
            reader.verify(self.mesh)
            saved, same_layout = restore_state(self.parallel, reader, "start from it with --init-from instead")
            self.loader.load_state_dict(saved["loader"])
            if not same_layout:  # fresh dropout streams, a function of the step
                torch.manual_seed(dropout_seed(cfg.run.seed, self.mesh, self.step))
            return f"resumed from {reader.path} (step {self.step})"
        if cfg.checkpoint.init_from:
            reader = open_checkpoint(cfg.checkpoint.init_from, native=cfg.model.directory() is not None)
            if isinstance(reader, CheckpointReader):  # (a Hugging Face directory has no checksums)
                reader.verify(self.mesh)
            load_parameters(self.parallel, reader)
            return f"parameters from {cfg.checkpoint.init_from}"
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
        lr = lr_at(step, self.cfg)
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
        result = self.parallel.train_step(xs, ys, self.tokens_per_step, on_saved=self._saved if measure else None)
        loss_value = result.loss.item()  # synchronises a CUDA device before timing
        step_time = time.perf_counter() - start
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens": self.tokens_per_step, "step_time_s": step_time,
                  "tokens_per_s": self.tokens_per_step / step_time}
        if self.pipeline:
            record["pipeline_wait_s"] = self.pipeline.recv_wait_s - wait_before
        if self.scaler:
            record.update(loss_scale=scale, skipped=result.skipped)
        if result.experts:
            counts = result.experts["tokens_per_expert"]
            record.update(aux_loss=result.experts["aux_loss"], expert_tokens_min=counts["min"],
                          expert_tokens_mean=counts["mean"], expert_tokens_max=counts["max"])
            if "dropped_tokens" in result.experts:
                record["dropped_tokens"] = result.experts["dropped_tokens"]
        return record

    def _saved(self, nbytes: int) -> None:
        self.peak_saved_bytes = max(self.peak_saved_bytes, nbytes)

    def train_step_async(self) -> dict:
        """A step of the async schedule (TrainingStep.asynchronous); the learning rate
        reported is that of the last batch whose gradient it applied."""
        start = time.perf_counter()
        xs, ys = self._microbatches(self.loader)
        wait_before = self.pipeline.recv_wait_s
        applied = []
        result = self.parallel.train_step(xs, ys, self.tokens_per_step,
                                          set_lr=lambda batch: applied.append(self._set_lr(batch)))
        loss_value = result.loss.item()
        step_time = time.perf_counter() - start
        return {"step": self.step, "loss": loss_value, "lr": applied[-1] if applied else None,
                "grad_norm": result.grad_norm, "tokens": self.tokens_per_step, "step_time_s": step_time,
                "tokens_per_s": self.tokens_per_step / step_time,
                "pipeline_wait_s": self.pipeline.recv_wait_s - wait_before}

    def _param_names(self) -> dict[int, str]:
        return {id(p): name for name, p in model_names(self.model)}

    def check_consistency(self):
        """Replicated parameters identical on every rank (DivergenceError if not). Under
        ZeRO-3 the parameters are gathered first: between steps their storage is released."""
        with self.data_parallel.gathered():
            check_replicas(self.model, self.mesh, self.step)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the first eval_batches global batches of validation."""
        cfg = self.cfg
        loader = BatchLoader(self.val_tokens, cfg.data.seq_len, cfg.data.global_batch_size,
                             self.mesh.index("dp"), self.mesh.size("dp"), cfg.run.seed, shuffle=False)
        total_tokens = cfg.run.eval_batches * self.tokens_per_step
        loss_sum = torch.zeros((), device=self.device)
        self.model.eval()
        for _ in range(cfg.run.eval_batches):
            xs, ys = self._microbatches(loader)
            if self.pipeline:
                loss_sum += self.pipeline.forward_only(xs, ys, total_tokens)
            else:
                for x, y in zip(xs, ys):
                    with self.compute():
                        logits = self.parallel.split.forward(x, self.positions)
                    loss_sum += self.parallel.loss_sum(logits, y) / total_tokens
        self.model.train()
        comm.all_reduce(self.mesh, "dp", loss_sum, tag="eval")
        comm.all_reduce(self.mesh, "cp", loss_sum, tag="eval")
        comm.all_reduce(self.mesh, "pp", loss_sum, tag="eval")
        return loss_sum.item()

    def _stop_requested(self, started: float) -> str | None:
        """Why the run stops early after this step (the same answer on every rank), or None."""
        saves, last = self.cfg.checkpoint, self.step >= self.cfg.run.steps
        if saves.stop_after_step is not None and self.step >= saves.stop_after_step and not last:
            return f"--stop-after-step {saves.stop_after_step}"
        if saves.stop_after_minutes is not None and not last:
            late = torch.tensor(float(time.monotonic() - started > 60 * saves.stop_after_minutes), device=self.device)
            comm.all_reduce(self.mesh, "world", late, tag="stop", op="max")  # rank clocks differ
            if late.item():
                return f"--stop-after-minutes {saves.stop_after_minutes:g}"
        return None

    def save_checkpoint(self) -> Path:
        """Collective: this step's checkpoint under --save-dir."""
        saves = self.cfg.checkpoint
        return save_state(self.parallel, saves.save_dir, saves.keep_checkpoints, model_meta(self.cfg),
                          {"seed": self.cfg.run.seed, "loader": self.loader.state_dict()})

    def run(self) -> TrainResult:
        cfg = self.cfg
        started = time.monotonic()
        log = MetricsLog(cfg.observe.metrics_file, self.is_logger,
                         continue_after=self.step if self.started_from else None,
                         tensorboard_dir=cfg.observe.tensorboard_dir)
        if self.is_logger and cfg.run.progress:
            print(self.banner(), flush=True)
        if self.is_logger and self.started_from:  # even without progress: a restarted job's log says so
            print(f"meshpar: {self.started_from}", flush=True)
        progress = Progress(cfg.run.steps, cfg.run.progress and self.is_logger, initial=self.step)
        steps, evals = [], []
        stopped = None
        traced = cfg.observe.trace_dir
        tracer = Tracer(traced, self.mesh.rank, self.device, cfg.run.steps) if traced else None
        try:
            while self.step < cfg.run.steps and not stopped:
                if tracer:
                    tracer.before_step(self.step)
                record = self.train_step()
                if tracer:
                    tracer.after_step(self.step)
                if cfg.observe.check_consistency_every and self.step % cfg.observe.check_consistency_every == 0:
                    self.check_consistency()
                steps.append(record)
                log.write(record)
                progress.step(record)
                if (cfg.run.eval_every and self.step % cfg.run.eval_every == 0) or self.step == cfg.run.steps:
                    val = {"step": self.step, "val_loss": self.evaluate()}
                    evals.append(val)
                    log.write(val)
                    progress.message(f"step {self.step:>5}  val_loss {val['val_loss']:.4f}")
                stopped = self._stop_requested(started)
                if cfg.checkpoint.save_dir and (stopped or self.step == cfg.run.steps
                                    or (cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0)):
                    path = self.save_checkpoint()
                    progress.message(f"step {self.step:>5}  checkpoint {path}")
        finally:
            progress.close()
            if tracer:
                tracer.close()
        if not steps:  # resumed at the last step: nothing left to train
            if self.is_logger and cfg.run.progress:
                print(f"meshpar: nothing to train: {self.started_from}, and --steps is {cfg.run.steps}", flush=True)
            log.close()
            return TrainResult(steps, evals, {"summary": True, "steps": 0, "started_from": self.started_from},
                               self.parallel)
        summary = self.summary(steps, evals)
        summary["started_from"] = self.started_from
        if stopped:
            summary["stopped"] = f"after step {self.step} ({stopped}); continue with --resume"
        if self.is_logger and cfg.observe.metrics_file:
            summary["loss_curve"] = plot_losses(steps, evals, Path(cfg.observe.metrics_file).with_name("loss.png"))
        log.write(summary)
        log.close()
        if self.is_logger and cfg.run.progress:
            print(format_summary(summary), flush=True)
        return TrainResult(steps, evals, summary, self.parallel)

    def banner(self) -> str:
        cfg = self.cfg
        reducer = self.data_parallel.reducer
        wire = cfg.reduce.grad_compression
        scheme = ("" if wire == "none" else f", dp gradients in {wire}"
                  + (" without error feedback" if wire == "int8" and not cfg.reduce.error_feedback else ""))
        directory = cfg.model.directory()
        model = (f"{directory.family} model {directory.path}" if directory
                 else f"the model of {cfg.checkpoint.init_from}" if cfg.checkpoint.init_from else cfg.model.name)
        return (f"meshpar: {model} ({self.num_params:,} parameters, vocabulary "
                f"{self.model_cfg.vocab_size:,}) on "
                f"{self.mesh.world_size} rank(s), {self.mesh.describe()}, ZeRO-{cfg.zero.stage}"
                + (f" (offload {', '.join(self.data_parallel.offload)})" if self.data_parallel.offload else "")
                + scheme + (", hierarchical all-reduce" if reducer.hierarchical else "")
                + (f", blocks compiled{self.compile_note}" if cfg.compile.compile else "")
                + f", {self.device.type}; "
                f"global batch {cfg.data.global_batch_size} x {cfg.data.seq_len} tokens, "
                f"{self.num_microbatches} micro-batch(es) per rank; data: {corpus_description(cfg.data.data)}"
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
            "num_params": self.num_params,
            "device": self.device.type,
            "precision": self.cfg.precision.precision,
            "zero": self.cfg.zero.stage,
            "offload": list(self.data_parallel.offload),
            "grad_compression": self.cfg.reduce.grad_compression,
            "error_feedback": self.data_parallel.reducer.error_feedback,
            "hierarchical_allreduce": self.data_parallel.reducer.hierarchical,
            "placement": self.placement(),
            **({"skipped_steps": self.skipped_steps, "final_loss_scale": self.scaler.scale} if self.scaler else {}),
            **({"experts": _experts_summary(steps)} if "aux_loss" in steps[-1] else {}),
            "comm": ledger,
            "comm_per_rank": [r["ledger"] for r in per_rank],
            "model_state_bytes_per_rank": [r["state"] for r in per_rank],
            "activation_bytes_per_rank": [r["activations"] for r in per_rank],
            # So far in the run: a GPU's peak allocated bytes, a CPU process's peak resident set.
            "peak_memory_bytes_per_rank": [r["peak_memory"] for r in per_rank],
            "time_split_per_rank_s": [r["time_split"] for r in per_rank],  # mean per step: compute, comm, bubble
            **({"trace_dir": self.cfg.observe.trace_dir} if self.cfg.observe.trace_dir else {}),
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


def _experts_summary(steps: list[dict]) -> dict:
    """A mixture of experts over the run: the last step's load-balancing loss, the tokens
    per expert per step (the lowest, the mean, the highest of any step), the pairs dropped."""
    out = {"final_aux_loss": steps[-1]["aux_loss"],
           "tokens_per_expert": {"min": min(s["expert_tokens_min"] for s in steps),
                                 "mean": sum(s["expert_tokens_mean"] for s in steps) / len(steps),
                                 "max": max(s["expert_tokens_max"] for s in steps)}}
    if "dropped_tokens" in steps[-1]:
        out["dropped_tokens"] = sum(s["dropped_tokens"] for s in steps)
    return out
