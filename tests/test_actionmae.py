"""ActionMAE (train_actionmae.py): masking, slots, losses, embeddings, data loaders, a short run."""
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import train_actionmae as am
from common import config
from common import ops_reference as ref

warnings.filterwarnings("ignore", category=RuntimeWarning)
torch.set_num_threads(1)

SYN = ["--synthetic", "--modalities", "a,b,c", "--num-frames", "12", "--heads", "4", "--temporal-depth", "1",
       "--enc-depth", "1", "--dec-depth", "1", "--drop-path", "0", "--device", "cpu", "--workers", "0"]


def make_args(argv):
    return am.resolve_args(config.parse_args(am.build_parser(), argv))


def synth_net(*extra, num_classes=12):
    torch.manual_seed(0)
    return am.Net(make_args(SYN + list(extra)), num_classes).eval()


# ---------------------------------------------------------------------------------------------
# masking


def test_keep_count_is_uniform_and_shared_per_batch():
    gen = torch.Generator().manual_seed(1)
    ks = [am.draw_keep(gen, 1, 3) for _ in range(3000)]
    counts = np.bincount(ks, minlength=4)[1:]
    assert counts.sum() == 3000 and set(ks) == {1, 2, 3}
    assert np.all(np.abs(counts / 3000 - 1 / 3) < 0.04), counts
    # the same seed gives the same K sequence (what every DDP rank relies on)
    gen2 = torch.Generator().manual_seed(1)
    assert ks[:50] == [am.draw_keep(gen2, 1, 3) for _ in range(50)]
    gen3 = torch.Generator().manual_seed(2)
    assert all(am.draw_keep(gen3, 2, 2) == 2 for _ in range(20))


@pytest.mark.parametrize("T", [0, 4])
def test_train_masking_per_sample_choice(T):
    torch.manual_seed(0)
    N, M = 4000, 3
    for K in (1, 2, 3):
        ids_keep, ids_restore = am.train_ids(N, M, K, T, torch.device("cpu"), ref.random_masking)
        Tn = T or 1
        assert ids_keep.shape == (N, K * Tn) and ids_restore.shape == (N, M * Tn)
        present = (ids_restore < K * Tn).view(N, M, Tn)
        # whole modalities are kept or dropped together, K of them in every sample
        assert torch.equal(present.all(2), present.any(2))
        assert torch.all(present[:, :, 0].sum(1) == K)
        # which modality is kept is drawn per sample: each one kept K/M of the time, and rows differ
        freq = present[:, :, 0].float().mean(0)
        assert torch.allclose(freq, torch.full((M,), K / M), atol=0.03), freq
        if K < M:
            assert len({tuple(r.tolist()) for r in present[:, :, 0]}) == 3  # C(3, K) patterns all occur
        # ids_restore is the inverse permutation of the shuffle
        shuffle = torch.argsort(ids_restore, dim=1)
        assert torch.equal(shuffle[:, :K * Tn], ids_keep)
        if T:
            # frame order inside a kept modality is preserved: ids = s*T + t
            assert torch.equal(ids_keep.view(N, K, T) % T, torch.arange(T).expand(N, K, T))


@pytest.mark.parametrize("T", [0, 3])
def test_gather_restore_round_trip_every_subset(T):
    N, M, D = 5, 3, 8
    Tn = T or 1
    X = torch.randn(N, M * Tn, D)
    mu = torch.randn(D)
    gather, restore, _ = am.masking_ops(True)
    for subset in am.all_subsets(("a", "b", "c")):
        ids_keep, ids_restore = am.subset_ids(subset, N, M, T, X.device)
        out = restore(gather(X, ids_keep), ids_restore, mu)
        for m in range(M):
            sl = slice(m * Tn, (m + 1) * Tn)
            if m in subset:
                assert torch.equal(out[:, sl], X[:, sl])  # slot m holds m's own token
            else:
                assert torch.equal(out[:, sl], mu.expand(N, Tn, D))
        # fused and reference paths agree bitwise
        g2, r2, _ = am.masking_ops(False)
        assert torch.equal(out, r2(g2(X, ids_keep), ids_restore, mu))
    # official B3: kept tokens land in slots 0..K-1 (depth would feed the rgb slot)
    ids_keep, ids_restore = am.subset_ids((1,), N, M, 0, X.device, official_slots=True)
    X1 = torch.randn(N, M, D)
    out = restore(gather(X1, ids_keep), ids_restore, mu)
    assert torch.equal(out[:, 0], X1[:, 1])


# ---------------------------------------------------------------------------------------------
# model


def _batch(N=6, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = {m: torch.randn(N, T, 32, generator=g) for m in "abc"}
    b["valid"] = torch.ones(N, T, dtype=torch.bool)
    b["label"] = torch.randint(0, 12, (N,), generator=g)
    return b


def test_reconstruction_loss_only_on_dropped_tokens():
    net = synth_net("--model", "actionmae")
    X, valid = net.encode(_batch())
    X = X.detach().requires_grad_(True)
    ids_keep, ids_restore = am.subset_ids((0,), X.shape[0], 3, 0, X.device)
    logits, R, present = net.classify(X, valid, ids_keep, ids_restore)
    R.retain_grad()
    loss = net.rec_loss(R, X, present, valid)
    manual = ((R - am.nrm(X)) ** 2).mean(-1)[:, 1:].mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    loss.backward()
    assert R.grad[:, 0].abs().sum() == 0 and R.grad[:, 1:].abs().sum() > 0  # kept slot 0 carries no loss
    # stop-gradient: the targets (the dropped modalities' own tokens) get no L_rec gradient
    assert X.grad[:, 1:].abs().sum() == 0
    # official B5 (--rec-target-grad) lets L_rec pull the targets
    net_q = synth_net("--model", "actionmae", "--rec-target-grad")
    Xq = X.detach().clone().requires_grad_(True)
    _, Rq, pq = net_q.classify(Xq, valid, ids_keep, ids_restore)
    net_q.rec_loss(Rq, Xq, pq, valid).backward()
    assert Xq.grad[:, 1:].abs().sum() > 0
    # nothing dropped: decoder skipped, L_rec = 0, fusion reads nrm(X)
    ids_keep, ids_restore = am.subset_ids((0, 1, 2), X.shape[0], 3, 0, X.device)
    _, R_full, present = net.classify(X, valid, ids_keep, ids_restore)
    assert R_full is None and float(net.rec_loss(R_full, X, present, valid)) == 0.0


def test_frame_mode_loss_skips_padded_frames():
    net = synth_net("--model", "actionmae", "--token-granularity", "frame")
    b = _batch(N=4)
    b["valid"][:, 8:] = False
    X, valid = net.encode(b)
    assert X.shape == (4, 36, 64) and valid.shape == (4, 36)
    ids_keep, ids_restore = am.subset_ids((2,), 4, 3, 12, X.device)
    _, R, present = net.classify(X, valid, ids_keep, ids_restore)
    per = ((R - am.nrm(X)) ** 2).mean(-1).view(4, 3, 12)
    assert torch.allclose(net.rec_loss(R, X, present, valid), per[:, :2, :8].mean(), atol=1e-6)


def _voting_net(model, fusion="sum", *extra):
    """Each modality's token is a fixed direction; head m maps it to class m; reconstructions are 0."""
    net = synth_net("--model", model, "--fusion", fusion, *extra, num_classes=4)
    D = net.dim
    with torch.no_grad():
        for p in net.fusion.parameters():
            p.zero_()
        if fusion == "sum":
            for m, head in enumerate(net.fusion.heads):
                head.weight[m] = torch.eye(D)[m] * 10
        else:  # concat
            for m in range(3):
                net.fusion.head.weight[m, m * D + m] = 10
        if net.mae is not None:
            net.mae.pred.weight.zero_()
            net.mae.pred.bias.zero_()
    X = torch.zeros(2, 3, D)
    for m in range(3):
        X[:, m, m] = 5.0
        X[:, m, 10:] = torch.linspace(-0.1, 0.1, D - 10)  # so nrm() keeps a clear +peak at dim m
    return net, X


@pytest.mark.parametrize("model,fusion", [("actionmae", "sum"), ("baseline", "sum"), ("baseline", "concat"),
                                          ("baseline-dropout", "sum")])
def test_every_subset_reads_the_right_slots(model, fusion):
    net, X = _voting_net(model, fusion)
    for subset in am.all_subsets(("a", "b", "c")):
        ids_keep, ids_restore = am.subset_ids(subset, 2, 3, 0, X.device)
        logits, _, _ = net.classify(X, None, ids_keep, ids_restore)
        voted = {c for c in range(3) if float(logits[0, c].detach()) > 1.0}
        assert voted == set(subset), (am.subset_name(subset, "abc"), logits[0])


def test_official_eval_slots_misroute_tokens():
    net, X = _voting_net("actionmae", "sum", "--official-eval-slots")
    ids_keep, ids_restore = am.subset_ids((2,), 2, 3, 0, X.device, official_slots=True)
    logits, _, _ = net.classify(X, None, ids_keep, ids_restore)
    logits = logits.detach()
    # modality c alone: its token sits in slot 0 and feeds the head of a, so c's vote is lost (B3)
    assert float(logits[0, 2]) < 1.0
    net_clean, _ = _voting_net("actionmae", "sum")
    clean, _, _ = net_clean.classify(X, None, *am.subset_ids((2,), 2, 3, 0, X.device))
    assert float(clean[0, 2]) > 1.0


def test_memory_tokens_never_reach_fusion_unless_official():
    net = synth_net("--model", "actionmae")
    X, _ = net.encode(_batch())
    full = am.subset_ids((0, 1, 2), X.shape[0], 3, 0, X.device)
    a, _, _ = net.classify(X, None, *full)
    with torch.no_grad():
        net.mae.mem.add_(1.0)
    b, _, _ = net.classify(X, None, *full)
    assert torch.equal(a, b)
    net_q = synth_net("--model", "actionmae", "--official-full-slots")
    a, _, _ = net_q.classify(X, None, *full)
    with torch.no_grad():
        net_q.mae.mem.add_(1.0)
    b, _, _ = net_q.classify(X, None, *full)
    assert not torch.allclose(a, b)


def test_embeddings_are_added():
    net = synth_net("--model", "actionmae")
    X, _ = net.encode(_batch())
    ids_keep, ids_restore = am.subset_ids((0,), X.shape[0], 3, 0, X.device)
    R, _ = net.mae(X, ids_keep, ids_restore, None, net.ops3)
    # two dropped slots start from the same mask token: E makes their reconstructions differ
    assert not torch.allclose(R[:, 1], R[:, 2], atol=1e-4)
    with torch.no_grad():
        net.mae.mod_embed[0].add_(1.0)  # E of the kept modality changes the encoder input
    R2, _ = net.mae(X, ids_keep, ids_restore, None, net.ops3)
    assert not torch.allclose(R, R2)
    # official B1: no E, so every dropped slot decodes identically
    net_q = synth_net("--model", "actionmae", "--official-pos")
    R3, _ = net_q.mae(X, ids_keep, ids_restore, None, net_q.ops3)
    assert torch.allclose(R3[:, 1], R3[:, 2], atol=1e-5)
    # temporal position: the stream is frame-order sensitive (clean) or invariant (B1)
    b = _batch()
    rev = {k: (v.flip(1) if k in "abc" else v) for k, v in b.items()}
    assert not torch.allclose(net.encode(b)[0], net.encode(rev)[0], atol=1e-4)
    assert torch.allclose(net_q.encode(b)[0], net_q.encode(rev)[0], atol=1e-4)
    # frame mode adds E[m] + pe(t) per token
    net_f = synth_net("--model", "actionmae", "--token-granularity", "frame")
    E = net_f.mae.token_embed()
    assert E.shape == (36, 64)
    assert torch.allclose(E[13] - E[1], net_f.mae.mod_embed[1] - net_f.mae.mod_embed[0], atol=1e-6)
    assert torch.allclose(E[1] - E[0], am.sinusoid([2], 64)[0] - am.sinusoid([1], 64)[0], atol=1e-6)


def test_padding_is_masked_in_streams():
    net = synth_net("--model", "baseline")
    b = _batch(N=2)
    b["valid"][:, 6:] = False
    X1, _ = net.encode(b)
    b2 = dict(b)
    for m in "abc":
        b2[m] = b[m].clone()
        b2[m][:, 6:] = 1e3  # garbage in the padded frames must not matter
    X2, _ = net.encode(b2)
    assert torch.allclose(X1, X2, atol=1e-5)


def test_parameter_counts_match_spec(monkeypatch):
    """§3.6: project counts for C = 60 (ResNet-34, no fc, + E, 4 memory tokens)."""
    for name in ("kaiming_normal_", "kaiming_uniform_", "xavier_uniform_", "uniform_", "normal_", "trunc_normal_",
                 "constant_", "ones_", "zeros_"):
        monkeypatch.setattr(torch.nn.init, name, lambda t, *a, **k: t)  # counting only: skip random init
    expect = {("actionmae", "rgb,depth", "sum"): 68_121_336, ("baseline", "rgb,depth", "sum"): 55_243_512,
              ("actionmae", "rgb,depth,ir", "transformer"): 108_292_092}
    for (model, mods, fusion), n in expect.items():
        args = make_args(["--model", model, "--modalities", mods, "--fusion", fusion])
        net = am.Net(args, 60)
        assert sum(p.numel() for p in net.parameters()) == n, (model, mods, fusion)


def test_fusion_transformer_masks_missing_for_baseline():
    net = synth_net("--model", "baseline", "--fusion", "transformer", "--fusion-depth", "1")
    X, _ = net.encode(_batch(N=3))
    ids_keep, ids_restore = am.subset_ids((0, 2), 3, 3, 0, X.device)
    a, _, _ = net.classify(X, None, ids_keep, ids_restore)
    X2 = X.clone()
    X2[:, 1] = 100.0
    b, _, _ = net.classify(X2, None, ids_keep, ids_restore)
    assert torch.allclose(a, b, atol=1e-5)


def test_short_training_loss_drops():
    net = synth_net("--model", "actionmae")
    net.train()
    b = _batch(N=32, seed=3)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    losses = []
    for _ in range(25):
        out = net(b, am.draw_keep(gen, 1, 3))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss_cls"]))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_end_to_end_synthetic_run_writes_outputs(tmp_path):
    out = tmp_path / "run"
    argv = SYN + ["--model", "actionmae", "--synthetic-train", "240", "--synthetic-test", "60", "--epochs", "2",
                  "--batch-size", "32", "--eval-batch-size", "200", "--lr", "2e-3", "--lr-scaling", "none",
                  "--warmup-epochs", "0", "--val-fraction", "0.1", "--output-dir", str(out), "--seed", "0"]
    res = am.main(argv)
    for name in ("config.yaml", "log.jsonl", "checkpoint.pth", "best.pth", "results.json", "preds/best.npz",
                 "plots/curves.png", "plots/subset_top1.png"):
        assert (out / name).is_file(), name
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[-1]["loss"] < log[0]["loss"]
    assert "val_top1_bc" in log[0] and "val_mean_top1" in log[0]
    r = json.loads((out / "results.json").read_text())
    assert list(r["best"]["subsets"]) == ["a", "b", "c", "ab", "ac", "bc", "abc"]
    assert r["n_test"] == 60 and r["selected_on"] == "val"
    assert r["best"]["subsets"]["abc"]["rec_mse"] is None and r["best"]["subsets"]["a"]["rec_mse"] > 0
    assert res["best"]["mean_top1"] > 100 / 12  # above chance after 2 short epochs
    preds = np.load(out / "preds" / "best.npz")
    assert preds["logits_ab"].shape == (60, 12)
    # resume continues at the saved epoch and K generator
    res2 = am.main(argv[:-4] + ["--output-dir", str(out), "--seed", "0", "--resume", "auto", "--epochs", "3"])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [1, 2, 3] and res2["n_test"] == 60


# ---------------------------------------------------------------------------------------------
# CLI / bad input


def test_bad_modalities_and_subsets(capsys):
    with pytest.raises(ValueError, match="unknown modality.*thermal"):
        make_args(["--modalities", "rgb,thermal"])
    with pytest.raises(ValueError, match="subset 'ri' names unknown modality 'i'"):
        make_args(["--modalities", "rgb,depth", "--eval-subsets", "r,ri"])
    with pytest.raises(ValueError, match="nw_ucla has no modality"):
        make_args(["--dataset", "nw_ucla", "--modalities", "rgb,ir"])
    with pytest.raises(SystemExit):  # main() turns them into a usage error
        am.main(["--modalities", "rgb,thermal"])
    assert "thermal" in capsys.readouterr().err
    args = make_args(["--modalities", "depth,rgb", "--eval-subsets", "dr,r"])
    assert args.modalities == ("rgb", "depth") and args.eval_subset_ids == [(0, 1), (0,)]
    assert [am.subset_name(s, ("rgb", "depth", "ir")) for s in am.all_subsets(("rgb", "depth", "ir"))] == \
        ["r", "d", "i", "rd", "ri", "di", "rdi"]


def test_help_lists_flags_with_defaults():
    text = am.build_parser().format_help()
    for flag in ("--token-granularity", "--num-mem-tokens", "--official-eval-slots", "--val-fraction",
                 "--rec-target-grad", "--eval-subsets", "--no-fused-ops", "--missing-skeletons"):
        assert flag in text
    args = make_args([])
    assert (args.lr, args.batch_size, args.epochs, args.num_mem_tokens, args.modalities) == \
        (1e-4, 8, 200, 4, ("rgb", "depth"))


# ---------------------------------------------------------------------------------------------
# data: formats, sampling, layouts (all generated here)


def _png(path, arr):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _frames(folder, n, kind, name=lambda k: f"{k:04d}.png", size=(40, 48)):
    """Frames whose pixels encode the frame number k (so tests can check the order)."""
    H, W = size
    for k in range(1, n + 1):
        if kind == "rgb":
            arr = np.full((H, W, 3), 10 * k, np.uint8)
        elif kind == "depth16":
            arr = (np.arange(H * W).reshape(H, W) * 7 + k).astype(np.uint16)
        else:
            arr = np.full((H, W), 10 * k, np.uint8)
        _png(folder / name(k), arr)


def _skeleton_text(path, T):
    lines = [str(T)]
    for t in range(T):
        lines.append("1")
        lines.append("72057594037931101 0 1 1 1 1 0 0.02 0.1 2")
        lines.append("25")
        for j in range(25):
            lines.append(f"{t + j / 100:.3f} {j:.3f} 3.5 250 200 900 500 0.1 0.2 0.3 0.9 2")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_sampling_rules():
    rng = np.random.default_rng(0)
    assert am.sample_indices(10, 16, False, rng).tolist() == list(range(10))
    assert am.sample_indices(40, 16, False, rng).tolist() == [round(i * 40 / 16) for i in range(16)]
    assert am.sample_indices(20, 8, False, rng).tolist() == [0, 2, 5, 8, 10, 12, 15, 18]  # half to even
    for _ in range(20):
        idx = am.sample_indices(50, 16, True, rng)
        assert len(set(idx.tolist())) == 16 and np.all(np.diff(idx) > 0) and idx.max() < 50


def test_image_formats_and_frame_order(tmp_path):
    _frames(tmp_path / "uc", 12, "rgb", name=lambda k: f"frame_{k}_tc_{k * 3}_rgb.jpg")  # unpadded numbers
    files = am.list_frames(tmp_path / "uc", "s1", "rgb", "_rgb.jpg")
    assert [am.frame_number(f) for f in files] == list(range(3, 37, 3))  # last integer = the timecode
    _frames(tmp_path / "un", 12, "rgb", name=lambda k: f"{k}.png")
    files = am.list_frames(tmp_path / "un", "s1", "rgb")
    assert [f.name for f in files][:3] == ["1.png", "2.png", "3.png"]  # not 1, 10, 11
    _frames(tmp_path / "d", 1, "depth16")
    depth = am.load_image(tmp_path / "d" / "0001.png", "depth", "jet")
    assert depth.shape == (40, 48, 3) and depth.dtype == np.uint8
    assert tuple(depth[0, 0]) == (0, 0, 128) and tuple(depth[-1, -1]) == (128, 0, 0)  # jet ends
    gray = am.load_image(tmp_path / "d" / "0001.png", "depth", "gray")
    assert np.all(gray[..., 0] == gray[..., 2])
    _frames(tmp_path / "ir", 1, "ir")
    ir = am.load_image(tmp_path / "ir" / "0001.png", "ir")
    assert ir.shape == (40, 48, 3) and np.all(ir == 10)
    big = am.load_image(tmp_path / "uc" / "frame_1_tc_3_rgb.jpg", "rgb", ntu_rgb_size=(480, 270))
    assert big.shape == (270, 480, 3)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="bad.png"):
        am.load_image(tmp_path / "bad.png", "ir")


def test_skeleton_formats(tmp_path):
    _skeleton_text(tmp_path / "x.skeleton", 5)
    s = am.load_skeleton(tmp_path / "x.skeleton", "x")
    assert s.shape == (5, 25, 3) and s[2, 4, 1] == pytest.approx(4.0) and s[3, 0, 0] == pytest.approx(3.0)
    np.save(tmp_path / "d.skeleton.npy", {"skel_body0": s, "nbodys": [1] * 5}, allow_pickle=True)
    assert np.array_equal(am.load_skeleton(tmp_path / "d.skeleton.npy", "d"), s)
    np.save(tmp_path / "bad.npy", np.zeros((5, 20, 3)))
    with pytest.raises(ValueError, match=r"sample q: skeleton .*bad.npy.*\[T>0, 25, 3\]"):
        am.load_skeleton(tmp_path / "bad.npy", "q")
    (tmp_path / "trunc.skeleton").write_text("3\n1\n")
    with pytest.raises(OSError, match="malformed"):
        am.load_skeleton(tmp_path / "trunc.skeleton", "t")


def test_ntu_splits():
    assert am.ntu_split("S001C002P001R001A010", "ntu60", "xsub") == "train"
    assert am.ntu_split("S001C002P003R001A010", "ntu60", "xsub") == "test"
    assert am.ntu_split("S001C001P001R001A010", "ntu60", "xview") == "test"
    assert am.ntu_split("S001C003P003R001A010", "ntu60", "xview") == "train"
    assert am.ntu_split("S018C001P001R001A010", "ntu60", "xsub") is None
    assert am.ntu_split("S018C001P045R001A010", "ntu120", "xsub") == "train"
    assert am.ntu_split("S018C001P044R001A010", "ntu120", "xsub") == "test"
    assert am.ntu_split("S018C001P044R001A010", "ntu120", "xset") == "train"


NTU_IDS = ["S001C002P001R001A001", "S001C002P001R002A002", "S001C001P003R001A001", "S001C002P003R001A002",
           "S001C003P002R001A003"]


def _ntu_tree(root, ids, n=6, skip_depth=()):
    for i in ids:
        _frames(root / "rgb" / "nturgb+d_rgb_s001" / "frames" / f"{i}_rgb", n, "rgb", size=(54, 96))
        if i not in skip_depth:
            _frames(root / "depth_color" / "nturgb+d_depth_masked_s001" / "nturgb+d_depth_masked" / i, n + 2,
                    "depth16", name=lambda k: f"MDepth-{k:08d}.png")
        _frames(root / "ir" / "nturgb+d_ir_s001" / "frames" / f"{i}_ir", n, "ir")
        _skeleton_text(root / "skeleton" / "raw_txt120" / f"{i}.skeleton", n)


def test_ntu_native_layout_end_to_end(tmp_path):
    root = tmp_path / "ntu"
    _ntu_tree(root, NTU_IDS, skip_depth=("S001C003P002R001A003",))
    small = ["--num-frames", "4", "--img-size", "32", "--arch", "resnet18", "--workers", "0", "--device", "cpu",
             "--data-root", str(root), "--heads", "8", "--temporal-depth", "1", "--enc-depth", "1",
             "--dec-depth", "1"]
    args = make_args(small + ["--modalities", "rgb,depth,ir,skeleton", "--val-fraction", "0"])
    with pytest.warns(UserWarning, match="skipped 1 samples missing a modality"):
        ds, C, skipped = am.build_datasets(args)
    assert C == 60 and skipped == 1
    assert len(ds["train"]) == 2 and len(ds["test"]) == 2  # P001 train, P003 test (xsub)
    (tmp_path / "missing.txt").write_text("S001C002P001R002A002\n")  # the public lists: one id per line
    recs, _ = am.build_records(make_args(small + ["--modalities", "rgb,skeleton", "--missing-skeletons",
                                                  str(tmp_path / "missing.txt")]))
    assert [r["id"] for r in recs["train"]] == ["S001C002P001R001A001", "S001C003P002R001A003"]
    item = ds["test"][0]
    assert item["rgb"].shape == (4, 3, 32, 32) and item["depth"].shape == (4, 3, 32, 32)
    assert item["skeleton"].shape == (4, 25, 3) and item["valid"].tolist() == [True] * 4
    assert item["label"] == int(ds["test"].records[0]["id"][-3:]) - 1
    # the rgb frames are sampled at round(i*6/4) = 0,2,3,4 -> pixel values 10,30,40,50
    mean, std = torch.tensor(am.IMAGENET_MEAN), torch.tensor(am.IMAGENET_STD)
    raw = item["rgb"][:, :, 16, 16] * std + mean
    assert torch.allclose(raw[:, 0] * 255, torch.tensor([10.0, 30, 40, 50]), atol=1.0)
    # depth has 8 frames: floor(idx*8/6) = 0,2,4,5 (proportional frame sync, counted)
    assert ds["test"].frame_mismatch >= 1
    with pytest.raises(config.InputError, match=r"sample S001C003P002R001A003 has no depth"):
        am.build_datasets(make_args(small + ["--modalities", "rgb,depth", "--strict"]))
    # one training step of the ResNet streams on a collated batch of the generated files
    args = make_args(small + ["--modalities", "rgb,depth,skeleton", "--val-fraction", "0"])
    torch.manual_seed(0)
    net = am.Net(args, 60)
    batch, n_skip = am.collate([ds["train"][0], ds["train"][1]])
    out = net(batch, 2)
    out["loss"].backward()
    assert n_skip == 0 and torch.isfinite(out["loss"]) and float(out["loss_rec"]) > 0
    assert net.streams["rgb"].frames.net.conv1.weight.grad.abs().sum() > 0
    # main() on the files: index, splits/*.csv, test on every subset, results.json (eval only: no big checkpoint)
    out = tmp_path / "out"
    res = am.main(small + ["--modalities", "rgb,depth", "--eval-only", "--eval-batch-size", "2",
                           "--val-fraction", "0", "--output-dir", str(out), "--model", "actionmae"])
    assert set(res["best"]["subsets"]) == {"r", "d", "rd"} and res["n_test"] == 2
    assert (out / "results.json").is_file()
    rows = list(csv.DictReader(open(out / "splits" / "train.csv")))
    assert rows[0]["rgb"].endswith("_rgb") and rows[0]["ir"] == ""


def test_missing_and_corrupt_frames_name_sample_and_modality(tmp_path):
    root = tmp_path / "ntu"
    _ntu_tree(root, NTU_IDS[:2])
    args = make_args(["--num-frames", "4", "--img-size", "32", "--modalities", "rgb,ir", "--data-root", str(root),
                      "--val-fraction", "0", "--dataset", "ntu60"])
    recs, _ = am.build_records(args)
    rec = recs["train"][0]
    for f in Path(rec["paths"]["ir"]).iterdir():
        f.unlink()
    ds = am.MultiModalClips(recs["train"], args.modalities, "ntu60", True, args)
    with pytest.warns(UserWarning, match=rf"skipping sample {rec['id']}: .*ir folder .* has no frames"):
        assert ds[0] is None
    batch, n_skipped = am.collate([ds[0], ds[1]])
    assert n_skipped == 1 and batch["rgb"].shape[0] == 1
    ds.strict = True
    with pytest.raises(FileNotFoundError, match=rf"sample {rec['id']}: ir"):
        ds[0]
    with pytest.raises(config.InputError, match="NTU rgb root not found"):
        am.build_records(make_args(["--modalities", "rgb,depth", "--data-root", str(tmp_path / "nope")]))


def test_nw_ucla_and_uwa3d_layouts(tmp_path):
    ucla = tmp_path / "ucla"
    for view, a in ((1, 1), (2, 12), (3, 4), (3, 7)):  # a07 is not one of the 10 classes
        folder = ucla / f"view_{view}" / f"a{a:02d}_s01_e00"
        _frames(folder, 11, "rgb", name=lambda k: f"frame_{k}_tc_{k}_rgb.jpg")
        _frames(folder, 11, "ir", name=lambda k: f"frame_{k}_tc_{k}_depth_vis.jpg")
    args = make_args(["--dataset", "nw_ucla", "--data-root", str(ucla), "--num-frames", "4", "--img-size", "32",
                      "--val-fraction", "0"])
    recs, _ = am.build_records(args)
    assert sorted(r["label"] for r in recs["train"]) == [0, 9] and [r["label"] for r in recs["test"]] == [3]
    ds = am.MultiModalClips(recs["test"], args.modalities, "nw_ucla", False, args)
    item = ds[0]
    mean, std = torch.tensor(am.IMAGENET_MEAN), torch.tensor(am.IMAGENET_STD)
    raw = (item["rgb"][:, 0, 16, 16] * std[0] + mean[0]) * 255
    # 11 frames, test indices round(i*11/4) = 0,3,6,8 -> frames 1,4,7,9 (integer sort, not 1,10,11,2,...)
    assert torch.allclose(raw, torch.tensor([10.0, 40, 70, 90]), atol=1.0)
    assert item["depth"].shape == (4, 3, 32, 32)

    uwa = tmp_path / "uwa"
    for name in ("a01_s01_v03_e01", "a02_s01_v01_e01", "a07_s02_v02_e01"):
        _frames(uwa / "UWA3DII_RGB" / "UWA3D-RGB" / name, 5, "rgb", size=(240, 320))
        _frames(uwa / "UWA3DII_Depth_ROI" / "UWA3D-Depth" / name, 5, "depth16")
    args = make_args(["--dataset", "uwa3d", "--data-root", str(uwa), "--num-frames", "4", "--img-size", "32",
                      "--val-fraction", "0"])
    recs, _ = am.build_records(args)
    assert [r["label"] for r in recs["train"]] == [0] and [r["label"] for r in recs["test"]] == [1]  # a07_s02 excluded
    item = am.MultiModalClips(recs["train"], args.modalities, "uwa3d", True, args)[0]
    assert item["rgb"].shape == (4, 3, 32, 32) and item["depth"].shape == (4, 3, 32, 32)


def test_list_csv_and_video(tmp_path):
    from common import video
    frames = np.stack([np.full((32, 48, 3), 20 * k, np.uint8) for k in range(8)])
    video.write_video(tmp_path / "v1.mp4", frames)
    _frames(tmp_path / "d1", 8, "depth16")
    with open(tmp_path / "train.csv", "w") as f:
        f.write("id,label,rgb,depth,ir,skeleton\nv1,3,v1.mp4,d1,,\nv2,1,,d1,,\n")
    args = make_args(["--dataset", "list", "--data-root", str(tmp_path), "--train-list", str(tmp_path / "train.csv"),
                      "--test-list", str(tmp_path / "train.csv"), "--num-frames", "4", "--img-size", "32"])
    with pytest.warns(UserWarning, match="skipped 1 rows"):
        recs, missing = am.read_list(tmp_path / "train.csv", args)
    assert missing == 1 and recs[0]["label"] == 3
    item = am.MultiModalClips(recs, args.modalities, "list", False, args)[0]
    assert item["rgb"].shape == (4, 3, 32, 32)



def test_ntu_rgb_avi_is_resized_like_the_frame_path(tmp_path, monkeypatch):
    """A 1920x1080 NTU .avi goes to 480x270 on decode, so the test crop sees the same field of view
    as the same frames stored as JPEGs (spec §2.2); only the sampled frames are decoded."""
    from PIL import Image
    from common import video
    H, W, n = 1080, 1920, 4
    yy, xx = np.mgrid[0:H, 0:W]
    frames = np.stack([np.stack([xx * 255 // W, yy * 255 // H, np.full((H, W), 60 + 20 * k)], -1) for k in range(n)])
    frames = frames.astype(np.uint8)
    frames[:, 500:580, 1100:1180] = 255  # a white marker, right of centre (outside a native-resolution centre crop)
    sid = "S001C001P003R001A001"
    folder = tmp_path / "frames" / f"{sid}_rgb"
    folder.mkdir(parents=True)
    for k, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{k + 1:04d}.jpg", quality=95)
    root = tmp_path / "ntu"
    avi = root / "rgb" / "nturgb+d_rgb_s001" / f"{sid}_rgb.avi"
    video.write_video(avi, frames)  # mpeg4, as the NTU release
    ir_avi = root / "ir" / "nturgb+d_ir_s001" / f"{sid}_ir.avi"
    video.write_video(ir_avi, np.full((n, 424, 512, 3), 90, np.uint8))
    recs, _ = am.build_records(make_args(["--modalities", "rgb,ir", "--data-root", str(root)]))
    assert recs["test"] == [{"id": sid, "label": 0, "paths": {"rgb": str(avi), "ir": str(ir_avi)}}]
    calls = []
    real = video.decode_clip
    monkeypatch.setattr(video, "read_video", lambda *a, **k: pytest.fail("read_video called per sample"))
    monkeypatch.setattr(video, "decode_clip", lambda p, idx, size=None: calls.append((list(idx), size)) or
                        real(p, idx, size=size))
    args = make_args(["--num-frames", "3", "--modalities", "rgb"])
    recs = [{"id": sid, "label": 0, "paths": {"rgb": str(folder)}},
            {"id": sid, "label": 0, "paths": {"rgb": str(avi)}}]
    ds = am.MultiModalClips(recs, ("rgb",), "ntu60", False, args)
    from_frames, from_video = ds[0]["rgb"], ds[1]["rgb"]
    assert calls == [([0, 1, 3], (270, 480))]  # round(i*4/3); exact 480x270 on decode
    mean, std = torch.tensor(am.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(am.IMAGENET_STD).view(3, 1, 1)
    a, b = ((x * std + mean) * 255 for x in (from_frames, from_video))
    assert a.shape == b.shape == (3, 3, 224, 224)
    assert float((a - b).abs().mean()) < 4.0  # JPEG vs mpeg4 + two resizers: a few levels

    def marker(x):
        ys, xs = torch.nonzero(x[0].min(0).values > 240, as_tuple=True)
        return float(ys.float().mean()), float(xs.float().mean()), len(ys)
    (ya, xa, na), (yb, xb, nb) = marker(a), marker(b)
    # centre crop 179 of 480x270 (x 150..329, y 46..225) -> 224: the marker sits at (111, 168.5) in both
    assert abs(ya - 111) < 1.5 and abs(xa - 168.5) < 1.5 and na > 300
    assert abs(ya - yb) < 1.0 and abs(xa - xb) < 1.0 and abs(na - nb) < 0.1 * na


@pytest.mark.parametrize("text,message", [
    ("id,lbl,rgb\n", r"bad\.csv:1: header id,lbl,rgb lacks label,depth; expected a CSV with the header id,label"),
    ("id,label,rgb,depth\nx,1,v1.mp4,d1\ny,2\n", r"bad\.csv:3: 2 fields, expected 4 \(id,label,rgb,depth\); the list"),
    ("id,label,rgb,depth\nx,1,v1.mp4,d1,extra\n", r"bad\.csv:2: 5 fields, expected 4"),
    ("id,label,rgb,depth\n\nx,abc,v1.mp4,d1\n", r"bad\.csv:3: label 'abc' is not an integer; the list must be a CSV"),
    ("id,label,rgb,depth\n,1,v1.mp4,d1\n", r"bad\.csv:2: empty id"),
    ("id,label,rgb,depth\nx,-1,v1.mp4,d1\n", r"bad\.csv:2: label -1 outside"),
])
def test_bad_list_lines_name_file_line_and_format(tmp_path, text, message):
    args = make_args(["--dataset", "list", "--data-root", str(tmp_path), "--modalities", "rgb,depth"])
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(config.InputError, match=message):
        am.read_list(tmp_path / "bad.csv", args)


def test_cli_input_errors_are_one_line(tmp_path):
    """`python train_actionmae.py` (the __main__ block) prints one `error:` line and exits 2."""
    import subprocess
    import sys
    (tmp_path / "l.csv").write_text("id,label,rgb,depth\nx,1\n")
    argv = [sys.executable, str(Path(am.__file__)), "--dataset", "list", "--train-list", str(tmp_path / "l.csv"),
            "--test-list", str(tmp_path / "l.csv"), "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o"),
            "--from-scratch", "--workers", "0"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    expected = f"error: {tmp_path / 'l.csv'}:2: 2 fields, expected 4 (id,label,rgb,depth); the list must be {am.LIST_FORMAT}"
    assert r.stderr.strip().splitlines() == [expected]


def test_preprocessing_sizes_and_per_clip_params():
    rng = np.random.default_rng(0)
    clip = np.random.default_rng(1).integers(0, 255, (3, 270, 480, 3), dtype=np.uint8)
    x = am.preprocess(clip, "ntu60", "rgb", True, 224, rng)
    assert x.shape == (3, 3, 224, 224)
    d = am.preprocess(np.repeat(clip[:1], 3, 0), "ntu60", "depth", True, 224, rng)
    assert torch.equal(d[0], d[1]) and torch.equal(d[1], d[2])  # one crop/flip per clip
    small = np.zeros((2, 100, 100, 3), np.uint8) + 255
    t = am.preprocess(small, "ntu60", "depth", False, 224, rng)
    assert t.shape == (2, 3, 224, 224) and float(t[0, 0, 0, 0]) == pytest.approx(-0.485 / 0.229, abs=1e-4)  # zero pad


def _write_safetensors(path, state):
    """The safetensors layout (timm's `model.safetensors`): u64 header size, JSON header, raw data."""
    names = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in state.items():
        raw = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def _rgb_net(arch):
    return am.Net(make_args(["--modalities", "rgb,depth", "--arch", arch, "--temporal-depth", "1"]), 10)


def _same_backbone(net, src):
    ref_sd = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.") and "num_batches" not in k}
    for m in ("rgb", "depth"):
        sd = net.streams[m].frames.net.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in ref_sd.items()), m


def test_weights_torchvision_and_timm_layouts(tmp_path):
    """Files in each official layout load into every image backbone (fc dropped)."""
    import torchvision
    torch.manual_seed(0)
    r34 = torchvision.models.resnet34(weights=None)
    for p_ in r34.modules():
        if isinstance(p_, torch.nn.BatchNorm2d):
            p_.running_mean.normal_()  # so a buffer that is not loaded shows up
    torch.save(r34.state_dict(), tmp_path / "resnet34-b627a593.pth")  # torchvision release: raw state dict with fc.*
    net = _rgb_net("resnet34")
    assert am.load_backbone_weights(net, tmp_path / "resnet34-b627a593.pth") == ["rgb", "depth"]
    _same_backbone(net, r34)

    r18 = torchvision.models.resnet18(weights=None)  # timm's resnet keys are torchvision's (conv1/bn1/layer*/fc)
    sd = r18.state_dict()
    _write_safetensors(tmp_path / "model.safetensors", sd)  # timm on the Hugging Face hub
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": {"module." + k: v for k, v in sd.items()},
                "state_dict_ema": {k: torch.zeros_like(v) for k, v in sd.items()}, "version": 2},
               tmp_path / "timm_train.pth.tar")  # a timm train checkpoint saved from DDP
    legacy = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # older releases
    torch.save(legacy, tmp_path / "legacy.pth")
    for name in ("model.safetensors", "timm_train.pth.tar", "legacy.pth"):
        net = _rgb_net("resnet18")
        assert am.load_backbone_weights(net, tmp_path / name) == ["rgb", "depth"], name
        _same_backbone(net, r18)


def test_weights_partial_or_wrong_layouts_are_errors(tmp_path, capsys):
    import torchvision
    from common.checkpoint import CheckpointError
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({k: v for k, v in sd.items() if k != "layer4.1.bn2.weight"}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth \(rgb backbone, --arch resnet18\).*missing keys "
                                              r"\[layer4\.1\.bn2\.weight\].*--allow-partial-weights"):
        am.load_backbone_weights(_rgb_net("resnet18"), tmp_path / "missing.pth")
    net = _rgb_net("resnet18")
    assert am.load_backbone_weights(net, tmp_path / "missing.pth", allow_partial=True) == ["rgb", "depth"]
    assert "missing ['layer4.1.bn2.weight']" in capsys.readouterr().out
    assert torch.equal(net.streams["rgb"].frames.net.conv1.weight, sd["conv1.weight"])
    # timm's deep-stem resnet18d: conv1.0/conv1.1/... are unexpected, conv1.weight missing
    deep = {k: v for k, v in sd.items() if not k.startswith("conv1.")}
    deep.update({"conv1.0.weight": torch.zeros(32, 3, 3, 3), "conv1.1.weight": torch.ones(32)})
    torch.save(deep, tmp_path / "resnet18d.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \[conv1\.weight\].*unexpected keys \[conv1\.0\.weight, "
                                              r"conv1\.1\.weight\].*deep-stem"):
        am.load_backbone_weights(_rgb_net("resnet18"), tmp_path / "resnet18d.pth")
    torch.save(sd, tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"r18\.pth .*missing keys \[layer1\.2\."):  # resnet18 file, resnet34 run
        am.load_backbone_weights(_rgb_net("resnet34"), tmp_path / "r18.pth", allow_partial=False)
    with pytest.raises(CheckpointError, match="not found"):
        am.load_backbone_weights(net, tmp_path / "nope.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a valid .safetensors file"):
        am.load_backbone_weights(net, tmp_path / "bad.safetensors")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_checkpoints_never_run_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker), "epoch": 1}, tmp_path / "evil.pth")
    from common.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="evil.pth"):
        am.load_backbone_weights(_rgb_net("resnet18"), tmp_path / "evil.pth")
    out = tmp_path / "run"
    base = SYN + ["--synthetic-train", "64", "--synthetic-test", "16", "--eval-batch-size", "16",
                  "--output-dir", str(out)]
    with pytest.raises(CheckpointError, match="evil.pth"):
        am.main(base + ["--resume", str(tmp_path / "evil.pth")])
    with pytest.raises(CheckpointError, match="evil.pth"):
        am.main(base + ["--eval-only", "--resume", str(tmp_path / "evil.pth")])
    assert not marker.exists()


def test_real_data_run_needs_weights_or_from_scratch(tmp_path):
    argv = ["--dataset", "list", "--train-list", str(tmp_path / "none.csv"), "--test-list", str(tmp_path / "none.csv"),
            "--output-dir", str(tmp_path / "o")]
    with pytest.raises(config.InputError, match="no --weights given.*--from-scratch"):
        am.main(argv)
    with pytest.raises(config.InputError, match="list file not found"):  # past the weights check
        am.main(argv + ["--from-scratch"])
    with pytest.raises(config.InputError, match="list file not found"):  # skeleton only: no ResNet to initialise
        am.main(argv + ["--modalities", "skeleton"])
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(config.InputError, match="no image modality"):
        am.main(argv + ["--modalities", "skeleton", "--weights", str(tmp_path / "w.pth")])


def test_saved_config_reloads(tmp_path):
    out = tmp_path / "cfg"
    am.main(SYN + ["--synthetic-train", "64", "--synthetic-test", "16", "--epochs", "0", "--eval-only",
                   "--modalities", "a,c", "--eval-batch-size", "16", "--output-dir", str(out)])
    text = (out / "config.yaml").read_text()
    assert "# effective_lr:" in text
    args = make_args(["--config", str(out / "config.yaml")])
    assert args.modalities == ("a", "c") and args.synthetic and args.heads == 4


def test_demo_summary_rows_and_acceptance(tmp_path):
    out = tmp_path / "demo"
    rows = am.demo(["--output-dir", str(out), "--seeds", "0", "--methods", "baseline", "actionmae", "--epochs", "0",
                    "--threads", "1", "--extra", "--synthetic-train 100 --synthetic-test 40"])
    meta = json.loads((out / "summary.json").read_text())
    summary = meta["rows"]
    assert [r["method"] for r in summary] == ["baseline", "actionmae"] and summary == json.loads(json.dumps(rows))
    assert meta["data"] == "offset" and meta["versions"]["torch"] == torch.__version__ and "numpy" in meta["versions"]
    r = summary[1]
    for key in ("seed", "top1_a", "top1_bc", "top1_abc", "top1_mean", "mean_all", "mean_missing_strongest", "full",
                "wall_s", "cpu_s"):
        assert key in r
    assert r["mean_missing_strongest"] == pytest.approx((r["top1_b"] + r["top1_c"] + r["top1_bc"]) / 3)
    assert (out / "acceptance.json").is_file()
    rows2 = am.demo(["--output-dir", str(out), "--seeds", "0", "--methods", "baseline", "--epochs", "0",
                     "--extra", "--synthetic-train 100 --synthetic-test 40"])
    assert rows2[0]["top1_a"] == summary[0]["top1_a"]  # reused, not retrained
    rows3 = am.demo(["--output-dir", str(out), "--seeds", "0", "--methods", "baseline", "--epochs", "0",
                     "--data", "redundant", "--extra", "--synthetic-train 100 --synthetic-test 40"])
    saved = json.loads((out / "baseline_seed0" / "results.json").read_text())
    assert len(rows3) == 1 and "redundant" in saved["demo_argv"]  # another benchmark: retrained, not reused
    fake = [{"method": m, "seed": 0, "mean_missing_strongest": v, "mean_all": v, "full": 90.0}
            for m, v in (("baseline", 40.0), ("baseline-dropout", 60.0), ("actionmae", 63.5))]
    check = am.demo_acceptance(fake)
    assert all(check["checks"].values()) and check["gain_missing_strongest"] == pytest.approx(23.5)
    assert check["rec_gain_missing_strongest"] == pytest.approx(3.5)
    fake[2]["mean_missing_strongest"] = fake[2]["mean_all"] = 61.0
    check = am.demo_acceptance(fake)
    assert not check["checks"]["reconstruction_gain_ge_3"] and check["checks"]["not_below_dropout_control"]
    fake[2]["mean_all"] = 59.0
    assert not am.demo_acceptance(fake)["checks"]["not_below_dropout_control"]
