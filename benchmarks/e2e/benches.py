"""The measured sections of ``benchmarks/run.py``: prior forward, hourglass vs flat, the sampler
(overhead, CFG, host syncs, early stop) and VQ-GAN decode. Each ``bench_*`` appends its rows to
the results dict ``res``."""

from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from comfyui_sundae.sundae_lib import VQGAN, PriorConfig, VQGANConfig, sample
from torch.utils._python_dispatch import TorchDispatchMode

from .measure import (
    CODEC_FOR,
    Env,
    autocast_ctx,
    build_prior,
    compiled,
    count_flops,
    log,
    model_in,
    sdpa_kernels,
)

# ------------------------------------------------------------------------------------------
# prior forward
# ------------------------------------------------------------------------------------------


def bench_forward(env: Env, args, peaks: dict, res: dict) -> None:
    rows, agree = res.setdefault("forward", []), res.setdefault("agreement", [])
    for name in args.presets:
        log(f"forward: building {name}")
        model = build_prior(env, name)
        cfg = model.config
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.codebook_size, (max(args.batches), *cfg.grid), generator=gen)
        tokens = tokens.to(env.device)
        with torch.inference_mode():
            flops1, _ = count_flops(lambda m=model, x=tokens[:1]: m(x))
        res.setdefault("flops", {})[name] = flops1
        res.setdefault("params", {})[name] = model.num_parameters()
        argmax: dict = {}
        diag: dict = {}  # fp32 median top-1/top-2 logit gap; median |bf16 - fp32| logit
        ref = None
        for precision in args.precisions:
            m_eager = model_in(model, precision)
            variants = [("eager", m_eager)]
            if args.compile and name in args.compile and precision == args.main_precision:
                variants.append(("compiled", compiled(m_eager, args.compile_mode)))
            rate = None  # measured GFLOP/s at the smallest batch, to size the larger ones
            for label, m in variants:
                for b in sorted(args.batches):
                    x = tokens[:b]
                    est = flops1 * b / ((rate or 0.4 * peaks["best"]["fp32" if precision == "fp32"
                                                                        else "bf16"]) * 1e9)
                    why = skip_forward(env, args, name, b, precision,
                                       0.0 if b == min(args.batches) else est)
                    if why:
                        res["skipped"].append(f"forward {name} b{b} {precision} {label}: {why}")
                        continue

                    def fn(m=m, x=x, precision=precision):  # as the sampler calls it
                        with torch.inference_mode(), autocast_ctx(env, precision):
                            return m(x, validate=False)

                    first_s, kernels = None, ""
                    env.reset_peak()
                    if b == min(args.batches):  # warm up (and compile), and see the SDPA kernels
                        env.sync()
                        t0 = time.perf_counter()
                        kernels, out = sdpa_kernels(fn)
                        kernels = kernels if label == "eager" else ""  # compiling runs SDPA too
                        env.sync()
                        first_s = time.perf_counter() - t0
                    slow = not env.cuda and label == "eager" and (first_s or est) > args.budget_s
                    if slow and first_s:  # one cold forward costs the whole budget: keep it
                        med, times = first_s, [first_s]
                    else:
                        repeats = (3 if env.quick else 20) if env.cuda else (2 if env.quick else 5)
                        med, times, out = env.timed(fn, warmup=0 if slow or first_s else 1,
                                                    repeats=repeats, budget_s=args.budget_s)
                    gflops = flops1 * b / med / 1e9
                    rate = rate or gflops
                    peak = peaks["best"]["fp32" if precision == "fp32" else "bf16"]
                    rows.append(dict(preset=name, batch=b, precision=precision, variant=label,
                                     ms=med * 1e3, runs=len(times), gflop=flops1 * b / 1e9,
                                     gflops=gflops, pct_peak=100 * gflops / peak if peak else 0,
                                     mem_mib=env.peak_mib(), kernels=kernels,
                                     first_call_s=first_s))
                    log(f"forward {name} b{b} {precision} {label}: {med * 1e3:.1f} ms "
                        f"({gflops:.1f} GFLOP/s, {len(times)} runs)")
                    if label == "eager":
                        argmax[(precision, b)] = out.float().argmax(-1)
                        if b == min(args.batches):
                            if precision == "fp32":
                                ref = out.float()
                                top2 = ref.topk(2, dim=-1).values
                                diag["gap"] = (top2[..., 0] - top2[..., 1]).median().item()
                            elif ref is not None:
                                diag[precision] = (out.float() - ref).abs().median().item()
                            g = torch.Generator(device=env.device).manual_seed(2)
                            u = torch.rand(out.shape, device=env.device, generator=g)
                            gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
                            argmax[(precision, b, "sampled")] = (out.float() + gumbel).argmax(-1)
                            del u, gumbel
                    del out
            del m_eager, variants
        for (precision, *rest), toks in argmax.items():
            ref = argmax.get(("fp32", *rest))
            if precision != "fp32" and ref is not None:
                agree.append(dict(preset=name, precision=precision, batch=rest[0],
                                  kind="sampled T=1, shared noise" if rest[1:] else "argmax",
                                  pct=100 * (toks == ref).float().mean().item(),
                                  gap=diag.get("gap"), dlogit=diag.get(precision)))
        del model, argmax, ref
        gc.collect()


def skip_forward(env: Env, args, name: str, b: int, precision: str, est: float) -> str:
    if env.quick and name == "ffhq1024" and b > 1:
        return "--quick skips ffhq1024 batch > 1"
    if env.quick and name == "ffhq1024" and precision == "bf16-weights" and not env.cuda:
        return "--quick skips ffhq1024 bf16-weights on CPU (~same as bf16 autocast)"
    if est > args.max_forward_s:  # (the smallest batch is always measured: est = 0)
        return f"estimated {est:.0f} s per forward > --max-forward-s {args.max_forward_s:g}"
    return ""


def bench_hourglass(env: Env, args, res: dict) -> None:
    """ffhq1024 (2, 12, 2) hourglass vs a flat stack of 16 blocks, same width, at 32x32 (or
    the last preset given, if ffhq1024 is not among them); also the hourglass without the
    attention-resampling blocks (whose up block runs a feed-forward at full resolution)."""
    name = "ffhq1024" if "ffhq1024" in args.presets else args.presets[-1]
    precision = args.main_precision
    hour = model_in(build_prior(env, name), precision)
    models = {"hourglass": hour,
              "hourglass, no attn resampling": model_in(
                  build_prior(env, name, attn_resampling=False), precision),
              "flat": model_in(build_prior(env, name, depth=hour.config.num_blocks), precision)}
    rows = res.setdefault("hourglass", [])
    batches = sorted({1, max(args.batches)}) if env.cuda else [1]
    for b in batches:
        x = torch.randint(0, hour.codebook_size, (b, 32, 32), device=env.device)
        fns = {}
        for label, m in models.items():
            def fn(m=m, x=x):
                with torch.inference_mode(), autocast_ctx(env, precision):
                    return m(x, validate=False)

            with torch.inference_mode():
                flops, _ = count_flops(fn)  # doubles as warm-up
            fns[label] = (fn, flops, m)
        times: dict[str, list[float]] = {label: [] for label in models}
        rounds = (5 if env.quick else 20) if env.cuda else (1 if env.quick else 3)
        for _ in range(rounds):  # interleaved, so load changes hit both alike
            for label, (fn, _, _) in fns.items():
                times[label] += env.timed(fn, warmup=0, repeats=1, budget_s=0)[1]
        for label, (_, flops, m) in fns.items():
            med = statistics.median(times[label])
            depth = m.config.depth
            rows.append(dict(model=label, depth=str(depth), batch=b, precision=precision,
                             ms=med * 1e3, runs=len(times[label]), gflop=flops / 1e9,
                             params_m=m.num_parameters() / 1e6))
            log(f"hourglass-vs-flat {label} b{b}: {med * 1e3:.1f} ms")
    del hour, models


# ------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from the callback to end a sampling run after a few timed steps."""


class ForwardProbe:
    """Replaces ``model.forward`` to record every forward the sampler makes: batch size,
    time (CPU clock, or CUDA events: no extra sync), inference mode. ``transform(tokens,
    logits)`` may replace the logits (the peaked toy prior)."""

    def __init__(self, model: torch.nn.Module, env: Env, transform=None):
        self.model, self.env, self.transform = model, env, transform
        self.orig = model.forward
        self.own = model.__dict__.get("forward")  # a compiled twin has its own forward
        self.force: dict = {}  # keyword arguments forced onto every forward (what-if runs)
        self.batches: list[int] = []
        self.inference: list[bool] = []
        self.spans: list = []
        model.forward = self

    def __call__(self, tokens, labels=None, **kwargs):
        if self.env.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        else:
            t0 = time.perf_counter()
        out = self.orig(tokens, labels, **{**kwargs, **self.force})
        if self.transform is not None:
            out = self.transform(tokens, out)
        if self.env.cuda:
            end.record()
            self.spans.append((start, end))
        else:
            self.spans.append(time.perf_counter() - t0)
        self.batches.append(int(tokens.shape[0]))
        self.inference.append(torch.is_inference_mode_enabled())
        return out

    def seconds(self) -> list[float]:
        if self.env.cuda:
            self.env.sync()
            return [s.elapsed_time(e) / 1e3 for s, e in self.spans]
        return list(self.spans)

    def close(self) -> None:
        if self.own is None:
            del self.model.forward  # back to the class's forward
        else:
            self.model.forward = self.own


def run_sampler(env: Env, model, *, batch: int, steps: int, early_stop: bool, precision: str,
                stop_after: int | None = None, transform=None, force=None, **kwargs) -> dict:
    """One ``sample`` call, instrumented. ``stop_after``: cancel after that many steps (the
    per-step time is then extrapolated to ``steps``). ``force``: keyword arguments forced onto
    every forward."""
    probe = ForwardProbe(model, env, transform)
    probe.force = dict(force or {})
    stamps: list[float] = []

    def callback(step, total, tokens):
        env.sync()
        stamps.append(time.perf_counter())
        if stop_after is not None and step >= stop_after:
            raise _Stop

    gen = torch.Generator(device=env.device).manual_seed(3)
    cb = callback if (stop_after is not None or not env.cuda) else None
    env.reset_peak()
    env.sync()
    t0 = time.perf_counter()
    try:
        with autocast_ctx(env, precision):
            sample(model, batch_size=batch, steps=steps, early_stop=early_stop, generator=gen,
                   callback=cb, **kwargs)
    except _Stop:
        pass
    env.sync()
    wall = time.perf_counter() - t0
    probe.close()
    fwd = probe.seconds()
    n = len(probe.batches) if cb is None else len(stamps)
    out = dict(batch=batch, steps=steps, early_stop=early_stop, steps_run=n, wall_s=wall,
               forwards=len(probe.batches), batches=probe.batches, mem_mib=env.peak_mib(),
               inference=all(probe.inference))
    if stop_after is not None and len(stamps) >= 2:  # steps 2..k: no first-call effects
        per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        per_fwd = statistics.median(fwd[1:])
        out.update(extrapolated=True, step_s=per_step, fwd_s=per_fwd,
                   total_s=(stamps[0] - t0) + (steps - 1) * per_step)
    else:
        out.update(extrapolated=False, step_s=wall / max(n, 1), fwd_s=sum(fwd) / max(n, 1),
                   total_s=wall)
    out["overhead_pct"] = 100 * (out["step_s"] - out["fwd_s"]) / out["step_s"]
    return out


def bench_sampler(env: Env, args, res: dict) -> None:
    precision = args.main_precision
    fwd_ms = {(r["preset"], r["batch"]): r["ms"] for r in res.get("forward", [])
              if r["precision"] == precision and r["variant"] == "eager"}
    rows = res.setdefault("sampler", [])
    for name in args.presets:
        model = model_in(build_prior(env, name), precision)
        variants = [("eager", model)]
        if args.compile and name in args.compile:
            variants.append(("compiled", compiled(model, args.compile_mode)))
        for label, m in variants:
            for b in sorted(args.batches):
                est_step = fwd_ms.get((name, b), float("nan")) / 1e3 * 1.05
                if env.quick and name == "ffhq1024" and b > 1:
                    res["skipped"].append(f"sampler {name} b{b}: --quick skips ffhq1024 b > 1")
                    continue
                if est_step > args.max_forward_s:
                    res["skipped"].append(f"sampler {name} b{b}: forward ~{est_step:.0f} s")
                    continue
                # 100 real steps when they fit the budget (early stop on = the default; also
                # off when that fits twice), else a few steps extrapolated
                est = est_step * args.steps
                full = env.cuda or est <= args.sample_budget_s
                modes = ((False, True) if env.cuda or est <= args.sample_budget_s / 2 else
                         (True,)) if full and label == "eager" else (False,)
                if label == "compiled":  # compile for this batch size outside the timing
                    with autocast_ctx(env, precision):
                        sample(m, batch_size=b, steps=2, early_stop=False,
                               generator=torch.Generator(device=env.device).manual_seed(0))
                for es in modes:
                    log(f"sampler {name} b{b} {label} early_stop={es} "
                        f"({'full' if full else 'extrapolated'})")
                    r = run_sampler(env, m, batch=b, steps=args.steps, early_stop=es,
                                    precision=precision,
                                    stop_after=None if full else
                                    (2 if env.quick or est_step > 10 else 3))
                    rows.append(dict(r, preset=name, variant=label, precision=precision))
        del model, variants
        gc.collect()


def bench_sampler_checks(env: Env, args, res: dict) -> None:
    """CFG in one forward, host syncs per step, early stop on a converged (peaked) toy."""
    checks = res.setdefault("sampler_checks", {})
    small = build_prior(env, "small")
    target = torch.randint(0, small.codebook_size, small.config.grid, device=env.device,
                           generator=torch.Generator(device=env.device).manual_seed(5))

    def peaked(tokens, logits):  # a "converged" prior: 0.01 x network + 20 x onehot(target)
        hot = torch.nn.functional.one_hot(target, logits.shape[-1]).to(logits.dtype)
        return logits * 0.01 + 20.0 * hot

    # host syncs: aten ops that read device values on the host (they block on a GPU), counted
    # per step on the peaked toy (so samples freeze); on CUDA also set_sync_debug_mode's count
    steps, min_steps = 20, 10
    counter = SyncCounter()
    probe = ForwardProbe(small, env, peaked)
    with counter, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if env.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            sample(small, batch_size=2, steps=steps, min_steps=min_steps, early_stop=True,
                   update_proportion=0.3, callback=lambda step, total, t: counter.mark(step),
                   generator=torch.Generator(device=env.device).manual_seed(4))
        finally:
            if env.cuda:
                torch.cuda.set_sync_debug_mode("default")
    probe.close()
    cuda_syncs = [w for w in caught if "synchroniz" in str(w.message)]
    checks["syncs"] = dict(per_step=counter.per_step(len(probe.batches)), min_steps=min_steps,
                           where=counter.where_summary(), batches=probe.batches,
                           cuda_warnings=len(cuda_syncs),
                           cuda_where=sorted({f"{Path(w.filename).name}:{w.lineno}"
                                              for w in cuda_syncs}))

    cond = build_prior(env, "small", num_classes=10)
    counter = SyncCounter()
    with counter:
        r = run_sampler(env, cond, batch=2, steps=4, early_stop=False, precision="fp32",
                        labels=torch.tensor([3, 7]), cfg_scale=3.0)
    checks["cfg"] = dict(steps=r["steps_run"], forwards=r["forwards"], batches=r["batches"],
                         syncs=counter.where_summary())

    b = 4 if env.quick else 8
    # early stop off keeps the batch constant: extrapolate it when 100 steps would not fit
    est = [r["ms"] / 1e3 * args.steps for r in res.get("forward", []) if r["preset"] == "small"
           and r["batch"] == b and r["precision"] == "fp32" and r["variant"] == "eager"]
    real_off = env.cuda or (not env.quick and bool(est) and est[0] <= args.sample_budget_s)
    toy = {}
    for es in (False, True):
        toy[es] = run_sampler(env, small, batch=b, steps=args.steps, early_stop=es,
                              precision="fp32", transform=peaked, update_proportion=0.3,
                              stop_after=None if es or real_off else 3)
        log(f"peaked toy early_stop={es}: {toy[es]['total_s']:.2f} s, {toy[es]['forwards']} fwd")
    checks["toy"] = toy
    del cond, small, probe
    if env.cuda:  # what one host sync per step costs: the prior's range checks forced on
        name = "ffhq1024" if "ffhq1024" in args.presets else args.presets[-1]
        model = model_in(build_prior(env, name), args.main_precision)
        times: dict[str, list[float]] = {"sampler default": [], "validate=True forced": []}
        for _ in range(2):
            for label in times:
                r = run_sampler(env, model, batch=1, steps=args.steps, early_stop=False,
                                precision=args.main_precision,
                                force={"validate": True} if "forced" in label else None)
                times[label].append(r["step_s"])
        checks["token_check"] = dict(preset=name, **{k: min(v) for k, v in times.items()})
        del model


class SyncCounter(TorchDispatchMode):
    """Counts aten ops that copy a device value to the host (``item``/``bool``/``int``,
    ``nonzero``, boolean-mask indexing, ``masked_select``): on a GPU each one waits for the
    queue to drain. On the CPU it is a proxy; ``torch.tensor(list, device=cuda)`` copies are not
    seen here (CUDA's sync debug mode sees them)."""

    SYNCING = {"is_nonzero", "item", "_local_scalar_dense", "tolist", "nonzero", "masked_select",
               "unique", "_unique2"}  # seen before decomposition under inference mode

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, str]] = []
        self.step = 0

    def mark(self, step: int) -> None:
        self.step = step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name in self.SYNCING or bool_index:
            self.events.append((self.step, f"{name} at {_caller()}"))
        return func(*args, **(kwargs or {}))

    def per_step(self, steps: int) -> list[int]:
        return [sum(1 for s, _ in self.events if s == i) for i in range(steps)]

    def where_summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, where in self.events:
            out[where] = out.get(where, 0) + 1
        return out


def _caller() -> str:
    """file:line of the innermost frame in sundae_lib (where the host read happens)."""
    frame = sys._getframe(2)
    while frame is not None:
        if "sundae_lib" in frame.f_code.co_filename:
            return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


# ------------------------------------------------------------------------------------------
# VQ-GAN decode
# ------------------------------------------------------------------------------------------


def bench_decode(env: Env, args, res: dict) -> None:
    rows = res.setdefault("decode", [])
    precision = "fp32" if not env.cuda else args.decode_precision
    for name in [p for p in args.presets if p in CODEC_FOR]:
        codec = CODEC_FOR[name]
        torch.manual_seed(0)
        vq = model_in(VQGAN(VQGANConfig.preset(codec)).eval().to(env.device), precision)
        h, w = PriorConfig.preset(name).grid
        for b in sorted(args.batches) if env.cuda else [1]:
            px = h * vq.downsample_factor
            if env.quick and px >= 1024 and not env.cuda:
                res["skipped"].append(f"decode {codec} {px}^2: --quick skips it (~1 min on CPU)")
                continue
            x = torch.randint(0, vq.codebook_size, (b, h, w), device=env.device)

            def fn(vq=vq, x=x):
                with torch.inference_mode(), autocast_ctx(env, precision):
                    return vq.decode(x)

            env.reset_peak()
            if env.cuda or px < 1024:
                flops, _ = count_flops(fn)  # doubles as warm-up
                med, times, _ = env.timed(fn, warmup=0, repeats=10 if env.cuda else 2,
                                          budget_s=args.budget_s)
                note = ""
            else:  # one cold run, counted and timed at once (FlopCounterMode adds ~us per op)
                t0 = time.perf_counter()
                flops, _ = count_flops(fn)
                med, times, note = time.perf_counter() - t0, [0.0], "1 cold run"
            rows.append(dict(codec=codec, prior=name, batch=b, px=px, precision=precision,
                             ms=med * 1e3, runs=len(times), gflop=flops / 1e9,
                             gflops=flops / med / 1e9, mem_mib=env.peak_mib(), note=note))
            log(f"decode {codec} b{b} {px}^2: {med:.2f} s")
        del vq
        gc.collect()
