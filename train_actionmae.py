"""ActionMAE: missing-modality-robust multi-modal action recognition (Woo et al., AAAI 2023).

Spec: specs/actionmae.md. One script, read from main() down:

    data (NTU-60/120, NW-UCLA, UWA3D, CSV list, or --synthetic) -> per-modality streams
    (ResNet per frame + temporal transformer -> one token per modality, or per frame) ->
    ActionMAE (drop a random number of modality tokens per sample, encode the kept ones with
    memory tokens, decode the dropped ones from one shared mask token) -> fusion -> CE + MSE.

Evaluation runs every non-empty modality subset as the fixed input set of the whole test set.
`--model baseline` is plain fusion on all modalities; `--model baseline-dropout` is the same with
the modality drop but no reconstruction (the control that isolates reconstruction).

`python train_actionmae.py demo` runs the offline synthetic benchmark (spec §7.2): baseline,
dropout control and ActionMAE x 3 seeds, and writes runs/actionmae_demo/summary.json.
"""
import argparse
import csv
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint as ckpt
from common import config, dist
from common import logging as clog
from common import metrics

CANONICAL = ("rgb", "depth", "ir", "skeleton")
SYNTH = ("a", "b", "c")
LETTER = {"rgb": "r", "depth": "d", "ir": "i", "skeleton": "s", "a": "a", "b": "b", "c": "c"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = {"ntu60": 60, "ntu120": 120, "nw_ucla": 10, "uwa3d": 30}
DATASET_MODALITIES = {"ntu60": CANONICAL, "ntu120": CANONICAL, "nw_ucla": ("rgb", "depth"),
                      "uwa3d": ("rgb", "depth"), "list": CANONICAL}
NTU60_XSUB_TRAIN = {1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38}
NTU120_XSUB_TRAIN = NTU60_XSUB_TRAIN | {45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78,
                                        80, 81, 82, 83, 84, 85, 86, 89, 91, 92, 93, 94, 95, 97, 98, 100, 103}
NW_UCLA_ACTIONS = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 8: 6, 9: 7, 11: 8, 12: 9}
UWA3D_EXCLUDE = {"a21_s02_v04_e01", "a06_s06_v04_e01", "a02_s06_v03_e01", "a07_s02_v02_e01", "a16_s06_v02_e01"}
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_EXT = (".avi", ".mp4", ".mkv", ".mov", ".webm")
NTU_ID = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")
DEFAULT_MILESTONES = "30,60,80,90,120,150,180"
NTU_RGB_SIZE = (480, 270)  # (w, h) of the NTU rgb frames the recipe expects (spec §2.2)


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_common_args(p, epochs=200, batch_size=8, lr=1e-4, seed=1, workers=4,
                           output_dir="runs/actionmae", data_root="data/ntu")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="ntu60", choices=["ntu60", "ntu120", "nw_ucla", "uwa3d", "list"])
    g.add_argument("--split", default="xsub", choices=["xsub", "xview", "xset"])
    g.add_argument("--modalities", default="rgb,depth",
                   help="comma list of rgb,depth,ir,skeleton (synthetic: a,b,c); canonicalised")
    g.add_argument("--rgb-dir", default="", help="NTU rgb root (default <data-root>/rgb)")
    g.add_argument("--depth-dir", default="", help="NTU depth root (default <data-root>/depth_color)")
    g.add_argument("--ir-dir", default="", help="NTU ir root (default <data-root>/ir)")
    g.add_argument("--skeleton-dir", default="", help="NTU skeleton root (default <data-root>/skeleton)")
    g.add_argument("--missing-skeletons", default="", help="file with one NTU id per line to drop when skeleton is used")
    g.add_argument("--train-list", default="", help="--dataset list: CSV id,label,rgb,depth,ir,skeleton")
    g.add_argument("--val-list", default="")
    g.add_argument("--test-list", default="")
    g.add_argument("--val-fraction", type=float, default=0.05, help="class-stratified val split of train; 0 = select last")
    g.add_argument("--split-seed", type=int, default=0)
    g.add_argument("--select-on-test", action="store_true", help="official (B9): pick best.pth on the test set")
    g.add_argument("--synthetic-train", type=int, default=4000, help="--synthetic: train samples (val carved out)")
    g.add_argument("--synthetic-test", type=int, default=2000, help="--synthetic: test samples")
    g.add_argument("--synthetic-data", default="redundant", choices=["redundant", "offset"],
                   help="--synthetic benchmark: 'redundant' (spec §7.2) or 'offset' (b and c share an offset that "
                        "only reading them together removes; see common/data/multimodal_synthetic.py)")
    g.add_argument("--num-frames", type=int, default=16)
    g.add_argument("--img-size", type=int, default=224)
    g.add_argument("--no-temporal-aug", dest="temporal_aug", action="store_false",
                   help="train with the deterministic test sampling instead of random sorted indices")
    g.add_argument("--frame-sync", default="proportional", choices=["proportional", "first"],
                   help="modality with another frame count: floor(idx*n_m/n), or reuse idx (official)")
    g.add_argument("--depth-colormap", default="jet", choices=["jet", "gray"])
    g.add_argument("--aug-per-frame", action="store_true", help="official (B6): random crop/jitter per frame")
    g.add_argument("--official-ntu120-test", action="store_true",
                   help="official (B7): NTU-120 test = random sampling, rgb CenterCrop 224 without zoom")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="actionmae", choices=["actionmae", "baseline", "baseline-dropout"])
    g.add_argument("--arch", default="resnet34", choices=["resnet34", "resnet18"])
    g.add_argument("--fusion", default="sum", choices=["sum", "concat", "transformer"])
    g.add_argument("--num-mem-tokens", type=int, default=4)
    g.add_argument("--token-granularity", default="modality", choices=["modality", "frame"])
    g.add_argument("--enc-depth", type=int, default=2)
    g.add_argument("--dec-depth", type=int, default=2)
    g.add_argument("--temporal-depth", type=int, default=2)
    g.add_argument("--fusion-depth", type=int, default=4)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--drop-path", type=float, default=0.1)
    g = p.add_argument_group("objective and schedule")
    g.add_argument("--keep-min", type=int, default=1)
    g.add_argument("--keep-max", type=int, default=0, help="0 = M (all modalities)")
    g.add_argument("--w-cls", type=float, default=1.0)
    g.add_argument("--w-rec", type=float, default=1.0)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--lr-scaling", default="per-gpu", choices=["per-gpu", "global", "none"],
                   help="effective LR = lr*batch/32 (per-gpu), lr*batch*world/32 (global, B10), or lr")
    g.add_argument("--lr-schedule", default="step", choices=["step", "onecycle"],
                   help="step: linear warmup + x0.1 at milestones; onecycle: torch OneCycleLR (demo)")
    g.add_argument("--warmup-epochs", type=float, default=5)
    g.add_argument("--lr-milestones", default=DEFAULT_MILESTONES)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"])
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-batch-size", type=int, default=8)
    g.add_argument("--eval-every", type=int, default=1)
    g.add_argument("--eval-subsets", default="all", help="'all' or comma list of subset labels, e.g. r,d,rd")
    g.add_argument("--no-fused-ops", action="store_true", help="use the pure-PyTorch masking references")
    g = p.add_argument_group("official quirks (spec §10), all off by default")
    g.add_argument("--official-quirks", action="store_true", help="turn on B1-B7 (model, eval and data quirks)")
    g.add_argument("--official-pos", action="store_true", help="B1: no temporal, modality or fusion position")
    g.add_argument("--official-pad", action="store_true", help="B2: attention ignores padded frames")
    g.add_argument("--official-eval-slots", action="store_true", help="B3: eval puts kept tokens in slots 0..K-1")
    g.add_argument("--official-full-slots", action="store_true", help="B4: K = M reads the first M encoder outputs")
    g.add_argument("--fusion-input", default="mixed", choices=["mixed", "decoder"],
                   help="mixed: kept originals + reconstructions; decoder: all decoder outputs (B5)")
    g.add_argument("--rec-target-grad", action="store_true", help="B5: do not detach the reconstruction target")
    for action in p._actions:  # --help shows every default
        if action.option_strings and action.dest != "help" and "%(default)" not in (action.help or ""):
            action.help = ((action.help + " ") if action.help else "") + "(default: %(default)s)"
    return p


def parse_modalities(text, synthetic):
    allowed = SYNTH if synthetic else CANONICAL
    names = [t for t in re.split(r"[,_+ ]+", text.strip().lower()) if t]
    if synthetic and names and set(names) <= set(CANONICAL) | {"rgb_depth"}:
        names = list(SYNTH)  # the real-data default does not apply to the synthetic benchmark
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"--modalities {text!r}: unknown modality {bad or text!r}; choose from {','.join(allowed)}")
    return tuple(m for m in allowed if m in names)


def all_subsets(modalities):
    """Non-empty subsets as index tuples, by size then canonical order (r d i rd ri di rdi)."""
    M = len(modalities)
    return [c for k in range(1, M + 1) for c in itertools.combinations(range(M), k)]


def subset_name(subset, modalities):
    return "".join(LETTER[modalities[m]] for m in subset)


def parse_subsets(text, modalities):
    subsets = all_subsets(modalities)
    if text == "all":
        return subsets
    by_name = {subset_name(s, modalities): s for s in subsets}
    letters = {LETTER[m]: m for m in modalities}
    out = []
    for name in [t.strip() for t in text.split(",") if t.strip()]:
        unknown = [c for c in name if c not in letters]
        if unknown:
            raise ValueError(f"--eval-subsets: subset {name!r} names unknown modality {unknown[0]!r}; "
                             f"this run has {', '.join(f'{k}={v}' for k, v in letters.items())}")
        key = "".join(LETTER[m] for m in modalities if LETTER[m] in name)
        out.append(by_name[key])
    return out


def resolve_args(args):
    """Apply --official-quirks, canonicalise modalities, check ranges."""
    if args.official_quirks:
        args.official_pos = args.official_pad = args.official_eval_slots = True
        args.official_full_slots = args.rec_target_grad = args.aug_per_frame = True
        args.official_ntu120_test = True
        args.fusion_input = "decoder"
    args.modalities = parse_modalities(args.modalities, args.synthetic)
    if not args.synthetic and args.dataset != "list":
        allowed = DATASET_MODALITIES[args.dataset]
        bad = [m for m in args.modalities if m not in allowed]
        if bad:
            raise ValueError(f"--dataset {args.dataset} has no modality {bad}; it has {','.join(allowed)}")
    M = len(args.modalities)
    args.keep_max = args.keep_max or M
    if not 1 <= args.keep_min <= args.keep_max <= M:
        raise ValueError(f"need 1 <= --keep-min ({args.keep_min}) <= --keep-max ({args.keep_max}) <= M ({M})")
    args.eval_subset_ids = parse_subsets(args.eval_subsets, args.modalities)
    args.milestones = [int(x) for x in str(args.lr_milestones).split(",") if x.strip()]
    return args


# ----------------------------------------------------------------------------------------------
# Data: frame files, skeletons, sampling, preprocessing


def frame_number(path):
    nums = re.findall(r"\d+", Path(path).stem)
    return int(nums[-1]) if nums else -1


def list_frames(folder, sample_id, modality, suffix=""):
    """Image files of a frame folder sorted by their (last) integer; errors name sample + modality."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"sample {sample_id}: {modality} frame folder not found: {folder}")
    files = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXT and f.name.endswith(suffix)]
    if not files:
        raise FileNotFoundError(f"sample {sample_id}: {modality} folder {folder} has no frames"
                                f"{' ending in ' + suffix if suffix else ''} ({'/'.join(IMAGE_EXT)})")
    return sorted(files, key=lambda f: (frame_number(f), f.name))


def jet(x):
    """x in [0,1] (H,W) -> uint8 (H,W,3) with matplotlib's 'jet' piecewise-linear map."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


def load_image(path, modality, depth_colormap="jet", ntu_rgb_size=None):
    """One frame file -> uint8 (H,W,3). 1-channel depth: min-max + jet (or gray); 1-channel ir: x3."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
            mode = im.mode
    except Exception as e:  # noqa: BLE001 (PIL raises many types)
        raise OSError(f"cannot read {modality} frame {path}: {e}") from e
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        g = arr.reshape(arr.shape[0], arr.shape[1]).astype(np.float32)
        if modality == "depth" and depth_colormap == "jet":
            lo, hi = float(g.min()), float(g.max())
            arr = jet((g - lo) / (hi - lo) if hi > lo else np.zeros_like(g))
        else:
            if g.max() > 255 or mode.startswith("I"):
                lo, hi = float(g.min()), float(g.max())
                g = (g - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(g)
            arr = np.repeat(g.round().astype(np.uint8)[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise OSError(f"{modality} frame {path}: expected an RGB or 1-channel image, got array shape {arr.shape}")
    arr = np.ascontiguousarray(arr.astype(np.uint8))
    if ntu_rgb_size is not None and (arr.shape[1], arr.shape[0]) != ntu_rgb_size:
        from common import video
        arr = video.resize(arr[None], ntu_rgb_size[::-1])[0].numpy()
    return arr


def read_skeleton_text(path):
    """NTU raw `.skeleton` text -> float32 [T, 25, 3] (first body; frames without a body are zero)."""
    try:
        tokens = Path(path).read_text().split("\n")
        it = iter(tokens)
        n_frames = int(next(it))
        out = np.zeros((n_frames, 25, 3), np.float32)
        for t in range(n_frames):
            n_bodies = int(next(it))
            for b in range(n_bodies):
                next(it)  # body info
                n_joints = int(next(it))
                for j in range(n_joints):
                    vals = next(it).split()
                    if b == 0 and j < 25:
                        out[t, j] = [float(v) for v in vals[:3]]
    except (StopIteration, ValueError, IndexError) as e:
        raise OSError(f"{path}: malformed NTU .skeleton text ({type(e).__name__}: {e})") from e
    return out


def load_skeleton(path, sample_id):
    """`.skeleton` text, or `.npy` holding the official dict (`skel_body0`) or a [T,25,3] array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample {sample_id}: skeleton file not found: {path}")
    if path.suffix == ".skeleton":
        arr = read_skeleton_text(path)
    else:
        obj = ckpt.safe_np_load(path, what=f"sample {sample_id}: skeleton")  # never runs code from the file
        if obj.dtype == object and obj.shape == ():
            obj = obj.item()
        if isinstance(obj, dict):
            if "skel_body0" not in obj:
                raise KeyError(f"sample {sample_id}: skeleton {path} has no 'skel_body0' (keys {sorted(obj)})")
            obj = obj["skel_body0"]
        arr = np.asarray(obj, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1:] != (25, 3) or arr.shape[0] == 0:
        raise ValueError(f"sample {sample_id}: skeleton {path} has shape {arr.shape}, expected [T>0, 25, 3]")
    return arr


def sample_indices(n, num_frames, train, rng):
    """Spec §2.3: all frames if n < T; train: T distinct sorted indices; test: round(i n / T)."""
    if n < num_frames:
        return np.arange(n)
    if train:
        return np.sort(rng.choice(n, num_frames, replace=False))
    return np.array([round(i * n / num_frames) for i in range(num_frames)], dtype=np.int64)


def _crop(x, top, left, h, w):
    """Crop [..., H, W]; regions outside the image are zero (oversized crops zero-pad)."""
    H, W = x.shape[-2:]
    out = x.new_zeros(*x.shape[:-2], h, w)
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, H), min(left + w, W)
    if t1 > t0 and l1 > l0:
        out[..., t0 - top:t1 - top, l0 - left:l1 - left] = x[..., t0:t1, l0:l1]
    return out


def center_crop(x, size):
    H, W = x.shape[-2:]
    return _crop(x, int(round((H - size) / 2.0)), int(round((W - size) / 2.0)), size, size)


def random_crop(x, size, rng):
    H, W = x.shape[-2:]
    top = int(rng.integers(0, max(H - size, 0) + 1)) if H > size else (H - size) // 2
    left = int(rng.integers(0, max(W - size, 0) + 1)) if W > size else (W - size) // 2
    return _crop(x, top, left, size, size)


def resize(x, size):
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def color_jitter(x, rng):
    from torchvision.transforms.v2 import functional as TF
    x = TF.adjust_brightness(x, float(rng.uniform(0.5, 1.5)))
    return TF.adjust_hue(x, float(rng.uniform(-0.3, 0.3)))


def preprocess(frames, dataset, modality, train, size, rng, per_frame=False, ntu120_official_test=False):
    """uint8 (T,H,W,3) -> float (T,3,size,size), ImageNet-normalised (spec §2.4).

    Random parameters are drawn once per clip (clean) or per frame (`per_frame`, official B6).
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    if per_frame and train:
        return torch.cat([preprocess(frames[t:t + 1], dataset, modality, train, size, rng)
                          for t in range(len(frames))])
    big, small = int(1.2 * size), int(0.8 * size)
    if dataset == "uwa3d":
        if modality == "rgb":
            x = resize(_crop(x, 64, 72, 176, 176), size)
            if train:
                x = color_jitter(x, rng)
        else:
            x = resize(x, size)
        if train and rng.random() < 0.5:
            x = x.flip(-1)
    elif modality == "rgb":
        if train:
            x = resize(random_crop(center_crop(x, size), small, rng), size)
            x = color_jitter(x, rng)
            if rng.random() < 0.5:
                x = x.flip(-1)
        elif ntu120_official_test:
            x = center_crop(x, size)
        else:
            x = resize(center_crop(x, small), size)
    else:  # depth, ir
        if train:
            x = random_crop(center_crop(x, big), size, rng)
            if rng.random() < 0.5:
                x = x.flip(-1)
        else:
            x = center_crop(x, size)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


class MultiModalClips(torch.utils.data.Dataset):
    """Records -> one clip per modality, sampled and preprocessed as spec §2.3-2.4.

    MultiModalClips(records, modalities, dataset, train, args=None, seed=0):
      records     list of {"id": str, "label": int, "paths": {modality: path}}, e.g. from
                  `read_list(csv, args)` or `build_records(args)`; a path is a frame folder, a video
                  file (.avi/.mp4/...) or, for skeleton, a .skeleton/.npy file
      modalities  tuple in canonical order, e.g. ("rgb",) or ("rgb", "depth")
      dataset     "ntu60" | "ntu120" | "nw_ucla" | "uwa3d" | "list" (selects the crops of §2.4; NTU rgb
                  of any size, frames or video, is resized to 480x270 first)
      train       training sampling/augmentation (True) or the deterministic test clip (False)
      args        the script's parsed args; reads num_frames, img_size, temporal_aug, frame_sync,
                  depth_colormap, aug_per_frame, strict, official_ntu120_test. None = the defaults
      seed        base of the per-(epoch, index) augmentation RNG

    Item: {"index", "label", "valid" [T] bool, <modality>: [T,3,S,S] float (images) or [T,25,3]
    (skeleton)}, zero-padded to T frames when a video is shorter. A video is never decoded whole: its
    frame count comes from `video.num_frames` and only the sampled frames are decoded (`decode_clip`,
    resized on decode). A file that cannot be read is skipped (None, collated away and counted)
    unless `strict`.
    """

    def __init__(self, records, modalities, dataset, train, args=None, seed=0):
        args = args if args is not None else build_parser().parse_args([])
        self.records, self.modalities, self.dataset, self.train = records, tuple(modalities), dataset, train
        self.T, self.size = args.num_frames, args.img_size
        self.temporal_aug, self.frame_sync = args.temporal_aug, args.frame_sync
        self.colormap, self.per_frame, self.strict = args.depth_colormap, args.aug_per_frame, args.strict
        self.ntu120_official_test = args.official_ntu120_test and dataset == "ntu120" and not train
        self.seed, self.epoch = seed, 0
        self.frame_mismatch = 0

    def __len__(self):
        return len(self.records)

    def _source(self, rec, modality):
        """A skeleton array, a video path (decoded per clip), or the sorted frame files."""
        path = Path(rec["paths"][modality])
        if modality == "skeleton":
            return load_skeleton(path, rec["id"])
        if path.suffix.lower() in VIDEO_EXT:
            if not path.is_file():
                raise FileNotFoundError(f"sample {rec['id']}: {modality} video not found: {path}")
            return path
        suffix = {"rgb": "_rgb.jpg", "depth": "_depth_vis.jpg"}.get(modality, "") if self.dataset == "nw_ucla" else ""
        return list_frames(path, rec["id"], modality, suffix)

    def _read(self, src, idx, modality):
        """uint8 (len(idx),H,W,3) frames of a video path or a list of frame files."""
        resize_to = NTU_RGB_SIZE if modality == "rgb" and self.dataset in ("ntu60", "ntu120") else None
        if isinstance(src, Path):
            from common import video
            return video.decode_clip(src, idx, size=None if resize_to is None else resize_to[::-1])
        return np.stack([load_image(src[i], modality, self.colormap, resize_to) for i in idx])

    def _load(self, index, rng):
        from common import video
        rec = self.records[index]
        sources = {m: self._source(rec, m) for m in self.modalities}
        counts = {m: video.num_frames(s) if isinstance(s, Path) else len(s) for m, s in sources.items()}
        n = counts[self.modalities[0]]
        train_sampling = self.train and self.temporal_aug or self.ntu120_official_test
        idx = sample_indices(n, self.T, train_sampling, rng)
        item = {"index": index, "label": rec["label"]}
        valid = torch.zeros(self.T, dtype=torch.bool)
        valid[:len(idx)] = True
        item["valid"] = valid
        for m in self.modalities:
            src, n_m = sources[m], counts[m]
            if n_m != n:
                self.frame_mismatch += 1
            idx_m = idx if self.frame_sync == "first" else (idx * n_m) // n
            if idx_m.max() >= n_m:
                raise IndexError(f"sample {rec['id']}: {m} has {n_m} frames but frame {idx_m.max()} was "
                                 f"requested (--frame-sync first with unequal frame counts)")
            if m == "skeleton":
                x = torch.from_numpy(src[idx_m])
                out = x.new_zeros(self.T, 25, 3)
            else:
                x = preprocess(self._read(src, idx_m, m), self.dataset, m, self.train, self.size, rng,
                               self.per_frame, self.ntu120_official_test)
                out = x.new_zeros(self.T, 3, self.size, self.size)
            out[:len(idx_m)] = x
            item[m] = out
        return item

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index, torch.initial_seed() % 2**31])
        try:
            return self._load(index, rng)
        except (OSError, ValueError, KeyError, IndexError, RuntimeError) as e:
            if self.strict:
                raise
            warnings.warn(f"skipping sample {self.records[index]['id']}: {e}")
            return None


class SyntheticClips(torch.utils.data.Dataset):
    """The §7.2 benchmark as a dataset: {"index", "label", "valid", "a", "b", "c"}."""

    def __init__(self, arrays, indices, modalities):
        self.arrays = {m: torch.from_numpy(arrays[m]) for m in modalities}
        self.labels = torch.from_numpy(arrays["label"])
        self.indices, self.modalities = np.asarray(indices), modalities
        self.T = arrays[modalities[0]].shape[1]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        item = {"index": i, "label": int(self.labels[j]), "valid": torch.ones(self.T, dtype=torch.bool)}
        for m in self.modalities:
            item[m] = self.arrays[m][j]
        return item


def collate(batch):
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, skipped
    return torch.utils.data.default_collate(kept), skipped


# ----------------------------------------------------------------------------------------------
# Data: dataset indexing (native layouts and CSV lists)


def _dirs(root, pattern):
    return {p.name: p for p in Path(root).glob(pattern) if p.is_dir()} if Path(root).is_dir() else {}


def index_ntu(args):
    """{modality: {id: path}} for the NTU roots of spec §2.2 (frame folders, .avi, .skeleton(.npy))."""
    root = Path(args.data_root)
    roots = {"rgb": args.rgb_dir or root / "rgb", "depth": args.depth_dir or root / "depth_color",
             "ir": args.ir_dir or root / "ir", "skeleton": args.skeleton_dir or root / "skeleton"}
    found = {}
    for m in args.modalities:
        r = Path(roots[m])
        if not r.is_dir():
            raise config.InputError(f"NTU {m} root not found: {r} (set --{m}-dir or --data-root)")
        ids = {}
        if m == "rgb":
            for p in r.glob("nturgb+d_rgb_s*/frames/*_rgb"):
                ids[p.name[:-4]] = p
            for p in r.rglob("*_rgb.avi"):
                ids.setdefault(p.name[:-8], p)
        elif m == "depth":
            for p in r.glob("nturgb+d_depth_masked_s*/nturgb+d_depth_masked/*"):
                if p.is_dir():
                    ids[p.name] = p
        elif m == "ir":
            for p in r.glob("nturgb+d_ir_s*/frames/*_ir"):
                ids[p.name[:-3]] = p
            for p in r.rglob("*_ir.avi"):
                ids.setdefault(p.name[:-7], p)
        else:
            for p in r.glob("raw_txt120/*.skeleton.npy"):
                ids[p.name[:-len(".skeleton.npy")]] = p
            for p in r.glob("raw_txt120/*.skeleton"):
                ids.setdefault(p.name[:-len(".skeleton")], p)
        ids = {k: v for k, v in ids.items() if NTU_ID.fullmatch(k)}
        if not ids:
            raise config.InputError(f"NTU {m} root {r} holds no sample in the expected layout (spec §2.2)")
        found[m] = ids
    return found


def ntu_split(sample_id, dataset, split):
    """'train' / 'test' / None (not part of this dataset) for an NTU id."""
    s, c, p, _, _ = (int(x) for x in NTU_ID.fullmatch(sample_id).groups())
    if dataset == "ntu60":
        if s > 17:
            return None
        if split == "xsub":
            return "train" if p in NTU60_XSUB_TRAIN else "test"
        if split == "xview":
            return "train" if c in (2, 3) else "test"
    else:
        if split == "xsub":
            return "train" if p in NTU120_XSUB_TRAIN else "test"
        if split == "xset":
            return "train" if s % 2 == 0 else "test"
    raise ValueError(f"--dataset {dataset} has no split {split!r} (ntu60: xsub, xview; ntu120: xsub, xset)")


def pair_by_id(found, modalities, strict, what):
    """Keep ids present in every selected modality; count (or, strict, raise on) the rest."""
    all_ids = set().union(*[set(found[m]) for m in modalities])
    keep, missing = [], []
    for i in sorted(all_ids):
        lacking = [m for m in modalities if i not in found[m]]
        (missing if lacking else keep).append((i, lacking))
    if missing and strict:
        i, lacking = missing[0]
        raise config.InputError(f"{what}: sample {i} has no {', '.join(lacking)} data ({len(missing)} samples incomplete)")
    if missing:
        warnings.warn(f"{what}: skipped {len(missing)} samples missing a modality, e.g. {missing[0][0]} lacks {missing[0][1]}")
    return [i for i, _ in keep], len(missing)


def build_records(args):
    """{'train': [...], 'test': [...]} of {id, label, paths} for the selected native dataset."""
    mods = args.modalities
    splits = {"train": [], "test": []}
    skipped = 0
    if args.dataset in ("ntu60", "ntu120"):
        found = index_ntu(args)
        ids, skipped = pair_by_id(found, mods, args.strict, args.dataset)
        drop = set()
        if "skeleton" in mods and args.missing_skeletons:
            if not Path(args.missing_skeletons).is_file():
                raise config.InputError(f"--missing-skeletons {args.missing_skeletons}: file not found "
                                        f"(expected one NTU id per line)")
            drop = {ln.strip() for ln in Path(args.missing_skeletons).read_text().splitlines() if ln.strip()}
        for i in ids:
            part = ntu_split(i, args.dataset, args.split)
            if part is None or i in drop:
                continue
            splits[part].append({"id": i, "label": int(i[-3:]) - 1, "paths": {m: str(found[m][i]) for m in mods}})
    elif args.dataset == "nw_ucla":
        root = Path(args.data_root)
        found = {m: {} for m in mods}
        for view in (1, 2, 3):
            for p in sorted(_dirs(root / f"view_{view}", "a*_s*_e*").values()):
                mt = re.fullmatch(r"a(\d+)_s(\d+)_e(\d+)", p.name)
                if mt and int(mt.group(1)) in NW_UCLA_ACTIONS:
                    for m in mods:
                        suffix = "_rgb.jpg" if m == "rgb" else "_depth_vis.jpg"
                        if any(f.name.endswith(suffix) for f in p.iterdir()):
                            found[m][f"view_{view}/{p.name}"] = p
        if not any(found.values()):
            raise config.InputError(f"NW-UCLA: no view_{{1,2,3}}/a##_s##_e## folders under {root}")
        ids, skipped = pair_by_id(found, mods, args.strict, "nw_ucla")
        for i in ids:
            view, name = i.split("/")
            a = int(re.match(r"a(\d+)", name).group(1))
            splits["test" if view == "view_3" else "train"].append(
                {"id": i, "label": NW_UCLA_ACTIONS[a], "paths": {m: str(found[m][i]) for m in mods}})
    elif args.dataset == "uwa3d":
        root = Path(args.data_root)
        where = {"rgb": root / "UWA3DII_RGB" / "UWA3D-RGB", "depth": root / "UWA3DII_Depth_ROI" / "UWA3D-Depth"}
        found = {}
        for m in mods:
            if not where[m].is_dir():
                raise config.InputError(f"UWA3D {m} folder not found: {where[m]}")
            found[m] = {k: v for k, v in _dirs(where[m], "a*_s*_v*_e*").items()
                        if re.fullmatch(r"a\d+_s\d+_v\d+_e\d+", k)}
        ids, skipped = pair_by_id(found, mods, args.strict, "uwa3d")
        for i in ids:
            if set(mods) >= {"rgb", "depth"} and i in UWA3D_EXCLUDE:
                continue
            a, v = int(i[1:3]), int(re.search(r"_v(\d+)", i).group(1))
            splits["train" if v in (3, 4) else "test"].append(
                {"id": i, "label": a - 1, "paths": {m: str(found[m][i]) for m in mods}})
    else:
        raise ValueError(f"unknown dataset {args.dataset}")
    return splits, skipped


LIST_FORMAT = ("a CSV with the header id,label,rgb,depth,ir,skeleton (any order; the modality columns of the run "
               "are required), one sample per line: an id, an integer label >= 0, and per modality a path relative "
               "to --data-root (frame folder, video, .npy or .skeleton) or an empty cell")


def read_list(path, args, num_classes=None):
    """Records of a list CSV (`LIST_FORMAT`). A malformed line is an InputError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise config.InputError(f"list file not found: {path}")
    need = ["id", "label", *args.modalities]
    records, missing = [], 0
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not set(need) <= set(header):
            raise config.InputError(f"{path}:1: header {','.join(header) or '(empty)'} lacks "
                                    f"{','.join(c for c in need if c not in header)}; expected {LIST_FORMAT}")
        for cells in reader:
            where = f"{path}:{reader.line_num}"
            if not any(c.strip() for c in cells):
                continue  # blank line
            if len(cells) != len(header):
                raise config.InputError(f"{where}: {len(cells)} fields, expected {len(header)} "
                                        f"({','.join(header)}); the list must be {LIST_FORMAT}")
            row = {h: c.strip() for h, c in zip(header, cells)}
            if not row["id"]:
                raise config.InputError(f"{where}: empty id; the list must be {LIST_FORMAT}")
            try:
                label = int(row["label"])
            except ValueError:
                raise config.InputError(f"{where}: label {row['label']!r} is not an integer; "
                                        f"the list must be {LIST_FORMAT}") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise config.InputError(f"{where}: label {label} outside [0, {num_classes if num_classes else 'C'})")
            lacking = [m for m in args.modalities if not row[m]]
            if lacking:
                if args.strict:
                    raise config.InputError(f"{where}: sample {row['id']} has no {', '.join(lacking)} entry (--strict)")
                missing += 1
                continue
            records.append({"id": row["id"], "label": label,
                            "paths": {m: str(Path(args.data_root) / row[m]) for m in args.modalities}})
    if missing:
        warnings.warn(f"{path}: skipped {missing} rows missing a selected modality")
    return records, missing


def write_list(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", *CANONICAL])
        for r in records:
            w.writerow([r["id"], r["label"], *[r["paths"].get(m, "") for m in CANONICAL]])


def stratified_split(labels, fraction, seed):
    """(train_idx, val_idx): `fraction` of each class (at least one if it has >= 2) goes to val."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = int(round(fraction * len(idx)))
        if fraction > 0 and n == 0 and len(idx) >= 2:
            n = 1
        val.extend(idx[:n].tolist())
    val = np.array(sorted(val), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def build_datasets(args):
    """{'train', 'val' (or None), 'test'} datasets and the number of classes."""
    mods = args.modalities
    if args.synthetic:
        from common.data import multimodal_synthetic as syn
        tr = syn.make_split("train", args.synthetic_train, variant=args.synthetic_data)
        te = syn.make_split("test", args.synthetic_test, variant=args.synthetic_data)
        train_idx, val_idx = stratified_split(tr["label"], args.val_fraction, args.split_seed)
        sets = {"train": SyntheticClips(tr, train_idx, mods),
                "val": SyntheticClips(tr, val_idx, mods) if len(val_idx) else None,
                "test": SyntheticClips(te, np.arange(len(te["label"])), mods)}
        return sets, syn.NUM_CLASSES, 0
    if args.dataset == "list":
        if not args.train_list or not args.test_list:
            raise config.InputError("--dataset list needs --train-list and --test-list (CSV id,label,rgb,depth,ir,skeleton)")
        train, s1 = read_list(args.train_list, args)
        test, s2 = read_list(args.test_list, args)
        val, s3 = read_list(args.val_list, args) if args.val_list else (None, 0)
        num_classes = 1 + max(r["label"] for r in train + test)
        skipped = s1 + s2 + s3
    else:
        splits, skipped = build_records(args)
        train, test, val = splits["train"], splits["test"], None
        num_classes = NUM_CLASSES[args.dataset]
        if not train or not test:
            raise config.InputError(f"{args.dataset} {args.split}: found {len(train)} train and {len(test)} test "
                                    f"samples with all of {','.join(mods)} under {args.data_root}")
    if val is None and args.val_fraction > 0:
        tr_idx, va_idx = stratified_split([r["label"] for r in train], args.val_fraction, args.split_seed)
        train, val = [train[i] for i in tr_idx], [train[i] for i in va_idx]
    if dist.is_main():
        for name, recs in (("train", train), ("val", val), ("test", test)):
            if recs:
                write_list(Path(args.output_dir) / "splits" / f"{name}.csv", recs)
    ds = {"train": MultiModalClips(train, mods, args.dataset, True, args, args.seed),
          "val": MultiModalClips(val, mods, args.dataset, False, args) if val else None,
          "test": MultiModalClips(test, mods, args.dataset, False, args)}
    return ds, num_classes, skipped


# ----------------------------------------------------------------------------------------------
# Model: building blocks


def drop_path(x, p, training):
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x, key_valid=None):
        N, L, D = x.shape
        q, k, v = self.qkv(x).reshape(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(N, L, D)))


class Block(nn.Module):
    """Pre-LN ViT block (timm layout): x + DP(Attn(LN x)), x + DP(MLP(LN x)); LN eps 1e-6."""

    def __init__(self, dim, heads, mlp_dim, drop_path=0.0, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))
        self.drop_path = drop_path

    def forward(self, x, key_valid=None):
        x = x + drop_path(self.attn(self.norm1(x), key_valid), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def sinusoid(positions, dim):
    """pe(p) = [sin(p w_i); cos(p w_i)], w_i = 10000^(-i/(dim/2)) -> [len(positions), dim]."""
    p = torch.as_tensor(positions, dtype=torch.float32)[:, None]
    w = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    return torch.cat([torch.sin(p * w), torch.cos(p * w)], dim=1)


class TemporalEncoder(nn.Module):
    """CLS + position -> pre-LN blocks (padded frames masked as keys) -> LN; returns [N, 1+T, D]."""

    def __init__(self, dim, depth, heads, mlp_dim, max_frames, pos="sin", drop_path=0.1, dropout=0.0,
                 mask_padding=True):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_kind, self.mask_padding = pos, mask_padding
        if pos == "learned":
            self.pos = nn.Parameter(torch.zeros(1, max_frames + 1, dim))
        elif pos == "sin":
            self.register_buffer("pos", sinusoid(range(max_frames + 1), dim)[None], persistent=False)
        else:
            self.pos = None
        rates = [drop_path * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path] * depth
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_dim, r, dropout) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, h, valid):
        N, T, _ = h.shape
        x = torch.cat([self.cls.expand(N, -1, -1).to(h.dtype), h], dim=1)
        if self.pos is not None:
            if T + 1 > self.pos.shape[1]:
                raise ValueError(f"clip has {T} frames, the temporal encoder was built for {self.pos.shape[1] - 1}")
            x = x + self.pos[:, :T + 1].to(x.dtype)
        key_valid = None
        if self.mask_padding and valid is not None and not bool(valid.all()):
            key_valid = torch.cat([valid.new_ones(N, 1), valid], dim=1)
        for blk in self.blocks:
            x = blk(x, key_valid)
        return self.norm(x)


class ImageFrames(nn.Module):
    """torchvision ResNet per frame, fc removed: [N,T,3,H,W] -> [N,T,512]."""

    def __init__(self, arch):
        super().__init__()
        import torchvision
        self.arch = arch
        self.net = getattr(torchvision.models, arch)(weights=None)
        self.net.fc = nn.Identity()

    def forward(self, x):
        N, T = x.shape[:2]
        return self.net(x.flatten(0, 1)).view(N, T, -1)


class SkeletonFrames(nn.Module):
    """Linear(3->D) per joint -> 10 x (Conv1d k3 over joints, no pad -> BN -> ReLU), 25 -> 5 joints -> mean."""

    def __init__(self, dim):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        layers = []
        for i in range(10):
            layers += [nn.Conv1d(dim, dim, 3), nn.BatchNorm1d(dim)]
            if i < 9:
                layers.append(nn.ReLU())
            if i % 2 == 0:
                layers.append(nn.Dropout(0.1))
        self.convs = nn.Sequential(*layers)

    def forward(self, x):
        N, T, V, _ = x.shape
        if V != 25:
            raise ValueError(f"skeleton input must have 25 joints, got shape {tuple(x.shape)}")
        h = self.embed(x.flatten(0, 1)).transpose(1, 2)  # [NT, D, 25]
        return self.convs(h).mean(-1).view(N, T, -1)


class VectorFrames(nn.Module):
    """Synthetic per-frame features: Linear-GELU-Linear."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.net(x)


class Stream(nn.Module):
    def __init__(self, frames, temporal):
        super().__init__()
        self.frames, self.temporal = frames, temporal

    def forward(self, x, valid):
        return self.temporal(self.frames(x), valid)


class Fusion(nn.Module):
    """sum of per-modality heads | concat + linear | transformer with CLS (spec §3.3).

    `present` [N,M] (baselines' missing-modality rule): sum drops missing terms, concat zero-fills,
    transformer masks them as keys. ActionMAE passes None: every slot is filled.
    """

    def __init__(self, kind, M, dim, num_classes, depth=4, heads=8, mlp_dim=2048, pos=True):
        super().__init__()
        self.kind = kind
        if kind == "sum":
            self.heads = nn.ModuleList([nn.Linear(dim, num_classes) for _ in range(M)])
        elif kind == "concat":
            self.head = nn.Linear(M * dim, num_classes)
        else:
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.blocks = nn.ModuleList([Block(dim, heads, mlp_dim) for _ in range(depth)])
            self.head = nn.Linear(dim, num_classes)
            pe = sinusoid([2 * math.pi * (j + 1) / (M + 1) for j in range(M + 1)], dim)[None] if pos else None
            self.register_buffer("pos", pe, persistent=False)

    def forward(self, Fm, present=None):
        N, M, _ = Fm.shape
        if self.kind == "sum":
            logits = torch.stack([h(Fm[:, m]) for m, h in enumerate(self.heads)], dim=1)
            if present is not None:
                logits = logits * present[..., None].to(logits.dtype)
            return logits.sum(1)
        if self.kind == "concat":
            if present is not None:
                Fm = Fm * present[..., None].to(Fm.dtype)
            return self.head(Fm.flatten(1))
        x = torch.cat([self.cls.expand(N, -1, -1).to(Fm.dtype), Fm], dim=1)
        if self.pos is not None:
            x = x + self.pos.to(x.dtype)
        key_valid = None if present is None else torch.cat([present.new_ones(N, 1), present], dim=1)
        for blk in self.blocks:
            x = blk(x, key_valid)
        return self.head(x[:, 0])


def nrm(x, eps=1e-6):
    """Per-token normalisation (unbiased variance, the official target), in fp32."""
    x = x.float()
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=True) + eps)


# ----------------------------------------------------------------------------------------------
# Model: masking ops


def masking_ops(use_fused):
    """(gather, restore, random_masking): common.ops, or its pure-PyTorch references."""
    from common import ops
    if use_fused:
        return ops.masked_gather, ops.masked_restore, ops.random_masking
    from common import ops_reference as ref
    return ref.masked_gather, ref.masked_restore, ops.random_masking


def expand_to_frames(ids_shuffle, T):
    """Modality shuffle s [N,M] -> frame shuffle [N,M*T] with ids[n, j*T+t] = s[n,j]*T + t."""
    return (ids_shuffle[:, :, None] * T + torch.arange(T, device=ids_shuffle.device)).flatten(1)


def train_ids(N, M, K, T, device, random_masking):
    """Per-sample random modality drop, K kept: (ids_keep [N,K(*T)], ids_restore [N,M(*T)])."""
    noise = torch.rand(N, M, device=device)
    ids_keep, ids_restore, _ = random_masking(noise, K)
    if T:
        shuffle = expand_to_frames(torch.argsort(ids_restore, dim=1), T)
        return shuffle[:, :K * T].contiguous(), torch.argsort(shuffle, dim=1)
    return ids_keep, ids_restore


def subset_ids(subset, N, M, T, device, official_slots=False):
    """Eval ids for a fixed subset S: shuffle = [S ascending, rest ascending] for every sample.

    official_slots (B3): ids_restore = arange, so the kept tokens land in slots 0..K-1.
    """
    order = list(subset) + [m for m in range(M) if m not in subset]
    shuffle = torch.tensor(order, device=device)[None]
    if T:
        shuffle = expand_to_frames(shuffle, T)
    K = len(subset) * (T or 1)
    restore = torch.arange(shuffle.shape[1], device=device)[None] if official_slots else torch.argsort(shuffle, dim=1)
    return shuffle[:, :K].expand(N, K).contiguous(), restore.expand(N, -1).contiguous()


# ----------------------------------------------------------------------------------------------
# Model: ActionMAE and the full network


class ActionMAE(nn.Module):
    """Memory tokens + encoder over the kept tokens; shared mask token + decoder for the dropped ones."""

    def __init__(self, M, dim, n_mem=4, enc_depth=2, dec_depth=2, heads=8, mlp_dim=2048, frames=0,
                 use_embed=True):
        super().__init__()
        self.M, self.T, self.n_mem, self.use_embed = M, frames, n_mem, use_embed
        self.mem = nn.Parameter(torch.zeros(1, n_mem, dim))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.mod_embed = nn.Parameter(torch.zeros(M, dim))
        if frames:
            self.register_buffer("frame_pe", sinusoid(range(1, frames + 1), dim), persistent=False)
        self.encoder = nn.ModuleList([Block(dim, heads, mlp_dim) for _ in range(enc_depth)])
        self.enc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder = nn.ModuleList([Block(dim, heads, mlp_dim) for _ in range(dec_depth)])
        self.dec_norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, dim)

    def token_embed(self):
        """E per token: E[m] (modality mode) or E[m] + pe(t) (frame mode, l = m*T + t)."""
        if not self.use_embed:
            return None
        if self.T:
            return (self.mod_embed[:, None, :] + self.frame_pe[None]).flatten(0, 1)
        return self.mod_embed

    def forward(self, X, ids_keep, ids_restore, valid_tok, ops3):
        """X [N,L,D]; returns (R [N,L,D] or None when nothing is dropped, Z [N,n_mem+K,D])."""
        gather, restore, _ = ops3
        N, L, D = X.shape
        emb = self.token_embed()
        Xe = X if emb is None else X + emb.to(X.dtype)
        V = gather(Xe, ids_keep)
        kv_enc = kv_dec = None
        if valid_tok is not None and not bool(valid_tok.all()):
            ones = valid_tok.new_ones(N, self.n_mem)
            kv_enc = torch.cat([ones, torch.gather(valid_tok, 1, ids_keep)], dim=1)
            kv_dec = torch.cat([ones, valid_tok], dim=1)
        z = torch.cat([self.mem.expand(N, -1, -1).to(V.dtype), V], dim=1)
        for blk in self.encoder:
            z = blk(z, kv_enc)
        Z = self.enc_norm(z)
        if ids_keep.shape[1] == L:
            return None, Z
        Fu = restore(Z[:, self.n_mem:], ids_restore, self.mask_token.to(Z.dtype))
        if emb is not None:
            Fu = Fu + emb.to(Fu.dtype)
        d = torch.cat([Z[:, :self.n_mem], Fu], dim=1)
        for blk in self.decoder:
            d = blk(d, kv_dec)
        return self.pred(self.dec_norm(d))[:, self.n_mem:], Z


class Net(nn.Module):
    """Streams -> tokens X -> (ActionMAE) -> fusion. `forward` is one training step's loss."""

    def __init__(self, args, num_classes):
        super().__init__()
        self.modalities = args.modalities
        self.M = M = len(self.modalities)
        self.kind = args.model
        self.frame_mode = args.token_granularity == "frame"
        self.T = args.num_frames
        self.official_full_slots = args.official_full_slots
        self.official_eval_slots = args.official_eval_slots
        self.fusion_input = args.fusion_input
        self.rec_target_grad = args.rec_target_grad
        self.w_cls, self.w_rec, self.ls = args.w_cls, args.w_rec, args.label_smoothing
        self.keep_min, self.keep_max = args.keep_min, args.keep_max
        self.ops3 = masking_ops(not args.no_fused_ops)
        if args.synthetic:
            from common.data import multimodal_synthetic as syn
            dim, stream_mlp, mlp, dropout = 64, 128, 256, 0.1
            pos = "learned"
            frames = {m: VectorFrames(syn.FEAT, dim) for m in self.modalities}
        else:
            dim, stream_mlp, mlp, dropout = 512, 2048, 2048, 0.0
            pos = "sin"
            frames = {m: (SkeletonFrames(dim) if m == "skeleton" else ImageFrames(args.arch)) for m in self.modalities}
        if args.official_pos:
            pos = "none"
        self.dim = dim
        self.streams = nn.ModuleDict({
            m: Stream(frames[m], TemporalEncoder(dim, args.temporal_depth, args.heads, stream_mlp, self.T, pos,
                                                 args.drop_path, dropout, mask_padding=not args.official_pad))
            for m in self.modalities})
        self.mae = None
        if self.kind == "actionmae":
            self.mae = ActionMAE(M, dim, args.num_mem_tokens, args.enc_depth, args.dec_depth, args.heads, mlp,
                                 self.T if self.frame_mode else 0, use_embed=not args.official_pos)
        self.fusion = Fusion(args.fusion, M, dim, num_classes, args.fusion_depth, args.heads, mlp,
                             pos=not args.official_pos)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("cls", "mem", "mask_token", "mod_embed")) or name.endswith("temporal.pos"):
                nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- streams ------------------------------------------------------------------------------

    def encode(self, batch):
        """Run every stream once: X [N,M,D] (CLS outputs) or [N,M*T,D] (frames); valid per token."""
        valid = batch["valid"]
        outs = []
        for m in self.modalities:
            if m not in batch:
                raise KeyError(f"batch has no '{m}' input (modalities of this model: {','.join(self.modalities)})")
            outs.append(self.streams[m](batch[m], valid))
        if self.frame_mode:
            T = valid.shape[1]
            if T != self.T:
                raise ValueError(f"frame tokens need clips of {self.T} frames, got {T}")
            return torch.cat([o[:, 1:] for o in outs], dim=1), valid.repeat(1, self.M)
        return torch.stack([o[:, 0] for o in outs], dim=1), None

    # -- heads --------------------------------------------------------------------------------

    def pool(self, tokens, valid_tok):
        """Frame mode: masked mean over t per modality -> [N,M,D]; modality mode: identity."""
        if not self.frame_mode:
            return tokens
        N, L, D = tokens.shape
        w = valid_tok.view(N, self.M, -1, 1).to(tokens.dtype)
        return (tokens.view(N, self.M, -1, D) * w).sum(2) / w.sum(2).clamp(min=1)

    def classify(self, X, valid_tok, ids_keep, ids_restore):
        """-> (logits, R or None, present_tok [N,L]) for one masking of the tokens X."""
        gather, restore, _ = self.ops3
        N, L, D = X.shape
        Lk = ids_keep.shape[1]
        present = ids_restore < Lk
        X_slots = restore(gather(X, ids_keep), ids_restore, X.new_zeros(D))
        if self.mae is None:
            present_mod = present.view(N, self.M, -1)[:, :, 0]
            return self.fusion(self.pool(X_slots, valid_tok), present_mod), None, present
        R, Z = self.mae(X, ids_keep, ids_restore, valid_tok, self.ops3)
        if R is None:  # nothing dropped: the decoder is skipped
            tokens = Z[:, :L] if self.official_full_slots else nrm(X_slots)
        elif self.fusion_input == "decoder":
            tokens = R.float()
        else:
            tokens = torch.where(present[..., None], nrm(X_slots), R.float())
        return self.fusion(self.pool(tokens.to(X.dtype), valid_tok)), R, present

    def rec_loss(self, R, X, present, valid_tok):
        """Mean over dropped (valid) tokens of (1/D)||R - sg(nrm(X))||^2; 0 when nothing is dropped."""
        if R is None:
            return X.new_zeros((), dtype=torch.float32)
        target = nrm(X)
        if not self.rec_target_grad:
            target = target.detach()
        per_token = ((R.float() - target) ** 2).mean(-1)
        dropped = ~present if valid_tok is None else (~present & valid_tok)
        d = dropped.float()
        return (per_token * d).sum() / d.sum().clamp(min=1)

    def forward(self, batch, K=None):
        """One training step: returns {loss, loss_cls, loss_rec, logits}; K = number kept (None: all)."""
        X, valid_tok = self.encode(batch)
        N, L, _ = X.shape
        K = self.M if (K is None or self.kind == "baseline") else K
        ids_keep, ids_restore = train_ids(N, self.M, K, self.T if self.frame_mode else 0, X.device, self.ops3[2])
        logits, R, present = self.classify(X, valid_tok, ids_keep, ids_restore)
        loss_cls = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.ls)
        loss_rec = self.rec_loss(R, X, present, valid_tok)
        loss = self.w_cls * loss_cls + (self.w_rec * loss_rec if self.mae is not None else 0.0)
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_rec": loss_rec.detach(), "logits": logits.detach()}


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file (timm's Hugging Face format): an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw data. Data only,
    so nothing in the file can run."""
    data = Path(path).read_bytes()
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = (8 + n + int(o) for o in info["data_offsets"])
            numel = math.prod(info["shape"])
            if end > len(data) or end - begin != numel * dtype.itemsize:
                raise ValueError(f"tensor {name}: data_offsets do not fit shape {info['shape']} {info['dtype']}")
            out[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(info["shape"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ckpt.CheckpointError(f"--weights {path}: not a valid .safetensors file ({type(e).__name__}: {e})") from e
    return out


def resnet_state_dict(path, trust=False):
    """An ImageNet ResNet file in the torchvision or timm layout -> the keys of torchvision's ResNet
    without `fc`.

    Handled: a raw state dict (torchvision `resnet34-*.pth`, timm `pytorch_model.bin` / release
    `.pth`), timm's `model.safetensors`, a training checkpoint holding it under `state_dict` or
    `model` (timm's train checkpoints; `state_dict_ema` is not used), DDP's `module.` prefix, the
    1000-class `fc.*` head (dropped), and files without BatchNorm `num_batches_tracked` (older
    torchvision releases; the counter does not affect the forward pass).
    """
    path = Path(path)
    if not path.is_file():
        raise ckpt.CheckpointError(f"--weights {path}: file not found (weights are never downloaded; "
                                   f"pass a local file)")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        state = ckpt.safe_load(path, what="--weights", trust=trust)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ckpt.CheckpointError(f"--weights {path}: expected a ResNet state dict of tensors (torchvision or timm "
                                   f"layout), got {type(state).__name__}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_backbone_weights(net, path, *, allow_partial=False, trust=False):
    """Load a torchvision/timm ImageNet ResNet file into every image stream; returns the streams.

    A key the backbone needs that the file lacks, or one the file has that the backbone does not, is
    a CheckpointError naming the keys, unless `allow_partial` (then they are printed). A shape
    mismatch is always an error.
    """
    state = resnet_state_dict(path, trust)
    loaded = []
    for m, stream in net.streams.items():
        if not isinstance(stream.frames, ImageFrames):
            continue
        backbone = stream.frames.net
        own = backbone.state_dict()
        full = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
        shapes = [k for k in own if k in full and tuple(full[k].shape) != tuple(own[k].shape)]
        missing, unexpected = sorted(set(own) - set(full)), sorted(set(full) - set(own))
        if shapes or ((missing or unexpected) and not allow_partial):
            try:
                ckpt.check_state_dict(backbone, full, f"--weights {path} ({m} backbone, --arch {stream.frames.arch})")
            except ckpt.CheckpointError as e:
                hint = ("; expected a torchvision/timm ResNet layout (conv1, bn1, layer1-4[, fc]); timm's deep-stem "
                        "variants (resnet34d, ...) are other architectures")
                partial = "" if shapes else "; pass --allow-partial-weights to load the matching keys anyway"
                raise ckpt.CheckpointError(f"{e}{hint}{partial}") from None
        if missing or unexpected:
            print(f"warning: --weights {path} ({m} backbone) loaded partially: missing {missing}, unexpected "
                  f"{unexpected} (--allow-partial-weights)")
        backbone.load_state_dict({k: v for k, v in full.items() if k in own}, strict=False)
        loaded.append(m)
    return loaded


# ----------------------------------------------------------------------------------------------
# Engine


def lr_factor_fn(args, steps_per_epoch):
    warm = args.warmup_epochs * steps_per_epoch

    def f(step):
        if step < warm:
            return (step + 1) / warm
        epoch = step // steps_per_epoch
        return 0.1 ** sum(epoch >= m for m in args.milestones)
    return f


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def autocast(args, device):
    if not args.amp:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16)


def draw_keep(k_gen, keep_min, keep_max):
    """K ~ U{keep_min..keep_max}, once per batch, from a generator seeded identically on every rank."""
    return int(torch.randint(keep_min, keep_max + 1, (1,), generator=k_gen))


def train_one_epoch(model, loader, optimizer, scheduler, scaler, k_gen, args, env, epoch):
    model.train()
    net = dist.unwrap(model)
    M = net.M
    sums = {"loss": 0.0, "loss_cls": 0.0, "loss_rec": 0.0}
    n_batches, correct, seen, skipped = 0, 0, 0, 0
    k_hist = [0] * M
    for batch, n_skip in clog.progress(loader, desc=f"epoch {epoch}"):
        skipped += n_skip
        if batch is None:
            continue
        batch = to_device(batch, env.device)
        # K ~ U{keep_min..keep_max} once per batch, from a generator shared by all ranks
        K = draw_keep(k_gen, args.keep_min, args.keep_max)
        k_hist[K - 1] += 1
        with autocast(args, env.device):
            out = model(batch, K if args.model != "baseline" else None)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            out["loss"].backward()
            optimizer.step()
        scheduler.step()
        for k in sums:
            sums[k] += float(out[k].detach())
        n_batches += 1
        correct += int((out["logits"].argmax(1) == batch["label"]).sum())
        seen += batch["label"].numel()
    stats = {k: dist.all_reduce_mean(v / max(n_batches, 1)) for k, v in sums.items()}
    stats["train_top1"] = 100.0 * dist.all_reduce_mean(correct / max(seen, 1))
    stats["k_hist"] = k_hist
    stats["n_skipped"] = skipped
    return stats


@torch.no_grad()
def evaluate(net, loader, subsets, args, env):
    """Top-1/top-5 (%) and reconstruction MSE per subset; the streams run once per batch."""
    net.eval()
    names = [subset_name(s, net.modalities) for s in subsets]
    idx_all, labels_all, skipped = [], [], 0
    logits_all = {n: [] for n in names}
    rec = {n: [0.0, 0] for n in names}
    for batch, n_skip in clog.progress(loader, desc="eval"):
        skipped += n_skip
        if batch is None:
            continue
        batch = to_device(batch, env.device)
        with autocast(args, env.device):
            X, valid_tok = net.encode(batch)
            N = X.shape[0]
            for s, name in zip(subsets, names):
                ids_keep, ids_restore = subset_ids(s, N, net.M, net.T if net.frame_mode else 0, X.device,
                                                   net.official_eval_slots)
                logits, R, present = net.classify(X, valid_tok, ids_keep, ids_restore)
                logits_all[name].append(logits.float().cpu())
                if R is not None:
                    rec[name][0] += float(net.rec_loss(R, X, present, valid_tok)) * N
                    rec[name][1] += N
        idx_all.append(batch["index"].cpu())
        labels_all.append(batch["label"].cpu())
    gathered = dist.gather_eval(torch.cat(idx_all), torch.cat(labels_all), *[torch.cat(logits_all[n]) for n in names])
    ids, labels, logits = gathered[0], gathered[1], dict(zip(names, gathered[2:]))
    res = {"subsets": {}, "n": int(len(ids)), "n_skipped": skipped}
    for name in names:
        acc = metrics.topk_accuracy(logits[name], labels, ks=(1, 5))
        mse = dist.all_reduce_mean(rec[name][0] / rec[name][1]) if rec[name][1] else None
        res["subsets"][name] = {"top1": 100 * acc[1], "top5": 100 * acc[5], "rec_mse": mse}
    res["mean_top1"] = float(np.mean([res["subsets"][n]["top1"] for n in names]))
    full = subset_name(tuple(range(net.M)), net.modalities)
    res["full_top1"] = res["subsets"][full]["top1"] if full in res["subsets"] else None
    return res, {"ids": ids.numpy(), "labels": labels.numpy(), **{f"logits_{n}": logits[n].numpy() for n in names}}


def main(argv=None):
    parser = build_parser()
    args = config.parse_args(parser, argv)
    try:
        args = resolve_args(args)
    except ValueError as e:
        parser.error(str(e))
    has_images = any(m != "skeleton" for m in args.modalities)
    if has_images and not args.eval_only and ckpt.resolve_resume(args.resume, args.output_dir) is None:
        config.require_weights(args, f"the {args.arch} backbones")
    if args.weights and not has_images:
        raise config.InputError(f"--weights {args.weights}: this run has no image modality "
                                f"({','.join(args.modalities)}) to load a ResNet into")
    env = dist.setup(args.device)
    # masking noise differs per rank; K comes from k_gen, identical on every rank
    dist.seed_everything(args.seed + env.rank)
    out_dir = Path(args.output_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    datasets, num_classes, n_missing = build_datasets(args)
    train_loader = dist.make_loader(datasets["train"], args.batch_size, shuffle=True, workers=args.workers,
                                    seed=args.seed, drop_last=False, collate_fn=collate)
    eval_loader = {k: dist.make_loader(datasets[k], args.eval_batch_size, shuffle=False, workers=args.workers,
                                       collate_fn=collate) for k in ("val", "test") if datasets[k] is not None}

    net = Net(args, num_classes).to(env.device)
    weights_sha = None
    if args.weights:
        import hashlib
        weights_sha = hashlib.sha256(Path(args.weights).read_bytes()).hexdigest()
        loaded = load_backbone_weights(net, args.weights, allow_partial=args.allow_partial_weights,
                                       trust=args.trust_checkpoint)
        print(f"loaded {args.weights} into the {','.join(loaded)} backbones")
    n_params = sum(p.numel() for p in net.parameters())
    model = net
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[env.device.index] if env.device.type == "cuda"
                                                    else None, find_unused_parameters=True)

    scale = {"per-gpu": args.batch_size / 32, "global": args.batch_size * env.world_size / 32, "none": 1.0}
    args.effective_lr = args.lr * scale[args.lr_scaling]
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.effective_lr, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    steps_per_epoch = max(len(train_loader), 1)
    if args.lr_schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.effective_lr,
                                                        total_steps=max(args.epochs * steps_per_epoch, 1))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(args, steps_per_epoch))
    scaler = torch.amp.GradScaler(env.device.type) if args.amp and args.amp_dtype == "fp16" else None
    k_gen = torch.Generator().manual_seed(args.seed)

    if env.is_main:
        # config.yaml holds flags only (it can be passed back with --config); derived values as comments
        flags = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
        saved = {k: (",".join(v) if k == "modalities" else v) for k, v in vars(args).items() if k in flags}
        path = config.save_config(argparse.Namespace(**saved), out_dir)
        with open(path, "a") as f:
            f.write(f"# effective_lr: {args.effective_lr}\n# weights_sha256: {weights_sha}\n"
                    f"# num_params: {n_params}\n# world_size: {env.world_size}\n")
    if env.is_main and not args.resume and not args.eval_only and (out_dir / "log.jsonl").is_file():
        (out_dir / "log.jsonl").unlink()  # a fresh run starts a fresh log
    logger = clog.JsonlLogger(out_dir / "log.jsonl")

    start_epoch, best = 0, None
    resume = ckpt.resolve_resume(args.resume, out_dir)
    if resume is not None:
        state = ckpt.load_checkpoint(resume, model=net, optimizer=None if args.eval_only else optimizer,
                                     scheduler=None if args.eval_only else scheduler, scaler=scaler,
                                     trust=args.trust_checkpoint)
        start_epoch, best = state["epoch"], state["best_metric"]
        if state["extra"] and "k_gen" in state["extra"]:
            k_gen.set_state(state["extra"]["k_gen"])
        print(f"resumed from {resume} at epoch {start_epoch}")

    select_split = "test" if args.select_on_test else ("val" if "val" in eval_loader else None)
    subsets = args.eval_subset_ids
    t_start = time.time()
    for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
        dist.set_epoch(train_loader, epoch)
        if hasattr(datasets["train"], "epoch"):
            datasets["train"].epoch = epoch  # per-epoch augmentation draws (workers are re-created each epoch)
        t0 = time.time()
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, k_gen, args, env, epoch)
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats, "time": time.time() - t0}
        improved = False
        if select_split and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            res, _ = evaluate(net, eval_loader[select_split], subsets, args, env)
            prefix = "val" if select_split == "val" else "test"
            for name, r in res["subsets"].items():
                record[f"{prefix}_top1_{name}"] = r["top1"]
            record[f"{prefix}_mean_top1"] = res["mean_top1"]
            if best is None or res["mean_top1"] > best:
                best, improved = res["mean_top1"], True
        logger.log(record)
        if env.is_main:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}))
            extra = {"k_gen": k_gen.get_state()}
            ckpt.save_checkpoint(out_dir / "checkpoint.pth", model=net, optimizer=optimizer, scheduler=scheduler,
                                 scaler=scaler, epoch=epoch + 1, best_metric=best, extra=extra)
            if improved:
                ckpt.atomic_save({"model": net.state_dict(), "epoch": epoch + 1, "best_metric": best},
                                 out_dir / "best.pth")
        dist.barrier()
    train_time = time.time() - t_start

    # final test: last weights, then best.pth (selected on val; on test only with --select-on-test)
    results = {"selected_on": select_split or "last", "n_missing_modality": n_missing,
               "train_time_s": train_time, "num_params": n_params, "effective_lr": args.effective_lr,
               "weights_sha256": weights_sha}
    last, last_preds = evaluate(net, eval_loader["test"], subsets, args, env)
    results["last"] = last
    results["n_test"] = last["n"]
    preds = {"last": last_preds}
    best_path = out_dir / "best.pth"
    if select_split and best_path.is_file() and not args.eval_only:
        state = ckpt.safe_load(best_path, what="best checkpoint", trust=args.trust_checkpoint)
        net.load_state_dict(state["model"])
        results["best"], preds["best"] = evaluate(net, eval_loader["test"], subsets, args, env)
        results["best_epoch"] = state["epoch"]
    else:
        results["best"], preds["best"] = last, last_preds
    if env.is_main:
        clog.write_json(out_dir / "results.json", results)
        (out_dir / "preds").mkdir(exist_ok=True)
        for k, v in preds.items():
            np.savez(out_dir / "preds" / f"{k}.npz", **v)
        records = clog.read_jsonl(out_dir / "log.jsonl") if (out_dir / "log.jsonl").is_file() else []
        clog.plot_curves(records, out_dir / "plots" / "curves.png",
                         ["loss", "loss_cls", "loss_rec", "train_top1", "val_mean_top1", "test_mean_top1"])
        sub = results["best"]["subsets"]
        clog.plot_bars([sub[n]["top1"] for n in sub], out_dir / "plots" / "subset_top1.png", labels=list(sub),
                       title=f"{args.model}: test top-1 per modality subset", ylabel="top-1 (%)")
        print(subset_table({args.model: results["best"]}))
    dist.cleanup()
    return results


def subset_table(by_method):
    names = list(next(iter(by_method.values()))["subsets"])
    lines = ["method".ljust(20) + "".join(n.rjust(8) for n in names) + "mean".rjust(8)]
    for method, res in by_method.items():
        lines.append(method.ljust(20) + "".join(f"{res['subsets'][n]['top1']:8.1f}" for n in names)
                     + f"{res['mean_top1']:8.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Offline demo (spec §7.2)

DEMO_METHODS = {
    "baseline": ["--model", "baseline"],
    "baseline-dropout": ["--model", "baseline-dropout"],
    "actionmae": ["--model", "actionmae"],
    "actionmae-official": ["--model", "actionmae", "--official-pos", "--official-eval-slots",
                           "--official-full-slots", "--fusion-input", "decoder", "--rec-target-grad"],
    "actionmae-norec": ["--model", "actionmae", "--w-rec", "0"],  # same network, no reconstruction loss
}
# per benchmark (--data): the synthetic split sizes (the test split is always 2,000)
DEMO_DATA = {"offset": ["--synthetic-data", "offset", "--synthetic-train", "1000"],
             "redundant": ["--synthetic-data", "redundant", "--synthetic-train", "4000"]}
DEMO_RECIPE = ["--synthetic", "--modalities", "a,b,c", "--num-frames", "12", "--epochs", "20",
               "--batch-size", "64", "--eval-batch-size", "500", "--lr", "1e-3", "--lr-scaling", "none",
               "--lr-schedule", "onecycle", "--weight-decay", "1e-4", "--temporal-depth", "1",
               "--enc-depth", "2", "--dec-depth", "1", "--heads", "4", "--drop-path", "0",
               "--num-mem-tokens", "4", "--fusion", "sum", "--workers", "0", "--device", "cpu",
               "--eval-every", "5"]


def demo(argv=None):
    p = argparse.ArgumentParser(description="ActionMAE offline synthetic demo (spec §7.2)")
    p.add_argument("--output-dir", default="runs/actionmae_demo")
    p.add_argument("--data", default="offset", choices=list(DEMO_DATA),
                   help="offset: b and c share an offset only their joint reading removes (reconstruction can "
                        "matter); redundant: the spec §7.2 benchmark")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["baseline", "baseline-dropout", "actionmae"],
                   choices=list(DEMO_METHODS))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the d=64 model gains nothing from more)")
    p.add_argument("--rerun", action="store_true", help="retrain runs whose results.json already exists")
    p.add_argument("--extra", default="", help="flags appended to every run, e.g. '--token-granularity frame'")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    out = Path(a.output_dir)
    rows = []
    meta = {"data": a.data, "command": "python train_actionmae.py demo " + shlex.join(argv or []),
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
            "threads": a.threads}
    t_all, cpu_all = time.time(), time.process_time()
    for seed in a.seeds:  # seed-major: every arm of a seed finishes before the next seed starts
        for method in a.methods:
            run_dir = out / f"{method}_seed{seed}"
            run_argv = (DEMO_RECIPE + DEMO_DATA[a.data] + DEMO_METHODS[method] + ["--epochs", str(a.epochs),
                        "--seed", str(seed), "--output-dir", str(run_dir)] + shlex.split(a.extra))
            t0, c0 = time.time(), time.process_time()
            done = run_dir / "results.json"
            saved = json.loads(done.read_text()) if done.is_file() and not a.rerun else {}
            if saved.get("demo_argv") == run_argv:
                print(f"reusing {done} (pass --rerun to train again)")
                res, timing = saved["best"], saved.get("timing", {})
            else:
                res = main(run_argv)["best"]
                timing = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
                clog.write_json(done, {**json.loads(done.read_text()), "timing": timing, "demo_argv": run_argv})
            row = {"method": method, "seed": seed}
            for name, r in res["subsets"].items():
                row[f"top1_{name}"] = r["top1"]
            row["top1_mean"] = row["mean_all"] = res["mean_top1"]
            row["mean_missing_strongest"] = float(np.mean([r["top1"] for n, r in res["subsets"].items() if "a" not in n]))
            row["full"] = res["full_top1"]
            row["wall_s"], row["cpu_s"] = timing.get("wall_s"), timing.get("cpu_s")
            rows.append(row)
            clog.write_json(out / "summary.json", {"rows": rows, **meta})
    metric_cols = [k for k in rows[0] if k not in ("method", "seed", "wall_s", "cpu_s")] + ["wall_s", "cpu_s"]
    print(clog.summary_table(rows, metric_cols))
    wall, cpu = time.time() - t_all, time.process_time() - cpu_all
    print(f"total wall {wall:.0f} s, CPU {cpu:.0f} s ({a.threads} threads)")
    check = demo_acceptance(rows)
    for line in check["lines"]:
        print(line)
    clog.write_json(out / "summary.json", {"rows": rows, **meta, "wall_s": wall, "cpu_s": cpu})
    clog.write_json(out / "acceptance.json", {**check, **meta, "wall_s": wall, "cpu_s": cpu})
    (out / "summary.md").write_text(markdown_table(rows) + "\n")
    return rows


def markdown_table(rows):
    """Top-1 (%) per subset, mean ± std over seeds, one line per method (for the README)."""
    subsets = [k[5:] for k in rows[0] if k.startswith("top1_") and k != "top1_mean"]
    cols = [*subsets, "mean", "mean w/o a", "CPU s/run"]
    keys = [f"top1_{n}" for n in subsets] + ["top1_mean", "mean_missing_strongest", "cpu_s"]
    lines = ["| arm (seeds) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        sub = [r for r in rows if r["method"] == method]
        cells = []
        for k in keys:
            vals = [r[k] for r in sub if r.get(k) is not None]
            m, sd = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0) if vals else (0, 0)
            cells.append(f"{m:.0f}" if k == "cpu_s" else f"{m:.1f}±{sd:.1f}")
        lines.append(f"| {method} ({','.join(str(r['seed']) for r in sub)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def demo_acceptance(rows):
    def mean(method, key):
        vals = [r[key] for r in rows if r["method"] == method]
        return float(np.mean(vals)) if vals else float("nan")
    m, b, d = "actionmae", "baseline", "baseline-dropout"
    gain = mean(m, "mean_missing_strongest") - mean(b, "mean_missing_strongest")
    rec_gain = mean(m, "mean_missing_strongest") - mean(d, "mean_missing_strongest")
    vs_ctrl = mean(m, "mean_all") - mean(d, "mean_all")
    full = mean(m, "full") - mean(b, "full")
    checks = {"missing_strongest_gain_ge_10": gain >= 10, "reconstruction_gain_ge_3": rec_gain >= 3,
              "not_below_dropout_control": vs_ctrl >= 0, "full_within_1": abs(full) <= 1 or full > 0}

    def verdict(key):
        return "PASS" if checks[key] else "FAIL"
    lines = [f"ActionMAE - baseline, mean over subsets without 'a': {gain:+.2f} points (need >= +10): "
             f"{verdict('missing_strongest_gain_ge_10')}",
             f"ActionMAE - dropout control, mean over subsets without 'a': {rec_gain:+.2f} points (need >= +3): "
             f"{verdict('reconstruction_gain_ge_3')}",
             f"ActionMAE - dropout control, mean over all subsets: {vs_ctrl:+.2f} points (need >= 0): "
             f"{verdict('not_below_dropout_control')}",
             f"ActionMAE - baseline, full modalities: {full:+.2f} points (need >= -1): {verdict('full_within_1')}",
             f"dropout control - baseline, mean over subsets without 'a': "
             f"{mean(d, 'mean_missing_strongest') - mean(b, 'mean_missing_strongest'):+.2f} points "
             f"(the part of the gain that needs no reconstruction)"]
    if any(r["method"] == "actionmae-norec" for r in rows):
        lines.append(f"ActionMAE - the same network without L_rec, mean over subsets without 'a': "
                     f"{mean(m, 'mean_missing_strongest') - mean('actionmae-norec', 'mean_missing_strongest'):+.2f} "
                     f"points (the part that needs the reconstruction loss)")
    return {"checks": checks, "lines": lines, "gain_missing_strongest": gain, "rec_gain_missing_strongest": rec_gain,
            "vs_dropout_mean_all": vs_ctrl, "full_diff": full}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "demo":
        config.run_main(demo, sys.argv[2:])
    else:
        config.run_main(main)
