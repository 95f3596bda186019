"""Tests of the fused ops (specs/kernels.md §6): common/ops.py, common/ops_reference.py, csrc/.

CPU tests run everywhere; tests needing the compiled module skip (with a reason) when common._C is
absent; CUDA tests skip without a GPU or without CUDA kernels.
"""
import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from common import ops
    from common import ops_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_EXT = ops.has_ext("cpu")
HAS_CUDA_EXT = torch.cuda.is_available() and ops.has_ext("cuda")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="common._C is not built (python setup.py build_ext --inplace)")


def needs_cuda(f):
    """A CUDA test: marked `cuda` (make test-cuda, bench/gpu_check.sh select `-m cuda`), skipped without a GPU."""
    skip = pytest.mark.skipif(not HAS_CUDA_EXT, reason="needs a CUDA GPU and common._C built with CUDA kernels")
    return pytest.mark.cuda(skip(f))


BACKENDS = ["ref"] + (["ext"] if HAS_EXT else [])
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@contextlib.contextmanager
def backend(name):
    old = ops.get_backend()
    ops.set_backend(name)
    try:
        yield
    finally:
        ops.set_backend(old)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randn(*shape, dtype=torch.float32, device="cpu"):
    """Random data, never zeros."""
    t = torch.randn(*shape, dtype=torch.float64, device=device)
    return (t + 0.1 * torch.sign(t) + (t == 0).double()).to(dtype)


# ------------------------------------------------------------------------------------------------
# static_clip
# ------------------------------------------------------------------------------------------------

def explicit_static_clip(u8, idx, mean, std, T):
    """ALBAR pipeline spelled out: v2.ToDtype(float32, scale=True) then v2.Normalize, then tile."""
    frames = u8[torch.arange(u8.shape[0]), :, idx].to(torch.float32) * (1.0 / 255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((frames - m) / s).unsqueeze(2).repeat(1, 1, T, 1, 1)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("shape,T", [((3, 3, 7, 33, 17), 5), ((2, 1, 1, 1, 1), 3), ((2, 3, 4, 8, 8), -1)])
def test_static_clip_uint8_matches_pipeline_bitwise(be, shape, T):
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    C = shape[1]
    mean, std = IMAGENET_MEAN[:C], IMAGENET_STD[:C]
    idx = torch.randint(0, shape[2], (shape[0],))
    with backend(be):
        out = ops.static_clip(x, idx, mean, std, num_frames=T)
    expected = explicit_static_clip(x, idx, mean, std, shape[2] if T == -1 else T)
    assert out.is_contiguous() and out.dtype == torch.float32
    assert torch.equal(out, expected)


@needs_ext
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16, torch.float64])
def test_static_clip_ext_equals_ref_all_dtypes(in_dtype, out_dtype):
    if in_dtype == torch.uint8:
        x = torch.randint(0, 256, (3, 3, 7, 9, 5), dtype=torch.uint8)
    else:
        x = randn(3, 3, 7, 9, 5, dtype=in_dtype)
    idx = torch.tensor([6, 0, 3])
    for kwargs in (dict(mean=IMAGENET_MEAN, std=IMAGENET_STD), dict(), dict(mean=(0.5, 0.1, 0.2), scale=2.0)):
        with backend("ref"):
            r = ops.static_clip(x, idx, num_frames=4, out_dtype=out_dtype, **kwargs)
        with backend("ext"):
            e = ops.static_clip(x, idx, num_frames=4, out_dtype=out_dtype, **kwargs)
        assert e.dtype == r.dtype and e.shape == r.shape == (3, 3, 4, 9, 5)
        assert torch.equal(e, r), (in_dtype, out_dtype, kwargs)


@pytest.mark.parametrize("be", BACKENDS)
def test_static_clip_noncontiguous_and_modes(be):
    btchw = torch.randint(0, 256, (2, 6, 3, 10, 12), dtype=torch.uint8)
    x = btchw.permute(0, 2, 1, 3, 4)[..., ::2]                        # (B,C,T,H,W), strided W
    idx = torch.tensor([5, 2])[[0, 1]]
    with backend(be):
        out = ops.static_clip(x, idx, torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD), num_frames=32)
        norm_only = ops.static_clip(x, None, IMAGENET_MEAN, IMAGENET_STD, out_dtype=torch.bfloat16)
        tiled_u8 = ops.static_clip(x, idx, scale=1.0, num_frames=3, out_dtype=torch.uint8)
    assert torch.equal(out, explicit_static_clip(x.contiguous(), idx, IMAGENET_MEAN, IMAGENET_STD, 32))
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    assert torch.equal(norm_only, ((x.float() * (1 / 255) - m) / s).to(torch.bfloat16))
    assert torch.equal(tiled_u8, x[torch.arange(2), :, idx].unsqueeze(2).expand(2, 3, 3, 10, 6))


@pytest.mark.parametrize("be", BACKENDS)
def test_static_clip_backward(be):
    x = randn(2, 3, 4, 3, 2, dtype=torch.float64).requires_grad_()
    idx = torch.tensor([3, 1])
    with backend(be):
        assert torch.autograd.gradcheck(lambda t: ops.static_clip(t, idx, IMAGENET_MEAN, IMAGENET_STD, num_frames=5), (x,))
        assert torch.autograd.gradcheck(lambda t: ops.static_clip(t, None, IMAGENET_MEAN, IMAGENET_STD, scale=0.5), (x,))


# ------------------------------------------------------------------------------------------------
# graph_aggregate
# ------------------------------------------------------------------------------------------------

GRAPH_SHAPES = [  # N, K, C, T, V, W
    (3, 2, 5, 7, 11, 13), (2, 1, 3, 4, 17, 17), (2, 13, 2, 3, 18, 13), (2, 3, 4, 5, 20, 20), (2, 3, 4, 6, 25, 25),
]


def graph_inputs(N, K, C, T, V, W, per_sample=False, dtype=torch.float32, a_dtype=None, device="cpu"):
    x = randn(N, K, C, T, V, dtype=dtype, device=device)
    A = randn(*((N,) if per_sample else ()), K, V, W, dtype=a_dtype or dtype, device=device)
    return x, A


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("shape", GRAPH_SHAPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_graph_aggregate_matches_fp64(be, shape, per_sample):
    x, A = graph_inputs(*shape, per_sample=per_sample)
    eq = "nkctv,nkvw->nctw" if per_sample else "nkctv,kvw->nctw"
    expected = torch.einsum(eq, x.double(), A.double())
    with backend(be):
        out = ops.graph_aggregate(x, A)
        flat = ops.graph_aggregate(x.flatten(1, 2), A)              # (N, K*C, T, V) conv output
        half = ops.graph_aggregate(x.bfloat16(), A)                 # AMP case: A stays fp32
        half16 = ops.graph_aggregate(x.half(), A.half())
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(flat, out)
    assert half.dtype == torch.bfloat16 and rel_err(half, expected) < 1e-2
    assert half16.dtype == torch.float16 and rel_err(half16, expected) < 1e-2


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_graph_aggregate_grads_match_reference(be, per_sample):
    N, K, C, T, V, W = 3, 3, 4, 5, 17, 13
    x0, A0 = graph_inputs(N, K, C, T, V, W, per_sample=per_sample)
    g = randn(N, C, T, W)
    outs = {}
    for b in ("ref", be):
        x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
        with backend(b):
            ops.graph_aggregate(x, A).backward(g)
        outs[b] = (x.grad, A.grad)
    torch.testing.assert_close(outs[be][0], outs["ref"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[be][1], outs["ref"][1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("be", BACKENDS)
def test_graph_aggregate_noncontiguous_and_asymmetric(be):
    N, K, C, T, V = 2, 3, 4, 6, 17
    x = randn(N, K, C, V, T).transpose(-1, -2)                  # strided (t, v)
    A = randn(1, V, V).expand(K, V, V)                          # stride-0 expanded A
    A_asym = randn(K, V, V)
    with backend(be):
        out = ops.graph_aggregate(x, A)
        out_t = ops.graph_aggregate(x, A_asym.transpose(1, 2))
        out_a = ops.graph_aggregate(x, A_asym)
    torch.testing.assert_close(out, torch.einsum("nkctv,kvw->nctw", x, A), rtol=1e-5, atol=1e-5)
    # source index first: A and A^T give different results (pitfall 4b)
    assert not torch.allclose(out_t, out_a)
    torch.testing.assert_close(out_a, torch.einsum("nkctv,kvw->nctw", x, A_asym), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_graph_aggregate_identity_and_autocast(be):
    x = randn(2, 1, 3, 4, 5)
    with backend(be):
        assert torch.equal(ops.graph_aggregate(x, torch.eye(5).unsqueeze(0)), x[:, 0])
        A = randn(1, 5, 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.graph_aggregate(x, A)
    assert out.dtype == torch.bfloat16 and A.dtype == torch.float32
    assert rel_err(out, torch.einsum("nkctv,kvw->nctw", x.bfloat16().double(), A.double())) < 1e-2


@needs_ext
def test_graph_aggregate_grad_A_deterministic_and_dtype():
    x, A = graph_inputs(4, 3, 8, 16, 25, 25, dtype=torch.bfloat16, a_dtype=torch.float32)
    g = randn(4, 8, 16, 25, dtype=torch.bfloat16)
    d1 = torch.ops.rar.graph_aggregate_grad_A(g, x, False)
    d2 = torch.ops.rar.graph_aggregate_grad_A(g, x, False)
    assert d1.dtype == torch.float32 and torch.equal(d1, d2)
    with backend("ext"):
        xr, Ar = x.clone().requires_grad_(), A.clone().requires_grad_()
        ops.graph_aggregate(xr, Ar).backward(g)
    assert Ar.grad.dtype == torch.float32 and xr.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# masked_gather / masked_restore / random_masking
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("L_keep", [0, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_masked_ops_match_reference_exactly(be, L_keep, dtype):
    N, L, D = 3, 7, 5
    x = randn(N, L + 1, D, dtype=dtype)[:, 1:]                 # x[:, 1:] (cls dropped), non-contiguous
    ids_keep, ids_restore, mask = ops.random_masking(torch.rand(N, L), L_keep)
    mask_token = randn(1, 1, D, dtype=torch.float32)
    with backend(be):
        y = ops.masked_gather(x, ids_keep)
        out = ops.masked_restore(y, ids_restore, mask_token)
    mae_y = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))   # MAE-style
    assert torch.equal(y, mae_y) and y.is_contiguous()
    keep = mask.bool().logical_not().unsqueeze(-1)
    # gather -> restore returns x at kept positions and the mask token elsewhere
    assert torch.equal(out, torch.where(keep, x, mask_token.to(dtype).view(1, 1, D).expand(N, L, D)))
    assert mask.shape == (N, L) and int(mask.sum()) == N * (L - L_keep)


@pytest.mark.parametrize("be", BACKENDS)
def test_masked_grads_match_reference(be):
    N, L, D, Lk = 4, 9, 6, 4
    x0 = randn(N, L, D)
    ids_keep, ids_restore, _ = ops.random_masking(torch.rand(N, L), Lk)
    gy, gout = randn(N, Lk, D), randn(N, L, D)
    res = {}
    for b in ("ref", be):
        x = x0.clone().requires_grad_()
        tok = randn(D).requires_grad_() if b == "ref" else res["ref"][3].detach().clone().requires_grad_()
        with backend(b):
            y = ops.masked_gather(x, ids_keep)
            yy = y.detach().requires_grad_()
            out = ops.masked_restore(yy, ids_restore, tok)
        y.backward(gy)
        out.backward(gout)
        res[b] = (x.grad, yy.grad, tok.grad, tok)
    assert torch.equal(res[be][0], res["ref"][0])
    assert torch.equal(res[be][1], res["ref"][1])
    torch.testing.assert_close(res[be][2], res["ref"][2], rtol=1e-6, atol=1e-6)


@needs_ext
def test_masked_restore_backward_flag_and_ids_shuffle_slice():
    N, L, D, Lk = 2, 6, 3, 2
    noise = torch.rand(N, L)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    g = randn(N, L, D)
    dy, dm = torch.ops.rar.masked_restore_backward(g, ids_restore, Lk, False)
    assert dm.shape == (0,) and dy.shape == (N, Lk, D)
    dy2, dm2 = torch.ops.rar.masked_restore_backward(g, ids_restore, Lk, True)
    assert torch.equal(dy, dy2)
    torch.testing.assert_close(dm2, g[ids_restore >= Lk].sum(0))
    x = randn(N, L, D)
    y = torch.ops.rar.masked_gather(x, ids_shuffle[:, :Lk])     # the ids_shuffle slice (non-contiguous)
    assert torch.equal(y, x[torch.arange(N).unsqueeze(1), ids_shuffle[:, :Lk]])


def test_random_masking_is_mae():
    noise = torch.rand(5, 11)
    ids_keep, ids_restore, mask = ops.random_masking(noise, 4)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_keep, ids_shuffle[:, :4])
    assert torch.equal(ids_restore, torch.argsort(ids_shuffle, dim=1))
    m = torch.ones(5, 11)
    m[:, :4] = 0
    assert torch.equal(mask, torch.gather(m, 1, ids_restore))


# ------------------------------------------------------------------------------------------------
# lora_linear
# ------------------------------------------------------------------------------------------------

def lora_inputs(M, K, N, r, dtype=torch.float32, bias=True, device="cpu"):
    x = randn(M, K, dtype=dtype, device=device)
    W = randn(N, K, dtype=dtype, device=device)
    b = randn(N, dtype=dtype, device=device) if bias else None
    A = randn(r, K, dtype=dtype, device=device)
    B = randn(N, r, dtype=dtype, device=device)  # B != 0, else dA is exactly 0
    return x, W, b, A, B


def lora_fp64(x, W, b, A, B, s):
    d = [t.double() if t is not None else None for t in (x, W, b, A, B)]
    return torch.nn.functional.linear(d[0], d[1], d[2]) + s * (d[0] @ d[3].T) @ d[4].T


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("r", [1, 3, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_fp64(be, r, bias):
    x, W, b, A, B = lora_inputs(37, 19, 23, r, bias=bias)
    with backend(be):
        y = ops.lora_linear(x, W, b, A, B, 0.5)
        y3 = ops.lora_linear(x.view(1, 37, 19), W, b, A, B, 0.5)
        yt = ops.lora_linear(x.T.contiguous().T, W, b, A, B, 0.5)          # transposed storage
        ybf = ops.lora_linear(*(t.bfloat16() if t is not None else None for t in (x, W, b, A, B)), 0.5)
    ref64 = lora_fp64(x, W, b, A, B, 0.5)
    torch.testing.assert_close(y.double(), ref64, rtol=1e-5, atol=1e-4)
    assert y3.shape == (1, 37, 23) and torch.equal(y3[0], y)
    torch.testing.assert_close(yt, y)
    assert ybf.dtype == torch.bfloat16 and rel_err(ybf, ref64) < 1e-2


@pytest.mark.parametrize("be", BACKENDS)
def test_lora_linear_grads_and_frozen(be):
    x0, W, b, A0, B0 = lora_inputs(2 * 7, 19, 23, 3)
    g = randn(2, 7, 23)
    res = {}
    for bk in ("ref", be):
        x, A, B = (t.clone().requires_grad_() for t in (x0.view(2, 7, 19), A0, B0))
        with backend(bk):
            ops.lora_linear(x, W, b, A, B, 2.0).backward(g)
        res[bk] = (x.grad, A.grad, B.grad)
    for a, r_ in zip(res[be], res["ref"]):
        torch.testing.assert_close(a, r_, rtol=1e-5, atol=1e-4)
    with backend(be), pytest.raises(RuntimeError, match="rar::lora_linear: W.requires_grad"):
        ops.lora_linear(x0, W.clone().requires_grad_(), b, A0, B0, 1.0)
    with backend(be):   # only x needs grad
        xg = x0.clone().requires_grad_()
        ops.lora_linear(xg, W, b, A0, B0, 2.0).sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones(14, 23) @ W + 2.0 * (torch.ones(14, 23) @ B0) @ A0)


@pytest.mark.parametrize("be", BACKENDS)
def test_lora_linear_autocast(be):
    x, W, b, A, B = lora_inputs(5, 8, 6, 2)
    with backend(be), torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.lora_linear(x, W, b, A, B, 1.0)
    assert y.dtype == torch.bfloat16 and rel_err(y, lora_fp64(x, W, b, A, B, 1.0)) < 2e-2


# ------------------------------------------------------------------------------------------------
# float64 gradcheck (tiny shapes) on every backend
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("be", BACKENDS)
def test_gradcheck_fp64(be):
    d = dict(dtype=torch.float64)
    with backend(be):
        x, A = graph_inputs(2, 2, 2, 3, 4, 3, dtype=torch.float64)
        assert torch.autograd.gradcheck(ops.graph_aggregate, (x.requires_grad_(), A.requires_grad_()))
        x, A = graph_inputs(2, 2, 2, 3, 4, 3, per_sample=True, dtype=torch.float64)
        assert torch.autograd.gradcheck(ops.graph_aggregate, (x.requires_grad_(), A.requires_grad_()))
        ids_keep, ids_restore, _ = ops.random_masking(torch.rand(2, 5), 2)
        xm = randn(2, 5, 3, **d).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: ops.masked_gather(t, ids_keep), (xm,))
        ym, tok = randn(2, 2, 3, **d).requires_grad_(), randn(3, **d).requires_grad_()
        assert torch.autograd.gradcheck(lambda a, m: ops.masked_restore(a, ids_restore, m), (ym, tok))
        x, W, b, A, B = lora_inputs(4, 5, 3, 2, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda a, p, q: ops.lora_linear(a, W, b, p, q, 0.7),
                                        (x.requires_grad_(), A.requires_grad_(), B.requires_grad_()))


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck (schemas, fakes, autograd registration, aot dispatch)
# ------------------------------------------------------------------------------------------------

def opcheck_samples(device="cpu"):
    """(op, args) for every forward and backward op; forward ops with and without requires_grad."""
    out = []
    for rg in (False, True):
        x = randn(2, 3, 4, 5, 6, dtype=torch.float32, device=device).requires_grad_(rg)
        idx = torch.tensor([3, 0], device=device)
        out.append((torch.ops.rar.static_clip.default, (x, idx, 5, list(IMAGENET_MEAN), list(IMAGENET_STD), None, None)))
        xg, A = graph_inputs(2, 3, 2, 3, 5, 4, device=device)
        out.append((torch.ops.rar.graph_aggregate.default, (xg.requires_grad_(rg), A.requires_grad_(rg))))
        ids_keep, ids_restore, _ = ops.random_masking(torch.rand(2, 6, device=device), 2)
        xm = randn(2, 6, 5, device=device).requires_grad_(rg)
        out.append((torch.ops.rar.masked_gather.default, (xm, ids_keep)))
        ym, tok = randn(2, 2, 5, device=device).requires_grad_(rg), randn(5, device=device).requires_grad_(rg)
        out.append((torch.ops.rar.masked_restore.default, (ym, ids_restore, tok)))
        xl, W, b, Al, Bl = lora_inputs(6, 5, 4, 2, device=device)
        out.append((torch.ops.rar.lora_linear.default, (xl.requires_grad_(rg), W, b, Al.requires_grad_(rg),
                                                        Bl.requires_grad_(rg), 0.5)))
    u8 = torch.randint(0, 256, (2, 3, 4, 5, 6), dtype=torch.uint8, device=device)
    out.append((torch.ops.rar.static_clip.default, (u8, None, -1, None, None, 1.0, torch.uint8)))
    g4 = randn(2, 2, 3, 4, device=device)
    xg, A = graph_inputs(2, 3, 2, 3, 5, 4, per_sample=True, device=device)
    out.append((torch.ops.rar.graph_aggregate_grad_x.default, (g4, A)))
    out.append((torch.ops.rar.graph_aggregate_grad_A.default, (g4, xg, True)))
    out.append((torch.ops.rar.graph_aggregate_grad_A.default, (g4, xg, False)))
    ids_keep, ids_restore, _ = ops.random_masking(torch.rand(2, 6, device=device), 2)
    out.append((torch.ops.rar.masked_gather_backward.default, (randn(2, 2, 5, device=device), ids_keep, 6)))
    out.append((torch.ops.rar.masked_restore_backward.default, (randn(2, 6, 5, device=device), ids_restore, 2, True)))
    out.append((torch.ops.rar.masked_restore_backward.default, (randn(2, 6, 5, device=device), ids_restore, 2, False)))
    xl, W, b, Al, Bl = lora_inputs(6, 5, 4, 2, device=device)
    for need_dx in (True, False):
        out.append((torch.ops.rar.lora_linear_backward.default, (randn(6, 4, device=device), xl, W, Al, Bl, 0.5, need_dx)))
    return out


@needs_ext
def test_opcheck_cpu():
    for op, args in opcheck_samples("cpu"):
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): each op next to a neighbouring op, forward and backward
# ------------------------------------------------------------------------------------------------

def _compile_case(device="cpu"):
    x, A = graph_inputs(2, 3, 4, 5, 7, 7, device=device)
    xm = randn(2, 6, 8, device=device)
    ids_keep, ids_restore, _ = ops.random_masking(torch.rand(2, 6, device=device), 3)
    tok = randn(8, device=device)
    xl, W, b, Al, Bl = lora_inputs(10, 8, 8, 2, device=device)
    u8 = torch.randint(0, 256, (2, 3, 4, 5, 6), dtype=torch.uint8, device=device)
    idx = torch.tensor([1, 3], device=device)

    def fn(x, A, xm, tok, Al, Bl):
        h = ops.graph_aggregate(torch.relu(x), A).sigmoid()
        y = ops.masked_gather(xm * 2, ids_keep)
        z = ops.masked_restore(y + 1, ids_restore, tok)
        q = ops.lora_linear(z.reshape(-1, 8)[:10], W, b, Al, Bl, 0.5).tanh()
        s = ops.static_clip(u8, idx, IMAGENET_MEAN, IMAGENET_STD, num_frames=3)
        return h.sum() + z.square().sum() + q.sum() + s.mean()

    leaves = [t.requires_grad_() for t in (x, A, xm, tok, Al, Bl)]
    return fn, leaves


@needs_ext
@pytest.mark.parametrize("dynamic,compiler", [(False, "aot_eager"), (True, "aot_eager"),
                                              pytest.param(False, "inductor", marks=pytest.mark.slow),
                                              pytest.param(True, "inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_forward_backward(dynamic, compiler):
    """Dynamo (fullgraph) + fakes + AOT autograd on every op; inductor codegen is slow on CPU -> slow."""
    torch._dynamo.reset()
    fn, leaves = _compile_case()
    with backend("ext"):
        eager = fn(*leaves)
        ge = torch.autograd.grad(eager, leaves)
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=compiler)
        out = compiled(*leaves)
        gc = torch.autograd.grad(out, leaves)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(gc, ge):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# error table: every bad input raises RuntimeError with a clear message, on both backends
# ------------------------------------------------------------------------------------------------

def _error_cases():
    u8 = torch.randint(0, 256, (2, 3, 4, 5, 6), dtype=torch.uint8)
    idx = torch.tensor([0, 1])
    x, A = graph_inputs(2, 3, 2, 3, 5, 4)
    xm = randn(2, 6, 5)
    ids = torch.tensor([[0, 1], [2, 3]])
    ids_r = torch.stack([torch.randperm(6), torch.randperm(6)])
    xl, W, b, Al, Bl = lora_inputs(6, 5, 4, 2)
    sc = ops.static_clip
    return [
        ("static_clip: x rank", lambda: sc(u8[0], idx)),
        ("static_clip: x dtype", lambda: sc(u8.to(torch.int32), idx)),
        ("static_clip: frame_idx dtype", lambda: sc(u8, idx.int())),
        ("static_clip: frame_idx shape", lambda: sc(u8, torch.tensor([0, 1, 2]))),
        ("static_clip: frame_idx out of range", lambda: sc(u8, torch.tensor([0, 4]))),
        ("static_clip: frame_idx out of range", lambda: sc(u8, torch.tensor([-1, 0]))),
        ("static_clip: mean length", lambda: sc(u8, idx, (0.1, 0.2), (0.1, 0.2))),
        ("static_clip: std", lambda: sc(u8, idx, IMAGENET_MEAN, (0.2, 0.0, 0.1))),
        ("static_clip: mean", lambda: sc(u8, idx, 32)),
        ("static_clip: num_frames", lambda: sc(u8, idx, num_frames=0)),
        ("static_clip: num_frames without frame_idx", lambda: sc(u8, None, num_frames=8)),
        ("static_clip: out_dtype uint8", lambda: sc(u8, idx, IMAGENET_MEAN, IMAGENET_STD, out_dtype=torch.uint8)),
        ("static_clip: out_dtype", lambda: sc(u8, idx, out_dtype=torch.int32)),
        ("static_clip: mean with C channels", lambda: sc(torch.zeros(1, 17, 1, 1, 1), None, [0.0] * 17)),
        ("graph_aggregate: A rank", lambda: ops.graph_aggregate(x, A[0])),
        ("graph_aggregate: A.shape[-3] (K)", lambda: ops.graph_aggregate(x, A[:2])),
        ("graph_aggregate: A.shape[-2] (V", lambda: ops.graph_aggregate(x, A[:, :4])),
        ("graph_aggregate: per-sample A.shape[0]", lambda: ops.graph_aggregate(x, A.expand(3, 3, 5, 4))),
        ("graph_aggregate: x channels", lambda: ops.graph_aggregate(x.flatten(1, 2)[:, :5], A)),
        ("graph_aggregate: x rank", lambda: ops.graph_aggregate(x[0, 0], A)),
        ("graph_aggregate: A dtype", lambda: ops.graph_aggregate(x, A.double())),
        ("graph_aggregate: x dtype", lambda: ops.graph_aggregate(x.int(), A)),
        ("masked_gather: x rank", lambda: ops.masked_gather(xm[0], ids)),
        ("masked_gather: ids_keep.shape[0] (N)", lambda: ops.masked_gather(xm, ids[:1])),
        ("masked_gather: L_keep", lambda: ops.masked_gather(xm, torch.zeros(2, 7, dtype=torch.long))),
        ("masked_gather: ids_keep dtype", lambda: ops.masked_gather(xm, ids.int())),
        ("masked_gather: x dtype", lambda: ops.masked_gather(xm.int(), ids)),
        ("masked_gather: ids_keep out of range", lambda: ops.masked_gather(xm, torch.tensor([[0, 6], [1, 2]]))),
        ("masked_gather: ids_keep out of range", lambda: ops.masked_gather(xm, torch.tensor([[0, -1], [1, 2]]))),
        ("masked_restore: mask_token numel", lambda: ops.masked_restore(xm[:, :2], ids_r, torch.zeros(4))),
        ("masked_restore: ids_restore.shape[0] (N)", lambda: ops.masked_restore(xm[:, :2], ids_r[:1], torch.zeros(5))),
        ("masked_restore: L_keep", lambda: ops.masked_restore(xm, ids_r[:, :4], torch.zeros(5))),
        ("masked_restore: ids_restore dtype", lambda: ops.masked_restore(xm[:, :2], ids_r.int(), torch.zeros(5))),
        ("masked_restore: ids_restore out of range",
         lambda: ops.masked_restore(xm[:, :2], ids_r.clone().index_fill_(1, torch.tensor([0]), 6), torch.zeros(5))),
        ("lora_linear: x shape", lambda: ops.lora_linear(xl[:, :4], W, b, Al, Bl, 1.0)),
        ("lora_linear: b shape", lambda: ops.lora_linear(xl, W, b[:3], Al, Bl, 1.0)),
        ("lora_linear: A shape", lambda: ops.lora_linear(xl, W, b, Al[:, :3], Bl, 1.0)),
        ("lora_linear: rank r", lambda: ops.lora_linear(xl, W, b, Al[:0], Bl[:, :0], 1.0)),
        ("lora_linear: B shape", lambda: ops.lora_linear(xl, W, b, Al, Bl[:, :1], 1.0)),
        ("lora_linear: W dtype", lambda: ops.lora_linear(xl, W.double(), b, Al, Bl, 1.0)),
        ("lora_linear: W rank", lambda: ops.lora_linear(xl, W[0], b, Al, Bl, 1.0)),
        ("lora_linear: b.requires_grad", lambda: ops.lora_linear(xl, W, b.clone().requires_grad_(), Al, Bl, 1.0)),
    ]


ERROR_CASES = _error_cases()


@pytest.mark.parametrize("be", BACKENDS)
def test_error_table(be):
    with backend(be):
        for fragment, call in ERROR_CASES:
            with pytest.raises(RuntimeError) as info:
                call()
            assert "rar::" + fragment in str(info.value), (fragment, str(info.value))


@needs_ext
def test_errors_from_cpp_directly():
    """The C++ kernels check by themselves (e.g. when called through torch.ops.rar directly)."""
    xm = randn(2, 6, 5)
    with pytest.raises(RuntimeError, match=r"rar::masked_gather: ids_keep out of range"):
        torch.ops.rar.masked_gather(xm, torch.tensor([[0, 6], [1, 2]]))
    with pytest.raises(RuntimeError, match=r"rar::masked_gather: ids_keep dtype"):
        torch.ops.rar.masked_gather(xm, torch.tensor([[0, 1], [1, 2]]).int())
    with pytest.raises(RuntimeError, match=r"rar::static_clip: frame_idx out of range"):
        torch.ops.rar.static_clip(torch.zeros(2, 3, 4, 2, 2, dtype=torch.uint8), torch.tensor([0, 9]), -1)
    with pytest.raises(RuntimeError, match=r"rar::graph_aggregate: A.shape\[-2\]"):
        torch.ops.rar.graph_aggregate(randn(1, 2, 3, 4, 5), randn(2, 4, 5))
    with pytest.raises(RuntimeError, match=r"rar::lora_linear: B shape"):
        torch.ops.rar.lora_linear(randn(3, 4), randn(5, 4), None, randn(2, 4), randn(5, 3), 1.0)


def test_backend_switch_errors():
    with pytest.raises(ValueError):
        ops.set_backend("triton")
    if not HAS_EXT:
        with pytest.raises(RuntimeError):
            ops.set_backend("ext")


# ------------------------------------------------------------------------------------------------
# subprocess checks: missing extension
# ------------------------------------------------------------------------------------------------

_MISSING_C = r"""
import sys, warnings
sys.modules["common._C"] = None          # makes `from . import _C` raise ImportError
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w:
    from common import ops
    from common import ops_reference as ref
    import torch
    x = torch.randn(2, 3, 4, 5, 6); A = torch.randn(3, 6, 6)
    out = ops.graph_aggregate(x, A); out2 = ops.graph_aggregate(x, A)
    u8 = torch.randint(0, 256, (2, 3, 4, 5, 6), dtype=torch.uint8)
    s = ops.static_clip(u8, torch.tensor([1, 2]), (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
n = sum(issubclass(i.category, RuntimeWarning) for i in w)
assert n == 1, [str(i.message) for i in w]
assert "common._C is not available" in str(w[0].message)
assert ops._C is None and not ops.has_ext("cpu")
assert torch.equal(out, ref.graph_aggregate(x, A)) and torch.equal(out, out2)
assert torch.equal(s, ref.static_clip(u8, torch.tensor([1, 2]), (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)))
print("OK")
"""


def _run(code, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("RAR_OPS_")}
    e.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)


def test_missing_extension_warns_once_and_matches_reference():
    r = _run(_MISSING_C, RAR_OPS_REQUIRE_EXT="0")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_missing_extension_with_require_ext_raises():
    r = _run("import sys; sys.modules['common._C'] = None\nfrom common import ops", RAR_OPS_REQUIRE_EXT="1")
    assert r.returncode != 0 and "RAR_OPS_REQUIRE_EXT=1" in r.stderr


@needs_ext
def test_backend_env_var_selects_reference():
    r = _run("from common import ops; print(ops.get_backend(), ops.has_ext('cpu'))", RAR_OPS_BACKEND="ref")
    assert r.returncode == 0 and r.stdout.split() == ["ref", "True"], r.stderr


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU or CUDA kernels)
# ------------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_forward_matches_reference(dtype):
    dev = "cuda"
    u8 = torch.randint(0, 256, (3, 3, 7, 33, 17), dtype=torch.uint8, device=dev)
    idx = torch.tensor([6, 0, 3], device=dev)
    for xx in (u8, u8.transpose(3, 4)):
        for out_dtype in (torch.float32, dtype):
            with backend("ref"):
                r = ops.static_clip(xx, idx, IMAGENET_MEAN, IMAGENET_STD, num_frames=5, out_dtype=out_dtype)
            e = ops.static_clip(xx, idx, IMAGENET_MEAN, IMAGENET_STD, num_frames=5, out_dtype=out_dtype)
            assert torch.equal(e, r)
    for shape in GRAPH_SHAPES:
        for per_sample in (False, True):
            x, A = graph_inputs(*shape, per_sample=per_sample, dtype=dtype, a_dtype=torch.float32, device=dev)
            eq = "nkctv,nkvw->nctw" if per_sample else "nkctv,kvw->nctw"
            expected = torch.einsum(eq, x.double(), A.double())
            out = ops.graph_aggregate(x, A)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert out.dtype == dtype and rel_err(out, expected) < tol
    for Lk in (0, 3, 7):
        x = randn(3, 8, 5, dtype=dtype, device=dev)[:, 1:]
        ids_keep, ids_restore, _ = ops.random_masking(torch.rand(3, 7, device=dev), Lk)
        tok = randn(5, dtype=dtype, device=dev)
        with backend("ref"):
            ry, ro = ops.masked_gather(x, ids_keep), None
            ro = ops.masked_restore(ry, ids_restore, tok)
        assert torch.equal(ops.masked_gather(x, ids_keep), ry)
        assert torch.equal(ops.masked_restore(ry, ids_restore, tok), ro)
    xx = randn(32, 1568, 768, dtype=dtype, device=dev)
    ids_keep, ids_restore, _ = ops.random_masking(torch.rand(32, 1568, device=dev), 392)
    with backend("ref"):
        ry = ops.masked_gather(xx, ids_keep)
    assert torch.equal(ops.masked_gather(xx, ids_keep), ry)
    for r in (1, 3, 64):
        x, W, b, A, B = lora_inputs(37, 19, 23, r, dtype=dtype, device=dev)
        tol = 1e-3 if dtype == torch.float32 else 1e-2   # TF32 may be on
        assert rel_err(ops.lora_linear(x, W, b, A, B, 0.5), lora_fp64(x, W, b, A, B, 0.5)) < tol


@needs_cuda
def test_cuda_grads_match_reference_and_are_deterministic():
    dev = "cuda"
    x0, A0 = graph_inputs(4, 3, 16, 32, 25, 25, device=dev)
    g = randn(4, 16, 32, 25, device=dev)
    res = {}
    for b in ("ref", "ext", "ext2"):
        x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
        with backend(b[:3]):
            ops.graph_aggregate(x, A).backward(g)
        res[b] = (x.grad, A.grad)
    torch.testing.assert_close(res["ext"][0], res["ref"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res["ext"][1], res["ref"][1], rtol=1e-4, atol=1e-3)
    assert torch.equal(res["ext"][1], res["ext2"][1])                      # bitwise dA
    N, L, D, Lk = 8, 48, 64, 16
    ids_keep, ids_restore, _ = ops.random_masking(torch.rand(N, L, device=dev), Lk)
    gout = randn(N, L, D, device=dev)
    dms = []
    for b in ("ref", "ext", "ext"):
        y = randn(N, Lk, D, device=dev).requires_grad_()
        tok = torch.zeros(D, device=dev, requires_grad=True)
        with backend(b):
            ops.masked_restore(y, ids_restore, tok).backward(gout)
        dms.append(tok.grad)
    torch.testing.assert_close(dms[1], dms[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(dms[1], dms[2])                                     # bitwise d mask
    xm = randn(N, L, D, device=dev, dtype=torch.bfloat16).requires_grad_()
    ops.masked_gather(xm, ids_keep).backward(gout[:, :Lk].bfloat16())
    assert torch.equal(xm.grad[torch.arange(N).unsqueeze(1), ids_keep], gout[:, :Lk].bfloat16())
    x, W, b, A, B = lora_inputs(64, 32, 48, 4, device=dev)
    gl = randn(64, 48, device=dev)
    grads = {}
    for bk in ("ref", "ext"):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        with backend(bk):
            ops.lora_linear(xs, W, b, As, Bs, 0.5).backward(gl)
        grads[bk] = (xs.grad, As.grad, Bs.grad)
    for a, r_ in zip(grads["ext"], grads["ref"]):
        assert rel_err(a, r_) < 1e-3


@needs_cuda
def test_cuda_large_graph_fallback_stays_fp32_under_autocast():
    # K*V*W does not fit in shared memory -> the internal-GEMM exception. Under autocast x is cast to
    # bf16 (the API contract), but A and the accumulation must stay fp32 like the fused path: the
    # bf16 output then equals the fp32 reference rounded once (a bf16 GEMM would round A too and
    # miss on a large fraction of the elements).
    x, A = graph_inputs(2, 3, 4, 8, 200, 200, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = ops.graph_aggregate(x, A)
        g = randn(*y.shape, device="cuda", dtype=torch.bfloat16)
        dx = torch.ops.rar.graph_aggregate_grad_x(g, A)
    expect = ref.graph_aggregate(x.to(torch.bfloat16), A)
    assert y.dtype == torch.bfloat16 and (y != expect).float().mean() < 0.01
    expect_dx = torch.einsum("nctw,kvw->nkctv", g.float(), A).to(torch.bfloat16)
    assert (dx != expect_dx).float().mean() < 0.01


@needs_cuda
def test_cuda_opcheck_compile_stream_graph_and_nan_poison():
    for op, args in opcheck_samples("cuda"):
        torch.library.opcheck(op, args)
    # side stream
    x, A = graph_inputs(2, 3, 8, 16, 25, 25, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out_s = ops.graph_aggregate(x, A)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(out_s, ops.graph_aggregate(x, A))
    # CUDA graph capture
    ids_keep, ids_restore, _ = ops.random_masking(torch.rand(4, 16, device="cuda"), 4)
    xm = randn(4, 16, 32, device="cuda")
    ops.masked_gather(xm, ids_keep)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = ops.masked_gather(xm, ids_keep)
        static_ga = ops.graph_aggregate(x, A)
    xm.copy_(randn(4, 16, 32, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, torch.gather(xm, 1, ids_keep.unsqueeze(-1).expand(4, 4, 32)))
    torch.testing.assert_close(static_ga, torch.einsum("nkctv,kvw->nctw", x, A), rtol=1e-5, atol=1e-5)
    # NaN-poisoned allocator: outputs must be fully written
    junk = torch.full((1 << 24,), float("nan"), device="cuda")
    del junk
    u8 = torch.randint(0, 256, (2, 3, 4, 16, 16), dtype=torch.uint8, device="cuda")
    assert not ops.static_clip(u8, torch.tensor([0, 3], device="cuda"), IMAGENET_MEAN, IMAGENET_STD,
                               num_frames=8).isnan().any()
    assert not ops.graph_aggregate(x, A).isnan().any()
    tok = randn(32, device="cuda")
    assert not ops.masked_restore(ops.masked_gather(xm, ids_keep), ids_restore, tok).isnan().any()
    # compile
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b_: ops.graph_aggregate(a.relu(), b_).sum(), fullgraph=True)
    torch.testing.assert_close(fn(x, A), ops.graph_aggregate(x.relu(), A).sum(), rtol=1e-4, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("dynamic,mode", [(False, None), (True, None), (False, "reduce-overhead")])
def test_cuda_compile_fullgraph_forward_backward(dynamic, mode):
    """Inductor on CUDA around every op, forward and backward; reduce-overhead replays them in CUDA graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn, leaves = _compile_case("cuda")
    with backend("ext"):
        eager = fn(*leaves)
        ge = torch.autograd.grad(eager, leaves)
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, mode=mode)
        for _ in range(3 if mode else 1):  # cudagraph trees record on a later call, then replay
            out = compiled(*leaves)
            gc = torch.autograd.grad(out, leaves)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    for a, b_ in zip(gc, ge):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@needs_cuda
def test_cuda_debug_index_error():
    code = ("import torch\nfrom common import ops\n"
            "x = torch.randn(2, 6, 4, device='cuda')\n"
            "ops.masked_gather(x, torch.tensor([[0, 6], [1, 2]], device='cuda'))\n")
    r = _run(code, RAR_OPS_DEBUG="1")
    assert r.returncode != 0 and "rar::masked_gather: ids_keep out of range" in r.stderr
    r = _run(code.replace("[[0, 6], [1, 2]]", "[[0, 0], [1, 2]]"), RAR_OPS_DEBUG="1")
    assert r.returncode != 0 and "rar::masked_gather: ids_keep uniqueness" in r.stderr


@needs_cuda
@pytest.mark.slow
def test_cuda_static_clip_above_2_31_elements():
    u8 = torch.randint(0, 256, (2, 3, 1, 224, 224), dtype=torch.uint8, device="cuda")
    idx = torch.zeros(2, dtype=torch.long, device="cuda")
    T = (1 << 31) // (2 * 3 * 224 * 224) + 2                         # > 2^31 output elements
    out = ops.static_clip(u8, idx, out_dtype=torch.bfloat16, scale=1.0, num_frames=T)
    assert out.numel() > 2 ** 31
    assert torch.equal(out[:, :, -1], u8[:, :, 0].to(torch.bfloat16))


@needs_cuda
@pytest.mark.slow
def test_cuda_graph_aggregate_rows_above_2_31():
    # C*T rows >= 2^31 (C itself >= 2^31): row counts are 64-bit in the forward, grad_x and grad_A kernels
    C = (1 << 31) + 8
    x = torch.randn(C, dtype=torch.bfloat16, device="cuda").view(1, 1, C, 1, 1)
    A = torch.ones(1, 1, 1, device="cuda")                           # fp32 A, the AMP case
    out = torch.ops.rar.graph_aggregate(x, A)
    assert out.shape == (1, C, 1, 1) and torch.equal(out.view(-1), x.view(-1))
    dx = torch.ops.rar.graph_aggregate_grad_x(out, A)
    assert torch.equal(dx.view(-1), x.view(-1))
    del dx
    dA = torch.ops.rar.graph_aggregate_grad_A(out, x, False)
    expect = torch.linalg.vector_norm(x.view(-1), dtype=torch.float32) ** 2
    assert rel_err(dA.view(()), expect) < 1e-3
