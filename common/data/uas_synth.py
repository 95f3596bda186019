"""Synthetic "animal behaviour" clips for the UAS demo and tests, PyAV-encoded in the real list format.

Each class is a motion pattern of one textured blob (the "animal") over a textured background with
a static distractor blob: the classes differ in how the blob moves, not in how it looks, so a
classifier has to use the temporal dimension. Files are cached: a second call with the same
parameters reuses them (meta.json records the parameters).

Layout written under `root`:
    videos/<class>/<class>_<i>.mp4
    train.txt / val.txt / test.txt     "videos/<class>/<class>_<i>.mp4 <label>"  (one per line)
    class_names.txt
"""
import json
import math
from pathlib import Path

import numpy as np

from common import video

BEHAVIOURS = ["sitting", "walking", "climbing up", "climbing down", "jumping", "pacing", "running",
              "circling", "approaching", "retreating"]
# Horizontal direction is random per clip (the official train augmentation flips left-right, so a
# left/right distinction would be label noise); up/down and growing/shrinking are not flipped.


def _trajectory(cls, t, n, h, w, p):
    """Centre (y, x) and scale of the blob at frame t of n for behaviour `cls`."""
    u = t / max(n - 1, 1)
    s, d = p["speed"], p["dir"]
    y0, x0 = p["y0"], p["x0"]
    name = BEHAVIOURS[cls]
    if name == "sitting":
        return y0 + p["jit"][t, 0], x0 + p["jit"][t, 1], 1.0
    if name == "walking":
        return y0, x0 + d * (-0.2 + 0.4 * u) * w * s, 1.0
    if name == "climbing up":
        return y0 + (0.25 - 0.5 * u) * h * s, x0, 1.0
    if name == "climbing down":
        return y0 + (-0.25 + 0.5 * u) * h * s, x0, 1.0
    if name == "jumping":
        return y0 - 0.3 * h * abs(math.sin(2 * math.pi * p["freq"] * u + p["phase"])), x0, 1.0
    if name == "pacing":
        return y0, x0 + 0.25 * w * math.sin(2 * math.pi * p["freq"] * u + p["phase"]), 1.0
    if name == "running":
        return y0, (x0 + d * (-0.45 + 1.0 * s * u) * w) % w, 1.0
    if name == "circling":
        a = d * 2 * math.pi * u * s + p["phase"]
        return y0 + 0.2 * h * math.sin(a), x0 + 0.2 * w * math.cos(a), 1.0
    if name == "approaching":
        return y0, x0, 0.6 + 0.9 * u
    if name == "retreating":
        return y0, x0, 1.5 - 0.9 * u
    raise ValueError(cls)


def _smooth_noise(h, w, gen, cells=6):
    coarse = gen.uniform(0, 1, (cells, cells, 3))
    ys = np.linspace(0, cells - 1, h)
    xs = np.linspace(0, cells - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, cells - 1), np.minimum(x0 + 1, cells - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x1] * fx
    bot = coarse[y1][:, x0] * (1 - fx) + coarse[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


def make_clip(cls, gen, frames=24, size=64):
    """uint8 (T, H, W, 3): H = size, W = 1.25 size (both even)."""
    h, w = size, int(size * 1.25) // 2 * 2
    bg = (50 + 70 * _smooth_noise(h, w, gen)).astype(np.float32)
    colour = gen.uniform(170, 255, 3)
    radius = gen.uniform(0.16, 0.2) * size
    p = {"speed": gen.uniform(0.7, 1.1), "y0": gen.uniform(0.35, 0.65) * h, "x0": gen.uniform(0.35, 0.65) * w,
         "freq": gen.uniform(1.5, 2.5), "phase": gen.uniform(0, 2 * math.pi),
         "jit": gen.normal(0, 0.6, (frames, 2)), "dir": float(gen.choice([-1, 1]))}
    dy, dx = gen.uniform(0.1, 0.9) * h, gen.uniform(0.1, 0.9) * w  # static distractor
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        img = bg.copy()
        d = ((yy - dy) ** 2 + (xx - dx) ** 2) < (0.4 * radius) ** 2
        img[d] = 0.5 * img[d] + 0.5 * colour[::-1]
        cy, cx, s = _trajectory(cls, t, frames, h, w, p)
        r = radius * s
        body = ((yy - cy) / (0.8 * r)) ** 2 + ((xx - cx) / r) ** 2 < 1
        img[body] = colour
        img += gen.normal(0, 4, img.shape)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_dataset(root, num_classes=6, per_class=24, frames=24, size=64, seed=1234, corrupt=1):
    """Write (or reuse) the dataset; val and test get per_class // 3 videos per class each.
    `corrupt` train entries point at truncated files (exercise skip-and-count). Returns paths + names."""
    if not 2 <= num_classes <= len(BEHAVIOURS):
        raise ValueError(f"num_classes {num_classes}: expected 2..{len(BEHAVIOURS)}")
    root = Path(root)
    params = dict(num_classes=num_classes, per_class=per_class, frames=frames, size=size, seed=seed,
                  corrupt=corrupt, version=3)
    info = {"root": str(root), "train": str(root / "train.txt"), "val": str(root / "val.txt"),
            "test": str(root / "test.txt"), "num_classes": num_classes, "class_names": BEHAVIOURS[:num_classes]}
    meta = root / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()) == params:
        return info
    n_eval = max(per_class // 3, 1)
    lists = {"train": [], "val": [], "test": []}
    for c in range(num_classes):
        gen = np.random.default_rng([seed, c])
        name = BEHAVIOURS[c].replace(" ", "_")
        for i in range(per_class + 2 * n_eval):
            rel = f"videos/{name}/{name}_{i:03d}.mp4"
            video.write_video(root / rel, make_clip(c, gen, frames, size), fps=12)
            split = "train" if i < per_class else ("val" if i < per_class + n_eval else "test")
            lists[split].append(f"{rel} {c}")
    for k in range(corrupt):
        rel = f"videos/corrupt_{k}.mp4"
        (root / rel).write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
        lists["train"].append(f"{rel} 0")
    for split, lines in lists.items():
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "class_names.txt").write_text("\n".join(BEHAVIOURS[:num_classes]) + "\n")
    meta.write_text(json.dumps(params))
    return info
