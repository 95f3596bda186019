"""Atomic checkpoints, exact resume (model/optimizer/scheduler/scaler/epoch/step/best/RNG) and
pretrained-weight loading with errors that name the mismatched keys.

`model`, `optimizer` and `scheduler` may each be one object or a dict name -> object (LNTL keeps
f+g and three heads with four optimisers).
"""
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.config import InputError


class CheckpointError(InputError, RuntimeError):
    pass


def atomic_save(obj, path):
    """torch.save to a temp file in the same directory, then os.replace: a crash never leaves a
    truncated file in place of a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state():
    # numpy's MT19937 state as tensors/ints so the checkpoint loads with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def set_rng_state(state):
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(m):
    return m.module if hasattr(m, "module") else m


def _state(obj):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {k: _unwrap(v).state_dict() for k, v in obj.items()}
    return _unwrap(obj).state_dict()


def save_checkpoint(path, *, model, optimizer=None, scheduler=None, scaler=None, epoch, step=0,
                    best_metric=None, extra=None):
    """`epoch` = number of completed epochs (training resumes at this epoch index)."""
    atomic_save({
        "model": _state(model),
        "optimizer": _state(optimizer),
        "scheduler": _state(scheduler),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "best_metric": best_metric,
        "rng": rng_state(),
        "extra": extra,
    }, path)


def safe_load(path, *, what="checkpoint", map_location="cpu", trust=False):
    """torch.load with weights_only=True (never runs code from the file). Refusals and unreadable
    files are a CheckpointError naming the file; `trust=True` (--trust-checkpoint) uses the full
    unpickler for a file the user made and trusts."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{what} {path}: cannot be loaded safely ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); "
                              f"pass --trust-checkpoint only if you made this file yourself") from e


def read_checkpoint(path, map_location="cpu", *, trust=False):
    return safe_load(path, what="checkpoint", map_location=map_location, trust=trust)


def check_state_dict(model, state, where):
    """Raise CheckpointError naming missing / unexpected / shape-mismatched keys."""
    own = _unwrap(model).state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def short(xs):
            return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys [{short(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{short(unexpected)}]")
        if shapes:
            parts.append(f"shape mismatches [{short(shapes)}]")
        raise CheckpointError(f"{where} does not fit this model (is it from another model or config?): " + "; ".join(parts))


def load_checkpoint(path, *, model, optimizer=None, scheduler=None, scaler=None, map_location="cpu",
                    restore_rng=True, trust=False):
    ckpt = read_checkpoint(path, map_location, trust=trust)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint of this toolkit (no 'model' key)")
    if isinstance(model, dict):
        if not isinstance(ckpt["model"], dict) or set(ckpt["model"]) != set(model):
            raise CheckpointError(f"{path}: checkpoint holds modules {sorted(ckpt['model'])}, expected {sorted(model)}")
        for k, m in model.items():
            check_state_dict(m, ckpt["model"][k], f"{path} [{k}]")
            _unwrap(m).load_state_dict(ckpt["model"][k])
    else:
        check_state_dict(model, ckpt["model"], str(path))
        _unwrap(model).load_state_dict(ckpt["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        saved = ckpt.get(name)
        if saved is None:
            raise CheckpointError(f"{path} has no {name} state to resume from")
        if isinstance(obj, dict):
            for k, o in obj.items():
                if k not in saved:
                    raise CheckpointError(f"{path}: no {name} state for '{k}' (has {sorted(saved)})")
                o.load_state_dict(saved[k])
        else:
            obj.load_state_dict(saved)
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and ckpt.get("rng") is not None:
        set_rng_state(ckpt["rng"])
    return {"epoch": ckpt.get("epoch", 0), "step": ckpt.get("step", 0),
            "best_metric": ckpt.get("best_metric"), "extra": ckpt.get("extra")}


def resolve_resume(resume, output_dir):
    """'' -> None; 'auto' -> <output_dir>/checkpoint.pth if it exists; a path -> that path (must exist)."""
    if not resume:
        return None
    if resume == "auto":
        p = Path(output_dir) / "checkpoint.pth"
        return p if p.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise CheckpointError(f"--resume {resume}: file not found")
    return p


def load_weights(path, model, *, convert=None, strict=True, trust=False):
    """Load pretrained weights from a local file (never a download).

    Accepts a raw state_dict or a dict holding one under 'state_dict' / 'model'. `convert` maps a
    foreign layout to the model's key names. Shape mismatches are always an error; missing or
    unexpected keys are an error when `strict`, else returned as (missing, unexpected).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights {path}: file not found (weights are never downloaded; pass a local file)")
    state = safe_load(path, what="--weights", trust=trust)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"--weights {path}: expected a state_dict of tensors")
    if convert is not None:
        state = convert(state)
    own = _unwrap(model).state_dict()
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise CheckpointError(f"--weights {path}: shape mismatches [" + ", ".join(shapes[:8]) +
                              (f" ... (+{len(shapes) - 8} more)" if len(shapes) > 8 else "") + "]")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        check_state_dict(model, state, f"--weights {path}")
    _unwrap(model).load_state_dict(state, strict=False)
    return missing, unexpected

