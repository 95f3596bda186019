"""The Python side of bench/gpu_check.sh, the one-command GPU check (README "GPU check").

    python bench/gpu_check.py stamp build/device   # after the build of `make build-cuda-device` (here)
    python bench/gpu_check.py match build/device   # on the GPU machine: exit 0 if that build fits there
    python bench/gpu_check.py summary OUT          # the short summary of the results under OUT

The stamp (build/device/stamp.json) records what the carried extension was built against: torch and
its CUDA version, the arch list, and a hash of the sources that go into it (setup.py, csrc/), so a
build made before a kernel edit is never used. `stamp` also loads the .so under the torch it was
built for, which proves it links and carries the CUDA kernels before it travels.
"""
import argparse
import datetime
import glob
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_GLOBS = ("setup.py", "csrc/*.cpp", "csrc/*.h", "csrc/cuda/*.cu", "csrc/cuda/*.cuh")
# the goals of specs/kernels.md §0 / issue 17: (op, pass, metric, limit)
GOALS = [("static_clip", "fwd", "x_floor", 1.3), ("graph_aggregate", "fwd+bwd", "x_floor", 1.5),
         ("masked_gather", "fwd+bwd", "x_floor", 1.5), ("masked_restore", "fwd+bwd", "x_floor", 1.5),
         ("lora_linear", "fwd+bwd", "x_plain_linear", 1.3)]


class CheckError(Exception):
    """A prebuilt extension that must not be used, or a bad stamp; the message says why."""


def source_files(root=None):
    root = root or ROOT
    return sorted({os.path.relpath(p, root) for g in SOURCE_GLOBS for p in glob.glob(os.path.join(root, g))})


def sources_sha256(root=None):
    """sha256 over the relative path and bytes of every source of common._C (order-independent of the OS)."""
    root = root or ROOT
    h = hashlib.sha256()
    for rel in source_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def find_so(ext_dir):
    sos = glob.glob(os.path.join(ext_dir, "common", "_C*.so"))
    if len(sos) != 1:
        raise CheckError(f"{ext_dir}/common: expected one _C*.so, found {len(sos)}")
    return sos[0]


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _nvcc_version():
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((ln.strip() for ln in out.splitlines() if "release" in ln), "")


def stamp(ext_dir):
    import torch

    so = find_so(ext_dir)
    spec = importlib.util.spec_from_file_location("common._C", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # links against this torch; registers torch.ops.rar
    if not mod.WITH_CUDA:
        raise CheckError(f"{so} has no CUDA kernels ({mod.BUILD_INFO}); build with FORCE_CUDA=1")
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "arch": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"), "nvcc": _nvcc_version(),
            "build_info": str(mod.BUILD_INFO), "sources_sha256": sources_sha256(), "sources": source_files(),
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty_sources": bool(_git("status", "--porcelain", "--", "setup.py", "csrc")),
            "so": os.path.relpath(so, ext_dir), "so_bytes": os.path.getsize(so),
            "built_with_python": platform.python_version(),
            "built_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    with open(os.path.join(ext_dir, "stamp.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def match(ext_dir):
    """Why the prebuilt extension in ext_dir fits this machine's torch; CheckError if it does not."""
    path = os.path.join(ext_dir, "stamp.json")
    try:
        with open(path) as f:
            st = json.load(f)
    except FileNotFoundError:
        raise CheckError(f"no {path} (run `make build-cuda-device` and carry {ext_dir})") from None
    except (OSError, ValueError) as e:
        raise CheckError(f"{path}: unreadable stamp ({e})") from None
    find_so(ext_dir)
    import torch

    for key, have in (("torch", torch.__version__), ("cuda", torch.version.cuda)):
        if st.get(key) != have:
            raise CheckError(f"built for {key} {st.get(key)}, this machine has {have}")
    if st.get("sources_sha256") != sources_sha256():
        raise CheckError("setup.py or csrc/ changed since `make build-cuda-device` (sources hash differs)")
    if torch.cuda.is_available():
        cap = "%d.%d" % torch.cuda.get_device_capability(0)
        archs = [a.strip().split("+")[0] for a in st.get("arch", "").replace(",", ";").split(";")]
        if cap not in archs:
            raise CheckError(f"built for arch {st.get('arch')}, this GPU is sm_{cap.replace('.', '')}")
    return f"torch {st['torch']}, CUDA {st['cuda']}, arch {st['arch']}, commit {st.get('git_commit', '?')[:10]}"


# ---- summary -----------------------------------------------------------------------------------

def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary(out_dir):
    lines = []
    log = os.path.join(out_dir, "test_cuda.log")
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = [ln.strip() for ln in f if ln.strip()]
        res = [ln for ln in tail if " passed" in ln or " failed" in ln or " error" in ln or "no tests ran" in ln]
        lines.append("tests: " + (res[-1] if res else (tail[-1] if tail else "empty log")))
    ops = _load(os.path.join(out_dir, "ops_cuda.json"))
    if ops is None:
        lines.append("ops: no ops_cuda.json")
    else:
        h = ops.get("header", {})
        lines.append(f"ops: {h.get('gpu', h.get('device'))}, torch {h.get('torch')}, CUDA {h.get('cuda')}, copy "
                     f"{h.get('copy_bandwidth_GBps', 0):.0f} GB/s, {len(ops.get('rows', []))} rows"
                     + (f"; {'; '.join(ops['notes'])}" if ops.get("notes") else ""))
        lines.append(f"  {'op':16s} {'shape':34s} {'dtype':9s} {'pass':8s} {'op us':>9s} {'x floor':>8s} "
                     f"{'x plain':>8s} {'vs eager':>8s} {'vs comp':>8s}  goal")
        goals = {(op, pas): (metric, limit) for op, pas, metric, limit in GOALS}
        for r in ops.get("rows", []):
            if r.get("variant") != "op":
                continue
            metric, limit = goals.get((r["op"], r["pass"]), (None, None))
            goal = "" if metric is None or r.get(metric) is None else (
                f"{'met' if r[metric] <= limit else 'MISSED'} ({metric} {r[metric]:.2f} <= {limit})")

            def f(key, fmt="8.2f"):
                return format(r[key], fmt) if r.get(key) is not None else " " * (int(fmt.split(".")[0]) - 1) + "-"
            lines.append(f"  {r['op']:16s} {r['shape'][:34]:34s} {r['dtype']:9s} {r['pass']:8s} {r['us']:9.1f} "
                         f"{f('x_floor')} {f('x_plain_linear')} {f('speedup_vs_eager')} {f('speedup_vs_compiled')}  "
                         f"{goal}")
    share = _load(os.path.join(out_dir, "step_share_cuda.json"))
    if share is None:
        lines.append("step share: no step_share_cuda.json")
    else:
        lines.append(f"step share: {share.get('device')}, amp {share.get('amp_bf16')}, {len(share.get('rows', []))} "
                     f"rows" + (f"; {'; '.join(share['notes'])}" if share.get("notes") else ""))
        steps = {}
        for r in share.get("rows", []):
            steps[(r["method"], r["mode"], r["backend"])] = r["step_ms_median"]
            sh = "-" if r.get("op_share") is None else f"{100 * r['op_share']:.2f}%"
            lines.append(f"  {r['method']:10s} {r['backend']:3s} {r['mode']:7s} step {r['step_ms_median']:9.1f} ms  "
                         f"op share {sh}")
        for (m, mode, b), ms in steps.items():
            if b == "ext" and (m, mode, "ref") in steps:
                lines.append(f"  {m} {mode}: ref/ext step time {steps[(m, mode, 'ref')] / ms:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["stamp", "match", "summary"])
    p.add_argument("dir", help="the prebuilt extension dir (stamp, match) or the results dir (summary)")
    a = p.parse_args(argv)
    try:
        if a.command == "stamp":
            info = stamp(a.dir)
            print(f"wrote {a.dir}/stamp.json: torch {info['torch']}, CUDA {info['cuda']}, arch {info['arch']}, "
                  f"{info['so']} {info['so_bytes'] / 2 ** 20:.1f} MiB; {info['build_info']}")
        elif a.command == "match":
            print(f"prebuilt {a.dir} matches: {match(a.dir)}")
        else:
            print(summary(a.dir))
    except CheckError as e:
        print(f"prebuilt {a.dir} not used: {e}" if a.command == "match" else f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
