"""ALBAR (train_albar.py): loss terms vs hand values, static clip after augmentation, data formats,
bias-set metrics, bad input, and a short run whose loss drops. Everything runs on tiny tensors and
on small files generated here in the real formats (PyAV mp4, JPEG zips, split lists)."""
import json
import math
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_albar as ta
from common.checkpoint import CheckpointError
from common.config import InputError
from common.data import synthetic_video as sv
from common.video import write_video

torch.set_num_threads(1)


def _args(**kw):
    a = ta.parse_args(ta.build_parser(), [])
    for k, v in kw.items():
        setattr(a, k, v)
    return ta.resolve_args(a)


class Linear(nn.Module):
    """z = W flatten(x): every gradient is hand-computable (∂Σ_c z_c/∂x = Σ_c W_c)."""

    def __init__(self, shape, classes, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(classes, int(np.prod(shape)), generator=g, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return x.double().flatten(1) @ self.w.t()


def _u8(b=2, t=4, h=3, w=5, seed=0):
    return torch.randint(0, 256, (b, 3, t, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------- loss terms

def test_loss_terms_match_hand_values_and_signs():
    u8, y = _u8(), torch.tensor([1, 2])
    tbar = torch.tensor([3, 0])
    model = Linear(u8.shape[1:], 3)
    args = _args(w_ce=1.0, w_adv=1.0, w_ent=4.25, w_gp=10.0, gp_reduce="column", amp=False, split_backward=False)
    stats = ta.albar_step(model, u8, y, tbar, args)

    x = ta.normalize(u8).double()
    xbar = x[torch.arange(2), :, tbar].unsqueeze(2).expand_as(x)
    W = model.w.detach()
    z, zbar = x.flatten(1) @ W.t(), xbar.flatten(1) @ W.t()
    ce = np.mean([-(z[b, y[b]] - math.log(math.fsum(math.exp(v) for v in z[b].tolist()))).item() for b in range(2)])
    ce_static = np.mean([-(zbar[b, y[b]] - torch.logsumexp(zbar[b], 0)).item() for b in range(2)])
    p = torch.softmax(zbar, 1)
    neg_ent = float((p * p.log()).sum(1).mean())
    G = W.sum(0).view(3, 4, 3, 5)  # same for every sample: Σ_c W_c
    gp = np.mean([math.sqrt(float((G[:, :, :, w] ** 2).sum()) + 1e-12) for b in range(2) for w in range(5)])
    assert stats["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert stats["ce_static"].item() == pytest.approx(ce_static, rel=1e-5)
    assert stats["loss_ent"].item() == pytest.approx(neg_ent, rel=1e-5)
    assert neg_ent < 0  # the entropy term is the NEGATIVE entropy (minimised -> uniform)
    assert stats["loss_gp"].item() == pytest.approx(gp, rel=1e-5)
    # total: +CE(video) - CE(static) + 4.25 Σ p log p + 10 GP
    assert stats["loss"].item() == pytest.approx(ce - ce_static + 4.25 * neg_ent + 10 * gp, rel=1e-5)


def test_gradient_penalty_norm_axes():
    g = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    col = np.mean([math.sqrt(float((g[b, :, :, :, w] ** 2).sum()) + 1e-12) for b in range(2) for w in range(6)])
    smp = np.mean([math.sqrt(float((g[b] ** 2).sum()) + 1e-12) for b in range(2)])
    assert ta.gradient_penalty(g, "column").item() == pytest.approx(col, rel=1e-6)
    assert ta.gradient_penalty(g, "sample").item() == pytest.approx(smp, rel=1e-6)
    # the paper's Eq. 4 is about sqrt(W) times stronger on an isotropic gradient
    big = torch.ones(1, 3, 8, 16, 16)
    assert (ta.gradient_penalty(big, "sample") / ta.gradient_penalty(big, "column")).item() == pytest.approx(4.0)


def _one_term_step(term, steps=1, lr=0.5):
    u8, y = _u8(b=4, seed=1), torch.tensor([0, 1, 2, 0])
    model = Linear(u8.shape[1:], 3, seed=2)
    w = dict(w_ce=0.0, w_adv=0.0, w_ent=0.0, w_gp=0.0)
    w[term] = 1.0
    args = _args(gp_reduce="column", amp=False, split_backward=False, **w)
    tbar = ta.static_frame_index("middle", 4, 4)
    before = ta.albar_step(model, u8, y, tbar, args)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.step()
        opt.zero_grad()
        ta.albar_step(model, u8, y, tbar, args)
    model.zero_grad()
    after = ta.albar_step(model, u8, y, tbar, args)
    return before, after


def test_sign_of_each_term_by_one_descent_step():
    b, a = _one_term_step("w_adv", lr=0.05)
    assert a["ce_static"] > b["ce_static"]          # adversarial: static CE goes UP (no GRL, plain minus)
    b, a = _one_term_step("w_ent", lr=0.05)
    assert a["static_entropy"] > b["static_entropy"]  # entropy term pushes the static softmax to uniform
    b, a = _one_term_step("w_gp", lr=0.01)
    assert a["loss_gp"] < b["loss_gp"]              # double backprop trains the penalty
    b, a = _one_term_step("w_ce", lr=0.05)
    assert a["loss_ce"] < b["loss_ce"]


def test_baseline_skips_static_pass_and_split_backward_same_grad():
    u8, y, tbar = _u8(), torch.tensor([1, 2]), torch.tensor([1, 2])
    calls = []
    model = Linear(u8.shape[1:], 3)
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    base = _args(baseline=True)
    assert (base.w_adv, base.w_ent, base.w_gp) == (0.0, 0.0, 0.0)
    ta.albar_step(model, u8, y, tbar, base)
    assert len(calls) == 1
    grads = []
    for split in (False, True):
        model.zero_grad()
        ta.albar_step(model, u8, y, tbar, _args(split_backward=split, amp=False, gp_reduce="column"))
        grads.append(model.w.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_static_clip_built_per_sample_from_the_augmented_clip(tmp_path):
    """The dataset's augmented uint8 clip is what the static clip tiles (frame t̄_b of sample b)."""
    frames = np.zeros((8, 20, 24, 3), np.uint8)
    for t in range(8):
        frames[t, :, :, 0] = 30 * t                      # frame id in channel 0
        frames[t, :, :12, 1] = 200                       # left half marked -> flips are visible
    write_video(tmp_path / "a.mp4", frames)
    args = _args(num_frames=4, frame_stride=2, short_side=20, crop=16, hflip_prob=0.5, strict=True)
    ds = ta.ClipDataset([ta.Item(tmp_path / "a.mp4", 0, "a")], args, "train")
    np.random.seed(3)
    u8 = torch.stack([ds[0][0] for _ in range(3)])      # 3 different augmentations, (3, 3, 4, 16, 16)
    seen = []

    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            seen.append(x.detach().clone())
            return x.float().mean(dim=(1, 2, 3, 4))[:, None] * self.p

    tbar = torch.tensor([0, 3, 1])
    ta.albar_step(Rec(), u8, torch.tensor([0, 1, 0]), tbar, _args(w_gp=0.0, amp=False, split_backward=False))
    x, xbar = seen
    for b in range(3):
        for t in range(4):
            assert torch.equal(xbar[b, :, t], x[b, :, tbar[b]])   # bitwise: same op order as static_clip
    # the frame-id channel is constant over time in x̄ but not in x
    assert x[:, 0].std(dim=1).max() > 0 and xbar[:, 0].std(dim=1).max() == 0


def test_static_frame_choices():
    assert ta.static_frame_index("middle", 32, 2).tolist() == [16, 16]
    assert ta.static_frame_index("first", 32, 1).tolist() == [0]
    assert ta.static_frame_index("last", 32, 1).tolist() == [31]
    assert ta.static_frame_index("40", 32, 1).tolist() == [31]
    r = ta.static_frame_index("random", 32, 1000, generator=torch.Generator().manual_seed(0))
    assert r.min() >= 0 and r.max() <= 31 and len(set(r.tolist())) > 20
    with pytest.raises(InputError, match="static-frame"):
        ta.static_frame_index("centre", 32, 1)


def test_lr_schedule_matches_spec_values():
    f = lambda e, s: 1e-5 * ta.lr_factor(e, 50, 5, s)  # noqa: E731
    assert [round(f(e, "clean"), 10) for e in (1, 2, 5, 6)] == [1e-7, 2.575e-6, 1e-5, 1e-5]
    assert f(50, "clean") == pytest.approx(2.12e-7, rel=1e-2)
    assert [round(f(e, "official"), 10) for e in (1, 2, 3, 7)] == [1e-5, 1e-7, 2.575e-6, 1e-5]
    assert f(50, "official") == pytest.approx(3.15e-7, rel=1e-2)


def test_clip_indices_spec():
    rng = np.random.default_rng(0)
    assert ta.clip_indices(100, 32, 2, train=False).tolist() == list(range(18, 82, 2))  # centred: (100-64)//2
    assert ta.clip_indices(100, 32, 2, train=False, start_mode="start")[0] == 0
    assert ta.clip_indices(40, 32, 2, train=False).tolist() == list(range(4, 36))          # s -> 1
    assert ta.clip_indices(20, 32, 2, train=True, rng=rng).tolist() == list(range(20)) + [19] * 12  # clamped
    starts = {ta.clip_indices(100, 32, 2, train=True, rng=rng)[0] for _ in range(300)}
    assert min(starts) == 0 and max(starts) == 35


# (n, T, s, views, first index of each test view, first index of 4 train draws from default_rng(7)),
# recorded from the sampling code before the clip reader moved onto common.video (issue 13); every
# clip is min(start + s_eff * arange(T), n - 1) with s_eff = s, or 1 when s * T > n.
PINNED_INDICES = [
    (100, 32, 2, 3, [6, 18, 30], [34, 22, 24, 32]),
    (64, 32, 2, 1, [0], [0, 0, 0, 0]),
    (40, 32, 2, 2, [2, 6], [7, 5, 5, 7]),
    (20, 32, 2, 3, [0, 0, 0], [0, 0, 0, 0]),        # shorter than the window: stride 1, clamped
    (1, 8, 2, 1, [0], [0, 0, 0, 0]),
    (9, 4, 3, 4, [0, 1, 3, 4], [4, 3, 3, 4]),
    (65, 32, 2, 5, [0, 0, 0, 0, 0], [0, 0, 0, 0]),
    (300, 16, 4, 10, [11, 35, 59, 82, 106, 129, 153, 177, 200, 224], [222, 147, 161, 211]),
]


@pytest.mark.parametrize("n,T,s,views,test_starts,train_starts", PINNED_INDICES)
def test_clip_indices_pinned(n, T, s, views, test_starts, train_starts):
    s_eff = s if s * T <= n else 1

    def clip(start):
        return np.minimum(start + s_eff * np.arange(T), n - 1).tolist()

    got = [ta.clip_indices(n, T, s, train=False, num_clips=views, clip_idx=v).tolist() for v in range(views)]
    assert got == [clip(st) for st in test_starts]
    assert ta.clip_indices(n, T, s, train=False, start_mode="start").tolist() == clip(0)
    rng = np.random.default_rng(7)
    assert [ta.clip_indices(n, T, s, train=True, rng=rng).tolist() for _ in range(4)] == \
        [clip(st) for st in train_starts]


# ----------------------------------------------------------------------------- data formats

def test_generic_list_parsing_and_errors(tmp_path):
    (tmp_path / "l.txt").write_text("# comment\nv/a.mp4 0\n\nv/b c.mp4 2  # spaces in the name\n")
    items = ta.parse_list_file(tmp_path / "l.txt", tmp_path)
    assert [(i.path.name, i.label, i.vid) for i in items] == [("a.mp4", 0, "a"), ("b c.mp4", 2, "b c")]
    (tmp_path / "bad.txt").write_text("v/a.mp4 0\nv/b.mp4\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected '<relpath> <label>'"):
        ta.parse_list_file(tmp_path / "bad.txt", tmp_path)
    (tmp_path / "lab.txt").write_text("v/a.mp4 0\nv/b.mp4 7\n")
    with pytest.raises(ValueError, match=r"lab.txt:2: label 7 is not a known class"):
        ta.parse_list_file(tmp_path / "lab.txt", tmp_path, num_classes=3)
    (tmp_path / "ext.txt").write_text("v/a.txt 0\n")
    with pytest.raises(ValueError, match=r"ext.txt:1: 'v/a.txt' is not a video file"):
        ta.parse_list_file(tmp_path / "ext.txt", tmp_path)


def test_ucf101_hmdb51_k400_native_formats(tmp_path):
    tl = tmp_path / "ucfTrainTestlist"
    tl.mkdir()
    (tl / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    (tl / "trainlist01.txt").write_text("YoYo/v_YoYo_g12_c03.avi 2\nApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
    items = ta.parse_ucf101(tl / "trainlist01.txt", tmp_path / "Videos", ta.read_class_index(tl / "classInd.txt"))
    assert [(i.label, i.vid) for i in items] == [(1, "v_YoYo_g12_c03"), (0, "v_ApplyEyeMakeup_g08_c01")]
    (tl / "bad.txt").write_text("YoYo/v_YoYo_g12_c03.avi 2\nJuggle/v_Juggle_g01_c01.avi\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: class folder 'Juggle'"):
        ta.parse_ucf101(tl / "bad.txt", tmp_path, ta.read_class_index(tl / "classInd.txt"))
    (tl / "bad2.txt").write_text("YoYo/v_YoYo_g12_c03.avi 1\n")
    with pytest.raises(ValueError, match=r"bad2.txt:1: label 1 disagrees"):
        ta.parse_ucf101(tl / "bad2.txt", tmp_path, ta.read_class_index(tl / "classInd.txt"))
    # the regex handles groups >= 10 (the official split on '_g0' does not)
    assert ta.UCF_RE.search("v_YoYo_g12_c03").group(1) == "YoYo"

    (tmp_path / "hmdb51_train_labels.csv").write_text("class,filename,label\nclimb,x_climb_1.avi,1\njump,j.avi,2\n")
    items = ta.parse_hmdb51_csv(tmp_path / "hmdb51_train_labels.csv", tmp_path / "Videos")
    assert items[0].path == tmp_path / "Videos" / "climb" / "x_climb_1.avi" and items[1].label == 2
    (tmp_path / "h.csv").write_text("climb,a.avi,1\nclimb,b.avi,3\n")
    with pytest.raises(ValueError, match=r"h.csv:2: class 'climb' has label 3"):
        ta.parse_hmdb51_csv(tmp_path / "h.csv", tmp_path)

    sp = tmp_path / "testTrainMulti_7030_splits"
    sp.mkdir()
    (sp / "wave_test_split1.txt").write_text("w1.avi 1\nw2.avi 2\nw3.avi 0\n")
    (sp / "climb_test_split1.txt").write_text("c1.avi 2\n")
    out, names = ta.parse_hmdb51_splits(sp, tmp_path / "Videos")
    assert names == ["climb", "wave"]
    assert [(i.vid, i.label) for i in out["train"]] == [("w1", 1)]
    assert sorted((i.vid, i.label) for i in out["test"]) == [("c1", 0), ("w2", 1)]

    (tmp_path / "k.txt").write_text("/abs/x/vid1.mp4 1\n/abs/y/vid2.mp4 400\n")
    items = ta.parse_list_file(tmp_path / "k.txt", tmp_path, one_based=True)
    assert [i.label for i in items] == [0, 399] and str(items[0].path) == "/abs/x/vid1.mp4"


def test_stratified_val_split_is_seeded_and_disjoint():
    items = [ta.Item(Path(f"{i}.mp4"), i % 3, str(i)) for i in range(30)]
    tr, va = ta.stratified_split(items, 0.2, seed=0)
    tr2, va2 = ta.stratified_split(items, 0.2, seed=0)
    assert [i.vid for i in va] == [i.vid for i in va2] and len(va) == 6 and len(tr) == 24
    assert {i.label for i in va} == {0, 1, 2} and not ({i.vid for i in va} & {i.vid for i in tr})


def _mini_benchmark(tmp_path, n_train=48, n_test=12):
    return sv.build(tmp_path / "synth", num_train=n_train, num_test=n_test, num_frames=8, size=16, seed=0)


def test_bias_sets_pairing_scufo_fallback_and_labels(tmp_path):
    root = _mini_benchmark(tmp_path)
    train = ta.parse_list_file(root / "train.txt", root)
    test = ta.parse_list_file(root / "test.txt", root)
    label_of = {i.vid: i.label for i in train + test}
    sets, conflfg = ta.find_bias_sets(root / "bias", "SYNTH", label_of)
    assert set(sets) == {"Other", "Unseen"} and conflfg is None
    assert sets["Unseen"]["scufo"] is None                       # not shipped -> generated from SCUBA
    assert [i.vid for i in sets["Other"]["scuba"]] == [i.vid for i in sets["Other"]["scufo"]]
    assert sets["Other"]["scuba"][0].label == label_of[sets["Other"]["scuba"][0].vid.rsplit("__", 1)[0]]
    zpath = sets["Other"]["scuba"][0].path
    assert ta.source_num_frames(zpath) == 8
    frames, = ta.read_views(zpath, [np.arange(8)], size=16)
    assert frames.shape == (8, 16, 16, 3) and frames.dtype == np.uint8
    args = _args(num_frames=8, frame_stride=1, short_side=16, crop=16, scufo_seed=0)
    ds = ta.ClipDataset(sets["Unseen"]["scuba"], args, "image", scufo_seed=0, scufo_from_clip=True)
    a, b = ds[0][0], ds[0][0]
    assert a.shape == (1, 3, 1, 16, 16) and torch.equal(a, b)     # seeded by (scufo-seed, id)
    # an item whose video is in no list -> error naming it
    (root / "bias" / "SYNTH_SCUBA_Other" / "ghost__0.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="ghost__0.zip: video 'ghost'"):
        ta.find_bias_sets(root / "bias", "SYNTH", label_of)


def test_scuba_scufo_contrasted_definitions():
    # id: (label, pred)
    scuba = {"a": (0, 0), "b": (1, 1), "c": (2, 0), "d": (3, 3), "e": (0, 0)}
    scufo = {"a": (0, 0), "b": (1, 2), "c": (2, 2), "d": (3, 1), "x": (1, 1)}
    sa, so, co, dropped = ta.pair_metrics(scuba, scufo)
    # paired ids a, b, c, d; e and x are dropped (missing on one side)
    assert dropped == 2
    assert sa == pytest.approx(3 / 4)   # a, b, d right on SCUBA
    assert so == pytest.approx(2 / 4)   # a, c right on SCUFO
    assert co == pytest.approx(2 / 4)   # b, d: right on SCUBA and wrong on SCUFO (a is right on both)


def test_bad_videos_skipped_and_counted_or_strict(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    write_video(tmp_path / "good.mp4", frames)
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    items = [ta.Item(tmp_path / "good.mp4", 0, "good"), ta.Item(tmp_path / "bad.mp4", 1, "bad")]
    args = _args(num_frames=4, frame_stride=1, short_side=16, crop=16, workers=0, eval_batch_size=4,
                 strict=False, amp=False, limit_eval_batches=0)
    env = SimpleNamespace(device=torch.device("cpu"))
    model = ta.SmallCNN3d(2, 4)
    with pytest.warns(UserWarning, match="bad.mp4"):
        idx, lab, sc, n_sk = ta.predict(model, ta.ClipDataset(items, args, "test"), args, env)
    assert n_sk == 1 and idx.tolist() == [0]
    args.strict = True
    with pytest.raises(ta.VideoDecodeError, match="bad.mp4"):
        ta.predict(model, ta.ClipDataset(items, args, "test"), args, env)
    with pytest.warns(UserWarning, match="skipping 1 missing videos"):
        kept, n = ta.drop_missing(items + [ta.Item(tmp_path / "nope.mp4", 0, "nope")], "test", strict=False)
    assert n == 1 and len(kept) == 2
    with pytest.raises(InputError, match="nope.mp4"):
        ta.drop_missing([ta.Item(tmp_path / "nope.mp4", 0, "nope")], "test", strict=True)


def test_multiview_scores_are_averaged_per_video(tmp_path):
    frames = np.random.default_rng(1).integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
    write_video(tmp_path / "v.mp4", frames)
    items = [ta.Item(tmp_path / "v.mp4", 1, "v"), ta.Item(tmp_path / "v.mp4", 0, "w")]
    args = _args(num_frames=4, frame_stride=2, short_side=16, crop=16, workers=0, eval_batch_size=3,
                 amp=False, limit_eval_batches=0)
    env = SimpleNamespace(device=torch.device("cpu"))
    model = ta.SmallCNN3d(3, 4)
    ds = ta.ClipDataset(items, args, "test", views=3, crops=1)
    idx, lab, sc, _ = ta.predict(model, ds, args, env)
    assert idx.tolist() == [0, 1] and lab.tolist() == [1, 0]
    model.eval()
    with torch.no_grad():
        views = ds[0][0]
        assert views.shape == (3, 3, 4, 16, 16)
        expect = model(ta.normalize(views)).softmax(1).mean(0)
    assert torch.allclose(sc[0], expect, atol=1e-6)


def test_swin3d_double_backward_and_pretrained_loading(tmp_path):
    args = _args(arch="swin3d_tiny_test", drop_path=0.1, amp=False, split_backward=False)
    model = ta.build_model(args, 5)
    u8 = torch.randint(0, 255, (2, 3, 8, 32, 32), dtype=torch.uint8)
    stats = ta.albar_step(model, u8, torch.tensor([0, 3]), torch.tensor([4, 4]), args)
    assert stats["loss_gp"] > 0 and all(p.grad is not None for p in model.head.parameters())
    # a K400-style state dict (400-way head) loads with the head dropped; another arch fails loudly
    src = ta.build_model(args, 400)
    torch.save(src.state_dict(), tmp_path / "k400.pth")
    info = ta.load_pretrained(model, tmp_path / "k400.pth", 5)
    assert info["missing_keys"] == [] and info["head"].startswith("new") and len(info["sha256"]) == 64
    assert torch.equal(model.patch_embed.proj.weight, src.patch_embed.proj.weight)
    torch.save(ta.SmallCNN3d(5).state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        ta.load_pretrained(model, tmp_path / "cnn.pth", 5)
    with pytest.raises(CheckpointError, match="never downloaded"):
        ta.load_pretrained(model, tmp_path / "none.pth", 5)


# ----------------------------------------------------------------------------- clip reader (issue 13)

def _frame_id_video(path, n, h=32, w=48):
    """Frame t: the top half is grey 6*t (its id), the bottom half a horizontal grey ramp (x position)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[:, : h // 2] = (6 * np.arange(n))[:, None, None, None]
    frames[:, h // 2:] = np.linspace(0, 240, w).astype(np.uint8)[None, None, :, None]
    write_video(path, frames, codec="libx264", quality=0)  # crf 0: the ids survive the codec
    return frames


def _ids(clip):  # (3, T, H, W) uint8 -> frame ids, read from rows 2..7 of a crop (inside the top half)
    return (clip[0, :, 2:8].float().mean(dim=(1, 2)) / 6).round().long().tolist()


def test_dataset_reads_the_pinned_indices_with_one_decode_per_video(tmp_path, monkeypatch):
    n, T, s, views = 40, 8, 3, 3
    _frame_id_video(tmp_path / "v.mp4", n)
    items = [ta.Item(tmp_path / "v.mp4", 0, "v")]
    args = _args(num_frames=T, frame_stride=s, short_side=32, crop=24, hflip_prob=0.0, train_crop="random")
    calls = []
    real = ta.video.decode_views
    monkeypatch.setattr(ta.video, "decode_views", lambda p, v, size=None: calls.append((len(v), size)) or real(p, v, size=size))
    monkeypatch.setattr(ta.video, "read_video", lambda *a, **k: pytest.fail("read_video called per sample"))
    ds = ta.ClipDataset(items, args, "test", views=views, crops=3)
    clips = ds[0][0]
    assert clips.shape == (views * 3, 3, T, 24, 24)
    assert calls == [(views, 32)]                     # ONE decode for 3 clips x 3 crops, resized on decode
    for v in range(views):
        want = ta.clip_indices(n, T, s, train=False, num_clips=views, clip_idx=v).tolist()
        for c in range(3):
            assert _ids(clips[3 * v + c]) == want
    # the three crops: left / centre / right along the long side (x ramp in channel 1)
    x0 = [int(clips[c, 0, 0, -2, 0]) for c in range(3)]
    assert x0[0] < x0[1] < x0[2]
    # train: the clip drawn by the per-sample rng of the pinned sampler
    ds = ta.ClipDataset(items, args, "train")
    np.random.seed(3)
    got = [_ids(ds[0][0]) for _ in range(3)]
    np.random.seed(3)
    want = [ta.clip_indices(n, T, s, train=True, rng=np.random.default_rng(np.random.randint(2**31))).tolist()
            for _ in range(3)]
    assert got == want and len({tuple(g) for g in got}) > 1


def test_demo_sized_clips_equal_the_full_decode_path(tmp_path):
    """At the recipe's size (the demo: 32x32 videos, short side 32) decoding on the fly gives exactly
    what the former full-video decode + torch resize gave, so the demo's numbers do not move."""
    root = sv.build(tmp_path / "synth", num_train=6, num_test=2, num_frames=8, size=32, seed=0)
    item = ta.parse_list_file(root / "train.txt", root)[0]
    args = _args(num_frames=8, frame_stride=1, short_side=32, crop=28, test_clip_start="center")
    from common.video import read_video, resize_short_side, center_crop
    old = center_crop(resize_short_side(read_video(item.path), 32), 28).permute(3, 0, 1, 2)
    assert torch.equal(ta.ClipDataset([item], args, "test")[0][0][0], old)


def test_dataset_from_list_and_resize_on_decode(tmp_path):
    _frame_id_video(tmp_path / "a.mp4", 12, h=48, w=64)
    (tmp_path / "l.txt").write_text("a.mp4 1\n")
    ds = ta.ClipDataset.from_list(tmp_path / "l.txt", "train", num_frames=4, frame_stride=2, short_side=24, crop=20)
    clip, label, idx = ds[0]
    assert clip.shape == (3, 4, 20, 20) and clip.dtype == torch.uint8 and (label, idx) == (1, 0)
    test = ta.ClipDataset.from_list(tmp_path / "l.txt", "test", num_frames=4, short_side=24, crop=24, views=2)
    assert test[0][0].shape == (2, 3, 4, 24, 24)      # 48x64 decoded at 24x32, centre crop 24
    with pytest.raises(TypeError, match="unknown flag 'frames'"):
        ta.ClipDataset.from_list(tmp_path / "l.txt", frames=4)


# ----------------------------------------------------------------------------- StillMix lists (issue 15)

def _frame_folder(path, frames):
    path.mkdir(parents=True)
    for t, f in enumerate(frames):
        sv.write_jpeg(path / f"frame{t + 1:06d}.jpg", f)


def test_stillmix_rawframes_lists_map_to_folders_zips_and_videos(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    _frame_folder(tmp_path / "gen" / "jump_1__0", frames)              # StillMix: <id>/frame%06d.jpg
    sv.write_frames_zip(tmp_path / "gen" / "jump_1__1.zip", frames)    # ALBAR release: <id>.zip
    write_video(tmp_path / "gen" / "run_2.mp4", frames)                # a video named by the id
    (tmp_path / "testlist01.txt").write_text("jump_1__0 6 3\njump_1__1 6 3\nrun_2 7 1\nwave_3__0 6 2\n")
    items = ta.parse_list_file(tmp_path / "testlist01.txt", tmp_path / "gen")
    assert [(i.path.name, i.vid, i.label, i.nframes) for i in items] == [
        ("jump_1__0", "jump_1__0", 3, 6), ("jump_1__1.zip", "jump_1__1", 3, 6), ("run_2.mp4", "run_2", 1, 7),
        ("wave_3__0", "wave_3__0", 2, 6)]
    with pytest.warns(UserWarning, match="skipping 1 missing"):        # wave_3__0 is not on disk
        kept, n_missing = ta.drop_missing(items, "test", strict=False)
    assert n_missing == 1 and len(kept) == 3
    args = _args(num_frames=4, frame_stride=1, short_side=16, crop=16)
    ds = ta.ClipDataset(kept, args, "test")
    folder, zipped, vid = ds[0][0], ds[1][0], ds[2][0]
    assert torch.equal(folder, zipped) and folder.shape == (1, 3, 4, 16, 16)   # same JPEGs, same frames
    assert vid.shape == (1, 3, 4, 16, 16)          # the video's own count is used (the list's 7 is rawframes')
    assert ta.ClipDataset(kept[:1], args, "train")[0][0].shape == (3, 4, 16, 16)   # training from a frame folder
    # a folder whose frame count disagrees with the list is a bad item: skipped, or an error with --strict
    bad = [ta.Item(tmp_path / "gen" / "jump_1__0", 3, "jump_1__0", nframes=9)]
    with pytest.warns(UserWarning, match="list says 9 frames, found 6"):
        assert ta.ClipDataset(bad, args, "test")[0] is None
    args.strict = True
    with pytest.raises(ta.VideoDecodeError, match="list says 9 frames"):
        ta.ClipDataset(bad, args, "test")[0]


def test_bias_set_from_a_stillmix_list_and_bad_lines(tmp_path):
    rng = np.random.default_rng(1)
    scuba = tmp_path / "bias" / "HMDB51_SCUBA_Places365"
    for vid in ("jump_1__0", "jump_1__1", "wave_3__0"):
        _frame_folder(scuba / vid, rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8))
    (scuba / "testlist01.txt").write_text("jump_1__0 5 3\nwave_3__0 5 2\n")   # jump_1__1 is not listed
    sets, _ = ta.find_bias_sets(tmp_path / "bias", "HMDB51", {"jump_1": 3})
    assert [(i.vid, i.label) for i in sets["Places365"]["scuba"]] == [("jump_1__0", 3), ("wave_3__0", 2)]
    with pytest.raises(InputError, match=r"'jump_1__0' has label 3 but its video has label 0"):
        ta.find_bias_sets(tmp_path / "bias", "HMDB51", {"jump_1": 0})
    for text, where in (("jump_1__0\n", "testlist01.txt:1"), ("ok 5 1\njump_1__0 5 three\n", "testlist01.txt:2"),
                        ("jump_1__0 0 3\n", "testlist01.txt:1")):
        (scuba / "testlist01.txt").write_text(text)
        with pytest.raises(InputError, match=where) as e:
            ta.find_bias_sets(tmp_path / "bias", "HMDB51", {})
        assert "\n" not in str(e.value)
    (scuba / "testlist01.txt").write_text("jump_1__0 5 3 # a comment\n\njump_1__0 five 3\n")
    with pytest.raises(InputError, match=r"testlist01.txt:3: 'jump_1__0 five' is not a video .*<frame_dir> <nframes> <label>"):
        ta.find_bias_sets(tmp_path / "bias", "HMDB51", {})
    (scuba / "other.txt").write_text("")
    with pytest.raises(InputError, match="several list files"):
        ta.find_bias_sets(tmp_path / "bias", "HMDB51", {})


# ----------------------------------------------------------------------------- weights (issue 15/16)

def _tiny(num_classes):
    return ta.build_model(_args(arch="swin3d_tiny_test", drop_path=0.0), num_classes)


def test_weights_in_every_official_layout_load(tmp_path):
    src = _tiny(400)                                 # a K400-style 400-way model (torchvision keys)
    sd = src.state_dict()
    layouts = {
        "torchvision": sd,                                                      # swin3d_t-7615ae03.pth
        "albar_official": {"model_state_dict": sd},                             # ALBAR model_<ep>_bestAcc_*.pth
        "albar_snapshot": {"epoch": 7, "model_state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
        "project": {"model": sd, "epoch": 3, "extra": {"config": {"arch": "swin3d_tiny_test"}}},
        "ddp": {"model_state_dict": {"module." + k: v for k, v in sd.items()}},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        model = _tiny(5)
        info = ta.load_pretrained(model, tmp_path / f"{name}.pth", 5)
        assert info["missing_keys"] == [] == info["unexpected_keys"], name
        assert info["head"].startswith("new") and info["layout"] in ta.WEIGHT_LAYOUTS, name
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if not k.startswith("head.")), name
    # same class count: the head loads too (an ALBAR HMDB51 checkpoint evaluated on HMDB51)
    model = _tiny(400)
    assert ta.load_pretrained(model, tmp_path / "albar_official.pth", 400)["head"] == "loaded"
    assert torch.equal(model.head.weight, src.head.weight)


def test_weights_partial_or_foreign_files_are_errors_unless_allowed(tmp_path, monkeypatch):
    sd = _tiny(400).state_dict()
    part = {k: v for k, v in sd.items() if not k.startswith("features.0.0.attn.qkv")}
    part["extra.scale"] = torch.ones(1)
    torch.save(part, tmp_path / "part.pth")
    with pytest.raises(CheckpointError, match=r"missing backbone keys \[features.0.0.attn.qkv.bias, "
                                              r"features.0.0.attn.qkv.weight\]; unexpected keys \[extra.scale\]"):
        ta.load_pretrained(_tiny(5), tmp_path / "part.pth", 5)
    model = _tiny(5)
    before = model.features[0][0].attn.qkv.weight.clone()
    with pytest.warns(UserWarning, match="allow-partial-weights: 2 missing backbone keys"):
        info = ta.load_pretrained(model, tmp_path / "part.pth", 5, allow_partial=True)
    assert info["missing_keys"] == ["features.0.0.attn.qkv.bias", "features.0.0.attn.qkv.weight"]
    assert info["unexpected_keys"] == ["extra.scale"] and torch.equal(model.features[0][0].attn.qkv.weight, before)
    assert torch.equal(model.norm.weight, sd["norm.weight"])
    # a Video-Swin / mmaction file names the conversion command
    torch.save({"state_dict": {"backbone." + k: v for k, v in sd.items()}, "meta": {}}, tmp_path / "vs.pth")
    with pytest.raises(CheckpointError, match="train_uas.py convert-weights"):
        ta.load_pretrained(_tiny(5), tmp_path / "vs.pth", 5)
    seen = []
    monkeypatch.setattr(ta, "safe_load", lambda path, **kw: seen.append(kw["trust"]) or torch.load(path))
    with pytest.warns(UserWarning, match="allow-partial-weights"):
        ta.load_pretrained(_tiny(5), tmp_path / "part.pth", 5, allow_partial=True, trust=True)
    assert seen == [True]                            # --trust-checkpoint reaches the loader
    monkeypatch.undo()
    torch.save({"epoch": 1}, tmp_path / "noweights.pth")
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        ta.load_pretrained(_tiny(5), tmp_path / "noweights.pth", 5)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _cli(argv, capsys):
    """Run train_albar's CLI as `python train_albar.py` does; returns (exit code, stderr)."""
    from common.config import run_main
    with pytest.raises(SystemExit) as e:
        run_main(ta.main, argv)
    return e.value.code, capsys.readouterr().err


def test_cli_user_errors_are_one_line_and_payloads_never_run(tmp_path, capsys):
    root = _mini_benchmark(tmp_path, n_train=12, n_test=6)
    base = ["--dataset", "list", "--data-root", str(root), "--train-list", "train.txt", "--test-list", "test.txt",
            "--arch", "cnn3d", "--cnn-width", "4", "--num-frames", "8", "--frame-stride", "1", "--short-side", "16",
            "--crop", "16", "--epochs", "1", "--workers", "0", "--device", "cpu", "--val-fraction", "0",
            "--output-dir", str(tmp_path / "out")]
    code, err = _cli(base, capsys)                     # real data, no --weights, no --from-scratch
    assert code == 2 and "no --weights given" in err and "--from-scratch" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()             # refused before any work
    marker = tmp_path / "PWNED"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pth")
    for flags in (["--weights", str(tmp_path / "evil.pth")], ["--resume", str(tmp_path / "evil.pth")],
                  ["--resume", str(tmp_path / "evil.pth"), "--eval-only"]):
        code, err = _cli(base + flags, capsys)
        assert code == 2 and "evil.pth" in err and "--trust-checkpoint" in err and err.count("\n") == 1, err
        assert not marker.exists()
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "evil.pth").read_bytes()[:40])
    code, err = _cli(base + ["--weights", str(tmp_path / "trunc.pth")], capsys)
    assert code == 2 and "trunc.pth" in err and err.count("\n") == 1
    (root / "bad.txt").write_text("videos/train/synth_train_00000.mp4 0\nvideos/train/synth_train_00001.mp4\n")
    code, err = _cli(base + ["--from-scratch", "--train-list", "bad.txt"], capsys)
    assert code == 2 and "bad.txt:2: expected" in err and err.count("\n") == 1
    code, err = _cli(base + ["--from-scratch", "--num-frames", "0"], capsys)
    assert code == 2 and "--num-frames 0" in err


# ----------------------------------------------------------------------------- end to end

def test_short_run_loss_drops_and_outputs(tmp_path):
    root = _mini_benchmark(tmp_path, n_train=60, n_test=12)
    out = tmp_path / "run"
    argv = ["--dataset", "list", "--data-root", str(root), "--train-list", "train.txt", "--test-list", "test.txt",
            "--bias-root", "bias", "--bias-prefix", "SYNTH", "--arch", "cnn3d", "--cnn-width", "8",
            "--num-frames", "8", "--frame-stride", "1", "--short-side", "16", "--crop", "16", "--hflip-prob", "0",
            "--epochs", "6", "--batch-size", "12", "--lr", "3e-3", "--warmup-epochs", "0", "--eval-every", "3",
            "--eval-batch-size", "32", "--workers", "0", "--device", "cpu", "--output-dir", str(out),
            "--w-gp", "1", "--from-scratch"]
    args = ta.resolve_args(ta.parse_args(ta.build_parser(), argv))
    res = ta.run(args)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and log[-1]["loss_ce"] < log[0]["loss_ce"]
    for key in ("loss", "loss_ce", "ce_static", "loss_ent", "loss_gp", "train_top1", "static_top1",
                "static_entropy", "n_skipped", "data_time", "step_time"):
        assert key in log[0]
    assert "val_top1" in log[2] and "val_top1" not in log[0]
    for block in ("best", "last"):
        for k in ("synth", "synth_scuba_other", "synth_scufo_unseen", "synth_contra_avg", "n_skipped"):
            assert k in res[block]
    assert json.loads((out / "results.json").read_text())["bias_protocol"] == "box"
    for f in ("config.yaml", "checkpoint.pth", "best.pth", "splits/train.txt", "splits/val.txt",
              "preds/best/test.csv", "preds/best/scufo_other.csv", "plots/losses.png"):
        assert (out / f).is_file(), f
    n_train = len((out / "splits/train.txt").read_text().split("\n")) - 1
    n_val = len((out / "splits/val.txt").read_text().split("\n")) - 1
    assert (n_train, n_val) == (48, 12)
    # resume continues from the saved epoch without retraining
    args2 = ta.resolve_args(ta.parse_args(ta.build_parser(), argv + ["--resume", "auto", "--epochs", "7"]))
    ta.run(args2)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6, 7]


def test_synthetic_benchmark_is_biased_and_motion_defined(tmp_path):
    root = _mini_benchmark(tmp_path, n_train=60, n_test=12)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["bias"] == 0.95
    with zipfile.ZipFile(next((root / "bias" / "SYNTH_SCUBA_Other").glob("*.zip"))) as z:
        assert z.namelist() == sorted(z.namelist()) and len(z.namelist()) == 8
    # a trajectory starts uniformly and wraps: single-frame positions carry no class information
    rng = np.random.default_rng(0)
    pos = np.array([sv.trajectory(c, 8, rng, 32)[4] for c in range(6) for _ in range(300)])
    assert pos.min() >= 0 and pos.max() < 32
    means = pos.reshape(6, 300, 2).mean(1)
    assert np.abs(means - 15.5).max() < 2.5



def test_ucf101_bias_labels_from_the_name():
    lab = ta.UCFLabels({"v_YoYo_g01_c01": 1}, {"ApplyEyeMakeup": 0, "YoYo": 1})
    assert ta.bias_label("v_YoYo_g01_c01", lab) == 1
    assert ta.bias_label("v_ApplyEyeMakeup_g12_c04", lab) == 0     # not in the lists; group >= 10
    assert ta.bias_label("v_Unknown_g01_c01", lab) is None


def test_demo_writes_the_summary_rows(tmp_path):
    out = tmp_path / "demo"
    rows = ta.demo(["--output-dir", str(out), "--seeds", "1", "--epochs", "1", "--steps-per-epoch", "2",
                    "--num-train", "60", "--num-test", "12", "--batch-size", "8", "--jobs", "1",
                    "--ablation-seeds", "1", "--extra", "--cnn-width 4"])
    summary = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["method"], r["seed"]) for r in summary] == [("baseline", 1), ("albar", 1)] == \
        [(r["method"], r["seed"]) for r in rows]
    for r in summary:
        assert {"iid", "scuba", "scufo", "contrasted", "cpu_s"} <= set(r)
        assert 0 <= r["contrasted"] <= min(r["scuba"], 100 - r["scufo"]) + 1e-6  # right on SCUBA, wrong on SCUFO
    assert json.loads((out / "ablation.json").read_text())["rows"][0]["method"] == "albar_no_gp"
    assert (out / "albar_seed1" / "results.json").is_file()
