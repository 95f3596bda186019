"""bench/gpu_check.sh and bench/gpu_check.py on a CPU machine: the stamp of the carried CUDA extension,
the checks that decide between that prebuilt extension and an in-place build, the wheel install and
the summary. The GPU steps themselves run on the GPU machine (README "GPU check")."""
import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check as gc  # noqa: E402

CPU_SO = sorted(glob.glob(os.path.join(ROOT, "common", "_C*.so")))
DEVICE_PY = os.path.join(ROOT, ".venv-device", "bin", "python")
DEVICE_EXT = os.path.join(ROOT, "build", "device")


def make_tree(tmp_path, setup_py=None):
    """A copy of what gpu_check.sh needs: bench/gpu_check.{sh,py}, common/__init__.py, csrc/, setup.py."""
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    (root / "common").mkdir()
    for f in ("gpu_check.sh", "gpu_check.py"):
        shutil.copy(os.path.join(ROOT, "bench", f), root / "bench" / f)
    shutil.copy(os.path.join(ROOT, "common", "__init__.py"), root / "common" / "__init__.py")
    shutil.copytree(os.path.join(ROOT, "csrc"), root / "csrc")
    if setup_py is None:
        shutil.copy(os.path.join(ROOT, "setup.py"), root / "setup.py")
    else:
        (root / "setup.py").write_text(setup_py)
    return root


def write_stamp(ext_dir, root, so, **over):
    (ext_dir / "common").mkdir(parents=True)
    shutil.copy(so, ext_dir / "common" / os.path.basename(so))
    st = {"torch": torch.__version__, "cuda": torch.version.cuda, "arch": "9.0",
          "sources_sha256": gc.sources_sha256(str(root)), "git_commit": "0123456789abcdef"}
    st.update(over)
    (ext_dir / "stamp.json").write_text(json.dumps(st))


def run_check(root, py, ext_dir, out, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RAR_OPS_", "PYTHONPATH"))}
    e.update(PY=py, OUT=str(out), PREBUILT=str(ext_dir), SITE=str(out.parent / "site"), MAX_JOBS="1", **env)
    return subprocess.run(["bash", "bench/gpu_check.sh"], cwd=root, env=e, capture_output=True, text=True, timeout=300)


def test_sources_hash_follows_every_kernel_source(tmp_path):
    root = make_tree(tmp_path)
    files = gc.source_files(str(root))
    assert "setup.py" in files and "csrc/checks.h" in files and "csrc/cuda/graph_aggregate.cu" in files
    h0 = gc.sources_sha256(str(root))
    assert h0 == gc.sources_sha256(ROOT)  # same sources, another checkout: same hash
    cu = root / "csrc" / "cuda" / "masked.cu"
    cu.write_text(cu.read_text() + "\n")
    assert gc.sources_sha256(str(root)) != h0
    (root / "csrc" / "cuda" / "new.cuh").write_text("#pragma once\n")
    assert len(gc.source_files(str(root))) == len(files) + 1


def test_match_accepts_only_the_same_torch_cuda_and_sources(tmp_path, monkeypatch):
    root = make_tree(tmp_path)
    monkeypatch.setattr(gc, "ROOT", str(root))
    so = tmp_path / "_C.abi3.so"
    so.write_bytes(b"\x7fELF")
    with pytest.raises(gc.CheckError, match="no .*stamp.json .*make build-cuda-device"):
        gc.match(str(tmp_path / "none"))
    cases = [({}, None), ({"torch": "2.0.0+cu118"}, "built for torch 2.0.0"), ({"cuda": "12.1"}, "built for cuda 12.1"),
             ({"sources_sha256": "0" * 64}, "csrc/ changed")]
    for i, (over, why) in enumerate(cases):
        d = tmp_path / f"ext{i}"
        write_stamp(d, root, so, **over)
        if why is None:
            assert f"torch {torch.__version__}" in gc.match(str(d))
        else:
            with pytest.raises(gc.CheckError, match=why):
                gc.match(str(d))
    src = root / "csrc" / "masked.cpp"                      # an edit after the build makes the stamp stale
    src.write_text(src.read_text() + "\n")
    with pytest.raises(gc.CheckError, match="csrc/ changed"):
        gc.match(str(tmp_path / "ext0"))
    (tmp_path / "ext0" / "common" / "_C.abi3.so").unlink()
    with pytest.raises(gc.CheckError, match="expected one _C"):
        gc.match(str(tmp_path / "ext0"))
    r = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py"), "match", str(tmp_path / "ext1")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not used: built for torch 2.0.0" in r.stderr


def _wheel(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("rar_probe_pkg.py", "OK = 1\n")
        z.writestr("rar_probe_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: rar-probe-pkg\nVersion: 1.0\n")
        z.writestr("rar_probe_pkg-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("rar_probe_pkg-1.0.dist-info/RECORD", "")


@pytest.mark.skipif(not CPU_SO, reason="common._C is not built (make build-cpu)")
def test_gpu_check_sh_takes_the_prebuilt_then_falls_back_to_a_build(tmp_path):
    # a stamp that matches this torch and the sources: the .so is copied into common/ and loaded; a CPU-only
    # .so has no CUDA kernels, so the script falls back to the in-place build (a stub setup.py here)
    marker = tmp_path / "built"
    root = make_tree(tmp_path, setup_py=f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(1)\n")
    (root / ".whl").mkdir()
    _wheel(root / ".whl" / "rar_probe_pkg-1.0-py3-none-any.whl")
    ext = tmp_path / "prebuilt"
    write_stamp(ext, root, CPU_SO[0])
    out = tmp_path / "out"
    r = run_check(root, sys.executable, ext, out)
    log = (out / "ext.log").read_text()
    env = (out / "env.txt").read_text()
    assert r.returncode == 2, (r.stdout, r.stderr, log)
    assert f"prebuilt {ext} matches: torch {torch.__version__}" in log
    assert "WITH_CUDA 0" in log and "has no CUDA kernels" in log and "building common._C in place" in log
    assert marker.exists() and not (root / "common" / os.path.basename(CPU_SO[0])).exists()
    assert f"torch {torch.__version__}" in env and "no usable common._C" in env
    assert "wheels: installed rar_probe_pkg-1.0-py3-none-any.whl" in env
    assert (out.parent / "site" / "rar_probe_pkg.py").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.exists(DEVICE_PY) and os.path.exists(os.path.join(DEVICE_EXT, "stamp.json"))),
                    reason="needs `make build-cuda-device` (.venv-device and build/device)")
def test_gpu_check_sh_uses_the_device_build_under_the_device_torch(tmp_path):
    # the real carried extension under the device's torch version: stamp matches, it loads with CUDA kernels,
    # no build; without a GPU the script then stops with exit 3
    root = make_tree(tmp_path)
    if gc.sources_sha256(str(root)) != json.load(open(os.path.join(DEVICE_EXT, "stamp.json")))["sources_sha256"]:
        pytest.skip("build/device is stale (csrc/ changed since make build-cuda-device)")
    out = tmp_path / "out"
    r = run_check(root, DEVICE_PY, DEVICE_EXT, out)
    log = (out / "ext.log").read_text()
    assert r.returncode == 3, (r.stdout, r.stderr, log)
    assert "matches: torch 2.11" in log and "WITH_CUDA 1" in log and "building" not in log
    assert f"extension: prebuilt {DEVICE_EXT}" in (out / "env.txt").read_text()


def test_summary_marks_goals_met_or_missed(tmp_path):
    rows = [dict(op="graph_aggregate", shape="(32,3,64,64,25)x(3,25,25)", dtype="bf16", variant="op", us=30.0,
                 x_floor=1.4, speedup_vs_eager=9.0, speedup_vs_compiled=2.0, **{"pass": "fwd+bwd"}),
            dict(op="lora_linear", shape="M=50176 K=128 N=384 r=64", dtype="bf16", variant="op", us=400.0,
                 x_plain_linear=1.6, speedup_vs_eager=3.0, **{"pass": "fwd+bwd"}),
            dict(op="lora_linear", shape="M=50176 K=128 N=384 r=64", dtype="bf16", variant="eager", us=1200.0,
                 **{"pass": "fwd+bwd"})]
    (tmp_path / "ops_cuda.json").write_text(json.dumps({"header": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130",
                                                                   "cuda": "13.0", "copy_bandwidth_GBps": 4240.0},
                                                        "notes": ["budget 160 s: compiled not timed for 3 of 40 cases"],
                                                        "rows": rows}))
    share = {"device": "NVIDIA H200", "amp_bf16": True, "notes": [], "rows": [
        dict(method="albar", backend="ext", mode="eager", step_ms_median=100.0, op_share=0.004),
        dict(method="albar", backend="ref", mode="eager", step_ms_median=150.0, op_share=None)]}
    (tmp_path / "step_share_cuda.json").write_text(json.dumps(share))
    (tmp_path / "test_cuda.log").write_text("....\n2 failed, 9 passed in 80.1s\npytest rc=1\n")
    text = gc.summary(str(tmp_path))
    assert "tests: 2 failed, 9 passed in 80.1s" in text
    assert "NVIDIA H200" in text and "compiled not timed for 3 of 40" in text
    ga = next(ln for ln in text.splitlines() if "graph_aggregate" in ln)
    assert "met (x_floor 1.40 <= 1.5)" in ga
    lora = [ln for ln in text.splitlines() if "lora_linear" in ln]
    assert len(lora) == 1 and "MISSED (x_plain_linear 1.60 <= 1.3)" in lora[0]
    assert "albar eager: ref/ext step time 1.50x" in text and "op share 0.40%" in text
    assert "no ops_cuda.json" in gc.summary(str(tmp_path / "nothing"))
