"""Universal Action Space (UAS): a frozen Video Swin-B as a "universal action space" for animal
behaviour, trained as a linear probe (the UAS mode) or with LoRA on q and v (the K700-diff baseline).

Spec: specs/uas.md. Read from main() down:
  config -> dist -> datasets (list files or --synthetic) -> Swin3D (+ LoRA via common.ops.lora_linear)
  -> AdamW (head lr, backbone x0.1), warmup + cosine, accumulation -> multi-view test -> results.json

Subcommands:
  python train_uas.py [flags]                      train / evaluate
  python train_uas.py convert-weights IN OUT       Video-Swin (mmaction `backbone.*`) -> torchvision keys
  python train_uas.py export CKPT OUT [--merge-lora]   trained checkpoint -> plain state_dict
  python train_uas.py demo --output-dir runs/uas_demo  offline probe-vs-LoRA demo on synthetic clips
"""
import argparse
import csv
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.video.swin_transformer import (
    ShiftedWindowAttention3d,
    SwinTransformer3d,
    _compute_attention_mask_3d,
    _compute_pad_size_3d,
    _get_window_and_shift_size,
)

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import dist, metrics, ops, video
from common import logging as log_lib

MEAN = (123.675, 116.28, 103.53)  # RGB 0-255 (mmaction)
STD = (58.395, 57.12, 57.375)

# ----------------------------------------------------------------------------------------------
# Data presets (spec §2). Paths are relative to --data-root.

K700_DIFF_CLASSES = [
    "arresting", "baby waking up", "being excited", "being in zero gravity", "blending fruit",
    "bouncing ball (not juggling)", "breaking glass", "brushing floor", "carrying weight", "carving marble",
    "carving wood with a knife", "chasing", "checking watch", "closing door", "cooking chicken", "coughing",
    "crocheting", "curling eyelashes", "cutting cake", "dealing cards", "decoupage", "digging", "doing sudoku",
    "eating nachos", "entering church", "exercising arm", "filling cake", "filling eyebrows", "flipping bottle",
    "gargling", "grooming cat", "helmet diving", "herding cattle", "high fiving", "jumping sofa", "laying decking",
    "letting go of balloon", "lighting candle", "listening with headphones", "looking in mirror",
    "making latte art", "making slime", "metal detecting", "milking goat", "mixing colours", "moving baby",
    "moving child", "opening coconuts", "peeling banana", "petting horse", "picking apples",
    "picking blueberries", "playing american football", "playing billiards", "playing cards",
    "playing checkers", "playing mahjong", "playing nose flute", "playing oboe", "playing piccolo",
    "playing road hockey", "playing rounders", "playing shuffleboard", "playing slot machine", "poaching eggs",
    "polishing furniture", "pouring milk", "pouring wine", "pretending to be a statue", "pulling espresso shot",
    "pulling rope (game)", "putting wallpaper on wall", "rolling eyes", "saluting", "sanding wood",
    "seasoning food", "shoot dance", "shooting off fireworks", "shouting", "shredding paper", "sieving",
    "silent disco", "ski ballet", "slicing onion", "spinning plates", "splashing water", "spraying",
    "squeezing orange", "stacking cups", "stacking dice", "steering car", "surveying", "swimming with dolphins",
    "swimming with sharks", "taking photo", "tossing salad", "treating wood", "uncorking champagne",
    "using megaphone", "vacuuming car", "walking on stilts", "walking with crutches", "waxing armpits",
]
assert len(K700_DIFF_CLASSES) == 103
CHIMPBEHAVE_CLASSES = ["sitting", "standing", "walking", "hanging", "climbing up", "climbing down", "running"]

PRESETS = {
    # roots / lists relative to --data-root; test = val where the dataset has no test split
    "mammalnet": dict(num_classes=12, data_dir="mammalnet/mammalnet", val_dir="mammalnet/mammalnet",
                      train_list="mammalnet/train_base.txt", val_list="mammalnet/val_base.txt",
                      test_list="mammalnet/test_base.txt", batch_size=1, frame_interval=2, test_clips=4),
    "chimpbehave": dict(num_classes=7, data_dir="chimpbehave/miniclips", val_dir="chimpbehave/miniclips",
                        train_list="chimpbehave/chimpbehave_train.txt", val_list="chimpbehave/chimpbehave_val.txt",
                        test_list="chimpbehave/chimpbehave_val.txt", batch_size=2, frame_interval=1, test_clips=1,
                        class_names=CHIMPBEHAVE_CLASSES),
    "k700diff": dict(num_classes=103, data_dir="kinetics700_diff/train", val_dir="kinetics700_diff/val",
                     train_list="kinetics700_diff/k700_diff_train.txt", val_list="kinetics700_diff/k700_diff_val.txt",
                     test_list="kinetics700_diff/k700_diff_val.txt", batch_size=1, frame_interval=2, test_clips=4,
                     class_names=K700_DIFF_CLASSES),
}

# ----------------------------------------------------------------------------------------------
# Model (spec §3): torchvision SwinTransformer3d + Dropout(0.5) head + LoRA on q and v


class VideoSwin(SwinTransformer3d):
    """torchvision SwinTransformer3d (same state-dict keys) with the UAS head Dropout(p) -> Linear."""

    def __init__(self, num_classes, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                 window_size=(8, 7, 7), patch_size=(2, 4, 4), drop_path=0.2, head_dropout=0.5):
        super().__init__(patch_size=list(patch_size), embed_dim=embed_dim, depths=list(depths),
                         num_heads=list(num_heads), window_size=list(window_size),
                         stochastic_depth_prob=drop_path, num_classes=num_classes)
        self.head_drop = nn.Dropout(head_dropout)
        nn.init.normal_(self.head.weight, std=0.01)  # spec §3.3
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x):
        x = self.patch_embed(x)  # B T H W C
        x = self.pos_drop(x)
        x = self.features(x)
        x = self.norm(x)
        return x.mean(dim=(1, 2, 3))  # = AdaptiveAvgPool3d(1) over T,H,W -> B x C

    def forward(self, x):
        return self.head(self.head_drop(self.forward_features(x)))


def build_model(args, num_classes):
    return VideoSwin(num_classes, embed_dim=args.embed_dim, depths=args.depths, num_heads=args.num_heads,
                     window_size=args.window_size, patch_size=args.patch_size, drop_path=args.drop_path,
                     head_dropout=args.head_dropout)


def attention_blocks(model):
    """(name, block) of every SwinTransformerBlock: features.{2i}.{j}."""
    return [(f"features.{si}.{j}", blk) for si, stage in enumerate(model.features) if si % 2 == 0
            for j, blk in enumerate(stage)]


class LoRAWindowAttention3d(ShiftedWindowAttention3d):
    """Shifted-window attention whose qkv projection carries LoRA on q and v (spec §3.4-3.5).

    torchvision's forward hands `qkv.weight` to a functional, so wrapping `qkv` would do nothing.
    Here the forward re-implements the functional with the qkv projection done by
    `common.ops.lora_linear` (impl "fused"), or hands W_eff = W + s[BqAq; 0; BvAv] to it (impl "weight").
    """

    def __init__(self, base, rank=32, alpha=None, init="standard", impl="fused"):
        dim = base.qkv.in_features
        super().__init__(dim, list(base.window_size), list(base.shift_size), base.num_heads,
                         qkv_bias=base.qkv.bias is not None, proj_bias=base.proj.bias is not None,
                         attention_dropout=base.attention_dropout, dropout=base.dropout)
        self.load_state_dict(base.state_dict())
        self.rank, self.scale, self.impl = rank, (rank if alpha is None else alpha) / rank, impl
        self.lora_A_q = nn.Parameter(torch.empty(rank, dim))
        self.lora_A_v = nn.Parameter(torch.empty(rank, dim))
        self.lora_B_q = nn.Parameter(torch.empty(dim, rank))
        self.lora_B_v = nn.Parameter(torch.empty(dim, rank))
        self.register_buffer("_zeros_B", torch.zeros(dim, rank), persistent=False)
        self.reset_lora(init)

    @torch.no_grad()
    def reset_lora(self, init):
        if init == "standard":  # A ~ kaiming-uniform(a=sqrt 5) = U(+-1/sqrt C), B = 0
            for a in (self.lora_A_q, self.lora_A_v):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B_q.zero_(), self.lora_B_v.zero_()
        elif init == "intended":  # what the official adapter class writes
            self.lora_A_q.normal_(), self.lora_A_v.normal_()
            self.lora_B_q.zero_(), self.lora_B_v.zero_()
        elif init == "official":  # backbone init_weights() re-initialised the adapters: B != 0
            for p in (self.lora_A_q, self.lora_A_v, self.lora_B_q, self.lora_B_v):
                nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)
        else:
            raise ValueError(f"--lora-init {init!r}: expected standard, intended or official")

    def packed_lora(self):
        """A = [A_q; A_v] (2r x C); B (3C x 2r) = [[B_q,0],[0,0],[0,B_v]] from constant zeros (spec §9)."""
        z = self._zeros_B.to(self.lora_B_q.dtype)
        A = torch.cat([self.lora_A_q, self.lora_A_v], 0)
        B = torch.cat([torch.cat([self.lora_B_q, z], 1), torch.cat([z, z], 1), torch.cat([z, self.lora_B_v], 1)], 0)
        return A, B

    def delta_weight(self):
        z = torch.zeros_like(self.qkv.weight[: self.qkv.in_features])
        return self.scale * torch.cat([self.lora_B_q @ self.lora_A_q, z, self.lora_B_v @ self.lora_A_v], 0)

    def forward(self, x):
        _, t, h, w, _ = x.shape
        window_size, shift_size = _get_window_and_shift_size(list(self.shift_size), (t, h, w), list(self.window_size))
        rel_bias = self.get_relative_position_bias(window_size)
        if self.impl == "weight":
            from torchvision.models.video.swin_transformer import shifted_window_attention_3d
            return shifted_window_attention_3d(
                x, self.qkv.weight + self.delta_weight(), self.proj.weight, rel_bias, window_size, self.num_heads,
                shift_size=shift_size, attention_dropout=self.attention_dropout, dropout=self.dropout,
                qkv_bias=self.qkv.bias, proj_bias=self.proj.bias)
        return self._fused_forward(x, rel_bias, window_size, shift_size)

    def _fused_forward(self, x, rel_bias, window_size, shift_size):
        """torchvision's shifted_window_attention_3d with qkv = lora_linear(...) (W_eff never built)."""
        b, t, h, w, c = x.shape
        pad = _compute_pad_size_3d((t, h, w), tuple(window_size))
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        _, tp, hp, wp, _ = x.shape
        shifted = sum(shift_size) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1], -shift_size[2]), dims=(1, 2, 3))
        nw = (tp // window_size[0]) * (hp // window_size[1]) * (wp // window_size[2])
        x = x.view(b, tp // window_size[0], window_size[0], hp // window_size[1], window_size[1],
                   wp // window_size[2], window_size[2], c)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * nw, window_size[0] * window_size[1] * window_size[2], c)

        A, B = self.packed_lora()
        qkv = ops.lora_linear(x, self.qkv.weight, self.qkv.bias, A, B, self.scale)
        qkv = qkv.reshape(x.size(0), x.size(1), 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.num_heads) ** -0.5).matmul(k.transpose(-2, -1)) + rel_bias
        if shifted:
            mask = _compute_attention_mask_3d(x, (tp, hp, wp), tuple(window_size), tuple(shift_size))
            attn = attn.view(x.size(0) // nw, nw, self.num_heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, x.size(1), x.size(1))
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
        x = F.dropout(F.linear(x, self.proj.weight, self.proj.bias), p=self.dropout, training=self.training)

        x = x.view(b, tp // window_size[0], hp // window_size[1], wp // window_size[2], window_size[0],
                   window_size[1], window_size[2], c)
        x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)
        if shifted:
            x = torch.roll(x, shifts=(shift_size[0], shift_size[1], shift_size[2]), dims=(1, 2, 3))
        return x[:, :t, :h, :w, :].contiguous()


def add_lora(model, rank=32, alpha=None, init="standard", impl="fused"):
    """Replace every block's attention by LoRAWindowAttention3d (same weights, new adapters)."""
    for _, blk in attention_blocks(model):
        if not isinstance(blk.attn, LoRAWindowAttention3d):
            blk.attn = LoRAWindowAttention3d(blk.attn, rank, alpha, init, impl).to(blk.attn.qkv.weight.device)
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold s[BqAq; 0; BvAv] into every qkv weight and go back to plain torchvision attention."""
    for _, blk in attention_blocks(model):
        a = blk.attn
        if isinstance(a, LoRAWindowAttention3d):
            plain = ShiftedWindowAttention3d(a.qkv.in_features, list(a.window_size), list(a.shift_size), a.num_heads,
                                             qkv_bias=a.qkv.bias is not None, proj_bias=a.proj.bias is not None,
                                             attention_dropout=a.attention_dropout, dropout=a.dropout)
            state = {k: v for k, v in a.state_dict().items() if not k.startswith("lora_")}
            state["qkv.weight"] = a.qkv.weight + a.delta_weight().to(a.qkv.weight.dtype)
            plain.load_state_dict(state)
            blk.attn = plain.to(a.qkv.weight.device)
    return model


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def set_trainable(model, mode):
    """probe: head only; lora: adapters + head; full: everything (spec §3.4, §3.6)."""
    for name, p in model.named_parameters():
        if mode == "full":
            p.requires_grad_(True)
        elif mode == "lora":
            p.requires_grad_(name.startswith("head.") or ".lora_" in name)
        else:
            p.requires_grad_(name.startswith("head."))


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for p in lora_parameters(model))
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    return {"trainable": trainable, "total": total, "frozen": total - trainable, "lora": lora, "head": head}


def prepare_model(args, num_classes):
    """Build, load --weights, add LoRA and set trainable parameters for args.mode."""
    model = build_model(args, num_classes)
    if args.weights:
        load_pretrained(model, args.weights, strict=args.strict)
    if args.mode == "lora":
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_init, args.lora_impl)
        if args.weights:
            load_pretrained_lora(model, args.weights)
    set_trainable(model, args.mode)
    return model


# ----------------------------------------------------------------------------------------------
# Checkpoint conversion (spec §3.2): Video-Swin (mmaction) keys -> torchvision keys

_VS_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_VS_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_VS_LORA = re.compile(r"^attn\.lora_([qv])\.lora_([AB])\.weight$")


def is_video_swin_layout(state):
    return any(k.startswith(("backbone.", "layers.", "cls_head.")) for k in state)


def convert_video_swin_key(key):
    """One Video-Swin key -> torchvision key (None for keys that have no torchvision counterpart)."""
    if key.startswith("cls_head.fc_cls."):
        return "head." + key[len("cls_head.fc_cls."):]
    if key.startswith("backbone."):
        key = key[len("backbone."):]
    if key.startswith(("patch_embed.", "norm.")):
        return key
    m = _VS_BLOCK.match(key)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        lm = _VS_LORA.match(rest)
        if lm:
            rest = f"attn.lora_{lm.group(2)}_{lm.group(1)}"
        elif rest.startswith("mlp.fc1."):
            rest = "mlp.0." + rest[len("mlp.fc1."):]
        elif rest.startswith("mlp.fc2."):
            rest = "mlp.3." + rest[len("mlp.fc2."):]
        elif not rest.startswith(("norm1.", "norm2.", "attn.")):
            return None
        return f"features.{2 * i}.{j}.{rest}"
    m = _VS_DOWN.match(key)
    if m:
        return f"features.{2 * int(m.group(1)) + 1}.{m.group(2)}"
    return None


def convert_video_swin(state):
    """Rename a Video-Swin state dict to torchvision keys. No tensor is reshaped. Keys without a
    counterpart are kept under their original name so that they show up as 'unexpected'."""
    out = {}
    for k, v in state.items():
        new = convert_video_swin_key(k)
        out[new if new is not None else k] = v
    return out


def to_video_swin(state):
    """Inverse mapping (torchvision -> Video-Swin mmaction layout); used by tests and for export."""
    out = {}
    for k, v in state.items():
        if k.startswith("head."):
            out["cls_head.fc_cls." + k[5:]] = v
            continue
        m = re.match(r"^features\.(\d+)\.(.+)$", k)
        if not m:
            out["backbone." + k] = v
            continue
        si, rest = int(m.group(1)), m.group(2)
        if si % 2 == 1:
            out[f"backbone.layers.{si // 2}.downsample.{rest}"] = v
            continue
        j, rest = rest.split(".", 1)
        lm = re.match(r"^attn\.lora_([AB])_([qv])$", rest)
        if lm:
            rest = f"attn.lora_{lm.group(2)}.lora_{lm.group(1)}.weight"
        elif rest.startswith("mlp.0."):
            rest = "mlp.fc1." + rest[6:]
        elif rest.startswith("mlp.3."):
            rest = "mlp.fc2." + rest[6:]
        out[f"backbone.layers.{si // 2}.blocks.{j}.{rest}"] = v
    return out


def read_state_dict(path):
    """A local weights file -> flat state dict of tensors (mmaction {'state_dict','meta'} accepted)."""
    path = Path(path)
    if not path.is_file():
        raise ckpt_lib.CheckpointError(f"--weights {path}: file not found (weights are never downloaded)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an mmaction `meta` with non-tensor objects (spec §10.8)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
            warnings.warn(f"{path}: weights_only load failed ({type(e).__name__}); used the full unpickler")
        except Exception as e2:
            raise ckpt_lib.CheckpointError(f"--weights {path}: cannot read as a torch file: {e2}") from e2
    state = obj
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ckpt_lib.CheckpointError(f"--weights {path}: expected a state_dict of tensors "
                                       "(or a dict holding one under 'state_dict' / 'model')")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return convert_video_swin(state) if is_video_swin_layout(state) else state


def load_pretrained(model, path, strict=False, verbose=True):
    """Load backbone weights (torchvision or Video-Swin layout). The head is loaded only when its
    class count matches; otherwise it is discarded (new task, spec §3.2). Backbone shape mismatches
    (another model) are an error naming the keys; missing backbone keys are an error with --strict.
    Returns (loaded, missing, unexpected)."""
    state = read_state_dict(path)
    own = model.state_dict()
    notes = []
    if "head.weight" in state and tuple(state["head.weight"].shape) != tuple(own["head.weight"].shape):
        notes.append(f"discarded the file's head {tuple(state['head.weight'].shape)} "
                     f"(model head {tuple(own['head.weight'].shape)}: a new task)")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    lora_state = {k: v for k, v in state.items() if ".lora_" in k}
    state = {k: v for k, v in state.items() if ".lora_" not in k}
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ckpt_lib.CheckpointError(
            f"--weights {path} does not fit this Swin3D (another model or config?): {len(bad)} shape mismatches: "
            + "; ".join(bad[:8]) + (f" ... (+{len(bad) - 8} more)" if len(bad) > 8 else ""))
    missing = sorted(k for k in own if k not in state and ".lora_" not in k)
    unexpected = sorted(k for k in state if k not in own)
    # the relative-position index buffers are deterministic: keep the model's own if absent
    missing_real = [k for k in missing if not k.endswith("relative_position_index") and not k.startswith("head.")]
    if strict and (missing_real or unexpected):
        raise ckpt_lib.CheckpointError(f"--weights {path} (--strict): missing keys {missing_real[:8]}"
                                       f"{' ...' if len(missing_real) > 8 else ''} ({len(missing_real)}), "
                                       f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                                       f"({len(unexpected)})")
    if missing_real and len(missing_real) == len([k for k in own if not k.endswith("relative_position_index")]):
        raise ckpt_lib.CheckpointError(f"--weights {path}: no key matches this model (first file keys: "
                                       f"{list(state)[:5]}); expected torchvision Swin3D or Video-Swin keys")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    model._pending_lora_state = lora_state
    if verbose and dist.is_main():
        print(f"[weights] {path}: loaded {len(state) - len(unexpected)} tensors; "
              f"missing {len(missing)} {missing_real[:6]}{' ...' if len(missing_real) > 6 else ''}; "
              f"unexpected {len(unexpected)} {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
              + (("; " + "; ".join(notes)) if notes else ""))
    return len(state) - len(unexpected), missing, unexpected


def load_pretrained_lora(model, path):
    """LoRA adapters from the weights file (a UAS LoRA checkpoint), if it held any."""
    lora_state = getattr(model, "_pending_lora_state", {})
    if not lora_state:
        return
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape) if k in own else 'absent'}"
           for k, v in lora_state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ckpt_lib.CheckpointError(f"--weights {path}: LoRA adapters do not fit: " + "; ".join(bad[:8]))
    model.load_state_dict(lora_state, strict=False)
    if dist.is_main():
        print(f"[weights] {path}: loaded {len(lora_state)} LoRA adapter tensors")


# ----------------------------------------------------------------------------------------------
# Data (spec §2): list files "relative/path.mp4 <label>", mmaction SampleFrames, official augmentation


def read_list(list_file, num_classes):
    """[(relative path, label)]; split on the LAST whitespace (Kinetics folders contain spaces)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    items = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise ValueError(f"{list_file}:{n}: expected '<relative/path.mp4> <label>', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise ValueError(f"{list_file}:{n}: label {label} out of range [0, {num_classes}) for {parts[0]!r}")
        items.append((parts[0], label))
    if not items:
        raise ValueError(f"{list_file}: no entries")
    return items


def sample_offsets(num_frames, clip_len, interval, *, train, num_clips=1, rng=None):
    """mmaction SampleFrames start offsets: train o ~ U{0..F-S}; test o_k = floor(k g + g/2), g = (F-S+1)/K."""
    span = clip_len * interval
    if train:
        return [int(rng.integers(0, num_frames - span + 1)) if num_frames - span + 1 > 0 else 0]
    if num_frames < span:
        return [0] * num_clips
    g = (num_frames - span + 1) / num_clips
    return [int(k * g + g / 2) for k in range(num_clips)]


def clip_indices(offset, num_frames, clip_len, interval):
    """(o + j tau) mod F: the 'loop' wrap for videos shorter than the clip span."""
    return (offset + np.arange(clip_len) * interval) % num_frames


def resize_short(frames, size):
    """(L,C,H,W) float -> short side = size (bilinear, aspect kept)."""
    h, w = frames.shape[-2:]
    if min(h, w) == size:
        return frames
    if h <= w:
        nh, nw = size, max(1, int(round(w * size / h)))
    else:
        nh, nw = max(1, int(round(h * size / w))), size
    return F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False)


def random_resized_box(h, w, rng, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """mmaction RandomResizedCrop box (one per clip): area fraction and log-uniform aspect."""
    for _ in range(tries):
        target = rng.uniform(*area) * h * w
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return y, x, ch, cw
    s = min(h, w)  # fallback: centre square
    return (h - s) // 2, (w - s) // 2, s, s


def normalize(frames):
    """(L,C,H,W) float 0-255 -> (C,L,H,W) normalised (NCTHW layout per sample)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((frames - mean) / std).permute(1, 0, 2, 3).contiguous()


def train_transform(frames, rng, short_side=256, crop=224):
    """short side 256 -> RandomResizedCrop(0.08-1, 3/4-4/3) -> 224x224 (aspect ignored) -> hflip p=0.5."""
    x = resize_short(frames, short_side)
    y0, x0, ch, cw = random_resized_box(x.shape[-2], x.shape[-1], rng)
    x = F.interpolate(x[..., y0:y0 + ch, x0:x0 + cw], size=(crop, crop), mode="bilinear", align_corners=False)
    if rng.random() < 0.5:
        x = x.flip(-1)
    return normalize(x)


def center_transform(frames, short_side=256, crop=224):
    x = resize_short(frames, short_side)
    h, w = x.shape[-2:]
    y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    return normalize(x[..., y0:y0 + crop, x0:x0 + crop])


def three_crop_transform(frames, short_side=224, crop=224):
    """short side 224 -> ThreeCrop: crops at both ends and the centre of the long side."""
    x = resize_short(frames, short_side)
    h, w = x.shape[-2:]
    if w >= h:
        starts = [(max(0, (h - crop) // 2), s) for s in (0, (w - crop) // 2, max(0, w - crop))]
    else:
        starts = [(s, max(0, (w - crop) // 2)) for s in (0, (h - crop) // 2, max(0, h - crop))]
    return [normalize(x[..., y0:y0 + crop, x0:x0 + crop]) for y0, x0 in starts]


class VideoListDataset(torch.utils.data.Dataset):
    """One item per list entry. split "train": one augmented clip (C,L,S,S); "val": one centre clip;
    "test": clips x crops views (V,C,L,S,S). An undecodable video returns None (skipped and counted
    by the caller) unless strict, which raises naming the file."""

    def __init__(self, root, list_file, num_classes, split, *, clip_len=32, frame_interval=2, test_clips=4,
                 test_crops=3, short_side=256, crop_size=224, test_short_side=224, strict=False, limit=0, seed=0):
        self.root, self.split, self.strict = Path(root), split, strict
        self.items = read_list(list_file, num_classes)
        if limit:
            self.items = self.items[:limit]
        self.num_classes, self.clip_len, self.interval = num_classes, clip_len, frame_interval
        self.test_clips, self.test_crops = test_clips, test_crops
        self.short_side, self.crop, self.test_short_side = short_side, crop_size, test_short_side
        self.seed, self.epoch = seed, 0
        if test_crops not in (1, 3):
            raise ValueError(f"--test-crops {test_crops}: expected 1 (centre) or 3 (ThreeCrop)")

    def __len__(self):
        return len(self.items)

    def class_histogram(self):
        return np.bincount([lab for _, lab in self.items], minlength=self.num_classes).tolist()

    def _rng(self, index):
        # per (seed, epoch, index): deterministic under any worker/rank layout and after resume
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index):
        rel, label = self.items[index]
        path = self.root / rel
        try:
            frames = video.read_video(path)  # exact decoded frame count (spec §2)
        except video.VideoDecodeError as e:
            if self.strict:
                raise
            warnings.warn(f"skipping undecodable video: {e}")
            return None
        n = frames.shape[0]
        rng = self._rng(index)
        if self.split == "train":
            idx = clip_indices(sample_offsets(n, self.clip_len, self.interval, train=True, rng=rng)[0],
                               n, self.clip_len, self.interval)
            clip = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float()
            return train_transform(clip, rng, self.short_side, self.crop), label, index
        if self.split == "val":
            idx = clip_indices(sample_offsets(n, self.clip_len, self.interval, train=False, num_clips=1)[0],
                               n, self.clip_len, self.interval)
            clip = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float()
            return center_transform(clip, self.short_side, self.crop).unsqueeze(0), label, index
        views = []
        for o in sample_offsets(n, self.clip_len, self.interval, train=False, num_clips=self.test_clips):
            clip = torch.from_numpy(frames[clip_indices(o, n, self.clip_len, self.interval)]).permute(0, 3, 1, 2).float()
            if self.test_crops == 3:
                views += three_crop_transform(clip, self.test_short_side, self.crop)
            else:
                views.append(center_transform(clip, self.test_short_side, self.crop))
        return torch.stack(views), label, index


def collate(batch):
    """Drop None (bad videos) and stack; returns (clips, labels, indices, n_skipped) or None if all bad."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, skipped
    clips, labels, idx = zip(*good)
    return (torch.stack(clips), torch.tensor(labels), torch.tensor(idx)), skipped


def resolve_data(args):
    """Fill list/root/class flags from the preset (explicit flags win); --synthetic uses the demo data."""
    if args.synthetic:
        from common.data.uas_synth import make_dataset
        info = make_dataset(Path(args.data_root) / "uas_synth", num_classes=args.synth_classes,
                            per_class=args.synth_per_class, frames=args.synth_frames, size=args.synth_size,
                            seed=args.synth_seed)
        preset = dict(num_classes=info["num_classes"], data_dir=info["root"], val_dir=info["root"],
                      train_list=info["train"], val_list=info["val"], test_list=info["test"],
                      class_names=info["class_names"])
        base = Path(".")
    elif args.dataset == "custom":
        preset, base = {}, Path(args.data_root)
    else:
        preset, base = PRESETS[args.dataset], Path(args.data_root)

    def pick(flag, key):
        v = getattr(args, flag)
        if v not in (None, ""):
            return v
        if key not in preset:
            raise SystemExit(f"--dataset {args.dataset}: --{flag.replace('_', '-')} is required")
        return preset[key] if key in ("num_classes", "batch_size", "frame_interval", "test_clips") \
            else str(base / preset[key])

    args.num_classes = pick("num_classes", "num_classes")
    args.train_root = pick("train_root", "data_dir")
    args.val_root = pick("val_root", "val_dir")
    args.train_list = pick("train_list", "train_list")
    args.val_list = pick("val_list", "val_list")
    args.test_list = pick("test_list", "test_list")
    for flag, default in (("batch_size", 1), ("frame_interval", 2), ("test_clips", 4)):
        if getattr(args, flag) is None:
            setattr(args, flag, preset.get(flag, default))
    if args.test_frame_interval is None:
        args.test_frame_interval = 2 if (args.official and args.dataset == "chimpbehave") else args.frame_interval
    names = None
    if args.class_names:
        names = [ln.strip() for ln in Path(args.class_names).read_text().splitlines() if ln.strip()]
    elif "class_names" in preset:
        names = list(preset["class_names"])
    if names is not None and len(names) != args.num_classes:
        raise SystemExit(f"class names: {len(names)} names for {args.num_classes} classes")
    args.class_name_list = names or [str(i) for i in range(args.num_classes)]
    return args
