"""Synthetic multi-modal action benchmarks for the ActionMAE demo (specs/actionmae.md §7.2).

C = 12 classes, T = 12 frames, k = 24 latents, three modalities `a b c` of 32-d per frame. `a` is
the cleanest, so it dominates the way RGB does on NTU. Two variants (`make_split(..., variant=)`):

`redundant` (spec §7.2). Each class is a smooth latent trajectory P_c; a sample shows a random
window of it (offset delta, scale s) plus a latent nuisance shared by all modalities. Each modality
sees an overlapping half of the latents through tanh(z W_m) and adds its own noise (sigma 0.6, 1.6,
2.0). The class prototypes and projections come from `default_rng(0)`.

`offset` (a setting where reconstruction can matter). Every modality sees the same class code:
z_t = s mu_y + 0.5 N(0, 1) per frame. `b` and `c` (think depth and IR from one sensor) also carry a
per-recording offset u ~ N(0, (0.5 lambda)^2), constant over the clip, with opposite signs:
x_b = tanh((z + u) W_b) + 0.5 N, x_c = tanh((z - u) W_c) + 0.5 N, x_a = tanh(z W_a) + 0.6 N. Alone,
`b` or `c` sees mu_y masked by u; neither averaging over frames nor summing the evidence of separate
b and c heads (the dropout control) removes it, but b and c read together cancel it, which is what
reconstructing the missing `a` (its token encodes mu_y) from the kept b and c asks for. The class
codes and projections come from `default_rng(3)`.

Splits: train from `default_rng(1)`, test from `default_rng(2)`. Numpy only, deterministic, well
under a second.
"""
import numpy as np

NUM_CLASSES = 12
NUM_FRAMES = 12
LATENT = 24
FEAT = 32
MODALITIES = ("a", "b", "c")
SLICES = {"a": slice(0, 12), "b": slice(6, 18), "c": slice(12, 24)}
SIGMA = {"a": 0.6, "b": 1.6, "c": 2.0}
SPLIT_SEED = {"train": 1, "test": 2}
SPLIT_SIZE = {"train": 4000, "test": 2000}
VARIANTS = ("redundant", "offset")
OFFSET_SIGMA = {"a": 0.6, "b": 0.5, "c": 0.5}
OFFSET_SIGN = {"a": 0.0, "b": 1.0, "c": -1.0}
OFFSET_LAMBDA = 2.0


def prototypes():
    """(P [C, T+8, k], W {m: [12, 32]}) from default_rng(0), in the spec's draw order."""
    rng = np.random.default_rng(0)
    T = NUM_FRAMES
    P = []
    for _ in range(NUM_CLASSES):
        walk = np.cumsum(rng.standard_normal((T + 12, LATENT)), axis=0)
        box = np.stack([walk[i:i + T + 8] for i in range(5)]).mean(0)  # 5-tap box filter, 'valid'
        P.append(box)
    P = np.stack(P)
    P = (P - P.mean()) / P.std() * 0.5
    W = {m: rng.standard_normal((12, FEAT)) / np.sqrt(12.0) for m in MODALITIES}
    return P, W


def offset_codes():
    """(mu [C, k], W {m: [k, 32]}) of the `offset` variant, from default_rng(3)."""
    rng = np.random.default_rng(3)
    mu = 0.5 * rng.standard_normal((NUM_CLASSES, LATENT))
    W = {m: rng.standard_normal((LATENT, FEAT)) / np.sqrt(LATENT) for m in MODALITIES}
    return mu, W


def make_split(split, n=None, variant="redundant", offset_lambda=OFFSET_LAMBDA):
    """{'a','b','c': float32 [n, T, 32], 'label': int64 [n]} for split 'train' or 'test'."""
    if split not in SPLIT_SEED:
        raise ValueError(f"synthetic split must be one of {sorted(SPLIT_SEED)}, got {split!r}")
    if variant not in VARIANTS:
        raise ValueError(f"synthetic variant must be one of {VARIANTS}, got {variant!r}")
    n = SPLIT_SIZE[split] if n is None else int(n)
    rng = np.random.default_rng(SPLIT_SEED[split])
    T = NUM_FRAMES
    y = rng.integers(0, NUM_CLASSES, n)
    out = {"label": y.astype(np.int64)}
    if variant == "offset":
        mu, W = offset_codes()
        s = rng.uniform(0.8, 1.2, n)
        z = s[:, None, None] * mu[y][:, None, :] + 0.5 * rng.standard_normal((n, T, LATENT))
        u = 0.5 * offset_lambda * rng.standard_normal((n, 1, LATENT))
        for m in MODALITIES:
            clean = np.tanh((z + OFFSET_SIGN[m] * u) @ W[m])
            out[m] = (clean + OFFSET_SIGMA[m] * rng.standard_normal((n, T, FEAT))).astype(np.float32)
        return out
    P, W = prototypes()
    delta = rng.integers(0, 8, n)
    s = rng.uniform(0.8, 1.2, n)
    latent_noise = rng.standard_normal((n, T, LATENT))
    window = P[y[:, None], delta[:, None] + np.arange(T)[None, :]]  # [n, T, k]
    z = s[:, None, None] * window + latent_noise
    for m in MODALITIES:
        clean = np.tanh(z[..., SLICES[m]] @ W[m])
        out[m] = (clean + SIGMA[m] * rng.standard_normal((n, T, FEAT))).astype(np.float32)
    return out
