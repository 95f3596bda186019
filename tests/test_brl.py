"""BRL (train_brl.py): graphs, PYSKL loading + errors, LT lists, pipeline, ST-GCN++, mixup, loss
schedule, ensemble, a short run whose loss drops, and a 2-process gloo run."""
import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_brl as brl
from common.data import brl_synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- graphs

def test_ntu_spatial_graph_subsets_and_normalisation():
    A = brl.build_graph("nturgb+d", "spatial")
    assert A.shape == (3, 25, 25)
    assert np.array_equal(A[0], np.eye(25))
    # In: column = child, one entry at its parent; the centre (20) has no parent -> zero column
    col = A[1].sum(0)
    assert col[20] == 0 and np.allclose(np.delete(col, 20), 1)
    assert A[1][20, 1] == 1 and A[1][0, 12] == 1 and A[1][7, 21] == 1  # 2->21, 13->1, 22->8 (1-based)
    # Out: each parent's column averages over its children; leaves have zero columns
    assert np.allclose(A[2][[1, 2, 4, 8], 20], 0.25) and np.isclose(A[2][:, 20].sum(), 1)
    assert A[2][:, 3].sum() == 0  # head is a leaf
    # convention of graph_aggregate (v = source, w = target): joint 1 takes joint 20's feature via In
    x = torch.zeros(1, 3, 1, 1, 25)
    x[0, 1, 0, 0, 20] = 5.0
    y = torch.einsum("nkctv,kvw->nctw", x, torch.from_numpy(A))
    assert y[0, 0, 0, 1] == 5.0 and y[0, 0, 0, 2] == 5.0 and y[0, 0, 0, 0] == 0


def test_coco_and_stgcn_spatial_graphs():
    A = brl.build_graph("coco", "spatial")
    assert A.shape == (3, 17, 17)
    assert A[1].sum(0)[0] == 0 and np.allclose(A[1].sum(0)[1:], 1)
    B = brl.build_graph("nturgb+d", "stgcn_spatial")
    assert B.shape == (3, 25, 25)
    assert np.allclose(B.sum((0, 1)), 1)  # column-normalised (adjacency + I) split into three subsets
    assert np.allclose(np.diag(B[0]), B[0].sum(0))  # subset 0 is diagonal only
    with pytest.raises(ValueError, match="graph mode"):
        brl.build_graph("nturgb+d", "bogus")


def test_graph_aggregate_matches_einsum_and_param_counts():
    from common import ops
    torch.manual_seed(0)
    A = torch.from_numpy(brl.build_graph()).requires_grad_(True)
    x = torch.randn(2, 3 * 4, 5, 25, requires_grad=True)
    ref = torch.einsum("nkctv,kvw->nctw", x.view(2, 3, 4, 5, 25), A)
    out = ops.graph_aggregate(x, A)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    gx, gA = torch.autograd.grad(ref, (x, A), g)
    hx, hA = torch.autograd.grad(out, (x, A), g)
    torch.testing.assert_close(hx, gx)
    torch.testing.assert_close(hA, gA)
    m = brl.STGCNPP(60, brl.build_graph())
    assert sum(p.numel() for n, p in m.named_parameters() if not n.startswith("fc.")) == 1_387_724
    assert sum(p.numel() for p in m.parameters()) == 1_403_144
    assert sum(p.numel() for p in brl.STGCNPP(120, brl.build_graph()).parameters()) == 1_418_564


def test_model_forward_shapes_and_head():
    brl.GCN_IMPL = "einsum"
    try:
        m = brl.STGCNPP(10, brl.build_graph(), base_channels=16, num_stages=4, inflate_stages=(3,), down_stages=(3,))
        f = m.features(torch.randn(2, 2, 16, 25, 3))
        assert f.shape == (2, 2, 32, 8, 25)
        assert m(torch.randn(2, 2, 16, 25, 3)).shape == (2, 10)
        assert torch.count_nonzero(m.fc.bias) == 0 and m.fc.weight.std() < 0.05
    finally:
        brl.GCN_IMPL = "auto"


# ---------------------------------------------------------------------------------------------- LT lists

def test_lt_counts_match_spec_table():
    c = brl.lt_counts(600, 100, 60)
    assert (sum(c), c[0], c[-1]) == (7892, 600, 6)
    assert sum(brl.lt_counts(600, 50, 60)) == 9150 and brl.lt_counts(600, 50, 60)[-1] == 12
    assert sum(brl.lt_counts(600, 10, 60)) == 14142 and brl.lt_counts(600, 10, 60)[-1] == 60
    assert sum(brl.lt_counts(600, 100, 120)) == 15600 and sum(brl.lt_counts(600, 10, 120)) == 28182
    assert sum(brl.lt_counts(400, 100, 120)) == 10378 and brl.lt_counts(400, 100, 120)[-1] == 4
    assert sum(brl.lt_counts(100, 10, 10)) == 403
    groups = brl.shot_groups(c)
    assert [len(groups[k]) for k in ("many", "medium", "few")] == [23, 21, 16]


def _fake_annotations(num_classes, per_class, T=20, rng=None):
    rng = rng or np.random.default_rng(0)
    anns, names = [], []
    for c in range(num_classes):
        for i in range(per_class):
            name = f"S001C001P{i:03d}R001A{c + 1:03d}"
            anns.append({"frame_dir": name, "label": c, "total_frames": T,
                         "keypoint": rng.normal(size=(1, T, 25, 3)).astype(np.float16)})
            names.append(name)
    return anns, names


def test_make_lt_list_counts_order_and_text_format(tmp_path):
    anns, names = _fake_annotations(60, 600, T=2)
    lt = brl.make_lt_list(anns, names, 60, 600, 100)
    label = {a["frame_dir"]: a["label"] for a in anns}
    counts = np.bincount([label[n] for n in lt], minlength=60)
    assert len(lt) == 7892 and counts[0] == 600 and counts[-1] == 6
    assert counts.tolist() == brl.lt_counts(600, 100, 60)
    assert lt == brl.make_lt_list(anns, names, 60, 600, 100)  # np.random.seed(0) once: deterministic
    assert lt[:600] != sorted(lt[:600])  # shuffled within the class
    path = tmp_path / "NTU60_xsub_exp_100.txt"
    brl.write_lt_list(path, lt)
    text = path.read_text()
    assert text.splitlines()[0] == lt[0] and text.count("\n") == 7892 and " " not in text.splitlines()[0]
    assert brl.read_lt_list(path, known=set(names)) == lt


# ---------------------------------------------------------------------------------------------- bad input

def _write(tmp_path, obj, name="ann.pkl"):
    p = tmp_path / name
    with open(p, "wb") as f:
        pickle.dump(obj, f)
    return p


def test_bad_input_errors_name_the_entry(tmp_path):
    anns, names = _fake_annotations(3, 2)
    good = {"split": {"xsub_train": names[:4], "xsub_val": names[4:]}, "annotations": anns}
    assert len(brl.load_pyskl(_write(tmp_path, good), 3)["annotations"]) == 6
    with pytest.raises(brl.DataFormatError, match="'split' and 'annotations'"):
        brl.load_pyskl(_write(tmp_path, {"annotations": anns}))
    bad = [dict(a) for a in anns]
    del bad[2]["keypoint"]
    with pytest.raises(brl.DataFormatError, match=r"annotations\[2\].*S001C001P000R001A002.*missing key.*keypoint"):
        brl.load_pyskl(_write(tmp_path, {"split": {}, "annotations": bad}))
    bad = [dict(a) for a in anns]
    bad[1]["keypoint"] = bad[1]["keypoint"][0]
    with pytest.raises(brl.DataFormatError, match=r"annotations\[1\].*rank 4.*\(20, 25, 3\)"):
        brl.load_pyskl(_write(tmp_path, {"split": {}, "annotations": bad}))
    bad = [dict(a) for a in anns]
    bad[5]["label"] = 3
    with pytest.raises(brl.DataFormatError, match=r"annotations\[5\].*label 3 out of range \[0, 3\)"):
        brl.load_pyskl(_write(tmp_path, {"split": {}, "annotations": bad}), 3)
    lt = tmp_path / "lt.txt"
    lt.write_text(names[0] + "\nS999C001P001R001A001\n")
    with pytest.raises(brl.DataFormatError, match=r"S999C001P001R001A001.*line 2"):
        brl.read_lt_list(lt, known=set(names))
    with pytest.raises(brl.DataFormatError, match="split 'xview_train' not found"):
        brl.split_names(good, "xview_train", "ann.pkl")
    with pytest.raises(brl.DataFormatError, match="missing.pkl: PYSKL annotation pickle not found"):
        brl.load_pyskl(tmp_path / "missing.pkl")
    assert issubclass(brl.DataFormatError, brl.config_lib.InputError)  # run_main prints it as one line


def test_nonfinite_keypoints_skipped_or_strict(tmp_path):
    anns, names = _fake_annotations(3, 2)
    anns[1]["keypoint"] = anns[1]["keypoint"].copy()
    anns[1]["keypoint"][0, 3, 7, 1] = np.nan
    anns[4]["keypoint"] = np.full_like(anns[4]["keypoint"], np.inf)
    path = _write(tmp_path, {"split": {"xsub_train": names[:4], "xsub_val": names[4:]}, "annotations": anns})
    data = brl.load_pyskl(path, 3, layout="nturgb+d")
    assert data["skipped_nonfinite"] == {names[1]: 0, names[4]: 2}
    assert [a["frame_dir"] for a in data["annotations"]] == [n for i, n in enumerate(names) if i not in (1, 4)]
    with pytest.raises(brl.DataFormatError, match=r"annotations\[1\] \(frame_dir='S001C001P001R001A001'\): 1 joint"
                                                 r".*non-finite.*--strict"):
        brl.load_pyskl(path, 3, layout="nturgb+d", strict=True)


def test_wrong_joint_count_or_channels_name_file_frame_dir_and_shapes(tmp_path):
    anns, names = _fake_annotations(2, 2)
    good = {"split": {"xsub_train": names[:2], "xsub_val": names[2:]}, "annotations": anns}
    coco = [dict(a) for a in anns]
    coco[2]["keypoint"] = np.zeros((1, 20, 17, 3), np.float16)  # COCO-17 keypoints in an NTU-25 file
    path = _write(tmp_path, dict(good, annotations=coco))
    with pytest.raises(brl.DataFormatError, match=r"ann.pkl: annotations\[2\] \(frame_dir='S001C001P000R001A002'\): "
                                                 r"'keypoint' shape \(1, 20, 17, 3\): expected \(M, T, 25, 3\).*V = 17"):
        brl.load_pyskl(path, 2, layout="nturgb+d")
    two_d = [dict(a) for a in anns]
    two_d[0]["keypoint"] = np.zeros((1, 20, 25, 2), np.float16)
    with pytest.raises(brl.DataFormatError, match=r"annotations\[0\].*expected \(M, T, 25, 3\).*C = 2"):
        brl.load_pyskl(_write(tmp_path, dict(good, annotations=two_d)), 2, layout="nturgb+d")
    with pytest.raises(brl.DataFormatError, match=r"expected \(M, T, 17, 2\) for the 'coco' layout"):
        brl.load_pyskl(_write(tmp_path, good), 2, layout="coco")


# ---------------------------------------------------------------------------------------------- pipeline

def test_pre_normalize_aligns_spine_and_shoulders():
    rng = np.random.default_rng(1)
    x = brl_synth.make_clip(0, rng)  # camera coordinates, y up
    y = brl.pre_normalize_3d(x)
    assert np.allclose(y[0, 0, 1], 0, atol=1e-5)  # centred on joint 1 of person 0 at frame 0
    sh = y[0, 0, 8] - y[0, 0, 4]
    assert sh[0] > 0 and np.allclose(sh[1:], 0, atol=1e-4)  # second rotation: j8 - j4 exactly along +x
    spine = y[0, 0, 1] - y[0, 0, 0]  # first rotation put it on +z; the second tilts it only slightly
    assert spine[2] > 0 and np.arccos(spine[2] / np.linalg.norm(spine)) < 0.15
    v = x[0, 0, 1] - x[0, 0, 0]
    R = brl.rodrigues(np.cross(v, [0, 0, 1]), brl._angle(v, [0, 0, 1]))
    assert np.allclose(R @ v, [0, 0, np.linalg.norm(v)], atol=1e-5)
    # empty frames of the main person are dropped, an all-zero joint stays zero
    z = np.concatenate([np.zeros_like(x[:, :3]), x], 1)
    z[0, 5, 3] = 0
    w = brl.pre_normalize_3d(z)
    assert w.shape[1] == x.shape[1] and np.all(w[0, 2, 3] == 0)


def test_streams_definitions():
    x = np.random.default_rng(0).normal(size=(2, 10, 25, 3)).astype(np.float32)
    b = brl.compute_stream(x, "b")
    assert np.allclose(b[:, :, 0], x[:, :, 0] - x[:, :, 1]) and np.all(b[:, :, 20] == 0)
    k = brl.compute_stream(x, "k")
    assert np.all(k[:, :, [1, 2, 4, 8, 20]] == 0) and np.allclose(k[:, :, 6], x[:, :, 6] - x[:, :, 4])
    jm = brl.compute_stream(x, "jm")
    assert np.allclose(jm[:, :-1], x[:, 1:] - x[:, :-1]) and np.all(jm[:, -1] == 0)
    bm = brl.compute_stream(x, "bm")
    assert np.allclose(bm[:, :-1], b[:, 1:] - b[:, :-1])
    coco = np.concatenate([x[:, :, :17, :2], np.abs(x[:, :, :17, :1])], -1)
    cb = brl.compute_stream(coco, "b", "coco")
    assert np.allclose(cb[:, :, 3, 2], (coco[:, :, 3, 2] + coco[:, :, 1, 2]) / 2)
    with pytest.raises(ValueError, match="skip stream"):
        brl.compute_stream(coco, "k", "coco")


@pytest.mark.parametrize("T", [30, 64, 100, 200])
def test_uniform_sampling_rules(T):
    rng = np.random.default_rng(0)
    idx = brl.uniform_sample_train(T, 64, rng)
    assert idx.shape == (64,)
    if T >= 64:
        assert np.all(np.diff(idx) >= 1) and idx.min() >= 0 and idx.max() < T
    else:
        assert np.all(np.diff(idx) == 1)
    t1 = brl.uniform_sample_test(T, 64, 10)
    assert t1.shape == (10, 64) and np.array_equal(t1, brl.uniform_sample_test(T, 64, 10))
    if T < 64:
        assert [r[0] for r in t1] == [i * T // 10 for i in range(10)]


def _pyskl_test_clips(num_frames, clip_len, num_clips, seed=255, p_interval=(1, 1)):
    """PYSKL UniformSampleFrames._get_test_clips + the np.mod of __call__, transcribed from
    pyskl/datasets/pipelines/sampling.py (global NumPy RNG, seeded once per call)."""
    np.random.seed(seed)
    all_inds = []
    for i in range(num_clips):
        old_num_frames = num_frames
        pi = p_interval
        ratio = np.random.rand() * (pi[1] - pi[0]) + pi[0]
        num_frames = int(ratio * num_frames)
        off = np.random.randint(old_num_frames - num_frames + 1)
        if num_frames < clip_len:
            start_ind = i if num_frames < num_clips else i * num_frames // num_clips
            inds = np.arange(start_ind, start_ind + clip_len)
        elif clip_len <= num_frames < clip_len * 2:
            basic = np.arange(clip_len)
            inds = np.random.choice(clip_len + 1, num_frames - clip_len, replace=False)
            offset = np.zeros(clip_len + 1, dtype=np.int64)
            offset[inds] = 1
            offset = np.cumsum(offset)
            inds = basic + offset[:-1]
        else:
            bids = np.array([i * num_frames // clip_len for i in range(clip_len + 1)])
            bsize = np.diff(bids)
            bst = bids[:clip_len]
            offset = np.random.randint(bsize)
            inds = bst + offset
        all_inds.append(inds + off)
        num_frames = old_num_frames
    return np.mod(np.concatenate(all_inds), num_frames)


@pytest.mark.parametrize("T,clip_len,num_clips", [(5, 64, 10), (30, 64, 1), (30, 64, 10), (64, 64, 1), (64, 64, 10),
                                                  (100, 64, 1), (100, 64, 10), (127, 64, 10), (128, 64, 10),
                                                  (300, 64, 10), (16, 16, 10), (70, 16, 1)])
def test_test_sampling_is_pyskl_exact(T, clip_len, num_clips):
    ours = np.mod(brl.uniform_sample_test(T, clip_len, num_clips), T).reshape(-1)
    assert np.array_equal(ours, _pyskl_test_clips(T, clip_len, num_clips))
    # and what the pipeline takes: frame f of the output is frame idx[f] of the input
    kp = np.zeros((1, T, 25, 3), np.float32)
    kp[0, :, :, 0] = np.arange(T)[:, None] + 1.0  # x = frame number + 1 on every joint
    kp[0, :, 1, :] = 0  # joint 1 at the origin: centring changes nothing
    kp[0, :, 0] = [0, 0, -1]  # spine j1 - j0 on +z and shoulders j8 - j4 on +x at frame 0: no rotation
    kp[0, :, 8], kp[0, :, 4] = [1, 0, 0], 0
    x = brl.skeleton_pipeline(kp, feat="j", layout="nturgb+d", train=False, rng=None, clip_len=clip_len,
                              num_clips=num_clips, num_person=1)
    assert np.allclose(x[:, 0, :, 5, 0].reshape(-1), _pyskl_test_clips(T, clip_len, num_clips) + 1)


@pytest.mark.parametrize("feat", brl.STREAMS)
def test_pipeline_shapes_per_stream(feat):
    anns, _ = _fake_annotations(1, 1, T=70)
    kp = anns[0]["keypoint"]
    tr = brl.skeleton_pipeline(kp, feat=feat, layout="nturgb+d", train=True, rng=np.random.default_rng(0))
    assert tr.shape == (1, 2, 64, 25, 3) and tr.dtype == np.float32
    assert np.all(tr[:, 1] == 0)  # padded second person
    te = brl.skeleton_pipeline(kp, feat=feat, layout="nturgb+d", train=False, rng=None, num_clips=10)
    assert te.shape == (10, 2, 64, 25, 3)
    te2 = brl.skeleton_pipeline(kp, feat=feat, layout="nturgb+d", train=False, rng=None, num_clips=10)
    assert np.array_equal(te, te2)


def test_coco_2d_pipeline_shapes():
    rng = np.random.default_rng(0)
    kp = rng.uniform(0, 100, size=(2, 50, 17, 2)).astype(np.float16)
    score = rng.uniform(0, 1, size=(2, 50, 17)).astype(np.float16)
    for feat in ("j", "b", "jm", "bm"):
        x = brl.skeleton_pipeline(kp, feat=feat, layout="coco", train=True, rng=rng, score=score, img_shape=(100, 100))
        assert x.shape == (1, 2, 64, 17, 3)
    j = brl.skeleton_pipeline(kp, feat="j", layout="coco", train=False, rng=None, score=score,
                              img_shape=(100, 100))
    assert np.abs(j[..., :2]).max() <= 1.0 + 1e-3  # centred and scaled by the image size


def test_flip_relabels_joints_without_mirroring():
    x = np.random.default_rng(0).normal(size=(1, 8, 25, 3)).astype(np.float32) + 1
    a = brl.skeleton_pipeline(x, feat="j", layout="nturgb+d", train=True, rng=np.random.default_rng(0), clip_len=8,
                              scale=0, rot=0, flip_p=1.0)
    b = brl.skeleton_pipeline(x, feat="j", layout="nturgb+d", train=True, rng=np.random.default_rng(0), clip_len=8,
                              scale=0, rot=0, flip_p=0.0)
    assert np.allclose(a[0, 0][:, brl.NTU_FLIP], b[0, 0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- method

def test_mixup_label_weights_rule():
    n_a = torch.tensor([600., 6., 100., 100., 300.])
    n_b = torch.tensor([6., 600., 100., 34., 100.])
    lam = brl.mixup_lambda(n_a, n_b)
    # head upper + tail partner -> tail label (lam 0); tail upper + head partner -> lam 1; else alpha
    assert lam.tolist() == pytest.approx([0.0, 1.0, 0.64, 0.64, 0.64])
    assert brl.mixup_lambda(torch.tensor([301.]), torch.tensor([100.])).item() == 0.0


def test_partial_mixup_parts_and_batch_rule():
    counts = torch.tensor([600., 6., 100.])
    x = torch.arange(16.)[:, None, None, None, None].expand(16, 2, 4, 25, 3).clone()
    y = torch.tensor([0, 1, 2, 0] * 4)
    upper = brl.LAYOUTS["nturgb+d"][3]
    lower = [v for v in range(25) if v not in upper]
    xm, a, b, lam = brl.partial_mixup(x, y, counts, upper, generator=torch.Generator().manual_seed(0))
    mixed = (xm != x).any(dim=(1, 2, 3, 4)).nonzero().flatten()
    assert len(mixed) == 1  # floor(16/16)
    i = mixed.item()
    j = int(xm[i, 0, 0, lower[0], 0])
    assert j != i and torch.all(xm[i][:, :, upper] == i) and torch.all(xm[i][:, :, lower] == j)
    assert a[i] == y[i] and b[i] == y[j]
    assert lam[i] == brl.mixup_lambda(counts[y[i]][None], counts[y[j]][None])[0]
    others = torch.ones(16, dtype=torch.bool)
    others[i] = False
    assert torch.equal(a[others], b[others]) and torch.all(lam[others] == 1)
    # official joint-slot scramble: upper joints land in slots 0..15
    xs, _, _, _ = brl.partial_mixup(x, y, counts, upper, scramble=True, generator=torch.Generator().manual_seed(0))
    assert torch.all(xs[i][:, :, :16] == i) and torch.all(xs[i][:, :, 16:] == j)
    # batch below 16: nothing is mixed
    x15 = x[:15]
    xm15, a15, b15, lam15 = brl.partial_mixup(x15, y[:15], counts, upper)
    assert torch.equal(xm15, x15) and torch.all(lam15 == 1) and torch.equal(a15, b15)


def test_two_stage_action_aware_weights():
    counts = brl.lt_counts(600, 100, 60)
    for e in range(19):
        assert torch.all(brl.class_weights(e, counts) == 1)
    w = brl.class_weights(19, counts)
    assert w.sum().item() == pytest.approx(60, rel=1e-5)
    assert w[0].item() == pytest.approx(0.041, abs=1e-3) and w[30].item() == pytest.approx(0.535, abs=1e-3)
    assert w[-1].item() == pytest.approx(4.08, abs=1e-2) and (w.max() / w.min()).item() == pytest.approx(99.5, abs=0.1)
    for e in (20, 21, 22, 23):
        assert torch.allclose(brl.class_weights(e, counts), w)  # clean default: reweight in all of 19-23
    # official alternation: epochs 20 and 22 nearly uniform
    for e in (20, 22):
        wq = brl.class_weights(e, counts, official=True)
        assert (wq.max() / wq.min()).item() == pytest.approx(1.01, abs=2e-3)
    assert torch.allclose(brl.class_weights(21, counts, official=True), w)
    assert torch.all(brl.class_weights(23, counts, loss="ce") == 1)


def test_mixup_loss_normalisers():
    torch.manual_seed(0)
    z = torch.randn(6, 4)
    a = torch.tensor([0, 1, 2, 3, 0, 1])
    w = torch.tensor([0.5, 1.0, 2.0, 0.5])
    lam = torch.ones(6)
    # no mixed sample: weighted CE with mean reduction sum w l / sum w
    assert torch.allclose(brl.mixup_loss(z, a, a, lam, w), F.cross_entropy(z, a, weight=w))
    b = a.clone()
    b[2] = 0
    lam[2] = 0.64
    la, lb = F.cross_entropy(z, a, reduction="none"), F.cross_entropy(z, b, reduction="none")
    want = (lam * w[a] * la).sum() / w[a].sum() + ((1 - lam) * w[b] * lb).sum() / w[b].sum()
    assert torch.allclose(brl.mixup_loss(z, a, b, lam, w), want)
    scalar = 0.64 * F.cross_entropy(z, a, weight=w) + 0.36 * F.cross_entropy(z, b, weight=w)
    assert torch.allclose(brl.mixup_loss(z, a, b, lam, w, scalar_lambda=True), scalar)


def test_ensemble_weights_and_cli(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=40)
    files = []
    for s in range(6):
        p = rng.dirichlet(np.ones(5), size=40).astype(np.float32)
        path = tmp_path / f"s{s}_pred.pkl"
        brl.save_preds(path, torch.from_numpy(p))
        files.append(str(path))
    np.save(tmp_path / "test_labels.npy", labels)
    res = brl.ensemble_main(["--scores", *files, "--labels", str(tmp_path / "test_labels.npy"),
                             "--output", str(tmp_path / "ens.json")])
    assert res["weights"] == [2, 2, 2, 1, 1, 1]
    fused = sum(w * brl.load_preds(f) for w, f in zip([2, 2, 2, 1, 1, 1], files))
    assert res["top1"] == pytest.approx(float((fused.argmax(1) == labels).mean()))
    assert brl.ensemble_main(["--scores", *files[:4], "--labels", str(tmp_path / "test_labels.npy")])["weights"] == [2, 2, 1, 1]
    assert brl.ensemble_main(["--scores", *files[:2], "--labels", str(tmp_path / "test_labels.npy")])["weights"] == [1, 1]


def test_configs_parse_and_help():
    import glob
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "brl", "*.yaml")))
    assert len(files) == 24  # {ntu60 xsub, xview, ntu120 xsub, xset} x 6 streams
    for f in files:
        a = brl.config_lib.parse_args(brl.build_parser(), ["--config", f])
        assert a.feat in brl.STREAMS and a.lt_list.endswith("_exp_100.txt") and a.split in a.lt_list
    help_text = brl.build_parser().format_help()
    for flag in ["--official-quirks", "--no-mix", "--drw-epoch", "--mix-kappa", "--test-clips", "--gcn-impl"]:
        assert flag in help_text


# ---------------------------------------------------------------------------------------------- runs

TINY = ["--synthetic", "--lt-list", "gen", "--imb-factor", "10", "--synth-n-max", "40", "--synth-test-per-class", "3",
        "--val-per-class", "2", "--clip-len", "16", "--repeat", "1", "--batch-size", "16", "--workers", "0",
        "--base-channels", "16", "--num-stages", "2", "--inflate-stages", "2", "--down-stages", "2",
        "--test-clips", "2", "--device", "cpu", "--num-classes", "6", "--resume", ""]


def test_short_run_loss_drops_and_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "run"
    args = brl.config_lib.parse_args(brl.build_parser(), TINY + ["--epochs", "4", "--lr", "0.5", "--loss", "ce", "--no-mix",
                                                                 "--output-dir", str(out), "--gcn-impl", "auto"])
    res = brl.run(args)
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("phase") == "train"]
    assert len(losses) == 4 and losses[-1] < 0.75 * losses[0]
    for f in ["config.yaml", "checkpoint.pth", "best.pth", "results.json", "last_pred.pkl", "best_pred.pkl",
              "test_labels.npy", "plots/confusion_last.png", "plots/per_class_acc_last.png", "plots/curves.png"]:
        assert (out / f).is_file(), f
    r = json.loads((out / "results.json").read_text())
    assert set(r["last"]) >= {"top1", "top5", "mean_class", "many", "medium", "few", "tail", "per_class"}
    assert len(brl.load_preds(out / "last_pred.pkl")) == 18 and len(res["last"]["per_class"]) == 6
    # eval-only on the saved best checkpoint reproduces the best test metrics
    args = brl.config_lib.parse_args(brl.build_parser(), TINY + ["--output-dir", str(out), "--eval-only"])
    ev = brl.run(args)
    assert ev["eval"]["top1"] == pytest.approx(res["best"]["top1"])


def test_resume_is_exact(tmp_path, monkeypatch):
    """--stop-after 1 then --resume auto gives the same weights as one uninterrupted run (mixup + aa on)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    common = TINY[:-2] + ["--epochs", "2", "--drw-epoch", "1", "--num-stages", "1", "--synth-dir", str(tmp_path / "syn"),
                          "--test-clips", "1"]
    parse = lambda extra: brl.config_lib.parse_args(brl.build_parser(), common + extra)  # noqa: E731
    brl.run(parse(["--resume", "", "--output-dir", str(tmp_path / "full")]))
    assert brl.run(parse(["--resume", "", "--stop-after", "1", "--output-dir", str(tmp_path / "cut")])) == {}
    brl.run(parse(["--resume", "auto", "--output-dir", str(tmp_path / "cut")]))
    a = brl.ckpt_lib.read_checkpoint(tmp_path / "full" / "checkpoint.pth")
    b = brl.ckpt_lib.read_checkpoint(tmp_path / "cut" / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_saved_checkpoint_reevaluates_to_results(tmp_path):
    """2 gloo processes, per-rank batch 8: mixup-off is reported by every rank and in results.json; rank 0's
    BN statistics are broadcast before evaluating and saving, so --eval-only on the saved checkpoint gives
    exactly results.json's 'last' (without the broadcast rank 1's half of the test set differs)."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(ROOT, "train_brl.py"), *TINY,
           "--epochs", "1", "--batch-size", "8", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    for rank in (0, 1):
        assert f"[rank {rank}] WARNING: mixup is OFF: per-rank batch 8 gives floor(0.0625 x 8) = 0" in proc.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["mixup"] == {"enabled": True, "per_rank_batch": 8, "mixed_per_batch": 0, "active": False}
    assert len(brl.load_preds(out / "last_pred.pkl")) == 18  # every test sample once, padding dropped
    args = brl.config_lib.parse_args(brl.build_parser(), TINY + ["--output-dir", str(out), "--eval-only",
                                                                 "--checkpoint", str(out / "checkpoint.pth")])
    ev = brl.run(args)["eval"]
    assert json.loads((out / "eval_results.json").read_text())["eval"]["per_class"] == ev["per_class"]
    np.testing.assert_allclose(brl.load_preds(out / "eval_pred.pkl"), brl.load_preds(out / "last_pred.pkl"), rtol=0, atol=1e-6)
    assert ev["top1"] == r["last"]["top1"] and ev["per_class"] == r["last"]["per_class"]


def test_demo_arm_is_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    extra = ["--num-classes", "6", "--synth-n-max", "30", "--imb-factor", "10", "--synth-test-per-class", "3",
             "--val-per-class", "2", "--epochs", "2", "--drw-epoch", "1", "--num-stages", "1"]
    runs = [brl.demo_main(["--output-dir", str(tmp_path / f"d{i}"), "--methods", "brl", "--seeds", "0", "--jobs", "1",
                           "--extra", *extra]) for i in (0, 1)]

    def metrics(rows):
        return json.dumps([{k: v for k, v in r.items() if k not in ("wall_s", "cpu_s")} for r in rows], sort_keys=True)

    assert metrics(runs[0]) == metrics(runs[1])
    summary = json.loads((tmp_path / "d1" / "summary.json").read_text())
    assert metrics(summary["rows"]) == metrics(runs[0]) and summary["rows"][0]["method"] == "brl"
    assert summary["versions"]["torch"] == torch.__version__ and summary["versions"]["numpy"] == np.__version__


def _small_pickle(tmp_path, mutate=None):
    anns, names = _fake_annotations(3, 8, T=20)
    if mutate:
        mutate(anns)
    train = [n for i, n in enumerate(names) if i % 8 < 5]
    test = [n for i, n in enumerate(names) if i % 8 >= 5]
    return _write(tmp_path, {"split": {"xsub_train": train, "xsub_val": test}, "annotations": anns}), names


SMALL = ["--dataset", "ntu60", "--split", "xsub", "--lt-list", "none", "--num-classes", "3", "--val-source", "test",
         "--clip-len", "8", "--batch-size", "16", "--workers", "0", "--base-channels", "8", "--num-stages", "1",
         "--test-clips", "1", "--device", "cpu", "--resume", "", "--from-scratch"]


def test_nonfinite_clips_are_skipped_and_reported_in_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")

    def poison(anns):
        anns[0]["keypoint"] = anns[0]["keypoint"].copy()
        anns[0]["keypoint"][0, 2, 3] = np.nan  # a training clip
        anns[7]["keypoint"] = np.full_like(anns[7]["keypoint"], np.nan)  # an all-NaN test clip
    path, names = _small_pickle(tmp_path, poison)
    out = tmp_path / "run"
    res = brl.main(["--ann-file", str(path), *SMALL, "--epochs", "1", "--output-dir", str(out)])
    assert f"skipped 2 clip(s) with non-finite keypoints (NaN/inf) in {path}: {names[0]}, {names[7]}" in capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert r["skipped_nonfinite"] == {"count": 2, "frame_dirs": sorted([names[0], names[7]])}
    assert np.isfinite(res["last"]["top1"]) and len(brl.load_preds(out / "last_pred.pkl")) == 8  # 9 test clips - 1
    assert sum(r["counts"]) == 14  # 15 training clips - 1
    with pytest.raises(SystemExit) as e:
        brl.config_lib.run_main(brl.main, ["--ann-file", str(path), *SMALL, "--epochs", "1", "--strict",
                                           "--output-dir", str(tmp_path / "strict")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and names[0] in err[0] and "non-finite" in err[0]
    assert not (tmp_path / "strict" / "checkpoint.pth").exists()


def test_coco_keypoints_on_an_ntu_config_fail_before_training(tmp_path, capsys):
    def coco(anns):
        for a in anns[3:]:
            a["keypoint"] = np.zeros((1, 20, 17, 3), np.float16)
    path, names = _small_pickle(tmp_path, coco)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        brl.config_lib.run_main(brl.main, ["--ann-file", str(path), *SMALL, "--epochs", "1", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert str(path) in err[0] and names[3] in err[0] and "expected (M, T, 25, 3)" in err[0] and "V = 17" in err[0]
    assert not (out / "checkpoint.pth").exists()


def test_weights_with_missing_keys_are_an_error_unless_allowed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    path, _ = _small_pickle(tmp_path)
    weights = tmp_path / "w.pth"
    torch.save(brl.STGCNPP(3, brl.build_graph(), base_channels=8, num_stages=1).state_dict(), weights)
    argv = ["--ann-file", str(path), *SMALL, "--epochs", "0", "--output-dir", str(tmp_path / "run"),
            "--num-stages", "2", "--inflate-stages", "9", "--down-stages", "9", "--weights", str(weights)]
    with pytest.raises(SystemExit) as e:
        brl.config_lib.run_main(brl.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and str(weights) in err[0] and "missing keys [blocks.1." in err[0]
    res = brl.main(argv + ["--allow-partial-weights"])
    assert "missing ['blocks.1." in capsys.readouterr().out and np.isfinite(res["last"]["top1"])


def test_a_diverging_loss_names_the_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    path, names = _small_pickle(tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at epoch 0 iteration \d+ .*batch frame_dirs \['S001"):
        brl.main(["--ann-file", str(path), *SMALL, "--epochs", "1", "--lr", "1e30", "--output-dir", str(tmp_path / "r")])
