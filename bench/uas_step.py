"""One UAS LoRA training step (forward + backward + AdamW step) on Swin3D, per LoRA implementation.

    python bench/uas_step.py                                   # full Swin-B, batch 2 x 32 x 224^2 (heavy on CPU)
    python bench/uas_step.py --batch 1 --frames 16 --size 112  # a CPU-sized run
    python bench/uas_step.py --device cuda --batch 8 --dtype bf16

Implementations (spec §3.5, §9):
    fused      qkv = common.ops.lora_linear(x, W, b, [Aq;Av], B)  (compiled kernel when built, else its reference)
    weight     W_eff = W + s[BqAq; 0; BvAv] handed to torchvision's functional (the reference path)
    unfused    qkv = F.linear(x, W, b) + s F.linear(F.linear(x, A), B)  (peft-like eager, ops backend "ref")

Writes JSON (clips/s, step seconds, peak memory) to --out. Timings are measurements, never asserted.
"""
import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_uas as U  # noqa: E402
from common import ops  # noqa: E402


def build(args, impl):
    torch.manual_seed(0)
    model = U.VideoSwin(args.num_classes, embed_dim=args.embed_dim, depths=args.depths, num_heads=args.num_heads,
                        window_size=args.window_size)
    U.add_lora(model, rank=args.rank, impl="weight" if impl == "weight" else "fused")
    U.set_trainable(model, "lora")
    return model.to(args.device).train()


def peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def run(args, impl):
    dev = torch.device(args.device)
    model = build(args, impl)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.05)
    x = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=dev)
    y = torch.randint(0, args.num_classes, (args.batch,), device=dev)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ops.set_backend("ref" if impl == "unfused" else "auto")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(args.warmup + args.iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    ops.set_backend("auto")
    step = sorted(times)[len(times) // 2]
    res = {"impl": impl, "step_s_median": step, "step_s_all": times, "clips_per_s": args.batch / step,
           "peak_mem_mb": peak_mem_mb(dev), "loss": loss.item()}
    del model, opt
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--depths", type=U.int_list(0), default=[2, 2, 18, 2])
    p.add_argument("--num-heads", type=U.int_list(0), default=[4, 8, 16, 32])
    p.add_argument("--window-size", type=U.int_list(3), default=[8, 7, 7])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=103)
    p.add_argument("--impls", default="fused,weight,unfused")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/uas_step.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for impl in args.impls.split(","):
        r = run(args, impl)
        print(f"{impl:8s} step {r['step_s_median']:.3f} s  {r['clips_per_s']:.3f} clips/s  peak {r['peak_mem_mb']:.0f} MB")
        results.append(r)
    base = {r["impl"]: r for r in results}
    if "fused" in base:
        for r in results:
            r["speedup_fused_vs_this"] = r["step_s_median"] / base["fused"]["step_s_median"]
    out = {"bench": "uas_step", "config": vars(args), "ops_backend": ops.get_backend(), "has_ext": ops.has_ext(args.device.split(":")[0]),
           "build_info": ops.BUILD_INFO, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "note": "CPU peak memory is the process peak RSS (cumulative over impls run in this process)",
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
