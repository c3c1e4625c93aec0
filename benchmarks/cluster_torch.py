"""PyTorch's own data parallelism on the same model, data and optimizer as `meshpar train`,
for benchmarks/cluster_comm.py: one rank of a torchrun world (the emulated cluster's
`run` starts it on every host). Rank 0 writes a line per step to --metrics-file in
meshpar's format ({"step", "loss", "step_time_s"}).

    meshpar cluster run -- python benchmarks/cluster_torch.py --wrap ddp --steps 8 --metrics-file m.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from meshpar.data.corpus import load_tokens
from meshpar.data.loader import BatchLoader
from meshpar.model import build_model, model_config
from meshpar.parallel.zero import units_of


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wrap", choices=("ddp", "fsdp2"), required=True)
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--metrics-file", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(model_config(args.model), seed=0)
    if args.wrap == "ddp":
        model = DistributedDataParallel(model, bucket_cap_mb=25)  # meshpar's bucket size too
    else:
        mesh = init_device_mesh("cpu", (world,))
        for unit in units_of(model):  # the granularity of meshpar's ZeRO-3 gathers
            fully_shard(unit, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    loader = BatchLoader(load_tokens(None)[0], args.seq_len, args.global_batch_size, rank, world, seed=0)
    out = open(args.metrics_file, "w") if rank == 0 else None
    for step in range(1, args.steps + 1):
        x, y = loader.next_batch()
        start = time.perf_counter()  # rank 0's step, as meshpar times it: the reductions keep ranks in step
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if out:
            out.write(json.dumps({"step": step, "loss": loss.item(), "step_time_s": elapsed}) + "\n")
            out.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
