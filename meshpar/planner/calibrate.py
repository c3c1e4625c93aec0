"""`meshpar calibrate`: measure this machine as the planner sees a cluster - each local
rank a "GPU" - and write a cluster file for `meshpar plan --cluster`.

All ranks measure at once, as they would compute during training, so each rank's rate is
its share of the machine: matmul FLOP/s (the peak, efficiency 1), attention FLOP/s (as a
fraction of it), copy bandwidth, gloo all-reduce bus bandwidth and latency between the
local ranks (the same inside and across "nodes": there is one), and what each operation
costs besides its arithmetic, with the number of operations a forward and backward of
meshpar's Llama block dispatches (small models on many ranks spend most of their compute
time there).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


WIDTHS = (16, 32, 64, 128, 256)


def _rate(fn, work: float, seconds: float = 1.0, repeats: int | None = None) -> float:
    """Work per second of `fn`, run for about `seconds` - or exactly `repeats` times, as a
    collective must be: every rank has to call it equally often."""
    fn()
    dist.barrier()
    start, runs = time.perf_counter(), 0
    while (runs < repeats) if repeats is not None else (time.perf_counter() - start < seconds):
        fn()
        runs += 1
    dist.barrier()
    return work * runs / (time.perf_counter() - start)


def count_ops(step) -> int:
    """Operations autograd dispatches for one call of `step`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))
    with Count():
        step()
    return Count.ops


def negligible_step(layers: int = 2, device: str | torch.device = "cpu"):
    """One forward and backward of meshpar's Llama at width 8 over 8 tokens - arithmetic
    too small to matter - and the operations it dispatches."""
    from meshpar.model import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=16, hidden_size=8, num_layers=layers, num_heads=2, num_kv_heads=1,
                      ffn_hidden_size=16, max_seq_len=8)
    model, tokens = build_model(cfg, seed=0).to(device), torch.zeros(1, 8, dtype=torch.long, device=device)

    def step():
        model(tokens).float().logsumexp(-1).mean().backward()
    return step, count_ops(step)


def operation_counts() -> tuple[int, int]:
    """(per layer, outside the layers) operations of a forward and backward of meshpar's
    Llama block: from models of 1 and 2 layers."""
    one, two = negligible_step(1)[1], negligible_step(2)[1]
    return two - one, one - (two - one)


def _op_overhead(rank_share_seconds: float = 1.0) -> float:
    """Seconds per operation where the arithmetic is negligible: a 2-layer model of width
    8 trained forward and backward, its time over its operations - what every operation
    costs besides its arithmetic (dispatch, autograd's bookkeeping, allocation)."""
    step, ops = negligible_step()
    return 1 / _rate(step, ops, rank_share_seconds)


def _model_rates(name: str, seq_len: int, micro_batch_size: int) -> tuple[float, float]:
    """Seconds of one forward and backward of model `name` on (micro_batch_size, seq_len)
    tokens, and of one AdamW step over its parameters - on one rank, while every rank runs."""
    from meshpar.model import build_model, model_config

    cfg = model_config(name)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch_size, seq_len + 1))

    def forward_backward():
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return 1 / _rate(forward_backward, 1.0, 2.0), 1 / _rate(optimizer.step, 1.0, 1.0)


def _measure(rank: int, ranks: int, port: int, results, model: tuple | None = None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    dist.init_process_group("gloo", rank=rank, world_size=ranks, timeout=timedelta(minutes=5))
    try:
        n = 512
        a, b = torch.randn(n, n), torch.randn(n, n)
        matmul = _rate(lambda: a @ b, 2 * n**3)
        widths = {}
        for w in WIDTHS:  # tensor parallelism narrows the GEMMs
            bw = torch.randn(n, w)
            widths[w] = _rate(lambda: a @ bw, 2 * n * n * w, seconds=0.3)
        q, k, v = (torch.randn(4, 8, 256, 32, requires_grad=True) for _ in range(3))

        def attention():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        attention_rate = _rate(attention, 3.5 * 4 * 4 * 8 * 256 * 256 * 32 / 2)
        x, y = torch.empty(2**22), torch.randn(2**22)
        copy = _rate(lambda: x.copy_(y), 2 * 4 * 2**22)
        big, small = torch.ones(2**22), torch.ones(1)
        bus = _rate(lambda: dist.all_reduce(big), 2 * (ranks - 1) / ranks * big.numel() * 4, repeats=5)
        latency = 1 / _rate(lambda: dist.all_reduce(small), 1.0, repeats=200)
        overhead = _op_overhead()
        layer = _model_rates(*model) if model else (0.0, 0.0)
        gathered = [None] * ranks
        dist.all_gather_object(gathered, (matmul, attention_rate, copy, bus, latency, overhead, widths, layer))
        if rank == 0:
            results.put(gathered)
    finally:
        dist.destroy_process_group()


def calibrate(ranks: int, model: tuple | None = None) -> dict:
    """A cluster file's contents for `ranks` local ranks on this machine; with `model`
    (name, seq_len, micro_batch_size), also that model's compute measured (see
    `with_model_scale`)."""
    from meshpar.train.launch import free_port

    results = mp.get_context("spawn").Queue()
    mp.start_processes(_measure, args=(ranks, free_port(), results, model), nprocs=ranks, start_method="spawn")
    measured = results.get()
    matmul, attention, copy, bus, latency, overhead = (statistics.median(column)
                                                       for column in list(zip(*measured))[:6])
    widths = [(w, statistics.median(r[6][w] for r in measured) / matmul) for w in WIDTHS]
    per_layer, outside = operation_counts()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / ranks
    cluster = {
        "gpu": {"name": f"cpu-rank-of-{ranks}", "peak_tflops": matmul / 1e12, "memory_bytes": memory,
                "intra_node_GBps": bus / 1e9, "inter_node_GBps": bus / 1e9, "memory_GBps": copy / 1e9,
                "host_link_GBps": copy / 1e9, "intra_node_latency_us": latency * 1e6,
                "inter_node_latency_us": latency * 1e6},
        "gpus": ranks, "gpus_per_node": ranks, "oversubscribed": ranks > (os.cpu_count() or 1),
        "efficiency": {"matmul": 1.0, "attention": min(1.0, attention / matmul), "intra_collective": 1.0,
                       "inter_collective": 1.0, "memory": 1.0, "host_adam_params_per_s": copy / 32,
                       "op_overhead_us": overhead * 1e6, "ops_per_layer": per_layer, "ops_outside_layers": outside,
                       "matmul_by_width": widths + [(512, 1.0)]},
        "measured": time.strftime("%Y-%m-%d"),
    }
    if model:
        forward_backward = statistics.median(r[7][0] for r in measured)
        optimizer = statistics.median(r[7][1] for r in measured)
        cluster = with_model_scale(cluster, model, forward_backward, optimizer)
    return cluster


def with_model_scale(cluster: dict, model: tuple, forward_backward_s: float, optimizer_s: float) -> dict:
    """Where the component model (matmuls, attention, element-wise passes, operations'
    overhead) misses the measured compute of a model - ranks sharing cores, caches and
    the allocator - the ratio of the two at one shape, measured (`compute_scale`,
    `optimizer_scale`). The planner multiplies every layout's compute and optimizer time
    by them; how a layout's compute differs from another's still comes from the
    component model."""
    from meshpar.planner.hardware import cluster_from_json
    from meshpar.planner.layout import Layout
    from meshpar.planner.model import PRESETS, with_seq_len
    from meshpar.planner.step_time import step_time

    name, seq_len, micro_batch_size = model
    ranks = cluster["gpus"]
    unscaled = cluster_from_json(cluster)
    one = Layout(dp=ranks, tp=1, pp=1, cp=1, zero=0, schedule="none", virtual_stages=1,
                 micro_batch_size=micro_batch_size, sequence_parallel=False, recompute="none", offload="none")
    predicted = step_time(with_seq_len(PRESETS[name], seq_len), one, unscaled, ranks * micro_batch_size)
    cluster["efficiency"].update(compute_scale=round(forward_backward_s / predicted["compute"], 3),
                                 optimizer_scale=round(optimizer_s / predicted["optimizer"], 3))
    cluster["model_measured"] = {"model": name, "seq_len": seq_len, "micro_batch_size": micro_batch_size,
                                 "forward_backward_s": forward_backward_s, "optimizer_s": optimizer_s,
                                 "predicted_unscaled_s": {k: predicted[k] for k in ("compute", "optimizer")}}
    return cluster


def with_emulated_network(cluster: dict, state_path: str) -> dict:
    """`cluster` (this machine's ranks, measured) as the emulated cluster's hosts: each
    host's ranks share one link of the rate it was made with; the collectives' speed on
    it (the ring formula's bytes over the time, as a fraction of the rate), their bytes on
    the wire per formula byte, and the latency of a small all-reduce measured across the
    hosts by meshpar/cluster/probe.py."""
    import subprocess
    import sys

    from meshpar.cluster import emulated
    from meshpar.planner.network import node_egress
    from meshpar.train.launch import free_port

    state = emulated.load(Path(state_path))
    rate = state.link.bytes_per_s()
    n, k = state.nodes * state.ranks_per_node, state.ranks_per_node
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "network.json"
        probe = Path(__file__).resolve().parent.parent / "cluster" / "probe.py"
        done = subprocess.run([sys.executable, "-m", "meshpar", "cluster", "--state", state_path, "run", "--port",
                               str(free_port()), "--", sys.executable, str(probe), "--out", str(out)],
                              capture_output=True, text=True)
        if done.returncode or not out.exists():
            raise RuntimeError(f"measuring the emulated network failed:\n{done.stderr[-2000:]}")
        network = json.loads(out.read_text())
    ops = network["collectives"]
    factors = {op: round(m["host_bytes"] / node_egress(op, m["payload"], n, k, state.nodes), 3)
               for op, m in ops.items()}
    ring = ops["all_reduce"]
    latency = network["latency_s"]
    efficiency = (node_egress("all_reduce", ring["payload"], n, k, state.nodes) / max(ring["seconds"] - latency, 1e-9)
                  / rate)
    cluster = json.loads(json.dumps(cluster))
    cluster["gpu"].update(inter_node_GBps=rate / k / 1e9, inter_node_latency_us=latency * 1e6,
                          name=f"{cluster['gpu']['name']}-on-{state.nodes}-hosts")
    cluster["efficiency"]["inter_collective"] = round(min(1.0, efficiency), 3)
    cluster.update(gpus=n, gpus_per_node=k, node_link_GBps=rate / 1e9, wire_factors=factors,
                   network={"link": state.link.describe(), "measured": ops, "latency_s": latency})
    return cluster


def calibrate_command(args) -> int:
    if args.ranks < 2:
        print("meshpar calibrate: --ranks must be at least 2 (collectives need a peer)")
        return 2
    if args.emulated_cluster:
        from meshpar.cluster import emulated
        try:
            state = emulated.load(Path(args.emulated_cluster))
            state.link.bytes_per_s()
        except emulated.ClusterError as err:
            print(f"meshpar calibrate: {err}")
            return 2
        if state.nodes * state.ranks_per_node != args.ranks:
            print(f"meshpar calibrate: the emulated cluster has {state.nodes} x {state.ranks_per_node} ranks; "
                  f"give --ranks {state.nodes * state.ranks_per_node}")
            return 2
    model = None
    if args.model:
        from meshpar.model import PRESETS as MODELS
        from meshpar.model.config import LARGE_PRESETS
        if args.model not in MODELS or args.model in LARGE_PRESETS:
            print(f"meshpar calibrate: --model {args.model}: choose one of "
                  f"{', '.join(m for m in MODELS if m not in LARGE_PRESETS)} (built on every rank)")
            return 2
        model = (args.model, args.seq_len, args.micro_batch_size)
    cluster = calibrate(args.ranks, model)
    if args.emulated_cluster:
        cluster = with_emulated_network(cluster, args.emulated_cluster)
    with open(args.out, "w") as f:
        json.dump(cluster, f, indent=1)
    gpu = cluster["gpu"]
    print(f"{args.ranks} local ranks, each: matmul {gpu['peak_tflops'] * 1e3:.1f} GFLOP/s, attention "
          f"{cluster['efficiency']['attention']:.0%} of it, copy {gpu['memory_GBps']:.1f} GB/s; all-reduce bus "
          f"{gpu['intra_node_GBps']:.2f} GB/s, latency {gpu['intra_node_latency_us']:.0f} us -> {args.out}")
    if model:
        measured = cluster["model_measured"]
        print(f"  {args.model} (micro-batch {args.micro_batch_size} x {args.seq_len} tokens): forward and backward "
              f"{measured['forward_backward_s'] * 1e3:.1f} ms per rank, {cluster['efficiency']['compute_scale']:.2f}x "
              f"the component model; AdamW {measured['optimizer_s'] * 1e3:.1f} ms, "
              f"{cluster['efficiency']['optimizer_scale']:.2f}x")
    if args.emulated_cluster:
        print(f"  {cluster['gpus'] // cluster['gpus_per_node']} hosts x {cluster['gpus_per_node']} ranks, each host's "
              f"link {cluster['network']['link']}: collectives reach {cluster['efficiency']['inter_collective']:.0%} "
              f"of it, latency {gpu['inter_node_latency_us']:.0f} us; bytes per ring-formula byte "
              + ", ".join(f"{op} {f:.2f}" for op, f in cluster["wire_factors"].items()))
    return 0
