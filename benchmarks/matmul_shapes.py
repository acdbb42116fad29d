"""Achieved GFLOP/s of the prior's linear layers, shape by shape, as ``compile_prior`` runs them
(oneDNN with prepacked weights, ``torch.ops.mkldnn._linear_pointwise``) and as eager PyTorch
runs them (``F.linear``).

A prior forward is mostly matmuls, and oneDNN's speed on a CPU depends on the shape far more
than its FLOP count suggests (on the 2-core AMX Xeon of benchmarks/RESULTS.md a ``[1024, 1024] ×
[1024, 1024]`` bf16 matmul ran at half the rate of ``[1024, 1024] × [1024, 1536]``). This lists
the shapes of the ``ffhq256`` prior at batch 4 (``M`` = 1,024 rows at the fine level, 256 in the
valley): projections q (512 wide), k/v (1,024), fused q/k/v (1,536), attention out, the two
feed-forward layers, the logits. Each shape is timed in alternating rounds (the machine's speed
drifts over minutes), and the best call of all rounds is reported.

Run alone on the machine:

    python benchmarks/matmul_shapes.py --threads 2 --rounds 8
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from machine import cpu_description

# (M, K, N): rows, input width, output width — ffhq256, batch 4 (D 1024, I 512, FF 4096)
SHAPES = [
    (1024, 1024, 512), (1024, 1024, 1024), (1024, 1024, 1536), (1024, 512, 1024),
    (1024, 1024, 4096), (1024, 4096, 1024),
    (256, 1024, 512), (256, 1024, 1024), (256, 1024, 1536), (256, 512, 1024),
    (256, 1024, 4096), (256, 4096, 1024),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    packed_ok = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
    cases = []
    for m, k, n in SHAPES:
        x, w, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
        cases.append(((m, k, n), "eager", lambda x=x, w=w, b=b: F.linear(x, w, b)))
        if packed_ok:
            pw = torch.ops.mkldnn._reorder_linear_weight(w, m)
            cases.append(((m, k, n), "packed",
                          lambda x=x, pw=pw, b=b: torch.ops.mkldnn._linear_pointwise(x, pw, b, "none", [], "")))
    best: dict[tuple, float] = {}
    for r in range(args.rounds):
        for shape, kind, fn in (cases if r % 2 else cases[::-1]):
            fn()
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                key = (shape, kind)
                best[key] = min(best.get(key, float("inf")), dt)
    cpu = cpu_description()
    print(f"# {cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads; {args.dtype}; "
          f"best call of {args.rounds} alternating rounds × 5")
    print("| M × K × N | eager GFLOP/s | prepacked GFLOP/s |")
    print("|---|---|---|")
    for m, k, n in SHAPES:
        flops = 2 * m * k * n
        eager = flops / best[((m, k, n), "eager")] / 1e9
        packed = best.get(((m, k, n), "packed"))
        packed_s = f"{flops / packed / 1e9:.0f}" if packed else "n/a"
        print(f"| {m} × {k} × {n} | {eager:.0f} | {packed_s} |")


if __name__ == "__main__":
    main()
