"""meshpar's command line: `meshpar train ...`, and the commands around it."""

from __future__ import annotations

import argparse
import sys

from meshpar.config import SECTIONS, Config, ConfigError, all_options, check, load_toml
from meshpar.model.config import PRESETS
from meshpar.options import options_of
from meshpar.pipeline.schedules import GENERATORS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpar", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a model on one or many ranks",
                                description="Train a model. With a product of degrees above 1 "
                                            "and no torchrun, meshpar starts the local ranks itself.")
    train.add_argument("--model", help=f"model preset: {', '.join(PRESETS)} (default tiny); or a transformers "
                                       f"model directory (its config.json: Llama, Qwen2, Qwen3, Mistral)")
    train.add_argument("--config", help="TOML file with a [model] table and one per section below (their "
                                        "keys the fields' names: [zero] stage = 1); flags override it")
    for name, cls in SECTIONS.items():
        group = train.add_argument_group(name, cls.__doc__)
        for opt in options_of(name, cls):
            opt.add_to(group)

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
    calibrate.add_argument("--model", help="also measure this model's forward, backward and optimizer step on "
                                            "every rank at once (a CPU-sized preset): the planner scales its compute "
                                            "model to it")
    calibrate.add_argument("--seq-len", type=int, default=128, help="with --model (default 128)")
    calibrate.add_argument("--micro-batch-size", type=int, default=1, help="with --model (default 1)")
    calibrate.add_argument("--emulated-cluster", metavar="STATE", help="also measure the network of the hosts "
                           "`meshpar cluster up` made (its state file): the ranks are its hosts' ranks, each host "
                           "one shared link")
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
    from meshpar.data.commands import add_prepare_arguments, add_tokenizer_arguments
    add_prepare_arguments(commands.add_parser(
        "prepare-data", help="tokenize a corpus once into token files that `train --data DIR` reads",
        description="Tokenize text files, folders, JSON Lines, Parquet or saved datasets with a tokenizer, in "
                    "worker processes, into DIR: token files, document offsets and a header recording the "
                    "tokenizer, dtype and splits. DIR appears only when complete."))
    add_tokenizer_arguments(commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                                                description="Tokenizers for `prepare-data`."))
    commands.add_parser("env", help="versions, devices, backends and the detected topology",
                        description="Print what this machine has for meshpar.")
    from meshpar.serve.commands import add_arguments as generate_arguments
    generate_arguments(commands.add_parser(
        "generate", help="text from a checkpoint, over tensor- and pipeline-parallel ranks",
        description="Continue prompts with a trained model (greedy, or sampled from a seed: the same tokens in "
                    "any layout), prompts decoded together, the KV cache split over the tp and pp ranks."))
    from meshpar.cluster.commands import add_arguments as cluster_arguments
    cluster_arguments(commands.add_parser(
        "cluster", help="emulate several hosts on this machine: namespaces joined by shaped links",
        description="Hosts as network namespaces, each linked to a shared switch at a set rate (root, ip, tc). "
                    "`run` starts one torchrun per host; `link` cuts or reshapes a host's link mid-run."))
    from meshpar.serve.commands import add_serve_arguments
    add_serve_arguments(commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server over a checkpoint, tensor- and pipeline-parallel",
        description="Serve /v1/completions (streaming too), /v1/models and /health on rank 0; concurrent "
                    "requests are decoded together. SIGTERM or Ctrl-C finishes the running requests and stops."))
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
    for opt in all_options():
        value = getattr(args, opt.keyword)
        if value is not None:
            setattr(getattr(cfg, opt.section), opt.name, value)
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
    if args.command == "generate":
        from meshpar.serve.commands import generate_command
        return generate_command(args)
    if args.command == "cluster":
        from meshpar.cluster.commands import cluster_command
        return cluster_command(args)
    if args.command == "serve":
        from meshpar.serve.commands import serve_command
        return serve_command(args)
    if args.command == "env":
        from meshpar.env import env_command
        return env_command(args)
    if args.command == "calibrate":
        from meshpar.planner.calibrate import calibrate_command
        return calibrate_command(args)
    if args.command in ("prepare-data", "tokenizer"):
        from meshpar.data.commands import prepare_command, tokenizer_command
        return prepare_command(args) if args.command == "prepare-data" else tokenizer_command(args)
    if args.command == "plan":
        from meshpar.planner.report import plan_command
        return plan_command(args)
    try:
        cfg = check(config_from_args(args))
    except ConfigError as err:
        print("meshpar: the configuration has problems:", file=sys.stderr)
        for problem in err.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if cfg.run.dry_run:
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
