"""Synthetic static-bias video benchmark (offline ALBAR demo), written in the real on-disk formats.

Each class is a motion: a small bright square (6x6 px) moving right / left / down / up (1.5 px per
frame) / clockwise / counter-clockwise (radius 5) on a torus (it wraps around the frame edges),
starting at a uniformly random position, so one single frame says nothing about the class. Each
video sits on a static texture (an oriented sinusoidal grating with two colours); in train (and in
the IID test) the texture is the class's own with probability `bias` (0.95), otherwise another
class's. The bias sets mirror the real protocol (albar spec §6):

- SCUBA `Other`:  the motion of every test video on the texture of another (random) class;
- SCUBA `Unseen`: the same motions on textures that never occur in training;
- SCUFO:          one uniformly chosen frame of each SCUBA item (the static clip's source).

Files (all under `root`):
  videos/<split>/synth_<split>_<i>.mp4     PyAV-encoded (common.video.write_video)
  train.txt, test.txt                      `<relpath> <label>` lists (the generic `--dataset list` format)
  bias/SYNTH_SCUBA_Other/<video>__0.zip    JPEG frames in sorted member order (StillMix/ALBAR format)
  bias/SYNTH_SCUFO_Other/<video>__0.jpg    written here; for `Unseen` the SCUFO folder is left out
  bias/SYNTH_SCUBA_Unseen/<video>__0.zip   on purpose so the loader's SCUFO-from-SCUBA fallback runs
  meta.json                                generation parameters; a cache with other parameters is rebuilt
"""
import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np

CLASS_NAMES = ["right", "left", "down", "up", "clockwise", "counterclockwise"]
NUM_CLASSES = len(CLASS_NAMES)
SPEED, OBJ = 1.5, 6  # px per frame of the linear motions; side of the white square (px)


def trajectory(label, num_frames, rng, size):
    """(T, 2) integer (y, x) positions of the object's top-left corner for class `label`.
    Lines move SPEED px per frame: 1.5 keeps the step inside a 3x3x3 kernel's reach after one
    stride-2 layer, so a small 3D CNN learns the motion in a few hundred steps (at 2.5 px with a
    4 px object it needed > 1,000 steps even without any background bias)."""
    y0, x0 = rng.uniform(0, size, size=2)
    t = np.arange(num_frames, dtype=np.float64)
    if label == 0:
        ys, xs = y0 + 0 * t, x0 + SPEED * t
    elif label == 1:
        ys, xs = y0 + 0 * t, x0 - SPEED * t
    elif label == 2:
        ys, xs = y0 + SPEED * t, x0 + 0 * t
    elif label == 3:
        ys, xs = y0 - SPEED * t, x0 + 0 * t
    else:
        radius, phase = 5.0, rng.uniform(0, 2 * math.pi)
        direction = 1.0 if label == 4 else -1.0
        ang = phase + direction * t * 2 * math.pi / 8
        ys, xs = y0 + radius * np.sin(ang), x0 + radius * np.cos(ang)
    return np.stack([np.round(ys), np.round(xs)], axis=1).astype(np.int64) % size


def texture(tex_id, size, rng, unseen=False):
    """A (size, size, 3) float texture: oriented grating between two colours, random phase."""
    k = tex_id + (0.5 if unseen else 0.0)
    angle = math.pi * k / NUM_CLASSES
    freq = 2 * math.pi / (5.0 + 1.5 * (tex_id % 3) + (1.0 if unseen else 0.0))
    palette = np.random.default_rng(1000 + tex_id + (500 if unseen else 0))
    c1, c2 = palette.uniform(30, 200, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    wave = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    w = (wave + 1) / 2
    return w[..., None] * c1 + (1 - w[..., None]) * c2


def render(label, tex, num_frames, size, rng, traj=None, obj=OBJ, noise=4.0):
    """uint8 (T, size, size, 3): the class motion of a white square over the static texture."""
    traj = trajectory(label, num_frames, rng, size) if traj is None else traj
    frames = np.repeat(tex[None], num_frames, axis=0).copy()
    sprite = np.zeros((size, size), bool)
    sprite[:obj, :obj] = True
    for t, (y, x) in enumerate(traj):
        frames[t][np.roll(sprite, (int(y), int(x)), axis=(0, 1))] = 250.0
    frames += rng.normal(0, noise, size=frames.shape)
    return np.clip(np.round(frames), 0, 255).astype(np.uint8), traj


def _jpeg_bytes(frame, quality=95):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_frames_zip(path, frames):
    """A SCUBA item: one JPEG per frame, members named so sorted order = time order."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for t, f in enumerate(frames):
            z.writestr(f"frame{t + 1:06d}.jpg", _jpeg_bytes(f))


def write_jpeg(path, frame):
    Path(path).write_bytes(_jpeg_bytes(frame))


def build(root, *, num_train=3750, num_test=500, num_frames=8, size=32, bias=0.95, seed=0):
    """Generate the benchmark under `root` (skipped when `root/meta.json` has the same parameters)."""
    from common.video import write_video

    root = Path(root)
    meta = dict(version=3, speed=SPEED, obj=OBJ, num_train=num_train, num_test=num_test, num_frames=num_frames,
                size=size, bias=bias, seed=seed, classes=CLASS_NAMES)
    if (root / "meta.json").is_file() and json.loads((root / "meta.json").read_text()) == meta:
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", num_train), ("test", num_test)):
        (root / "videos" / split).mkdir(parents=True)
        lines = []
        test_items = []
        for i in range(n):
            label = i % NUM_CLASSES
            tex_id = label if rng.random() < bias else int(rng.choice([c for c in range(NUM_CLASSES) if c != label]))
            frames, traj = render(label, texture(tex_id, size, rng), num_frames, size, rng)
            rel = f"videos/{split}/synth_{split}_{i:05d}.mp4"
            write_video(root / rel, frames, fps=25)
            lines.append(f"{rel} {label}")
            test_items.append((f"synth_{split}_{i:05d}", label, traj))
        (root / f"{split}.txt").write_text("# synthetic biased-motion benchmark: <relpath> <label>\n"
                                           + "\n".join(lines) + "\n")
    # bias sets built from the test videos' motions (same trajectories, new backgrounds)
    for kind in ("Other", "Unseen"):
        scuba = root / "bias" / f"SYNTH_SCUBA_{kind}"
        scuba.mkdir(parents=True)
        scufo = root / "bias" / f"SYNTH_SCUFO_{kind}"
        if kind == "Other":
            scufo.mkdir(parents=True)
        for vid, label, traj in test_items:
            if kind == "Other":
                tex = texture(int(rng.choice([c for c in range(NUM_CLASSES) if c != label])), size, rng)
            else:
                tex = texture(int(rng.integers(NUM_CLASSES)), size, rng, unseen=True)
            frames, _ = render(label, tex, num_frames, size, rng, traj=traj)
            write_frames_zip(scuba / f"{vid}__0.zip", frames)
            if kind == "Other":
                write_jpeg(scufo / f"{vid}__0.jpg", frames[int(rng.integers(num_frames))])
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return root
