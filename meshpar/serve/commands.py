"""`meshpar generate` and `meshpar serve`: a checkpoint in any layout it was saved in,
loaded into the layout asked for.

    meshpar generate --checkpoint runs/ck --prompt "Once upon a time" --max-new-tokens 64 --tp 2
    meshpar serve --checkpoint runs/ck --tp 2 --port 8000

The checkpoint is a `--save-dir` (its newest complete checkpoint), one step's directory,
or a transformers model directory. The model is rebuilt from what the checkpoint records -
meshpar's Llama from its shape, a transformers model from its config.json - on the meta
device, split for `--tp` x `--pp` ranks, and each rank reads only its own boxes of the
weights. Text is encoded with the model's tokenizer (a transformers directory's
tokenizer.json, or `--tokenizer`), or as bytes for meshpar's byte-level model; the
tokenizer's end-of-text token ends a continuation.

The command's process is rank 0 - the engine's driver, and the HTTP server's home - and
starts the other ranks itself (under torchrun, each rank is torchrun's). Everything a user
can get wrong is refused before any rank starts (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from meshpar.config import ModelSection
from meshpar.serve.sampling import SamplingRule
from meshpar.serve.text import Codec


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a --save-dir (its newest complete checkpoint), one "
                                                            "step's directory, or a transformers model directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages, one rank each (1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the ranks compute (cpu)")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together at most (8)")
    parser.add_argument("--tokenizer", help="a tokenizer.json (or a folder holding one) for a checkpoint of "
                                            "meshpar's model trained on prepared data (default: bytes)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts", help="a file of prompts, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above: sampled")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose "
                                                                 "probability reaches p (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling's seed: the same tokens in any layout")
    parser.add_argument("--json", action="store_true", help="one JSON line per prompt: text, token ids, timings")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    parser.add_argument("--name", help="the model's name in the API (default: the checkpoint's folder name)")


@dataclass
class ModelJob:
    """What every rank needs to load its part of the model: the checkpoint, the model's
    recipe, the layout, the tokenizer."""

    checkpoint: str
    model: ModelSection  # how to build it: meshpar's Llama of a shape, or a transformers model
    tp: int
    pp: int
    device: str
    batch: int
    tokenizer: str | None  # None: bytes

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def positions(self) -> int:
        return self.model.resolve().max_seq_len

    def codec(self) -> Codec:
        from meshpar.data.tokenizer import load_tokenizer

        return Codec(load_tokenizer(self.tokenizer) if self.tokenizer else None)


def model_job(args, problems: list[str]) -> ModelJob:
    """The model part of a command's job, its problems added to `problems`; ValueError
    when there is no model to check the rest against."""
    import torch

    from meshpar.checkpoint import CheckpointError, open_checkpoint
    from meshpar.checkpoint.hf import is_hf_directory
    from meshpar.config import saved_model
    from meshpar.data.tokenizer import TokenizerError
    from meshpar.parallel.llama_plan import tensor_parallel_problems
    from meshpar.pipeline.split import split_problems

    for flag in ("tp", "pp", "batch"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} {getattr(args, flag)} must be at least 1")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            problems.append("--device cuda, but no CUDA device is visible; use --device cpu")
        elif torch.cuda.device_count() < args.tp * args.pp:
            problems.append(f"--device cuda with {args.tp * args.pp} ranks needs as many GPUs; "
                            f"{torch.cuda.device_count()} visible")
    if not Path(args.checkpoint).exists():
        raise ValueError("\n".join(problems + [f"--checkpoint {args.checkpoint}: no such file or directory"]))
    try:
        if is_hf_directory(args.checkpoint):
            model = ModelSection(str(Path(args.checkpoint)))
        else:
            meta = open_checkpoint(args.checkpoint).meta["model"]
            if meta.get("api"):
                raise CheckpointError(f"{args.checkpoint}: holds a model parallelized through the Python API; "
                                      f"generate from Python with meshpar.serve")
            model = saved_model(meta)
    except CheckpointError as err:
        raise ValueError("\n".join(problems + [str(err)])) from None
    if model.problems():
        raise ValueError("\n".join(problems + model.problems()))
    shape = model.resolve()
    if args.tp >= 1:
        problems += tensor_parallel_problems(shape, args.tp, False, 1)
    if args.pp > 1:
        problems += [p.replace("(pp x virtual stages)", "(--pp)") for p in split_problems(shape, args.pp, None)]
    directory = model.directory()
    spec = args.tokenizer or (str(directory.path) if directory and (directory.path / "tokenizer.json").is_file()
                              else None)
    job = ModelJob(args.checkpoint, model, args.tp, args.pp, args.device, args.batch, spec)
    try:
        vocab = job.codec().vocab_size
    except TokenizerError as err:
        raise ValueError("\n".join(problems + [str(err)])) from None
    if vocab > shape.vocab_size:
        problems.append(f"the tokenizer's {vocab} ids do not fit the model's vocabulary of {shape.vocab_size}")
    return job


@dataclass
class GenerateJob:
    model: ModelJob
    prompts: list[list[int]]
    max_new_tokens: int
    rule: SamplingRule
    as_json: bool = False


def build_job(args) -> GenerateJob:
    """The job, or ValueError naming every problem (the command exits 2)."""
    problems = []
    rule = SamplingRule(args.temperature, args.top_k, args.top_p, args.seed)
    problems += [f"--{p.replace('_', '-')}" for p in rule.problems()]
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    texts = list(args.prompt)
    if args.prompts:
        try:
            texts += [line for line in Path(args.prompts).read_text().splitlines() if line]
        except OSError as err:
            problems.append(f"--prompts {args.prompts}: {err.strerror}")
    if not texts and not problems:
        problems.append("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    job = model_job(args, problems)
    codec = job.codec()
    prompts = [codec.encode(text) for text in texts]
    for text, ids in zip(texts, prompts):
        if not ids:
            problems.append(f"the prompt {text!r} has no tokens")
        elif len(ids) + args.max_new_tokens > job.positions:
            problems.append(f"the prompt {text[:40]!r} ({len(ids)} tokens) and --max-new-tokens "
                            f"{args.max_new_tokens} exceed the model's {job.positions} positions")
    if problems:
        raise ValueError("\n".join(problems))
    return GenerateJob(job, prompts, args.max_new_tokens, rule, args.json)


def start_rank(job: ModelJob):
    """This rank's mesh and its part of the model, built as `meshpar train` builds it, its
    weights read from the checkpoint (each rank its own boxes)."""
    import torch

    import meshpar
    from meshpar.checkpoint import open_checkpoint
    from meshpar.checkpoint.training import load_parameters

    device = torch.device("cpu")
    if job.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.world_size))
    mesh = meshpar.init_mesh(tp=job.tp, pp=job.pp, backend="nccl" if job.device == "cuda" else "gloo")
    model = job.model.build(seed=0)
    parallel = meshpar.parallelize(model, mesh, job.model.plan(model), init=job.model.init_rule(), device=device)
    load_parameters(parallel, open_checkpoint(job.checkpoint, native=job.model.directory() is not None))
    return mesh, parallel.split


def generate_rank(job: GenerateJob) -> list[dict]:
    """Every prompt's continuation (every rank; rank 0 prints them)."""
    from meshpar.serve.generate import generate_batch

    mesh, split = start_rank(job.model)
    try:
        codec = job.model.codec()
        outs = generate_batch(split, job.prompts, job.max_new_tokens, [job.rule] * len(job.prompts), codec.stop,
                              batch=job.model.batch)
        results = [{"text": codec.decode(out.tokens), "tokens": out.tokens, "prompt_tokens": len(prompt),
                    "finish_reason": out.finish_reason, "prefill_s": round(out.prefill_s, 4),
                    "decode_s": round(out.decode_s, 4), "kv_cache_bytes_per_rank": out.kv_cache_bytes}
                   for prompt, out in zip(job.prompts, outs)]
        if mesh.rank == 0:
            for result in results:
                print(json.dumps(result) if job.as_json else result["text"], flush=True)
        return results
    finally:
        mesh.destroy()


def _other_rank(index: int, target, job, world_size: int, port: int) -> None:
    from meshpar.train.launch import local_rank_env

    os.environ.update(local_rank_env(index + 1, world_size, port))
    target(job)


def run_local_world(name: str, target, job, world_size: int) -> int:
    """`target(job)` on `world_size` local ranks: this process is rank 0, the others are
    started here (or torchrun started every rank)."""
    if world_size == 1 or "RANK" in os.environ:
        target(job)
        return 0
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from meshpar.train.launch import free_port, local_rank_env

    port, threads = free_port(), torch.get_num_threads()
    others = mp.start_processes(_other_rank, args=(target, job, world_size, port), nprocs=world_size - 1,
                                join=False, start_method="spawn")
    env = local_rank_env(0, world_size, port)
    os.environ.update(env)
    try:
        target(job)
        while not others.join():
            pass
    except Exception as err:  # noqa: BLE001 - a rank's failure is reported, the others stopped
        for process in others.processes:
            process.terminate()
        print(f"meshpar {name}: a rank failed; the others were stopped.\n{err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        for key in env:
            os.environ.pop(key, None)
    return 0


@dataclass
class ServeJob:
    model: ModelJob
    host: str
    port: int
    name: str


def build_serve_job(args) -> ServeJob:
    """The job, or ValueError naming every problem (the command exits 2)."""
    import socket

    problems = []
    job = model_job(args, problems)
    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((args.host, args.port))
    except OSError as err:
        problems.append(f"--host {args.host} --port {args.port}: cannot listen there ({err.strerror})")
    if problems:
        raise ValueError("\n".join(problems))
    name = args.name or Path(args.checkpoint).resolve().name
    return ServeJob(job, args.host, args.port, name)


def serve_rank(job: ServeJob) -> None:
    """Rank 0 serves HTTP and drives the engine; the others follow it."""
    from meshpar.serve.engine import Engine
    from meshpar.serve.server import serve_http

    mesh, split = start_rank(job.model)
    try:
        with Engine(split, job.model.batch, job.model.positions) as engine:
            if engine.driver:
                layout = f"tp={job.model.tp} x pp={job.model.pp}, {job.model.batch} sequences at once"
                serve_http(engine, job.model.codec(), job.name, job.host, job.port, layout)
            else:
                engine.follow()
    finally:
        mesh.destroy()


def serve_command(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("meshpar serve needs FastAPI and uvicorn: pip install 'meshpar[serve]'", file=sys.stderr)
        return 2
    try:
        job = build_serve_job(args)
    except ValueError as err:
        return _refuse("serve", err)
    return run_local_world("serve", serve_rank, job, job.model.world_size)


def _refuse(name: str, err: ValueError) -> int:
    print(f"meshpar {name}: the request has problems:", file=sys.stderr)
    for problem in str(err).splitlines():
        print(f"  - {problem}", file=sys.stderr)
    return 2


def generate_command(args) -> int:
    try:
        job = build_job(args)
    except ValueError as err:
        return _refuse("generate", err)
    return run_local_world("generate", generate_rank, job, job.model.world_size)
