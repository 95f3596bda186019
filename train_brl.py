"""BRL: balanced representation learning for long-tailed skeleton action recognition, with ST-GCN++.

Liu et al., arXiv 2308.14024; official code firework8/BRL (a PYSKL fork). Spec: specs/brl.md.

    python train_brl.py --config configs/brl/ntu60_xsub_lt_j.yaml            # one process
    torchrun --nproc_per_node 4 train_brl.py --config configs/brl/ntu60_xsub_lt_j.yaml
    python train_brl.py ensemble --scores runs/j/last_pred.pkl runs/b/last_pred.pkl --ensemble-weights 1 1 \
        --labels runs/j/test_labels.npy
    python train_brl.py demo --output-dir runs/brl_demo                      # offline synthetic demo (ce, aa, brl)

Reading order: constants (graphs, bones) -> PYSKL loading + long-tailed list -> skeleton pipeline ->
ST-GCN++ -> rebalanced mixup + action-aware weights -> train/eval loops -> main() -> ensemble, demo.
"""
import argparse
import json
import math
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import dist as dist_lib
from common import metrics as metrics_lib
from common.logging import JsonlLogger, plot_bars, plot_confusion, plot_curves, progress, summary_table, write_json, write_summary

# ----------------------------------------------------------------------------------------------
# Skeleton layouts (spec §2.6, §3.1, §4.2). Indices are 0-based.

NTU_INWARD = [(i - 1, j - 1) for i, j in [
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10), (12, 11),
    (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19), (22, 8), (23, 8), (24, 12), (25, 12)]]
COCO_INWARD = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 5), (12, 6), (9, 7), (7, 5), (10, 8), (8, 6), (5, 0),
               (6, 0), (1, 0), (3, 1), (2, 0), (4, 2)]
NTU_BONES = [(0, 1), (1, 20), (2, 20), (3, 2), (4, 20), (5, 4), (6, 5), (7, 6), (8, 20), (9, 8), (10, 9), (11, 10),
             (12, 0), (13, 12), (14, 13), (15, 14), (16, 0), (17, 16), (18, 17), (19, 18), (20, 20), (21, 22),
             (22, 7), (23, 24), (24, 11)]
NTU_SKIPS = [(0, 20), (3, 20), (5, 20), (6, 4), (7, 5), (9, 20), (10, 8), (11, 9), (12, 1), (13, 0), (14, 12),
             (15, 13), (16, 1), (17, 0), (18, 16), (19, 17), (21, 7), (22, 6), (23, 11), (24, 10)]
COCO_BONES = [(0, 0), (1, 0), (2, 0), (3, 1), (4, 2), (5, 0), (6, 0), (7, 5), (8, 6), (9, 7), (10, 8), (11, 0),
              (12, 0), (13, 11), (14, 12), (15, 13), (16, 14)]
NTU_FLIP = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15, 20, 23, 24, 21, 22]
COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]

LAYOUTS = {  # name -> (V, centre, inward edges, upper-body joints for the partial mixup)
    "nturgb+d": (25, 20, NTU_INWARD, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24]),
    "coco": (17, 0, COCO_INWARD, list(range(11))),
}
DATASETS = {  # --dataset -> (layout, num classes, n_max of the LT formula per split prefix)
    "ntu60": ("nturgb+d", 60, {"xsub": 600, "xview": 600}),
    "ntu120": ("nturgb+d", 120, {"xsub": 600, "xset": 400}),
    "k400": ("coco", 400, {}),
    "synthetic": ("nturgb+d", 60, {"synth": 200}),
}
STREAMS = ("j", "b", "k", "jm", "bm", "km")
ENSEMBLE_WEIGHTS = {2: [1, 1], 4: [2, 2, 1, 1], 6: [2, 2, 2, 1, 1, 1]}  # j,b | j,b,jm,bm | j,b,k,jm,bm,km


def edge_matrix(edges, V):
    """mat(E)[j, i] = 1 for each pair (i, j) in E (spec §3.1)."""
    A = np.zeros((V, V), dtype=np.float32)
    for i, j in edges:
        A[j, i] = 1
    return A


def normalize_columns(A):
    """A · D^-1 with D_ii = sum_r A[r, i]; zero columns stay zero."""
    col = A.sum(0)
    inv = np.zeros_like(col)
    inv[col > 0] = 1.0 / col[col > 0]
    return A * inv[None, :]


def hop_distance(edges, V):
    adj = np.eye(V, dtype=bool)
    for i, j in edges:
        adj[i, j] = adj[j, i] = True
    dist = np.full((V, V), np.inf)
    reach = np.eye(V, dtype=bool)
    for d in range(V):
        dist[reach & np.isinf(dist)] = d
        reach = (reach.astype(np.int64) @ adj.astype(np.int64)) > 0
    return dist


def build_graph(layout="nturgb+d", mode="spatial"):
    """The (3, V, V) adjacency stack of ST-GCN++: 'spatial' = [I, N(In), N(Out)] or 'stgcn_spatial'."""
    V, centre, inward, _ = LAYOUTS[layout]
    if mode == "spatial":
        inward_m = normalize_columns(edge_matrix(inward, V))
        outward_m = normalize_columns(edge_matrix([(j, i) for i, j in inward], V))
        return np.stack([np.eye(V, dtype=np.float32), inward_m, outward_m])
    if mode == "stgcn_spatial":
        hop = hop_distance(inward, V)
        adj = (hop <= 1).astype(np.float32)
        norm = normalize_columns(adj)
        hc = hop[:, centre]
        A = np.zeros((3, V, V), dtype=np.float32)
        for v in range(V):
            for w in range(V):
                if hop[v, w] == 0:
                    A[0, v, w] = norm[v, w]
                elif hop[v, w] == 1:
                    A[1 if hc[v] >= hc[w] else 2, v, w] = norm[v, w]
        return A
    raise ValueError(f"unknown graph mode {mode!r}; expected 'spatial' or 'stgcn_spatial'")


# ----------------------------------------------------------------------------------------------
# PYSKL pickles and long-tailed lists (spec §2.2-§2.4)

class DataFormatError(config_lib.InputError):
    """A PYSKL pickle, LT list or score file is malformed (one line naming the file and entry)."""


def load_pyskl(path, num_classes=None, *, layout=None, strict=False, trust=False):
    """Read and validate a PYSKL pickle: {'split': {name: [frame_dir]}, 'annotations': [dict]}.

    `layout` (a LAYOUTS key) fixes the expected V and C: a keypoint of another shape is an error naming
    the file, the frame_dir and expected vs found, before any training step. An annotation with
    non-finite keypoints (NaN/inf) is dropped and recorded in data['skipped_nonfinite'] (frame_dir ->
    label), or an error with `strict`."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: PYSKL annotation pickle not found")
    data = ckpt_lib.safe_pickle_load(path, what="PYSKL annotation pickle", trust=trust)  # never runs code
    if not isinstance(data, dict) or "split" not in data or "annotations" not in data:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataFormatError(f"{path}: expected a dict with keys 'split' and 'annotations', got {got}")
    if not isinstance(data["split"], dict) or not isinstance(data["annotations"], list):
        raise DataFormatError(f"{path}: 'split' must be dict[str, list[str]] and 'annotations' a list of dicts")
    want_v, want_c = (LAYOUTS[layout][0], 2 if layout == "coco" else 3) if layout else (None, None)
    seen, keep, skipped = set(), [], {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataFormatError(f"{where}: expected a dict, got {type(ann).__name__}")
        where += f" (frame_dir={ann.get('frame_dir', '?')!r})"
        compressed = "raw_file" in ann
        need = ["frame_dir", "label"] + ([] if compressed else ["keypoint"])
        missing = [k for k in need if k not in ann]
        if missing:
            raise DataFormatError(f"{where}: missing key(s) {missing}; has {sorted(ann)}")
        if compressed:
            raise DataFormatError(f"{where}: compressed K400 annotations (raw_file/frame_inds) are not supported; "
                                  "decompress them to 'keypoint' (M, T, V, C) first")
        kp = ann["keypoint"]
        if not isinstance(kp, np.ndarray) or kp.ndim != 4:
            shape = getattr(kp, "shape", type(kp).__name__)
            raise DataFormatError(f"{where}: 'keypoint' must be an array of rank 4 (M, T, V, C), got shape {shape}")
        if kp.shape[0] < 1 or kp.shape[1] < 1:
            raise DataFormatError(f"{where}: 'keypoint' shape {kp.shape} has no person or no frame")
        if want_v is not None and (kp.shape[2] != want_v or kp.shape[3] != want_c):
            raise DataFormatError(f"{where}: 'keypoint' shape {tuple(kp.shape)}: expected (M, T, {want_v}, {want_c}) "
                                  f"for the {layout!r} layout (V = {want_v} joints, C = {want_c}), found "
                                  f"V = {kp.shape[2]}, C = {kp.shape[3]}")
        if kp.shape[-1] not in (2, 3) or kp.shape[2] not in (17, 25):
            raise DataFormatError(f"{where}: 'keypoint' shape {kp.shape}: expected V in (17, 25) and C in (2, 3)")
        if "total_frames" in ann and int(ann["total_frames"]) != kp.shape[1]:
            raise DataFormatError(f"{where}: total_frames={ann['total_frames']} but keypoint has T={kp.shape[1]}")
        label = ann["label"]
        if not isinstance(label, (int, np.integer)) or label < 0 or (num_classes is not None and label >= num_classes):
            raise DataFormatError(f"{where}: label {label!r} out of range [0, {num_classes}) (labels are 0-based)")
        if ann["frame_dir"] in seen:
            raise DataFormatError(f"{where}: duplicate frame_dir")
        seen.add(ann["frame_dir"])
        score = ann.get("keypoint_score")
        bad = int((~np.isfinite(kp)).any(-1).sum()) + (int((~np.isfinite(score)).sum()) if score is not None else 0)
        if bad:
            if strict:
                raise DataFormatError(f"{where}: {bad} joint(s) with non-finite keypoints (NaN/inf); fix the file, "
                                      "or run without --strict to skip such clips")
            skipped[ann["frame_dir"]] = int(label)
            continue
        keep.append(ann)
    for name, items in data["split"].items():
        if not isinstance(items, (list, tuple)):
            raise DataFormatError(f"{path}: split[{name!r}] must be a list of frame_dir strings")
    data["annotations"], data["skipped_nonfinite"] = keep, skipped
    return data


def split_names(data, name, path="annotations"):
    if name not in data["split"]:
        raise DataFormatError(f"{path}: split {name!r} not found; available splits: {sorted(data['split'])}")
    return data["split"][name]


def lt_counts(n_max, imb_factor, num_classes):
    """n_c = floor(n_max * (1/IF)^(c/(C-1))), classes in natural order (spec §2.3)."""
    return [int(math.floor(n_max * (1.0 / imb_factor) ** (c / (num_classes - 1)))) for c in range(num_classes)]


def make_lt_list(annotations, train_names, num_classes, n_max, imb_factor):
    """The shipped-list recipe: np.random.seed(0) once; per class in order shuffle and keep n_c."""
    by_name = {a["frame_dir"]: a for a in annotations}
    per_class = [[] for _ in range(num_classes)]
    for name in train_names:
        per_class[by_name[name]["label"]].append(name)
    counts = lt_counts(n_max, imb_factor, num_classes)
    np.random.seed(0)
    keep = []
    for c in range(num_classes):
        names = list(per_class[c])
        np.random.shuffle(names)
        if len(names) < counts[c]:
            warnings.warn(f"class {c} has {len(names)} training samples, fewer than the LT count {counts[c]}")
        keep += names[:counts[c]]
    return keep


def read_lt_list(path, known=None):
    """One frame_dir per line, no label; `known` = set of valid frame_dirs (error names unknowns)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: long-tailed list not found (use --lt-list gen to build it from the formula)")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataFormatError(f"{path}: {len(unknown)} frame_dir(s) are not in the training split of the "
                                  f"annotation file, e.g. {unknown[:3]} (line {names.index(unknown[0]) + 1})")
    return names


def write_lt_list(path, names):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(n + "\n" for n in names))


def balanced_holdout(annotations, names, exclude, num_classes, per_class):
    """Up to `per_class` samples per class from `names` minus `exclude`, deterministic (validation)."""
    by_name = {a["frame_dir"]: a for a in annotations}
    exclude = set(exclude)
    picked, taken = [], [0] * num_classes
    for name in sorted(names):
        if name in exclude:
            continue
        c = by_name[name]["label"]
        if taken[c] < per_class:
            picked.append(name)
            taken[c] += 1
    return picked


# ----------------------------------------------------------------------------------------------
# Skeleton pipeline (spec §2.5, §2.6). Arrays are (M, T, V, C) float32.

def _unit(v):
    return v / np.linalg.norm(v)


def _angle(v1, v2):
    if np.abs(v1).sum() < 1e-6 or np.abs(v2).sum() < 1e-6:
        return 0.0
    return float(np.arccos(np.clip(np.dot(_unit(v1), _unit(v2)), -1.0, 1.0)))


def rodrigues(axis, theta):
    """Rotation by theta about axis (Euler-Rodrigues, as PYSKL's PreNormalize3D)."""
    if np.abs(axis).sum() < 1e-6 or abs(theta) < 1e-6:
        return np.eye(3)
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / math.sqrt(np.dot(axis, axis))
    a = math.cos(theta / 2.0)
    b, c, d = -axis * math.sin(theta / 2.0)
    aa, bb, cc, dd = a * a, b * b, c * c, d * d
    bc, ad, ac, ab, bd, cd = b * c, a * d, a * c, a * b, b * d, c * d
    return np.array([[aa + bb - cc - dd, 2 * (bc + ad), 2 * (bd - ac)],
                     [2 * (bc - ad), aa + cc - bb - dd, 2 * (cd + ab)],
                     [2 * (bd + ac), 2 * (cd - ab), aa + dd - bb - cc]])


def pre_normalize_3d(x, zaxis=(0, 1), xaxis=(8, 4)):
    """PreNormalize3D: drop empty frames of the main person, centre on joint 1 of person 0 at frame 0,
    rotate j1-j0 onto +z, then j8-j4 onto +x."""
    if not np.any(x):
        return x
    nonempty = np.any(np.abs(x) > 1e-8, axis=(2, 3))  # (M, T)
    if x.shape[0] >= 2 and nonempty[0].sum() < nonempty[1].sum():
        x = x[:, nonempty[1]]
        x = x[[1, 0] + list(range(2, x.shape[0]))]
    else:
        x = x[:, nonempty[0]]
    centre = x[0, 0, 1].copy() if x.shape[2] == 25 else x[0, 0, -1].copy()
    mask = (np.abs(x).sum(-1, keepdims=True) > 0)
    x = (x - centre) * mask
    v = x[0, 0, zaxis[1]] - x[0, 0, zaxis[0]]
    R = rodrigues(np.cross(v, [0, 0, 1]), _angle(v, [0, 0, 1]))
    x = np.einsum("mtvd,kd->mtvk", x, R)
    v = x[0, 0, xaxis[0]] - x[0, 0, xaxis[1]]
    R = rodrigues(np.cross(v, [1, 0, 0]), _angle(v, [1, 0, 0]))
    x = np.einsum("mtvd,kd->mtvk", x, R)
    return x.astype(np.float32)


def pre_normalize_2d(x, img_shape):
    """COCO 2D: centre on the image and scale to [-1, 1] (PYSKL PreNormalize2D)."""
    h, w = img_shape
    x = x.copy()
    x[..., 0] = (x[..., 0] - w / 2) / (w / 2)
    x[..., 1] = (x[..., 1] - h / 2) / (h / 2)
    return x


def random_scale(x, scale, rng):
    return (x * (1 + rng.uniform(-1, 1, size=3) * scale)).astype(np.float32)


def rot3d(theta):
    c, s = np.cos(theta), np.sin(theta)
    rx = np.array([[1, 0, 0], [0, c[0], s[0]], [0, -s[0], c[0]]])
    ry = np.array([[c[1], 0, -s[1]], [0, 1, 0], [s[1], 0, c[1]]])
    rz = np.array([[c[2], s[2], 0], [-s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_rot(x, theta, rng):
    if not np.any(x):
        return x
    R = rot3d(rng.uniform(-theta, theta, size=3))
    return np.einsum("ab,mtvb->mtva", R, x).astype(np.float32)


def compute_stream(x, feat, layout="nturgb+d"):
    """Feature stream at the full frame rate: j, b, k and their motions (spec §2.6).
    For COCO the last channel is the score: bones carry the mean of the two endpoint scores."""
    if feat not in STREAMS:
        raise ValueError(f"unknown feature stream {feat!r}; expected one of {STREAMS}")
    base = feat[0]
    if base == "k" and layout != "nturgb+d":
        raise ValueError("the skip stream 'k' exists for the NTU 25-joint layout only")
    if base == "j":
        f = x.copy()
    else:
        pairs = (NTU_BONES if base == "b" else NTU_SKIPS) if layout == "nturgb+d" else COCO_BONES
        f = np.zeros_like(x)
        v, p = np.array(pairs).T
        if layout == "coco":  # (x, y, score): coordinate difference, mean score
            f[..., v, :2] = x[..., v, :2] - x[..., p, :2]
            f[..., v, 2] = (x[..., v, 2] + x[..., p, 2]) / 2
        else:
            f[..., v, :] = x[..., v, :] - x[..., p, :]
    if feat.endswith("m"):
        m = np.zeros_like(f)
        m[:, :-1] = f[:, 1:] - f[:, :-1]
        if layout == "coco":
            m[..., 2] = f[..., 2]  # keep the score channel (PYSKL's motion keeps scores)
        f = m
    return f


def uniform_sample_train(T, clip_len, rng):
    if T < clip_len:
        return np.arange(clip_len) + rng.integers(0, T)
    if T < 2 * clip_len:
        offset = np.zeros(clip_len + 1, dtype=np.int64)
        offset[rng.choice(clip_len + 1, T - clip_len, replace=False)] = 1
        return np.arange(clip_len) + np.cumsum(offset)[:-1]
    bids = np.array([i * T // clip_len for i in range(clip_len + 1)])
    return bids[:-1] + rng.integers(np.diff(bids))


def uniform_sample_test(T, clip_len, num_clips, seed=255):
    """PYSKL's UniformSample in test mode, draw for draw: the legacy NumPy RNG seeded with `seed` once
    per video; before every clip PYSKL draws rand() (the p_interval ratio, fixed at 1) and
    randint(T - T + 1) (the offset, 0), then the clip's own choice/randint."""
    rs = np.random.RandomState(seed)
    inds = []
    for i in range(num_clips):
        n = int((rs.rand() * 0 + 1) * T)  # p_interval = (1, 1): ratio 1, but the draw advances the RNG
        off = rs.randint(T - n + 1)
        if n < clip_len:
            start = i if n < num_clips else i * n // num_clips
            idx = np.arange(start, start + clip_len)
        elif n < 2 * clip_len:
            offset = np.zeros(clip_len + 1, dtype=np.int64)
            offset[rs.choice(clip_len + 1, n - clip_len, replace=False)] = 1
            idx = np.arange(clip_len) + np.cumsum(offset)[:-1]
        else:
            bids = np.array([j * n // clip_len for j in range(clip_len + 1)])
            idx = bids[:-1] + rs.randint(np.diff(bids))
        inds.append(idx + off)
    return np.stack(inds)


def skeleton_pipeline(kp, *, feat, layout, train, rng, clip_len=64, num_clips=1, num_person=2, scale=0.1, rot=0.3,
                      flip_p=0.5, temporal_flip_p=0.0, score=None, img_shape=None):
    """(M, T, V, C) float16/32 keypoints -> (num_clips, num_person, clip_len, V, C') float32, spec order.
    `rng` is a numpy Generator (train); val/test sampling seeds its own RNG as PYSKL does (255 per video)."""
    x = kp.astype(np.float32)
    if layout == "coco":
        if img_shape is not None:
            x = pre_normalize_2d(x, img_shape)
        if score is not None:
            x = np.concatenate([x, score.astype(np.float32)[..., None]], -1)
    else:
        x = pre_normalize_3d(x)
    if train:
        if layout != "coco":
            x = random_scale(x, scale, rng)
            x = random_rot(x, rot, rng)
        if rng.random() < flip_p:  # relabel joints only; coordinates are not mirrored
            x = x[:, :, NTU_FLIP if layout == "nturgb+d" else COCO_FLIP]
        if temporal_flip_p > 0 and rng.random() < temporal_flip_p:
            x = x[:, ::-1].copy()
    x = compute_stream(x, feat, layout)
    T = x.shape[1]
    if train:
        idx = np.stack([uniform_sample_train(T, clip_len, rng) for _ in range(num_clips)])
    else:
        idx = uniform_sample_test(T, clip_len, num_clips)
    x = x[:, np.mod(idx, T).reshape(-1)]  # (M, nc*L, V, C)
    M = x.shape[0]
    if M < num_person:
        x = np.concatenate([x, np.zeros((num_person - M,) + x.shape[1:], np.float32)])
    x = x[:num_person]
    x = x.reshape(num_person, num_clips, clip_len, *x.shape[2:]).transpose(1, 0, 2, 3, 4)
    return np.ascontiguousarray(x, dtype=np.float32)


class SkeletonDataset(torch.utils.data.Dataset):
    """PYSKL annotations filtered to `names`, repeated `repeat` times. Train items use a numpy
    Generator keyed on (seed, epoch, index) so a resumed run draws the same augmentations."""

    def __init__(self, annotations, names, *, feat, layout, train, clip_len, num_clips, num_person=2, repeat=1,
                 scale=0.1, rot=0.3, flip_p=0.5, temporal_flip_p=0.0, seed=0):
        want = set(names)
        self.items = [a for a in annotations if a["frame_dir"] in want]  # annotation order (official pred order)
        self.labels = np.array([a["label"] for a in self.items], dtype=np.int64)
        self.kw = dict(feat=feat, layout=layout, train=train, clip_len=clip_len, num_clips=num_clips,
                       num_person=num_person, scale=scale, rot=rot, flip_p=flip_p, temporal_flip_p=temporal_flip_p)
        self.repeat, self.seed, self.epoch, self.train = repeat, seed, 0, train

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items) * self.repeat

    def __getitem__(self, index):
        ann = self.items[index % len(self.items)]
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        x = skeleton_pipeline(ann["keypoint"], rng=rng, score=ann.get("keypoint_score"),
                              img_shape=ann.get("img_shape"), **self.kw)
        return torch.from_numpy(x), int(ann["label"]), index


# ----------------------------------------------------------------------------------------------
# ST-GCN++ (spec §3.2). Graph aggregation goes through common.ops.graph_aggregate.

GCN_IMPL = "auto"  # auto | fused -> common.ops.graph_aggregate; einsum -> torch.einsum reference


def graph_aggregate(x, A):
    """x (N, K*C, T, V), A (K, V, W) -> (N, C, T, W) = einsum('nkctv,kvw->nctw')."""
    if GCN_IMPL == "einsum":
        n, kc, t, v = x.shape
        return torch.einsum("nkctv,kvw->nctw", x.view(n, A.shape[0], kc // A.shape[0], t, v), A).contiguous()
    from common import ops
    return ops.graph_aggregate(x, A)


class UnitGCN(nn.Module):
    """unit_gcn, adaptive='init', conv_pos='pre', with_res=True."""

    def __init__(self, cin, cout, A):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.conv = nn.Conv2d(cin, cout * A.shape[0], 1)
        self.bn = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)) if cin != cout else nn.Identity()

    def forward(self, x):
        z = graph_aggregate(self.conv(x), self.A)
        return F.relu(self.bn(z) + self.down(x))


class UnitTCN(nn.Module):
    def __init__(self, cin, cout, kernel_size=9, stride=1, dilation=1, bn=True):
        super().__init__()
        pad = (kernel_size + (kernel_size - 1) * (dilation - 1) - 1) // 2
        self.conv = nn.Conv2d(cin, cout, (kernel_size, 1), padding=(pad, 0), stride=(stride, 1), dilation=(dilation, 1))
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(x))


class MSTCN(nn.Module):
    """Six temporal branches (dilations 1-4, max-pool, 1x1); branch 0 takes the remainder channels."""

    def __init__(self, channels, stride=1):
        super().__init__()
        mid = channels // 6
        rem = channels - mid * 5
        branches = []
        for i, cfg in enumerate([1, 2, 3, 4, "max", "1x1"]):
            bc = rem if i == 0 else mid
            if cfg == "1x1":
                branches.append(nn.Conv2d(channels, bc, 1, stride=(stride, 1)))
            elif cfg == "max":
                branches.append(nn.Sequential(nn.Conv2d(channels, bc, 1), nn.BatchNorm2d(bc), nn.ReLU(),
                                              nn.MaxPool2d((3, 1), stride=(stride, 1), padding=(1, 0))))
            else:
                branches.append(nn.Sequential(nn.Conv2d(channels, bc, 1), nn.BatchNorm2d(bc), nn.ReLU(),
                                              UnitTCN(bc, bc, 3, stride, cfg, bn=False)))
        self.branches = nn.ModuleList(branches)
        self.transform = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 1))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.transform(torch.cat([b(x) for b in self.branches], 1)))


class STGCNBlock(nn.Module):
    def __init__(self, cin, cout, A, stride=1, residual=True):
        super().__init__()
        self.gcn = UnitGCN(cin, cout, A)
        self.tcn = MSTCN(cout, stride)
        if not residual:
            self.residual = None
        elif cin == cout and stride == 1:
            self.residual = nn.Identity()
        else:
            self.residual = UnitTCN(cin, cout, 1, stride)

    def forward(self, x):
        res = 0 if self.residual is None else self.residual(x)
        return F.relu(self.tcn(self.gcn(x)) + res)


class STGCNPP(nn.Module):
    """ST-GCN++ backbone + MixAAHead. Input (N, M, T, V, C) -> logits (N, num_classes)."""

    def __init__(self, num_classes, A, in_channels=3, base_channels=64, num_stages=10, inflate_stages=(5, 8),
                 down_stages=(5, 8)):
        super().__init__()
        A = torch.as_tensor(A, dtype=torch.float32)
        V = A.shape[1]
        self.data_bn = nn.BatchNorm1d(in_channels * V)
        blocks = [STGCNBlock(in_channels, base_channels, A, 1, residual=False)]
        c = base_channels
        for i in range(2, num_stages + 1):
            cout = c * 2 if i in inflate_stages else c
            blocks.append(STGCNBlock(c, cout, A, 2 if i in down_stages else 1))
            c = cout
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(c, num_classes)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def features(self, x):
        N, M, T, V, C = x.shape
        x = x.permute(0, 1, 3, 4, 2).reshape(N * M, V * C, T)  # channel index v*C + c
        x = self.data_bn(x).view(N, M, V, C, T).permute(0, 1, 3, 4, 2).reshape(N * M, C, T, V)
        for block in self.blocks:
            x = block(x)
        return x.reshape(N, M, *x.shape[1:])

    def forward(self, x):
        f = self.features(x)
        f = f.mean(dim=(3, 4)).mean(dim=1)  # over (T, V), then over persons incl. the zero-padded one
        return self.fc(f)


def build_model(args, num_classes):
    V, _, _, _ = LAYOUTS[args.layout]
    A = build_graph(args.layout, args.graph_mode)
    return STGCNPP(num_classes, A, in_channels=3, base_channels=args.base_channels, num_stages=args.num_stages,
                   inflate_stages=tuple(args.inflate_stages), down_stages=tuple(args.down_stages))


# ----------------------------------------------------------------------------------------------
# Rebalanced partial mixup (STAE, spec §4.2) and the action-aware two-stage weights (DAA, §4.3)

def mixup_lambda(n_a, n_b, alpha=0.64, kappa=3.0):
    """Remix-style label weight of the upper-body sample's class a vs the partner's class b."""
    lam = torch.full_like(n_a, alpha, dtype=torch.float32)
    lam[n_a > kappa * n_b] = 0.0
    lam[n_b > kappa * n_a] = 1.0
    return lam


def partial_mixup(x, y, counts, upper, *, ratio=1 / 16, alpha=0.64, kappa=3.0, scramble=False, generator=None):
    """x (B, M, T, V, C), y (B,), counts (C,) float. Returns x_mixed, a, b, lam (per sample)."""
    B, V = x.shape[0], x.shape[3]
    n_mix = int(math.floor(ratio * B))
    a, b = y.clone(), y.clone()
    lam = torch.ones(B, dtype=torch.float32, device=x.device)
    if n_mix == 0 or B < 2:
        return x, a, b, lam
    g = generator
    idx = torch.randperm(B, generator=g)[:n_mix]
    partner = (idx + torch.randint(1, B, (n_mix,), generator=g)) % B  # j != i, from the original batch
    idx, partner = idx.to(x.device), partner.to(x.device)
    upper = torch.as_tensor(upper, device=x.device)
    lower = torch.as_tensor([v for v in range(V) if v not in set(upper.tolist())], device=x.device)
    xm = x.clone()
    if scramble:  # official: cat along V, so the joints land in slots 0..|U|-1 and |U|..V-1
        xm[idx] = torch.cat([x[idx][:, :, :, upper], x[partner][:, :, :, lower]], dim=3)
    else:
        xm[idx[:, None], :, :, lower[None, :]] = x[partner[:, None], :, :, lower[None, :]]
    b[idx] = y[partner]
    lam[idx] = mixup_lambda(counts[y[idx]], counts[y[partner]], alpha, kappa)
    return xm, a, b, lam


def effective_number_weights(counts, beta):
    """w_y = (1 - beta_y) / (1 - beta_y^{n_y}), rescaled to sum to C."""
    w = (1 - beta) / (1 - beta ** counts)
    return w / w.sum() * len(counts)


def class_weights(epoch, counts, *, loss="aa", drw_epoch=19, beta_min=0.99, beta_max=0.9999, official=False):
    """Per-class loss weights as a pure function of the epoch (0-based)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if loss == "ce" or epoch < drw_epoch:
        return torch.ones_like(counts, dtype=torch.float32)
    if loss == "cb":
        return effective_number_weights(counts, torch.full_like(counts, 0.999)).float()
    span = max(float(counts.max() - counts.min()), 1e-12)
    beta = beta_min + (beta_max - beta_min) * (counts - counts.min()) / span
    if official and (epoch - drw_epoch) % 2 == 1:
        # official in-place mutation: every other weighted epoch uses beta / (1 - (1 - beta)^n)
        w = beta / (1 - (1 - beta) ** counts)
        return (w / w.sum() * len(counts)).float()
    return effective_number_weights(counts, beta).float()


def mixup_loss(logits, a, b, lam, weights, scalar_lambda=False):
    """L = sum_i lam_i w_ai l(z_i, a_i) / sum_i w_ai + sum_i (1 - lam_i) w_bi l(z_i, b_i) / sum_i w_bi."""
    if scalar_lambda:  # official: one lambda per batch (that of the last mixed pair)
        mixed = (a != b) | (lam != 1)
        l = lam[mixed.nonzero()[-1]].squeeze() if mixed.any() else lam.new_tensor(1.0)
        return l * F.cross_entropy(logits, a, weight=weights) + (1 - l) * F.cross_entropy(logits, b, weight=weights)
    la = F.cross_entropy(logits, a, reduction="none")
    lb = F.cross_entropy(logits, b, reduction="none")
    wa, wb = weights[a], weights[b]
    return (lam * wa * la).sum() / wa.sum() + ((1 - lam) * wb * lb).sum() / wb.sum()


# ----------------------------------------------------------------------------------------------
# Train / eval loops

def lr_at(it, total, lr0, warmup=0):
    if warmup and it < warmup:
        return lr0 * (it + 1) / warmup
    return 0.5 * lr0 * (1 + math.cos(math.pi * it / max(total, 1)))


def train_one_epoch(model, loader, optimizer, epoch, args, counts, env, it0, total_iters, logger):
    model.train()
    weights = class_weights(epoch, counts, loss=args.loss, drw_epoch=args.drw_epoch, beta_min=args.aa_beta_min,
                            beta_max=args.aa_beta_max, official=args.official_quirks).to(env.device)
    counts_t = torch.as_tensor(counts, dtype=torch.float32, device=env.device)
    gen = torch.Generator().manual_seed(args.seed * 1000003 + epoch * 7919 + env.rank)  # mixup draws, per rank
    upper = LAYOUTS[args.layout][3]
    it, sum_loss, sum_acc, n = it0, 0.0, 0.0, 0
    for x, y, index in progress(loader, desc=f"epoch {epoch}"):
        x, y = x.to(env.device, non_blocking=True)[:, 0], y.to(env.device)  # single train clip
        if args.no_mix:
            a, b, lam = y, y, torch.ones(len(y), device=env.device)
        else:
            x, a, b, lam = partial_mixup(x, y, counts_t, upper, ratio=args.mix_ratio, alpha=args.mix_alpha,
                                         kappa=args.mix_kappa, scramble=args.official_quirks, generator=gen)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, total_iters, args.lr, args.warmup_iters)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(x)
        loss = mixup_loss(logits.float(), a, b, lam, weights, scalar_lambda=args.official_quirks)
        if not torch.isfinite(loss):
            items = loader.dataset.items  # inputs are finite (checked at load): the optimisation diverged
            names = [items[i % len(items)]["frame_dir"] for i in index.tolist()]
            raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch} iteration {it} (lr "
                                     f"{optimizer.param_groups[0]['lr']:g}); batch frame_dirs {names}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pred = logits.argmax(1)
        acc = (lam * (pred == a).float() + (1 - lam) * (pred == b).float()).mean().item()
        sum_loss += loss.item() * len(y)
        sum_acc += acc * len(y)
        n += len(y)
        it += 1
        if it % args.log_interval == 0:
            logger.log({"phase": "iter", "epoch": epoch, "iter": it, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                        "train_acc": acc})
    return it, dist_lib.all_reduce_mean(sum_loss / max(n, 1)), dist_lib.all_reduce_mean(sum_acc / max(n, 1))


@torch.no_grad()
def predict(model, loader, env, num_classes, desc="eval"):
    """Clip-averaged softmax probabilities (num_samples, C) in dataset order, gathered over ranks."""
    model.eval()
    all_idx, all_prob = [], []
    for x, _, idx in progress(loader, desc=desc):
        B, nc = x.shape[:2]
        logits = model(x.to(env.device).flatten(0, 1)).float()
        prob = logits.softmax(-1).view(B, nc, -1).mean(1)
        all_idx.append(idx)
        all_prob.append(prob.cpu())
    idx = torch.cat(all_idx) if all_idx else torch.zeros(0, dtype=torch.long)
    prob = torch.cat(all_prob) if all_prob else torch.zeros(0, num_classes)
    _, prob = dist_lib.gather_eval(idx, prob)
    return prob


def shot_groups(counts, many=100, few=20):
    """many > 100, medium 20-100, few < 20 training samples (project definition, spec §2.3)."""
    counts = np.asarray(counts)
    return {"many": np.where(counts > many)[0], "medium": np.where((counts >= few) & (counts <= many))[0],
            "few": np.where(counts < few)[0]}


def evaluate_scores(prob, labels, counts):
    """All test metrics (fractions) from clip-averaged probabilities."""
    C = prob.shape[1]
    labels = torch.as_tensor(labels)
    pred = prob.argmax(1)
    top = metrics_lib.topk_accuracy(prob, labels, ks=(1, 5))
    per_class = metrics_lib.per_class_accuracy(pred, labels, C).numpy()
    out = {"top1": top[1], "top5": top[5], "mean_class": metrics_lib.mean_class_accuracy(pred, labels, C)}
    for name, cls in shot_groups(counts).items():
        vals = per_class[cls][~np.isnan(per_class[cls])] if len(cls) else np.array([])
        out[name] = float(vals.mean()) if len(vals) else float("nan")
    third = C // 3  # thirds of the classes in LT order (head first, tail last)
    for name, cls in (("head", np.arange(third)), ("mid", np.arange(third, C - third)), ("tail", np.arange(C - third, C))):
        vals = per_class[cls][~np.isnan(per_class[cls])]
        out[name] = float(vals.mean()) if len(vals) else float("nan")
    out["per_class"] = [None if np.isnan(v) else float(v) for v in per_class]
    return out


def save_preds(path, prob):
    """Official format: a list of float32 (C,) probability vectors, test-annotation order."""
    with open(path, "wb") as f:
        pickle.dump([p.astype(np.float32) for p in prob.numpy()], f)


def load_preds(path):
    preds = ckpt_lib.safe_pickle_load(path, what="score file")
    arr = np.stack([np.asarray(p, dtype=np.float32) for p in preds]) if isinstance(preds, list) else np.asarray(preds)
    if arr.ndim != 2:
        raise DataFormatError(f"{path}: expected a list of (C,) score vectors, got an array of shape {arr.shape}")
    return arr


# ----------------------------------------------------------------------------------------------
# Data setup

def setup_data(args, env):
    """Returns (annotations, train_names, val_names, test_names, counts, num_classes, skipped frame_dirs)."""
    layout, num_classes, n_max_by_split = DATASETS[args.dataset]
    args.layout = layout
    if args.synthetic:
        from common.data import brl_synth
        num_classes = args.num_classes or brl_synth.NUM_CLASSES
        ann_path = (Path(args.synth_dir or Path(args.output_dir) / "synthetic") /
                    f"brl_synth_s{args.synth_seed}_c{num_classes}_n{args.synth_n_max}_if{args.imb_factor:g}"
                    f"_v{args.val_per_class}_t{args.synth_test_per_class}.pkl")
        if env.is_main and not ann_path.is_file():
            data, _ = brl_synth.build_dataset(num_classes=num_classes, n_max=args.synth_n_max,
                                              imb_factor=args.imb_factor,
                                              val_per_class=args.val_per_class, test_per_class=args.synth_test_per_class,
                                              seed=args.synth_seed)
            ann_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ann_path.with_name(ann_path.name + f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                pickle.dump(data, f)
            os.replace(tmp, ann_path)  # demo runs in parallel processes share the cache
        dist_lib.barrier()
        args.ann_file, args.split, args.dataset = str(ann_path), "synth", "synthetic"
        n_max_by_split = {"synth": args.synth_n_max}
    if not args.ann_file:
        raise config_lib.InputError("--ann-file is required (a PYSKL pickle), or pass --synthetic for the offline demo data")
    num_classes = args.num_classes or num_classes
    data = load_pyskl(args.ann_file, num_classes, layout=layout, strict=args.strict, trust=args.trust_checkpoint)
    annotations, skipped = data["annotations"], data["skipped_nonfinite"]
    train_all = split_names(data, f"{args.split}_train", args.ann_file)
    test_names = split_names(data, f"{args.split}_val", args.ann_file)
    label_of = {a["frame_dir"]: a["label"] for a in annotations}
    for name in train_all + test_names:
        if name not in label_of and name not in skipped:
            raise DataFormatError(f"{args.ann_file}: split lists frame_dir {name!r} that has no annotation")
    n_max = n_max_by_split.get(args.split, 600)
    if args.lt_list == "none":
        train_names = list(train_all)
    elif args.lt_list == "gen":  # on the full split, skipped clips included, as the shipped lists were built
        everything = annotations + [{"frame_dir": n, "label": c} for n, c in skipped.items()]
        train_names = make_lt_list(everything, train_all, num_classes, n_max, args.imb_factor)
    else:
        train_names = read_lt_list(args.lt_list, known=set(train_all))
    train_names = [n for n in train_names if n not in skipped]
    test_names = [n for n in test_names if n not in skipped]
    train_all = [n for n in train_all if n not in skipped]
    counts = np.bincount([label_of[n] for n in train_names], minlength=num_classes).astype(np.int64)
    if args.official_quirks:  # counts from the IF-100 formula keyed on the split name, whatever list is loaded
        split_key = f"{args.split}_train"
        nm, inv = (400, 0.01) if split_key == "xset_train" else (100, 0.1) if split_key == "train" else (600, 0.01)
        counts = np.array(lt_counts(nm, 1 / inv, num_classes))
    if (counts == 0).any():
        warnings.warn(f"classes {np.where(counts == 0)[0].tolist()} have no training samples")
    if args.val_source == "lt-rest":
        val_names = balanced_holdout(annotations, train_all, train_names, num_classes, args.val_per_class)
    else:  # official: the "val" split is the test split
        val_names = list(test_names)
    return annotations, train_names, val_names, test_names, counts, num_classes, sorted(skipped)


def make_dataset(args, annotations, names, train, num_clips):
    return SkeletonDataset(annotations, names, feat=args.feat, layout=args.layout, train=train, clip_len=args.clip_len,
                           num_clips=num_clips, num_person=args.num_person, repeat=args.repeat if train else 1,
                           scale=args.scale, rot=args.rot, flip_p=args.flip_p, temporal_flip_p=args.temporal_flip_p,
                           seed=args.seed)


# ----------------------------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(description="BRL (long-tailed skeleton action recognition, ST-GCN++)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config_lib.add_common_args(p, epochs=24, batch_size=16, lr=None, workers=2, seed=0,
                               output_dir="work_dirs/brl/ntu60_xsub_LT/j", resume="auto")
    for action in p._actions:
        if action.dest == "lr":
            action.help = "base lr; default (None) = auto: 0.0125 * global batch / 16 (0.05 at 4 x 16)"
    g = p.add_argument_group("data")
    g.add_argument("--ann-file", default="", help="PYSKL pickle (e.g. data/nturgb+d/ntu60_3danno.pkl)")
    g.add_argument("--dataset", default="ntu60", choices=sorted(DATASETS))
    g.add_argument("--num-classes", type=int, default=0, help="0 = from --dataset")
    g.add_argument("--split", default="xsub", help="reads {split}_train and {split}_val")
    g.add_argument("--lt-list", default="data/NTU60_LT/NTU60_xsub_exp_100.txt",
                   help="long-tailed frame_dir list; 'none' = full split, 'gen' = build it from the formula")
    g.add_argument("--imb-factor", type=float, default=100)
    g.add_argument("--feat", default="j", choices=STREAMS)
    g.add_argument("--clip-len", type=int, default=64)
    g.add_argument("--num-person", type=int, default=2)
    g.add_argument("--repeat", type=int, default=5, help="dataset repeats per epoch")
    g.add_argument("--scale", type=float, default=0.1)
    g.add_argument("--rot", type=float, default=0.3)
    g.add_argument("--flip-p", type=float, default=0.5)
    g.add_argument("--temporal-flip-p", type=float, default=0.0)
    g.add_argument("--val-source", default="lt-rest", choices=["lt-rest", "test"],
                   help="validation (best.pth) on a balanced hold-out of {split}_train minus the LT list, or "
                        "'test' = the official behaviour (selects on the test split)")
    g.add_argument("--val-per-class", type=int, default=20)
    g.add_argument("--synth-test-per-class", type=int, default=30, help="balanced synthetic test clips per class")
    g.add_argument("--synth-n-max", type=int, default=200, help="head-class count of the synthetic LT train set")
    g.add_argument("--synth-seed", type=int, default=0, help="seed of the synthetic data set (--synthetic)")
    g.add_argument("--synth-dir", default="", help="where the synthetic pickle is cached (default <output-dir>/synthetic)")
    g = p.add_argument_group("model")
    g.add_argument("--graph-mode", default="spatial", choices=["spatial", "stgcn_spatial"])
    g.add_argument("--base-channels", type=int, default=64)
    g.add_argument("--num-stages", type=int, default=10)
    g.add_argument("--inflate-stages", type=int, nargs="+", default=[5, 8])
    g.add_argument("--down-stages", type=int, nargs="+", default=[5, 8])
    g.add_argument("--gcn-impl", default="auto", choices=["auto", "fused", "einsum"],
                   help="graph aggregation: common.ops.graph_aggregate (auto/fused) or the torch.einsum reference")
    g = p.add_argument_group("optimisation")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--no-nesterov", action="store_true", help="plain momentum (official: nesterov)")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--warmup-iters", type=int, default=0)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many epochs in this job (time-limited jobs; continue with --resume auto)")
    g = p.add_argument_group("method")
    g.add_argument("--mix-ratio", type=float, default=1 / 16)
    g.add_argument("--mix-alpha", type=float, default=0.64)
    g.add_argument("--mix-kappa", type=float, default=3.0)
    g.add_argument("--no-mix", action="store_true", help="disable the rebalanced body-part mixup")
    g.add_argument("--loss", default="aa", choices=["aa", "ce", "cb"], help="aa = action-aware two-stage weights")
    g.add_argument("--drw-epoch", type=int, default=19)
    g.add_argument("--aa-beta-min", type=float, default=0.99)
    g.add_argument("--aa-beta-max", type=float, default=0.9999)
    g.add_argument("--official-quirks", action="store_true",
                   help="joint-slot scramble, scalar lambda, IF-100 formula counts, DRW alternation")
    g = p.add_argument_group("evaluation")
    g.add_argument("--val-clips", type=int, default=1)
    g.add_argument("--test-clips", type=int, default=10)
    g.add_argument("--val-interval", type=int, default=1)
    g.add_argument("--checkpoint", default="",
                   help="with --eval-only: checkpoint to test (default <output-dir>/best.pth); metrics go to "
                        "<output-dir>/eval_results.json")
    return p


def resolve_args(args, env):
    global GCN_IMPL
    GCN_IMPL = args.gcn_impl
    if args.gcn_impl == "fused":  # error out early if the compiled kernels are not there
        from common import ops
        ops.set_backend("ext")
    if args.lr is None:
        args.lr = 0.0125 * args.batch_size * env.world_size / 16
    return args


def mixup_status(args, env):
    """How many samples the rebalanced mixup replaces per batch on this rank: floor(ratio * B) with the
    per-rank batch B, so 0 (mixup silently off in the official code) when B < 16 at ratio 1/16."""
    per_batch = 0 if args.no_mix else int(math.floor(args.mix_ratio * args.batch_size))
    status = {"enabled": not args.no_mix, "per_rank_batch": args.batch_size, "mixed_per_batch": per_batch,
              "active": per_batch > 0}
    if not args.no_mix and per_batch == 0:
        need = int(math.ceil(1 / args.mix_ratio)) if args.mix_ratio > 0 else None
        print(f"[rank {env.rank}] WARNING: mixup is OFF: per-rank batch {args.batch_size} gives floor("
              f"{args.mix_ratio:g} x {args.batch_size}) = 0 mixed samples per batch"
              + (f"; a per-rank --batch-size of at least {need} is needed" if need else ""), flush=True)
    return status


# ----------------------------------------------------------------------------------------------
# main: config -> dist -> data -> model -> epochs (train, val, checkpoint) -> test last + best

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "ensemble":
        return ensemble_main(argv[1:])
    if argv and argv[0] == "demo":
        return demo_main(argv[1:])
    args = config_lib.parse_args(build_parser(), argv)
    return run(args)


def run(args):
    env = dist_lib.setup(args.device)
    args = resolve_args(args, env)
    dist_lib.seed_everything(args.seed + env.rank)
    out = Path(args.output_dir)
    annotations, train_names, val_names, test_names, counts, C, skipped = setup_data(args, env)
    mixup = mixup_status(args, env)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_lib.save_config(args, out)
        write_lt_list(out / "lt_list.txt", train_names)  # the long-tailed list this run trained on
    logger = JsonlLogger(out / "log.jsonl")
    if skipped and env.is_main:
        print(f"skipped {len(skipped)} clip(s) with non-finite keypoints (NaN/inf) in {args.ann_file}: "
              + ", ".join(skipped[:10]) + (f" ... (+{len(skipped) - 10} more)" if len(skipped) > 10 else ""), flush=True)
        logger.log({"phase": "data", "skipped_nonfinite": len(skipped), "frame_dirs": skipped})

    train_set = make_dataset(args, annotations, train_names, True, 1)
    val_set = make_dataset(args, annotations, val_names, False, args.val_clips)
    test_set = make_dataset(args, annotations, test_names, False, args.test_clips)
    train_loader = dist_lib.make_loader(train_set, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed)
    val_loader = dist_lib.make_loader(val_set, args.batch_size, shuffle=False, workers=args.workers)
    test_loader = dist_lib.make_loader(test_set, max(1, args.batch_size // 2), shuffle=False, workers=args.workers)

    torch.manual_seed(args.seed)  # identical init on every rank
    model = build_model(args, C).to(env.device)
    if args.weights:  # optional: ST-GCN++ trains from scratch in the paper
        missing, unexpected = ckpt_lib.load_weights(args.weights, model, strict=not args.allow_partial_weights,
                                                    trust=args.trust_checkpoint)
        if (missing or unexpected) and env.is_main:
            print(f"--weights {args.weights} (--allow-partial-weights): missing {missing}, unexpected {unexpected}")
    ddp = model
    if env.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=not args.no_nesterov,
                                weight_decay=args.weight_decay)
    total_iters = args.epochs * len(train_loader)
    start_epoch, it, best, best_epoch = 0, 0, -1.0, -1
    resume = ckpt_lib.resolve_resume(args.resume, out) if not args.eval_only else None
    if resume is not None:
        state = ckpt_lib.load_checkpoint(resume, model=model, optimizer=optimizer, map_location=env.device,
                                         trust=args.trust_checkpoint)
        start_epoch, it = state["epoch"], state["step"]
        best = state["best_metric"] if state["best_metric"] is not None else -1.0
        if env.is_main:
            print(f"resumed from {resume} at epoch {start_epoch}")
    if env.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"BRL {args.dataset} {args.split} feat={args.feat}: train {len(train_names)} clips (x{args.repeat}), "
              f"val {len(val_names)}, test {len(test_names)}, {C} classes, counts max/min {counts.max()}/{counts.min()}, "
              f"{n_params:,} params, world {env.world_size}, lr {args.lr:g}, {total_iters} iterations")

    if not args.eval_only:
        t0 = time.time()
        for epoch in range(start_epoch, args.epochs):
            dist_lib.set_epoch(train_loader, epoch)
            train_set.set_epoch(epoch)
            it, loss, acc = train_one_epoch(ddp, train_loader, optimizer, epoch, args, counts, env, it, total_iters, logger)
            record = {"phase": "train", "epoch": epoch, "loss": loss, "train_acc": acc, "lr": optimizer.param_groups[0]["lr"],
                      "time": time.time() - t0}
            is_best = False
            dist_lib.broadcast_buffers(model)  # rank 0's BN statistics everywhere: what is evaluated is what is saved
            if len(val_set) and ((epoch + 1) % args.val_interval == 0 or epoch + 1 == args.epochs):
                prob = predict(model, val_loader, env, C, desc="val")
                top = metrics_lib.topk_accuracy(prob, torch.as_tensor(val_set.labels), ks=(1, 5))
                val = evaluate_scores(prob, val_set.labels, counts)
                record.update(val_top1=top[1], val_top5=top[5], val_mean_class=val["mean_class"], val_few=val["few"],
                              val_tail=val["tail"])
                is_best = top[1] > best
                best = max(best, top[1])
                best_epoch = epoch + 1 if is_best else best_epoch
            if env.is_main:
                logger.log(record)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}))
                ckpt_lib.save_checkpoint(out / "checkpoint.pth", model=model, optimizer=optimizer, epoch=epoch + 1, step=it,
                                         best_metric=best)
                if is_best or not len(val_set):
                    ckpt_lib.save_checkpoint(out / "best.pth", model=model, epoch=epoch + 1, step=it, best_metric=best)
            dist_lib.barrier()
            if args.stop_after and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
                if env.is_main:
                    print(f"stopping after epoch {epoch} (--stop-after {args.stop_after}); resume with --resume auto")
                dist_lib.cleanup()
                return {}

    results = {}
    dist_lib.broadcast_buffers(model)
    if args.eval_only:
        targets = [("eval", Path(args.checkpoint) if args.checkpoint else out / "best.pth")]
    else:
        targets = [("last", None)] + ([("best", out / "best.pth")] if (out / "best.pth").is_file() else [])
    for tag, path in targets:
        if tag == "best" and best_epoch == args.epochs and "last" in results:  # best.pth is the last epoch
            results[tag] = results["last"]
            if env.is_main:
                save_preds(out / "best_pred.pkl", prob)
            continue
        if path is not None:
            ckpt_lib.load_checkpoint(path, model=model, map_location=env.device, restore_rng=False,
                                     trust=args.trust_checkpoint)
        prob = predict(model, test_loader, env, C, desc=f"test {tag}")
        res = evaluate_scores(prob, test_set.labels, counts)
        results[tag] = res
        if env.is_main:
            save_preds(out / f"{tag}_pred.pkl", prob)
            np.save(out / "test_labels.npy", test_set.labels)
            pred = prob.argmax(1)
            plot_confusion(metrics_lib.confusion_matrix(pred, torch.as_tensor(test_set.labels), C), out / "plots" / f"confusion_{tag}.png",
                           title=f"BRL {args.feat} ({tag})")
            plot_bars([0 if v is None else v for v in res["per_class"]], out / "plots" / f"per_class_acc_{tag}.png",
                      labels=[f"{c}({counts[c]})" for c in range(C)], title=f"per-class accuracy ({tag}); label(train count)",
                      ylabel="accuracy")
            print(f"test {tag}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if k != "per_class"))
    if env.is_main:
        results["counts"] = counts.tolist()
        results["mixup"] = mixup
        results["skipped_nonfinite"] = {"count": len(skipped), "frame_dirs": skipped}
        write_json(out / ("eval_results.json" if args.eval_only else "results.json"), results)
        if (out / "log.jsonl").is_file():
            from common.logging import read_jsonl
            recs = [r for r in read_jsonl(out / "log.jsonl") if r.get("phase") == "train"]
            plot_curves(recs, out / "plots" / "curves.png", ["loss", "train_acc", "val_top1"], title="BRL")
    dist_lib.barrier()
    dist_lib.cleanup()
    return results


# ----------------------------------------------------------------------------------------------
# ensemble: weighted sum of per-stream probabilities (spec §6)

def ensemble_scores(score_list, weights):
    if len(score_list) != len(weights):
        raise ValueError(f"{len(score_list)} score files but {len(weights)} weights")
    shapes = {s.shape for s in score_list}
    if len(shapes) != 1:
        raise ValueError(f"score files disagree in shape: {sorted(shapes)}")
    return sum(w * s for w, s in zip(weights, score_list))


def ensemble_main(argv):
    p = argparse.ArgumentParser(prog="train_brl.py ensemble", description="fuse per-stream score files",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scores", nargs="+", required=True, help="*_pred.pkl files in stream order j b [k] jm bm [km]")
    p.add_argument("--ensemble-weights", type=float, nargs="+", default=None,
                   help="default by count: 2 -> 1:1, 4 -> 2:2:1:1, 6 -> 2:2:2:1:1:1")
    p.add_argument("--labels", default="", help="test_labels.npy (default: next to the first score file)")
    p.add_argument("--output", default="", help="write the fused metrics as JSON here")
    args = p.parse_args(argv)
    weights = args.ensemble_weights or ENSEMBLE_WEIGHTS.get(len(args.scores))
    if weights is None:
        p.error(f"no default weights for {len(args.scores)} streams; pass --ensemble-weights")
    labels_path = Path(args.labels) if args.labels else Path(args.scores[0]).parent / "test_labels.npy"
    if not labels_path.is_file():
        p.error(f"labels file {labels_path} not found (pass --labels)")
    labels = np.load(labels_path)
    scores = [load_preds(s) for s in args.scores]
    for s, path in zip(scores, args.scores):
        if len(s) != len(labels):
            p.error(f"{path}: {len(s)} score vectors but {len(labels)} labels in {labels_path}")
    fused = ensemble_scores(scores, weights)
    res = {"weights": list(weights), "streams": list(args.scores)}
    for path, s in zip(args.scores, scores):
        res[f"top1[{path}]"] = float((s.argmax(1) == labels).mean())
    top = metrics_lib.topk_accuracy(torch.from_numpy(fused), torch.from_numpy(labels), ks=(1, 5))
    res.update(top1=top[1], top5=top[5])
    print(json.dumps(res, indent=2))
    if args.output:
        write_json(args.output, res)
    return res


# ----------------------------------------------------------------------------------------------
# demo: synthetic long-tailed skeletons, CE vs BRL (+ ablation), summary.json

DEMO_METHODS = {  # method -> flags
    "ce": ["--loss", "ce", "--no-mix"],
    "aa": ["--loss", "aa", "--no-mix"],
    "mixup": ["--loss", "ce"],
    "brl": ["--loss", "aa"],
    # learnability check: the CE arm on a balanced version of the data with the same number of clips
    "balanced": ["--loss", "ce", "--no-mix", "--imb-factor", "1", "--synth-n-max", "44"],
}
DEMO_FLAGS = ["--synthetic", "--lt-list", "gen", "--imb-factor", "100", "--synth-n-max", "200",
              "--synth-test-per-class", "30", "--val-per-class", "10", "--clip-len", "16", "--num-person", "1",
              "--repeat", "1", "--epochs", "8", "--drw-epoch", "4", "--batch-size", "16", "--lr", "0.05",
              "--workers", "0", "--base-channels", "16", "--num-stages", "3", "--inflate-stages", "3",
              "--down-stages", "3", "--test-clips", "1", "--val-clips", "1", "--val-interval", "1000",
              "--resume", "", "--device", "cpu", "--log-interval", "1000000"]
DEMO_METRICS = ["top1", "many", "medium", "few", "tail", "head", "mid", "mean_class"]


def demo_args(method, seed, out, extra=()):
    argv = DEMO_FLAGS + DEMO_METHODS[method] + ["--seed", str(seed), "--synth-seed", str(seed),
                                               "--synth-dir", str(Path(out) / "data"),
                                               "--output-dir", str(Path(out) / f"{method}_s{seed}"), *extra]
    return config_lib.parse_args(build_parser(), argv)


def _demo_run(job):
    """One arm, single-threaded (also the body of a --jobs worker process)."""
    method, seed, out, extra = job
    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"
    t0, c0 = time.time(), time.process_time()
    r = run(demo_args(method, seed, out, extra))["last"]
    row = {"method": method, "seed": seed, **{k: r[k] for k in DEMO_METRICS}}
    row.update(wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1))
    print(f"[demo] {method} seed {seed}: top1 {r['top1']:.4f} tail {r['tail']:.4f} "
          f"({row['cpu_s']} s CPU, {row['wall_s']} s wall)", flush=True)
    return row


def demo_main(argv):
    p = argparse.ArgumentParser(prog="train_brl.py demo", description="offline synthetic long-tailed demo",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="runs/brl_demo")
    p.add_argument("--methods", nargs="+", default=["ce", "aa", "brl"], choices=list(DEMO_METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="arms run in parallel single-threaded processes")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    t_start = time.time()
    for seed in args.seeds:  # build each data set once, before the arms share it
        for method in dict.fromkeys("balanced" if m == "balanced" else "ce" for m in args.methods):
            a = demo_args(method, seed, out, args.extra)
            setup_data(a, dist_lib.DistEnv())
    jobs = [(m, s, str(out), list(args.extra)) for s in args.seeds for m in args.methods]
    if args.jobs <= 1:
        rows = [_demo_run(j) for j in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_demo_run, jobs))
    summary = {"rows": rows, "command": "python train_brl.py demo " + " ".join(argv),
               "flags": DEMO_FLAGS, "method_flags": {m: DEMO_METHODS[m] for m in args.methods},
               "jobs": args.jobs, "total_wall_s": round(time.time() - t_start, 1),
               "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}}
    write_json(out / "summary.json", summary)
    print(summary_table(rows, ["top1", "many", "medium", "few", "tail"]))
    base = {r["seed"]: r for r in rows if r["method"] == "ce"}
    for r in rows:
        if r["method"] != "ce" and r["seed"] in base:
            print(f"[demo] {r['method']} seed {r['seed']} vs ce: tail {100 * (r['tail'] - base[r['seed']]['tail']):+.1f}, "
                  f"top-1 {100 * (r['top1'] - base[r['seed']]['top1']):+.1f} points")
    print(f"[demo] total wall {summary['total_wall_s']:.0f} s with {args.jobs} job(s); "
          f"sum of per-arm CPU {sum(r['cpu_s'] for r in rows):.0f} s")
    return rows


if __name__ == "__main__":
    config_lib.run_main(main)
