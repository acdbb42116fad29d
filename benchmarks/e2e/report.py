"""The report of ``benchmarks/run.py``: PASS/MISS lines for the targets, the markdown tables, and
its section of ``benchmarks/RESULTS.md`` (one subsection per device)."""

from __future__ import annotations

from pathlib import Path

from .measure import BF16, RESULTS, SECTION, Env, log

# ------------------------------------------------------------------------------------------
# targets and tables
# ------------------------------------------------------------------------------------------


def _fmt(v, nd=1) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def _mem(m: tuple[float, float]) -> str:
    return f"{m[0]:,.0f} (+{m[1]:,.0f})"


def table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return out + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]


def find(rows, **kv):
    return [r for r in rows if all(r.get(k) == v for k, v in kv.items())]


def e2e_rows(res: dict) -> list[dict]:
    """100-step sampling + decode per image, for the priors that have a codec."""
    out = []
    for d in res.get("decode", []):
        for s in find(res.get("sampler", []), preset=d["prior"], batch=d["batch"]):
            total = s["total_s"] + d["ms"] / 1e3
            out.append(dict(prior=d["prior"], px=d["px"], batch=d["batch"], variant=s["variant"],
                            early_stop=s["early_stop"], extrapolated=s["extrapolated"],
                            sample_s=s["total_s"], steps_run=s["steps_run"], steps=s["steps"],
                            decode_s=d["ms"] / 1e3, s_per_image=total / d["batch"],
                            images_per_s=d["batch"] / total))
    return out


def targets(env: Env, res: dict) -> list[str]:
    lines = []

    def line(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'MISS'}  {text}")

    hg = res.get("hourglass", [])
    for b in sorted({r["batch"] for r in hg}):
        f = find(hg, model="flat", batch=b)[0]
        for r in find(hg, batch=b):
            if r["model"] != "flat":
                speed, fl = f["ms"] / r["ms"], f["gflop"] / r["gflop"]
                text = (f"{r['model']} >= 2x faster per step than flat at 32x32 (b{b}): "
                        f"{r['ms']:.0f} vs {f['ms']:.0f} ms = {speed:.2f}x (FLOP ratio "
                        f"{fl:.2f}x)")
                if r["model"] == "hourglass":
                    line(speed >= 2, text)
                else:  # an ablation, not a shipped preset
                    lines.append(f"INFO  {text}")
    fw = [r for r in res.get("forward", []) if r["variant"] == "eager"]
    agree = res.get("agreement", [])
    for r in fw:
        if r["precision"] not in BF16:
            continue
        ref = find(fw, preset=r["preset"], batch=r["batch"], precision="fp32")
        ag = find(agree, preset=r["preset"], batch=r["batch"], precision=r["precision"],
                  kind="argmax")
        if not ref or not ag:
            continue
        speed = ref[0]["ms"] / r["ms"]
        smp = find(agree, preset=r["preset"], batch=r["batch"], precision=r["precision"],
                   kind="sampled T=1, shared noise")
        line(speed >= 2 and ag[0]["pct"] >= 99,
             f"{r['precision']} >= 2x faster than fp32, >= 99% argmax agreement "
             f"({r['preset']} b{r['batch']}): {speed:.2f}x, {ag[0]['pct']:.2f}%"
             + (f" (sampled tokens: {smp[0]['pct']:.2f}%)" if smp else ""))
    peaks = res["peaks"]["best"]
    for key, precs in (("fp32", ("fp32",)), ("bf16", BF16)):
        cand = [r for r in fw if r["preset"] == "ffhq1024" and r["precision"] in precs]
        if cand:
            best = max(cand, key=lambda r: r["gflops"])
            line(best["pct_peak"] >= 40,
                 f"ffhq1024 forward >= 40% of measured {key} matmul peak: {best['gflops']:.1f} "
                 f"of {peaks[key]:.1f} GFLOP/s = {best['pct_peak']:.0f}% "
                 f"(b{best['batch']} {best['precision']})")
    sam = res.get("sampler", [])
    for s in sam:  # early stop off, or on where no off run exists (random weights never freeze)
        if s["variant"] != "eager" or (s["early_stop"] and find(
                sam, preset=s["preset"], batch=s["batch"], variant="eager", early_stop=False)):
            continue
        line(s["overhead_pct"] <= 5,
             f"sampler overhead <= 5% of a step ({s['preset']} b{s['batch']}): "
             f"{s['overhead_pct']:.1f}% ({s['step_s'] * 1e3:.1f} ms step, "
             f"{s['fwd_s'] * 1e3:.1f} ms forward{', extrapolated' if s['extrapolated'] else ''})")
    if env.cuda:
        for e in e2e_rows(res):
            if e["px"] == 1024 and e["batch"] == 1:
                line(e["s_per_image"] <= 0.3,
                     f"<= 0.3 s per 1024^2 image at batch 1 ({e['variant']}, early stop "
                     f"{'on' if e['early_stop'] else 'off'}): {e['s_per_image']:.3f} s")
    ch = res.get("sampler_checks", {})
    if "cfg" in ch:
        c = ch["cfg"]
        line(c["forwards"] == c["steps"] and set(c["batches"]) == {4},
             f"CFG: both branches in one forward: {c['forwards']} forwards for {c['steps']} "
             f"steps, batch sizes {sorted(set(c['batches']))} for batch 2")
    if "toy" in ch:
        off, on = ch["toy"][False], ch["toy"][True]
        rows_on, rows_off = sum(on["batches"]), off["batch"] * off["steps"]
        line(on["total_s"] < off["total_s"] and rows_on < rows_off,
             f"early stop on the peaked toy: {off['total_s']:.2f} -> {on['total_s']:.2f} s "
             f"({100 * (1 - on['total_s'] / off['total_s']):.0f}% saved), sample-forwards "
             f"{rows_off} -> {rows_on}, last step {on['steps_run']}"
             + (" (off: extrapolated)" if off["extrapolated"] else ""))
    runs = res.get("sampler", []) + list(ch.get("toy", {}).values())
    if runs:
        line(all(r["inference"] for r in runs), "every sampler forward ran in inference mode")
    if "syncs" in ch:
        sy = ch["syncs"]
        pre = sy["per_step"][: sy["min_steps"]]
        extra = {k: v for k, v in sy["where"].items() if "sampler.py" not in k}
        line(max(pre, default=0) == 0 and not extra,
             f"host syncs: none before min_steps, after it only the sampler's early-stop check "
             f"(+ the frozen-sample index at a freeze): per step {sy['per_step']}; "
             + ("others: " + ", ".join(f"{k} x{v}" for k, v in extra.items()) if extra else
                "no others"))
        if env.cuda:
            line(not [w for w in sy["cuda_where"] if "sampler.py" not in w],
                 f"CUDA sync debug mode: {sy['cuda_warnings']} syncs in {len(sy['per_step'])} "
                 f"steps at {', '.join(sy['cuda_where']) or 'none'}")
    return lines


def _runs(batches: list[int]) -> str:
    """Run-length batch sizes per forward: [8, 8, 8, 5] -> '8x3, 5'."""
    out: list[list[int]] = []
    for b in batches:
        if out and out[-1][0] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return ", ".join(f"{b}x{n}" if n > 1 else str(b) for b, n in out)


def render(env: Env, args, res: dict) -> list[str]:
    """The report as markdown (printed, and written to RESULTS.md)."""
    m = res["meta"]
    md = [heading(env, args), "",
          f"`{m['command']}` — {m['date']}, {m['machine']}, torch {m['torch']}, "
          f"{m['threads']} threads, load average {m['load_start']} at start / {m['load_end']} "
          f"at end (1/5/15 min), {m['elapsed_min']:.1f} min. Random weights; times are medians.",
          "", "Peak memory: " + ("`torch.cuda.max_memory_allocated`, (+ the part above what "
                                 "stayed allocated)." if env.cuda else
                                 "peak RSS of the process during the measurement (VmHWM reset "
                                 "before it, after malloc_trim), (+ the part above the RSS at "
                                 "its start, i.e. activations and workspace; the weights are "
                                 "in the first number)."), ""]
    if "peaks" in res:
        p = res["peaks"]
        md += ["Measured matmul peak (square GEMMs, random data, fastest of the repeats; the "
               "best per dtype is the peak used below):", ""]
        md += table(["dtype", "call", "measured", "m x k x n", "ms", "GFLOP/s"],
                    [list(r) for r in p["rows"]])
        if not env.cuda:
            f = res["cpu"]
            ratio = p["best"]["fp32"] / max(p["best"]["bf16"], 1e-9)
            md += ["", f"Why bf16 is slow here: {f['cpu']}, torch CPU capability "
                   f"`{f['capability']}`, oneDNN bf16 supported: {f['onednn_bf16']}, flags: "
                   + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in f["flags"].items())
                   + f". Without AVX-512-BF16 / AMX, bf16 GEMMs are emulated (convert + fp32 "
                   f"FMA, or aten's reference loop for `mm`): the best bf16 path is {ratio:.1f}x "
                   "slower than fp32, so fp32 is the fast path on this CPU."]
        if "threads" in res:
            md += ["", "Threads (`small` b1 fp32 forward, interleaved): "
                   + ", ".join(f"{t} thread{'s' if t > 1 else ''} {ms:.1f} ms"
                               for t, ms in res["threads"].items())
                   + ". With other processes competing for the 2 cores, OpenMP regions wait "
                   "for a descheduled thread; the load average is given above."]
        md.append("")
    fw = res.get("forward", [])
    if fw:
        md += ["Prior forward (one denoising step, `validate=False` as the sampler calls it; "
               "runs = 1: a single cold forward, when one costs more than the per-item "
               "budget):", ""]
        md += table(["preset", "params M", "batch", "precision", "variant", "ms/step", "GFLOP",
                     "GFLOP/s", "% of peak", "peak mem MiB (+extra)", "runs", "SDPA kernels"],
                    [[r["preset"], res["params"][r["preset"]] / 1e6, r["batch"], r["precision"],
                      r["variant"] + (f" (1st call {r['first_call_s']:.1f} s)"
                                      if r["variant"] == "compiled" and r["first_call_s"] else ""),
                      r["ms"], r["gflop"], r["gflops"], r["pct_peak"], _mem(r["mem_mib"]), r["runs"],
                      r["kernels"] or "–"] for r in fw])
        md.append("")
    if res.get("agreement"):
        md += ["bf16 vs fp32 on the same tokens (% of positions with the same token). Random "
               "weights give nearly flat logits: where the fp32 top-1/top-2 gap is below the "
               "bf16 logit error the argmax flips; sampling at T = 1 with shared noise is what "
               "the sampler does:", ""]
        md += table(["preset", "batch", "precision", "compared", "agreement %",
                     "fp32 median top1-top2 gap", "median abs(bf16 - fp32) logit"],
                    [[a["preset"], a["batch"], a["precision"], a["kind"], f"{a['pct']:.2f}",
                      f"{a['gap']:.4f}" if a["gap"] is not None else "–",
                      f"{a['dlogit']:.4f}" if a["dlogit"] is not None else "–"]
                     for a in res["agreement"]])
        md.append("")
    if res.get("hourglass"):
        md += ["Hourglass vs flat transformer, same width and total depth, 32x32 grid, "
               "interleaved runs:", ""]
        md += table(["model", "depth", "batch", "precision", "ms/step", "GFLOP", "params M",
                     "runs"], [[r["model"], r["depth"], r["batch"], r["precision"], r["ms"],
                                r["gflop"], r["params_m"], r["runs"]] for r in res["hourglass"]])
        md.append("")
    if res.get("sampler"):
        md += [f"Sampling, {args.steps} steps, T 1.0->0.7, p 1.0 (`sample` defaults). Random "
               "weights: a sample freezes only when a whole step changes no token, which random "
               "logits never allow, so early stop on ~= off here (see the peaked toy below). "
               "'extrapolated' = first step + (steps-1) x median of steps 2..k:", ""]
        md += table(["preset", "batch", "variant", "early stop", "steps run", "total s",
                     "ms/step", "forward ms", "overhead %", "forward batch sizes",
                     "peak mem MiB (+extra)"],
                    [[s["preset"], s["batch"], s["variant"], "on" if s["early_stop"] else "off",
                      f"{s['steps_run']}" + (" (extrapolated)" if s["extrapolated"] else ""),
                      s["total_s"], s["step_s"] * 1e3, s["fwd_s"] * 1e3, s["overhead_pct"],
                      _runs(s["batches"]), _mem(s["mem_mib"])] for s in res["sampler"]])
        md.append("")
    ch = res.get("sampler_checks", {})
    if "toy" in ch:
        md += ["Early stop on a converged toy (`small` network, logits = 0.01 x network + 20 x "
               "one-hot(fixed target), p = 0.3, min_steps 10):", ""]
        md += table(["early stop", "steps run", "total s", "forward batch sizes"],
                    [["on" if es else "off", t["steps_run"] if not t["extrapolated"] else
                      f"{t['steps']} (extrapolated from {t['steps_run']})", t["total_s"],
                      _runs(t["batches"])] for es, t in ch["toy"].items()])
        md.append("")
    if "syncs" in ch:
        sy, cfg = ch["syncs"], ch.get("cfg", {})
        md += [f"Host reads per sampler step, counted by a dispatch mode (aten item / bool / "
               f"nonzero / boolean indexing; each one blocks on a GPU), on the peaked toy "
               f"(batch 2, min_steps {sy['min_steps']}, forward batch sizes "
               f"{_runs(sy['batches'])}): {sy['per_step']}; where: "
               + (", ".join(f"`{k}` x{v}" for k, v in sy["where"].items()) or "none")
               + (f". CUDA sync debug mode: {sy['cuda_warnings']} syncs at "
                  f"{', '.join(sy['cuda_where']) or 'none'}" if env.cuda else "")
               + (". With CFG (class-conditional `small`, 4 steps): "
                  + ", ".join(f"`{k}` x{v}" for k, v in cfg["syncs"].items()) if cfg else "")
               + ".", ""]
    if "token_check" in ch:
        tc = ch["token_check"]
        md += [f"Cost of one host sync per step ({tc['preset']} b1, {args.steps} steps): "
               f"{tc['sampler default'] * 1e3:.2f} ms/step as sampled (range checks skipped in "
               f"the loop), {tc['validate=True forced'] * 1e3:.2f} ms/step with the prior's "
               f"range check (a host read) forced on every forward.", ""]
    if res.get("decode"):
        md += ["VQ-GAN decode (random weights):", ""]
        md += table(["codec", "batch", "pixels", "precision", "s", "GFLOP", "GFLOP/s",
                     "peak mem MiB (+extra)", "runs"],
                    [[d["codec"], d["batch"], f"{d['px']}^2", d["precision"], d["ms"] / 1e3,
                      d["gflop"], d["gflops"], _mem(d["mem_mib"]),
                      d["note"] or d["runs"]] for d in res["decode"]])
        md.append("")
    e2e = e2e_rows(res)
    if e2e:
        md += ["End to end (sampling + decode):", ""]
        md += table(["prior", "pixels", "batch", "variant", "early stop", "sampling s",
                     "decode s", "s / image", "images / s"],
                    [[e["prior"], f"{e['px']}^2", e["batch"], e["variant"],
                      "on" if e["early_stop"] else "off",
                      f"{e['sample_s']:.2f}" + (" (extrap.)" if e["extrapolated"] else ""),
                      e["decode_s"], f"{e['s_per_image']:.3f}", f"{e['images_per_s']:.3f}"]
                     for e in e2e])
        md.append("")
    md += ["Targets:", "", "```", *res["targets"], "```", ""]
    if res["skipped"]:
        md += ["Skipped:", ""] + [f"- {s}" for s in res["skipped"]] + [""]
    return md


GPU_PENDING = ["### CUDA run", "",
               "Not run yet: no GPU was lent to this task. `bash benchmarks/gpu.sh` (H200 "
               "reference) runs `run.py --device cuda` with bf16 weights, SDPA flash attention "
               "and torch.compile, batch 1 and 16, and writes this subsection.", ""]
INTRO = ["`python benchmarks/run.py --write-results` measures everything below in one process "
         "(see its docstring); `benchmarks/gpu.sh` is the prepared CUDA run. Each device has its "
         "own subsection, replaced by the next run on that device.", ""]


def heading(env: Env, args) -> str:
    return f"### {'CUDA' if env.cuda else 'CPU'} run" + (f" ({args.tag})" if args.tag else "")


def write_results(md: list[str], path: Path = RESULTS) -> None:
    """Replace this run's subsection (its ``###`` heading) of our section of RESULTS.md, keep
    the others. Re-reads the file right before writing: other benchmarks own other sections."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == SECTION), None)
    if start is None:
        before, old, after = lines, [], []
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        before, old, after = lines[:start], lines[start + 1:end], lines[end:]
    subs: dict[str, list[str]] = {}
    key = None
    for ln in old:
        if ln.startswith("### "):
            key = ln.strip()
            subs[key] = []
        if key:
            subs[key].append(ln)
    subs[md[0]] = md
    if not any(k.startswith("### CUDA") for k in subs):
        subs[GPU_PENDING[0]] = GPU_PENDING
    order = sorted(subs, key=lambda k: (not k.startswith("### CPU"), k))
    body = [SECTION, "", *INTRO]
    for k in order:
        body += [ln for ln in subs[k]]
        while body[-1] == "":
            body.pop()
        body.append("")
    new = before + ([""] if before and before[-1] != "" else []) + body + after
    path.write_text("\n".join(new).rstrip("\n") + "\n")
    log(f"wrote {path}: {md[0]}")
