"""The planner's efficiency constants, measured on one GPU: one JSON file for
meshpar/planner/data/ (its README says what each part is and how the planner reads it).

    python benchmarks/gpu_microbench.py --out meshpar/planner/data/h100-microbench-DATE.json

- `gemm`: bf16 products (tokens x k) @ (k x n) of a transformer layer's shapes, and the
  slices a tp=8 layer runs; TFLOP/s = 2 m k n / time.
- `attention`: causal scaled_dot_product_attention, head_dim 128, bf16; forward FLOPs
  4 b heads s^2 d / 2 (causal halves them), forward + backward 3.5 times that.
- `other`: copy bandwidth (bytes read plus written per second), fp32 cross entropy and
  bf16 RMSNorm forward + backward.
- `operations`: what each operation costs where its arithmetic is negligible - meshpar's
  Llama at width 8, forward and backward, its time over the operations it dispatches (on
  a GPU: the host's dispatch and launch, which runs ahead of the kernels) - and how many
  operations a layer and the rest of the model dispatch.

`--quick` measures a few small shapes (a check that the script runs, on any device)."""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from meshpar.planner.calibrate import negligible_step, operation_counts  # noqa: E402


def seconds(fn, device: torch.device, repeats: int = 10) -> float:
    """Median seconds of `fn` over `repeats` runs after one warm-up, the device synchronised
    around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemms(device, dtype, quick: bool) -> list[dict]:
    out = []
    for tokens in ((256,) if quick else (2048, 8192, 32768)):
        for h in ((256,) if quick else (2048, 4096, 8192, 16384)):
            for shape, k, n in (("h->h", h, h), ("h->4h", h, 4 * h), ("4h->h", 4 * h, h),
                                ("h->h/8 (tp8)", h, h // 8), ("h->4h/8 (tp8)", h, h // 2)):
                a = torch.randn(tokens, k, device=device, dtype=dtype)
                b = torch.randn(k, n, device=device, dtype=dtype)
                s = seconds(lambda: a @ b, device)
                out.append({"tokens": tokens, "h": h, "shape": shape, "m": tokens, "k": k, "n": n,
                            "tflops": round(2 * tokens * k * n / s / 1e12, 1)})
                del a, b
    return out


def attention(device, dtype, quick: bool) -> list[dict]:
    out = []
    for seq in ((128,) if quick else (1024, 2048, 4096, 8192, 16384)):
        for heads in ((2,) if quick else (16, 32, 64)):
            batch = max(1, (512 if quick else 16384) // seq)
            q, k, v = (torch.randn(batch, heads, seq, 128, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            flops = 4 * batch * heads * seq * seq * 128 / 2
            forward = seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device)
            both = seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(), device)
            out.append({"seq": seq, "heads": heads, "head_dim": 128, "batch": batch,
                        "fwd_tflops": round(flops / forward / 1e12, 1),
                        "fwd_bwd_tflops": round(3.5 * flops / both / 1e12, 1)})
    return out


def other(device, dtype, quick: bool) -> dict:
    elements = 2**20 if quick else 2**28
    x, y = torch.empty(elements, device=device), torch.randn(elements, device=device)
    copy = seconds(lambda: x.copy_(y), device)
    out = {"copy_GBps_read_plus_write": round(2 * 4 * elements / copy / 1e9)}
    tokens = 256 if quick else 8192
    for vocab in ((1000,) if quick else (32000, 128256)):
        logits = torch.randn(tokens, vocab, device=device, requires_grad=True)
        labels = torch.randint(0, vocab, (tokens,), device=device)
        s = seconds(lambda: F.cross_entropy(logits, labels).backward(), device)
        out[f"cross_entropy_fwd_bwd_{tokens}x{vocab}_ms"] = round(s * 1e3, 2)
    rows, width = (256, 256) if quick else (16384, 4096)
    h = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
    weight = torch.ones(width, device=device, dtype=dtype, requires_grad=True)
    s = seconds(lambda: F.rms_norm(h, (width,), weight).sum().backward(), device)
    out[f"rmsnorm_fwd_bwd_{rows}x{width}_ms"] = round(s * 1e3, 3)
    return out


def operations(device) -> dict:
    """Seconds per operation of a forward and backward whose arithmetic is negligible."""
    step, ops = negligible_step(device=device)

    def twenty_steps():
        for _ in range(20):
            step()
    per_op = seconds(twenty_steps, device) / (20 * ops)
    per_layer, outside = operation_counts()
    return {"op_overhead_us": round(per_op * 1e6, 2), "ops_per_layer": per_layer, "ops_outside_layers": outside}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few small shapes")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "measured": time.strftime("%Y-%m-%d")}
    for part, measure in (("operations", lambda: operations(device)), ("gemm", lambda: gemms(device, dtype, args.quick)),
                          ("attention", lambda: attention(device, dtype, args.quick)),
                          ("other", lambda: other(device, dtype, args.quick))):
        started = time.perf_counter()
        result[part] = measure()
        print(f"{part}: {time.perf_counter() - started:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["operations"]), f"-> {args.out}")


if __name__ == "__main__":
    main()
