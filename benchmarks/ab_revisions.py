"""A/B of the prior between two git revisions of this repository, in one process.

On a shared or virtual machine the speed of the same call drifts by 2x and more over minutes, so
two runs minutes apart cannot tell a 5% change. This script loads ``sundae_lib`` of both
revisions side by side (``git archive`` into a temporary folder, imported under their own
package names), builds the same prior in each (one set of random weights, copied), and times
them alternately, call by call, in the same process; it prints the fastest call, the 25th
percentile and the median of each, their ratios, and how far the outputs differ: the largest
logit difference for a forward (a speed change should not change the numbers beyond float
rounding), the share of differing tokens for sampling (one rounding difference changes a draw,
and the chain goes its own way from there). The same revision twice is an A/A run: it shows
what this machine's drift alone does to the ratios.

Run from the repository, alone on the machine, e.g.:

    python benchmarks/ab_revisions.py HEAD~1 HEAD --case ffhq256:forward:4 --compile
    python benchmarks/ab_revisions.py 236367a HEAD --case small:sample20:4 --rounds 20 --compile

``--compile`` puts both through ``compile_prior`` (the revision's own; revisions without it run
``torch.compile`` plainly). ``WORKTREE`` as a revision means the files as they are now.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_description

REPO = Path(__file__).resolve().parents[1]
SIDES = {"ffhq256": 16, "ffhq1024": 32, "small": 16, "tiny": 8}


def load_revision(rev: str, root: Path, side: str):
    """``sundae_lib`` of ``rev`` imported as ``ab_<side>.sundae_lib`` (side ``a`` or ``b``, so
    the same revision can stand on both sides); returns the module."""
    name = f"ab_{side}"
    if rev == "WORKTREE":
        shutil.copytree(REPO / "sundae_lib", root / name / "sundae_lib")
    else:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                             capture_output=True, text=True)
        if sha.returncode:
            raise SystemExit(f"{rev!r} is not a revision of {REPO}: {sha.stderr.strip()}")
        (root / name).mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "sundae_lib"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root / name)], input=archive, check=True)
    (root / name / "__init__.py").write_text("")
    return importlib.import_module(f"{name}.sundae_lib")


def build(lib, preset: str, dtype: torch.dtype, compiled: bool, state=None):
    """(the prior to call, the fp32 state dict its weights came from): ``state`` None = fresh
    random weights (seeded by the caller), else these weights."""
    model = lib.SundaePrior(lib.PriorConfig.preset(preset)).eval()
    if state is None:
        state = copy.deepcopy(model.state_dict())
    else:
        model.load_state_dict(state)
    model = model.to(dtype)
    if not compiled:
        return model, state
    if hasattr(lib, "compile_prior"):
        return lib.compile_prior(model), state
    return torch.compile(model), state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev_a")
    p.add_argument("rev_b")
    p.add_argument("--case", default="ffhq256:forward:4",
                   help="preset:mode:batch, mode forward or sample20 (20 steps, early stop off)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rounds", type=int, default=30, help="timed calls of each, alternating")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    preset, mode, batch = args.case.split(":")
    if preset not in SIDES or mode not in ("forward", "sample20"):
        raise SystemExit(f"--case {args.case!r}: preset one of {sorted(SIDES)}, mode forward or "
                         "sample20, then the batch size, e.g. ffhq256:forward:4")
    batch, side, dtype = int(batch), SIDES[preset], getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="ab_revisions_"))
    sys.path.insert(0, str(root))
    try:
        # keyed "A <rev>" / "B <rev>": the same revision may stand on both sides (A/A run)
        revs = {f"A {args.rev_a}": ("a", args.rev_a), f"B {args.rev_b}": ("b", args.rev_b)}
        libs = {key: load_revision(rev, root, side) for key, (side, rev) in revs.items()}
        torch.manual_seed(0)
        state = None
        nets = {}
        for rev, lib in libs.items():
            net, state = build(lib, preset, dtype, args.compile, state)
            nets[rev] = (lib, net)
        key_a, key_b = revs
        tokens = torch.randint(0, nets[key_a][1].config.codebook_size, (batch, side, side))

        def call(rev):
            lib, net = nets[rev]
            with torch.inference_mode():
                if mode == "forward":
                    return net(tokens)
                return lib.sample(net, batch_size=batch, steps=20, temperature=(1.0, 0.7),
                                  update_proportion=1.0, early_stop=False, min_steps=0,
                                  cfg_scale=1.0, labels=None,
                                  generator=torch.Generator().manual_seed(0))

        first, outs = {}, {}
        for rev in nets:
            t0 = time.perf_counter()
            outs[rev] = call(rev).float()
            first[rev] = time.perf_counter() - t0
        a_out, b_out = outs[key_a], outs[key_b]
        diff = ((a_out - b_out).abs().max().item() if mode == "forward"
                else (a_out != b_out).float().mean().item())
        times = {rev: [] for rev in nets}
        for r in range(args.rounds):
            for rev in (list(nets) if r % 2 else list(nets)[::-1]):
                t0 = time.perf_counter()
                call(rev)
                times[rev].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cpu = cpu_description()
    print(f"{args.case} {args.dtype}{' compiled' if args.compile else ''}, {args.rounds} calls "
          f"each, alternating; {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    stats = {}
    for rev, ts in times.items():
        ts = sorted(ts)
        stats[rev] = (ts[0], ts[len(ts) // 4], statistics.median(ts))
        print(f"  {rev:>14}: min {ts[0]:.4f} s  p25 {stats[rev][1]:.4f}  median {stats[rev][2]:.4f}"
              f"  (first call {first[rev]:.1f} s)")
    a, b = stats[key_a], stats[key_b]
    print(f"  time A / time B (> 1: B faster): min {a[0] / b[0]:.3f}x  p25 {a[1] / b[1]:.3f}x  "
          f"median {a[2] / b[2]:.3f}x")
    if mode == "forward":
        print(f"  largest |difference| of the two logits: {diff:.4g}")
    else:  # a last-bit difference in one step changes a draw, and the chain diverges from there
        print(f"  share of tokens that differ (same seed): {diff:.1%}")


if __name__ == "__main__":
    main()
