"""Pure-PyTorch references of the fused ops (specs/kernels.md).

These are the semantics the compiled kernels in csrc/ must reproduce, and the fallback used by
common/ops.py when the extension `common._C` is missing. The `check_*` functions only look at
metadata (shapes, dtypes, devices), so the same checks run in the wrappers, in the fake (meta)
implementations under torch.compile, and here. Error messages follow one format, identical to the
C++ TORCH_CHECKs:  rar::<op>: <what>: got ..., expected ...
"""
import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check(cond, op, what, got, expected):
    """RuntimeError 'rar::<op>: <what>: got ..., expected ...' when cond is False.

    With symbolic shapes (torch.compile dynamic=True) cond is a SymBool: torch._check turns it into
    a guard/runtime assert; its message may only close over constants, so it names op and what.
    """
    if isinstance(cond, torch.SymBool):
        torch._check(cond, lambda: f"rar::{op}: {what}: check failed")
    elif not cond:
        raise RuntimeError(f"rar::{op}: {what}: got {got}, expected {expected}")


def _check_device(op, name, t, ref_t):
    _check(t.device == ref_t.device, op, f"{name} device", t.device, f"{ref_t.device} (same device as the first input)")


def _is_compiling():
    return torch.compiler.is_compiling()


def _host_checks_allowed(t):
    """Data-dependent index checks: always on CPU in eager mode; never while tracing."""
    return t.device.type == "cpu" and not _is_compiling()


def _check_index_range(op, name, idx, hi):
    if idx.numel() == 0:
        return
    lo_v, hi_v = int(idx.min()), int(idx.max())
    _check(lo_v >= 0 and hi_v < hi, op, f"{name} out of range", f"values in [{lo_v}, {hi_v}]", f"values in [0, {hi})")


# --------------------------------------------------------------------------------------------
# static_clip
# --------------------------------------------------------------------------------------------

def as_float_list(v, op, name):
    """mean/std given as a sequence or a 1-D tensor -> list of python floats (or None)."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        _check(v.dim() == 1, op, f"{name} rank", f"{v.dim()}-D tensor", "a 1-D tensor of length C")
        return [float(e) for e in v.detach().cpu().tolist()]
    if isinstance(v, (int, float)):
        raise RuntimeError(f"rar::{op}: {name}: got a scalar {v!r}, expected a sequence of C floats "
                           f"(num_frames, scale and out_dtype are keyword-only)")
    return [float(e) for e in v]


def static_clip_out_dtype(x_dtype, out_dtype):
    if out_dtype is not None:
        return out_dtype
    return torch.float32 if x_dtype == torch.uint8 else x_dtype


def static_clip_scale(x_dtype, scale):
    if scale is not None:
        return float(scale)
    return 1.0 / 255.0 if x_dtype == torch.uint8 else 1.0


def check_static_clip(x, frame_idx, num_frames, mean, std, scale, out_dtype):
    """Metadata checks; returns the output shape (B, C, T, H, W)."""
    op = "static_clip"
    _check(x.dim() == 5, op, "x rank", f"{x.dim()}-D tensor of shape {tuple(x.shape)}", "a 5-D (B,C,T,H,W) tensor")
    _check(x.dtype in (torch.uint8,) + FLOAT_DTYPES, op, "x dtype", x.dtype, "uint8, float16, bfloat16, float32 or float64")
    B, C, T_in, H, W = x.shape
    if frame_idx is not None:
        _check(frame_idx.dtype == torch.int64, op, "frame_idx dtype", frame_idx.dtype, "torch.int64")
        _check(frame_idx.dim() == 1 and frame_idx.shape[0] == B, op, "frame_idx shape",
               tuple(frame_idx.shape), f"({B},) (one frame per sample)")
        _check_device(op, "frame_idx", frame_idx, x)
        _check(num_frames == -1 or num_frames >= 1, op, "num_frames", num_frames, "-1 (= T_in) or >= 1")
        T = T_in if num_frames == -1 else num_frames
    else:
        _check(num_frames == -1 or num_frames == T_in, op, "num_frames without frame_idx", num_frames,
               f"-1 or T_in = {T_in} (normalise-only mode keeps every frame)")
        T = T_in
    for name, v in (("mean", mean), ("std", std)):
        if v is not None:
            _check(len(v) == C, op, f"{name} length", len(v), f"C = {C}")
            _check(C <= 16, op, f"{name} with C channels", C, "C <= 16")
    if std is not None:
        _check(all(s > 0 for s in std), op, "std", list(std), "all std > 0")
    o = static_clip_out_dtype(x.dtype, out_dtype)
    _check(o in FLOAT_DTYPES + (torch.uint8,), op, "out_dtype", o, "float16, bfloat16, float32, float64 or uint8")
    if o == torch.uint8:
        pure = x.dtype == torch.uint8 and mean is None and std is None and static_clip_scale(x.dtype, scale) == 1.0
        _check(pure, op, "out_dtype uint8", f"x {x.dtype}, mean={mean}, std={std}, scale={scale}",
               "uint8 output only for pure tiling (uint8 x, no mean/std, scale=1)")
    return (B, C, T, H, W), o


def static_clip(x, frame_idx=None, mean=None, std=None, *, scale=None, num_frames=-1, out_dtype=None):
    """Reference: pick frame_idx[b] of every sample, x*scale, -mean, /std, cast, tile to T frames."""
    mean = as_float_list(mean, "static_clip", "mean")
    std = as_float_list(std, "static_clip", "std")
    shape, o = check_static_clip(x, frame_idx, num_frames, mean, std, scale, out_dtype)
    if frame_idx is not None and _host_checks_allowed(x):
        _check_index_range("static_clip", "frame_idx", frame_idx, x.shape[2])
    s = static_clip_scale(x.dtype, scale)
    B, C = x.shape[:2]
    if frame_idx is not None:
        frames = x[torch.arange(B, device=x.device), :, frame_idx]          # (B, C, H, W)
    else:
        frames = x                                                        # (B, C, T, H, W)
    if o == torch.uint8:
        y = frames
    else:
        cd = torch.float64 if (x.dtype == torch.float64 or o == torch.float64) else torch.float32
        y = frames.to(cd)
        if s != 1.0:
            y = y * s
        view = (C, 1, 1) if frame_idx is not None else (C, 1, 1, 1)
        if mean is not None:
            y = y - torch.tensor(mean, dtype=cd, device=x.device).view(view)
        if std is not None:
            y = y / torch.tensor(std, dtype=cd, device=x.device).view(view)
        y = y.to(o)
    if frame_idx is None:
        return y.contiguous()
    return y.unsqueeze(2).expand(shape).contiguous()


# --------------------------------------------------------------------------------------------
# graph_aggregate
# --------------------------------------------------------------------------------------------

def check_graph_aggregate(x, A):
    """x must be 5-D (N,K,C,T,V) here (the wrapper unflattens (N,K*C,T,V)); returns the output shape."""
    op = "graph_aggregate"
    _check(A.dim() in (3, 4), op, "A rank", f"{A.dim()}-D tensor of shape {tuple(A.shape)}", "(K,V,W) or per-sample (N,K,V,W)")
    _check(x.dim() == 5, op, "x rank", f"{x.dim()}-D tensor of shape {tuple(x.shape)}", "(N,K,C,T,V) or (N,K*C,T,V)")
    N, K, C, T, V = x.shape
    _check(A.shape[-3] == K, op, "A.shape[-3] (K)", f"A {tuple(A.shape)} for x {tuple(x.shape)}", f"K = {K}")
    _check(A.shape[-2] == V, op, "A.shape[-2] (V, source joints)", f"A {tuple(A.shape)} for x {tuple(x.shape)}", f"V = {V}")
    if A.dim() == 4:
        _check(A.shape[0] == N, op, "per-sample A.shape[0]", A.shape[0], f"N = {N}")
    _check(x.dtype in FLOAT_DTYPES, op, "x dtype", x.dtype, "float16, bfloat16, float32 or float64")
    _check(A.dtype == x.dtype or A.dtype == torch.float32, op, "A dtype", f"{A.dtype} with x {x.dtype}",
           f"{x.dtype} or torch.float32")
    _check_device(op, "A", A, x)
    return (N, C, T, A.shape[-1])


def unflatten_graph_input(x, A):
    """(N,K*C,T,V) conv output -> (N,K,C,T,V) view, subset-major (channel k*C + c)."""
    op = "graph_aggregate"
    if x.dim() == 4:
        _check(A.dim() in (3, 4), op, "A rank", f"{A.dim()}-D tensor of shape {tuple(A.shape)}", "(K,V,W) or per-sample (N,K,V,W)")
        K = A.shape[-3]
        _check(K >= 1 and x.shape[1] % K == 0, op, "x channels", f"{x.shape[1]} channels",
               f"a multiple of K = {K} (subset-major K*C layout)")
        return x.unflatten(1, (K, x.shape[1] // K))
    return x


def graph_aggregate(x, A):
    """Reference: einsum in fp32 (fp64 for fp64 inputs) with autocast off, cast to x.dtype."""
    x = unflatten_graph_input(x, A)
    check_graph_aggregate(x, A)
    cd = torch.float64 if torch.float64 in (x.dtype, A.dtype) else torch.float32
    eq = "nkctv,kvw->nctw" if A.dim() == 3 else "nkctv,nkvw->nctw"
    with torch.autocast(x.device.type, enabled=False):
        return torch.einsum(eq, x.to(cd), A.to(cd)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# masked_gather / masked_restore / random_masking
# --------------------------------------------------------------------------------------------

def check_masked_gather(x, ids_keep):
    op = "masked_gather"
    _check(x.dim() == 3, op, "x rank", f"{x.dim()}-D tensor of shape {tuple(x.shape)}", "a 3-D (N,L,D) tensor")
    _check(ids_keep.dim() == 2, op, "ids_keep rank", f"{ids_keep.dim()}-D tensor of shape {tuple(ids_keep.shape)}", "(N,L_keep)")
    N, L, D = x.shape
    _check(ids_keep.shape[0] == N, op, "ids_keep.shape[0] (N)", ids_keep.shape[0], f"N = {N}")
    _check(ids_keep.shape[1] <= L, op, "L_keep", ids_keep.shape[1], f"L_keep <= L = {L}")
    _check(ids_keep.dtype == torch.int64, op, "ids_keep dtype", ids_keep.dtype, "torch.int64")
    _check(x.dtype in FLOAT_DTYPES, op, "x dtype", x.dtype, "float16, bfloat16, float32 or float64")
    _check_device(op, "ids_keep", ids_keep, x)
    return (N, ids_keep.shape[1], D)


def check_masked_restore(y, ids_restore, mask_token):
    op = "masked_restore"
    _check(y.dim() == 3, op, "y rank", f"{y.dim()}-D tensor of shape {tuple(y.shape)}", "a 3-D (N,L_keep,D) tensor")
    _check(ids_restore.dim() == 2, op, "ids_restore rank",
           f"{ids_restore.dim()}-D tensor of shape {tuple(ids_restore.shape)}", "(N,L)")
    N, Lk, D = y.shape
    _check(ids_restore.shape[0] == N, op, "ids_restore.shape[0] (N)", ids_restore.shape[0], f"N = {N}")
    _check(Lk <= ids_restore.shape[1], op, "L_keep", Lk, f"L_keep <= L = {ids_restore.shape[1]}")
    _check(ids_restore.dtype == torch.int64, op, "ids_restore dtype", ids_restore.dtype, "torch.int64")
    _check(y.dtype in FLOAT_DTYPES, op, "y dtype", y.dtype, "float16, bfloat16, float32 or float64")
    _check(mask_token.numel() == D, op, "mask_token numel", mask_token.numel(), f"D = {D}")
    _check(mask_token.dtype == y.dtype, op, "mask_token dtype", mask_token.dtype, f"{y.dtype} (the token dtype)")
    _check_device(op, "ids_restore", ids_restore, y)
    _check_device(op, "mask_token", mask_token, y)
    return (N, ids_restore.shape[1], D)


def masked_gather(x, ids_keep):
    """Reference: y[n, j] = x[n, ids_keep[n, j]] via torch.gather with an expanded (stride-0) index."""
    check_masked_gather(x, ids_keep)
    if _host_checks_allowed(x):
        _check_index_range("masked_gather", "ids_keep", ids_keep, x.shape[1])
    N, Lk = ids_keep.shape
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(N, Lk, x.shape[2])).contiguous()


def masked_restore(y, ids_restore, mask_token):
    """Reference: gather from cat([y, mask tokens]) with ids_restore (MAE decoder un-shuffle)."""
    mask_token = mask_token.to(y.dtype) if mask_token.is_floating_point() else mask_token
    check_masked_restore(y, ids_restore, mask_token)
    if _host_checks_allowed(y):
        _check_index_range("masked_restore", "ids_restore", ids_restore, ids_restore.shape[1])
    N, Lk, D = y.shape
    L = ids_restore.shape[1]
    full = torch.cat([y, mask_token.reshape(1, 1, D).expand(N, L - Lk, D)], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(N, L, D)).contiguous()


def random_masking(noise, L_keep):
    """MAE masking: keep the L_keep smallest-noise tokens (stable argsort).

    Returns ids_keep (N, L_keep) int64, ids_restore (N, L) int64 and mask (N, L) in noise.dtype
    with 1 = removed, in the original (un-shuffled) token order.
    """
    op = "random_masking"
    _check(noise.dim() == 2, op, "noise rank", f"{noise.dim()}-D tensor of shape {tuple(noise.shape)}", "(N,L)")
    L = noise.shape[1]
    _check(0 <= L_keep <= L, op, "L_keep", L_keep, f"0 <= L_keep <= L = {L}")
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :L_keep]
    mdtype = noise.dtype if noise.is_floating_point() else torch.float32
    mask = (ids_restore >= L_keep).to(mdtype)
    return ids_keep, ids_restore, mask


# --------------------------------------------------------------------------------------------
# lora_linear
# --------------------------------------------------------------------------------------------

def check_lora_linear(x, W, b, A, B):
    """Returns the output shape (..., N)."""
    op = "lora_linear"
    _check(W.dim() == 2, op, "W rank", f"{W.dim()}-D tensor of shape {tuple(W.shape)}", "(N,K)")
    N, K = W.shape
    _check(x.dim() >= 1 and x.shape[-1] == K, op, "x shape", tuple(x.shape), f"(..., K) with K = {K}")
    if b is not None:
        _check(b.dim() == 1 and b.shape[0] == N, op, "b shape", tuple(b.shape), f"({N},)")
    _check(A.dim() == 2 and A.shape[1] == K, op, "A shape", tuple(A.shape), f"(r, K) with K = {K}")
    r = A.shape[0]
    _check(r >= 1, op, "rank r (A.shape[0])", r, "r >= 1")
    _check(B.dim() == 2 and B.shape[0] == N and B.shape[1] == r, op, "B shape", tuple(B.shape), f"({N}, {r}) = (N, r)")
    _check(x.dtype in FLOAT_DTYPES, op, "x dtype", x.dtype, "float16, bfloat16, float32 or float64")
    for name, t in (("W", W), ("b", b), ("A", A), ("B", B)):
        if t is not None:
            _check(t.dtype == x.dtype, op, f"{name} dtype", f"{t.dtype} with x {x.dtype}",
                   f"{x.dtype} (all inputs share one dtype outside autocast)")
            _check_device(op, name, t, x)
    return tuple(x.shape[:-1]) + (N,)


def lora_linear(x, W, b, A, B, scale):
    """Reference (peft-like): F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)."""
    check_lora_linear(x, W, b, A, B)
    return F.linear(x, W, b) + scale * F.linear(F.linear(x, A), B)
