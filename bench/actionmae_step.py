"""ActionMAE benchmarks (spec §9): one training step at the official size, and the masking path.

1. step: ActionMAE (ResNet-34 streams, 3 modalities x 16 frames x 224^2, sum fusion, 4 memory
   tokens) forward + backward + AdamW step; clips/s and peak memory. The official batch is 8 per
   GPU; on CPU the default is batch 1 (a CPU cannot do batch 8 in reasonable time; the JSON says
   which batch was used).
2. masking: the encoder gather + decoder restore (forward + backward) at frame-token sizes
   (N 8, M 3, T 16: L 48, L_keep in {16, 32, 48}, D 512) with
     - `common.ops` (compiled kernels when `common._C` is built, else its reference),
     - `common.ops_reference` (torch.gather with an expanded index),
     - the eager MAE-style code (index widened with `repeat`, restore via cat + gather).
   It also reports the masking share of the step, which is what decides whether fusing matters.

Writes JSON (default bench/results/actionmae_step_<device>.json); never asserts timings.

    python bench/actionmae_step.py --device cpu --batch-size 1
    python bench/actionmae_step.py --device cuda --batch-size 8 --amp
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_actionmae as am  # noqa: E402
from common import config  # noqa: E402
from common import ops, ops_reference  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def bench_step(a, device):
    argv = ["--modalities", "rgb,depth,ir", "--arch", "resnet34", "--num-frames", str(a.frames),
            "--img-size", str(a.img_size), "--token-granularity", a.granularity, "--device", str(device)]
    if a.amp:
        argv.append("--amp")
    args = am.resolve_args(config.parse_args(am.build_parser(), argv))
    net = am.Net(args, 60).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=1e-4)
    N, T, S = a.batch_size, a.frames, a.img_size
    g = torch.Generator().manual_seed(0)
    batch = {m: torch.randn(N, T, 3, S, S, generator=g).to(device) for m in args.modalities}
    batch["valid"] = torch.ones(N, T, dtype=torch.bool, device=device)
    batch["label"] = torch.randint(0, 60, (N,), generator=g).to(device)

    def step():
        with am.autocast(args, device):
            out = net(batch, 2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cpu0 = time.process_time()
    sec = timeit(step, device, a.step_warmup, a.step_iters)
    res = {"batch_size": N, "frames": T, "img_size": S, "modalities": list(args.modalities),
           "token_granularity": a.granularity, "amp": bool(a.amp),
           "num_params": sum(p.numel() for p in net.parameters()),
           "sec_per_step": sec, "clips_per_s": N / sec,
           "cpu_s_per_step": (time.process_time() - cpu0) / (a.step_warmup + a.step_iters)}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        res["rss_growth_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20
    return res


def mae_style_gather(x, ids_keep):
    """facebookresearch/mae: index widened to D with repeat."""
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))


def mae_style_restore(y, ids_restore, mask_token):
    N, L = ids_restore.shape
    D = y.shape[-1]
    mask_tokens = mask_token.reshape(1, 1, D).repeat(N, L - y.shape[1], 1)
    y_ = torch.cat([y, mask_tokens], dim=1)
    return torch.gather(y_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))


def bench_masking(a, device, dtype):
    N, M, T, D = 8, 3, a.frames, 512
    impls = {"common.ops": (ops.masked_gather, ops.masked_restore),
             "ops_reference": (ops_reference.masked_gather, ops_reference.masked_restore),
             "mae_eager": (mae_style_gather, mae_style_restore)}
    rows = []
    for K in (1, 2, 3):
        torch.manual_seed(0)
        X = torch.randn(N, M * T, D, device=device, dtype=dtype, requires_grad=True)
        mu = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)
        ids_keep, ids_restore = am.train_ids(N, M, K, T, device, ops.random_masking)
        row = {"L": M * T, "L_keep": K * T, "D": D, "N": N, "dtype": str(dtype).replace("torch.", "")}
        outs = {}
        for name, (gather, restore) in impls.items():
            def fwd_bwd():
                X.grad = mu.grad = None
                out = restore(gather(X, ids_keep), ids_restore, mu)
                out.backward(torch.ones_like(out))
                return out
            outs[name] = fwd_bwd().detach()
            row[f"{name}_us"] = 1e6 * timeit(fwd_bwd, device, a.mask_warmup, a.mask_iters)
        row["bitwise_equal_to_mae_eager"] = bool(torch.equal(outs["common.ops"], outs["mae_eager"]))
        row["speedup_ops_vs_mae_eager"] = row["mae_eager_us"] / row["common.ops_us"]
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="0 = 8 on GPU (official), 1 on CPU")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--granularity", default="frame", choices=["modality", "frame"])
    p.add_argument("--amp", action="store_true", help="bf16 autocast in the step")
    p.add_argument("--step-warmup", type=int, default=1)
    p.add_argument("--step-iters", type=int, default=2)
    p.add_argument("--mask-warmup", type=int, default=20)
    p.add_argument("--mask-iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    a.batch_size = a.batch_size or (8 if device.type == "cuda" else 1)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "ops_backend": ops.get_backend(), "ops_ext_available": ops.has_ext(device.type),
              "ops_build": ops.BUILD_INFO, "note_cpu_batch": None}
    if device.type == "cpu":
        result["note_cpu_batch"] = (f"CPU step at batch {a.batch_size} (official: 8 per GPU); the machine may be "
                                    "shared, so wall times are upper bounds")
    dtypes = [torch.float32, torch.bfloat16]
    result["masking"] = [r for dt in dtypes for r in bench_masking(a, device, dt)]
    if not a.skip_step:
        result["step"] = bench_step(a, device)
        fused = [r for r in result["masking"] if r["dtype"] == ("bfloat16" if a.amp else "float32")]
        mean_us = sum(r["common.ops_us"] for r in fused) / len(fused)
        result["masking_share_of_step"] = mean_us * 1e-6 / result["step"]["sec_per_step"]
    out = Path(a.out or Path(__file__).parent / "results" / f"actionmae_step_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
