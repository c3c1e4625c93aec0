"""Long sequences with context parallelism: the tiny model at sequence length 8192 on
cp = 1, 2, 4 ranks (ring attention; --impl all-to-all for Ulysses). Prints one JSON line
per cp: saved activation bytes per rank for one layer (all of it, and its attention core),
measured with saved_tensors_hooks, and the median time of a forward + backward of one
sequence.

On this 2-core machine, cp = 4 runs four ranks on two cores: its times show the cost of
the extra work and messages, not the speed-up that cp ranks on their own devices give.

    python benchmarks/long_context.py --seq-len 8192 --cps 1,2,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import build_model, model_config
from meshpar.parallel.apply import split_model
from meshpar.train.activations import measure_saved_bytes
from common import run_on_local_ranks


def rank_main(rank: int, args, results):
    cp = args.cp
    mesh = ParallelMesh.build(MeshShape(cp=cp)) if cp > 1 else ParallelMesh.single()
    cfg = model_config("tiny", max_seq_len=args.seq_len)
    parallel = split_model(build_model(cfg, seed=0), mesh, cp_impl=args.impl)
    model = parallel.module
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    positions = parallel.local_positions(args.seq_len)
    if positions is not None:
        x, y = x[:, positions], y[:, positions]

    def step():
        loss = F.cross_entropy(model(x, positions).flatten(0, 1), y.flatten(), reduction="sum") / args.seq_len
        loss.backward()

    saved = measure_saved_bytes(model, model.layers[0], lambda: model(x, positions))
    times = []
    for _ in range(args.steps):
        if cp > 1:
            torch.distributed.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        results.put({"benchmark": "long_context", "seq_len": args.seq_len, "cp": cp, "impl": args.impl,
                     "tokens_per_rank": x.shape[1],
                     "saved_bytes_per_layer_per_rank": saved["total"],
                     "saved_attention_bytes_per_layer_per_rank": saved["attention"],
                     "step_s_median": round(statistics.median(times[1:] or times), 3)})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--cps", default="1,2,4")
    parser.add_argument("--impl", default="ring", choices=["ring", "all-to-all"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    for cp in (int(c) for c in args.cps.split(",")):
        args.cp = cp
        if cp == 1:
            import queue
            results = queue.Queue()
            rank_main(0, args, results)
            print(json.dumps(results.get()), flush=True)
        else:
            for line in run_on_local_ranks(rank_main, cp, args, 1):
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
