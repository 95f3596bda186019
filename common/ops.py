"""Fused ops used on the methods' hot paths (specs/kernels.md).

    static_clip(x, frame_idx=None, mean=None, std=None, *, scale=None, num_frames=-1, out_dtype=None)
    graph_aggregate(x, A)                     einsum('nkctv,kvw->nctw'), x may be (N,K*C,T,V)
    random_masking(noise, L_keep) -> (ids_keep, ids_restore, mask)
    masked_gather(x, ids_keep)                (N,L,D),(N,Lk) -> (N,Lk,D)
    masked_restore(y, ids_restore, mask_token)                -> (N,L,D)
    lora_linear(x, W, b, A, B, scale)         x W^T + b + s (x A^T) B^T, W and b frozen

Each op is a torch.library custom op in the `rar` namespace: schemas and CPU/CUDA kernels live in
csrc/ (compiled as `common._C`); this file adds the fake (meta) implementations and the autograd
formulas, and picks a backend per call:

    "ext"  the compiled kernels (default when `common._C` has kernels for the tensor's device)
    "ref"  the pure-PyTorch references in common/ops_reference.py

Override with set_backend("ref"|"ext"|"auto") or RAR_OPS_BACKEND. A missing extension gives ONE
RuntimeWarning at import (never inside a wrapper, that would break fullgraph compilation) and the
references are used; RAR_OPS_REQUIRE_EXT=1 turns the warning into an ImportError.
"""
import os
import warnings

import torch

from . import ops_reference as ref
from .ops_reference import random_masking  # noqa: F401  (plain torch, part of the API)

__all__ = ["static_clip", "graph_aggregate", "random_masking", "masked_gather", "masked_restore",
           "lora_linear", "set_backend", "get_backend", "has_ext", "BUILD_INFO"]

# ---- the compiled module -----------------------------------------------------------------------
_C = None
WITH_CUDA = False
BUILD_INFO = "common._C not built"
try:
    from . import _C  # importing registers the torch.ops.rar.* kernels
    WITH_CUDA = bool(_C.WITH_CUDA)
    BUILD_INFO = str(_C.BUILD_INFO)
except (ImportError, OSError) as e:
    if os.environ.get("RAR_OPS_REQUIRE_EXT", "0") == "1":
        raise ImportError(f"common._C could not be imported ({e}) and RAR_OPS_REQUIRE_EXT=1; "
                          "build it with `python setup.py build_ext --inplace`") from e
    _C = None
    warnings.warn(f"common._C is not available ({type(e).__name__}: {e}); the fused ops fall back to the "
                  "pure-PyTorch references (build with `python setup.py build_ext --inplace`)",
                  RuntimeWarning, stacklevel=2)
else:
    if torch.cuda.is_available() and not WITH_CUDA:
        if os.environ.get("RAR_OPS_REQUIRE_EXT", "0") == "1":
            raise ImportError("common._C was built without CUDA kernels but CUDA is available and "
                              "RAR_OPS_REQUIRE_EXT=1; rebuild with nvcc matching torch.version.cuda")
        warnings.warn("common._C was built without CUDA kernels; CUDA tensors use the pure-PyTorch "
                      f"references ({BUILD_INFO})", RuntimeWarning, stacklevel=2)

_BACKENDS = ("auto", "ext", "ref")
_backend = os.environ.get("RAR_OPS_BACKEND", "auto") or "auto"
if _backend not in _BACKENDS:
    raise ValueError(f"RAR_OPS_BACKEND={_backend!r}: expected one of {_BACKENDS}")
_DEBUG = os.environ.get("RAR_OPS_DEBUG", "0") == "1"


def has_ext(device_type="cpu"):
    """True when the compiled module has kernels for this device type."""
    return _C is not None and (device_type == "cpu" or (device_type == "cuda" and WITH_CUDA))


def set_backend(name):
    """"auto" (ext when available), "ext" (error if unavailable) or "ref" (pure PyTorch)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r}: expected one of {_BACKENDS}")
    if name == "ext" and _C is None:
        raise RuntimeError("backend 'ext' requested but common._C is not built")
    _backend = name


def get_backend():
    return _backend


def _use_ext(device):
    if _backend == "ref":
        return False
    ok = has_ext(device.type)
    if not ok and _backend == "ext":
        raise RuntimeError(f"rar ops: backend 'ext' requested but common._C has no kernels for {device.type}")
    return ok


def _autocast_dtype(device):
    """The autocast dtype when autocast is on for this device, else None (dynamo folds these)."""
    dev = device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _autocast_cast(t, dtype):
    # like autocast itself: floating tensors except fp64 are cast
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def _debug_checks_allowed(t):
    if not _DEBUG or torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _debug_check_unique(op, name, idx, upper):
    """RAR_OPS_DEBUG=1: host-side range and per-row uniqueness checks (the gradient contract)."""
    if idx.numel() == 0:
        return
    ref._check_index_range(op, name, idx, upper)
    s = idx.sort(dim=1).values
    valid = s < upper if op == "masked_restore" else torch.ones_like(s, dtype=torch.bool)
    dup = ((s[:, 1:] == s[:, :-1]) & valid[:, 1:]).any()
    ref._check(not bool(dup), op, f"{name} uniqueness", "a repeated index in a row",
               "distinct indices per row (true for MAE permutations)")


# ---- static_clip -------------------------------------------------------------------------------

def static_clip(x, frame_idx=None, mean=None, std=None, *, scale=None, num_frames=-1, out_dtype=None):
    """out[b,c,t] = cast((x[b,c,frame_idx[b]] * scale - mean_c) / std_c) for t < num_frames.

    x: (B,C,T_in,H,W) uint8/f16/bf16/f32/f64, any strides (a (B,T,C,H,W) batch goes in as
    x.permute(0,2,1,3,4)). frame_idx: int64 (B,) in [0, T_in), or None = normalise-only.
    scale=None means 1/255 for uint8 and 1 otherwise. out_dtype defaults to f32 for uint8 x.
    No autograd is needed by ALBAR (the output is made a fresh leaf); float x gets the exact
    gradient dx[b,c,f_b] = scale/std_c * sum_t dout[b,c,t].
    """
    mean = ref.as_float_list(mean, "static_clip", "mean")
    std = ref.as_float_list(std, "static_clip", "std")
    ref.check_static_clip(x, frame_idx, num_frames, mean, std, scale, out_dtype)
    if frame_idx is not None and _debug_checks_allowed(x):
        ref._check_index_range("static_clip", "frame_idx", frame_idx, x.shape[2])
    if _use_ext(x.device):
        return torch.ops.rar.static_clip(x, frame_idx, num_frames, mean, std,
                                         None if scale is None else float(scale), out_dtype)
    return ref.static_clip(x, frame_idx, mean, std, scale=scale, num_frames=num_frames, out_dtype=out_dtype)


# ---- graph_aggregate ---------------------------------------------------------------------------

def graph_aggregate(x, A):
    """out[n,c,t,w] = sum_k sum_v x[n,k,c,t,v] A[k,v,w] (ST-GCN++ unit_gcn aggregation).

    x: (N,K,C,T,V) or the flat conv output (N,K*C,T,V) (subset-major, channel k*C + c).
    A: (K,V,W) shared or (N,K,V,W) per sample; dtype x.dtype or fp32. Output (N,C,T,W), x.dtype.
    Under autocast x is cast to the autocast dtype and A stays fp32; accumulation is fp32.
    """
    x = ref.unflatten_graph_input(x, A)
    x = _autocast_cast(x, _autocast_dtype(x.device))
    ref.check_graph_aggregate(x, A)
    if _use_ext(x.device):
        return torch.ops.rar.graph_aggregate(x, A)
    return ref.graph_aggregate(x, A)


# ---- masked_gather / masked_restore ------------------------------------------------------------

def masked_gather(x, ids_keep):
    """y[n,j] = x[n, ids_keep[n,j]]; x (N,L,D), ids_keep (N,L_keep) int64 (rows distinct for grads)."""
    ref.check_masked_gather(x, ids_keep)
    if _debug_checks_allowed(x):
        _debug_check_unique("masked_gather", "ids_keep", ids_keep, x.shape[1])
    if _use_ext(x.device):
        return torch.ops.rar.masked_gather(x, ids_keep)
    return ref.masked_gather(x, ids_keep)


def masked_restore(y, ids_restore, mask_token):
    """out[n,i] = y[n, r] if r = ids_restore[n,i] < L_keep else mask_token; -> (N, L, D).

    mask_token: any shape with D elements (e.g. an nn.Parameter of shape (1,1,D)); it is cast to
    y's dtype and receives the sum of the gradients of the masked positions.
    """
    if isinstance(mask_token, torch.Tensor) and mask_token.is_floating_point() and y.is_floating_point():
        mask_token = mask_token.reshape(-1).to(y.dtype)
    ref.check_masked_restore(y, ids_restore, mask_token)
    if _debug_checks_allowed(y):
        _debug_check_unique("masked_restore", "ids_restore", ids_restore, y.shape[1])
    if _use_ext(y.device):
        return torch.ops.rar.masked_restore(y, ids_restore, mask_token)
    return ref.masked_restore(y, ids_restore, mask_token)


# ---- lora_linear -------------------------------------------------------------------------------

def lora_linear(x, W, b, A, B, scale):
    """y = x W^T + b + scale * (x A^T) B^T with W (N,K) and b (N,) frozen; A (r,K), B (N,r).

    Under autocast every floating input is cast to the autocast dtype, like F.linear.
    """
    op = "lora_linear"
    ref._check(not W.requires_grad, op, "W.requires_grad", True, "a frozen W (requires_grad=False)")
    if b is not None:
        ref._check(not b.requires_grad, op, "b.requires_grad", True, "a frozen b (requires_grad=False)")
    ad = _autocast_dtype(x.device)
    if ad is not None:
        x, W, b, A, B = (_autocast_cast(t, ad) for t in (x, W, b, A, B))
    ref.check_lora_linear(x, W, b, A, B)
    if _use_ext(x.device):
        return torch.ops.rar.lora_linear(x, W, b, A, B, float(scale))
    return ref.lora_linear(x, W, b, A, B, float(scale))


# ---- fakes and autograd (only when the compiled module registered the ops) --------------------

def _register_python_parts():
    lib = "rar::"

    @torch.library.register_fake(lib + "static_clip")
    def _(x, frame_idx, num_frames=-1, mean=None, std=None, scale=None, out_dtype=None):
        shape, o = ref.check_static_clip(x, frame_idx, num_frames, mean, std, scale, out_dtype)
        return x.new_empty(shape, dtype=o)

    @torch.library.register_fake(lib + "graph_aggregate")
    def _(x, A):
        return x.new_empty(ref.check_graph_aggregate(x, A))

    @torch.library.register_fake(lib + "graph_aggregate_grad_x")
    def _(grad_out, A):
        torch._check(grad_out.dim() == 4, lambda: "rar::graph_aggregate_grad_x: grad_out rank: expected 4-D")
        N, C, T, W = grad_out.shape
        K, V = A.shape[-3], A.shape[-2]
        torch._check(A.shape[-1] == W, lambda: "rar::graph_aggregate_grad_x: A.shape[-1] must equal grad_out W")
        return grad_out.new_empty((N, K, C, T, V))

    @torch.library.register_fake(lib + "graph_aggregate_grad_A")
    def _(grad_out, x, per_sample):
        torch._check(x.dim() == 5 and grad_out.dim() == 4,
                     lambda: "rar::graph_aggregate_grad_A: expected 4-D grad_out and 5-D x")
        N, K, C, T, V = x.shape
        W = grad_out.shape[-1]
        dt = torch.float32 if x.dtype in ref.HALF_DTYPES else x.dtype
        shape = (N, K, V, W) if per_sample else (K, V, W)
        return x.new_empty(shape, dtype=dt)

    @torch.library.register_fake(lib + "masked_gather")
    def _(x, ids_keep):
        return x.new_empty(ref.check_masked_gather(x, ids_keep))

    @torch.library.register_fake(lib + "masked_gather_backward")
    def _(grad_out, ids_keep, L):
        N, Lk, D = grad_out.shape
        return grad_out.new_empty((N, L, D))

    @torch.library.register_fake(lib + "masked_restore")
    def _(y, ids_restore, mask_token):
        return y.new_empty(ref.check_masked_restore(y, ids_restore, mask_token))

    @torch.library.register_fake(lib + "masked_restore_backward")
    def _(grad_out, ids_restore, L_keep, mask_token_grad):
        N, L, D = grad_out.shape
        return grad_out.new_empty((N, L_keep, D)), grad_out.new_empty((D,) if mask_token_grad else (0,))

    @torch.library.register_fake(lib + "lora_linear")
    def _(x, W, b, A, B, scale):
        return x.new_empty(ref.check_lora_linear(x, W, b, A, B))

    @torch.library.register_fake(lib + "lora_linear_backward")
    def _(grad_out, x, W, A, B, scale, need_dx):
        dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
        return dx, A.new_empty(A.shape), B.new_empty(B.shape)

    # -- autograd: setup_context saves only what the needed gradients use --
    def sc_setup(ctx, inputs, output):
        x, frame_idx, num_frames, mean, std, scale, out_dtype = inputs
        ctx.x_dtype, ctx.T_in = x.dtype, x.shape[2]
        ctx.scale = ref.static_clip_scale(x.dtype, scale)
        ctx.std = std
        ctx.save_for_backward(frame_idx if ctx.needs_input_grad[0] else None)

    def sc_backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        (frame_idx,) = ctx.saved_tensors
        cd = torch.float64 if torch.float64 in (g.dtype, ctx.x_dtype) else torch.float32
        C = g.shape[1]
        coef = [ctx.scale / s for s in ctx.std] if ctx.std is not None else [ctx.scale] * C
        coef = torch.tensor(coef, dtype=cd, device=g.device).view(1, C, 1, 1, 1)
        if frame_idx is None:
            dx = g.to(cd) * coef
        else:
            s = g.to(cd).sum(2, keepdim=True) * coef                       # (B,C,1,H,W)
            hit = torch.arange(ctx.T_in, device=g.device).view(1, 1, -1, 1, 1) == frame_idx.view(-1, 1, 1, 1, 1)
            dx = torch.where(hit, s, torch.zeros((), dtype=cd, device=g.device))
        return (dx.to(ctx.x_dtype),) + (None,) * 6

    torch.library.register_autograd(lib + "static_clip", sc_backward, setup_context=sc_setup)

    def ga_setup(ctx, inputs, output):
        x, A = inputs
        ctx.per_sample = A.dim() == 4
        ctx.A_dtype = A.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, A if ctx.needs_input_grad[0] else None)

    def ga_backward(ctx, g):
        x, A = ctx.saved_tensors
        dx = torch.ops.rar.graph_aggregate_grad_x(g, A) if ctx.needs_input_grad[0] else None
        dA = None
        if ctx.needs_input_grad[1]:
            dA = torch.ops.rar.graph_aggregate_grad_A(g, x, ctx.per_sample).to(ctx.A_dtype)
        return dx, dA

    torch.library.register_autograd(lib + "graph_aggregate", ga_backward, setup_context=ga_setup)

    def mg_setup(ctx, inputs, output):
        x, ids_keep = inputs
        ctx.L = x.shape[1]
        ctx.save_for_backward(ids_keep if ctx.needs_input_grad[0] else None)

    def mg_backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None
        (ids_keep,) = ctx.saved_tensors
        return torch.ops.rar.masked_gather_backward(g, ids_keep, ctx.L), None

    torch.library.register_autograd(lib + "masked_gather", mg_backward, setup_context=mg_setup)

    def mr_setup(ctx, inputs, output):
        y, ids_restore, mask_token = inputs
        ctx.L_keep = y.shape[1]
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        ctx.save_for_backward(ids_restore if need else None)

    def mr_backward(ctx, g):
        need_y, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_y or need_m):
            return None, None, None
        (ids_restore,) = ctx.saved_tensors
        dy, dm = torch.ops.rar.masked_restore_backward(g, ids_restore, ctx.L_keep, need_m)
        return (dy if need_y else None), None, (dm if need_m else None)

    torch.library.register_autograd(lib + "masked_restore", mr_backward, setup_context=mr_setup)

    def ll_setup(ctx, inputs, output):
        x, W, b, A, B, scale = inputs
        ctx.scale = scale
        need_ab = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        ctx.save_for_backward(x if need_ab else None, W, A, B)

    def ll_backward(ctx, g):
        x, W, A, B = ctx.saved_tensors
        need_dx, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        ref._check(not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]), "lora_linear", "gradient for W or b",
                   "requested", "W and b frozen (dW is not implemented)")
        dx = dA = dB = None
        if need_a or need_b:
            dx, dA, dB = torch.ops.rar.lora_linear_backward(g, x, W, A, B, ctx.scale, need_dx)
            if not need_dx:
                dx = None
        elif need_dx:  # adapters frozen too: plain torch, x is not needed
            dx = g @ W + ctx.scale * ((g @ B) @ A)
        return dx, None, None, (dA if need_a else None), (dB if need_b else None), None

    torch.library.register_autograd(lib + "lora_linear", ll_backward, setup_context=ll_setup)


if _C is not None:
    _register_python_parts()
