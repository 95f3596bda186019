"""ST-GCN++ training step (fwd+bwd+SGD, batch 16 clips x 2 persons x 64 frames x 25 joints) with the
graph aggregation as torch.einsum vs common.ops.graph_aggregate (reference and compiled backends),
plus the skeleton loader's samples/s against the step's samples/s. Writes JSON; asserts nothing.

    python bench/brl_step.py --out bench/results/brl_step.json [--device cuda] [--iters 5]
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_brl as brl  # noqa: E402
from common import ops  # noqa: E402
from common.data import brl_synth  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(impl, device, batch, clip_len, warmup, iters, num_classes=60):
    brl.GCN_IMPL = "einsum" if impl == "einsum" else "auto"
    if impl != "einsum":
        ops.set_backend(impl.split("-")[1])  # ops-ref / ops-ext
    torch.manual_seed(0)
    model = brl.STGCNPP(num_classes, brl.build_graph()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 2, clip_len, 25, 3, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    times = []
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ops.set_backend("auto")
    brl.GCN_IMPL = "auto"
    med = float(np.median(times))
    return {"impl": impl, "step_s_median": med, "step_s_all": times, "samples_per_s": batch / med}


def time_loader(n, clip_len, feat="j"):
    data, _ = brl_synth.build_dataset(num_classes=12, n_max=max(2, n // 12), imb_factor=1, val_per_class=0,
                                      test_per_class=0, seed=0)
    anns = data["annotations"][:n]
    ds = brl.SkeletonDataset(anns, [a["frame_dir"] for a in anns], feat=feat, layout="nturgb+d", train=True,
                             clip_len=clip_len, num_clips=1)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    dt = time.perf_counter() - t0
    frames = float(np.mean([a["keypoint"].shape[1] for a in anns]))
    return {"samples": len(ds), "mean_raw_frames": frames, "feat": feat, "samples_per_s_one_worker": len(ds) / dt}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/brl_step.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--clip-len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--loader-samples", type=int, default=96)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    impls = ["einsum", "ops-ref"] + (["ops-ext"] if ops.has_ext(device.type) else [])
    steps = [time_step(i, device, args.batch, args.clip_len, args.warmup, args.iters) for i in impls]
    for s in steps:
        print(f"{s['impl']:8s} step {s['step_s_median'] * 1000:9.1f} ms  {s['samples_per_s']:8.2f} samples/s")
    loaders = [time_loader(args.loader_samples, args.clip_len, f) for f in ("j", "bm")]
    for ld in loaders:
        print(f"loader feat={ld['feat']}: {ld['samples_per_s_one_worker']:.1f} samples/s per worker")
    base = steps[0]["step_s_median"]
    res = {
        "bench": "brl_step", "device": str(device), "threads": args.threads, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "shape": {"batch": args.batch, "persons": 2, "clip_len": args.clip_len, "joints": 25, "channels": 3},
        "ops_backend_available": {"ext_cpu": ops.has_ext("cpu"), "ext_cuda": ops.has_ext("cuda")},
        "steps": steps,
        "speedup_vs_einsum": {s["impl"]: base / s["step_s_median"] for s in steps},
        "loader": loaders,
        "loader_workers_needed_to_feed_step": {
            s["impl"]: s["samples_per_s"] / min(ld["samples_per_s_one_worker"] for ld in loaders) for s in steps},
        "note": "the CPU is shared with other jobs; see load_avg_1m. Timings are wall-clock medians.",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
