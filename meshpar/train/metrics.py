"""What a run reports: JSON lines (and TensorBoard scalars) on rank 0, and a progress bar."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from tqdm import tqdm

from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config


@dataclass
class ObserveOptions(Section):
    """What a run records of itself, and how it watches for ranks that hang or drift apart."""

    metrics_file: str | None = option(None, "write JSON lines of metrics here")
    tensorboard_dir: str | None = option(None, "write the same metrics as TensorBoard scalars under DIR "
                                               "(train/*, val/loss; needs the tensorboard package)",
                                         flag="--tensorboard")
    trace_dir: str | None = option(None, "write a Chrome/Perfetto trace per rank (DIR/rankN.json) of steps 2-4: "
                                         "compute, pipeline actions, sends, receives, collectives", flag="--trace")
    comm_timeout: float = option(300.0, "seconds a rank may wait in one collective before it prints where it is "
                                        "stuck (mesh coordinates, operation, group, last 20 collectives) and the "
                                        "run exits", positive=True)
    check_consistency_every: int = option(0, "every N steps, check that replicated parameters are identical on "
                                             "every rank (by checksum) and name the first that is not (0: never)",
                                          at_least=0)

    def problems(self, cfg: Config) -> list[str]:
        if self.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
            return ["--tensorboard needs the tensorboard package: pip install tensorboard (or "
                    "meshpar[tensorboard]), or use --metrics-file and meshpar plot"]
        return []


# TensorBoard tags of a step record's figures (those present are written).
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                    "tokens_per_s": "train/tokens_per_s", "step_time_s": "train/step_time_s", "mfu": "train/mfu",
                    "memory_bytes": "train/memory_bytes", "loss_scale": "train/loss_scale",
                    "pipeline_wait_s": "train/pipeline_wait_s", "compute_s": "time/compute_s",
                    "comm_s": "time/comm_s", "bubble_s": "time/bubble_s", "val_loss": "val/loss"}


class MetricsLog:
    """Appends one JSON object per line to `path` and, with `tensorboard_dir`, writes the
    records' figures as TensorBoard scalars there (rank 0 only; no-op elsewhere).
    `continue_after`: a resumed run keeps the records of steps up to it and goes on (and
    TensorBoard drops the events of later steps that an earlier run had written)."""

    def __init__(self, path: str | None, enabled: bool, continue_after: int | None = None,
                 tensorboard_dir: str | None = None):
        self.file = None
        self.tensorboard = None
        if tensorboard_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter  # the optional dependency, checked by validate()

            self.tensorboard = SummaryWriter(tensorboard_dir, purge_step=None if continue_after is None
                                             else continue_after + 1)
        if path and enabled:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if continue_after is not None and path.is_file():
                for line in path.read_text().splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:  # the last line of a run killed while writing it
                        continue
                    if not record.get("summary") and record.get("step", 0) <= continue_after:
                        kept.append(line + "\n")
            self.file = open(path, "w")
            self.file.writelines(kept)

    def write(self, record: dict):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard and "step" in record and not record.get("summary"):
            for key, tag in TENSORBOARD_TAGS.items():
                if record.get(key) is not None:  # async: no lr or norm before the first update
                    self.tensorboard.add_scalar(tag, float(record[key]), record["step"])
            self.tensorboard.flush()

    def close(self):
        if self.file:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()


class Progress:
    """tqdm bar with the latest step's figures; silent when disabled."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True) if enabled else None

    def step(self, record: dict):
        if self.bar:
            lr = "-" if record["lr"] is None else f"{record['lr']:.2e}"  # async: no update at step 1
            extra = {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
            mem = {"mem": format_bytes(record["memory_bytes"])} if "memory_bytes" in record else {}
            if "aux_loss" in record:  # a mixture of experts: its balance at a glance
                extra.update(aux=f"{record['aux_loss']:.4f}", experts=f"{record['expert_tokens_min']:.0f}/"
                             f"{record['expert_tokens_mean']:.0f}/{record['expert_tokens_max']:.0f}")
                if "dropped_tokens" in record:
                    extra["dropped"] = record["dropped_tokens"]
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=lr, tok_s=f"{record['tokens_per_s']:,.0f}",
                                 **extra, **mem, refresh=False)
            self.bar.update(1)

    def message(self, text: str):
        if self.bar:
            self.bar.write(text, file=sys.stderr)

    def close(self):
        if self.bar:
            self.bar.close()


def peak_memory(device) -> int:
    """Peak bytes: allocated on a GPU, the process's resident set on a CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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
    if summary.get("experts"):
        counts = summary["experts"]["tokens_per_expert"]
        lines.append(f"experts: load-balancing loss {summary['experts']['final_aux_loss']:.4f} (last step); tokens "
                     f"per expert per step min {counts['min']:.0f}, mean {counts['mean']:.0f}, max {counts['max']:.0f} "
                     f"(each layer's, each token counted per expert chosen)"
                     + (f"; {summary['experts']['dropped_tokens']:,} (token, expert) pairs dropped over the run"
                        if "dropped_tokens" in summary["experts"] else ""))
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
