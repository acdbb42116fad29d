"""How far each forward is from its own matmuls: our compiled prior and the official one against
the *skeleton* of our forward (every linear layer as a prepacked oneDNN call of the same shape,
with its own weights, and every ``scaled_dot_product_attention`` call of the same shapes, back
to back, nothing else), all in one process, one call of each in turn per round.

The skeleton is what a forward of these shapes costs on this machine with these kernels if
layer norms, GELU, rotary, residuals, resampling windows and copies cost nothing. Both models
do the same matmul work (parameter counts within 1%, ``vs_official.py``), so official /
skeleton bounds how much faster than the official code any implementation of this prior can
be without faster matmul and attention kernels. (The skeleton's linears carry no GELU or
residual epilogue, and the resampling blocks' small window attention is not in it.)

Run alone on the machine, in the official venv (see ``vs_official.py``; without
``SUNDAE_OFFICIAL_REPO`` the official column is left out):

    SUNDAE_OFFICIAL_REPO=~/sundae-vqgan ~/official-venv/bin/python benchmarks/skeleton.py \\
        --case ffhq256:4 --rounds 20 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from machine import cpu_description
from torch import nn
from vs_official import CONFIGS, _import_ours, _official, _quantile


def skeleton(model: nn.Module, tokens: torch.Tensor):
    """A function running the linears and SDPA calls of ``model(tokens)``, in order, with the
    same shapes and dtype (prepacked weights, fresh random inputs)."""
    linears, attention = [], []
    hooks = [mod.register_forward_hook(
        lambda mod, inp, out: linears.append((inp[0].shape[:-1].numel(), mod.in_features,
                                              mod.out_features, mod.bias is not None)))
        for mod in model.modules() if isinstance(mod, nn.Linear)]
    real = F.scaled_dot_product_attention

    def record(q, k, v, *args, **kwargs):
        attention.append((q.shape, k.shape))
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = record
    try:
        with torch.inference_mode():
            model(tokens)
    finally:
        F.scaled_dot_product_attention = real
        for h in hooks:
            h.remove()
    dtype = next(model.parameters()).dtype
    calls = []
    for m, k, n, bias in linears:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, dtype=dtype) * 0.02, m)
        b = torch.zeros(n, dtype=dtype) if bias else None
        a = torch.randn(m, k, dtype=dtype)
        calls.append(lambda a=a, w=w, b=b: torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], ""))
    for q_shape, k_shape in attention:
        q, k, v = (torch.randn(s, dtype=dtype) for s in (q_shape, k_shape, k_shape))
        calls.append(lambda q=q, k=k, v=v: real(q, k, v))

    def run():
        with torch.inference_mode():
            for call in calls:
                call()
    return run, len(linears), len(attention)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="ffhq256:4", help="config:batch, config one of "
                   + ", ".join(CONFIGS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    config, batch = args.case.split(":")
    if config not in CONFIGS:
        raise SystemExit(f"--case {args.case!r}: config one of {sorted(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()):
        raise SystemExit("this torch has no oneDNN (mkldnn) linear: the skeleton needs it")
    lib = _import_ours()
    _, preset, side = CONFIGS[config]
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = lib.SundaePrior(lib.PriorConfig.preset(preset)).eval().to(dtype)
    tokens = torch.randint(0, model.codebook_size, (int(batch), side, side))
    skel, n_lin, n_att = skeleton(model, tokens)
    net = lib.compile_prior(model)
    sides = {"skeleton": skel}

    def ours():
        with torch.inference_mode():
            net(tokens, None, validate=False)
    sides["ours compiled"] = ours
    if os.environ.get("SUNDAE_OFFICIAL_REPO"):
        sides["official"] = _official(dict(config=config, mode="forward", batch=int(batch),
                                           dtype=args.dtype))[1]
    for run in sides.values():
        run()
        run()
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
    print(f"# {cpu_description()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"{config} forward, batch {batch}, {args.dtype}; skeleton: {n_lin} linears, {n_att} "
          f"attention calls; {args.rounds} rounds, one call per side each")
    print("| side | min s | p25 s | / skeleton (median of rounds) |")
    print("|---|---|---|---|")
    for name in names:
        ts = times[name]
        ratio = statistics.median(t / s for t, s in zip(ts, times["skeleton"], strict=True))
        print(f"| {name} | {min(ts):.4f} | {_quantile(ts, 0.25):.4f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
