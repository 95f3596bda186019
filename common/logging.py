"""Progress bars on rank 0, one JSON line per epoch, PNG plots, and demo summary tables."""
import json
import math
import os
from pathlib import Path

from tqdm import tqdm

from common.dist import is_main


def progress(iterable, desc="", total=None, leave=False):
    if not is_main():
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True,
                disable=os.environ.get("TQDM_DISABLE") == "1")


def _jsonable(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


class JsonlLogger:
    """Appends one JSON object per call to `path`; a no-op on ranks other than 0."""

    def __init__(self, path):
        self.path = Path(path)
        if is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record):
        if not is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path, obj):
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    os.replace(tmp, path)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(records, out_png, keys, x="epoch", title=""):
    """One subplot per key found in `records` (list of dicts), against `x`."""
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        groups = {}
        for i, r in enumerate(records):
            if k in r and r[k] is not None:
                groups.setdefault(r.get("phase", ""), []).append((r.get(x, i), r[k]))
        for phase, pts in groups.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=phase or None)
        ax.set_xlabel(x)
        ax.set_title(k)
        if len(groups) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def plot_confusion(cm, out_png, class_names=None, title=""):
    plt = _plt()
    cm = cm.tolist() if hasattr(cm, "tolist") else cm
    n = len(cm)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * n + 2), max(4, 0.35 * n + 2)))
    ax.imshow(cm, cmap="Blues")
    if n <= 30:
        names = class_names or [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def plot_bars(values, out_png, labels=None, title="", ylabel=""):
    plt = _plt()
    values = [float(v) for v in values]
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * len(values) + 2), 3.2))
    ax.bar(range(len(values)), values)
    if labels is not None and len(values) <= 40:
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def _mean_std(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def summary_table(rows, metrics, group="method"):
    """The rows as a text table, then mean ± std (sample std) of each metric per `group`."""
    others = [c for r in rows for c in r if c not in metrics and c not in (group, "seed")]
    cols = [c for c in dict.fromkeys([group, "seed", *others, *metrics]) if any(c in r for r in rows)]
    table = [cols] + [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    groups = list(dict.fromkeys(r[group] for r in rows))
    stat_rows = []
    for g in groups:
        sub = [r for r in rows if r[group] == g]
        cells = []
        for c in cols:
            if c == group:
                cells.append(f"{g} (n={len(sub)})")
            elif c in metrics:
                m, s = _mean_std([r.get(c) for r in sub])
                cells.append(f"{m:.4f} ± {s:.4f}")
            else:
                cells.append("")
        stat_rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(*(table + stat_rows))]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))

    out = [line(table[0]), line(["-" * w for w in widths])]
    out += [line(r) for r in table[1:]]
    out += [line(["-" * w for w in widths]), "mean ± std over seeds:"]
    out += [line(r) for r in stat_rows]
    return "\n".join(out)


def write_summary(path, rows):
    write_json(path, {"rows": rows})
