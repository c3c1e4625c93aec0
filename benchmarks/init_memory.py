"""One rank's share of a model too large for this machine, materialized alone.

For each case, a fresh process builds the model on the meta device, slices it for one
rank of the layout (the rank with the largest share), allocates and fills only that
share with the tile-by-tile reference initialization (meshpar/init.py), and reports its
peak resident memory (the kernel's getrusage) and the time taken, against the bound
1.2 x the share's fp32 bytes + 0.5 GB. Then, past the measured peak, it checks sampled
parameters: each whole parameter initialized as the one-device model initializes it
(one box, the whole tensor) and cut to the rank's box equals what the rank holds.

Before meta construction every rank built the whole model in fp32 first: that figure is
the whole model's bytes, printed beside (arithmetic; neither case fits this machine).

    python benchmarks/init_memory.py                 # llama3-8b at tp8 x pp4, llama3-70b at tp8 x pp8
    python benchmarks/init_memory.py --case llama3-8b:8:4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GB = 1e9
DEFAULT_CASES = ["llama3-8b:8:4", "llama3-70b:8:8"]


def largest_share_rank(cfg, shape) -> tuple[int, int]:
    """(rank, parameters) of the rank holding the most parameters, found on meta."""
    from meshpar.mesh import ParallelMesh
    from meshpar.model import build_model
    from meshpar.parallel.apply import split_model

    shares = []
    for stage in range(shape.pp):
        rank = shape.rank(pp=stage)
        parallel = split_model(build_model(cfg, 0, "meta"), ParallelMesh(shape, rank), num_stages=shape.pp)
        shares.append((sum(p.numel() for p in parallel.module.parameters()), rank))
    held, rank = max(shares)
    return rank, held


def measure(case: str) -> dict:
    """In this process: materialize the case's largest share and check samples."""
    import torch

    from meshpar.checkpoint.regions import box_of
    from meshpar.init import Box, materialize
    from meshpar.mesh import MeshShape, ParallelMesh
    from meshpar.model import build_model, model_config
    from meshpar.model.llama import initialize
    from meshpar.parallel.apply import split_model
    from meshpar.parallel.sharding import model_names

    name, tp, pp = case.split(":")
    cfg = model_config(name)
    shape = MeshShape(tp=int(tp), pp=int(pp))
    rank, held = largest_share_rank(cfg, shape)
    mesh = ParallelMesh(shape, rank)
    start = time.perf_counter()
    parallel = split_model(build_model(cfg, 0, "meta"), mesh, num_stages=shape.pp)
    materialize(parallel.module, mesh, "cpu", initialize(cfg, 0))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = dict(model_names(parallel.module))
    share_bytes = sum(p.numel() * p.element_size() for p in params.values())
    # Sampled parameters, each against the one-device rule applied to the whole tensor.
    fill = initialize(cfg, 0)
    samples = [n for n in params if n.endswith(("attention.wq.weight", "attention.wk.weight", "norm.weight"))][:3]
    for sample in samples:
        param = params[sample]
        box = box_of(param, mesh)
        full = torch.empty(box.full_shape)
        fill(full, Box.whole(box.full_shape), sample)
        inside = tuple(slice(o, o + v) for o, v in zip(box.offsets, box.valid))
        if not torch.equal(param.detach()[tuple(slice(0, v) for v in box.valid)], full[inside]):
            raise AssertionError(f"{sample}: the rank's box differs from the one-device initialization")
        del full
    bound = 1.2 * share_bytes + 0.5 * GB
    return {"model": name, "layout": f"tp{tp} x pp{pp}", "rank": rank, "params_total": cfg.num_params(),
            "params_share": held, "share_fp32_gb": round(share_bytes / GB, 3),
            "peak_rss_gb": round(peak / GB, 3), "bound_gb": round(bound / GB, 3), "within_bound": peak <= bound,
            "seconds": round(seconds, 1), "samples_equal_one_device": samples,
            "full_build_fp32_gb": round(cfg.num_params() * 4 / GB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="MODEL:TP:PP (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    for case in args.case or DEFAULT_CASES:
        out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True)
        if out.returncode:
            print(json.dumps({"case": case, "error": out.stderr.strip().splitlines()[-1:]}))
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(result))
        print(f"  {result['model']} {result['layout']}, rank {result['rank']}: {result['params_share']:,} of "
              f"{result['params_total']:,} parameters ({result['share_fp32_gb']} GB fp32) in "
              f"{result['seconds']} s, peak resident {result['peak_rss_gb']} GB (bound {result['bound_gb']} GB: "
              f"{'within' if result['within_bound'] else 'EXCEEDED'}); building the whole model first, as "
              f"before, needs {result['full_build_fp32_gb']} GB", flush=True)


if __name__ == "__main__":
    main()
