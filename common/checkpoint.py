"""Atomic checkpoints, exact resume (model/optimizer/scheduler/scaler/epoch/step/best/RNG) and
pretrained-weight loading with errors that name the mismatched keys.

`model`, `optimizer` and `scheduler` may each be one object or a dict name -> object (LNTL keeps
f+g and three heads with four optimisers).
"""
import argparse
import codecs
import collections
import os
import pickle
import random
import re
import struct
import tempfile
import zipfile
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


def _allowed_globals():
    """Globals that official checkpoints and data files legitimately carry, by the name a pickle
    uses for them: numpy arrays/scalars/dtypes (mmaction `meta`, .npy annotation files; numpy 1.x
    pickles say `numpy.core.multiarray`, numpy 2.x `numpy._core.multiarray`), argparse.Namespace
    (official repos saving their args), collections.OrderedDict. Nothing here runs code of the
    file's choosing: each only rebuilds data."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray
    names = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype, "argparse.Namespace": argparse.Namespace,
             "collections.OrderedDict": collections.OrderedDict}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names[f"{module}._reconstruct"] = multiarray._reconstruct
        names[f"{module}.scalar"] = multiarray.scalar
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: the concrete dtype classes a dtype pickle builds
    for name in dir(dtypes) if dtypes is not None else ():
        if name.endswith("DType"):
            names[f"numpy.dtypes.{name}"] = getattr(dtypes, name)
    return names


ALLOWED_GLOBALS = _allowed_globals()
_ALLOWED_SUMMARY = "tensors, numpy arrays/scalars/dtypes, argparse.Namespace, OrderedDict"


def _torch_safe_globals():
    # an object is matched under its own module.name; another spelling of it (numpy 1.x vs 2.x
    # module) is registered as an (object, "name") pair
    return [obj if f"{obj.__module__}.{obj.__name__}" == name else (obj, name) for name, obj in ALLOWED_GLOBALS.items()]


def _refusal(what, path, name):
    return CheckpointError(
        f"{what} {path}: refused to load: it references the Python global '{name}', which is not on the "
        f"allow-list ({_ALLOWED_SUMMARY}) and could run code; if you made this file yourself and trust it, "
        f"rerun with --trust-checkpoint")


def _first_line(e):
    """A short reason from a loader's exception (torch's own messages run to paragraphs)."""
    text = str(e).strip()
    for pattern in (r"PytorchStreamReader failed [^.:]*", r"Unsupported operand \d+", r"pickle data was truncated",
                    r"invalid load key[^.]*"):
        m = re.search(pattern, text)
        if m:
            return m.group(0)
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


def safe_load(path, *, what="checkpoint", map_location="cpu", trust=False):
    """torch.load with weights_only=True plus the allow-list above (scoped to this call): never
    runs code from the file. A refused global, a truncated file or a non-checkpoint is one
    CheckpointError naming the file; `trust=True` (--trust-checkpoint) uses the full unpickler
    for a file the user made and trusts."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: file not found")
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the global: "Unsupported global: GLOBAL posix.system ...", "unsupported GLOBAL
        # posix.system whose module posix is blocked", "Can only build ... but got <class 'x.Y'>"
        m = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"but got <class '([\w.]+)'>", str(e))
        if m and not trust:
            raise _refusal(what, path, m.group(1)) from e
        raise CheckpointError(f"{what} {path}: truncated or not a torch checkpoint ({_first_line(e)})") from e
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            ImportError, zipfile.BadZipFile, struct.error) as e:
        # readable but wrong for this machine (permissions, a CUDA-only map location) vs. torn/foreign bytes
        if isinstance(e, PermissionError) or (isinstance(e, RuntimeError) and "device" in str(e)):
            raise CheckpointError(f"{what} {path}: cannot be read ({_first_line(e)})") from e
        raise CheckpointError(f"{what} {path}: truncated or not a torch checkpoint ({_first_line(e)})") from e


# plain pickles (unlike torch.save files) may also name these inert builtins; Python 2 pickles
# spell the module __builtin__; protocol-2 pickles made by Python 3 encode bytes with _codecs.encode
_PICKLE_BUILTINS = {f"{m}.{t.__name__}": t for m in ("builtins", "__builtin__")
                    for t in (set, frozenset, complex, bytearray, slice, range)}
_PICKLE_BUILTINS["_codecs.encode"] = codecs.encode


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS (the Python docs' "restricting globals")."""

    def __init__(self, f, what, path, **kw):
        super().__init__(f, **kw)
        self.what, self.path = what, path

    def find_class(self, module, name):
        obj = ALLOWED_GLOBALS.get(f"{module}.{name}") or _PICKLE_BUILTINS.get(f"{module}.{name}")
        if obj is None:
            raise _refusal(self.what, self.path, f"{module}.{name}")
        return obj


def safe_pickle_load(path, *, what="pickle file", encoding="ASCII", trust=False):
    """pickle.load of a data file (annotations, PYSKL .pkl) that builds only plain containers,
    numbers, strings and numpy arrays; anything else is refused with the global named."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: file not found")
    with open(path, "rb") as f:
        return _unpickle(f, what, path, encoding, trust)


def _unpickle(f, what, path, encoding, trust):
    try:
        if trust:
            return pickle.load(f, encoding=encoding)
        return _RestrictedUnpickler(f, what, path, encoding=encoding).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error) as e:
        raise CheckpointError(f"{what} {path}: truncated or not a pickle ({_first_line(e)})") from e


def safe_np_load(path, *, what="numpy file", encoding="ASCII", trust=False):
    """np.load(path, allow_pickle=True) without running code: an object array's pickle goes
    through the restricted unpickler (so does a bare pickle saved under a .npy name)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: file not found")
    with open(path, "rb") as f:
        if f.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            f.seek(0)
            return _unpickle(f, what, path, encoding, trust)
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            if not dtype.hasobject:
                f.seek(0)
                return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise CheckpointError(f"{what} {path}: truncated or not a .npy file ({_first_line(e)})") from e
        arr = _unpickle(f, what, path, encoding, trust)
        if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
            raise CheckpointError(f"{what} {path}: the header says an object array of shape {tuple(shape)}, "
                                  f"the data holds {type(arr).__name__}")
        return arr


def precheck(path, *, what="checkpoint", trust=False):
    """Refuse a torch.save zip whose pickle names a global outside the allow-list, or whose archive
    is torn, by reading only its pickle (no tensors, nothing executed). Other formats (legacy
    torch files, .safetensors) are left to the loader, which is just as strict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: file not found")
    with open(path, "rb") as f:
        if trust or f.read(2) != b"PK":
            return
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{what} {path}: truncated or not a torch checkpoint ({_first_line(e)})") from e
    if unsafe:
        raise _refusal(what, path, sorted(unsafe)[0])


def check_input_files(args):
    """Run by config.parse_args, before any work: --resume (a path; `auto` = <output-dir>/checkpoint.pth
    when present) and --weights exist and pass `precheck`. Raises CheckpointError (one line via
    config.run_main)."""
    trust = getattr(args, "trust_checkpoint", False)
    resume, weights = getattr(args, "resume", ""), getattr(args, "weights", "")
    if resume == "auto":
        auto = Path(getattr(args, "output_dir", "") or ".") / "checkpoint.pth"
        resume = str(auto) if auto.is_file() else ""
    if resume:
        precheck(resume, what="--resume", trust=trust)
    if weights:
        if not Path(weights).is_file():
            raise CheckpointError(f"--weights {weights}: file not found (weights are never downloaded; pass a local file)")
        precheck(weights, what="--weights", trust=trust)


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

