"""`meshpar generate`: text in, text out, from a checkpoint in any layout it was saved in.

    meshpar generate --checkpoint runs/ck --prompt "Once upon a time" --max-new-tokens 64 --tp 2

The checkpoint is a `--save-dir` (its newest complete checkpoint), one step's directory,
or a transformers model directory. The model is rebuilt from what the checkpoint records -
meshpar's Llama from its shape, a transformers model from its config.json - on the meta
device, split for `--tp` ranks, and each rank reads only its own boxes of the weights.
Text is encoded with the model's tokenizer (a transformers directory's tokenizer.json, or
`--tokenizer`), or as bytes for meshpar's byte-level model; the tokenizer's end-of-text
token stops a continuation. `--json` prints one line per prompt: the continuation's
`text` (without the prompt), its token ids and timings.

Everything a user can get wrong is refused before any rank starts (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from meshpar.config import ModelSection
from meshpar.serve.sampling import SamplingRule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a --save-dir (its newest complete checkpoint), one "
                                                            "step's directory, or a transformers model directory")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts", help="a file of prompts, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above: sampled")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose "
                                                                 "probability reaches p (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling's seed: the same tokens in any layout")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (1)")
    parser.add_argument("--tokenizer", help="a tokenizer.json (or a folder holding one) for a checkpoint of "
                                            "meshpar's model trained on prepared data (default: bytes)")
    parser.add_argument("--json", action="store_true", help="one JSON line per prompt: text, token ids, timings")


@dataclass
class GenerateJob:
    """What every rank needs, checked: the checkpoint, the model's recipe, the prompts'
    token ids, the rule."""

    checkpoint: str
    model: ModelSection  # how to build it: meshpar's Llama of a shape, or a transformers model
    prompts: list[list[int]]
    max_new_tokens: int
    rule: SamplingRule
    tp: int
    stop: set[int] = field(default_factory=set)
    tokenizer: str | None = None  # None: bytes
    as_json: bool = False


def _tokenizer_of(args, directory: Path | None):
    """(tokenizer or None for bytes, its spec)."""
    from meshpar.data.tokenizer import load_tokenizer

    spec = args.tokenizer or (str(directory) if directory and (directory / "tokenizer.json").is_file() else None)
    return (load_tokenizer(spec), spec) if spec else (None, None)


def build_job(args) -> GenerateJob:
    """The job, or ValueError naming every problem (the command exits 2)."""
    from meshpar.checkpoint import CheckpointError, open_checkpoint
    from meshpar.checkpoint.hf import is_hf_directory
    from meshpar.config import saved_model
    from meshpar.data.tokenizer import TokenizerError
    from meshpar.parallel.llama_plan import tensor_parallel_problems

    problems = []
    rule = SamplingRule(args.temperature, args.top_k, args.top_p, args.seed)
    problems += [f"--{p.replace('_', '-')}" for p in rule.problems()]
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.tp < 1:
        problems.append(f"--tp {args.tp} must be at least 1")
    texts = list(args.prompt)
    if args.prompts:
        try:
            texts += [line for line in Path(args.prompts).read_text().splitlines() if line]
        except OSError as err:
            problems.append(f"--prompts {args.prompts}: {err.strerror}")
    if not texts and not problems:
        problems.append("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
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
    problems += tensor_parallel_problems(shape, args.tp, False, 1)
    directory = model.directory()
    try:
        tokenizer, spec = _tokenizer_of(args, directory.path if directory else None)
    except TokenizerError as err:
        raise ValueError("\n".join(problems + [str(err)])) from None
    prompts = tokenizer.encode(texts) if tokenizer else [list(text.encode("utf-8")) for text in texts]
    vocab = tokenizer.vocab_size if tokenizer else 256
    if vocab > shape.vocab_size:
        problems.append(f"the tokenizer's {vocab} ids do not fit the model's vocabulary of {shape.vocab_size}")
    for text, ids in zip(texts, prompts):
        if not ids:
            problems.append(f"the prompt {text!r} has no tokens")
        elif len(ids) + args.max_new_tokens > shape.max_seq_len:
            problems.append(f"the prompt {text[:40]!r} ({len(ids)} tokens) and --max-new-tokens "
                            f"{args.max_new_tokens} exceed the model's {shape.max_seq_len} positions")
    if problems:
        raise ValueError("\n".join(problems))
    return GenerateJob(args.checkpoint, model, prompts, args.max_new_tokens, rule, args.tp,
                       {tokenizer.end_of_text_id} if tokenizer else set(), spec, args.json)


def _model(job: GenerateJob, mesh):
    """This rank's part of the model, built as `meshpar train` builds it, its weights read
    from the checkpoint (each rank its own boxes)."""
    import meshpar
    from meshpar.checkpoint import open_checkpoint
    from meshpar.checkpoint.training import load_parameters

    model = job.model.build(seed=0)
    parallel = meshpar.parallelize(model, mesh, job.model.plan(model), init=job.model.init_rule())
    load_parameters(parallel, open_checkpoint(job.checkpoint, native=job.model.directory() is not None))
    return parallel


def run_rank(job: GenerateJob) -> list[dict]:
    """Every prompt's continuation, on this rank (collective over its tp group)."""
    import torch

    import meshpar
    from meshpar.data.tokenizer import load_tokenizer
    from meshpar.serve.generate import generate

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.tp))
    mesh = meshpar.init_mesh(tp=job.tp)
    try:
        parallel = _model(job, mesh)
        tokenizer = load_tokenizer(job.tokenizer) if job.tokenizer else None
        results = []
        for prompt in job.prompts:
            out = generate(parallel.split, prompt, job.max_new_tokens, job.rule, job.stop)
            text = (tokenizer.decode(out.tokens) if tokenizer
                    else bytes(t for t in out.tokens if t < 256).decode("utf-8", errors="replace"))
            results.append({"text": text, "tokens": out.tokens, "prompt_tokens": len(prompt),
                            "prefill_s": round(out.prefill_s, 4), "decode_s": round(out.decode_s, 4),
                            "kv_cache_bytes_per_rank": out.kv_cache_bytes})
        if mesh.rank == 0:
            for result in results:
                print(json.dumps(result) if job.as_json else result["text"], flush=True)
        return results
    finally:
        mesh.destroy()


def _local_rank_main(rank: int, job: GenerateJob, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    run_rank(job)


def generate_command(args) -> int:
    try:
        job = build_job(args)
    except ValueError as err:
        print("meshpar generate: the request has problems:", file=sys.stderr)
        for problem in str(err).splitlines():
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if job.tp == 1 or "RANK" in os.environ:
        run_rank(job)
        return 0
    import torch.multiprocessing as mp

    from meshpar.train.launch import free_port

    try:
        mp.start_processes(_local_rank_main, args=(job, job.tp, free_port()), nprocs=job.tp, join=True,
                           start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        print(f"meshpar generate: a rank failed; the others were stopped.\n{err}", file=sys.stderr)
        return 1
    return 0
