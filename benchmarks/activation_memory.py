"""Bytes of activations saved for backward per layer: measured beside predicted.

Runs the tiny model at tp = 1, 2, 4, with and without sequence parallelism, on a 4-rank
gloo world, and prints a markdown table (rank 0's layer 0; every rank holds the same
amount). The prediction is meshpar.train.activations.predicted_saved_bytes. bf16: under
autocast, the weight copies cast again in backward (not counted).

    python benchmarks/activation_memory.py [--batch 2 --seq 32 --precision fp32|bf16]
"""

from __future__ import annotations

import argparse


from meshpar.mesh import MeshShape, ParallelMesh
from meshpar.model import model_config
from meshpar.train.activations import REGIONS, measure_layer, predicted_saved_bytes
from common import run_on_local_ranks

LAYOUTS = [(1, False), (2, False), (2, True), (4, False), (4, True)]
RECOMPUTE = [(1, False), (2, True), (4, True)]


def rank_main(rank: int, args, results):
    cfg = model_config("tiny")
    element = 4 if args.precision == "fp32" else 2
    rows = []
    for tp, sp in LAYOUTS:
        mesh = ParallelMesh.build(MeshShape(dp=4 // tp, tp=tp))
        measured = measure_layer(cfg, mesh, args.batch, args.seq, sp, precision=args.precision)
        rows.append((tp, sp, measured, predicted_saved_bytes(cfg, args.batch, args.seq, tp, sp, element)))
    recompute_rows = []
    for tp, sp in RECOMPUTE:
        mesh = ParallelMesh.build(MeshShape(dp=4 // tp, tp=tp))
        for policy in ("none", "selective", "full"):
            measured = measure_layer(cfg, mesh, args.batch, args.seq, sp, recompute=policy, precision=args.precision)
            predicted = predicted_saved_bytes(cfg, args.batch, args.seq, tp, sp, element, recompute=policy)
            recompute_rows.append((tp, sp, policy, measured["total"], predicted["total"]))
    if rank == 0:
        results.put((rows, recompute_rows))


def print_recompute(recompute_rows):
    print("\n| t | SP | recompute | measured bytes/layer | predicted |")
    print("|---|----|---|---|---|")
    for tp, sp, policy, measured, predicted in recompute_rows:
        print(f"| {tp} | {'on' if sp else 'off'} | {policy} | {measured:,} | {predicted:,} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    [(rows, recompute_rows)] = run_on_local_ranks(rank_main, 4, args, 1)
    cfg = model_config("tiny")
    print(f"tiny model (h={cfg.hidden_size}, heads={cfg.num_heads}, kv_heads={cfg.num_kv_heads}, "
          f"ffn={cfg.ffn_hidden_size}), batch {args.batch}, seq {args.seq}, {args.precision}; bytes per layer, "
          f"measured / predicted")
    print("\n| t | SP | " + " | ".join(REGIONS) + " | total | norms vs t=1 |")
    print("|---|----|" + "---|" * (len(REGIONS) + 2))
    single_norm = rows[0][2]["attention_norm"]
    for tp, sp, measured, predicted in rows:
        cells = [f"{measured[r]:,} / {predicted[r]:,}" for r in (*REGIONS, "total")]
        print(f"| {tp} | {'on' if sp else 'off'} | " + " | ".join(cells)
              + f" | {measured['attention_norm'] / single_norm:.3f} |")
    print_recompute(recompute_rows)


if __name__ == "__main__":
    main()

