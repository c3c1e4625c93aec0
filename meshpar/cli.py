"""meshpar's command line: `meshpar train ...`."""

from __future__ import annotations

import argparse
import sys

from meshpar.config import Config, ConfigError, check, load_toml
from meshpar.model.config import PRESETS
from meshpar.pipeline.schedules import GENERATORS

def layer_counts(text: str) -> list[int]:
    """'3,3,2' -> [3, 3, 2]."""
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer counts like 3,3,2") from None


def offload_list(text: str) -> list[str]:
    """'optimizer,params' -> ['optimizer', 'params'] (params implies optimizer)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    return sorted(set(items) | ({"optimizer"} if "params" in items else set()))


# flag -> (section, field, type, help)
TRAIN_FLAGS = {
    "--dp": ("parallel", "dp", int, "data-parallel degree"),
    "--tp": ("parallel", "tp", int, "tensor-parallel degree"),
    "--pp": ("parallel", "pp", int, "pipeline-parallel degree"),
    "--cp": ("parallel", "cp", int, "context-parallel degree"),
    "--cp-impl": ("parallel", "cp_impl", str, "context-parallel attention: ring (K/V passed around the cp "
                                              "ranks) or all-to-all (Ulysses; heads divisible by cp) (ring)"),
    "--schedule": ("parallel", "schedule", str, "pipeline schedule: naive, gpipe, 1f1b, interleaved-1f1b, "
                                                 "zb-h1 (default 1f1b)"),
    "--virtual-stages": ("parallel", "virtual_stages", int, "pipeline chunks per rank, for interleaved-1f1b (1)"),
    "--pp-layers": ("parallel", "pp_layers", layer_counts,
                    "layers per pipeline stage, e.g. 3,3,2 (default: balanced by cost)"),
    "--recompute": ("parallel", "recompute", str, "activation recomputation: none, full or selective (none)"),
    "--recompute-every": ("parallel", "recompute_every", int, "with --recompute full: every N-th layer only (1)"),
    "--bucket-mb": ("parallel", "bucket_mb", float, "gradient bucket size in MiB (default 25)"),
    "--zero": ("parallel", "zero", int, "ZeRO stage over dp: 0 replicated, 1 optimizer states sharded, "
                                        "2 and gradients, 3 and parameters (default 0)"),
    "--offload": ("parallel", "offload", offload_list, "keep in host memory: optimizer (states, master "
                                                       "weights and the step), params (ZeRO-3 shards; "
                                                       "implies optimizer); comma-separated"),
    "--grad-compression": ("parallel", "grad_compression", str,
                           "dp gradients on the wire: none (fp32), bf16, fp16, or int8 with a scale per "
                           "1024 elements and error feedback (none)"),
    "--ranks-per-node": ("parallel", "ranks_per_node", int, "ranks per node, for placement and the "
                                                            "hierarchical all-reduce (default: torchrun's "
                                                            "LOCAL_WORLD_SIZE, else all ranks)"),
    "--global-batch-size": ("train", "global_batch_size", int, "sequences per optimizer step (default 32)"),
    "--micro-batch-size": ("train", "micro_batch_size", int,
                           "sequences per forward on one dp rank (default: the whole per-rank batch)"),
    "--seq-len": ("train", "seq_len", int, "tokens per sequence (default 128)"),
    "--steps": ("train", "steps", int, "optimizer steps (default 200)"),
    "--lr": ("train", "lr", float, "peak learning rate (default 3e-3)"),
    "--warmup-steps": ("train", "warmup_steps", int, "linear warmup steps before cosine decay (default 20)"),
    "--lr-scale-from": ("train", "lr_scale_from", int,
                        "scale lr linearly by global-batch-size / this reference batch"),
    "--weight-decay": ("train", "weight_decay", float, "AdamW weight decay (default 0.1)"),
    "--max-grad-norm": ("train", "max_grad_norm", float, "clip the global gradient norm (0: off; default 1.0)"),
    "--seed": ("train", "seed", int, "seed of the weights and the data order (default 0)"),
    "--eval-every": ("train", "eval_every", int, "evaluate every N steps (0: only at the end; default 50)"),
    "--eval-batches": ("train", "eval_batches", int, "global batches per evaluation (default 4)"),
    "--data": ("train", "data", str, "text file, folder of text files, or .bin of uint16 tokens "
                                     "(default: the Python standard library's sources)"),
    "--metrics-file": ("train", "metrics_file", str, "write JSON lines of metrics here"),
    "--tensorboard": ("train", "tensorboard_dir", str, "write the same metrics as TensorBoard scalars under "
                                                       "DIR (train/*, val/loss; needs the tensorboard package)"),
    "--device": ("train", "device", str, "cpu or cuda (default cpu)"),
    "--backend": ("train", "backend", str, "collectives: nccl (one rank per GPU) or gloo (CPUs; with --device "
                                           "cuda, ranks may share a GPU, for tests); default nccl with cuda, "
                                           "gloo on cpu"),
    "--trace": ("train", "trace_dir", str, "write a Chrome/Perfetto trace per rank (DIR/rankN.json) of steps "
                                           "2-4: compute, pipeline actions, sends, receives, collectives"),
    "--comm-timeout": ("train", "comm_timeout", float,
                       "seconds a rank may wait in one collective before it prints where it is stuck "
                       "(mesh coordinates, operation, group, last 20 collectives) and the run exits (300)"),
    "--check-consistency-every": ("train", "check_consistency_every", int,
                                  "every N steps, check that replicated parameters are identical on every "
                                  "rank (by checksum) and name the first that is not (default 0: never)"),
    "--save-dir": ("train", "save_dir", str, "write sharded checkpoints here (DIR/step-N, atomic); one is "
                                            "always written at the end and when stopping early"),
    "--save-every": ("train", "save_every", int, "steps between checkpoints (default 0: only at the end)"),
    "--keep-checkpoints": ("train", "keep_checkpoints", int, "keep the newest K complete checkpoints (3)"),
    "--init-from": ("train", "init_from", str, "start from the parameters of a checkpoint or a Hugging Face "
                                               "Llama directory (its model shape when --model is not given)"),
    "--stop-after-step": ("train", "stop_after_step", int, "save and exit cleanly after step N "
                                                           "(continue later with --resume)"),
    "--stop-after-minutes": ("train", "stop_after_minutes", float,
                             "save and exit cleanly after the first step that ends past M minutes"),
    "--precision": ("train", "precision", str, "fp32, bf16 or fp16 compute; fp32 master weights (fp32)"),
    "--loss-scale-initial": ("train", "loss_scale_initial", float, "fp16: initial loss scale (65536)"),
    "--loss-scale-growth-interval": ("train", "loss_scale_growth_interval", int,
                                     "fp16: clean steps before the scale doubles (1000)"),
    "--loss-scale-backoff": ("train", "loss_scale_backoff", float, "fp16: factor on overflow (0.5)"),
    "--loss-scale-hysteresis": ("train", "loss_scale_hysteresis", int,
                                "fp16: consecutive overflows before the scale shrinks (2)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpar", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a model on one or many ranks",
                                description="Train a model. With a product of degrees above 1 "
                                            "and no torchrun, meshpar starts the local ranks itself.")
    train.add_argument("--model", help=f"model preset: {', '.join(PRESETS)} (default tiny)")
    train.add_argument("--config", help="TOML file with [model], [parallel] and [train] tables; "
                                        "flags override it")
    for flag, (_section, _field, kind, text) in TRAIN_FLAGS.items():
        train.add_argument(flag, type=kind, help=text)
    train.add_argument("--sequence-parallel", action="store_true",
                       help="with --tp: shard norms and the residual stream along the sequence")
    train.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint in --save-dir, in any layout "
                            "(from scratch when there is none, as on a job's first start)")
    train.add_argument("--dry-run", action="store_true",
                       help="build each pipeline stage on the meta device, print per-rank parameters, memory "
                            "estimates and the pipeline schedule, and exit without training (any model size)")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block (the first steps pay for compiling)")
    train.add_argument("--return-freed-memory", action="store_true",
                       help="give host memory freed in a step back to the system at once (glibc): 8%% less "
                            "peak resident memory for a 292M model's rank, 12%% slower steps on CPU")
    train.add_argument("--no-overlap", action="store_true",
                       help="reduce gradients after backward instead of from its hooks (for comparison)")
    train.add_argument("--no-error-feedback", action="store_true",
                       help="with --grad-compression int8: drop each step's quantization error (for comparison)")
    train.add_argument("--hierarchical-allreduce", action="store_true",
                       help="ZeRO-0 all-reduce in three steps: reduce-scatter inside each node, all-reduce "
                            "across nodes, all-gather inside the node")

    sim = commands.add_parser("simulate", help="simulate a pipeline schedule: timeline and bubble",
                              description="Generate, validate and simulate a pipeline schedule; no "
                                          "process group is started.")
    sim.add_argument("--schedule", required=True, help=f"one of {', '.join(GENERATORS)}")
    sim.add_argument("--stages", type=int, required=True, help="pipeline ranks p")
    sim.add_argument("--microbatches", type=int, required=True, help="micro-batches m per step")
    sim.add_argument("--virtual-stages", type=int, default=1, help="chunks per rank v (interleaved-1f1b)")
    sim.add_argument("--costs", default="1,2,1", type=costs_arg,
                     help="F,B,W: forward, full backward, and the weight part of the backward "
                          "(zero-bubble splits B into I = B - W and W); default 1,2,1")
    sim.add_argument("--png", help="draw the timeline into this PNG file")
    sim.add_argument("--json", action="store_true", help="print total_time, bubble_fraction and "
                                                          "peak_inflight_microbatches as JSON")
    sim.add_argument("--actions", action="store_true", help="also print each rank's action list")

    from meshpar.planner.report import add_arguments
    planner = commands.add_parser("plan", help="predict memory and step time of layouts; rank them",
                                  description="Search the layouts of a model on a cluster, predict each "
                                              "one's memory per GPU and step time, and rank them. No "
                                              "process group is started.")
    add_arguments(planner)
    calibrate = commands.add_parser("calibrate", help="measure this machine and write a cluster file",
                                    description="Measure matmul, attention, copy and all-reduce rates with "
                                                "every local rank busy at once, and write a cluster file "
                                                "for `meshpar plan --cluster`.")
    calibrate.add_argument("--ranks", type=int, default=8, help="local ranks, each one 'GPU' (default 8)")
    calibrate.add_argument("--out", default="cluster.json", help="where to write (default cluster.json)")
    plot = commands.add_parser("plot", help="draw loss, learning rate and throughput from a metrics file, "
                                            "or the executed pipeline from traces",
                               description="Draw the curves of a `meshpar train --metrics-file` run, or with "
                                           "--trace the pipeline timeline a `meshpar train --trace` run executed.")
    plot.add_argument("metrics", nargs="?", help="the metrics JSON-lines file")
    plot.add_argument("--trace", help="a `meshpar train --trace` directory: draw its executed pipeline")
    plot.add_argument("--out", required=True, help="PNG file to write")
    from meshpar.checkpoint.commands import add_arguments as checkpoint_arguments
    checkpoint_arguments(commands.add_parser("checkpoint", help="inspect, consolidate or export checkpoints",
                                             description="Checkpoints written by `meshpar train --save-dir`."))
    commands.add_parser("env", help="versions, devices, backends and the detected topology",
                        description="Print what this machine has for meshpar.")
    return parser


def plot_command(args) -> int:
    from meshpar.train.plot import plot_metrics, plot_trace_timeline, read_metrics

    if (args.metrics is None) == (args.trace is None):
        print("meshpar plot: give a metrics file or --trace DIR (one of them)", file=sys.stderr)
        return 2
    try:
        if args.trace:
            print(f"executed pipeline -> {plot_trace_timeline(args.trace, args.out)}")
            return 0
        steps, evals = read_metrics(args.metrics)
    except ValueError as err:
        print(f"meshpar plot: {err}", file=sys.stderr)
        return 2
    print(f"{len(steps)} steps, {len(evals)} evaluations -> {plot_metrics(steps, evals, args.out)}")
    return 0


def costs_arg(text: str):
    from meshpar.pipeline.check import Costs

    try:
        forward, backward, weight = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--costs {text!r}: expected three numbers F,B,W like 1,2,1") from None
    if min(forward, backward, weight) < 0 or weight > backward:
        raise argparse.ArgumentTypeError(f"--costs {text!r}: costs must be non-negative and W at most B")
    return Costs(forward=forward, backward_input=backward - weight, backward_weight=weight)


def simulate_command(args) -> int:
    import json

    from meshpar.pipeline.check import simulate
    from meshpar.pipeline.render import save_png, text_grid
    from meshpar.pipeline.schedules import build_schedule

    problems = [f"--{name}={value} must be at least 1" for name, value in
                (("stages", args.stages), ("microbatches", args.microbatches),
                 ("virtual-stages", args.virtual_stages)) if value < 1]
    if not problems:
        try:
            schedule = build_schedule(args.schedule, args.stages, args.virtual_stages, args.microbatches)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        print("meshpar: the simulation has problems:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    sim = simulate(schedule, args.costs)
    if args.png:
        save_png(sim, f"{schedule.name} p={args.stages} v={args.virtual_stages} m={args.microbatches}", args.png)
    if args.json:
        print(json.dumps({"schedule": schedule.name, "total_time": sim.total_time,
                          "bubble_fraction": sim.bubble_fraction,
                          "peak_inflight_microbatches": sim.peak_inflight_microbatches}))
        return 0
    print(text_grid(sim, show_stage=args.virtual_stages > 1))
    if args.actions:
        for r, line in enumerate(schedule.text()):
            print(f"rank {r}: {line}")
    print(f"\n{schedule.name}: p={args.stages} v={args.virtual_stages} m={args.microbatches}  "
          f"total time {sim.total_time:g}  bubble {sim.bubble_fraction:.1%} (idle over total)  "
          f"peak in-flight micro-batches per rank {sim.peak_inflight_microbatches}"
          + (f"\ntimeline written to {args.png}" if args.png else ""))
    return 0


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_toml(args.config) if args.config else Config()
    if args.model is not None:
        cfg.model.name = args.model
    for flag, (section, field, _kind, _text) in TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            setattr(getattr(cfg, section), field, value)
    if args.sequence_parallel:
        cfg.parallel.sequence_parallel = True
    if args.no_progress:
        cfg.train.progress = False
    if args.resume:
        cfg.train.resume = True
    if args.compile:
        cfg.train.compile = True
    if args.return_freed_memory:
        cfg.train.return_freed_memory = True
    if args.no_overlap:
        cfg.parallel.overlap = False
    if args.no_error_feedback:
        cfg.parallel.error_feedback = False
    if args.hierarchical_allreduce:
        cfg.parallel.hierarchical_allreduce = True
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return simulate_command(args)
    if args.command == "plot":
        return plot_command(args)
    if args.command == "checkpoint":
        from meshpar.checkpoint.commands import checkpoint_command
        return checkpoint_command(args)
    if args.command == "env":
        from meshpar.env import env_command
        return env_command(args)
    if args.command == "calibrate":
        from meshpar.planner.calibrate import calibrate_command
        return calibrate_command(args)
    if args.command == "plan":
        from meshpar.planner.report import plan_command
        return plan_command(args)
    try:
        cfg = check(config_from_args(args), dry_run=args.dry_run)
    except ConfigError as err:
        print("meshpar: the configuration has problems:", file=sys.stderr)
        for problem in err.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if args.dry_run:
        from meshpar.train.dry_run import dry_run
        print(dry_run(cfg))
        return 0
    from meshpar.checkpoint import CheckpointError
    from meshpar.train.launch import launch  # imports the trainer only for a valid config

    import torch.multiprocessing as mp

    try:
        launch(cfg)
    except KeyboardInterrupt:
        print("meshpar: interrupted", file=sys.stderr)
        return 130
    except CheckpointError as err:  # one rank in this process: a corrupt checkpoint found while loading
        print(f"meshpar: {err}", file=sys.stderr)
        return 1
    except mp.ProcessRaisedException as err:  # a local rank raised: its traceback is the message
        print(f"meshpar: rank {err.error_index} failed; the other ranks were stopped.\n{err}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as err:  # a local rank exited (the watchdog, a signal)
        print(f"meshpar: rank {err.error_index} exited with code {err.exit_code} (its report, if any, is "
              f"above); the other ranks were stopped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
