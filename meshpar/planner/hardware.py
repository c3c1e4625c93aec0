"""GPUs, clusters and the efficiency constants: what fraction of a peak the planner
assumes each kind of work reaches.

Peaks are datasheet figures (dense bf16 tensor-core FLOP/s, memory, NVLink bandwidth per
GPU and direction, one network adapter per GPU). Efficiencies come from the
microbenchmarks in `data/` (measured on one H100 and one H200 with PyTorch 2.11; see
`data/README.md`) where they exist, and otherwise from first principles; docs/planner.md
lists each with its source. None is fitted to end-to-end training results: those are the
planner's held-out validation.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16
    memory_bytes: float
    intra_node_GBps: float  # NVLink, per GPU and direction
    inter_node_GBps: float  # network, per GPU and direction
    memory_GBps: float  # HBM
    host_link_GBps: float = 25.0  # PCIe to host memory (offload), per direction
    intra_node_latency_us: float = 10.0  # a small all-reduce over NVLink (NCCL, first principles)
    inter_node_latency_us: float = 25.0  # the same across the network


GPUS = {
    "a100-40gb": GPU("a100-40gb", 312, 40e9, 300, 25, 1555),  # NVLink 3, HDR 200 Gb/s
    "a100-80gb": GPU("a100-80gb", 312, 80e9, 300, 25, 2039),
    "h100-80gb": GPU("h100-80gb", 989, 80e9, 450, 50, 3350, 55),  # NVLink 4, NDR 400 Gb/s, PCIe 5
    "h200": GPU("h200", 989, 141e9, 450, 50, 4800, 55),
    "b200": GPU("b200", 2250, 180e9, 900, 100, 8000, 55),  # NVLink 5, 800 Gb/s
}


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of the peak."""

    matmul: float  # bf16 GEMMs of transformer shapes
    attention: float  # flash attention, forward + backward, of the matmul peak
    intra_collective: float  # ring bus bandwidth over NVLink
    inter_collective: float  # ring bus bandwidth over the network
    memory: float  # streaming kernels (optimizer step, norms) of HBM bandwidth
    host_adam_params_per_s: float = 1e9  # CPU AdamW with --offload optimizer, per GPU's share
    # What each operation costs besides its arithmetic (dispatch, autograd, allocation), and
    # how many a forward and backward of meshpar's Llama dispatches per layer and outside
    # the layers - as `meshpar calibrate` measures and counts them; 0: not counted
    op_overhead_us: float = 0.0
    ops_per_layer: int = 0
    ops_outside_layers: int = 0
    # The host launches operations ahead of the device's work (a GPU): their cost shows
    # only where it exceeds the device's time. False (a CPU): it adds to it.
    launched_ahead: bool = False
    # A model's measured compute (forward and backward) and optimizer step over what the
    # component model predicts for it, at one shape (`meshpar calibrate --model`); 1: none
    compute_scale: float = 1.0
    optimizer_scale: float = 1.0
    # matmul efficiency by the narrower of a GEMM's k and n (tensor parallelism narrows
    # them): (width, fraction of peak) pairs, interpolated in log2(width); empty: `matmul`
    matmul_by_width: tuple = ()

    def matmul_fraction(self, width: float) -> float:
        table = sorted(self.matmul_by_width)
        if not table:
            return self.matmul
        if width <= table[0][0]:
            return table[0][1] * width / table[0][0]  # narrower than measured: proportionally slower
        for (w0, f0), (w1, f1) in zip(table, table[1:]):
            if width <= w1:
                x = (math.log2(width) - math.log2(w0)) / (math.log2(w1) - math.log2(w0))
                return f0 + x * (f1 - f0)
        return table[-1][1]


def _from_microbenchmark(path: Path, peak_tflops: float) -> dict:
    data = json.loads(path.read_text())
    gemms = [g["tflops"] for g in data["gemm"] if g["tokens"] >= 8192 and "tp8" not in g["shape"]]
    attention = [a["fwd_bwd_tflops"] for a in data["attention"]]
    by_width = defaultdict(list)
    for g in data["gemm"]:
        if g["tokens"] >= 8192:
            by_width[min(g["k"], g["n"])].append(g["tflops"])
    # each operation's cost where its arithmetic is negligible (measured where the file has it)
    operations = {**data["operations"], "launched_ahead": True} if "operations" in data else {}
    return {**operations, "matmul": round(statistics.median(gemms) / peak_tflops, 3),
            "matmul_by_width": tuple((w, round(statistics.median(v) / peak_tflops, 3))
                                     for w, v in sorted(by_width.items())),
            "attention": round(statistics.median(attention) / peak_tflops, 3),
            "memory": round(data["other"]["copy_GBps_read_plus_write"] / 1e3 / _HBM_TBPS[data["device"]], 3)}


_HBM_TBPS = {"NVIDIA H100 80GB HBM3": 3.35, "NVIDIA H200": 4.8}
# First principles: a ring all-reduce over NVLink reaches about 80% of the link's
# bandwidth as bus bandwidth once messages are large (protocol and synchronisation
# overhead), over InfiniBand/RoCE about 85% of the adapter's line rate.
_COLLECTIVES = {"intra_collective": 0.8, "inter_collective": 0.85}


MEASURED = {"h100-80gb": "h100-microbench-2026-11-26.json", "h200": "h200-microbench-2026-11-26.json"}


def default_efficiency(gpu: GPU) -> Efficiency:
    """From this GPU's microbenchmark file, else the H100's (the nearest measured part)."""
    source = gpu.name if gpu.name in MEASURED else "h100-80gb"
    return Efficiency(**_from_microbenchmark(DATA / MEASURED[source], GPUS[source].peak_tflops), **_COLLECTIVES)


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    gpus: int
    gpus_per_node: int
    efficiency: Efficiency
    # More ranks than cores (a CPU machine): a rank that waits lends its core to the
    # others, and communication runs on the same cores as compute - so the pipeline
    # bubble costs nothing and nothing overlaps.
    oversubscribed: bool = False
    # One network link per node, shared by its ranks (GB/s per direction; the emulated
    # cluster's hosts): collectives across nodes are then timed by the bytes leaving a
    # node (planner/network.py). None: a network adapter per GPU at inter_node_GBps.
    node_link_GBps: float | None = None
    # The backend's bytes on the wire per byte of the ring formula, by collective, as
    # measured (gloo's reduce-scatter is an all-reduce: 2.0); 1.0 where not given
    wire_factors: tuple = ()

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    def wire_factor(self, op: str) -> float:
        return dict(self.wire_factors).get("all_reduce" if op == "hierarchical" else op, 1.0)

    def to_json(self) -> dict:
        return {"gpu": asdict(self.gpu), "gpus_per_node": self.gpus_per_node, "efficiency": asdict(self.efficiency),
                "oversubscribed": self.oversubscribed, "node_link_GBps": self.node_link_GBps,
                "wire_factors": dict(self.wire_factors)}


def load_cluster(path: str | Path, gpus: int | None = None) -> Cluster:
    """A cluster file (as `meshpar calibrate` writes): {"gpu": {...}, "gpus_per_node",
    "efficiency": {...}, optional "gpus", "oversubscribed", "node_link_GBps",
    "wire_factors"}."""
    try:
        return cluster_from_json(json.loads(Path(path).read_text()), gpus)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the cluster file {path}: {err}") from None


def cluster_from_json(raw: dict, gpus: int | None = None) -> Cluster:
    """A cluster file's contents as a Cluster (KeyError or TypeError where they do not fit)."""
    gpu = GPU(**raw["gpu"])  # "measured" and other extra keys are notes
    efficiency = Efficiency(**{**raw["efficiency"],
                               "matmul_by_width": tuple(map(tuple, raw["efficiency"].get("matmul_by_width", ())))})
    return Cluster(gpu, gpus or raw.get("gpus", raw["gpus_per_node"]), raw["gpus_per_node"], efficiency,
                   raw.get("oversubscribed", False), raw.get("node_link_GBps"),
                   tuple(sorted((raw.get("wire_factors") or {}).items())))


def make_cluster(gpu: str, gpus: int, gpus_per_node: int, **overrides) -> Cluster:
    """A preset GPU with any of its fields overridden (None leaves a field as it is)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu}; choose one of {', '.join(GPUS)}")
    chosen = replace(GPUS[gpu], **{k: v for k, v in overrides.items() if v is not None})
    return Cluster(chosen, gpus, gpus_per_node, default_efficiency(chosen))


def device_peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device meshpar knows by name (H100, H200, A100,
    B200); None on a CPU or an unknown GPU."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, gpu in (("H200", "h200"), ("H100", "h100-80gb"), ("A100", "a100-80gb"), ("B200", "b200")):
        if key in name:
            return GPUS[gpu].peak_tflops * 1e12
    return None
