"""Unit tests of the shared foundation: config, dist, checkpoint, metrics, logging, video."""
import argparse
import json
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from common import checkpoint as ckpt
from common import dist, metrics, video
from common.config import add_common_args, parse_args, run_main, save_config
from common.logging import JsonlLogger, plot_confusion, plot_curves, read_jsonl, summary_table, write_summary

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config

def _parser():
    p = argparse.ArgumentParser()
    add_common_args(p, epochs=7, lr=0.5)
    p.add_argument("--mode", default="probe", choices=["probe", "lora"])
    p.add_argument("--widths", type=int, nargs="+", default=[1, 2])
    p.add_argument("--flag", action="store_true")
    return p


def test_config_precedence_and_dump(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\nbatch-size: 16\nmode: lora\nwidths: [4, 5]\nflag: true\nlr: 1\n")
    args = parse_args(_parser(), ["--config", str(cfg), "--epochs", "9"])
    assert args.epochs == 9            # CLI beats the file
    assert args.batch_size == 16       # file beats the default (dash spelling accepted)
    assert args.mode == "lora" and args.widths == [4, 5] and args.flag is True
    assert args.lr == 1.0 and isinstance(args.lr, float)
    assert parse_args(_parser(), []).epochs == 7  # script default
    path = save_config(args, tmp_path / "out")
    dumped = yaml.safe_load(path.read_text())
    assert dumped["epochs"] == 9 and dumped["mode"] == "lora"
    # a dumped config loads back as a config
    again = parse_args(_parser(), ["--config", str(path)])
    assert vars(again) | {"config": ""} == vars(args) | {"config": ""}


def test_config_json(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"output_dir": "x", "seed": 5}))
    args = parse_args(_parser(), ["--config", str(cfg)])
    assert args.output_dir == "x" and args.seed == 5


@pytest.mark.parametrize("text,needle", [
    ("epochz: 3\n", "unknown key 'epochz'"),
    ("epochs: three\n", "key 'epochs'"),
    ("epochs: 2.5\n", "key 'epochs'"),
    ("mode: full\n", "key 'mode'"),
    ("flag: 1\n", "key 'flag'"),
    ("widths: 3\n", "key 'widths'"),
    ("- a\n- b\n", "mapping"),
    ("a: [1, 2\n", "not valid YAML"),
])
def test_config_errors_name_the_key(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit):
        parse_args(_parser(), ["--config", str(cfg)])
    assert needle in capsys.readouterr().err


def test_config_missing_file(capsys):
    with pytest.raises(SystemExit):
        parse_args(_parser(), ["--config", "/nonexistent/c.yaml"])
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- metrics

def test_topk_and_confusion_hand_values():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.3, 0.4, 0.35]])
    labels = torch.tensor([2, 0, 1, 0])
    acc = metrics.topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(1 / 4)       # only row 1
    assert acc[2] == pytest.approx(3 / 4)       # rows 0, 1, 2 (row 3: label 0 is 3rd)
    assert acc[5] == pytest.approx(1.0)         # k capped at C
    pred = scores.argmax(1)                     # [1, 0, 2, 1]
    cm = metrics.confusion_matrix(pred, labels, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    pc = metrics.per_class_accuracy(pred, labels, 4)
    assert pc[0].item() == pytest.approx(0.5) and pc[1].item() == 0 and pc[2].item() == 0 and math.isnan(pc[3])
    assert metrics.mean_class_accuracy(pred, labels, 4) == pytest.approx(0.5 / 3)


def test_map_hand_values():
    # class 0: positives at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2 ; class 1: positive at rank 2 -> 1/2
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 2])  # class 2 has no score column -> ignored via num_classes
    ap0 = (1 + 2 / 3) / 2
    # class 1 scores: .1 .7 .2 .9 -> order rows 3,1,2,0; positive row 1 at rank 2 -> 1/2
    assert metrics.mean_average_precision(scores, labels, num_classes=2) == pytest.approx((ap0 + 0.5) / 2)
    assert metrics.average_precision(torch.tensor([0.3, 0.2]), torch.tensor([False, False])) != \
        metrics.average_precision(torch.tensor([0.3, 0.2]), torch.tensor([False, False]))  # nan


def test_average_views():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    ids = torch.tensor([7, 3, 7, 3])
    avg, uniq = metrics.average_views(scores, ids)
    assert uniq.tolist() == [3, 7]
    assert torch.allclose(avg, torch.tensor([[0.1, 0.9], [0.75, 0.25]]))


# ----------------------------------------------------------------------------- logging

def test_jsonl_plots_and_summary(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    for e in range(3):
        log.log({"epoch": e, "loss": torch.tensor(1.0 / (e + 1)), "acc": np.float64(0.5)})
    recs = read_jsonl(tmp_path / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1, 2] and recs[1]["loss"] == pytest.approx(0.5)
    plot_curves(recs, tmp_path / "plots" / "c.png", ["loss", "acc"])
    plot_confusion(torch.eye(3, dtype=torch.long), tmp_path / "plots" / "cm.png")
    for png in ("c.png", "cm.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [{"method": "a", "seed": 0, "acc": 0.5}, {"method": "a", "seed": 1, "acc": 0.7},
            {"method": "b", "seed": 0, "acc": 0.9}]
    table = summary_table(rows, ["acc"])
    assert "0.6000 ± 0.1414" in table and "b (n=1)" in table
    write_summary(tmp_path / "s.json", rows)
    assert json.loads((tmp_path / "s.json").read_text()) == {"rows": rows}


# ----------------------------------------------------------------------------- checkpoint

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def _toy_data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y, torch.arange(n))


def _train(epochs, out, resume=False, stop_after=None):
    """A miniature training script: seeded, shuffled loader, dropout, momentum, a scheduler."""
    dist.seed_everything(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    loader = dist.make_loader(_toy_data(), 8, shuffle=True, seed=3)
    start, step = 0, 0
    if resume:
        state = ckpt.load_checkpoint(out / "checkpoint.pth", model=model, optimizer=opt, scheduler=sched)
        start, step = state["epoch"], state["step"]
    for epoch in range(start, epochs if stop_after is None else stop_after):
        dist.set_epoch(loader, epoch)
        for x, y, _ in loader:
            loss = nn.functional.cross_entropy(model(x), y) + 0.01 * torch.randn(()).abs()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        sched.step()
        ckpt.save_checkpoint(out / "checkpoint.pth", model=model, optimizer=opt, scheduler=sched,
                             epoch=epoch + 1, step=step, best_metric=0.5)
    return model


def test_resume_is_bit_exact(tmp_path):
    straight = _train(2, tmp_path / "a")
    _train(2, tmp_path / "b", stop_after=1)
    torch.manual_seed(999)  # the resumed process starts from a different RNG state
    np.random.seed(999)
    resumed = _train(2, tmp_path / "b", resume=True)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    state = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.pth", model=Tiny())
    assert state["epoch"] == 2 and state["step"] == 16 and state["best_metric"] == 0.5
    assert ckpt.resolve_resume("auto", tmp_path / "b") == tmp_path / "b" / "checkpoint.pth"
    assert ckpt.resolve_resume("auto", tmp_path / "none") is None
    assert ckpt.resolve_resume("", tmp_path / "b") is None
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.resolve_resume(str(tmp_path / "missing.pth"), tmp_path)


def test_checkpoint_loads_with_weights_only(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c.pth", model=Tiny(), optimizer=torch.optim.Adam(Tiny().parameters()), epoch=1)
    torch.load(tmp_path / "c.pth", weights_only=True)  # no pickled Python objects inside


def test_checkpoint_of_another_model_names_keys(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c.pth", model=nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 4)), epoch=1)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(tmp_path / "c.pth", model=Tiny())
    msg = str(e.value)
    assert "missing keys" in msg and "net.0.weight" in msg and "unexpected keys" in msg and "1.bias" in msg
    wider = Tiny()
    wider.net[3] = nn.Linear(16, 5)
    ckpt.save_checkpoint(tmp_path / "d.pth", model=wider, epoch=1)
    with pytest.raises(ckpt.CheckpointError, match=r"net.3.weight: checkpoint \(5, 16\) vs model \(3, 16\)"):
        ckpt.load_checkpoint(tmp_path / "d.pth", model=Tiny())
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="truncated or not a torch checkpoint"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt.load_checkpoint(tmp_path / "junk.pth", model=Tiny())


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pth"
    ckpt.atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]  # no temp file left behind


def test_load_weights_errors(tmp_path):
    m = Tiny()
    torch.save({"state_dict": m.state_dict()}, tmp_path / "w.pth")
    assert ckpt.load_weights(tmp_path / "w.pth", Tiny()) == ([], [])
    bad = {k: (v[:2] if k == "net.0.weight" else v) for k, v in m.state_dict().items()}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"net.0.weight: file \(2, 6\) vs model \(16, 6\)"):
        ckpt.load_weights(tmp_path / "bad.pth", Tiny())
    with pytest.raises(ckpt.CheckpointError, match="never downloaded"):
        ckpt.load_weights(tmp_path / "nope.pth", Tiny())


class _RunsCode:
    """Unpickling this calls `fn(*args)`: a stand-in for a hostile checkpoint's payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _official_meta_checkpoint(path, legacy=False):
    """An mmaction-style file: state_dict + `meta` holding numpy scalars, an array and a dtype, plus
    an argparse.Namespace under 'args' (both torch.save formats)."""
    meta = {"epoch": np.int64(30), "best_score": np.float64(0.8125), "lr": np.float32(1e-3), "flag": np.bool_(True),
            "mean": np.array([123.675, 116.28, 103.53]), "names": np.array(["a", "bc"]), "dtype": np.dtype("float32"),
            "hook_msgs": {"last_ckpt": "epoch_30.pth"}}
    obj = {"state_dict": Tiny().state_dict(), "meta": meta, "args": argparse.Namespace(lr=0.1, arch="tiny")}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return obj


def test_safe_load_allows_official_numpy_meta_and_namespace(tmp_path):
    for legacy in (False, True):
        obj = _official_meta_checkpoint(tmp_path / "c.pth", legacy)
        got = ckpt.safe_load(tmp_path / "c.pth")
        assert got["meta"]["best_score"] == 0.8125 and isinstance(got["meta"]["best_score"], np.float64)
        assert got["meta"]["epoch"] == 30 and got["meta"]["dtype"] == np.dtype("float32")
        assert np.array_equal(got["meta"]["mean"], obj["meta"]["mean"]) and list(got["meta"]["names"]) == ["a", "bc"]
        assert got["args"].arch == "tiny"
        assert ckpt.load_weights(tmp_path / "c.pth", Tiny()) == ([], [])
    # the same file as numpy 1.x wrote it (module numpy.core.multiarray) loads under numpy 2.x too
    raw = (tmp_path / "c.pth").read_bytes()   # legacy format: the pickle's GLOBAL names are plain text
    own = np.ndarray.__reduce__(np.zeros(1))[0].__module__.encode()  # numpy._core.multiarray (2.x)
    assert own in raw
    (tmp_path / "np1.pth").write_bytes(raw.replace(own, b"numpy.core.multiarray"))
    assert ckpt.safe_load(tmp_path / "np1.pth")["meta"]["best_score"] == 0.8125
    # the allow-list is scoped to our loads, not added to torch's global one
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


@pytest.mark.parametrize("fn", ["system", "open"])
def test_safe_load_refuses_code_in_one_line_naming_the_global(tmp_path, fn):
    marker = tmp_path / "MARKER"
    payload = _RunsCode(os.system, f"touch {marker}") if fn == "system" else _RunsCode(open, str(marker), "w")
    torch.save({"model": Tiny().state_dict(), "extra": payload}, tmp_path / "evil.pth")
    for load in (lambda: ckpt.safe_load(tmp_path / "evil.pth"),
                 lambda: ckpt.load_checkpoint(tmp_path / "evil.pth", model=Tiny()),
                 lambda: ckpt.load_weights(tmp_path / "evil.pth", Tiny())):
        with pytest.raises(ckpt.CheckpointError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path / "evil.pth") in msg and "--trust-checkpoint" in msg
        assert ("'posix.system'" if fn == "system" else "'io.open'") in msg
        assert not marker.exists()
    # --trust-checkpoint really is the full unpickler: only for files the user made
    ckpt.safe_load(tmp_path / "evil.pth", trust=True)
    assert marker.exists()


def test_truncated_checkpoint_is_one_line_and_the_good_one_stays(tmp_path):
    good = tmp_path / "checkpoint.pth"
    ckpt.save_checkpoint(good, model=Tiny(), epoch=3)
    before = good.read_bytes()
    for n in (0, 10, len(before) // 2, len(before) - 8):
        bad = tmp_path / f"cut{n}.pth"
        bad.write_bytes(before[:n])
        with pytest.raises(ckpt.CheckpointError, match=r"cut\d+\.pth: truncated or not a torch checkpoint") as e:
            ckpt.load_checkpoint(bad, model=Tiny())
        assert "\n" not in str(e.value)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ckpt.CheckpointError, match="not a training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "list.pth", model=Tiny())
    assert good.read_bytes() == before


def test_safe_np_and_pickle_load(tmp_path):
    marker = tmp_path / "MARKER"
    d = {"train_image": np.zeros((2, 28, 28, 3), np.uint8), "label": np.int64(3), "names": [b"x", "y"], "s": {1, 2}}
    np.save(tmp_path / "d.npy", d, allow_pickle=True)
    got = ckpt.safe_np_load(tmp_path / "d.npy", encoding="latin1").item()
    assert got["label"] == 3 and got["names"] == [b"x", "y"] and got["train_image"].shape == (2, 28, 28, 3)
    np.save(tmp_path / "plain.npy", np.arange(5))
    assert ckpt.safe_np_load(tmp_path / "plain.npy").tolist() == [0, 1, 2, 3, 4]
    with open(tmp_path / "p2.pkl", "wb") as f:   # protocol 2: bytes go through _codecs.encode
        pickle.dump({"keypoint": np.ones((1, 2, 17, 2), np.float32), "b": b"\x00\xff"}, f, protocol=2)
    assert ckpt.safe_pickle_load(tmp_path / "p2.pkl")["b"] == b"\x00\xff"
    np.save(tmp_path / "evil.npy", np.array([_RunsCode(os.system, f"touch {marker}")], dtype=object), allow_pickle=True)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump([_RunsCode(os.system, f"touch {marker}")], f)
    for load in (lambda: ckpt.safe_np_load(tmp_path / "evil.npy", what="annotations"),
                 lambda: ckpt.safe_np_load(tmp_path / "evil.pkl", what="annotations"),
                 lambda: ckpt.safe_pickle_load(tmp_path / "evil.pkl", what="annotations")):
        with pytest.raises(ckpt.CheckpointError, match=r"annotations .*evil\.(npy|pkl): refused .*'posix.system'"):
            load()
    assert not marker.exists()
    (tmp_path / "cut.pkl").write_bytes((tmp_path / "p2.pkl").read_bytes()[:40])
    with pytest.raises(ckpt.CheckpointError, match="cut.pkl: truncated or not a pickle"):
        ckpt.safe_pickle_load(tmp_path / "cut.pkl")


@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "-1"], "--epochs -1: expected an integer >= 0"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--workers", "-2"], "--workers -2: expected an integer >= 0"),
    (["--lr", "0"], "--lr 0.0: expected a finite number > 0"),
    (["--lr", "nan"], "--lr nan: expected a finite number > 0"),
    (["--seed", "-1"], "--seed -1: expected an integer in 0..2**32-1"),
    (["--output-dir", "{file}"], "exists and is not a directory"),
    (["--output-dir", "{file}/sub"], "is a file, not a directory"),
])
def test_common_flags_are_validated_in_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "afile").write_text("x")
    fill = {"file": str(tmp_path / "afile"), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    with pytest.raises(SystemExit) as e:
        parse_args(_parser(), argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle.format(**fill) in err and err.count("\n") == 1, err


def test_resume_and_weights_files_are_checked_before_any_work(tmp_path):
    """parse_args reads only the pickle of --resume/--weights: a payload or a torn file stops the
    run before it starts, as a CheckpointError (one line through run_main)."""
    marker = tmp_path / "MARKER"
    torch.save({"model": Tiny().state_dict(), "x": _RunsCode(os.system, f"touch {marker}")}, tmp_path / "evil.pth")
    ckpt.save_checkpoint(tmp_path / "good.pth", model=Tiny(), epoch=1)
    (tmp_path / "torn.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:300])
    _official_meta_checkpoint(tmp_path / "meta.pth")
    cases = [(["--resume", "{t}/evil.pth"], r"--resume {t}/evil.pth: refused .*'posix.system'"),
             (["--weights", "{t}/evil.pth"], r"--weights {t}/evil.pth: refused .*'posix.system'"),
             (["--resume", "{t}/torn.pth"], r"--resume {t}/torn.pth: truncated or not a torch checkpoint"),
             (["--resume", "{t}/nope.pth"], r"--resume {t}/nope.pth: file not found"),
             (["--weights", "{t}/nope.pth"], r"--weights {t}/nope.pth: file not found \(weights are never downloaded")]
    for argv, pattern in cases:
        with pytest.raises(ckpt.CheckpointError, match=pattern.format(t=tmp_path)):
            parse_args(_parser(), [a.format(t=tmp_path) for a in argv])
    (tmp_path / "out").mkdir()
    os.replace(tmp_path / "evil.pth", tmp_path / "out" / "checkpoint.pth")
    with pytest.raises(ckpt.CheckpointError, match="out/checkpoint.pth: refused"):
        parse_args(_parser(), ["--resume", "auto", "--output-dir", str(tmp_path / "out")])
    assert not marker.exists()
    parse_args(_parser(), ["--resume", str(tmp_path / "good.pth"), "--weights", str(tmp_path / "meta.pth")])
    parse_args(_parser(), ["--resume", "auto", "--output-dir", str(tmp_path / "elsewhere")])


def test_run_main_prints_one_line_and_debug_shows_the_traceback(capsys):
    def main(argv):
        raise ckpt.CheckpointError("checkpoint x.pth: truncated\nor not a torch checkpoint")

    with pytest.raises(SystemExit) as e:
        run_main(main, ["--epochs", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: checkpoint x.pth: truncated or not a torch checkpoint\n"
    with pytest.raises(ckpt.CheckpointError):
        run_main(main, ["--debug"])
    assert run_main(lambda argv: argv, ["a"]) == ["a"]


# ----------------------------------------------------------------------------- dist

def test_gather_eval_single_process_sorts_and_dedupes():
    idx = torch.tensor([3, 0, 2, 0])
    scores = torch.tensor([[3.0], [0.0], [2.0], [0.5]])
    i, s = dist.gather_eval(idx, scores)
    assert i.tolist() == [0, 2, 3] and s[:, 0].tolist() == [0.0, 2.0, 3.0]


def test_loader_order_depends_on_seed_and_epoch_only():
    ds = _toy_data(20)
    a = dist.make_loader(ds, 5, shuffle=True, seed=1)
    b = dist.make_loader(ds, 5, shuffle=True, seed=1)
    dist.set_epoch(a, 3)
    torch.manual_seed(123)
    dist.set_epoch(b, 3)
    assert [t[2].tolist() for t in a] == [t[2].tolist() for t in b]
    dist.set_epoch(b, 4)
    assert [t[2].tolist() for t in a] != [t[2].tolist() for t in b]


def test_two_process_gloo_matches_one_process(tmp_path):
    worker = ROOT / "tests" / "dist_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(worker), str(tmp_path / "one.json")], check=True, env=env, timeout=240)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(worker), str(tmp_path / "two.json")], check=True, env=env, timeout=240)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["n_eval"] == one["n_eval"] == 31          # padding duplicates dropped
    assert two["eval_indices"] == list(range(31))
    assert two["acc"] == pytest.approx(one["acc"])
    assert np.allclose(two["weights"], one["weights"], atol=1e-6)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- video

def _moving_square(t=12, h=32, w=48):
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, 8:16, 2 + 3 * i:10 + 3 * i] = (250, 40, 40)
    return frames


def test_video_roundtrip_sampling_and_transforms(tmp_path):
    path = tmp_path / "v.mp4"
    frames = _moving_square()
    video.write_video(path, frames, fps=10)
    dec = video.read_video(path)
    assert dec.shape == frames.shape and dec.dtype == np.uint8
    assert np.abs(dec.astype(int) - frames).mean() < 6
    assert video.num_frames(path) == 12
    clip = video.decode_clip(path, [5, 0, 11, 5])
    assert np.array_equal(clip[0], dec[5]) and np.array_equal(clip[2], dec[11]) and np.array_equal(clip[3], dec[5])
    # the red square moves right: its column centroid grows with the frame index
    cols = [np.nonzero(dec[i, :, :, 0] > 128)[1].mean() for i in (0, 6, 11)]
    assert cols[0] < cols[1] < cols[2]

    assert video.uniform_indices(12, 4, train=False).tolist() == [1, 4, 7, 10]
    rng = np.random.default_rng(0)
    tr = video.uniform_indices(12, 4, train=True, rng=rng)
    assert all(3 * k <= v < 3 * k + 3 for k, v in enumerate(tr))
    assert video.strided_indices(100, 8, 2, train=False).tolist() == list(range(42, 58, 2))
    assert video.strided_indices(100, 8, 2, train=False, num_clips=3, clip_idx=2).tolist() == list(range(84, 100, 2))
    assert video.strided_indices(5, 4, 2, train=False).tolist() == [0, 2, 4, 1]  # short video loops
    s = video.strided_indices(100, 8, 2, train=True, rng=rng)
    assert np.all(np.diff(s) == 2) and 0 <= s[0] <= 84

    t = torch.from_numpy(dec)
    assert video.resize_short_side(t, 16).shape == (12, 16, 24, 3)
    assert video.center_crop(t, 16).shape == (12, 16, 16, 3)
    assert [c.shape for c in video.three_crop(t, 32)] == [(12, 32, 32, 3)] * 3
    assert video.random_resized_crop(t, 20, rng=rng).shape == (12, 20, 20, 3)
    assert torch.equal(video.hflip(video.hflip(t)), t)
    x = video.to_float_normalized(t, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (3, 12, 32, 48) and x.min() >= -1 and x.max() <= 1


def test_bad_videos_are_skipped_and_counted_or_raise_when_strict(tmp_path):
    good = tmp_path / "good.mp4"
    video.write_video(good, _moving_square(4))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(500))
    missing = tmp_path / "missing.mp4"

    class DS(torch.utils.data.Dataset):
        def __init__(self, paths, strict):
            self.paths, self.strict = paths, strict

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            clip = video.load_or_skip(lambda: video.decode_clip(self.paths[i], [0, 1]), self.paths[i], self.strict)
            return None if clip is None else (torch.from_numpy(clip), i)

    with pytest.warns(UserWarning, match="corrupt.mp4"):
        batches = list(torch.utils.data.DataLoader(DS([good, corrupt, missing, good], False), batch_size=4,
                                                   collate_fn=video.collate_skip_none))
    (clips, idx), n_bad = batches[0]
    assert n_bad == 2 and idx.tolist() == [0, 3] and clips.shape == (2, 2, 32, 48, 3)
    with pytest.raises(video.VideoDecodeError, match="missing.mp4"):
        DS([missing], True)[0]
    with pytest.raises(video.VideoDecodeError, match="corrupt.mp4"):
        DS([corrupt], True)[0]
    assert video.collate_skip_none([None, None]) == (None, 2)
    with pytest.raises(ValueError, match="even"):
        video.write_video(tmp_path / "odd.mp4", np.zeros((2, 5, 6, 3), np.uint8))
