"""`meshpar train --dry-run`: check a layout without paying for it. In this one process,
whatever the layout's size, build each pipeline stage's model on the meta device (shapes,
no memory), count the parameters a rank there holds, estimate its memory with the
planner, and print the pipeline schedule; start no process group.

Ranks that differ only in dp, cp or tp hold the same number of parameters (tp shards are
even, padding included), so one build per pipeline stage covers every rank.
"""

from __future__ import annotations

from meshpar.config import Config
from meshpar.hf.directory import num_params
from meshpar.mesh import ParallelMesh
from meshpar.parallel.apply import split_model
from meshpar.pipeline.check import Costs, simulate
from meshpar.pipeline.schedules import build_schedule
from meshpar.planner.layout import Layout
from meshpar.planner.memory import (Dtypes, WORKSPACE_BYTES, gradients_follow_activations, head_activation_bytes,
                                    layer_activation_bytes, state_bytes, weight_copy_bytes)
from meshpar.planner.model import from_meshpar
from meshpar.train.metrics import format_bytes


def dry_run(cfg: Config) -> str:
    model_cfg, mesh_cfg, pipe, zero = cfg.model.resolve(), cfg.mesh, cfg.pipeline, cfg.zero.stage
    shape, precision = mesh_cfg.shape, cfg.precision.precision
    m = cfg.microbatches()
    mbs = cfg.data.global_batch_size // mesh_cfg.dp // m
    dtypes = Dtypes.for_precision(precision)
    layout = Layout(mesh_cfg.dp, mesh_cfg.tp, mesh_cfg.pp, mesh_cfg.cp, zero,
                    pipe.schedule if mesh_cfg.pp > 1 else "none", pipe.virtual_stages, mbs,
                    cfg.tensor.sequence_parallel, cfg.recompute.recompute, "optimizer" if cfg.zero.offload else "none",
                    mesh_cfg.ep)
    spec = from_meshpar(model_cfg, cfg.data.seq_len)
    per_layer = layer_activation_bytes(spec, layout, dtypes)
    head, copies = head_activation_bytes(spec, layout, dtypes), weight_copy_bytes(spec, layout, dtypes)
    schedule = build_schedule(pipe.schedule, mesh_cfg.pp, pipe.virtual_stages, m) if mesh_cfg.pp > 1 else None
    inflight = simulate(schedule, Costs(1.0, 1.0, 1.0)).peak_inflight_microbatches if schedule else [1]
    lines = [f"dry run: {cfg.model.name} ({num_params(cfg.model.build(cfg.run.seed)):,} parameters, vocabulary "
             f"{model_cfg.vocab_size:,}), {shape.world_size} ranks "
             f"(pp={mesh_cfg.pp} x dp={mesh_cfg.dp} x cp={mesh_cfg.cp} x tp={mesh_cfg.tp}), ZeRO-{zero}, {precision}, "
             f"{m} micro-batch(es) of {mbs} x {cfg.data.seq_len} tokens per dp rank",
             f"{'stage':>5}  {'ranks':<16} {'layers':>6} {'parameters':>14} {'model state':>12} "
             f"{'activations':>12} {'total':>12}"]
    total_params = 0
    apart = gradients_follow_activations(layout, m)
    for stage in range(mesh_cfg.pp):
        # no process groups: parallelize only slices (each rank its share of the experts under --ep)
        experts = {"ep": mesh_cfg.ep, "edp": mesh_cfg.dp // mesh_cfg.ep} if mesh_cfg.ep > 1 else {}
        mesh = ParallelMesh(shape, shape.rank(pp=stage), sub_sizes=experts)
        model = cfg.model.build(cfg.run.seed)
        parallel = split_model(model, mesh, cfg.model.plan(model), sequence_parallel=cfg.tensor.sequence_parallel,
                               num_stages=mesh_cfg.pp * pipe.virtual_stages, stage_layer_counts=pipe.pp_layers,
                               recompute=cfg.recompute.recompute, recompute_every=cfg.recompute.recompute_every,
                               cp_impl=cfg.context.cp_impl)
        params = sum(p.numel() for p in parallel.module.parameters())
        total_params += params
        counts = parallel.stage_counts or [model_cfg.num_layers]
        layers = sum(counts[s] for s in range(stage, len(counts), mesh_cfg.pp))
        param_bytes, grad_bytes, optimizer_bytes = state_bytes(params, mesh_cfg.dp, zero, bool(cfg.zero.offload),
                                                               dtypes, m)
        state = param_bytes + grad_bytes + optimizer_bytes
        activations = inflight[stage] * layers / pipe.virtual_stages * per_layer + copies
        if stage == mesh_cfg.pp - 1:  # the output layer and the loss
            activations += inflight[stage] * head
        held = state + activations
        if apart:
            held -= min(grad_bytes, activations)
        ranks = [r for r in range(shape.world_size) if shape.coords(r)["pp"] == stage]
        span = f"{ranks[0]}-{ranks[-1]}" if ranks == list(range(ranks[0], ranks[-1] + 1)) else f"{len(ranks)} ranks"
        lines.append(f"{stage:>5}  {span:<16} {layers:>6} {params:>14,} {format_bytes(state):>12} "
                     f"{format_bytes(activations):>12} {format_bytes(held + WORKSPACE_BYTES):>12}")
    lines.append(f"every rank of a stage holds its parameters; over all stages {total_params:,} per tp x cp x dp "
                 f"slice (x{mesh_cfg.tp} tp shards = {total_params * mesh_cfg.tp:,} with replicated norms counted "
                 f"per shard"
                 + ("; the tied embedding counted on the first and the last stage" if model_cfg.tie_embeddings
                    and mesh_cfg.pp > 1 else "") + "). "
                 f"Model state as the trainer keeps it (fp32 parameters, gradients, AdamW moments; ZeRO-{zero}); "
                 f"activations from the planner's per-layer bytes ({format_bytes(per_layer)}) x layers x the "
                 f"schedule's peak in-flight micro-batches, plus the output layer and loss ({format_bytes(head)})"
                 + (f" and autocast's 16-bit weight copies ({format_bytes(copies)})" if copies else "")
                 + (" (one rank, one micro-batch: gradients exist only after the activations are freed, so "
                    "the total holds the larger of the two)" if apart else "")
                 + f"; total adds {format_bytes(WORKSPACE_BYTES)} of workspace.")
    if schedule is not None:
        lines.append(f"\npipeline schedule {schedule.name}, {mesh_cfg.pp} stages x {m} micro-batches "
                     f"(peak in flight per rank {inflight}):")
        lines += [f"  rank {r}: {text}" for r, text in enumerate(schedule.text())]
    return "\n".join(lines)
