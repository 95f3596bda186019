"""ALBAR: adversarial learning against static (background) bias in action recognition.

Fioresi, Dave, Shah, ICLR 2025 (arXiv 2502.00156); official code UCF-CRCV/ALBAR @ c6751fa.
Spec: specs/albar.md. One run reads top to bottom:

    main() -> datasets (split lists + video folders, or the synthetic benchmark)
           -> model (torchvision swin3d_t, or a small 3D CNN for the CPU demo)
           -> per epoch: train_one_epoch (CE on the motion clip, -CE + entropy + gradient penalty on
              the static clip built from the *augmented* clip) -> validation (model selection)
           -> final evaluation of best.pth and the last checkpoint: IID top-1, SCUBA, SCUFO,
              Confl-FG and contrasted accuracy -> results.json, preds/*.csv, plots/*.png

`python train_albar.py demo` runs the offline synthetic benchmark (baseline vs ALBAR x 3 seeds).
"""
import argparse
import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from common import config
from common import dist as cdist
from common import ops
from common import video
from common.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, resolve_resume, safe_load, save_checkpoint
from common.config import InputError, add_common_args, parse_args, save_config
from common.logging import JsonlLogger, plot_bars, plot_confusion, plot_curves, progress, read_jsonl, write_json
from common.metrics import confusion_matrix, mean_class_accuracy, topk_accuracy
from common.video import (VideoDecodeError, center_crop, collate_skip_none, hflip, load_or_skip, random_crop,
                          random_resized_crop, resize_short_side, three_crop)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BIAS_TYPES = ("Places365", "VQGAN", "Stripe")  # official SCUBA/SCUFO background kinds; others are accepted too
DATASET_PREFIX = {"hmdb51": "HMDB51", "ucf101": "UCF101", "k400": "K400"}
VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v"}


# ----------------------------------------------------------------------------- CLI

def build_parser():
    p = argparse.ArgumentParser(description="ALBAR training (specs/albar.md); `train_albar.py demo` = offline demo",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, output_dir="runs/hmdb_swin_albar", epochs=50, batch_size=6, lr=1e-5, seed=1, workers=8)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="hmdb51", choices=["hmdb51", "ucf101", "k400", "list"])
    g.add_argument("--video-dir", default="Videos", help="video folder under --data-root (native formats)")
    g.add_argument("--bias-root", default="", help="folder with {P}_SCUBA_*/{P}_SCUFO_*/{P}_ConflFG_* sets")
    g.add_argument("--bias-prefix", default="", help="P of the bias folders; default from --dataset ('*' for list)")
    g.add_argument("--train-list", default="", help="`<relpath> <label>` list (overrides the native train split)")
    g.add_argument("--val-list", default="", help="validation list; default: carve --val-fraction from train")
    g.add_argument("--test-list", default="")
    g.add_argument("--val-fraction", type=float, default=0.2)
    g.add_argument("--split-seed", type=int, default=0)
    g.add_argument("--select-metric", default="val_top1", choices=["val_top1", "val_contra"])
    g.add_argument("--val-bias-root", default="", help="bias sets built from the val videos (for val_contra)")
    g.add_argument("--select-on-test", action="store_true",
                   help="official quirk: pick best.pth on the TEST split (never use for reported numbers)")
    g.add_argument("--num-frames", type=int, default=32)
    g.add_argument("--frame-stride", type=int, default=2)
    g.add_argument("--crop", type=int, default=224)
    g.add_argument("--short-side", type=int, default=256)
    g.add_argument("--rrc-scale", type=float, nargs=2, default=[0.08, 1.0], help="RandomResizedCrop scale range")
    g.add_argument("--rrc-ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], help="RandomResizedCrop ratio range")
    g.add_argument("--train-crop", default="rrc", choices=["rrc", "random"],
                   help="rrc = RandomResizedCrop (official); random = plain random crop, no resize [proj, demo]")
    g.add_argument("--hflip-prob", type=float, default=0.5)
    g.add_argument("--test-clip-start", default="center", choices=["center", "start"],
                   help="center = paper; start = official code (clip from frame 0)")
    g.add_argument("--test-views", type=int, default=1, help="temporal clips per IID test video (scores averaged)")
    g.add_argument("--test-crops", type=int, default=1, choices=[1, 3], help="spatial crops per IID test clip")
    g.add_argument("--bias-protocol", default="box", choices=["box", "segmentation"],
                   help="UCF101 SCUBA protocol the bias sets were made with (recorded in results.json)")
    g.add_argument("--scufo-seed", type=int, default=0)
    g.add_argument("--limit-train-batches", type=int, default=0)
    g.add_argument("--limit-eval-batches", type=int, default=0)

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="swin3d_t", choices=["swin3d_t", "swin3d_tiny_test", "cnn3d"])
    g.add_argument("--cnn-width", type=int, default=16, help="base width of --arch cnn3d")
    g.add_argument("--drop-path", type=float, default=0.1)
    g.add_argument("--no-fused-ops", action="store_true", help="use the PyTorch reference of static_clip")
    g.add_argument("--compile", action="store_true", help="torch.compile the motion forward only")

    g = p.add_argument_group("method")
    g.add_argument("--baseline", action="store_true", help="CE only (w_adv = w_ent = w_gp = 0)")
    g.add_argument("--static-frame", default="middle", help="middle | random | first | last | <int>")
    g.add_argument("--w-ce", type=float, default=1.0)
    g.add_argument("--w-adv", type=float, default=1.0)
    g.add_argument("--w-ent", type=float, default=4.25, help="4.25 = official code, 4 = paper")
    g.add_argument("--w-gp", type=float, default=10.0)
    g.add_argument("--gp-reduce", default="column", choices=["column", "sample"],
                   help="column = released code (norm over C,T,H; mean over B,W); sample = paper Eq. 4")
    g.add_argument("--split-backward", action="store_true", help="backward w_ce*L_ce before the static pass")
    g.add_argument("--stillmix", action="store_true", help="clean StillMix add-on (spec pitfall 6)")
    g.add_argument("--stillmix-prob", type=float, default=0.75)
    g.add_argument("--stillmix-alpha", type=float, default=200.0)

    g = p.add_argument_group("optimisation")
    g.add_argument("--opt", default="adamw", choices=["adamw", "sgd"])
    g.add_argument("--blr", type=float, default=0.0, help="if > 0: lr = blr * batch / 64")
    g.add_argument("--weight-decay", type=float, default=0.05, help="0.05 = code, 0.01 = paper")
    g.add_argument("--eval-batch-size", type=int, default=12)
    g.add_argument("--accum-steps", type=int, default=1)
    g.add_argument("--lr-schedule", default="clean", choices=["clean", "official"])
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--eval-every", type=int, default=2, help="validation every N epochs (and the last)")
    g.add_argument("--bias-eval-every", type=int, default=0, help="test/bias curves every N epochs (plots only)")
    for action in p._actions:  # so that --help prints every default
        if action.help is None:
            action.help = "default: %(default)s"
    return p


SYNTHETIC_FLAGS = dict(dataset="list", train_list="train.txt", test_list="test.txt", bias_root="bias",
                       bias_prefix="SYNTH", num_frames=8, frame_stride=1, short_side=32, crop=32, hflip_prob=0.0)


def resolve_args(args):
    """Validation of the flags (errors name the flag), then the derived settings."""
    validate_args(args)
    if args.synthetic:  # the offline benchmark (common/data/synthetic_video.py), built once under --data-root
        from common.data import synthetic_video
        args.data_root = str(synthetic_video.build(Path(args.data_root) / "albar_synthetic"))
        for k, v in SYNTHETIC_FLAGS.items():
            setattr(args, k, v)
    if args.baseline:
        args.w_adv = args.w_ent = args.w_gp = 0.0
    if args.blr > 0:
        args.lr = args.blr * args.batch_size * args.accum_steps * cdist.world_size() / 64
    return args


def validate_args(args):
    """Ranges and combinations of the method flags (one-line InputError naming the flag)."""
    for dest in ("num_frames", "frame_stride", "crop", "short_side", "eval_batch_size", "accum_steps", "eval_every",
                 "test_views", "cnn_width"):
        if getattr(args, dest) < 1:
            raise InputError(f"--{dest.replace('_', '-')} {getattr(args, dest)}: expected an integer >= 1")
    if args.short_side < args.crop:
        raise InputError(f"--short-side {args.short_side} is smaller than --crop {args.crop}")
    for dest in ("hflip_prob", "stillmix_prob"):
        if not 0.0 <= getattr(args, dest) <= 1.0:
            raise InputError(f"--{dest.replace('_', '-')} {getattr(args, dest)}: expected a probability in [0, 1]")
    if not 0.0 <= args.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.select_metric == "val_contra" and not args.val_bias_root:
        raise InputError("--select-metric val_contra needs --val-bias-root (bias sets built from the val videos)")
    static_frame_index(args.static_frame, args.num_frames, 1)  # validates the value


# ----------------------------------------------------------------------------- data: list files

LIST_FORMATS = ("'<relpath> <label>' (a video file, frame zip or frame folder) or the StillMix / mmaction "
                "rawframes line '<frame_dir> <nframes> <label>' (e.g. 'v_YoYo_g01_c01__0 120 100')")


@dataclass
class Item:
    path: Path     # absolute video file / frame zip / frame folder / image
    label: int
    vid: str       # id used for pairing and predictions (file stem, or the rawframes id)
    nframes: int = 0  # frame count given by a rawframes list line (0 = not given); checked on read


def _err(path, lineno, msg):
    return InputError(f"{path}:{lineno}: {msg}")


def _lines(path, what="list file"):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    return path.read_text().splitlines()


def resolve_frames_id(p):
    """On-disk source of an extension-less list id `<root>/<id>` (StillMix rawframes lists): the frame
    folder `<id>/` (StillMix: frame%06d.jpg), else the zip `<id>.zip` (ALBAR's bias-set release), else a
    video `<id>.<ext>`; None if none exists."""
    if p.is_dir():
        return p
    for cand in [p.with_name(p.name + ".zip")] + [p.with_name(p.name + e) for e in sorted(VIDEO_EXTS)]:
        if cand.is_file():
            return cand
    return None


def parse_list_file(path, root, num_classes=None, one_based=False):
    """A list file, one item per line ('#' comments, 0-based labels unless one_based), paths relative
    to `root`. Line formats: see LIST_FORMATS. A rawframes id without an extension is resolved by
    `resolve_frames_id`; its `<nframes>` must match the frames found when the item is read."""
    path = Path(path)
    items = []
    for lineno, line in enumerate(_lines(path), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts, nframes = line.rsplit(None, 2), 0
        if len(parts) == 3 and re.fullmatch(r"\d+", parts[1]) and re.fullmatch(r"-?\d+", parts[2]):
            rel, nframes, lab = parts[0], int(parts[1]), parts[2]
            if nframes < 1:
                raise _err(path, lineno, f"<nframes> must be >= 1, got {line!r}")
        else:
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise _err(path, lineno, f"expected {LIST_FORMATS}, got {line!r}")
            rel, lab = parts
        label = int(lab) - (1 if one_based else 0)
        if label < 0 or (num_classes is not None and label >= num_classes):
            rng = f"[{int(one_based)}, {num_classes - 1 + int(one_based)}]" if num_classes else f">= {int(one_based)}"
            raise _err(path, lineno, f"label {lab} is not a known class (expected {rng})")
        p = Path(rel) if Path(rel).is_absolute() else Path(root) / rel
        suffix = p.suffix.lower()
        if suffix in VIDEO_EXTS or suffix == ".zip":
            items.append(Item(p, label, p.stem, nframes))
            continue
        found = resolve_frames_id(p)
        if found is None and not nframes:
            raise _err(path, lineno, f"'{rel}' is not a video file ({'/'.join(sorted(VIDEO_EXTS))}), a .zip of "
                                     f"frames or a frame folder; expected {LIST_FORMATS}")
        items.append(Item(found or p, label, p.name, nframes))  # a missing source is counted by drop_missing
    if not items:
        raise InputError(f"{path}: no entries (expected lines {LIST_FORMATS})")
    return items


def read_class_index(path):
    """UCF101 classInd.txt: `<1-based id> <ClassName>` -> {name: 0-based}."""
    classes = {}
    for lineno, line in enumerate(_lines(path, "classInd file"), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise _err(path, lineno, f"expected '<id> <ClassName>', got {line!r}")
        classes[parts[1]] = int(parts[0]) - 1
    if sorted(classes.values()) != list(range(len(classes))):
        raise InputError(f"{path}: class ids must be 1..{len(classes)} without gaps")
    return classes


UCF_RE = re.compile(r"v_(.+?)_g\d+_c\d+")


def parse_ucf101(path, video_root, classes):
    """trainlist01/testlist01 lines `<Class>/v_<Class>_gXX_cYY.avi [1-based label]`."""
    items = []
    for lineno, line in enumerate(_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise _err(path, lineno, f"expected '<Class>/v_<Class>_gXX_cYY.avi [1-based label]', got {line!r}")
        rel = parts[0]
        folder = rel.split("/")[0]
        if folder not in classes:
            raise _err(path, lineno, f"class folder '{folder}' of '{rel}' is not in classInd.txt")
        label = classes[folder]
        if len(parts) > 1 and int(parts[1]) - 1 != label:
            raise _err(path, lineno, f"label {parts[1]} disagrees with classInd ({folder} = {label + 1})")
        m = UCF_RE.search(Path(rel).name)
        if m is None or m.group(1) != folder:
            raise _err(path, lineno, f"'{rel}' does not match <Class>/v_<Class>_gXX_cYY.avi")
        items.append(Item(Path(video_root) / rel, label, Path(rel).stem))
    return items


def parse_hmdb51_csv(path, video_root):
    """hmdb51_{train,test}_labels.csv: `class,filename,label` (0-based), header optional."""
    items, class_label = [], {}
    for lineno, row in enumerate(csv.reader(_lines(path)), 1):
        if not row or (lineno == 1 and row[0].strip().lower() == "class"):
            continue
        if len(row) != 3 or not row[2].strip().isdigit():
            raise _err(path, lineno, f"expected 'class,filename,label', got {row}")
        cls, fname, label = row[0].strip(), row[1].strip(), int(row[2])
        if class_label.setdefault(cls, label) != label:
            raise _err(path, lineno, f"class '{cls}' has label {label} here but {class_label[cls]} earlier")
        items.append(Item(Path(video_root) / cls / fname, label, Path(fname).stem))
    return items


def parse_hmdb51_splits(split_dir, video_root, split=1):
    """Original testTrainMulti_7030_splits/<class>_test_split<k>.txt (1 = train, 2 = test, 0 = unused)."""
    files = sorted(Path(split_dir).glob(f"*_test_split{split}.txt"))
    if not files:
        raise InputError(f"no hmdb51_{{train,test}}_labels.csv in {Path(split_dir).parent} and no "
                         f"*_test_split{split}.txt files in {split_dir}")
    names = sorted(f.name[: -len(f"_test_split{split}.txt")] for f in files)
    out = {"train": [], "test": []}
    for f in files:
        cls = f.name[: -len(f"_test_split{split}.txt")]
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise _err(f, lineno, f"expected '<video>.avi <0|1|2>', got {line!r}")
            if parts[1] != "0":
                out["train" if parts[1] == "1" else "test"].append(
                    Item(Path(video_root) / cls / parts[0], names.index(cls), Path(parts[0]).stem))
    return out, names


def load_splits(args):
    """(train, val, test items, num_classes, label_of{video stem: label}, split info)."""
    root = Path(args.data_root)
    vroot = root / args.video_dir
    info = {}
    train = test = None
    names = None
    if args.dataset == "list" or args.train_list:
        if not args.train_list or not args.test_list:
            raise InputError("--dataset list needs --train-list and --test-list")
        train = parse_list_file(_under(root, args.train_list), root)
        test = parse_list_file(_under(root, args.test_list), root)
    elif args.dataset == "hmdb51":
        if (root / "hmdb51_train_labels.csv").is_file():
            train = parse_hmdb51_csv(root / "hmdb51_train_labels.csv", vroot)
            test = parse_hmdb51_csv(root / "hmdb51_test_labels.csv", vroot)
        else:
            sp, names = parse_hmdb51_splits(root / "testTrainMulti_7030_splits", vroot)
            train, test = sp["train"], sp["test"]
    elif args.dataset == "ucf101":
        tl = root / "ucfTrainTestlist"
        classes = read_class_index(tl / "classInd.txt")
        names = sorted(classes, key=classes.get)
        train = parse_ucf101(tl / "trainlist01.txt", vroot, classes)
        test = parse_ucf101(tl / "testlist01.txt", vroot, classes)
    elif args.dataset == "k400":
        train = parse_list_file(root / "annotation_train_fullpath_resizedvids.txt", root, one_based=True)
        test = parse_list_file(root / "annotation_test_fullpath_resizedvids.txt", root, one_based=True)
    num_classes = max(i.label for i in train + test) + 1
    missing_train = sorted(set(range(num_classes)) - {i.label for i in train})
    if missing_train:
        raise InputError(f"classes {missing_train[:10]} have no training videos (labels must be 0..C-1)")
    if args.val_list:
        val = parse_list_file(_under(root, args.val_list), root, num_classes=num_classes)
    else:
        train, val = stratified_split(train, args.val_fraction, args.split_seed)
    info.update(num_classes=num_classes, class_names=names, n_train=len(train), n_val=len(val), n_test=len(test))
    label_of = {i.vid: i.label for i in train + val + test}
    if args.dataset == "ucf101" and not args.train_list:
        label_of = UCFLabels(label_of, classes)
    return train, val, test, num_classes, label_of, info


def _under(root, p):
    p = Path(p)
    return p if p.is_absolute() or p.exists() else Path(root) / p


def stratified_split(items, fraction, seed):
    """Seeded stratified hold-out: round(fraction * n_c) items of every class go to val."""
    if fraction <= 0:
        return items, []
    rng = np.random.default_rng(seed)
    val_idx = set()
    by_class = {}
    for i, it in enumerate(items):
        by_class.setdefault(it.label, []).append(i)
    for c in sorted(by_class):
        idx = by_class[c]
        k = int(round(fraction * len(idx)))
        val_idx.update(int(j) for j in rng.permutation(idx)[:k])
    return [it for i, it in enumerate(items) if i not in val_idx], [it for i, it in enumerate(items) if i in val_idx]


def write_split(path, items, root):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for it in items:
        try:
            rel = it.path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            rel = it.path
        lines.append(f"{rel} {it.label}")
    path.write_text("\n".join(lines) + "\n")


def drop_missing(items, name, strict):
    """Missing files are skipped and counted (an error with --strict)."""
    keep = [it for it in items if it.path.exists()]
    n = len(items) - len(keep)
    if n:
        first = next(it.path for it in items if not it.path.exists())
        if strict:
            raise InputError(f"{name}: {n} listed videos are missing, e.g. {first} (without --strict they are skipped)")
        warnings.warn(f"{name}: skipping {n} missing videos (e.g. {first}); --strict makes this an error")
    return keep, n


# ----------------------------------------------------------------------------- data: bias sets

def find_bias_sets(bias_root, prefix, label_of):
    """{kind: {"scuba": [Item], "scufo": [Item] | None}} and the Confl-FG items, labelled by video.

    Items: `<video>__<k>.zip` / `<video>__<k>/` (SCUBA, Confl-FG) and `<video>__<k>.jpg` (SCUFO), or
    the items of a StillMix list file inside the set's folder (see `_bias_items`).
    """
    root = Path(bias_root)
    if not root.is_dir():
        raise InputError(f"--bias-root {root} is not a directory")
    sets, conflfg = {}, None
    for d in sorted(root.glob(f"{prefix}_SCUBA_*")):
        kind = d.name.split("_SCUBA_", 1)[1]
        scufo_dir = d.parent / d.name.replace("_SCUBA_", "_SCUFO_")
        sets[kind] = {"scuba": _bias_items(d, label_of, (".zip", "")),
                      "scufo": _bias_items(scufo_dir, label_of, IMAGE_EXTS) if scufo_dir.is_dir() else None}
    for d in sorted(root.glob(f"{prefix}_ConflFG_*")):
        conflfg = _bias_items(d, label_of, (".zip", ""))
    if not sets and conflfg is None:
        raise InputError(f"no {prefix}_SCUBA_* or {prefix}_ConflFG_* folders in {root}")
    return sets, conflfg


def bias_label(video, label_of):
    try:
        return label_of[video]
    except KeyError:
        return None


class UCFLabels(dict):
    """UCF101 bias items are labelled from the name (regex v_(.+?)_g\\d+_c\\d+ + classInd), so
    groups >= 10 work (the official code splits on '_g0')."""

    def __init__(self, known, classes):
        super().__init__(known)
        self.classes = classes

    def __missing__(self, video):
        m = UCF_RE.search(video)
        if m is None or m.group(1) not in self.classes:
            raise KeyError(video)
        return self.classes[m.group(1)]


def _bias_items(folder, label_of, suffixes):
    """The items of one bias set. With a StillMix list file (`*.txt`, lines `<video>__<k> <nframes>
    <label>`) in the folder, exactly the listed items (resolved by `resolve_frames_id` under the
    folder), labelled by the list, which must agree with the split lists where they know the video;
    otherwise every `<video>__<k><suffix>` entry, labelled by looking `<video>` up in the split lists."""
    lists = sorted(folder.glob("*.txt"))
    if len(lists) > 1:
        raise InputError(f"{folder}: several list files {[p.name for p in lists]} (expected at most one)")
    if lists:
        items = parse_list_file(lists[0], folder)
        for it in items:
            known = bias_label(it.vid.rsplit("__", 1)[0], label_of)
            if known is not None and known != it.label:
                raise InputError(f"{lists[0]}: item '{it.vid}' has label {it.label} but its video has label "
                                 f"{known} in the split lists (class order differs?)")
        return items
    items = []
    for p in sorted(folder.iterdir()):
        suffix = "" if p.is_dir() else p.suffix.lower()
        if suffix not in suffixes or "__" not in p.stem:
            continue
        item_id = p.name if p.is_dir() else p.stem
        vid = item_id.rsplit("__", 1)[0]
        label = bias_label(vid, label_of)
        if label is None:
            raise InputError(f"{p}: video '{vid}' is not in any split list (cannot label this bias item)")
        items.append(Item(p, label, item_id))
    if not items:
        raise InputError(f"{folder}: no bias items matching <video>__<k>{'|'.join(suffixes)} and no list file")
    return items


# ----------------------------------------------------------------------------- data: reading frames

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _frame_names(path):
    """Sorted image members of a frame zip / frame folder (time order); [] for a single image."""
    if path.is_dir():
        return sorted(f.name for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as z:
            return sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_EXTS))
    if path.suffix.lower() in IMAGE_EXTS and path.is_file():
        return []
    raise VideoDecodeError(f"not found or not a video / frame zip / frame folder / image: {path}")


def source_num_frames(path):
    """Frame count of a video (`common.video.num_frames`), a frame zip or folder, or an image (1)."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_EXTS:
        return video.num_frames(path)
    try:
        names = _frame_names(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise VideoDecodeError(f"cannot read {path}: {e}") from e
    if path.is_dir() or path.suffix.lower() == ".zip":
        if not names:
            raise VideoDecodeError(f"no frames in {path}")
        return len(names)
    return 1


def read_views(path, views, size):
    """Several index arrays of one source from ONE read of their union: a list of uint8 (len(v), H, W, 3)
    arrays, the short side resized to `size` on decode. Videos go through `common.video.decode_views`;
    frame zips / folders / images decode only the needed members (PIL)."""
    path = Path(path)
    views = [np.asarray(v, dtype=np.int64) for v in views]
    if path.suffix.lower() in VIDEO_EXTS:
        return video.decode_views(path, views, size=size)
    from PIL import Image
    need = sorted(set(np.concatenate(views).tolist()))
    try:
        names = _frame_names(path)
        if not names:  # one image
            imgs = {0: np.asarray(Image.open(path).convert("RGB"))}
        elif path.is_dir():
            imgs = {i: np.asarray(Image.open(path / names[i]).convert("RGB")) for i in need}
        else:
            with zipfile.ZipFile(path) as z:
                imgs = {i: np.asarray(Image.open(io.BytesIO(z.read(names[i]))).convert("RGB")) for i in need}
        stacked = np.stack([imgs[i] for i in need])
    except (OSError, zipfile.BadZipFile, ValueError, IndexError, KeyError) as e:
        raise VideoDecodeError(f"cannot read frames {need[:4]}... from {path}: {e}") from e
    frames = resize_short_side(stacked, size).numpy()
    pos = {i: k for k, i in enumerate(need)}
    return [frames[[pos[i] for i in v.tolist()]] for v in views]


# ----------------------------------------------------------------------------- data: sampling + transforms

def clip_indices(n, num_frames, stride, *, train, start_mode="center", rng=None, num_clips=1, clip_idx=0):
    """Spec §2.3: stride s (1 if s*T > N); i_t = start + s*t clamped to N-1; random start in
    [0, N - s*T) in train, centred (or 0 with start_mode='start') otherwise."""
    s = stride if stride * num_frames <= n else 1
    room = n - s * num_frames
    if train:
        start = int(rng.integers(0, room)) if room > 0 else 0
    elif start_mode == "start":
        start = 0
    else:
        start = max(0, math.floor((clip_idx + 0.5) * room / num_clips))
    return np.minimum(start + s * np.arange(num_frames), n - 1)


class ClipDataset(Dataset):
    """One entry per item (video, frame zip / folder, image); a bad file gives None (skipped and
    counted by `collate_skip_none`, an error with --strict).

    mode 'train': (uint8 clip (3, T, H, W), label, index) — random start, RandomResizedCrop (or a
    random crop), flip. mode 'test': (uint8 (V*K, 3, T, H, W), label, index) — V = `views` temporal
    clips x K = `crops` spatial crops, all cut from ONE decode of the union of the clips' frames.
    mode 'image': (uint8 (1, 3, 1, H, W), label, index) — frame 0, or with `scufo_from_clip` one frame
    drawn by (scufo_seed, id) (SCUFO from SCUBA). Frames are read at short side `args.short_side`
    (resized on decode) and stay uint8; normalisation happens on the device.

    `args` holds the recipe flags (build_parser() dests); `ClipDataset.from_list` builds one from a
    list file with the defaults. `cache` (a dict, optional) memoises frame counts and decoded clips
    by (path, indices): only for data that fit in memory with few distinct clips per file (the
    demo's 8-frame videos, decoded once for all runs).
    """

    def __init__(self, items, args, mode, *, views=1, crops=1, cache=None, scufo_seed=0, scufo_from_clip=False):
        if mode not in ("train", "test", "image"):
            raise ValueError(f"ClipDataset mode must be train|test|image, got {mode!r}")
        self.items, self.args, self.mode = items, args, mode
        self.views, self.crops = (views, crops) if mode == "test" else (1, 1)
        self.cache = cache
        self.scufo_seed, self.scufo_from_clip = scufo_seed, scufo_from_clip

    @classmethod
    def from_list(cls, list_file, mode="train", *, root=None, views=1, crops=1, **flags):
        """A dataset over the items of a list file (any LIST_FORMATS line; paths relative to `root`,
        default the list's folder) with the recipe defaults of `train_albar.py --help`, overridden by
        `flags` given by dest name, e.g. `ClipDataset.from_list("train.txt", num_frames=16, workers=0)`."""
        args = build_parser().parse_args([])
        for k, v in flags.items():
            if not hasattr(args, k):
                raise TypeError(f"ClipDataset.from_list: unknown flag {k!r} (use build_parser() dest names)")
            setattr(args, k, v)
        items = parse_list_file(list_file, Path(list_file).parent if root is None else root)
        return cls(items, args, mode, views=views, crops=crops)

    @property
    def clips_per_item(self):
        return self.views * self.crops

    def __len__(self):
        return len(self.items)

    def _cached(self, key, fn):
        if self.cache is None:
            return fn()
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def _num_frames(self, item):
        n = self._cached(("num_frames", str(item.path)), lambda: source_num_frames(item.path))
        if item.nframes and item.nframes != n and item.path.suffix.lower() not in VIDEO_EXTS:
            # rawframes: the list's count must be the folder's; a video's own decoded count is used as is
            raise VideoDecodeError(f"{item.path}: the list says {item.nframes} frames, found {n}")
        return n

    def _read(self, path, views):
        size = self.args.short_side
        key = ("clips", str(path), tuple(tuple(v.tolist()) for v in views), size)
        return self._cached(key, lambda: read_views(path, views, size))

    def __getitem__(self, index):
        item = self.items[index]
        clip = load_or_skip(lambda: self._load(item), item.path, self.args.strict)
        return None if clip is None else (clip, item.label, index)

    def _load(self, item):
        a = self.args
        n = self._num_frames(item)
        if self.mode == "train":
            rng = np.random.default_rng(np.random.randint(2**31))
            idx = clip_indices(n, a.num_frames, a.frame_stride, train=True, rng=rng)
            clip = self._read(item.path, [idx])[0]
            if a.train_crop == "rrc":
                clip = random_resized_crop(clip, a.crop, tuple(a.rrc_scale), tuple(a.rrc_ratio), rng=rng)
            else:
                clip = random_crop(clip, a.crop, rng=rng)
            if rng.random() < a.hflip_prob:
                clip = hflip(clip)
            return clip.permute(3, 0, 1, 2).contiguous()  # (T, H, W, 3) -> (3, T, H, W)
        if self.mode == "image":
            j = 0
            if self.scufo_from_clip:  # SCUFO generated from the SCUBA item: one frame, seeded by (seed, id)
                j = int(np.random.default_rng([self.scufo_seed, zlib.crc32(item.vid.encode())]).integers(n))
            views = [np.array([j])]
        else:
            views = [clip_indices(n, a.num_frames, a.frame_stride, train=False, start_mode=a.test_clip_start,
                                  num_clips=self.views, clip_idx=v) for v in range(self.views)]
        clips = []
        for frames in self._read(item.path, views):
            clips += three_crop(frames, a.crop) if self.crops == 3 else [center_crop(frames, a.crop)]
        return torch.stack([c.permute(3, 0, 1, 2) for c in clips])  # (V*K, 3, T, H, W)


def make_loader(ds, args, batch_size, shuffle, seed=0):
    return cdist.make_loader(ds, batch_size, shuffle=shuffle, workers=args.workers, seed=seed,
                             drop_last=shuffle, collate_fn=collate_skip_none)


# ----------------------------------------------------------------------------- model

class SmallCNN3d(nn.Module):
    """A 4-layer 3D CNN for the CPU demo: 3x3x3 convolutions of widths w, w, 2w, 2w with strides
    (1,2,2), (1,2,2), 2, 1 and GELU, mean pooling, LayerNorm and a linear head (like swin3d's final
    norm + head). Strided 3x3x3 layers (not a 4x4 patch stem) let it see a 1.5 px/frame motion from
    the second layer on. No batch-coupled normalisation: with BatchNorm the static batch's own
    statistics tell the network "this batch is static" (a shortcut measured in calibration)."""

    def __init__(self, num_classes, width=16):
        super().__init__()
        specs = [(3, width, (1, 2, 2)), (width, width, (1, 2, 2)), (width, 2 * width, 2), (2 * width, 2 * width, 1)]
        layers = []
        for cin, cout, stride in specs:
            layers += [nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.features(x).mean(dim=(2, 3, 4))))


def build_model(args, num_classes):
    from torchvision.models.video import swin3d_t
    from torchvision.models.video.swin_transformer import SwinTransformer3d
    if args.arch == "swin3d_t":
        model = swin3d_t(num_classes=num_classes)
        for m in model.modules():  # per-sample stochastic depth rising linearly to --drop-path
            if hasattr(m, "stochastic_depth_prob") and args.drop_path != 0.1:
                m.stochastic_depth_prob *= args.drop_path / 0.1
    elif args.arch == "swin3d_tiny_test":
        model = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                  window_size=[8, 7, 7], stochastic_depth_prob=args.drop_path, num_classes=num_classes)
    else:
        model = SmallCNN3d(num_classes, args.cnn_width)
    return model


WEIGHT_LAYOUTS = {  # how each known file stores the swin3d_t state dict (README "Official artefacts")
    "torchvision": "flat state dict (torchvision swin3d_t KINETICS400_V1, swin3d_t-7615ae03.pth)",
    "albar_official": "{'model_state_dict': ...} (UCF-CRCV/ALBAR model_<epoch>*.pth and training snapshots)",
    "project": "{'model': ...} (this script's checkpoint.pth / best.pth)",
    "state_dict": "{'state_dict': ...} (generic trainer wrappers)",
}


def _short(keys, n=8):
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def read_weights(path, *, trust=False):
    """A --weights file -> (flat state dict, layout name); a DDP 'module.' prefix is removed."""
    obj = safe_load(path, what="--weights", trust=trust)
    layout = "torchvision"
    for key, name in (("model_state_dict", "albar_official"), ("model", "project"), ("state_dict", "state_dict")):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj, layout = obj[key], name
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"--weights {path}: expected a state dict of tensors in one of the layouts "
                              f"{'; '.join(WEIGHT_LAYOUTS.values())}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    if any(k.startswith(("backbone.", "cls_head.")) for k in obj):
        raise CheckpointError(f"--weights {path}: a Video-Swin / mmaction layout (backbone.*, cls_head.*); rename "
                              f"its keys to torchvision's with `python train_uas.py convert-weights {path} OUT.pth`, "
                              f"then pass --weights OUT.pth")
    return obj, layout


def load_pretrained(model, path, num_classes, *, allow_partial=False, trust=False):
    """Load --weights into the model (spec §3): any WEIGHT_LAYOUTS file; `head.*` is dropped when its
    shape differs (e.g. the K400 400-way head for C classes) and then trains from its fresh init.
    A shape mismatch is always an error; a missing or unexpected backbone key is an error naming the
    keys unless `allow_partial` (--allow-partial-weights), which loads the rest and lists them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights {path}: file not found (weights are never downloaded; pass a local file)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    sd, layout = read_weights(path, trust=trust)
    own = model.state_dict()
    head = "loaded" if any(k.startswith("head.") for k in sd) else "new (no head in the file)"
    if any(k.startswith("head.") and k in own and sd[k].shape != own[k].shape for k in sd):
        sd, head = {k: v for k, v in sd.items() if not k.startswith("head.")}, "new (the file's head has another shape)"
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if shapes:
        raise CheckpointError(f"--weights {path} ({layout} layout) does not fit --arch: shape mismatches "
                              f"[{_short(shapes)}]")
    missing = sorted(k for k in set(own) - set(sd) if not k.startswith("head."))
    unexpected = sorted(set(sd) - set(own))
    if (missing or unexpected) and not allow_partial:
        parts = ([f"missing backbone keys [{_short(missing)}]"] if missing else []) + \
                ([f"unexpected keys [{_short(unexpected)}]"] if unexpected else [])
        raise CheckpointError(f"--weights {path} ({layout} layout) does not fit the model: {'; '.join(parts)}; "
                              f"pass --allow-partial-weights to load the rest anyway")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if missing or unexpected:
        warnings.warn(f"--weights {path}: --allow-partial-weights: {len(missing)} missing backbone keys "
                      f"[{_short(missing)}] keep their init, {len(unexpected)} unexpected keys [{_short(unexpected)}] "
                      f"are ignored")
    return {"init": str(path), "sha256": h.hexdigest(), "layout": layout, "head": head, "num_classes": num_classes,
            "missing_keys": missing, "unexpected_keys": unexpected}


# ----------------------------------------------------------------------------- method: the ALBAR loss

def static_frame_index(choice, num_frames, batch, generator=None):
    """t̄_b per sample: middle = T//2 (official frame_choice=16), random, first, last or an int."""
    if choice == "middle":
        t = num_frames // 2
    elif choice == "first":
        t = 0
    elif choice == "last":
        t = num_frames - 1
    elif choice == "random":
        return torch.randint(num_frames, (batch,), generator=generator)
    elif re.fullmatch(r"\d+", str(choice)):
        t = min(int(choice), num_frames - 1)
    else:
        raise InputError(f"--static-frame must be middle|random|first|last|<int>, got {choice!r}")
    return torch.full((batch,), t, dtype=torch.long)


def normalize(u8):
    """Motion clip: uint8 (B,3,T,H,W) -> float, x*(1/255) - mean, / std (the op order of static_clip)."""
    mean = torch.tensor(MEAN, device=u8.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(STD, device=u8.device).view(1, 3, 1, 1, 1)
    return (u8.float() * (1.0 / 255.0) - mean) / std


def make_static(u8, tbar, num_frames=-1, out_dtype=None):
    """The static clip x̄ (fused op or its reference): frame t̄_b of the augmented clip, tiled."""
    return ops.static_clip(u8, tbar.to(u8.device), num_frames=num_frames, mean=MEAN, std=STD,
                           out_dtype=out_dtype or torch.float32)


def gradient_penalty(grad, reduce="column"):
    """G (B,C,T,H,W) -> scalar. column: mean over (B,W) of the L2 norm over (C,T,H) (released code);
    sample: mean over B of the L2 norm over (C,T,H,W) (paper Eq. 4). Always fp32."""
    g2 = grad.float().pow(2)
    if reduce == "column":
        return torch.sqrt(g2.sum(dim=(1, 2, 3)) + 1e-12).mean()
    return torch.sqrt(g2.sum(dim=(1, 2, 3, 4)) + 1e-12).mean()


def static_terms(zbar, y):
    """(ce_static, neg_entropy) — both per-sample means; log_softmax avoids NaN."""
    logp = F.log_softmax(zbar.float(), dim=1)
    ce_static = F.nll_loss(logp, y)
    neg_entropy = (logp.exp() * logp).sum(dim=1).mean()
    return ce_static, neg_entropy


def albar_step(model, u8, y, tbar, args, *, scale=1.0, motion_forward=None, u8_static=None):
    """Forward + backward of one (micro-)batch; returns detached stats. `scale` = 1/accum_steps.

    L = w_ce CE(F(x), y) - w_adv CE(F(x̄), y) + w_ent mean_b Σ_c p̄ log p̄ + w_gp GP(∂Σ F(x̄)/∂x̄)
    """
    dev = u8.device
    amp = args.amp and dev.type == "cuda"
    x = normalize(u8)
    fwd = motion_forward if motion_forward is not None else model
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        z = fwd(x)
    loss_ce = F.cross_entropy(z.float(), y)
    stats = {"loss_ce": loss_ce.detach(), "train_top1": (z.argmax(1) == y).float().mean()}
    static_on = args.w_adv != 0 or args.w_ent != 0 or args.w_gp != 0
    if not static_on:
        (args.w_ce * loss_ce * scale).backward()
        stats["loss"] = (args.w_ce * loss_ce).detach()
        return stats
    if args.split_backward:
        (args.w_ce * loss_ce * scale).backward()
    xbar = make_static(u8 if u8_static is None else u8_static, tbar).detach()  # a fresh leaf
    xbar.requires_grad_(args.w_gp > 0)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        zbar = model(xbar)
    ce_static, neg_ent = static_terms(zbar, y)
    loss_static = -args.w_adv * ce_static + args.w_ent * neg_ent
    loss_gp = torch.zeros((), device=dev)
    if args.w_gp > 0:
        grad = torch.autograd.grad(zbar.sum(), xbar, create_graph=True)[0]
        loss_gp = gradient_penalty(grad, args.gp_reduce)
        loss_static = loss_static + args.w_gp * loss_gp
    total_static = loss_static if args.split_backward else args.w_ce * loss_ce + loss_static
    (total_static * scale).backward()
    stats.update(loss=(args.w_ce * loss_ce + loss_static).detach(), ce_static=ce_static.detach(),
                 loss_ent=neg_ent.detach(), loss_gp=loss_gp.detach(),
                 static_top1=(zbar.argmax(1) == y).float().mean(), static_entropy=-neg_ent.detach())
    return stats


def stillmix(u8, args, generator=None):
    """Clean StillMix (pitfall 6): per-sample Bernoulli mask, one λ~Beta per batch, mix with a random
    frame of another random clip in the batch (tiled); labels unchanged."""
    b, c, t = u8.shape[:3]
    lam = float(np.random.beta(args.stillmix_alpha, args.stillmix_alpha))
    other = torch.randint(b, (b,), generator=generator)
    frame = torch.randint(t, (b,), generator=generator)
    still = u8[other, :, frame].unsqueeze(2).float()
    mix = (torch.rand(b, generator=generator) < args.stillmix_prob).view(b, 1, 1, 1, 1).to(u8.device)
    mixed = (lam * u8.float() + (1 - lam) * still).round().clamp(0, 255).to(torch.uint8)
    return torch.where(mix, mixed, u8)


# ----------------------------------------------------------------------------- schedule

def lr_factor(epoch, epochs, warmup, schedule="clean"):
    """LR multiplier of epoch `epoch` (counted from 1): linear warmup 0.01 -> 1 then cosine (spec §5)."""
    w = list(np.linspace(0.01, 1.0, warmup)) if warmup > 0 else []
    denom = 0.99 * max(epochs - 1, 1)
    c = [(1 + math.cos(k * math.pi / denom)) / 2 for k in range(epochs)]
    seq = w + c
    if schedule == "official":  # the code sets the LR after each epoch: epoch 1 runs at full LR
        return 1.0 if epoch == 1 else seq[epoch - 2]
    return seq[epoch - 1]


# ----------------------------------------------------------------------------- training

def train_one_epoch(model, loader, optimizer, epoch, args, env, motion_forward=None):
    model.train()
    cdist.set_epoch(loader, epoch)
    sums, n_batches, n_skipped = {}, 0, 0
    data_time = step_time = 0.0
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (batch, skipped) in enumerate(progress(loader, desc=f"epoch {epoch}")):
        if args.limit_train_batches and i >= args.limit_train_batches:
            break
        n_skipped += skipped
        if batch is None:
            continue
        u8, y = batch[0].to(env.device, non_blocking=True), batch[1].to(env.device)
        t1 = time.perf_counter()
        data_time += t1 - t0
        u8_static = u8
        if args.stillmix:  # x̄ is built from the un-mixed clip
            u8 = stillmix(u8, args)
        tbar = static_frame_index(args.static_frame, u8.shape[2], u8.shape[0])
        stats = albar_step(model, u8, y, tbar, args, scale=1.0 / args.accum_steps, motion_forward=motion_forward,
                           u8_static=u8_static)
        if (i + 1) % args.accum_steps == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n_batches += 1
        t0 = time.perf_counter()
        step_time += t0 - t1
        if not math.isfinite(float(stats["loss"])):
            raise FloatingPointError(f"epoch {epoch} batch {i}: loss is {float(stats['loss'])} ({stats})")
    out = {k: cdist.all_reduce_mean(v / max(n_batches, 1)) for k, v in sums.items()}
    out.update(n_skipped=n_skipped, data_time=data_time, step_time=step_time)
    return out


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model, ds, args, env, static_frames=0):
    """Scores of every item of `ds` (the mean softmax of its views x crops): (item indices, labels,
    scores, n_skipped). A loader batch holds about --eval-batch-size clips. static_frames > 0: each
    (3,1,H,W) image is tiled to that many frames (SCUFO clips)."""
    model.eval()
    per_item = ds.clips_per_item
    loader = make_loader(ds, args, max(1, args.eval_batch_size // per_item), shuffle=False)
    idx_all, lab_all, sc_all, n_skipped = [], [], [], 0
    amp = args.amp and env.device.type == "cuda"
    for i, (batch, skipped) in enumerate(loader):
        if args.limit_eval_batches and i >= args.limit_eval_batches:
            break
        n_skipped += skipped
        if batch is None:
            continue
        u8, y, idx = batch[0].to(env.device).flatten(0, 1), batch[1], batch[2]  # (B*V*K, 3, T, H, W)
        if static_frames:
            x = make_static(u8, torch.zeros(u8.shape[0], dtype=torch.long), num_frames=static_frames)
        else:
            x = normalize(u8)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp):
            scores = model(x).float().softmax(dim=1).cpu()
        idx_all.append(idx)
        lab_all.append(y)
        sc_all.append(scores.view(len(idx), per_item, -1).double().mean(1).float())
    if not idx_all:
        idx, lab, sc = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 1)
    else:
        idx, lab, sc = torch.cat(idx_all), torch.cat(lab_all), torch.cat(sc_all)
    # gather over ranks, dropping DistributedSampler's padded repeats by dataset index
    idx, lab, sc = cdist.gather_eval(idx, lab, sc)
    n_skipped = int(round(cdist.all_reduce_mean(n_skipped) * cdist.world_size()))
    return idx, lab, sc, n_skipped


def pair_metrics(scuba, scufo):
    """Contrasted accuracy by id (spec §6.2). scuba/scufo: {id: (label, pred)}.
    Returns (scuba_acc, scufo_acc, contra_acc, n_dropped) over the ids present on both sides."""
    ids = sorted(set(scuba) & set(scufo))
    dropped = len(set(scuba) ^ set(scufo))
    if not ids:
        return float("nan"), float("nan"), float("nan"), dropped
    ok_a = np.array([scuba[i][1] == scuba[i][0] for i in ids])
    ok_o = np.array([scufo[i][1] == scufo[i][0] for i in ids])
    return float(ok_a.mean()), float(ok_o.mean()), float((ok_a & ~ok_o).mean()), dropped


def write_preds(path, items, idx, labels, scores):
    path.parent.mkdir(parents=True, exist_ok=True)
    pred = scores.argmax(1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "pred", "p_label"])
        for i, l, p, s in zip(idx.tolist(), labels.tolist(), pred.tolist(), scores):
            w.writerow([items[i].vid, l, p, f"{float(s[l]):.6f}"])


def evaluate_bias(model, bias_sets, conflfg, ds_name, args, env, cache=None, preds_dir=None):
    """SCUBA / SCUFO / Contra per background kind (+ avg) and Confl-FG, in %."""
    res, skipped = {}, {}
    acc = {"scuba": [], "scufo": [], "contra": []}
    for kind, sets in bias_sets.items():
        k = kind.lower()
        scuba_items = sets["scuba"]
        d_scuba = ClipDataset(scuba_items, args, "test", cache=cache)
        if sets["scufo"] is not None:
            scufo_items = sets["scufo"]
            d_scufo = ClipDataset(scufo_items, args, "image", cache=cache)
        else:  # SCUFO not shipped: one seeded uniformly chosen frame of each SCUBA item
            scufo_items = scuba_items
            d_scufo = ClipDataset(scuba_items, args, "image", cache=cache, scufo_seed=args.scufo_seed,
                                  scufo_from_clip=True)
        out = {}
        for name, items, ds, tiles in (("scuba", scuba_items, d_scuba, 0),
                                       ("scufo", scufo_items, d_scufo, args.num_frames)):
            idx, lab, sc, n_sk = predict(model, ds, args, env, static_frames=tiles)
            out[name] = {items[i].vid: (l, p) for i, l, p in zip(idx.tolist(), lab.tolist(), sc.argmax(1).tolist())}
            skipped[f"{ds_name}_{name}_{k}"] = n_sk
            if preds_dir is not None:
                write_preds(preds_dir / f"{name}_{k}.csv", items, idx, lab, sc)
        a, o, c, dropped = pair_metrics(out["scuba"], out["scufo"])
        skipped[f"{ds_name}_pairs_dropped_{k}"] = dropped
        for name, v in (("scuba", a), ("scufo", o), ("contra", c)):
            res[f"{ds_name}_{name}_{k}"] = 100 * v
            acc[name].append(100 * v)
    for name, vals in acc.items():
        if vals:
            res[f"{ds_name}_{name}_avg"] = float(np.mean(vals))
    if conflfg is not None:
        idx, lab, sc, n_sk = predict(model, ClipDataset(conflfg, args, "test", cache=cache), args, env)
        res[f"{ds_name}_conflfg_stripe"] = 100 * float((sc.argmax(1) == lab).float().mean()) if len(lab) else float("nan")
        skipped[f"{ds_name}_conflfg_stripe"] = n_sk
        if preds_dir is not None:
            write_preds(preds_dir / "conflfg_stripe.csv", conflfg, idx, lab, sc)
    return res, skipped


def evaluate_iid(model, items, args, env, num_classes, views=1, crops=1, cache=None):
    ds = ClipDataset(items, args, "test", views=views, crops=crops, cache=cache)
    idx, lab, sc, n_sk = predict(model, ds, args, env)
    if len(lab) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_class": float("nan")}, idx, lab, sc, n_sk
    top = topk_accuracy(sc, lab, ks=(1, 5))
    return {"top1": 100 * top[1], "top5": 100 * top[5],
            "mean_class": 100 * mean_class_accuracy(sc.argmax(1), lab, num_classes)}, idx, lab, sc, n_sk


# ----------------------------------------------------------------------------- main

def run(args, cache=None):
    """One training run (+ final evaluation). Returns the results dict. `cache`: shared decoded frames."""
    env = cdist.setup(args.device)
    cdist.seed_everything(args.seed)
    out = Path(args.output_dir)
    ckpt = resolve_resume(args.resume, out) if args.resume else None
    if ckpt is None:  # a fresh real-data run needs pretrained weights unless --from-scratch
        config.require_weights(args, f"the {args.arch} backbone")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)

    # data (every list, bias set and weights file is checked before the first training step)
    train, val, test, num_classes, label_of, info = load_splits(args)
    train, miss_tr = drop_missing(train, "train", args.strict)
    val, miss_va = drop_missing(val, "val", args.strict)
    test, miss_te = drop_missing(test, "test", args.strict)
    ds_name = args.bias_prefix.lower() if args.bias_prefix and "*" not in args.bias_prefix else \
        DATASET_PREFIX.get(args.dataset, args.dataset).lower()
    prefix = args.bias_prefix or DATASET_PREFIX.get(args.dataset, "*")
    bias_sets, conflfg = ({}, None)
    if args.bias_root:
        bias_sets, conflfg = find_bias_sets(_under(Path(args.data_root), args.bias_root), prefix, label_of)
    val_bias = find_bias_sets(_under(Path(args.data_root), args.val_bias_root), prefix, label_of) \
        if args.val_bias_root else None
    if env.is_main:
        write_split(out / "splits" / "train.txt", train, args.data_root)
        write_split(out / "splits" / "val.txt", val, args.data_root)

    # model
    model = build_model(args, num_classes).to(env.device)
    if args.weights:
        init = load_pretrained(model, args.weights, num_classes, allow_partial=args.allow_partial_weights,
                               trust=args.trust_checkpoint)
    else:
        init = {"init": "random" if ckpt is None else f"resumed: {ckpt}"}
    if args.no_fused_ops:
        ops.set_backend("ref")
    args_record = copy.copy(args)
    args_record.init = init
    args_record.data_info = {k: v for k, v in info.items() if k != "class_names"}
    args_record.missing_videos = {"train": miss_tr, "val": miss_va, "test": miss_te}
    if env.is_main:
        save_config(args_record, out)
    model_ddp = model
    if env.distributed:
        model_ddp = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    motion_forward = torch.compile(model_ddp) if args.compile else None
    if args.opt == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)

    start_epoch, best = 0, None
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model=model, optimizer=optimizer, map_location=env.device,
                               trust=args.trust_checkpoint)
        start_epoch, best = meta["epoch"], meta["best_metric"]
        print(f"resumed from {ckpt} at epoch {start_epoch}")

    if ckpt is None and not args.eval_only and env.is_main and (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()  # a fresh run starts a fresh log
    logger = JsonlLogger(out / "log.jsonl")
    train_ds = ClipDataset(train, args, "train", cache=cache)
    train_loader = make_loader(train_ds, args, args.batch_size, shuffle=True, seed=args.seed)
    select_items = test if args.select_on_test else val
    if args.select_on_test and env.is_main:
        warnings.warn("--select-on-test: best.pth is chosen on the TEST split (official quirk)")

    if not args.eval_only:
        for epoch in range(start_epoch, args.epochs):
            lr = args.lr * lr_factor(epoch + 1, args.epochs, args.warmup_epochs, args.lr_schedule)
            for gparam in optimizer.param_groups:
                gparam["lr"] = lr
            stats = train_one_epoch(model_ddp, train_loader, optimizer, epoch, args, env, motion_forward)
            rec = {"epoch": epoch + 1, "lr": lr, **stats}
            last = epoch + 1 == args.epochs
            metric = None
            if (epoch + 1) % args.eval_every == 0 or last:
                if select_items:
                    v, *_, n_sk = evaluate_iid(model, select_items, args, env, num_classes, cache=cache)
                    rec["val_top1"], rec["val_n_skipped"] = v["top1"], n_sk
                    metric = v["top1"]
                if val_bias is not None:
                    vb, _ = evaluate_bias(model, val_bias[0], None, ds_name, args, env, cache=cache)
                    rec["val_contra"] = vb.get(f"{ds_name}_contra_avg")
                    if args.select_metric == "val_contra":
                        metric = rec["val_contra"]
            if args.bias_eval_every and ((epoch + 1) % args.bias_eval_every == 0 or last) and bias_sets:
                tb, _ = evaluate_bias(model, bias_sets, None, ds_name, args, env, cache=cache)
                rec.update({f"test_{k}": v for k, v in tb.items() if k.endswith("_avg")})
            if metric is not None and (best is None or metric > best):
                best = metric
                if env.is_main:
                    save_checkpoint(out / "best.pth", model=model, epoch=epoch + 1, best_metric=best,
                                    extra={"config": vars(args_record)})
            if env.is_main:
                save_checkpoint(out / "checkpoint.pth", model=model, optimizer=optimizer, epoch=epoch + 1,
                                best_metric=best, extra={"config": vars(args_record)})
            logger.log(rec)
            if env.is_main:
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}))

    # final evaluation: best (selected on val) and last
    results = {"bias_protocol": args.bias_protocol, "init": init.get("init"), "selected_on":
               "test" if args.select_on_test else ("val" if val else "none (no val split: best = last)")}
    last_state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = [("last", last_state)]
    if (out / "best.pth").is_file():
        best_ckpt = read_checkpoint(out / "best.pth", env.device, trust=args.trust_checkpoint)
        if not isinstance(best_ckpt, dict) or not isinstance(best_ckpt.get("model"), dict):
            raise CheckpointError(f"{out / 'best.pth'} is not a checkpoint of this script (no 'model' state)")
        blocks.insert(0, ("best", best_ckpt["model"]))
    else:
        blocks.insert(0, ("best", last_state))
    for name, state in blocks:
        model.load_state_dict(state)
        r, idx, lab, sc, n_sk = evaluate_iid(model, test, args, env, num_classes, views=args.test_views,
                                             crops=args.test_crops, cache=cache)
        block = {ds_name: r["top1"], f"{ds_name}_top5": r["top5"], f"{ds_name}_mean_class": r["mean_class"],
                 "n_skipped": {"test": n_sk, "missing_test": miss_te}}
        preds_dir = out / "preds" / name
        if env.is_main:
            write_preds(preds_dir / "test.csv", test, idx, lab, sc)
            plot_confusion(confusion_matrix(sc.argmax(1), lab, num_classes), out / "plots" / f"confusion_{name}.png",
                           class_names=info.get("class_names"), title=f"test confusion ({name})")
        if bias_sets or conflfg is not None:
            b, sk = evaluate_bias(model, bias_sets, conflfg, ds_name, args, env, cache=cache,
                                  preds_dir=preds_dir if env.is_main else None)
            block.update(b)
            block["n_skipped"].update(sk)
        results[name] = block
    model.load_state_dict(last_state)
    if env.is_main:
        write_json(out / "results.json", results)
        make_plots(out, results, ds_name)
        print(json.dumps({k: v for k, v in results["best"].items() if not isinstance(v, dict)}, indent=None))
    return results


def make_plots(out, results, ds_name):
    if not (out / "log.jsonl").is_file():
        return
    recs = read_jsonl(out / "log.jsonl")
    plot_curves(recs, out / "plots" / "losses.png", ["loss", "loss_ce", "ce_static", "loss_ent", "loss_gp"])
    plot_curves(recs, out / "plots" / "accuracy.png", ["train_top1", "static_top1", "static_entropy", "val_top1",
                                                       f"test_{ds_name}_contra_avg"])
    keys = [k for k in results["best"] if k.endswith("_avg") or k == ds_name or k.endswith("conflfg_stripe")]
    if keys:
        plot_bars([results["best"][k] for k in keys], out / "plots" / "bias_metrics.png", labels=keys,
                  title="best.pth (%)", ylabel="%")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return demo(argv[1:])
    args = resolve_args(parse_args(build_parser(), argv))
    try:
        run(args)
    finally:
        cdist.cleanup()


# ----------------------------------------------------------------------------- offline demo

def demo_parser():
    p = argparse.ArgumentParser(description="Offline synthetic static-bias benchmark: baseline vs ALBAR",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="runs/albar_demo")
    p.add_argument("--data-dir", default="", help="where the generated benchmark is cached (default <output-dir>/data)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps-per-epoch", type=int, default=0, help="batches per epoch (0 = the whole train split)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-train", type=int, default=3750, help="train videos before the 20%% val hold-out")
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--arch", default="cnn3d", choices=["cnn3d", "swin3d_tiny_test"],
                   help="demo model: the small 3D CNN or a reduced swin3d (1 block per stage, width 24)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--methods", nargs="+", default=["baseline", "albar"], choices=["baseline", "albar", "albar_no_gp"])
    p.add_argument("--ablation-seeds", type=int, nargs="*", default=[1], help="seeds of the no-GP ablation ([] = skip)")
    p.add_argument("--extra", default="", help="extra train_albar flags for every run (quoted string)")
    return p


_DEMO_CACHE = {}  # decoded frames, shared by the runs of one (worker) process


def _demo_run(job):
    """One demo run (method, seed) in this process; returns its summary row."""
    import resource
    method, seed, data, a = job
    torch.set_num_threads(a.threads)
    flags = ["--dataset", "list", "--data-root", str(data), "--train-list", "train.txt", "--test-list", "test.txt",
             "--bias-root", "bias", "--bias-prefix", "SYNTH", "--arch", a.arch, "--num-frames", "8",
             "--frame-stride", "1", "--short-side", "32", "--crop", "28", "--train-crop", "random",
             "--hflip-prob", "0", "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
             "--limit-train-batches", str(a.steps_per_epoch), "--lr", str(a.lr), "--warmup-epochs", "0",
             "--eval-every", "2", "--eval-batch-size", "250",
             "--workers", "0", "--device", "cpu", "--seed", str(seed), "--from-scratch",
             "--output-dir", str(Path(a.output_dir) / f"{method}_seed{seed}")] + a.extra.split()
    if method == "baseline":
        flags.append("--baseline")
    if method == "albar_no_gp":
        flags += ["--w-gp", "0"]
    args = resolve_args(parse_args(build_parser(), flags))
    c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    res = run(args, cache=_DEMO_CACHE)["best"]
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"method": method, "seed": seed, "iid": res["synth"], "scuba": res["synth_scuba_avg"],
            "scufo": res["synth_scufo_avg"], "contrasted": res["synth_contra_avg"],
            **{k.replace("synth_", ""): v for k, v in res.items() if k.endswith(("_other", "_unseen"))},
            "wall_s": round(time.time() - w0, 1), "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1)}


def demo(argv):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    a = demo_parser().parse_args(argv)
    from common.data import synthetic_video
    from common.logging import summary_table, write_summary
    out = Path(a.output_dir)
    t0 = time.time()
    data = synthetic_video.build(Path(a.data_dir) if a.data_dir else out / "data", num_train=a.num_train,
                                 num_test=a.num_test)
    print(f"synthetic data ready in {time.time() - t0:.1f}s at {data}")
    order = {m: i for i, m in enumerate(["baseline", "albar", "albar_no_gp"])}
    runs = [(m, s) for m in a.methods for s in a.seeds] + [("albar_no_gp", s) for s in a.ablation_seeds]
    # longest runs first, so that --jobs workers finish together
    jobs = [(m, s, data, a) for m, s in sorted(runs, key=lambda r: (r[0] == "baseline", r[0] == "albar_no_gp"))]
    rows, ablation = [], []

    def record(row):
        (ablation if row["method"] == "albar_no_gp" else rows).append(row)
        print(f"[demo] {row}", flush=True)
        rows.sort(key=lambda r: (order[r["method"]], r["seed"]))
        write_summary(out / "summary.json", rows)
        if ablation:
            write_json(out / "ablation.json", {"rows": ablation})

    if a.jobs <= 1:
        for job in jobs:
            record(_demo_run(job))
    else:  # one single-threaded process per run: small 3D convs scale badly over threads
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(_demo_run, job) for job in jobs]):
                record(fut.result())
    metrics = ["iid", "scuba", "scufo", "contrasted", "wall_s", "cpu_s"]
    print("\nsynthetic static-bias benchmark (accuracy %, chance 16.7; scuba/scufo/contrasted = mean of Other+Unseen)")
    print(summary_table(rows, metrics))
    if ablation:
        print("\nablation: ALBAR without the gradient penalty (w_gp = 0)")
        print(summary_table(ablation, metrics))
    print(f"demo wall time {time.time() - t0:.0f}s ({a.jobs} jobs x {a.threads} threads)")
    return rows


if __name__ == "__main__":
    config.run_main(main)
