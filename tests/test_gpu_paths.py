"""The code paths of one-GPU speed (issue 13): torch.compile of each block, collectives
staged through host memory (gloo with CUDA tensors), and - where CUDA is present - the
multi-rank layouts with gloo ranks sharing one GPU, against one rank on it."""

import subprocess
import sys

import pytest
import torch

from reference import fast_config, train_and_report
from test_composition import layout_config
from test_zero import assert_matches


def staged_runs(cases: list[dict], host_staging: bool, device: str = "cpu") -> list[dict]:
    runs = []
    for case in cases:
        cfg = layout_config(**case)
        runs.append(train_and_report(cfg, device=device, host_staging=host_staging))
    return runs


# Every kind of collective: tp all-reduces and sequence all-gathers, pipeline sends and
# receives, the ring's overlapped K/V exchange, ZeRO's async reduce-scatters and gathers.
STAGED_CASES = [dict(dp=1, tp=2, pp=2, cp=1, zero=0, schedule="1f1b"),
                dict(dp=2, tp=1, pp=1, cp=2, zero=3),
                dict(dp=2, tp=2, pp=1, cp=1, zero=2)]


# Slow (30 s): the staging runs on any backend; make test-all runs it.
@pytest.mark.slow
def test_host_staged_collectives_change_nothing(worlds):
    """The collectives run on host copies (a copy even on a CPU, so the copy back is
    exercised): the same losses and parameters, bit for bit."""
    world = worlds(4)
    direct = world.run(staged_runs, STAGED_CASES, False)
    staged = world.run(staged_runs, STAGED_CASES, True)
    for case, a_runs, b_runs in zip(STAGED_CASES, zip(*direct), zip(*staged)):
        for rank, (a, b) in enumerate(zip(a_runs, b_runs)):
            assert a["losses"] == b["losses"], (case, rank)
            for name, value in a["params"].items():
                assert torch.equal(value, b["params"][name]), (case, rank, name)


@pytest.mark.parametrize("recompute", ["none", pytest.param("full", marks=pytest.mark.slow)])  # 8 s each
def test_compiled_blocks_train_like_eager(recompute):
    """--compile on one rank: the same losses and parameters as eager within round-off
    (inductor fuses and reorders fp32 arithmetic), with recomputation too."""
    from torch._dynamo.utils import counters

    eager = train_and_report(fast_config(steps=4))
    torch._dynamo.reset()
    counters.clear()
    cfg = fast_config(steps=4, compile=True)
    cfg.recompute.recompute = recompute
    assert_matches(train_and_report(cfg), eager, f"compiled, recompute {recompute}")
    # All 8 blocks share their graphs (training and evaluation): no compilation per
    # layer, which would hit dynamo's recompile limit and fall back to eager.
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def compiled_and_eager_runs(cases: list[dict]) -> list[tuple[dict, dict]]:
    runs = []
    for case in cases:
        compiled, eager = layout_config(**case), layout_config(**case)
        compiled.compile.compile = True
        runs.append((train_and_report(compiled), train_and_report(eager)))
    return runs


# Slow (80 s: compiling in every rank of each layout); test_compiled_blocks_train_like_eager and the
# zero3-compiled precision case keep compiled blocks in the quick suite.
@pytest.mark.slow
def test_compiled_blocks_in_parallel_layouts_equal_one_device(worlds):
    """Compiled blocks around the collectives of tp and cp (graph breaks), inside pipeline
    stages and under ZeRO-3's gather hooks; every collective still runs and is counted.
    The zero-bubble split runs each compiled piece's backward twice (input gradients
    first, keeping the graph; weight gradients later) with collectives between pieces,
    and so runs the backward's collectives twice where eager blocks, split at the linear
    layers, run them once: 1F1B's bytes.
    Its cases come after 1f1b compiled the same blocks in the same processes, with
    donated buffers: neither dynamo's nor inductor's cache may hand those back to it
    (they did: 8.5e-4 off)."""
    reference = train_and_report(layout_config(1, 1, 1, 1))
    cases = [dict(dp=1, tp=2, pp=2, cp=1, zero=0), dict(dp=2, tp=1, pp=1, cp=2, zero=3),
             dict(dp=1, tp=2, pp=2, cp=1, zero=0, schedule="zb-h1"),
             dict(dp=1, tp=1, pp=2, cp=2, zero=0, schedule="zb-h1")]
    results = worlds(4).run(compiled_and_eager_runs, cases)
    for case, runs in zip(cases, zip(*results)):
        for rank, (compiled, eager) in enumerate(runs):
            assert_matches(compiled, reference, f"compiled {case} rank {rank}")
            if case.get("schedule") != "zb-h1":
                assert compiled["ledger"] == eager["ledger"], f"{case} rank {rank}: the ledger differs when compiled"
                continue
            # Compiled blocks split the backward generically: W walks the graph again and
            # runs its collectives again (tp's input-gradient all-reduces, the ring's K/V
            # and dK/dV passes: twice the backward's); eager ones split at the linear
            # layers and run each once. The first stage (ranks 0 and 1) has no input
            # gradient to send, so there W is the whole backward, run once.
            more = {k: (e.calls, eager["ledger"].get(k)) for k, e in compiled["ledger"].items()
                    if e != eager["ledger"].get(k)}
            assert all(ref is not None and calls > ref.calls for calls, ref in more.values()), (case, rank, more)
            assert bool(more) == (rank >= 2), (case, rank, more)
    # Split at the linear layers, zb-h1 moves exactly 1F1B's bytes (tp2 x pp2, eager): the
    # schedule only reorders the work.
    for rank, rank_runs in enumerate(results):
        assert rank_runs[2][1]["ledger"] == rank_runs[0][1]["ledger"], rank


@pytest.mark.gpu
@pytest.mark.parametrize("case", [dict(dp=1, tp=2, pp=1, cp=1), dict(dp=1, tp=1, pp=2, cp=1)],
                         ids=["tp2", "pp2"])
def test_gloo_ranks_sharing_one_gpu_equal_one_rank(worlds, case):
    """TP=2 and PP=2 as two gloo ranks on the one GPU (NCCL refuses two ranks on one
    device), every collective staged through host memory, against one rank on that GPU."""
    reference = train_and_report(layout_config(1, 1, 1, 1), device="cuda")
    runs = worlds(2).run(staged_runs, [case], True, "cuda")
    for rank, (run,) in enumerate(runs):
        assert_matches(run, reference, f"{case} rank {rank} on cuda")


@pytest.mark.gpu
def test_recast_weight_copies_free_their_memory_on_cuda():
    """On the GPU in bf16: after the forward, the memory held is less by exactly the 16-bit
    copies of the matmul weights (each rounded to the allocator's 512-byte blocks), and
    the gradients are the same bits as with the copies kept."""
    from meshpar.model import build_model, model_config
    from meshpar.model.loss import cross_entropy_sum
    from meshpar.parallel.precision import autocast
    from meshpar.parallel.weight_casts import RecastWeights

    cfg = model_config("small")
    tokens = torch.randint(0, cfg.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0)).cuda()

    def run(recast: bool):
        model = build_model(cfg, seed=0, device="cuda")
        hooks = RecastWeights(model).hooks() if recast else torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with hooks:
            with autocast("bf16", torch.device("cuda"), cache=not recast):
                logits = model(tokens)
            loss = cross_entropy_sum(logits, tokens)
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        return held, {name: p.grad.clone() for name, p in model.named_parameters()}, model

    kept, kept_grads, model = run(recast=False)
    recast, grads, _ = run(recast=True)
    copies = sum(-(-2 * p.numel() // 512) * 512 for name, p in model.named_parameters()
                 if p.ndim == 2 and "embedding" not in name)
    assert kept - recast == copies
    assert all(torch.equal(grads[name], kept_grads[name]) for name in grads)


def run_benchmark(*argv: str) -> dict:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    try:
        import gpu_step
    finally:
        sys.path.pop(0)
    lines = gpu_step.main(list(argv))
    return {line.get("variant", "header" if "benchmark" in line else "ratios"): line for line in lines}


def assert_same_work(result: dict, rel: float):
    """Every variant trained the same model on the same batches: the same losses."""
    losses = {name: torch.tensor(line["losses"]) for name, line in result.items() if "losses" in line}
    first = next(iter(losses.values()))
    for name, values in losses.items():
        torch.testing.assert_close(values, first, rtol=rel, atol=0, msg=lambda m: f"{name}: {m}")


def test_gpu_step_benchmark_runs_on_cpu():
    result = run_benchmark("--device", "cpu", "--variants", "torch-eager,meshpar", "--steps", "2", "--warmup", "1")
    assert result["header"]["device"] == "cpu"
    for name in ("torch-eager", "meshpar"):
        line = result[name]
        assert line["tokens_per_s"] == pytest.approx(line["batch"] * line["seq_len"] / line["step_time_s"], rel=1e-3)
        # The count includes the embedding; both are printed to 3 decimals, which on a
        # loaded CPU can round them alike.
        assert line["tflops"] >= line["tflops_matmul_count"] > 0
        assert line["mfu_vs_989"] is None and line["peak_memory_gib"] is None  # GPU figures only
    assert set(result["ratios"]["tokens_per_s_ratio"]) == {"meshpar/torch-eager"}
    assert_same_work(result, rel=1e-5)


@pytest.mark.slow
def test_gpu_step_benchmark_compiled_variants_on_cpu():
    assert_same_work(run_benchmark("--device", "cpu", "--steps", "2", "--warmup", "2"), rel=1e-4)


@pytest.mark.gpu
def test_gpu_step_benchmark_on_cuda():
    """A small model through all four variants on the GPU: bf16, fused AdamW, compiled."""
    result = run_benchmark("--model", "small", "--batch", "4", "--seq-len", "256", "--steps", "3", "--warmup", "3")
    assert result["meshpar"]["peak_memory_gib"] > 0 and result["meshpar"]["mfu_vs_989"] > 0
    assert_same_work(result, rel=2e-2)  # bf16: the variants round differently


def test_collectives_are_plain_until_dynamo_is_imported_then_graph_breaks():
    """meshpar's import does not import dynamo (about a second of every process's start);
    importing it - as torch.compile does - turns every collective and ring attention into
    a disabled function, which compiled code calls as written."""
    probe = """
import sys
import meshpar, meshpar.cli, meshpar.train.trainer
from meshpar import comm
from meshpar.parallel import context
marked = [comm.all_reduce, comm.batch_send_recv, context._ring_attention]
print('torch._dynamo' in sys.modules, [getattr(f, '_torchdynamo_disable', False) for f in marked])
import torch._dynamo
marked = [comm.all_reduce, comm.batch_send_recv, context._ring_attention]
print([getattr(f, '_torchdynamo_disable', False) for f in marked])
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["False [False, False, False]", "[True, True, True]"], out.stderr[-2000:]
