"""Benchmark of the fused ops (specs/kernels.md §7). Writes JSON; never asserts timings.

For each op, shape, dtype and pass (fwd, fwd+bwd) it times:
  eager     the pure-PyTorch reference (common/ops_reference.py)
  compiled  torch.compile(reference, fullgraph=True)
  op        the custom op (common._C kernels)
  floor     minimal bytes / measured copy bandwidth (memory-bound ops)
plus the extra rows of the spec (MAE-style `repeat` gather, `index_select` gather, tile-then-normalise,
merge-per-step LoRA, and the plain frozen linear that lora_linear augments).

    python bench/ops.py                         # realistic shapes on CUDA, moderate shapes on CPU
    python bench/ops.py --device cpu --quick    # small CPU run
    python bench/ops.py --out bench/results/ops_cuda.json
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from common import ops  # noqa: E402
    from common import ops_reference as ref  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- timing ------------------------------------------------------------------------------------

def make_timer(device, warmup_ms, rep_ms):
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            def t_cuda(fn):
                return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3  # ms -> us
            return t_cuda
        except ImportError:
            pass

        def t_events(fn):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            times = []
            deadline = time.perf_counter() + rep_ms / 1e3
            while time.perf_counter() < deadline or len(times) < 10:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) * 1e3)
            return statistics.median(times)
        return t_events

    def t_cpu(fn):
        fn()
        deadline = time.perf_counter() + warmup_ms / 1e3
        while time.perf_counter() < deadline:
            fn()
        times = []
        deadline = time.perf_counter() + rep_ms / 1e3
        while time.perf_counter() < deadline or len(times) < 5:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    return t_cpu


def copy_bandwidth(device, timer, nbytes):
    """Measured device copy bandwidth (read + write bytes / time), in bytes/s."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    us = timer(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (us * 1e-6)


class Rotating:
    """Cycles through several input sets so small working sets do not sit in L2 (spec §7)."""

    def __init__(self, make, n):
        self.sets = [make() for _ in range(n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def fwd_bwd(fn, grads_of):
    """A callable doing forward + backward with a fixed random grad_out."""
    cache = {}

    def run(*args):
        out = fn(*args)
        if "g" not in cache:
            cache["g"] = torch.randn_like(out)
        torch.autograd.backward(out, cache["g"], inputs=[a for a in grads_of(args)])
    return run


# ---- per-op cases ------------------------------------------------------------------------------

def with_backend(name, fn):
    def run(*a):
        old = ops.get_backend()
        ops.set_backend(name)
        try:
            return fn(*a)
        finally:
            ops.set_backend(old)
    return run


def cases(device, quick):
    """Yields dicts: op, shape label, dtype, make_inputs, fn (wrapper), ref_fn, floor bytes per pass, extras."""
    cpu = device.type == "cpu"
    # static_clip
    sc_shapes = [(2, 3, 8, 64, 64, 8)] if quick else ([(4, 3, 32, 112, 112, 32)] if cpu else
                                                      [(6, 3, 32, 224, 224, 32), (8, 3, 32, 224, 224, 32),
                                                       (12, 3, 1, 224, 224, 32)])
    for (B, C, Tin, H, W, T) in sc_shapes:
        for dname in ("fp32", "bf16"):
            od = DT[dname]

            def make(B=B, C=C, Tin=Tin, H=H, W=W):
                return (torch.randint(0, 256, (B, C, Tin, H, W), dtype=torch.uint8, device=device),
                        torch.randint(0, Tin, (B,), device=device))

            def op_fn(x, i, T=T, od=od):
                return ops.static_clip(x, i, MEAN, STD, num_frames=T, out_dtype=od)

            def ref_fn(x, i, T=T, od=od):
                return ref.static_clip(x, i, MEAN, STD, num_frames=T, out_dtype=od)

            def tile_then_norm(x, i, T=T, od=od):  # the official order: tile uint8, then normalise
                f = x[torch.arange(x.shape[0], device=x.device), :, i].unsqueeze(2).expand(-1, -1, T, -1, -1)
                m = torch.tensor(MEAN, device=x.device).view(1, -1, 1, 1, 1)
                s = torch.tensor(STD, device=x.device).view(1, -1, 1, 1, 1)
                return ((f.float() / 255 - m) / s).to(od)

            es = torch.finfo(od).bits // 8
            yield dict(op="static_clip", shape=f"u8 ({B},{C},{Tin}->{T},{H},{W})", dtype=f"u8->{dname}", make=make,
                       fn=op_fn, ref=ref_fn, grads=None, floor={"fwd": B * C * H * W + B * C * T * H * W * es},
                       extras={"tile_then_normalise": tile_then_norm})
    # graph_aggregate
    ga_shapes = [(4, 3, 64, 16, 25, 25, False)] if quick else ([(8, 3, 64, 64, 25, 25, False),
                                                                (8, 3, 64, 64, 25, 25, True)] if cpu else
                                                               [(32, 3, 64, 64, 25, 25, False),
                                                                (32, 3, 128, 64, 25, 25, False),
                                                                (20, 3, 64, 64, 25, 25, False),
                                                                (32, 3, 64, 64, 25, 25, True)])
    for (N, K, C, T, V, W, ps) in ga_shapes:
        for dname in ("fp32", "bf16"):
            xd = DT[dname]

            def make(N=N, K=K, C=C, T=T, V=V, W=W, ps=ps, xd=xd):
                x = torch.randn(N, K * C, T, V, device=device, dtype=xd, requires_grad=True)
                A = torch.randn(*((N,) if ps else ()), K, V, W, device=device, requires_grad=True)
                return x, A

            es = torch.finfo(xd).bits // 8
            xb, ob = N * K * C * T * V * es, N * C * T * W * es
            yield dict(op="graph_aggregate", shape=f"({N},{K},{C},{T},{V})x{'(N,' if ps else '('}{K},{V},{W})",
                       dtype=dname, make=make, fn=ops.graph_aggregate, ref=ref.graph_aggregate,
                       grads=lambda a: a, floor={"fwd": xb + ob, "fwd+bwd": xb + ob + (ob + xb + xb)}, extras={})
    # masked_gather / masked_restore
    mg_shapes = [(8, 196, 256, 49)] if quick else ([(8, 1568, 384, 392), (64, 196, 768, 49)] if cpu else
                                                   [(32, 1568, 768, 392), (32, 1568, 768, 156), (64, 196, 768, 49),
                                                    (8, 48, 512, 16)])
    for (N, L, D, Lk) in mg_shapes:
        for dname in ("fp32", "bf16"):
            xd = DT[dname]
            es = torch.finfo(xd).bits // 8

            def make(N=N, L=L, D=D, Lk=Lk, xd=xd):
                x = torch.randn(N, L, D, device=device, dtype=xd, requires_grad=True)
                ids_keep, _, _ = ops.random_masking(torch.rand(N, L, device=device), Lk)
                return x, ids_keep

            def mae_repeat(x, ids):
                return torch.gather(x, 1, ids.unsqueeze(-1).repeat(1, 1, x.shape[-1]))

            def index_select(x, ids):
                n, l, d = x.shape
                flat = (ids + torch.arange(n, device=x.device).unsqueeze(1) * l).reshape(-1)
                return x.reshape(n * l, d).index_select(0, flat).view(n, -1, d)

            yield dict(op="masked_gather", shape=f"N={N} L={L} D={D} keep={Lk}", dtype=dname, make=make,
                       fn=ops.masked_gather, ref=ref.masked_gather, grads=lambda a: a[:1],
                       floor={"fwd": 2 * N * Lk * D * es + N * Lk * 8,
                              "fwd+bwd": 2 * N * Lk * D * es + N * Lk * 8 + N * Lk * D * es + N * L * D * es + N * Lk * 8},
                       extras={"mae_repeat": mae_repeat, "index_select": index_select})

            def make_r(N=N, L=L, D=D, Lk=Lk, xd=xd):
                y = torch.randn(N, Lk, D, device=device, dtype=xd, requires_grad=True)
                _, ids_restore, _ = ops.random_masking(torch.rand(N, L, device=device), Lk)
                tok = torch.randn(D, device=device, dtype=xd, requires_grad=True)
                return y, ids_restore, tok

            yield dict(op="masked_restore", shape=f"N={N} L={L} D={D} keep={Lk}", dtype=dname, make=make_r,
                       fn=ops.masked_restore, ref=ref.masked_restore, grads=lambda a: (a[0], a[2]),
                       floor={"fwd": N * Lk * D * es + N * L * D * es + N * L * 8,
                              "fwd+bwd": N * Lk * D * es + N * L * D * es + N * L * 8 + N * L * D * es
                              + N * Lk * D * es + N * L * 8},
                       extras={})
    # lora_linear (compute-bound at batch 8; compared against the plain frozen linear)
    ll_shapes = [(1568, 128, 384, 64)] if quick else ([(12544, 128, 384, 64), (3136, 256, 768, 64)] if cpu else
                                                      [(50176, 128, 384, 64), (401408, 128, 384, 64),
                                                       (12544, 256, 768, 64), (3136, 512, 1536, 64),
                                                       (784, 1024, 3072, 64)])
    for (M, K, N, r) in ll_shapes:
        for dname in ("fp32", "bf16"):
            xd = DT[dname]

            def make(M=M, K=K, N=N, r=r, xd=xd):
                x = torch.randn(M, K, device=device, dtype=xd, requires_grad=True)
                W = torch.randn(N, K, device=device, dtype=xd) / K ** 0.5
                b = torch.randn(N, device=device, dtype=xd)
                A = (torch.randn(r, K, device=device, dtype=xd) / K ** 0.5).requires_grad_()
                B = torch.randn(N, r, device=device, dtype=xd).requires_grad_()
                return x, W, b, A, B

            def lop(x, W, b, A, B):
                return ops.lora_linear(x, W, b, A, B, 1.0)

            def lref(x, W, b, A, B):
                return ref.lora_linear(x, W, b, A, B, 1.0)

            def plain(x, W, b, A, B):
                return torch.nn.functional.linear(x, W, b)

            def merge(x, W, b, A, B):
                return torch.nn.functional.linear(x, W + B @ A, b)

            yield dict(op="lora_linear", shape=f"M={M} K={K} N={N} r={r}", dtype=dname, make=make, fn=lop, ref=lref,
                       grads=lambda a: (a[0], a[3], a[4]), floor=None,
                       extras={"plain_linear": plain, "merge_per_step": merge}, plain_grads=lambda a: (a[0],))


# ---- driver ------------------------------------------------------------------------------------

def header(device, bw, args):
    h = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
         "ops_build": ops.BUILD_INFO, "copy_bandwidth_GBps": bw / 1e9, "threads": torch.get_num_threads(),
         "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "budget_s": args.budget_s or None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        h.update(gpu=p.name, sm_count=p.multi_processor_count, memory_GiB=p.total_memory / 2 ** 30)
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            h["nvidia_smi"] = q.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        h["cpu"] = platform.processor() or platform.machine()
    return h


# Variants are timed in phases over all cases, so a time budget (--budget-s) that runs out still leaves
# the goal rows (eager, op, floor; the plain linear for lora_linear) of every case; then the other
# extra rows; then torch.compile(reference), whose compiles take most of the time on a fresh machine.
PHASES = (("eager", "op", "plain_linear"), "extras", ("compiled",))
ORDER = ("eager", "compiled", "op")


def phase_variants(case, phase, no_compile):
    if phase == "extras":
        return [n for n in case["extras"] if n != "plain_linear"]
    if phase == ("compiled",) and no_compile:
        return []
    return [n for n in (*ORDER, *case["extras"]) if n in phase]


def variant_fn(case, name):
    if name == "eager":
        return with_backend("ref", case["ref"])
    if name == "compiled":
        torch._dynamo.reset()
        return torch.compile(case["ref"], fullgraph=True)
    if name == "op":
        return with_backend("auto", case["fn"])
    return case["extras"][name]


def case_rows(case, res_by_pass, bw):
    """Table rows of one case from {pass: {variant: us or None}}."""
    rows = []
    for pas, res in res_by_pass.items():
        res = dict(res)
        floor_bytes = (case["floor"] or {}).get(pas)
        if floor_bytes:
            res["floor"] = floor_bytes / bw * 1e6
        names = [n for n in (*ORDER, *case["extras"], "floor") if res.get(n) is not None]
        for name in names:
            us = res[name]
            row = dict(op=case["op"], shape=case["shape"], dtype=case["dtype"], variant=name, us=us)
            if floor_bytes:
                row.update(GBps=floor_bytes / (us * 1e-6) / 1e9, x_floor=us / res["floor"])
            if res.get("eager"):
                row["speedup_vs_eager"] = res["eager"] / us
            if res.get("compiled"):
                row["speedup_vs_compiled"] = res["compiled"] / us
            if case["op"] == "lora_linear" and res.get("plain_linear"):
                row["x_plain_linear"] = us / res["plain_linear"]
            row["pass"] = pas
            rows.append(row)
    return rows


def print_rows(rows):
    print(f"{'op':16s} {'shape':40s} {'dtype':10s} {'pass':8s} {'variant':20s} {'us':>10s} {'GB/s':>8s} "
          f"{'x floor':>8s} {'vs eager':>9s} {'vs comp':>8s}")
    for r in rows:
        print(f"{r['op']:16s} {r['shape']:40s} {r['dtype']:10s} {r['pass']:8s} {r['variant']:20s} {r['us']:10.1f} "
              f"{r.get('GBps', float('nan')):8.1f} {r.get('x_floor', float('nan')):8.2f} "
              f"{r.get('speedup_vs_eager', float('nan')):9.2f} {r.get('speedup_vs_compiled', float('nan')):8.2f}")


def write_results(path, hdr, rows, notes):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"header": hdr, "notes": notes, "rows": rows}, f, indent=1)
    os.replace(tmp, path)  # atomic: a run killed by a timeout leaves the last complete table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="", help="JSON path (default bench/results/ops_<device>.json)")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--ops", default="static_clip,graph_aggregate,masked_gather,masked_restore,lora_linear")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) variant")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no new case after this many seconds (0 = no limit); skipped work is listed in notes")
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.has_ext(device.type):
        print(f"WARNING: common._C has no kernels for {device.type}: the 'op' rows use the reference", file=sys.stderr)
    t0 = time.perf_counter()
    timer = make_timer(device, args.warmup_ms, args.rep_ms)
    bw = copy_bandwidth(device, timer, (1 << 31) if device.type == "cuda" else (1 << 27))
    l2 = 60e6 if device.type == "cuda" else 0
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"ops_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    hdr = header(device, bw, args)
    print(json.dumps(hdr), flush=True)
    wanted_ops, wanted_dt = set(args.ops.split(",")), set(args.dtypes.split(","))
    selected = [c for c in cases(device, args.quick)
                if c["op"] in wanted_ops and c["dtype"].split("->")[-1] in wanted_dt]
    results = [{} for _ in selected]  # per case: {pass: {variant: us or None}}
    notes = []
    for phase in PHASES:
        skipped = 0
        for ci, case in enumerate(selected):
            names = phase_variants(case, phase, args.no_compile)
            if not names:
                continue
            if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                skipped += 1
                continue
            sample = case["make"]()
            ws = sum(t.numel() * t.element_size() for t in sample if isinstance(t, torch.Tensor))
            del sample
            inputs = Rotating(case["make"], 4 if ws < 4 * l2 else 1)
            for pas in ["fwd"] + (["fwd+bwd"] if case["grads"] is not None else []):
                for name in names:
                    grads_of = case.get("plain_grads") if name == "plain_linear" else case["grads"]
                    call = fwd_bwd(variant_fn(case, name), grads_of) if pas == "fwd+bwd" else variant_fn(case, name)
                    if pas == "fwd":
                        def run(call=call):
                            with torch.no_grad():
                                call(*inputs.next())
                    else:
                        def run(call=call):
                            call(*inputs.next())
                    try:
                        us = timer(run)
                        print(f"  {case['op']} {case['shape']} {case['dtype']} {pas} {name}: {us:.1f} us", flush=True)
                    except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                        us = None
                        print(f"  {case['op']} {name} {pas}: failed: {type(e).__name__}: {e}", file=sys.stderr)
                    results[ci].setdefault(pas, {})[name] = us
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows = [r for c, res in zip(selected, results) for r in case_rows(c, res, bw)]
            write_results(out_path, hdr, rows, notes)
        if skipped:
            what = "extra rows" if phase == "extras" else "+".join(phase)
            notes.append(f"budget {args.budget_s:g} s: {what} not timed for {skipped} of {len(selected)} cases")
            print("note:", notes[-1], flush=True)
    rows = [r for c, res in zip(selected, results) for r in case_rows(c, res, bw)]
    write_results(out_path, hdr, rows, notes)
    print_rows(rows)
    print(f"wrote {out_path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
