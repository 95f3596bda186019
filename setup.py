"""Build of the fused-ops extension `common._C` (specs/kernels.md §8). Metadata is in pyproject.toml.

    python setup.py build_ext --inplace          # puts common/_C*.so next to common/ops.py
    pip install --no-build-isolation -e .        # same, against the installed torch

C++ CPU kernels (csrc/*.cpp) are always built. The CUDA kernels (csrc/cuda/*.cu) are added when
nvcc is found (CUDA_HOME, nvcc on PATH, or /usr/local/cuda), torch was built with CUDA, the CUDA
major versions match and BUILD_CUDA (alias USE_CUDA) is not 0; no GPU is needed to compile them.
Environment:
    BUILD_EXT=0             skip the extension (pure-Python install; the ops use the references)
    BUILD_CUDA=0            CPU kernels only;  FORCE_CUDA=1: error if the CUDA build is impossible
    TORCH_CUDA_ARCH_LIST    default "9.0" (H100/H200)
    DEBUG=1                 -O0 -g instead of -O3
    MAX_JOBS                parallel compile jobs (ninja)
    RAR_EXT_OPTIONAL=1      a failed extension build only warns (the install stays usable)
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

# CUDA_HOME defaults to /usr/local/cuda (an `nvcc` wrapper on PATH, e.g. /usr/local/bin/nvcc, would
# otherwise make torch guess CUDA_HOME=/usr/local, which has no CUDA headers)
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
ROOT = os.path.dirname(os.path.abspath(__file__))
PY_MODULES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "train_*.py")))
PACKAGES = find_packages(where=ROOT, include=["common", "common.*"])


def _env_flag(name, default="1"):
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cuda_decision():
    """(use_cuda, reason) following specs/kernels.md §8."""
    import torch
    from torch.utils import cpp_extension

    if not (_env_flag("BUILD_CUDA") and _env_flag("USE_CUDA")):
        return False, "BUILD_CUDA=0"
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        cuda_home = "/usr/local/cuda"
    if cuda_home is None:
        return False, "nvcc not found (set CUDA_HOME)"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    nv = _nvcc_version(cuda_home)
    if nv is None:
        return False, f"cannot run {cuda_home}/bin/nvcc --version"
    torch_major = int(torch.version.cuda.split(".")[0])
    if nv[0] != torch_major:
        return False, f"nvcc {nv[0]}.{nv[1]} does not match torch CUDA {torch.version.cuda}"
    return True, f"nvcc {nv[0]}.{nv[1]} at {cuda_home}, torch CUDA {torch.version.cuda}"


def _ext_modules():
    if not _env_flag("BUILD_EXT"):
        print("[setup.py] BUILD_EXT=0: not building common._C (the ops use the pure-PyTorch references)")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda, reason = _cuda_decision()
    if not use_cuda and _env_flag("FORCE_CUDA", "0"):
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    debug = _env_flag("DEBUG", "0")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    info = f"torch {torch.__version__}; " + (
        f"CUDA kernels ({reason}; arch {os.environ['TORCH_CUDA_ARCH_LIST']})" if use_cuda else f"CPU only ({reason})")
    print(f"[setup.py] common._C: {info}")
    # -ffp-contract=off: static_clip must not contract x*scale - mean into an FMA (bitwise contract)
    cxx = opt + ["-ffp-contract=off"]  # the C++ standard is the one torch adds (C++17 or C++20)
    macros = [("RAR_BUILD_INFO", '"' + info.replace('"', "'") + '"')]  # torch adds Py_LIMITED_API (py_limited_api=True)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    kwargs = dict(extra_compile_args={"cxx": cxx}, define_macros=macros, py_limited_api=True)
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        macros.append(("WITH_CUDA", None))
        # never --use_fast_math; static_clip uses explicit _rn intrinsics against FMA contraction
        kwargs["extra_compile_args"]["nvcc"] = opt + (["-G"] if debug else ["-lineinfo"])
        ext = CUDAExtension("common._C", sources, **kwargs)
    else:
        ext = CppExtension("common._C", sources, **kwargs)
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}


def _build_ext_class(base):
    class BuildExt(base):
        """BuildExtension (ninja, MAX_JOBS); RAR_EXT_OPTIONAL=1 turns a failed build into a warning."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - reported, then re-raised unless optional
                if not _env_flag("RAR_EXT_OPTIONAL", "0"):
                    raise
                print(f"[setup.py] WARNING: building common._C failed ({e}); continuing without it "
                      "(RAR_EXT_OPTIONAL=1): the ops use the pure-PyTorch references", file=sys.stderr)

    return BuildExt


ext_modules, cmdclass = _ext_modules()
setup(
    packages=PACKAGES,
    py_modules=PY_MODULES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
