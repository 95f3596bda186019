"""Video clip loading: ms per clip and peak RSS, side by side, on clips this bench encodes itself.

Per clip (one 32-frame clip at stride 2 from a random position, several positions), each
configuration runs in a FRESH subprocess (its peak RSS = ru_maxrss of that process):
  pyav_min        the minimal PyAV seek + decode of the same frames, written inline below
  decode_clip     common.video.decode_clip (index cached; the first call's index build is timed apart)
  *_s256          the same with the short side resized to 256 on decode (swscale)
  decord          decord VideoReader + get_batch (bench-only; "not installed" otherwise)
  old_full_decode read_video + index, the path the scripts used before (small clips only)
  ds_albar / ds_uas / ds_actionmae   each script's training Dataset __getitem__ (train transform
                  included), and pyav_min on exactly the frames and size it decoded (`*_min`)
plus clips/s through common.dist.make_loader with 1/2/4 workers per Dataset, and the workers
needed to feed the README's H200 step times. Configurations are interleaved over rounds and the
medians reported (the machine may be shared: ratios are what matter). Writes JSON, asserts nothing.

    python bench/video_loader.py                        # -> bench/results/video_loader.json
    python bench/video_loader.py --video a.mp4 --video b.mkv --clip-dir /tmp/clips
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (width, height, seconds); H.264, libx264 defaults for the GOP (keyint 250, 3 B-frames)
CLIPS = {"256p_10s": (456, 256, 10), "720p_10s": (1280, 720, 10), "720p_60s": (1280, 720, 60),
         "480p_300s": (854, 480, 300)}
FPS = 25
CLIP_LEN, STRIDE = 32, 2
STEP_MS = {"uas": (8, 107.0), "albar": (6, 350.0)}  # clips per step, H200 ms per step (README anchors)
SMALL = ("256p_10s", "720p_10s")


def make_clip(path, w, h, seconds, fps=FPS, preset="veryfast"):
    """Camera pan over a smooth texture, a moving block and sensor noise (so the bitrate and the
    B/P-frame mix are realistic), H.264 with x264's default GOP (keyint 250, 3 B-frames)."""
    import av
    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    small = rng.integers(0, 256, (h // 16 + 8, (w + 4 * n // 10) // 16 + 8, 3), dtype=np.uint8)
    tex = np.repeat(np.repeat(small, 16, 0), 16, 1).astype(np.uint16)
    tex = ((tex + np.roll(tex, 8, 1) + np.roll(tex, 8, 0) + np.roll(tex, (8, 8), (0, 1))) // 4).astype(np.uint8)
    grain = rng.integers(-8, 9, (7, h, w, 1), dtype=np.int16)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": preset, "crf": "23"}
        for t in range(n):
            x0 = (t * 4 // 10) % (tex.shape[1] - w)
            img = np.clip(tex[:h, x0:x0 + w] + grain[t % 7], 0, 255).astype(np.uint8)
            by, bx = int(h / 2 + h / 3 * np.sin(t / 17)), int(w / 2 + w / 3 * np.cos(t / 23))
            img[max(by - h // 10, 0):by + h // 10, max(bx - h // 10, 0):bx + h // 10] = (255, 40, 40)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


# ----------------------------------------------------------------------------- readers (child side)

def pyav_min(path, indices, size=None):
    """The least a reader has to do: seek (backward, to a keyframe) when the next wanted frame is
    far, decode, convert only the wanted frames; frame number from pts (constant frame rate)."""
    import av
    from common.video import output_size
    want = sorted(set(int(i) for i in indices))
    got, frames = {}, None
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        rate, tb, t0 = s.average_rate, s.time_base, s.start_time or 0
        pos = None
        for i in want:
            if i in got:
                continue
            if pos is None or i - pos > 64:
                c.seek(t0 + int(i / rate / tb), stream=s, backward=True)
                frames = c.decode(s)
            for f in frames:
                j = round(float((f.pts - t0) * tb * rate))
                pos = j + 1
                if j in want and j not in got:
                    if size is None:
                        got[j] = f.to_ndarray(format="rgb24")
                    else:
                        hh, ww = output_size(f.height, f.width, size)
                        got[j] = f.to_ndarray(format="rgb24", width=ww, height=hh)
                if j >= i:
                    break
    return np.stack([got[int(i)] for i in indices])


def decord_batch(path, indices, size=None):
    import decord
    from common.video import output_size
    if size is None:
        vr = decord.VideoReader(str(path))
    else:
        hh, ww = output_size(*_probe_hw(path), size)
        vr = decord.VideoReader(str(path), width=ww, height=hh)
    return vr.get_batch(list(map(int, indices))).asnumpy()


def _probe_hw(path):
    import av
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.codec_context.height, s.codec_context.width


def _dataset(kind, path, copies, work):
    """A script's training Dataset over `copies` entries of one video, built from a list file the
    way its constructor reads one."""
    path = Path(path)
    if kind == "albar":
        import train_albar as ta
        lst = Path(work) / "albar_list.txt"
        lst.write_text("".join(f"{path} 0\n" for _ in range(copies)))
        return ta.ClipDataset.from_list(lst, mode="train", root="/")
    if kind == "uas":
        import train_uas as tu
        lst = Path(work) / "uas_list.txt"
        lst.write_text("".join(f"{path.name} 0\n" for _ in range(copies)))
        return tu.VideoListDataset(path.parent, lst, 1, "train")
    if kind == "actionmae":
        import train_actionmae as tm
        recs = [{"id": f"v{i}", "label": 0, "paths": {"rgb": str(path)}} for i in range(copies)]
        return tm.MultiModalClips(recs, ("rgb",), "list", True)
    raise ValueError(kind)


class _Timer:
    """Wall and process-CPU milliseconds of one call (CPU time counts the decoder's threads and is
    less sensitive than wall time to other processes on a shared machine)."""

    def __init__(self, wall, cpu):
        self.wall, self.cpu = wall, cpu

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.wall.append(1000 * (time.perf_counter() - self.t))
        self.cpu.append(1000 * (time.process_time() - self.c))


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec):
    """Run one configuration; print one JSON line."""
    out = {}
    base = _rss_mb()
    import torch
    torch.set_num_threads(1)
    from common import video
    out["base_rss_mb"] = _rss_mb()
    path, cfg, starts = spec["path"], spec["config"], spec["starts"]
    n = spec["frames"]
    size = 256 if cfg.endswith("_s256") else None
    clips = [s + STRIDE * np.arange(CLIP_LEN) for s in starts]
    times, cpu = [], []
    timed = _Timer(times, cpu)
    if cfg.startswith("ds_") and not cfg.endswith("_min"):
        calls = []
        real_fill = video._fill

        def recording_fill(p, index, views, sz):
            calls.append({"views": [v.tolist() for v in views], "size": sz})
            return real_fill(p, index, views, sz)
        video._fill = recording_fill
        t = time.perf_counter()
        video.video_index(path)
        out["index_ms"] = 1000 * (time.perf_counter() - t)
        ds = _dataset(cfg[3:], path, 1, spec["work"])
        for r in range(len(starts) + 1):  # the first item is a warm-up (imports, caches)
            if hasattr(ds, "epoch"):
                ds.epoch = r
            np.random.seed(r)
            torch.manual_seed(r)
            with timed:
                item = ds[0]
            if item is None:
                raise RuntimeError(f"{cfg}: the dataset skipped {path}")
        out["calls"] = calls[1:]
        del times[0], cpu[0]
    elif cfg.startswith("ds_"):  # ds_*_min: pyav_min on the frames a dataset decoded
        for call in spec["calls"]:
            idx = np.concatenate([np.asarray(v) for v in call["views"]])
            with timed:
                pyav_min(path, idx, call["size"])
    elif cfg == "old_full_decode":
        for idx in clips:
            with timed:
                video.read_video(path)[idx]
    else:
        if cfg.startswith("decode_clip"):
            t = time.perf_counter()
            assert video.num_frames(path) == n
            out["index_ms"] = 1000 * (time.perf_counter() - t)
            fn = video.decode_clip
        elif cfg.startswith("pyav_min"):
            fn = pyav_min
        else:
            fn = decord_batch
        fn(path, clips[0], size=size)  # warm-up
        for idx in clips:
            with timed:
                x = fn(path, idx, size=size)
        out["shape"] = list(x.shape)
    out["ms"], out["cpu_ms"] = times, cpu
    out["maxrss_mb"] = _rss_mb()
    out["python_start_rss_mb"] = base
    print("RESULT " + json.dumps(out))


def _first(batch):
    return batch


def loader_child(spec):
    import torch
    torch.set_num_threads(1)
    from common import dist
    ds = _dataset(spec["kind"], spec["path"], spec["items"], spec["work"])
    loader = dist.make_loader(ds, 1, shuffle=True, workers=spec["workers"], seed=0, collate_fn=_first)
    stamps = []
    t0 = time.perf_counter()
    for batch in loader:
        if batch[0] is None:
            raise RuntimeError(f"{spec['kind']}: the dataset skipped {spec['path']}")
        stamps.append(time.perf_counter() - t0)
    warm = spec["workers"]  # the first batch of each worker includes its start-up
    rate = (len(stamps) - warm) / (stamps[-1] - stamps[warm - 1])
    print("RESULT " + json.dumps({"clips_per_s": rate, "per_worker": rate / spec["workers"],
                                  "first_batch_s": stamps[0]}))


# ----------------------------------------------------------------------------- parent

def run_child(spec, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    try:
        r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[-300:]}


def environment():
    import av
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "av": av.__version__, "ffmpeg": str(getattr(av, "ffmpeg_version_info", "")), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        import decord
        info["decord"] = decord.__version__
    except ImportError:
        info["decord"] = "not installed"
    return info


def med(xs):
    return float(np.median(xs)) if xs else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", action="append", default=[], help="also measure this file (repeatable)")
    p.add_argument("--clip-dir", default="", help="where to encode/keep the clips (default: a temp dir)")
    p.add_argument("--clips", nargs="*", default=list(CLIPS), help=f"generated clips to use, of {list(CLIPS)}")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per configuration")
    p.add_argument("--reps", type=int, default=3, help="clips per child process")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--loader-clips", nargs="*", default=["256p_10s", "720p_60s"])
    p.add_argument("--out", default=str(ROOT / "bench/results/video_loader.json"))
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--loader-child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    if a.loader_child:
        return loader_child(json.loads(a.loader_child))

    from common import video
    info = environment()
    work = Path(a.clip_dir or tempfile.mkdtemp(prefix="video_loader_"))
    work.mkdir(parents=True, exist_ok=True)
    clips = {}
    for name in a.clips:
        w, h, sec = CLIPS[name]
        path = work / f"{name}.mp4"
        if not path.is_file():
            t = time.time()
            print(f"encoding {path} ...", flush=True)
            make_clip(path, w, h, sec)
            print(f"  {time.time() - t:.0f} s", flush=True)
        clips[name] = path
    for v in a.video:
        clips[Path(v).name] = Path(v)
    meta = {}
    rng = np.random.default_rng(0)
    for name, path in clips.items():
        n = video.num_frames(path)
        hw = _probe_hw(path)
        meta[name] = {"path": str(path), "frames": n, "height": hw[0], "width": hw[1],
                      "mbytes": round(path.stat().st_size / 2**20, 2),
                      "encoder": "libx264 preset veryfast crf 23, keyint 250 (x264 default), 3 B-frames"
                      if name in CLIPS else "given", "keyframes": int(video.video_index(path).keys.size)}
        meta[name]["starts"] = [[int(s) for s in rng.integers(0, max(n - CLIP_LEN * STRIDE, 1), a.reps)]
                                for _ in range(a.rounds)]

    configs = ["pyav_min", "decode_clip", "pyav_min_s256", "decode_clip_s256"]
    if info["decord"] != "not installed":
        configs += ["decord", "decord_s256"]
    datasets = ["ds_albar", "ds_uas", "ds_actionmae"]
    results = {name: {} for name in clips}

    def record(name, cfg, r):
        slot = results[name].setdefault(cfg, {"ms": [], "cpu_ms": [], "maxrss_mb": [], "base_rss_mb": []})
        if "error" in r:
            slot["error"] = r["error"]
            print(f"{name} {cfg}: ERROR {r['error']}", flush=True)
            return slot
        for k in ("ms", "cpu_ms"):
            slot[k] += r[k]
        slot["maxrss_mb"].append(r["maxrss_mb"])
        slot["base_rss_mb"].append(r["base_rss_mb"])
        for k in ("index_ms", "shape"):
            if k in r:
                slot[k] = r[k]
        print(f"{name} {cfg}: {med(r['ms']):.0f} ms ({med(r['cpu_ms']):.0f} cpu), {r['maxrss_mb']:.0f} MB", flush=True)
        return slot

    for rnd in range(a.rounds):
        for name, path in clips.items():
            for cfg in configs + datasets + (["old_full_decode"] if name in SMALL else []):
                spec = {"path": str(path), "config": cfg, "frames": meta[name]["frames"],
                        "starts": meta[name]["starts"][rnd], "work": str(work)}
                r = run_child(spec)
                slot = record(name, cfg, r)
                if "calls" in r:  # the same frames through the minimal reader, right after
                    slot["frames_per_item"] = [sum(len(v) for v in c["views"]) for c in r["calls"]]
                    slot["decode_size"] = r["calls"][0]["size"] if r["calls"] else None
                    record(name, cfg + "_min", run_child(dict(spec, config=cfg + "_min", calls=r["calls"])))

    summary = {}
    for name, res in results.items():
        row = {}
        for cfg, slot in res.items():
            row[cfg] = {"ms_median": med(slot["ms"]), "cpu_ms_median": med(slot["cpu_ms"]),
                        "maxrss_mb": max(slot["maxrss_mb"], default=None),
                        "base_rss_mb": med(slot["base_rss_mb"]), "n": len(slot["ms"])}
            if slot["maxrss_mb"]:
                row[cfg]["rss_above_base_mb"] = row[cfg]["maxrss_mb"] - row[cfg]["base_rss_mb"]
            for k in ("error", "index_ms", "shape", "frames_per_item", "decode_size"):
                if k in slot:
                    row[cfg][k] = slot[k]

        def ratio(a_cfg, b_cfg, key):
            x, y = row.get(a_cfg, {}).get(key), row.get(b_cfg, {}).get(key)
            return x / y if x and y else None
        for ds in datasets:
            if ds in row:
                row[ds]["ratio_vs_pyav_min_same_frames"] = ratio(ds, ds + "_min", "ms_median")
                row[ds]["cpu_ratio_vs_pyav_min_same_frames"] = ratio(ds, ds + "_min", "cpu_ms_median")
        for sfx in ("", "_s256"):
            if "decode_clip" + sfx in row:
                dc = row["decode_clip" + sfx]
                dc["ratio_vs_pyav_min"] = ratio("decode_clip" + sfx, "pyav_min" + sfx, "ms_median")
                dc["cpu_ratio_vs_pyav_min"] = ratio("decode_clip" + sfx, "pyav_min" + sfx, "cpu_ms_median")
                dc["ratio_vs_decord"] = ratio("decode_clip" + sfx, "decord" + sfx, "ms_median")
                dc["cpu_ratio_vs_decord"] = ratio("decode_clip" + sfx, "decord" + sfx, "cpu_ms_median")
        summary[name] = row

    workers_needed = {}
    for name, row in summary.items():
        for kind, (per_step, step_ms) in STEP_MS.items():
            ms = row.get(f"ds_{kind}", {}).get("ms_median")
            if ms:
                workers_needed.setdefault(name, {})[kind] = {
                    "clips_per_step": per_step, "h200_step_ms": step_ms, "ms_per_clip_here": ms,
                    "workers": per_step * ms / step_ms}

    loader = {}
    for name in a.loader_clips:
        if name not in clips:
            continue
        for kind in ("albar", "uas", "actionmae"):
            for w in a.workers:
                spec = {"path": str(clips[name]), "kind": kind, "workers": w, "items": 4 * w + 6, "work": str(work)}
                env_spec = json.dumps(spec)
                t = time.time()
                try:
                    r = subprocess.run([sys.executable, __file__, "--loader-child", env_spec], capture_output=True,
                                       text=True, timeout=900, cwd=ROOT,
                                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
                    res = next((json.loads(l[7:]) for l in r.stdout.splitlines() if l.startswith("RESULT ")),
                               {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][-300:]})
                except subprocess.TimeoutExpired:
                    res = {"error": "timed out"}
                loader.setdefault(name, {}).setdefault(kind, {})[str(w)] = res
                print(f"loader {name} {kind} workers={w}: {res} ({time.time() - t:.0f} s)", flush=True)

    acceptance = {}
    for ds in datasets:
        acceptance[f"{ds} / pyav_min on the same frames (target <= 1.2): wall, cpu"] = {
            n: [summary[n][ds].get("ratio_vs_pyav_min_same_frames"), summary[n][ds].get("cpu_ratio_vs_pyav_min_same_frames")]
            for n in summary if ds in summary[n]}
    if "720p_60s" in summary and "decord" in summary["720p_60s"]:
        acceptance["720p_60s decode_clip / decord (target <= 1): wall, cpu"] = {
            sfx or "native": [summary["720p_60s"].get("decode_clip" + sfx, {}).get(k)
                              for k in ("ratio_vs_decord", "cpu_ratio_vs_decord")] for sfx in ("", "_s256")}
    if "720p_60s" in summary and "720p_10s" in summary:
        acceptance["peak RSS 720p_60s / 720p_10s (target <= 2)"] = {
            cfg: summary["720p_60s"][cfg]["maxrss_mb"] / summary["720p_10s"][cfg]["maxrss_mb"]
            for cfg in summary["720p_60s"] if cfg in summary["720p_10s"]
            and summary["720p_60s"][cfg].get("maxrss_mb") and summary["720p_10s"][cfg].get("maxrss_mb")}
    info["loadavg_end"] = os.getloadavg()
    out = {"bench": "video_loader", "command": "python bench/video_loader.py " + " ".join(sys.argv[1:]),
           "environment": info, "clip": f"{CLIP_LEN} frames at stride {STRIDE} from random positions",
           "clips": meta, "per_clip": summary, "acceptance": acceptance, "loader_clips_per_s": loader,
           "workers_needed_h200": workers_needed}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(acceptance, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
