"""Whole-step share of the fused ops (specs/kernels.md §7): for each method a real training step on
synthetic data, per backend (ext = compiled op, ref = pure-PyTorch reference) and mode (eager,
torch.compile with --compile): median step time, and the op's share of the step from torch.profiler.

    python bench/step_share.py                                      # CUDA: real shapes (spec §7)
    python bench/step_share.py --device cpu --threads 1 --warmup 2 --iters 5   # CPU: --scale small

Share = time of the op's profiler events per step / profiled step time (wall clock, synchronised).
ext: the `rar::<op>` events and their backward ops (`rar::graph_aggregate_grad_x`, ...); ref: the
reference wrapped here in a `ref::<op>` range, which covers its forward only (its backward is spread
over generic autograd ops). Inside a compiled region the reference is fused by Inductor and has no share.
Writes JSON; never asserts timings.
"""
import argparse
import functools
import gc
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_actionmae as am  # noqa: E402
import train_albar as ta  # noqa: E402
import train_brl as brl  # noqa: E402
import uas_step  # noqa: E402
from brl_step import sync  # noqa: E402
from common import config, ops, ops_reference  # noqa: E402
from common.logging import write_json  # noqa: E402

OPS = {"albar": ["static_clip"], "brl": ["graph_aggregate"], "uas": ["lora_linear"],
       "actionmae": ["masked_gather", "masked_restore"]}
SHAPES = {  # small: CPU-sized (~2-3 min for all four on one core with --warmup 2 --iters 5)
    "real": {"albar": dict(arch="swin3d_t", B=6, T=32, S=224), "brl": dict(N=16, T=64),
             "uas": dict(B=1, T=32, S=224, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
             "actionmae": dict(arch="resnet34", N=8, T=16, S=224)},
    "small": {"albar": dict(arch="swin3d_tiny_test", B=2, T=8, S=64), "brl": dict(N=4, T=32),
              "uas": dict(B=1, T=8, S=64, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8]),
              "actionmae": dict(arch="resnet18", N=2, T=8, S=64)},
}


def label_reference_ops():
    """Wrap the references in a `ref::<op>` profiler range (eager only; dynamo would drop it anyway)."""
    def labelled(fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return wrapper
    for name in sum(OPS.values(), []):
        setattr(ops_reference, name, labelled(getattr(ops_reference, name), f"ref::{name}"))


# ---- one training step per method: build(shape, dev, amp, compile) -> step() ----------------------

def build_albar(s, dev, amp, compile):
    argv = ["--arch", s["arch"], "--num-frames", str(s["T"]), "--crop", str(s["S"]), "--batch-size", str(s["B"])]
    args = ta.resolve_args(ta.parse_args(ta.build_parser(), argv + (["--amp"] if amp else [])))
    model = ta.build_model(args, 51).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    u8 = torch.randint(0, 256, (s["B"], 3, s["T"], s["S"], s["S"]), dtype=torch.uint8, device=dev)
    y = torch.arange(s["B"], device=dev) % 51
    tbar = ta.static_frame_index("middle", s["T"], s["B"]).to(dev)
    # compile the motion forward only: the GP's double backward cannot go through compile
    motion = torch.compile(model) if compile else None

    def step():
        ta.albar_step(model, u8, y, tbar, args, motion_forward=motion)  # GP on (w_gp = 10)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def build_brl(s, dev, amp, compile):
    model = brl.STGCNPP(60, brl.build_graph()).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(s["N"], 2, s["T"], 25, 3, device=dev)
    y = torch.randint(0, 60, (s["N"],), device=dev)
    return plain_step(torch.compile(model) if compile else model, opt, x, y, dev, amp)


def build_uas(s, dev, amp, compile):
    ns = SimpleNamespace(num_classes=103, embed_dim=s["embed_dim"], depths=s["depths"], num_heads=s["num_heads"],
                         window_size=[8, 7, 7], rank=32, device=dev)
    model = uas_step.build(ns, "fused")  # LoRA on qkv through ops.lora_linear, adapters + head trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.05)
    x = torch.randn(s["B"], 3, s["T"], s["S"], s["S"], device=dev)
    y = torch.randint(0, 103, (s["B"],), device=dev)
    return plain_step(torch.compile(model) if compile else model, opt, x, y, dev, amp)


def plain_step(model, opt, x, y, dev, amp):
    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def build_actionmae(s, dev, amp, compile):
    argv = ["--modalities", "rgb,depth,ir", "--arch", s["arch"], "--num-frames", str(s["T"]), "--img-size",
            str(s["S"]), "--token-granularity", "frame", "--device", str(dev)] + (["--amp"] if amp else [])
    args = am.resolve_args(config.parse_args(am.build_parser(), argv))
    net = am.Net(args, 60).to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=1e-4)
    N, T, S = s["N"], s["T"], s["S"]
    batch = {m: torch.randn(N, T, 3, S, S, device=dev) for m in args.modalities}
    batch["valid"] = torch.ones(N, T, dtype=torch.bool, device=dev)
    batch["label"] = torch.randint(0, 60, (N,), device=dev)
    fwd = torch.compile(net) if compile else net

    def step():
        with am.autocast(args, dev):
            loss = fwd(batch, 2)["loss"]  # K = 2 of 3 modalities kept: gather 2T of 3T frame tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


BUILD = {"albar": build_albar, "brl": build_brl, "uas": build_uas, "actionmae": build_actionmae}


# ---- measurement -----------------------------------------------------------------------------------

def op_time_ms(events, names, dev):
    """{event name: ms} over the outermost CPU-side events named rar::<op>* / ref::<op>*."""
    def is_op(e):
        return e.device_type == DeviceType.CPU and any(e.name.startswith(p + n) for p in ("rar::", "ref::")
                                                       for n in names)
    out = {}
    for e in events:
        parent = e.cpu_parent
        while parent is not None and not is_op(parent):
            parent = parent.cpu_parent
        if is_op(e) and parent is None:
            t = e.device_time_total if dev.type == "cuda" else e.cpu_time_total  # us
            out[e.name] = out.get(e.name, 0.0) + t / 1000
    return out


def measure(step, dev, warmup, iters, prof_iters):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(1000 * (time.perf_counter() - t0))
    act = torch.profiler.ProfilerActivity
    acts = [act.CPU] + ([act.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(prof_iters):
            step()
        sync(dev)
        prof_ms = 1000 * (time.perf_counter() - t0) / prof_iters
    return times, prof_ms, prof.events()


def run_one(method, backend, mode, a, dev):
    ops.set_backend(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    step = BUILD[method](SHAPES[a.scale][method], dev, a.amp, mode == "compile")
    times, prof_ms, events = measure(step, dev, a.warmup, a.iters, a.profile_iters)
    per_event = {k: v / a.profile_iters for k, v in op_time_ms(events, OPS[method], dev).items()}
    op_ms = sum(per_event.values())
    attributable = backend == "ext" or bool(per_event)  # ref inside a compiled region: fused, no events
    del step, events
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"method": method, "op": "+".join(OPS[method]), "backend": backend, "mode": mode,
            "step_ms_median": statistics.median(times), "step_ms_all": times, "profiled_step_ms": prof_ms,
            "op_ms_per_step": op_ms if attributable else None,
            "op_share": op_ms / prof_ms if attributable else None,
            "share_covers": "fwd+bwd" if backend == "ext" else ("fwd only" if attributable else "fused by Inductor"),
            "op_events_ms_per_step": per_event}


def cpu_name():
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--scale", default="auto", choices=["auto", "small", "real"],
                   help="auto: real on CUDA, small on CPU")
    p.add_argument("--methods", default="albar,brl,uas,actionmae")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile-iters", type=int, default=3, help="extra steps run under torch.profiler")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    p.add_argument("--out", default="")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no new run after this many seconds (0 = no limit); skipped runs are listed in notes")
    a = p.parse_args()
    t0 = time.perf_counter()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    a.scale = ("real" if dev.type == "cuda" else "small") if a.scale == "auto" else a.scale
    a.amp = a.amp and dev.type == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    label_reference_ops()
    methods = [m for m in a.methods.split(",") if m]
    backends = ["ext", "ref"] if ops.has_ext(dev.type) else ["ref"]
    modes = ["eager"] + (["compile"] if a.compile else [])
    notes = [] if "ext" in backends else [f"ext rows skipped: common._C has no {dev.type} kernels ({ops.BUILD_INFO})"]
    rows = []
    out = Path(a.out or f"bench/results/step_share_{dev.type}.json")

    def result():
        time_kind = ("device (CUDA kernel) time under the op events" if dev.type == "cuda" else
                     "CPU total time of the outermost op events (the C++ kernels call at::mm & co.: self time "
                     "would miss those GEMMs)")
        return {"bench": "step_share", "torch": torch.__version__, "device_type": dev.type,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
                "threads": torch.get_num_threads(), "scale": a.scale,
                "shapes": {m: SHAPES[a.scale][m] for m in methods},
                "amp_bf16": a.amp, "warmup": a.warmup, "iters": a.iters, "profile_iters": a.profile_iters,
                "budget_s": a.budget_s or None, "ops_build": ops.BUILD_INFO, "op_time": time_kind,
                "share_note": ("op_share = op time per profiled step / profiled step wall time (synchronised; the "
                               "profiler adds overhead, so step_ms_median is timed separately without it). ext: "
                               "rar::<op> events + their backward ops; ref: the reference's forward in a ref::<op> "
                               "range only; a reference inside a compiled region is fused by Inductor, not "
                               "attributable."),
                "notes": notes, "rows": rows}

    for method in methods:
        for backend in backends:
            for mode in modes:
                if a.budget_s and time.perf_counter() - t0 > a.budget_s:
                    notes.append(f"budget {a.budget_s:g} s: {method} {backend} {mode} not run")
                    print("note:", notes[-1], flush=True)
                    continue
                try:
                    r = run_one(method, backend, mode, a, dev)
                except Exception as e:  # noqa: BLE001 - one failing run is reported; the others still run
                    traceback.print_exc()
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    notes.append(f"{method} {backend} {mode}: failed: {type(e).__name__}: {str(e)[:300]}")
                    print("note:", notes[-1], flush=True)
                    write_json(out, result())
                    continue
                rows.append(r)
                share = "-" if r["op_share"] is None else f"{100 * r['op_share']:.2f}%"
                print(f"{method:10s} {backend:3s} {mode:7s} step {r['step_ms_median']:9.1f} ms  op {share:>7s}  "
                      f"{ {k: round(v, 2) for k, v in r['op_events_ms_per_step'].items()} }", flush=True)
                if backend == "ext" and not r["op_events_ms_per_step"]:
                    notes.append(f"{method} ext {mode}: no rar:: event found in the profile")
                write_json(out, result())
    print(f"\n{'method':10s} {'op':30s} {'backend':7s} {'mode':7s} {'step ms':>9s} {'op ms':>8s} {'share':>7s}  covers")
    for r in rows:
        op_ms = "-" if r["op_ms_per_step"] is None else f"{r['op_ms_per_step']:.2f}"
        share = "-" if r["op_share"] is None else f"{100 * r['op_share']:.2f}%"
        print(f"{r['method']:10s} {r['op']:30s} {r['backend']:7s} {r['mode']:7s} {r['step_ms_median']:9.1f} "
              f"{op_ms:>8s} {share:>7s}  {r['share_covers']}")
    for n in notes:
        print("note:", n)
    write_json(out, result())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
