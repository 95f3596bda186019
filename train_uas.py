"""Universal Action Space (UAS): a frozen Video Swin-B as a "universal action space" for animal
behaviour, trained as a linear probe (the UAS mode) or with LoRA on q and v (the K700-diff baseline).

Spec: specs/uas.md. Read from main() down:
  config -> dist -> datasets (list files or --synthetic) -> Swin3D (+ LoRA via common.ops.lora_linear)
  -> AdamW (head lr, backbone x0.1), warmup + cosine, accumulation -> multi-view test -> results.json

Subcommands:
  python train_uas.py [flags]                      train / evaluate
  python train_uas.py convert-weights IN OUT       any known Swin3D weights layout -> torchvision keys
  python train_uas.py k700diff-lists CSV VIDEO_ROOT OUT   K700 annotation CSV -> K700-diff list file
  python train_uas.py demo --output-dir runs/uas_demo  offline probe-vs-LoRA demo on synthetic clips
"""
import argparse
import csv
import math
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
    shifted_window_attention_3d,
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
        qkv_trainable = self.qkv.weight.requires_grad or (self.qkv.bias is not None and self.qkv.bias.requires_grad)
        if self.impl == "weight" or qkv_trainable:  # lora_linear needs a frozen W, b (spec §9)
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
    if args.mode == "lora":
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_init, args.lora_impl)
    if args.weights:  # a UAS LoRA checkpoint's adapters load too (absent adapters keep their init)
        load_pretrained(model, args.weights, allow_partial=args.allow_partial_weights,
                        trust=args.trust_checkpoint)
    set_trainable(model, args.mode)
    return model


# ----------------------------------------------------------------------------------------------
# Weights (spec §3.2): every known Swin3D layout is renamed to torchvision keys, no tensor reshaped.
#   torchvision swin3d_b (e.g. KINETICS400_IMAGENET22K_V1), this script's exports: as is
#   Video-Swin release / mmaction2 0.x: {"state_dict": {backbone.layers.{i}.blocks.{j}.*, backbone.norm.*,
#                                        cls_head.fc_cls.*}, "meta": ...}
#   mmaction2 1.x: the same, with the final norm named backbone.norm{last stage}.* (norm3 for Swin-B)
#   UAS LoRA checkpoints: ...attn.lora_{q,v}.lora_{A,B}.weight
# bare or under "state_dict" / "model", with or without a DDP "module." prefix.

_VS_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_VS_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_VS_LORA = re.compile(r"^attn\.lora_([qv])\.lora_([AB])\.weight$")
_VS_STAGE = re.compile(r"^(?:backbone\.)?layers\.(\d+)\.")


def is_video_swin_layout(state):
    return any(k.startswith(("backbone.", "layers.", "cls_head.")) for k in state)


def convert_video_swin_key(key, last_stage=None):
    """One Video-Swin key -> torchvision key (None for keys without a counterpart). With
    `last_stage` = i, mmaction2 1.x's final norm `norm{i}.*` maps to `norm.*`."""
    if key.startswith("cls_head.fc_cls."):
        return "head." + key[len("cls_head.fc_cls."):]
    if key.startswith("backbone."):
        key = key[len("backbone."):]
    if key.startswith(("patch_embed.", "norm.")):
        return key
    if last_stage is not None and key.startswith(f"norm{last_stage}."):
        return "norm." + key[len(f"norm{last_stage}."):]
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
    """Rename a Video-Swin / mmaction state dict to torchvision keys. Keys without a counterpart
    keep their name, so that loading reports them as unexpected."""
    last = max((int(m.group(1)) for k in state if (m := _VS_STAGE.match(k))), default=None)
    out = {}
    for k, v in state.items():
        new = convert_video_swin_key(k, last)
        out[new if new is not None else k] = v
    return out


def read_state_dict(path, trust=False):
    """A local weights file (any layout above) -> flat state dict of tensors in torchvision keys.
    Loaded with common.checkpoint.safe_load (never runs code from the file unless `trust`)."""
    state = ckpt_lib.safe_load(path, what="--weights", trust=trust)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ckpt_lib.CheckpointError(f"--weights {path}: expected a state_dict of tensors "
                                       "(or a dict holding one under 'state_dict' / 'model')")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return convert_video_swin(state) if is_video_swin_layout(state) else state


def _some(keys, n=8):
    return "[" + ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "") + "]"


def load_pretrained(model, path, *, allow_partial=False, trust=False, verbose=True):
    """Load --weights into the model. The file's head loads only when its class count matches
    (otherwise it is discarded: a new task). A shape mismatch is always an error; a backbone key
    the file lacks, or a file key the model lacks, is an error naming the keys unless
    `allow_partial` (--allow-partial-weights), which loads the rest and lists them. Never counted
    as missing: the head, LoRA adapters (a plain backbone file has none: they keep their init) and
    the deterministic relative-position index buffers. Returns (n loaded, missing, unexpected)."""
    state = read_state_dict(path, trust=trust)
    own = model.state_dict()
    notes = []
    if "head.weight" in state and tuple(state["head.weight"].shape) != tuple(own["head.weight"].shape):
        notes.append(f"discarded the file's head {tuple(state['head.weight'].shape)} "
                     f"(model head {tuple(own['head.weight'].shape)}: a new task)")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if not any(k in own for k in state):
        raise ckpt_lib.CheckpointError(f"--weights {path}: no key matches this model (first file keys: "
                                       f"{list(state)[:5]}); expected torchvision Swin3D or Video-Swin keys")
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ckpt_lib.CheckpointError(f"--weights {path} does not fit this Swin3D (another model or config?): "
                                       f"{len(bad)} shape mismatches {_some(bad)}")
    missing = sorted(k for k in own if k not in state and not k.startswith("head.") and ".lora_" not in k
                     and not k.endswith("relative_position_index"))
    unexpected = sorted(k for k in state if k not in own)
    if (missing or unexpected) and not allow_partial:
        parts = ([f"{len(missing)} backbone keys missing {_some(missing)}"] if missing else []) + \
                ([f"{len(unexpected)} unexpected keys {_some(unexpected)}"] if unexpected else [])
        hint = " (LoRA adapters: use --mode lora)" if any(".lora_" in k for k in unexpected) else ""
        raise ckpt_lib.CheckpointError(f"--weights {path} does not fully fit this Swin3D: {', '.join(parts)}{hint}; "
                                       "pass --allow-partial-weights to load the rest anyway")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    loaded = len(state) - len(unexpected)
    if verbose and dist.is_main():
        print(f"[weights] {path}: loaded {loaded} tensors"
              + (f"; PARTIAL (--allow-partial-weights): missing {_some(missing, 6)}, unexpected {_some(unexpected, 6)}"
                 if missing or unexpected else "") + "".join("; " + n for n in notes))
    return loaded, missing, unexpected


# ----------------------------------------------------------------------------------------------
# Data (spec §2): list files "relative/path.mp4 <label>", mmaction SampleFrames, official augmentation


def read_list(list_file, num_classes):
    """[(relative path, label)]; split on the LAST whitespace (Kinetics folders contain spaces)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise config_lib.InputError(f"list file not found: {list_file}")
    items = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise config_lib.InputError(f"{list_file}:{n}: expected '<relative/path.mp4> <label>', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise config_lib.InputError(f"{list_file}:{n}: label {label} out of range [0, {num_classes}) "
                                        f"for {parts[0]!r}")
        items.append((parts[0], label))
    if not items:
        raise config_lib.InputError(f"{list_file}: no entries")
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


def normalize(clip):
    """uint8 (L,H,W,3) -> float (3,L,H,W), (x - MEAN) / STD in 0-255 units (mmaction Normalize, NCTHW)."""
    return video.to_float_normalized(clip, [m / 255 for m in MEAN], [s / 255 for s in STD])


class VideoListDataset(torch.utils.data.Dataset):
    """The clips of a list file "relative/path.mp4 <label>" (videos under `root`), read through
    common.video (frame count from its index, only the sampled frames decoded, the short side
    resized on decode). split "train": one clip (3,L,S,S): SampleFrames offset, short side
    `short_side`, RandomResizedCrop (area min_area-1) -> S x S, flip p=0.5; "val": (1,3,L,S,S), the
    centre clip at short side `short_side`, centre crop; "test": (test_clips x test_crops,3,L,S,S),
    short side `test_short_side`, ThreeCrop (3) or centre crop (1), all views from one decode.
    Items are (views, label, index); an undecodable video gives None (warned, skipped and counted by
    `video.collate_skip_none`) unless strict, which raises naming the file. Randomness is drawn from
    (seed, epoch, index): set `.epoch` each epoch."""

    def __init__(self, root, list_file, num_classes, split, *, clip_len=32, frame_interval=2, test_clips=4,
                 test_crops=3, short_side=256, crop_size=224, test_short_side=224, strict=False, limit=0, seed=0,
                 min_area=0.08):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split {split!r}: expected train, val or test")
        if test_crops not in (1, 3):
            raise config_lib.InputError(f"--test-crops {test_crops}: expected 1 (centre) or 3 (ThreeCrop)")
        self.root, self.split, self.strict = Path(root), split, strict
        self.items = read_list(list_file, num_classes)[:limit or None]
        self.num_classes, self.clip_len, self.interval = num_classes, clip_len, frame_interval
        self.test_clips, self.test_crops = test_clips, test_crops
        self.short_side, self.crop, self.test_short_side = short_side, crop_size, test_short_side
        self.seed, self.epoch, self.min_area = seed, 0, min_area

    def __len__(self):
        return len(self.items)

    def class_histogram(self):
        return np.bincount([lab for _, lab in self.items], minlength=self.num_classes).tolist()

    def __getitem__(self, index):
        path = self.root / self.items[index][0]
        return video.load_or_skip(lambda: self._load(path, index), path, self.strict)

    def _load(self, path, index):
        n = video.num_frames(path)  # exact decoded frame count (spec §2), from the demux-only index
        rng = np.random.default_rng([self.seed, self.epoch, index])  # any worker/rank layout, resume
        label = self.items[index][1]
        if self.split == "train":
            o = sample_offsets(n, self.clip_len, self.interval, train=True, rng=rng)[0]
            clip = video.decode_clip(path, clip_indices(o, n, self.clip_len, self.interval), size=self.short_side)
            clip = video.mmaction_random_resized_crop(clip, self.crop, scale=(self.min_area, 1.0), rng=rng)
            return normalize(video.hflip(clip) if rng.random() < 0.5 else clip), label, index
        val = self.split == "val"
        offsets = sample_offsets(n, self.clip_len, self.interval, train=False, num_clips=1 if val else self.test_clips)
        clips = video.decode_views(path, [clip_indices(o, n, self.clip_len, self.interval) for o in offsets],
                                   size=self.short_side if val else self.test_short_side)
        three = not val and self.test_crops == 3
        views = [v for c in clips for v in (video.mmaction_three_crop(c, self.crop) if three
                                            else [video.center_crop(c, self.crop)])]
        return torch.stack([normalize(v) for v in views]), label, index


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
            raise config_lib.InputError(f"--dataset {args.dataset}: --{flag.replace('_', '-')} is required")
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
        raise config_lib.InputError(f"--class-names {args.class_names or args.dataset}: {len(names)} names for "
                                    f"{args.num_classes} classes")
    args.class_name_list = names or [str(i) for i in range(args.num_classes)]
    return args


# ----------------------------------------------------------------------------------------------
# Optimisation (spec §4-5)


def build_optimizer(model, args):
    """AdamW; head at lr, every other trainable ('backbone') tensor at lr x backbone_lr_mult."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            key, mult, wd = "head", 1.0, args.wd
        elif args.mode == "full" and "relative_position_bias_table" in name:
            # clean: backbone lr, no decay; --official-paramwise: mmcv longest-key rule gives lr x1.0
            key, mult, wd = "bias_table", (1.0 if args.official_paramwise else args.backbone_lr_mult), 0.0
        elif args.mode == "full" and p.ndim == 1 and ("norm" in name) and not args.official_paramwise:
            key, mult, wd = "backbone_norm", args.backbone_lr_mult, 0.0
        else:
            key, mult, wd = "backbone", args.backbone_lr_mult, args.wd
        g = groups.setdefault(key, {"params": [], "lr_mult": mult, "weight_decay": wd, "name": key})
        g["params"].append(p)
    for g in groups.values():
        g["lr"] = args.lr * g["lr_mult"]
    return torch.optim.AdamW(list(groups.values()), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.wd)


def lr_factor(it, iters_per_epoch, args):
    """Cosine (per epoch by default, min 0) times mmcv linear warmup from warmup_ratio over
    W = warmup_epochs * len(loader) loader iterations: lr = lr_reg * (1 - (1 - it/W)(1 - ratio))."""
    e = it // iters_per_epoch if args.sched_by == "epoch" else it / iters_per_epoch
    f = 0.5 * (1 + math.cos(math.pi * e / args.epochs))
    warm = args.warmup_epochs * iters_per_epoch
    if it < warm:
        f *= 1 - (1 - it / warm) * (1 - args.warmup_ratio)
    return f


def set_lr(optimizer, base_lr, factor):
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g["lr_mult"] * factor


def trainable_state(model, everything=False):
    """What a checkpoint stores: the trainable tensors (everything in full FT, or when the frozen
    backbone cannot be rebuilt from --weights: --from-scratch, --synthetic)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if everything or k in names}


def save_training_state(path, model, optimizer, scaler, epoch, step, best, args):
    ckpt_lib.atomic_save({"model": trainable_state(model, everything=not args.weights),
                          "optimizer": optimizer.state_dict(),
                          "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch, "step": step,
                          "best_metric": best, "rng": ckpt_lib.rng_state(),
                          "mode": args.mode, "num_classes": args.num_classes}, path)


def load_training_state(path, model, optimizer=None, scaler=None, trust=False):
    """Restore trainable tensors (+ optimizer/scaler/RNG). The frozen backbone comes from --weights."""
    ck = ckpt_lib.safe_load(path, what="checkpoint", trust=trust)
    if not isinstance(ck, dict) or "model" not in ck:
        raise ckpt_lib.CheckpointError(f"{path} is not a train_uas.py checkpoint (no 'model' key)")
    own = model.state_dict()
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(own) <= set(ck["model"]):  # a full state (backbone not from --weights)
        expected = set(own)
    missing = sorted(expected - set(ck["model"]))
    unexpected = sorted(set(ck["model"]) - set(own))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in ck["model"].items()
              if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ckpt_lib.CheckpointError(
            f"{path} does not fit this model (checkpoint mode={ck.get('mode')}, classes={ck.get('num_classes')}): "
            f"missing {missing[:6]} unexpected {unexpected[:6]} shape mismatches {shapes[:6]}")
    model.load_state_dict({k: v for k, v in ck["model"].items() if k in expected}, strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(ck["optimizer"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    if optimizer is not None and ck.get("rng"):
        ckpt_lib.set_rng_state(ck["rng"])
    return ck


def train_one_epoch(model, loader, optimizer, scaler, args, env, epoch, step, iters_per_epoch):
    """One pass over the loader; optimizer steps every accum_steps loader iterations counted globally
    (a window may cross the epoch boundary, spec §4). Returns (mean loss, new global step, skipped)."""
    raw = model.module if hasattr(model, "module") else model
    if args.mode == "probe" and args.lp_backbone_mode == "eval":
        raw.eval()
        raw.head_drop.train()
    else:
        raw.train()
    loss_sum, n_seen, skipped = 0.0, 0, 0
    amp_dtype = torch.float16 if args.amp_dtype == "fp16" else torch.bfloat16
    for batch, n_bad in log_lib.progress(loader, desc=f"epoch {epoch}"):
        skipped += n_bad
        if batch is None:
            step += 1
            continue
        clips, labels, _ = batch
        clips, labels = clips.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        set_lr(optimizer, args.lr, lr_factor(step, iters_per_epoch, args))
        with torch.autocast(env.device.type, dtype=amp_dtype, enabled=args.use_amp):
            loss = F.cross_entropy(model(clips), labels)
        (scaler.scale(loss / args.accum_steps) if scaler is not None else loss / args.accum_steps).backward()
        if step == 0 and args.mode == "lora":  # spec §10.1: module-level LoRA would be a silent no-op
            dead = [n for n, p in raw.named_parameters() if ".lora_" in n and p.grad is None]
            if dead:
                raise RuntimeError(f"LoRA adapters received no gradient after the first backward: {dead[:4]}")
        step += 1
        if step % args.accum_steps == 0:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.item() * labels.shape[0]
        n_seen += labels.shape[0]
    skipped = int(round(dist.all_reduce_mean(skipped) * dist.world_size()))  # summed over ranks
    return dist.all_reduce_mean(loss_sum / max(n_seen, 1)), step, skipped


@torch.no_grad()
def evaluate(model, loader, args, env):
    """Eval mode; softmax per view, mean of probabilities per video. Returns (scores N x C, labels, skipped)."""
    raw = model.module if hasattr(model, "module") else model
    raw.eval()
    all_scores, all_labels, all_idx, skipped = [], [], [], 0
    for batch, n_bad in log_lib.progress(loader, desc="eval"):
        skipped += n_bad
        if batch is None:
            continue
        views, labels, idx = batch  # (B, V, C, L, H, W)
        b, v = views.shape[:2]
        flat = views.flatten(0, 1)
        probs = []
        for i in range(0, flat.shape[0], args.views_per_forward):
            x = flat[i:i + args.views_per_forward].to(env.device, non_blocking=True)
            probs.append(F.softmax(raw(x).float(), dim=1).cpu())
        all_scores.append(torch.cat(probs).view(b, v, -1).mean(1))
        all_labels.append(labels)
        all_idx.append(idx)
    if all_scores:
        idx, scores, labels = torch.cat(all_idx), torch.cat(all_scores), torch.cat(all_labels)
    else:
        idx, scores, labels = torch.zeros(0, dtype=torch.long), torch.zeros(0, args.num_classes), torch.zeros(0, dtype=torch.long)
    idx, scores, labels = dist.gather_eval(idx, scores, labels)
    skipped = int(round(dist.all_reduce_mean(skipped) * dist.world_size()))
    return scores, labels, idx, skipped


def mean_class_accuracy_mmaction(pred, labels):
    """mmaction quirk (spec §6): average over the union of GT and predicted labels (absent class = 0)."""
    classes = torch.unique(torch.cat([pred, labels]))
    accs = [((pred == c) & (labels == c)).sum().item() / max((labels == c).sum().item(), 1) for c in classes]
    return float(np.mean(accs)) if accs else float("nan")


def compute_metrics(scores, labels, num_classes, mca_mode="gt"):
    pred = scores.argmax(1)
    top = metrics.topk_accuracy(scores, labels, ks=(1, 5))
    mca = (metrics.mean_class_accuracy(pred, labels, num_classes) if mca_mode == "gt"
           else mean_class_accuracy_mmaction(pred, labels))
    return {"top1": top[1], "top5": top[5], "mean_class": mca,
            "mAP": metrics.mean_average_precision(scores, labels, num_classes), "n_videos": int(labels.numel())}


# ----------------------------------------------------------------------------------------------
# CLI


def int_list(n):
    """'2,2,18,2' (CLI) or [2, 2, 18, 2] (config file) -> list of n ints (n = 0: any length)."""
    def parse(s):
        vals = [int(v) for v in (s if isinstance(s, (list, tuple)) else re.split(r"[,\s]+", str(s).strip())) if v != ""]
        if n and len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated integers, got {s!r}")
        return vals
    parse.__name__ = "int_list"
    return parse


def get_parser():
    p = argparse.ArgumentParser(description="UAS: Video Swin-B linear probe / LoRA for animal behaviour (specs/uas.md)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config_lib.add_common_args(p, data_root="data", output_dir="runs/uas", epochs=30, batch_size=None, lr=3e-4,
                               seed=0, workers=4)
    helps = {"epochs": "training epochs (official 30)", "lr": "head learning rate (backbone/LoRA: x --backbone-lr-mult)",
             "seed": "random seed", "batch_size": "loader batch per process (preset: 1; chimpbehave 2)",
             "amp": "no-op kept for the common CLI: AMP is on by default on GPU (fp16 + GradScaler; --no-amp, --amp-dtype)"}
    for a in p._actions:
        if a.dest in helps:
            a.help = helps[a.dest]
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mammalnet", choices=["mammalnet", "chimpbehave", "k700diff", "custom"],
                   help="preset of lists/roots/class count (explicit flags win)")
    g.add_argument("--train-root", default="", help="video root of the train list (preset: relative to --data-root)")
    g.add_argument("--val-root", default="", help="video root of the val/test lists")
    g.add_argument("--train-list", default="")
    g.add_argument("--val-list", default="")
    g.add_argument("--test-list", default="")
    g.add_argument("--num-classes", type=int, default=None, help="preset: mammalnet 12, chimpbehave 7, k700diff 103")
    g.add_argument("--class-names", default="", help="file, line i = name of label i (reports only)")
    g.add_argument("--clip-len", type=int, default=32)
    g.add_argument("--frame-interval", type=int, default=None, help="train tau (preset: 2; chimpbehave 1)")
    g.add_argument("--test-frame-interval", type=int, default=None,
                   help="test tau (default = train tau; --official chimpbehave: 2)")
    g.add_argument("--test-clips", type=int, default=None, help="preset: 4 (chimpbehave 1)")
    g.add_argument("--test-crops", type=int, default=3, help="3 = ThreeCrop, 1 = centre crop")
    g.add_argument("--views-per-forward", type=int, default=2, help="memory only")
    g.add_argument("--short-side", type=int, default=256, help="train/val resize of the short side")
    g.add_argument("--crop-size", type=int, default=224)
    g.add_argument("--test-short-side", type=int, default=224)
    g.add_argument("--rrc-min-area", type=float, default=0.08, help="RandomResizedCrop smallest area fraction")
    g.add_argument("--limit-train", type=int, default=0, help="use only the first N train videos (debug)")
    g.add_argument("--limit-test", type=int, default=0, help="use only the first N val/test videos (debug)")
    g = p.add_argument_group("model")
    g.add_argument("--mode", default="probe", choices=["probe", "lp", "lora", "full"],
                   help="probe (= lp, the UAS mode): head only; lora: q/v adapters + head; full: everything")
    g.add_argument("--embed-dim", type=int, default=128)
    g.add_argument("--depths", type=int_list(0), default=[2, 2, 18, 2], help="comma-separated blocks per stage")
    g.add_argument("--num-heads", type=int_list(0), default=[4, 8, 16, 32])
    g.add_argument("--window-size", type=int_list(3), default=[8, 7, 7])
    g.add_argument("--patch-size", type=int_list(3), default=[2, 4, 4])
    g.add_argument("--drop-path", type=float, default=0.2)
    g.add_argument("--head-dropout", type=float, default=0.5)
    g.add_argument("--lora-rank", type=int, default=32)
    g.add_argument("--lora-alpha", type=float, default=None, help="default = rank, so scale alpha/rank = 1")
    g.add_argument("--lora-init", default="standard", choices=["standard", "intended", "official"])
    g.add_argument("--lora-impl", default="fused", choices=["fused", "weight"],
                   help="fused: qkv via common.ops.lora_linear; weight: W_eff handed to torchvision's functional")
    g.add_argument("--merge-lora", action="store_true",
                   help="at the end write model_merged.pth: LoRA folded into qkv (plain torchvision keys), checked")
    g.add_argument("--merge-lora-eval", action="store_true", help="evaluate with merged weights (speed only)")
    g.add_argument("--lp-backbone-mode", default="eval", choices=["eval", "train"],
                   help="probe: frozen backbone in eval (clean) or train mode (official: drop path on)")
    g.add_argument("--print-params", action="store_true", help="print trainable-parameter counts and exit")
    g = p.add_argument_group("optimisation")
    g.add_argument("--wd", type=float, default=0.05)
    g.add_argument("--backbone-lr-mult", type=float, default=0.1)
    g.add_argument("--warmup-epochs", type=float, default=2.5)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--sched-by", default="epoch", choices=["epoch", "iter"])
    g.add_argument("--accum-steps", type=int, default=8, help="loader iterations per optimizer step")
    g.add_argument("--no-amp", action="store_true", help="disable AMP (on by default on GPU; never on CPU)")
    g.add_argument("--amp-dtype", default="fp16", choices=["fp16", "bf16"])
    g.add_argument("--official-paramwise", action="store_true", help="full FT: mmcv paramwise rules (spec §5)")
    g.add_argument("--mca-mode", default="gt", choices=["gt", "mmaction"])
    g.add_argument("--official", action="store_true",
                   help="lora-init official, lp-backbone-mode train, mca-mode mmaction, official-paramwise, "
                        "chimpbehave test tau 2")
    g.add_argument("--val-every", type=int, default=0, help="validate every N epochs (0 = never, official)")
    g.add_argument("--test-checkpoint", default="last", choices=["last", "best"],
                   help="test the final epoch (official, test=val for two datasets) or best.pth (needs --val-every)")
    g.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    g = p.add_argument_group("synthetic (--synthetic)")
    g.add_argument("--synth-classes", type=int, default=6)
    g.add_argument("--synth-per-class", type=int, default=24, help="videos per class (train; val/test get 1/3)")
    g.add_argument("--synth-frames", type=int, default=24)
    g.add_argument("--synth-size", type=int, default=40, help="frame height (width = 1.25 x)")
    g.add_argument("--synth-seed", type=int, default=1234)
    for a in p._actions:  # so that --help shows every default
        if a.help is None:
            a.help = "-"
    return p


def finalize_args(args):
    if args.mode == "lp":
        args.mode = "probe"
    if args.official:
        args.lora_init, args.lp_backbone_mode, args.mca_mode, args.official_paramwise = \
            "official", "train", "mmaction", True
    return args


def print_params(model, args, file=None):
    c = count_params(model)
    print(f"[params] mode={args.mode} classes={args.num_classes}: trainable {c['trainable']:,} "
          f"(head {c['head']:,}, lora {c['lora']:,}), frozen {c['frozen']:,}, total {c['total']:,}", file=file)
    return c


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "convert-weights":
        return convert_weights_cli(argv[1:])
    if argv and argv[0] == "demo":
        return demo(argv[1:])
    if argv and argv[0] == "k700diff-lists":
        return k700diff_lists_cli(argv[1:])
    args = finalize_args(config_lib.parse_args(get_parser(), argv))
    if args.print_params:
        if args.num_classes is None:
            args.num_classes = PRESETS.get(args.dataset, {}).get("num_classes")
            if args.num_classes is None:
                raise config_lib.InputError("--print-params with --dataset custom needs --num-classes")
        model = build_model(args, args.num_classes)
        if args.mode == "lora":
            add_lora(model, args.lora_rank, args.lora_alpha, args.lora_init, args.lora_impl)
        set_trainable(model, args.mode)
        print_params(model, args)
        return count_params(model)
    return train(args)


def train(args):
    """One run: data -> model -> (train) -> test. Returns the results dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    config_lib.require_weights(args, "the Swin3D backbone")
    env = dist.setup(args.device)
    dist.seed_everything(args.seed)  # same model init (head, adapters, random backbone) on every rank
    args = resolve_data(args)
    args.use_amp = env.device.type == "cuda" and not args.no_amp
    out = Path(args.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plots").mkdir(exist_ok=True)
        flags = {a.dest for a in get_parser()._actions} | {"config"}
        config_lib.save_config(argparse.Namespace(**{k: v for k, v in vars(args).items() if k in flags}), out)

    kw = dict(clip_len=args.clip_len, short_side=args.short_side, crop_size=args.crop_size,
              test_short_side=args.test_short_side, strict=args.strict, seed=args.seed, min_area=args.rrc_min_area)
    train_set = VideoListDataset(args.train_root, args.train_list, args.num_classes, "train",
                                 frame_interval=args.frame_interval, limit=args.limit_train, **kw)
    test_set = VideoListDataset(args.val_root, args.test_list, args.num_classes, "test",
                                frame_interval=args.test_frame_interval, test_clips=args.test_clips,
                                test_crops=args.test_crops, limit=args.limit_test, **kw)
    val_set = (VideoListDataset(args.val_root, args.val_list, args.num_classes, "val",
                                frame_interval=args.frame_interval, limit=args.limit_test, **kw)
               if args.val_every else None)
    if env.is_main:
        print(f"[data] train {len(train_set)} videos, class histogram {train_set.class_histogram()}")
        print(f"[data] test {len(test_set)} videos x {args.test_clips} clips x {args.test_crops} crops")
    collate = video.collate_skip_none
    train_loader = dist.make_loader(train_set, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed,
                                    collate_fn=collate)
    test_loader = dist.make_loader(test_set, 1, shuffle=False, workers=args.workers, collate_fn=collate)
    val_loader = (dist.make_loader(val_set, args.batch_size, shuffle=False, workers=args.workers, collate_fn=collate)
                  if val_set else None)

    model = prepare_model(args, args.num_classes).to(env.device)
    if env.distributed:
        dist.seed_everything(args.seed + env.rank)  # then per-rank dropout / drop-path draws
    counts = print_params(model, args) if env.is_main else count_params(model)
    if env.is_main:
        (out / "trainable_params.txt").write_text(
            f"{counts['trainable']}\n" + "\n".join(n for n, p in model.named_parameters() if p.requires_grad) + "\n")
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda") if (args.use_amp and args.amp_dtype == "fp16") else None
    start_epoch, step, best = 0, 0, None
    resume = ckpt_lib.resolve_resume(args.resume, out)
    if resume is not None:
        ck = load_training_state(resume, model, None if args.eval_only else optimizer,
                                 None if args.eval_only else scaler, trust=args.trust_checkpoint)
        start_epoch, step, best = ck["epoch"], ck["step"], ck.get("best_metric")
        if env.is_main:
            print(f"[resume] {resume}: epoch {start_epoch}, step {step}")
    elif args.eval_only:
        raise config_lib.InputError("--eval-only needs --resume CKPT (or 'auto' with a checkpoint in --output-dir)")
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index]
                                                           if env.device.type == "cuda" else None)
                 if env.distributed else model)

    logger = log_lib.JsonlLogger(out / "log.jsonl")
    iters_per_epoch = max(len(train_loader), 1)
    t0, train_time = time.time(), 0.0
    for epoch in range(start_epoch, 0 if args.eval_only else args.epochs):
        train_set.epoch = epoch
        dist.set_epoch(train_loader, epoch)
        te = time.time()
        loss, step, skipped = train_one_epoch(ddp_model, train_loader, optimizer, scaler, args, env, epoch, step,
                                              iters_per_epoch)
        train_time += time.time() - te
        rec = {"epoch": epoch + 1, "train_loss": loss, "step": step, "skipped_videos": skipped,
               "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}, "epoch_time_s": time.time() - te}
        if scaler is not None:
            rec["amp_scale"] = scaler.get_scale()
        if val_loader is not None and (epoch + 1) % args.val_every == 0:
            scores, labels, _, vskip = evaluate(ddp_model, val_loader, args, env)
            vm = compute_metrics(scores, labels, args.num_classes, args.mca_mode)
            rec.update({f"val_{k}": v for k, v in vm.items()}, val_skipped=vskip)
            if best is None or vm["top1"] > best:
                best = vm["top1"]
                if env.is_main:
                    save_training_state(out / "best.pth", model, optimizer, scaler, epoch + 1, step, best, args)
        if env.is_main:
            save_training_state(out / "checkpoint.pth", model, optimizer, scaler, epoch + 1, step, best, args)
            if skipped:
                print(f"[data] epoch {epoch + 1}: skipped {skipped} undecodable videos")
            print(f"[epoch {epoch + 1}/{args.epochs}] loss {loss:.4f} lr {rec['lr']}"
                  + (f" val top1 {rec['val_top1']:.4f}" if "val_top1" in rec else ""))
        logger.log(rec)

    if args.test_checkpoint == "best" and not args.eval_only:
        if not (out / "best.pth").is_file():
            raise config_lib.InputError("--test-checkpoint best needs --val-every > 0 (no best.pth was written)")
        load_training_state(out / "best.pth", model, trust=args.trust_checkpoint)
    eval_model = model
    if args.merge_lora_eval and args.mode == "lora":
        import copy
        eval_model = merge_lora(copy.deepcopy(model))
    scores, labels, idx, skipped = evaluate(eval_model, test_loader, args, env)
    results = compute_metrics(scores, labels, args.num_classes, args.mca_mode)
    results.update(views=args.test_clips * args.test_crops, trainable_params=counts["trainable"],
                   skipped_videos=skipped, train_hours=train_time / 3600, wall_s=time.time() - t0, mode=args.mode)
    if env.is_main:
        write_test_outputs(out, scores, labels, idx, test_set, results, args)
        if args.merge_lora and args.mode == "lora":
            export_merged(model, out / "model_merged.pth", args, env.device)
        print("[test] " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
    dist.cleanup()
    return results


def write_test_outputs(out, scores, labels, idx, test_set, results, args):
    np.save(out / "test_scores.npy", scores.numpy())
    pred = scores.argmax(1)
    with open(out / "test_preds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "pred", "top5"])
        for i, lab, pr, sc in zip(idx.tolist(), labels.tolist(), pred.tolist(), scores):
            w.writerow([test_set.items[i][0], lab, pr, " ".join(map(str, sc.topk(min(5, sc.numel())).indices.tolist()))])
    log_lib.write_json(out / "results.json", results)
    if labels.numel():
        cm = metrics.confusion_matrix(pred, labels, args.num_classes)
        log_lib.plot_confusion(cm, out / "plots" / "confusion.png", class_names=args.class_name_list,
                               title=f"UAS {args.mode}: confusion (test)")
        pc = metrics.per_class_accuracy(pred, labels, args.num_classes)
        log_lib.plot_bars(pc.nan_to_num(0).tolist(), out / "plots" / "per_class_accuracy.png",
                          labels=args.class_name_list, title=f"UAS {args.mode}: per-class accuracy", ylabel="recall")
    recs = log_lib.read_jsonl(out / "log.jsonl") if (out / "log.jsonl").is_file() else []
    if recs:
        log_lib.plot_curves(recs, out / "plots" / "train_loss.png", keys=["train_loss"], title="UAS train loss")


@torch.no_grad()
def export_merged(model, path, args, device):
    """LoRA folded into qkv -> plain torchvision Swin3D state dict; checked against the unmerged model."""
    import copy
    merged = merge_lora(copy.deepcopy(model)).eval()
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, min(args.clip_len, 16), args.crop_size, args.crop_size, generator=g).to(device)
    diff = (merged(x) - model(x)).abs().max().item()
    ckpt_lib.atomic_save(merged.state_dict(), path)
    print(f"[export] {path}: LoRA merged into qkv; max |logit diff| merged vs adapters = {diff:.2e}")
    return diff


def convert_weights_cli(argv):
    p = argparse.ArgumentParser(prog="train_uas.py convert-weights",
                                description="any known Swin3D weights layout (Video-Swin release, mmaction2 0.x/1.x, "
                                            "torchvision) -> a tensors-only file in torchvision Swin3D keys")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--drop-head", action="store_true", help="do not keep cls_head.fc_cls as head.*")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="DANGEROUS: read INPUT with the full unpickler (it can run code from the file); only for a "
                        "file you trust. OUTPUT holds tensors only and loads safely")
    a = p.parse_args(argv)
    state = read_state_dict(a.input, trust=a.trust_checkpoint)
    if a.drop_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    known = re.compile(r"^(patch_embed\.|norm\.|head\.|features\.\d+\.)")
    unknown = [k for k in state if not known.match(k)]
    ckpt_lib.atomic_save(state, a.output)
    print(f"[convert] {a.input} -> {a.output}: {len(state)} tensors"
          + (f"; {len(unknown)} keys without a torchvision counterpart kept as-is: {unknown[:6]}" if unknown else ""))
    return state


def k700diff_lists_cli(argv):
    p = argparse.ArgumentParser(prog="train_uas.py k700diff-lists",
                                description="Kinetics-700 annotation CSV (label,youtube_id,time_start,time_end,split) "
                                            "-> K700-diff list file of the 103 classes (label = alphabetical index)")
    p.add_argument("csv")
    p.add_argument("video_root", help="downloader layout <class>/<youtube_id>_<start:06d>_<end:06d>.mp4")
    p.add_argument("output")
    p.add_argument("--keep-missing", action="store_true", help="list videos that are not on disk too")
    a = p.parse_args(argv)
    return make_k700diff_list(a.csv, a.video_root, a.output, keep_missing=a.keep_missing)


def make_k700diff_list(csv_path, video_root, output, keep_missing=False):
    """Keep the CSV rows whose label is one of the 103 K700-diff classes (exact mmaction spelling);
    report videos missing under video_root. Returns (n_written, missing paths)."""
    label_of = {name: i for i, name in enumerate(K700_DIFF_CLASSES)}
    lines, missing = [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"label", "youtube_id", "time_start", "time_end"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: expected columns {sorted(need)} (+ split), got {reader.fieldnames}")
        for row in reader:
            name = row["label"].strip().strip('"')
            if name not in label_of:
                continue
            rel = f"{name}/{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}.mp4"
            if not (Path(video_root) / rel).is_file():
                missing.append(rel)
                if not keep_missing:
                    continue
            lines.append(f"{rel} {label_of[name]}")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text("\n".join(lines) + ("\n" if lines else ""))
    print(f"[k700diff] {output}: {len(lines)} videos of {len({ln.rsplit(None, 1)[1] for ln in lines})} classes; "
          f"{len(missing)} missing under {video_root}" + (f" (first: {missing[:3]})" if missing else ""))
    return len(lines), missing


# ----------------------------------------------------------------------------------------------
# Offline demo: probe vs LoRA from random init on synthetic behaviour clips (reduced Swin3D)

DEMO_MODEL = ["--embed-dim", "32", "--depths", "2,2", "--num-heads", "2,4", "--window-size", "4,4,4",
              "--patch-size", "2,4,4", "--drop-path", "0.1"]
DEMO_DATA = ["--synth-classes", "6", "--synth-per-class", "24", "--synth-frames", "24", "--synth-size", "40",
             "--clip-len", "8", "--frame-interval", "2", "--short-side", "40", "--crop-size", "32",
             "--test-short-side", "32", "--rrc-min-area", "0.3", "--test-clips", "2", "--test-crops", "3",
             "--views-per-forward", "6"]


def demo(argv):
    """Probe vs LoRA from random init on synthetic behaviour clips (PyAV files, cached), reduced Swin3D,
    through the same train() path as real data; writes <output-dir>/summary.json and prints the table."""
    p = argparse.ArgumentParser(prog="train_uas.py demo", description=demo.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="runs/uas_demo")
    p.add_argument("--data-root", default="runs/uas_demo/data", help="cache of the generated clips (reused)")
    p.add_argument("--seeds", type=int_list(0), default=[0, 1])
    p.add_argument("--methods", default="probe,lora")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--backbone-lr-mult", type=float, default=1.0)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", default="", help="more train flags, e.g. '--synth-per-class 16'")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start, c_start = time.time(), time.process_time()
    rows = []
    for method in a.methods.split(","):
        for seed in a.seeds:
            out = Path(a.output_dir) / f"{method}_seed{seed}"
            flags = ["--synthetic", "--data-root", a.data_root, "--output-dir", str(out), "--mode", method,
                     "--seed", str(seed), "--epochs", str(a.epochs), "--lr", str(a.lr),
                     "--backbone-lr-mult", str(a.backbone_lr_mult), "--lora-rank", str(a.lora_rank),
                     "--batch-size", "8", "--accum-steps", "1", "--warmup-epochs", "1", "--workers", "0",
                     "--device", "cpu", *DEMO_DATA, *DEMO_MODEL, *a.extra.split()]
            print(f"\n=== {method} seed {seed} ===")
            t0, c0 = time.time(), time.process_time()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="skipping bad video")
                r = train(finalize_args(config_lib.parse_args(get_parser(), flags)))
            rows.append({"method": method, "seed": seed, "top1": r["top1"], "top5": r["top5"],
                         "mean_class": r["mean_class"], "mAP": r["mAP"], "trainable_params": r["trainable_params"],
                         "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)})
    out = Path(a.output_dir)
    log_lib.write_summary(out / "summary.json", rows)
    print("\n" + log_lib.summary_table(rows, ["top1", "top5", "mean_class", "mAP"]))
    print(f"\ntrainable parameters: " + ", ".join(sorted({f"{r['method']} {r['trainable_params']:,}" for r in rows})))
    full = VideoSwin(103)
    add_lora(full)
    for mode in ("probe", "lora"):
        set_trainable(full, mode)
        print(f"full Swin-B, 103 classes, {mode}: {count_params(full)['trainable']:,} trainable")
    print(f"demo total: wall {time.time() - t_start:.0f} s, process CPU {time.process_time() - c_start:.0f} s")
    return rows


if __name__ == "__main__":
    config_lib.run_main(main)
