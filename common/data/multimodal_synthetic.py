"""Synthetic multi-modal action benchmark for the ActionMAE demo (specs/actionmae.md §7.2).

C = 12 classes, T = 12 frames, k = 24 latents, three modalities `a b c` of 32-d per frame.
Each class is a smooth latent trajectory P_c; a sample shows a random window of it (offset delta,
speed-free scale s) plus a latent nuisance shared by all modalities (the redundancy). Each modality
sees an overlapping half of the latents through tanh(z W_m) and adds its own noise; `a` is the
cleanest (sigma 0.6), `b` and `c` are noisier (1.6, 2.0), so `a` dominates like RGB does on NTU.

The class prototypes and projections come from `default_rng(0)`; the train split from
`default_rng(1)`, the test split from `default_rng(2)`. Everything is numpy, deterministic, and
takes well under a second.
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


def make_split(split, n=None):
    """{'a','b','c': float32 [n, T, 32], 'label': int64 [n]} for split 'train' or 'test'."""
    if split not in SPLIT_SEED:
        raise ValueError(f"synthetic split must be one of {sorted(SPLIT_SEED)}, got {split!r}")
    n = SPLIT_SIZE[split] if n is None else int(n)
    P, W = prototypes()
    rng = np.random.default_rng(SPLIT_SEED[split])
    T = NUM_FRAMES
    y = rng.integers(0, NUM_CLASSES, n)
    delta = rng.integers(0, 8, n)
    s = rng.uniform(0.8, 1.2, n)
    latent_noise = rng.standard_normal((n, T, LATENT))
    window = P[y[:, None], delta[:, None] + np.arange(T)[None, :]]  # [n, T, k]
    z = s[:, None, None] * window + latent_noise
    out = {"label": y.astype(np.int64)}
    for m in MODALITIES:
        clean = np.tanh(z[..., SLICES[m]] @ W[m])
        out[m] = (clean + SIGMA[m] * rng.standard_normal((n, T, FEAT))).astype(np.float32)
    return out
