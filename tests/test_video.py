"""common.video's clip reader: bit-exact against a plain sequential PyAV decode on real encoded
clips (H.264 and HEVC with B-frames, MPEG-4, VP9; shifted start pts; variable frame rate), resize on decode,
one decode for several views, the demux-only index and its cache file, bounded memory, bad files."""
import os
import random
import tracemalloc
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from common import dist, video


def _has_encoder(name):
    try:
        av.codec.Codec(name, "w")
        return True
    except (av.FFmpegError, ValueError):
        return False


def _frames(n, h=48, w=64):
    """Smooth moving content (so encoders use P/B-frames) with a moving bright block."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        out[t] = np.stack([(x * 4 + t * 3) % 256, (y * 5 + t * 2) % 256, ((x + y) * 2 + t * 7) % 256], -1)
        by, bx = (t * 2) % (h - 8), (t * 3) % (w - 8)
        out[t, by:by + 8, bx:bx + 8] = 255
    return out


def _encode(path, codec, frames, *, options=None, pts=None, time_base=None, fmt=None, fps=25):
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        if time_base is not None:
            s.time_base = s.codec_context.time_base = time_base
        s.options = options or {}
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                f.pts, f.time_base = int(pts[i]), time_base
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


X264 = {"bf": "3", "g": "12", "preset": "veryfast"}  # B-frames, a keyframe every 12 frames
CASES = {
    "h264_bframes.mp4": dict(codec="libx264", options=X264),
    "h264_bframes.mkv": dict(codec="libx264", options=X264),
    "mpeg4_bframes.avi": dict(codec="mpeg4", options={"bf": "2", "g": "12"}),
    "mpeg4.mp4": dict(codec="mpeg4", options={"g": "10"}),
    "hevc_bframes.mp4": dict(codec="libx265", options={"preset": "ultrafast",
                                                       "x265-params": "keyint=12:bframes=3:b-pyramid=1:log-level=0"}),
    "vp9.webm": dict(codec="libvpx-vp9", options={"g": "12", "deadline": "realtime", "cpu-used": "8"}),
    "h264_start37.mp4": dict(codec="libx264", options=X264, pts=np.arange(50) + 37, time_base=Fraction(1, 25)),
    "h264_start37.mkv": dict(codec="libx264", options=X264, pts=np.arange(50) + 37, time_base=Fraction(1, 25)),
    "h264_vfr.mkv": dict(codec="libx264", options=X264, time_base=Fraction(1, 1000),
                         pts=np.cumsum(np.random.default_rng(0).integers(15, 90, 50))),
    "h264_vfr.mp4": dict(codec="libx264", options=X264, time_base=Fraction(1, 1000),
                         pts=np.cumsum(np.random.default_rng(1).integers(15, 90, 50))),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    frames = _frames(50)
    out = {}
    for name, kw in CASES.items():
        if _has_encoder(kw["codec"]):
            out[name] = _encode(root / name, frames=frames, **kw)
    return out


def _sequential(path, size=None):
    """The reference: a plain PyAV decode of every frame, in output order."""
    with av.open(str(path)) as c:
        out = []
        for f in c.decode(video=0):
            if size is None:
                out.append(f.to_ndarray(format="rgb24"))
            else:
                h, w = video.output_size(f.height, f.width, size)
                out.append(f.to_ndarray(format="rgb24", width=w, height=h))
    return np.stack(out)


def _index_sets(n, rng):
    return [
        np.sort(rng.choice(n, 10, replace=False)),         # sorted
        rng.choice(n, 10, replace=False),                  # unsorted
        rng.integers(0, n, 12),                            # repeats
        video.uniform_indices(n, 5, train=False),          # widely spaced (TSN): one seek per frame
        np.arange(n - 6, n),                               # the last frames
        np.array([n - 1, 0, n - 1]),                       # both ends, repeated
        video.strided_indices(n, 16, 2, train=True, rng=rng),  # a wrapping 16x2 clip
        np.arange(n),                                      # everything
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_decode_clip_is_bit_exact_vs_sequential_decode(clips, name):
    if name not in clips:
        pytest.skip(f"PyAV wheel lacks the {CASES[name]['codec']} encoder")
    path = clips[name]
    ref = _sequential(path)
    assert np.array_equal(video.read_video(path), ref)
    assert video.num_frames(path) == len(ref) == 50
    index = video.video_index(path)
    assert index.seekable and index.keys[0] == 0 and len(index.keys) >= 3  # seeks are exercised
    rng = np.random.default_rng(0)
    for idx in _index_sets(len(ref), rng):
        clip = video.decode_clip(path, idx)
        assert clip.dtype == np.uint8 and clip.shape == (len(idx), 48, 64, 3)
        assert np.array_equal(clip, ref[idx]), idx


@pytest.mark.parametrize("gap", [0, 10**9])
def test_reseek_and_decode_through_give_the_same_frames(clips, monkeypatch, gap):
    path = clips["h264_bframes.mp4"]
    ref = _sequential(path)
    monkeypatch.setattr(video, "_RESEEK_MIN_GAP", gap)  # 0: seek at every keyframe; huge: never re-seek
    idx = np.array([1, 3, 20, 21, 35, 49, 2])
    assert np.array_equal(video.decode_clip(path, idx), ref[idx])


def test_plan_seeks_per_group_to_the_keyframe_before_it():
    index = video.VideoIndex(100, np.arange(100) * 512 + 1024, np.arange(0, 100, 25), True)
    groups = video._plan(index, np.array([3, 5, 7, 30, 31, 90]))
    assert [(k, g.tolist()) for k, g in groups] == [(0, [3, 5, 7]), (25, [30, 31]), (75, [90])]
    # a keyframe only a few frames past the previous needed frame: decode through
    assert [k for k, _ in video._plan(index, np.array([22, 27]))] == [0]
    assert [(k, g.tolist()) for k, g in video._plan(video.VideoIndex(9, np.zeros(0), np.zeros(0), False),
                                                    np.array([2, 8]))] == [(None, [2, 8])]


@pytest.mark.parametrize("size", [24, (20, 30)])
def test_resize_on_decode(clips, size):
    path = clips["h264_bframes.mp4"]
    idx = np.array([40, 3, 3, 17])
    clip = video.decode_clip(path, idx, size=size)
    h, w = video.output_size(48, 64, size)
    assert clip.shape == (4, h, w, 3) and (h, w) == ((24, 32) if size == 24 else (20, 30))
    assert np.array_equal(clip, _sequential(path, size)[idx])  # the same swscale call as decode-then-reformat
    # close to (not equal to) torch's antialiased resize of the full-size frames
    ref = video.resize(_sequential(path)[idx], (h, w)).numpy().astype(np.int16)
    assert np.abs(clip.astype(np.int16) - ref).mean() < 6


def test_decode_views_is_one_decode_equal_to_separate_clips(clips, monkeypatch):
    path = clips["h264_bframes.mkv"]
    views = [np.arange(0, 16), np.arange(30, 50, 2), np.array([5, 45, 5])]
    separate = [video.decode_clip(path, v, size=24) for v in views]
    opened = []
    real_open = video._open
    monkeypatch.setattr(video, "_open", lambda p: opened.append(p) or real_open(p))
    together = video.decode_views(path, views, size=24)
    assert len(opened) == 1
    assert all(np.array_equal(a, b) for a, b in zip(together, separate))


def test_no_timestamps_falls_back_to_a_counted_decode(tmp_path):
    path = _encode(tmp_path / "raw.h264", "libx264", _frames(30), options=X264, fmt="h264")  # Annex B: no pts
    video._cache.clear()
    with pytest.warns(UserWarning, match="raw.h264"):
        n = video.num_frames(path)
    ref = _sequential(path)
    assert n == len(ref) == 30 and not video.video_index(path).seekable
    idx = np.array([29, 0, 14, 14])
    assert np.array_equal(video.decode_clip(path, idx), ref[idx])


def test_index_contradicted_by_the_decoder_is_rebuilt_by_decoding(clips, monkeypatch):
    path = clips["h264_bframes.mkv"]
    ref = _sequential(path)
    good = video.video_index(path)
    wrong = video.VideoIndex(50, good.pts * 2, good.keys, True)  # timestamps no decoded frame carries
    monkeypatch.setattr(video, "_demux_index", lambda p: wrong)
    video._cache.clear()
    idx = np.array([30, 2, 49])
    with pytest.warns(UserWarning, match="h264_bframes.mkv: decoded frames disagree"):
        clip = video.decode_clip(path, idx)
    assert np.array_equal(clip, ref[idx]) and not video.video_index(path).seekable
    video._cache.clear()


def test_index_file_round_trip_and_invalidation(tmp_path, monkeypatch):
    a = _encode(tmp_path / "a.mp4", "libx264", _frames(20), options=X264)
    b = _encode(tmp_path / "b.mkv", "libx264", _frames(30), options=X264)
    file = tmp_path / "videos.index.json"
    with pytest.warns(UserWarning, match="missing.mp4"):
        assert video.save_index([a, b, tmp_path / "missing.mp4"], file) == 2
    expected = {p: video.video_index(p) for p in (a, b)}
    video._cache.clear()
    assert video.load_index(file) == 2

    def no_demux(path):
        raise AssertionError(f"{path} demuxed again although its index was loaded")
    monkeypatch.setattr(video, "_demux_index", no_demux)
    for p, idx in expected.items():
        got = video.video_index(p)
        assert got.num_frames == idx.num_frames and np.array_equal(got.pts, idx.pts)
        assert np.array_equal(got.keys, idx.keys)
    monkeypatch.undo()

    _encode(b, "libx264", _frames(26), options=X264)  # b changes (size and mtime)
    os.utime(b, ns=(1, 1))
    video._cache.clear()
    assert video.load_index(file) == 1  # only a is still valid
    assert video.num_frames(b) == 26
    video.build_index([a, b], file)  # rewrites the stale entry
    video._cache.clear()
    assert video.load_index(file) == 2 and video.num_frames(b) == 26

    file.write_text("{not json")
    with pytest.warns(UserWarning, match="videos.index.json"):
        assert video.load_index(file) == 0


def test_index_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "_CACHE_MAX_FRAMES", 50)
    video._cache.clear()
    monkeypatch.setattr(video, "_cache_frames", 0)
    paths = [_encode(tmp_path / f"{i}.mp4", "mpeg4", _frames(20)) for i in range(4)]
    for p in paths:
        assert video.num_frames(p) == 20
    assert len(video._cache) == 2 and video._cache_frames == 40
    assert list(video._cache) == [os.path.abspath(p) for p in paths[2:]]  # least recently used dropped


def test_memory_is_bounded_by_the_clip_not_the_video(tmp_path):
    path = _encode(tmp_path / "long.mp4", "libx264", _frames(150, 96, 128), options=X264)
    video.num_frames(path)
    frame_bytes = 96 * 128 * 3
    tracemalloc.start()
    clip = video.decode_clip(path, [100, 102, 104, 106])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert clip.shape == (4, 96, 128, 3)
    assert peak < 12 * frame_bytes, peak  # the old full decode held 150 frames (5.5 MB)


def test_bad_files_raise_naming_the_file(tmp_path):
    with pytest.raises(video.VideoDecodeError, match="missing.mp4"):
        video.decode_clip(tmp_path / "missing.mp4", [0])
    with pytest.raises(video.VideoDecodeError, match="not a file"):
        video.num_frames(tmp_path)
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(4000))
    with pytest.raises(video.VideoDecodeError, match="garbage.mp4"):
        video.num_frames(tmp_path / "garbage.mp4")

    good = _encode(tmp_path / "good.mp4", "libx264", _frames(30), options=X264)
    (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # moov at the end: lost
    with pytest.raises(video.VideoDecodeError, match="cut.mp4"):
        video.decode_clip(tmp_path / "cut.mp4", [0])
    with pytest.raises(video.VideoDecodeError, match="good.mp4, which has 30 frames"):
        video.decode_clip(good, [3, 30])
    with pytest.raises(ValueError, match="negative"):
        video.decode_clip(good, [-1])
    with pytest.raises(ValueError, match="empty"):
        video.decode_views(good, [[1], []])

    with av.open(str(tmp_path / "audio.mka"), "w") as c:  # a media file without a video stream
        s = c.add_stream("mp2", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(video.VideoDecodeError, match="no video stream in .*audio.mka"):
        video.decode_clip(tmp_path / "audio.mka", [0])


def test_truncated_avi_that_over_reports_its_length(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)  # noise: large packets
    full = _encode(tmp_path / "full.avi", "mpeg4", frames, options={"qscale": "2"})
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    with av.open(str(cut)) as c:
        assert c.streams.video[0].frames == 40  # the header still claims every frame
    with pytest.warns(UserWarning, match="cut.avi"):  # the damaged last packet: counted by a decode
        n = video.num_frames(cut)
    ref = _sequential(cut)
    assert n == len(ref) < 40
    assert np.array_equal(video.decode_clip(cut, [0, n - 1]), ref[[0, n - 1]])
    with pytest.raises(video.VideoDecodeError, match="cut.avi"):
        video.decode_clip(cut, [n])


# ----------------------------------------------------------------------------- DataLoader practice

class _RandomItems(torch.utils.data.Dataset):
    """Each item draws from every RNG a dataset may use, and from a (seed, epoch, index) Generator."""

    def __init__(self):
        self.epoch = 0

    def __len__(self):
        return 12

    def __getitem__(self, i):
        keyed = np.random.default_rng([7, self.epoch, i]).random()
        return torch.tensor([i, self.epoch, np.random.rand(), random.random(), torch.rand(()).item(), keyed],
                            dtype=torch.float64)


def _epochs(loader, epochs):
    out = []
    for e in epochs:
        dist.set_epoch(loader, e)
        out.append(torch.cat(list(loader)))
    return out


def test_loader_workers_are_persistent_and_resume_is_bit_exact():
    ds = _RandomItems()
    straight = dist.make_loader(ds, 4, shuffle=True, workers=2, seed=5)
    assert straight.persistent_workers and straight.prefetch_factor == 4
    assert straight.pin_memory == torch.cuda.is_available()
    a = _epochs(straight, range(3))
    resumed = _epochs(dist.make_loader(ds, 4, shuffle=True, workers=2, seed=5), [1, 2])  # fresh workers at epoch 1
    assert torch.equal(a[1], resumed[0]) and torch.equal(a[2], resumed[1])
    assert [x[:, 1].unique().tolist() for x in a] == [[0.0], [1.0], [2.0]]  # the epoch reached the workers
    assert not torch.equal(a[1][:, 2:], a[2][:, 2:]) and a[1][:, 0].tolist() != a[2][:, 0].tolist()
    one = _epochs(dist.make_loader(ds, 4, shuffle=True, workers=1, seed=5), range(3))
    assert all(torch.equal(x, y) for x, y in zip(a, one))  # any number of workers: the same batches
    inproc = _epochs(dist.make_loader(ds, 4, shuffle=True, workers=0, seed=5), range(3))
    assert [x[:, 0].tolist() for x in inproc] == [x[:, 0].tolist() for x in a]  # and the same order in-process
    assert not dist.make_loader(ds, 4, shuffle=False, workers=2).persistent_workers  # eval loaders


class _Videos(torch.utils.data.Dataset):
    def __init__(self, paths, strict):
        self.paths, self.strict = paths, strict

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return video.load_or_skip(lambda: video.decode_clip(self.paths[i], [0, 5, 2], size=16), self.paths[i],
                                  self.strict)


def test_bad_video_in_a_worker_is_skipped_and_counted(clips, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(3000))
    paths = [clips["h264_bframes.mp4"], tmp_path / "missing.mp4", clips["vp9.webm"] if "vp9.webm" in clips
             else clips["mpeg4.mp4"], tmp_path / "corrupt.mp4"]
    loader = dist.make_loader(_Videos(paths, strict=False), 2, shuffle=False, workers=2,
                              collate_fn=video.collate_skip_none)
    batches = list(loader)
    assert [skipped for _, skipped in batches] == [1, 1]
    assert [b.shape for b, _ in batches] == [(1, 3, 16, 21, 3)] * 2
    with pytest.raises(video.VideoDecodeError, match="missing.mp4"):
        list(dist.make_loader(_Videos(paths, strict=True), 2, shuffle=False, workers=2,
                              collate_fn=video.collate_skip_none))


def test_uint8_resize_is_within_one_level_of_the_float_path():
    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (3, 40, 70, 3), dtype=torch.uint8, generator=g)
    for hw in [(17, 29), (64, 90)]:  # down and up
        out = video.resize(clip[:, 3:37, 5:65], hw)
        ref = torch.nn.functional.interpolate(clip[:, 3:37, 5:65].permute(0, 3, 1, 2).float(), size=hw,
                                              mode="bilinear", align_corners=False, antialias=True)
        ref = ref.round().clamp(0, 255).permute(0, 2, 3, 1)
        assert out.dtype == torch.uint8 and out.shape == (3, *hw, 3) and out.is_contiguous()
        assert (out.float() - ref).abs().max() <= 1
    assert video.resize(clip.float(), (20, 35)).dtype == torch.float32


def test_to_float_normalized_matches_the_formula_and_leaves_its_input():
    clip = torch.randint(0, 256, (4, 6, 10, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = (clip.permute(3, 0, 1, 2).float() / 255 - torch.tensor(mean).view(-1, 1, 1, 1)) / torch.tensor(std).view(-1, 1, 1, 1)
    assert torch.equal(video.to_float_normalized(clip, mean, std), ref)
    as_float = clip.float()
    video.to_float_normalized(as_float, mean, std)
    assert torch.equal(as_float, clip.float())


def test_size_equal_to_the_source_is_the_plain_decode(tmp_path):
    frames = (np.random.default_rng(0).random((6, 32, 48, 3)) * 255).astype(np.uint8)
    path = tmp_path / "same.mp4"
    video.write_video(path, frames)
    plain = video.decode_clip(path, [0, 3, 5])
    assert np.array_equal(video.decode_clip(path, [0, 3, 5], size=32), plain)
    assert np.array_equal(video.decode_clip(path, [0, 3, 5], size=(32, 48)), plain)
    assert video.decode_clip(path, [0], size=16).shape == (1, 16, 24, 3)
