"""PyAV video decoding, frame sampling, clip transforms and bad-file accounting.

Clips are uint8 arrays/tensors (T, H, W, 3) until `to_float_normalized`, which returns (C, T, H, W)
float. Datasets return None for a missing/corrupt file (after a warning naming it) unless strict,
and `collate_skip_none` drops those and reports how many were dropped.
"""
import warnings
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from common.config import InputError


class VideoDecodeError(InputError, RuntimeError):
    pass


def read_video(path):
    """All frames of a video as uint8 (T, H, W, 3). For tools and tests only: datasets read clips
    with `decode_clip` / `decode_views`, whose cost is bounded by the clip, not the video."""
    return _decode(path, None)


def decode_clip(path, indices, *, size=None):
    """Frames at `indices` (any order, repeats allowed) as uint8 (len(indices), H, W, 3), identical
    to a sequential decode of the video taken at those indices.

    `size`: None (native resolution), an int (resize so the short side is `size`, aspect kept, as
    `resize_short_side`), or (h, w) (exact size); the resize happens on decode.
    """
    return decode_views(path, [indices], size=size)[0]


def decode_views(path, views, *, size=None):
    """Several index arrays (test clips x crops) from ONE decode of their union span; a list of
    uint8 (len(v), H, W, 3) arrays, each as `decode_clip(path, v, size=size)` would return it."""
    views = [np.asarray(v, dtype=np.int64) for v in views]
    if not views or any(v.size == 0 for v in views):
        raise ValueError(f"decode_views({path}): empty index list")
    if any(v.min() < 0 for v in views):
        raise ValueError(f"decode_views({path}): negative frame index")
    stop = max(int(v.max()) for v in views) + 1
    frames = _decode(path, stop, size=size)
    out = []
    for v in views:
        if len(frames) <= v.max():
            # the container over-reported its length: clamp to the last decoded frame
            v = np.minimum(v, len(frames) - 1)
        out.append(frames[v])
    return out


def output_size(h, w, size):
    """(h, w) after `size` (None | short side int | (h, w)), rounding as `resize_short_side`."""
    if size is None:
        return h, w
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    if h <= w:
        return int(size), max(1, round(w * size / h))
    return max(1, round(h * size / w)), int(size)


def _decode(path, stop, size=None):
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"video not found: {path}")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"no video stream in {path}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if size is not None:
                    h, w = output_size(frame.height, frame.width, size)
                    frames.append(frame.to_ndarray(format="rgb24", width=w, height=h))
                else:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if stop is not None and len(frames) >= stop:
                    break
    except VideoDecodeError:
        raise
    except (av.FFmpegError, ValueError, OSError) as e:
        raise VideoDecodeError(f"cannot decode {path}: {e}") from e
    if not frames:
        raise VideoDecodeError(f"no frames decoded from {path}")
    return np.stack(frames)


def num_frames(path):
    """Frame count from the container, or by decoding when the container does not say."""
    try:
        with av.open(str(path)) as container:
            n = container.streams.video[0].frames
    except (av.FFmpegError, OSError, IndexError) as e:
        raise VideoDecodeError(f"cannot open {path}: {e}") from e
    return n if n > 0 else len(read_video(path))


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
    clip = _as_tensor(clip)
    x = clip.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


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
    """uint8 (T, H, W, C) -> float32 (C, T, H, W), (x/255 - mean)/std."""
    x = _as_tensor(clip).permute(3, 0, 1, 2).float().div_(255)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
    return (x - m) / s


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
