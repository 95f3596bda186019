"""PyAV video decoding, frame sampling, clip transforms and bad-file accounting.

Clips are uint8 arrays/tensors (T, H, W, 3) until `to_float_normalized`, which returns (C, T, H, W)
float. Datasets return None for a missing/corrupt file (after a warning naming it) unless strict,
and `collate_skip_none` drops those and reports how many were dropped.
"""
import json
import math
import os
import stat
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter
from torch.utils.data import default_collate

from common.config import InputError


class VideoDecodeError(InputError, RuntimeError):
    pass


# ---------------------------------------------------------------- decoding
# Frame i of a video is the i-th frame a sequential decode outputs (`read_video`, the reference).
# `decode_clip` / `decode_views` return exactly those frames without decoding the whole video:
#  - a per-file index from a demux-only packet walk (no decoding) gives every frame's pts in
#    presentation order and the keyframes; it is cached per process (bounded LRU) and can be saved
#    for a whole dataset (`save_index` / `load_index` / `build_index`, keyed by path, size, mtime);
#  - a read seeks to the keyframe at or before the first needed frame, decodes up to the last one
#    and converts only the needed frames, each found by its pts (B-frames, non-zero start, VFR);
#    across a gap that contains a keyframe it seeks again instead of decoding through;
#  - where the packets cannot be trusted (missing or repeated pts, damaged data, a stream that does
#    not start on a keyframe, or a decode that contradicts the index) the index comes from one
#    sequential decode instead, with a warning naming the file; where even the decoded frames carry
#    no usable pts, reads of that file decode from its start and count frames.
# Memory per read is the returned frames plus the decoder's few reference frames, whatever the
# length of the video.

# swscale algorithm of the resize on decode. swscale's bilinear widens its filter when it
# downscales (a triangle filter, like antialiased bilinear), but it scales the YUV planes before
# the RGB conversion, so pixels differ slightly from torch's `resize` of the full-size RGB frame.
INTERPOLATION = "BILINEAR"
_RESEEK_MIN_GAP = 8        # re-seek when it skips more than this many frames vs decoding through
_CACHE_MAX_FRAMES = 4_000_000  # in-memory index cache bound (frames over all cached videos)
_INDEX_VERSION = 1
# decoders whose non-reference frames can be left undecoded without changing any other frame
# (not VP9: there a non-reference frame may still update the entropy context)
_SKIP_NONREF_CODECS = {"h264", "hevc", "mpeg4"}


@dataclass
class VideoIndex:
    """pts of every frame in presentation order and the positions of the keyframes in it.
    `seekable` False: reads decode from the start and count frames (pts are not trusted)."""
    num_frames: int
    pts: np.ndarray     # int64 (num_frames,), strictly increasing (empty when not seekable)
    keys: np.ndarray    # int64 positions of keyframes, increasing (empty when not seekable)
    seekable: bool

    def to_json(self):
        d = {"n": self.num_frames, "seekable": self.seekable, "keys": self.keys.tolist()}
        step = np.diff(self.pts)
        if len(self.pts) > 1 and (step == step[0]).all():
            d["pts_arith"] = [int(self.pts[0]), int(step[0])]  # constant frame rate: 2 numbers
        else:
            d["pts"] = self.pts.tolist()
        return d

    @classmethod
    def from_json(cls, d):
        n = int(d["n"])
        if "pts_arith" in d:
            start, step = d["pts_arith"]
            pts = start + step * np.arange(n, dtype=np.int64)
        else:
            pts = np.asarray(d["pts"], dtype=np.int64)
        return cls(n, pts, np.asarray(d["keys"], dtype=np.int64), bool(d["seekable"]))


_cache = OrderedDict()  # abspath -> (size, mtime_ns, VideoIndex)
_cache_frames = 0


def _stat_key(path):
    try:
        st = os.stat(path)
    except OSError:
        raise VideoDecodeError(f"video not found: {path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise VideoDecodeError(f"video not found (not a file): {path}")
    return st.st_size, st.st_mtime_ns


def _cache_put(key, size, mtime_ns, index):
    global _cache_frames
    old = _cache.pop(key, None)
    if old is not None:
        _cache_frames -= old[2].num_frames
    _cache[key] = (size, mtime_ns, index)
    _cache_frames += index.num_frames
    while _cache_frames > _CACHE_MAX_FRAMES and len(_cache) > 1:
        _, (_, _, dropped) = _cache.popitem(last=False)
        _cache_frames -= dropped.num_frames


def video_index(path):
    """The (cached) `VideoIndex` of a file; built by a packet walk the first time it is needed."""
    key = os.path.abspath(path)
    size, mtime_ns = _stat_key(path)
    hit = _cache.get(key)
    if hit is not None and hit[:2] == (size, mtime_ns):
        _cache.move_to_end(key)
        return hit[2]
    index = _demux_index(path)
    if index is None:
        index = _decode_index(path)
        warnings.warn(f"{path}: the container's packets cannot be trusted (missing or repeated timestamps, "
                      "damaged data or no leading keyframe); frames counted by a full decode"
                      + ("" if index.seekable else ", and clips of this file are read from its start (slower)"),
                      stacklevel=2)
    _cache_put(key, size, mtime_ns, index)
    return index


def num_frames(path):
    """Exact number of frames a sequential decode outputs, from the (cached) demux-only index."""
    return video_index(path).num_frames


@contextmanager
def _open(path):
    path = str(path)
    try:
        container = av.open(path)
    except FileNotFoundError:
        raise VideoDecodeError(f"video not found: {path}") from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"cannot open {path}: {e}") from e
    try:
        if not container.streams.video:
            raise VideoDecodeError(f"no video stream in {path}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream
    except (av.FFmpegError, OSError) as e:  # decoding errors surface from inside the with-block
        raise VideoDecodeError(f"cannot decode {path}: {e}") from e
    finally:
        container.close()


def _demux_index(path):
    """Index from the packets alone, or None where the container cannot be trusted."""
    pts, key_pts = [], []
    with _open(path) as (container, stream):
        for packet in container.demux(stream):
            if not packet.size or packet.is_discard:  # flush packet / outside the edit list
                continue
            if packet.pts is None or packet.is_corrupt:  # no timestamp / truncated or damaged data
                return None
            if not pts and not packet.is_keyframe:  # decoders drop or garble frames before a keyframe
                return None
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
    if not pts:
        raise VideoDecodeError(f"no frames in {path}")
    pts = np.sort(np.asarray(pts, dtype=np.int64))
    if (np.diff(pts) <= 0).any() or pts[0] < key_pts[0]:  # repeated pts / leading frames before the first keyframe
        return None
    return VideoIndex(len(pts), pts, np.searchsorted(pts, np.asarray(key_pts, dtype=np.int64)), True)


def _decode_index(path):
    """Index from a sequential decode: the count always, pts where the decoded frames carry them."""
    pts, key_pts = [], []
    with _open(path) as (container, stream):
        for frame in container.decode(stream):
            pts.append(frame.pts)
            if frame.key_frame:
                key_pts.append(frame.pts)
    if not pts:
        raise VideoDecodeError(f"no frames decoded from {path}")
    arr = np.asarray([-1 if p is None else p for p in pts], dtype=np.int64)
    if None in pts or (np.diff(arr) <= 0).any() or not key_pts or key_pts[0] != pts[0]:
        empty = np.zeros(0, dtype=np.int64)
        return VideoIndex(len(pts), empty, empty, False)
    return VideoIndex(len(arr), arr, np.searchsorted(arr, np.asarray(key_pts, dtype=np.int64)), True)


def save_index(paths, file):
    """Index `paths` (cached ones are reused) and write them to the JSON `file` (atomically).
    Bad files are left out with a warning. Returns the number of videos written."""
    entries = {}
    for p in paths:
        try:
            index = video_index(p)
        except VideoDecodeError as e:
            warnings.warn(f"not indexed: {e}", stacklevel=2)
            continue
        size, mtime_ns = _stat_key(p)
        entries[os.path.abspath(p)] = {"size": size, "mtime_ns": mtime_ns, **index.to_json()}
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps({"version": _INDEX_VERSION, "videos": entries}))
    os.replace(tmp, file)
    return len(entries)


def load_index(file):
    """Put the entries of an index `file` whose video still has the recorded size and mtime into
    the in-memory cache (so workers forked later inherit them). Returns how many were loaded."""
    try:
        data = json.loads(Path(file).read_text())
        videos = data["videos"] if data.get("version") == _INDEX_VERSION else {}
    except (OSError, ValueError, KeyError, AttributeError) as e:
        warnings.warn(f"ignoring unreadable video index {file}: {e}", stacklevel=2)
        return 0
    loaded = 0
    for path, d in videos.items():
        try:
            if _stat_key(path) != (d["size"], d["mtime_ns"]):
                continue
            _cache_put(path, d["size"], d["mtime_ns"], VideoIndex.from_json(d))
        except (VideoDecodeError, KeyError, TypeError, ValueError):
            continue
        loaded += 1
    return loaded


def build_index(paths, file):
    """Load the index `file` if present and rewrite it (indexing what it lacks) unless it held every
    video of `paths` unchanged: a dataset's videos are demuxed once, not once per worker and epoch."""
    paths = list(paths)
    if not Path(file).is_file() or load_index(file) < len(paths):
        save_index(paths, file)


def read_video(path, *, size=None):
    """All frames of a video as uint8 (T, H, W, 3) by a plain sequential decode: the reference
    that `decode_clip` matches. For tools and tests only: datasets read clips with `decode_clip` /
    `decode_views`, whose cost is bounded by the clip, not by the video."""
    frames = []
    with _open(path) as (container, stream):
        convert = _Converter(size)
        for frame in container.decode(stream):
            frames.append(convert(frame))
    if not frames:
        raise VideoDecodeError(f"no frames decoded from {path}")
    return np.stack(frames)


def decode_clip(path, indices, *, size=None):
    """Frames at `indices` (any order, repeats allowed) as uint8 (len(indices), H, W, 3), identical
    to a sequential decode of the video taken at those indices.

    `size`: None (native resolution), an int (resize so the short side is `size`, aspect kept, as
    `output_size`), or (h, w) (exact size). The resize happens on decode in swscale (see
    INTERPOLATION), so a large source never exists at full size in RGB.
    """
    return decode_views(path, [indices], size=size)[0]


def decode_views(path, views, *, size=None):
    """Several index arrays (test clips x crops) from ONE decode of their union; a list of uint8
    (len(v), H, W, 3) arrays, each as `decode_clip(path, v, size=size)` would return it."""
    views = [np.asarray(v, dtype=np.int64).reshape(-1) for v in views]
    if not views or any(v.size == 0 for v in views):
        raise ValueError(f"decode_views({path}): empty index list")
    if any(v.min() < 0 for v in views):
        raise ValueError(f"decode_views({path}): negative frame index")
    try:
        return _fill(path, video_index(path), views, size)
    except _IndexMismatch:
        # the packets misled the index (seen only in broken files): count frames by decoding instead
        warnings.warn(f"{path}: decoded frames disagree with the container's timestamps; re-indexed by "
                      "a full decode, clips of this file are read from its start (slower)", stacklevel=2)
        index = _decode_index(path)
        index.seekable = False
        _cache_put(os.path.abspath(path), *_stat_key(path), index)
        return _fill(path, index, views, size)


def _fill(path, index, views, size):
    top = max(int(v.max()) for v in views)
    if top >= index.num_frames:
        raise VideoDecodeError(f"frame {top} requested from {path}, which has {index.num_frames} frames")
    need = np.unique(np.concatenate(views))
    slots = {int(i): [] for i in need}  # frame position -> [(view, row), ...] still to fill
    for vi, v in enumerate(views):
        for row, i in enumerate(v.tolist()):
            slots[i].append((vi, row))
    out = [None] * len(views)

    def emit(pos, img):
        for vi, row in slots.pop(pos):
            if out[vi] is None:
                out[vi] = np.empty((len(views[vi]),) + img.shape, np.uint8)
            elif out[vi].shape[1:] != img.shape:
                raise VideoDecodeError(f"{path}: frame size changes mid-stream ({out[vi].shape[1:]} -> {img.shape})")
            out[vi][row] = img

    _read(path, index, need, _Converter(size), emit, slots)
    if slots:
        raise VideoDecodeError(f"{path}: frames {sorted(slots)[:5]} not decoded (truncated or corrupt file?)")
    return out


class _IndexMismatch(Exception):
    pass


class _Converter:
    """Decoded frame -> uint8 (H, W, 3) rgb24, resized in swscale when `size` is given; one
    reformatter per read so swscale's context is reused."""

    def __init__(self, size):
        self.size = size
        self.reformatter = VideoReformatter()

    def __call__(self, frame):
        h, w = output_size(frame.height, frame.width, self.size)
        if (h, w) == (frame.height, frame.width):  # already the asked size: the plain conversion
            rgb = self.reformatter.reformat(frame, format="rgb24")
        else:
            rgb = self.reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation=INTERPOLATION)
        return rgb.to_ndarray()


def _plan(index, need):
    """Split the sorted needed positions into groups read after one seek each: [(keyframe, positions)].
    keyframe None = decode from the start of the file."""
    if not index.seekable:
        return [(None, need)]
    kf = index.keys[np.maximum(np.searchsorted(index.keys, need, side="right") - 1, 0)]
    groups, start = [], 0
    for j in range(1, len(need)):
        if kf[j] - need[j - 1] > _RESEEK_MIN_GAP:  # a keyframe well past the previous needed frame
            groups.append((int(kf[start]), need[start:j]))
            start = j
    groups.append((int(kf[start]), need[start:]))
    return groups


def _read(path, index, need, convert, emit, pending):
    with _open(path) as (container, stream):
        fresh = True
        for keyframe, group in _plan(index, need):
            group = [int(g) for g in group if int(g) in pending]
            if not group:
                continue
            if keyframe is not None and not (fresh and keyframe == int(index.keys[0])):
                container.seek(int(index.pts[keyframe]), stream=stream, backward=True, any_frame=False)
                if not _decode_group(container, stream, index, group, convert, emit, pending, seeked=True):
                    # the demuxer landed after the wanted keyframe: decode this group from the start
                    container.seek(int(index.pts[0]), stream=stream, backward=True, any_frame=False)
                    if not _decode_group(container, stream, index, group, convert, emit, pending, seeked=True):
                        raise _IndexMismatch()
            else:
                _decode_group(container, stream, index, group, convert, emit, pending, seeked=False)
            fresh = False


def _decode_group(container, stream, index, group, convert, emit, pending, seeked):
    """Decode until every position in `group` is emitted (or the output is past it). After a seek,
    packets before the first keyframe are skipped and frames presented before it (leading pictures)
    are ignored. Returns False when the seek landed past the group's first frame."""
    members, last = set(group), group[-1]
    ctx = stream.codec_context
    skip_unneeded = index.seekable and ctx.name in _SKIP_NONREF_CODECS
    left = len(members)
    floor = None if seeked else -2**63
    count = -1
    for packet in container.demux(stream):
        if floor is None:
            if not packet.size or not packet.is_keyframe or packet.pts is None:
                continue
            floor = packet.pts
            if floor > index.pts[group[0]]:
                return False
        if skip_unneeded and packet.pts is not None:
            # a frame nobody needs is not decoded when no other frame references it (exact)
            pos = int(np.searchsorted(index.pts, packet.pts))
            needed = pos >= index.num_frames or index.pts[pos] != packet.pts or pos in pending
            ctx.skip_frame = "DEFAULT" if needed else "NONREF"
        for frame in packet.decode():
            count += 1
            if index.seekable:
                if frame.pts is None:
                    raise _IndexMismatch()
                if frame.pts < floor:
                    continue
                pos = int(np.searchsorted(index.pts, frame.pts))
                if pos >= index.num_frames or index.pts[pos] != frame.pts:
                    raise _IndexMismatch()
            else:
                pos = count
            if pos in pending:
                left -= pos in members
                emit(pos, convert(frame))
            if left == 0 or pos > last + _RESEEK_MIN_GAP:  # frames come out in presentation order
                return True
    return True


def output_size(h, w, size):
    """(h, w) after `size` (None | short side int | (h, w)), rounding as `resize_short_side`."""
    if size is None:
        return h, w
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    if h <= w:
        return int(size), max(1, round(w * size / h))
    return max(1, round(h * size / w)), int(size)


def write_video(path, frames, fps=25, codec="mpeg4", quality=None):
    """Encode uint8 (T, H, W, 3) frames to a video file with PyAV (H and W must be even)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_video({path}): expected uint8 (T,H,W,3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_video({path}): H and W must be even for yuv420p, got {h}x{w}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": str(quality or 2)}
        elif codec in ("libx264", "h264"):
            stream.options = {"crf": str(quality or 18), "preset": "veryfast"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------- sampling
# `rng` is a numpy Generator, or None for numpy's global RNG (seeded per worker by common.dist).

def _randint(rng, lo, hi):
    return int(rng.integers(lo, hi)) if rng is not None else int(np.random.randint(lo, hi))


def _uniform(rng, lo, hi, size=None):
    return rng.uniform(lo, hi, size) if rng is not None else np.random.uniform(lo, hi, size)


def uniform_indices(num_total, num_frames, *, train, rng=None):
    """TSN-style: split the video into `num_frames` equal segments, one frame from each
    (random offset in training, the segment centre in test)."""
    if num_total < 1:
        raise ValueError(f"uniform_indices: video has {num_total} frames")
    edges = np.linspace(0, num_total, num_frames + 1)
    if train:
        idx = edges[:-1] + _uniform(rng, 0.0, 1.0, num_frames) * (edges[1:] - edges[:-1])
    else:
        idx = (edges[:-1] + edges[1:]) / 2
    return np.clip(np.floor(idx).astype(np.int64), 0, num_total - 1)


def strided_indices(num_total, num_frames, stride, *, train, rng=None, num_clips=1, clip_idx=0):
    """A window of num_frames·stride frames read at `stride`: a random start in training; in test
    clip `clip_idx` of `num_clips` evenly spaced windows. Videos shorter than the window loop."""
    if num_total < 1:
        raise ValueError(f"strided_indices: video has {num_total} frames")
    span = num_frames * stride
    room = max(num_total - span, 0)
    if train:
        start = _randint(rng, 0, room + 1)
    elif num_clips == 1:
        start = room // 2
    else:
        start = int(round(clip_idx * room / (num_clips - 1)))
    return (start + np.arange(num_frames) * stride) % num_total


# ---------------------------------------------------------------- transforms on (T, H, W, C) uint8 tensors

def _as_tensor(clip):
    return clip if torch.is_tensor(clip) else torch.from_numpy(np.ascontiguousarray(clip))


def resize_short_side(clip, size):
    clip = _as_tensor(clip)
    t, h, w, c = clip.shape
    if min(h, w) == size:
        return clip
    if h <= w:
        nh, nw = size, max(1, round(w * size / h))
    else:
        nh, nw = max(1, round(h * size / w)), size
    return resize(clip, (nh, nw))


def resize(clip, hw):
    """Antialiased bilinear resize of a (T, H, W, C) clip to `hw`. uint8 runs torch's integer kernel
    on the channels-last layout (~20x faster than a float round trip, within one level of it)."""
    clip = _as_tensor(clip).contiguous()
    if clip.dtype != torch.uint8:
        x = F.interpolate(clip.permute(0, 3, 1, 2).float(), size=tuple(hw), mode="bilinear", align_corners=False,
                          antialias=True)
        return x.permute(0, 2, 3, 1).contiguous()
    x = F.interpolate(clip.permute(0, 3, 1, 2), size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).contiguous()


def random_resized_crop(clip, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng=None):
    """The same Inception-style crop for every frame, resized to size×size."""
    clip = _as_tensor(clip)
    _, h, w, _ = clip.shape
    area = h * w
    for _ in range(10):
        target = area * _uniform(rng, *scale)
        aspect = np.exp(_uniform(rng, np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y0, x0 = _randint(rng, 0, h - ch + 1), _randint(rng, 0, w - cw + 1)
            return resize(clip[:, y0:y0 + ch, x0:x0 + cw], (size, size))
    return resize(center_crop(clip, min(h, w)), (size, size))


def random_crop(clip, size, rng=None):
    clip = _as_tensor(clip)
    _, h, w, _ = clip.shape
    if h < size or w < size:
        raise ValueError(f"random_crop: clip {h}x{w} smaller than crop {size}")
    y0, x0 = _randint(rng, 0, h - size + 1), _randint(rng, 0, w - size + 1)
    return clip[:, y0:y0 + size, x0:x0 + size]


def center_crop(clip, size):
    clip = _as_tensor(clip)
    _, h, w, _ = clip.shape
    y0, x0 = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return clip[:, y0:y0 + size, x0:x0 + size]


def three_crop(clip, size):
    """Left/top, centre, right/bottom square crops along the long side (3-crop testing)."""
    clip = _as_tensor(clip)
    _, h, w, _ = clip.shape
    if w >= h:
        xs = [0, (w - size) // 2, w - size]
        return [clip[:, (h - size) // 2:(h - size) // 2 + size, x:x + size] for x in xs]
    ys = [0, (h - size) // 2, h - size]
    return [clip[:, y:y + size, (w - size) // 2:(w - size) // 2 + size] for y in ys]


def hflip(clip):
    return _as_tensor(clip).flip(2)


def to_float_normalized(clip, mean, std):
    """uint8 (T, H, W, C) -> float32 (C, T, H, W), (x/255 - mean)/std (in place on one float copy, in
    the clip's memory order; a permuted view of it is returned)."""
    x = _as_tensor(clip).to(torch.float32, copy=True).div_(255)  # never the caller's float tensor
    x.sub_(torch.tensor(mean, dtype=torch.float32)).div_(torch.tensor(std, dtype=torch.float32))
    return x.permute(3, 0, 1, 2)


# mmaction2 semantics (the Video Swin / UAS recipe) where they differ from the functions above:
# mmcv resizes with cv2 bilinear (no antialias) and ThreeCrop places its crops as below. mmaction's
# CenterCrop, Flip and Normalize are `center_crop`, `hflip` and `to_float_normalized` (mean/std / 255).

def mmaction_resize(clip, hw):
    """mmcv.imresize(interpolation="bilinear") of uint8 (T, H, W, C) to exactly hw = (h, w): bilinear
    with half-pixel centres, no antialias (cv2 INTER_LINEAR), rounded back to uint8 (cv2's
    fixed-point weights may differ by one grey level)."""
    clip = _as_tensor(clip)
    if tuple(clip.shape[1:3]) == tuple(hw):
        return clip
    x = F.interpolate(clip.permute(0, 3, 1, 2).float(), size=tuple(hw), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def random_resized_box(h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng=None, tries=10):
    """RandomResizedCrop box (y0, x0, ch, cw) on an h x w frame: area fraction ~ U(scale), aspect
    log-uniform in `ratio`, sides rounded, offsets uniform; the centre square after `tries` misses.
    This is mmaction's rule (mmaction draws its 10 candidates up front and x before y: the same
    distribution); the draws are area, aspect, [y0, x0] per try."""
    for _ in range(tries):
        target = _uniform(rng, *scale) * h * w
        aspect = math.exp(_uniform(rng, math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return _randint(rng, 0, h - ch + 1), _randint(rng, 0, w - cw + 1), ch, cw
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


def mmaction_random_resized_crop(clip, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng=None):
    """mmaction RandomResizedCrop (one `random_resized_box` per clip) + Resize((size, size),
    keep_ratio=False) with `mmaction_resize`."""
    clip = _as_tensor(clip)
    y0, x0, ch, cw = random_resized_box(clip.shape[1], clip.shape[2], scale, ratio, rng)
    return mmaction_resize(clip[:, y0:y0 + ch, x0:x0 + cw], (size, size))


def mmaction_three_crop(clip, size):
    """mmaction ThreeCrop: size x size crops at the start, the end and the middle of the long side,
    in mmaction's order. The end crop starts at 2 * ((long - size) // 2), as in mmaction (one pixel
    before the edge when long - size is odd). mmaction requires short side == size (the recipe
    resizes the short side to 224 first); a longer short side is cropped at its centre here."""
    clip = _as_tensor(clip)
    _, h, w, _ = clip.shape
    if min(h, w) < size:
        raise ValueError(f"mmaction_three_crop: clip {h}x{w} smaller than crop {size}")
    if w >= h:
        step, y0 = (w - size) // 2, (h - size) // 2
        return [clip[:, y0:y0 + size, x0:x0 + size] for x0 in (0, 2 * step, step)]
    step, x0 = (h - size) // 2, (w - size) // 2
    return [clip[:, y0:y0 + size, x0:x0 + size] for y0 in (0, 2 * step, step)]


# ---------------------------------------------------------------- bad files

def load_or_skip(fn, path, strict):
    """Run `fn()`; on VideoDecodeError raise if strict, else warn (naming the file) and return None."""
    try:
        return fn()
    except VideoDecodeError as e:
        if strict:
            raise
        warnings.warn(f"skipping bad video ({e}); pass --strict to make this an error", stacklevel=2)
        return None


def collate_skip_none(batch):
    """default_collate over the non-None items; returns (collated or None, number skipped)."""
    good = [b for b in batch if b is not None]
    return (default_collate(good) if good else None), len(batch) - len(good)
