"""Time one ALBAR training step (specs/albar.md §4) split into its phases, plus the video loader.

Phases: decode (+ sampling and augmentation, per worker), static clip, forward (motion), forward
(static), gradient penalty (autograd.grad with create_graph), backward, optimizer step. Also a
CE-only step for the ratio. Writes JSON (never asserts timings).

    python bench/albar_step.py --device cpu --batch-size 2 --threads 2          # CPU, the issue's size
    python bench/albar_step.py --device cuda --batch-size 6 --amp               # GPU, the official size
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_albar as ta  # noqa: E402
from common.video import write_video  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="swin3d_t", choices=["swin3d_t", "swin3d_tiny_test", "cnn3d"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-frames", type=int, default=32)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-clips", type=int, default=6, help="clips decoded to measure loader clips/s")
    p.add_argument("--video-size", type=int, nargs=2, default=[240, 320], help="H W of the generated test video")
    p.add_argument("--video-frames", type=int, default=90)
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)

    args = ta.parse_args(ta.build_parser(), ["--arch", a.arch, "--num-frames", str(a.num_frames), "--crop",
                                             str(a.crop), "--short-side", str(a.short_side), "--batch-size",
                                             str(a.batch_size)] + (["--amp"] if a.amp else []))
    args = ta.resolve_args(args)

    # ---- loader: decode + sample + augment one clip (what one DataLoader worker does per item)
    tmp = Path(tempfile.mkdtemp())
    h, w = a.video_size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1, h, w, 3)).astype(np.int16)
    frames = np.clip(base + rng.integers(-20, 20, (a.video_frames, 1, 1, 3)), 0, 255).astype(np.uint8)
    write_video(tmp / "v.mp4", frames)
    ds = ta.ClipDataset([ta.Item(tmp / "v.mp4", 0, "v")] * max(a.batch_size, a.decode_clips), args, "train")
    ds[0]
    t0 = time.perf_counter()
    clips = [ds[i][0] for i in range(a.decode_clips)]
    decode_s = (time.perf_counter() - t0) / a.decode_clips
    u8 = torch.stack([clips[i % len(clips)] for i in range(a.batch_size)]).to(dev)
    y = torch.arange(a.batch_size, device=dev) % 51

    model = ta.build_model(args, 51).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    amp = a.amp and dev.type == "cuda"
    phases = ["normalize", "static_clip", "forward_motion", "forward_static", "gradient_penalty", "backward", "opt_step"]

    def albar_step():
        t = {}

        def mark(name, t_prev):
            sync(dev)
            now = time.perf_counter()
            t[name] = now - t_prev
            return now

        sync(dev)
        t0 = time.perf_counter()
        x = ta.normalize(u8)
        t0 = mark("normalize", t0)
        tbar = ta.static_frame_index("middle", u8.shape[2], u8.shape[0])
        xbar = ta.make_static(u8, tbar).detach().requires_grad_(True)
        t0 = mark("static_clip", t0)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            z = model(x)
        t0 = mark("forward_motion", t0)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            zbar = model(xbar)
        t0 = mark("forward_static", t0)
        grad = torch.autograd.grad(zbar.sum(), xbar, create_graph=True)[0]
        gp = ta.gradient_penalty(grad, "column")
        t0 = mark("gradient_penalty", t0)
        ce_s, ent = ta.static_terms(zbar, y)
        loss = torch.nn.functional.cross_entropy(z.float(), y) - ce_s + 4.25 * ent + 10 * gp
        loss.backward()
        t0 = mark("backward", t0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("opt_step", t0)
        return t

    def ce_step():
        sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            z = model(ta.normalize(u8))
        torch.nn.functional.cross_entropy(z.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        return time.perf_counter() - t0

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(a.warmup):
        albar_step()
    runs = [albar_step() for _ in range(a.iters)]
    split = {k: float(np.mean([r[k] for r in runs])) for k in phases}
    step_s = sum(split.values())
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    for _ in range(a.warmup):
        ce_step()
    ce_s = float(np.mean([ce_step() for _ in range(a.iters)]))
    res = {
        "bench": "albar_step", "arch": a.arch, "device": str(dev), "amp_bf16": amp, "threads": a.threads,
        "batch": [a.batch_size, 3, a.num_frames, a.crop, a.crop], "iters": a.iters, "warmup": a.warmup,
        "albar_step_ms": 1000 * step_s, "split_ms": {k: 1000 * v for k, v in split.items()},
        "ce_only_step_ms": 1000 * ce_s, "albar_over_ce": step_s / ce_s,
        "clips_per_s": a.batch_size / step_s,
        "decode_ms_per_clip": 1000 * decode_s, "decode_clips_per_s_per_worker": 1 / decode_s,
        "workers_needed_to_keep_up": (a.batch_size / step_s) * decode_s,
        "video": {"hw": a.video_size, "frames": a.video_frames, "codec": "mpeg4"},
        "peak_mem_gib": peak, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "ops_backend": getattr(ta.ops, "get_backend", lambda: "?")(),
        "load_avg": os.getloadavg(),
    }
    out = Path(a.out or f"bench/results/albar_step_{dev.type}_{a.arch}_b{a.batch_size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
