"""Synthetic long-tailed skeleton actions in the real PYSKL pickle format (offline BRL demo + tests).

NTU-60-like: 60 classes, each a pair (upper-body primitive, lower-body primitive) animated by
forward kinematics on the NTU RGB+D 25-joint skeleton (Kinect camera coordinates: y up, z depth).
12 upper x 10 lower primitives give 120 pairs, of which 60 are classes: class c = 12k + u uses
upper primitive u and lower primitive (u + 2k + 1) mod 10, k = c // 12. So every primitive already
appears in the 12 head classes (k = 0), each upper primitive is in 5 classes and each lower one in
5-7, and neither body half alone names a class: a rare class is a new combination of motions that
the frequent classes teach, which makes it learnable from a few clips (a balanced version of the
data shows it). No primitive is the left/right mirror of another, because the spatial flip of the
pipeline relabels left and right joints. Clips get amplitude / speed / phase jitter, body-size
jitter, a random viewpoint (yaw), sensor noise, a variable length and sometimes a second (idle)
person.

`build_dataset(...)` returns the PYSKL dict {"split": {...}, "annotations": [...]} with float16
keypoints (M, T, 25, 3): a per-class train pool (`synth_train`: the long-tailed counts of the spec's
formula plus `val_per_class` extra clips, the validation pool) and a balanced test split
(`synth_val`, PYSKL's name of the test split); and the long-tailed counts.
"""
import numpy as np

# NTU-25 parent of each joint (0-based, the spine base 0 is the root; 20 = spine shoulder)
PARENT = [-1, 0, 20, 2, 20, 4, 5, 6, 20, 8, 9, 10, 0, 12, 13, 14, 0, 16, 17, 18, 1, 7, 7, 11, 11]
# rest offset of each joint from its parent, metres (x right of the camera, y up, z away)
REST = np.array([
    [0, 0, 0], [0, 0.28, 0], [0, 0.2, 0], [0, 0.15, 0],            # 0 base, 1 mid, 2 neck, 3 head
    [-0.18, -0.02, 0], [0, -0.27, 0], [0, -0.25, 0], [0, -0.06, 0],  # 4-7 left arm
    [0.18, -0.02, 0], [0, -0.27, 0], [0, -0.25, 0], [0, -0.06, 0],   # 8-11 right arm
    [-0.09, -0.05, 0], [0, -0.4, 0], [0, -0.4, 0], [0, -0.05, -0.1],  # 12-15 left leg
    [0.09, -0.05, 0], [0, -0.4, 0], [0, -0.4, 0], [0, -0.05, -0.1],   # 16-19 right leg
    [0, 0.22, 0],                                                     # 20 spine shoulder
    [0, -0.05, 0], [0.03, -0.02, -0.02], [0, -0.05, 0], [-0.03, -0.02, -0.02],  # hand tips, thumbs
], dtype=np.float64)
ORDER = [0, 1, 20, 2, 3, 4, 5, 6, 7, 21, 22, 8, 9, 10, 11, 23, 24, 12, 13, 14, 15, 16, 17, 18, 19]
PI = np.pi

# motion primitives: list of (joint, axis, amplitude rad, frequency Hz at 30 fps, phase offset rad)
UPPER = [
    ("still", []),
    ("raise_r", [(8, "x", -1.4, 0.4, 0.0)]),
    ("wave_both", [(4, "z", -1.0, 1.0, 0.0), (8, "z", 1.0, 1.0, 0.0)]),
    ("drink_r", [(9, "x", -1.7, 0.5, 0.0), (8, "x", -0.4, 0.5, 0.0)]),
    ("swing", [(4, "x", 0.6, 0.8, 0.0), (8, "x", 0.6, 0.8, PI)]),
    ("nod_bend", [(1, "x", 0.5, 0.5, 0.0), (2, "x", 0.4, 1.0, 0.0)]),
    ("wave_r", [(8, "z", 1.3, 1.2, 0.0), (9, "z", 0.6, 1.2, 0.0)]),
    ("punch", [(4, "x", -1.5, 0.9, 0.0), (8, "x", -1.5, 0.9, PI), (5, "x", -1.0, 0.9, PI), (9, "x", -1.0, 0.9, 0.0)]),
    ("curls", [(5, "x", -1.6, 0.6, 0.0), (9, "x", -1.6, 0.6, 0.0)]),
    ("twist", [(1, "y", 0.7, 0.6, 0.0)]),
    ("side_bend", [(1, "z", 0.45, 0.5, 0.0)]),
    ("arms_up", [(4, "z", -2.4, 0.3, 0.0), (8, "z", 2.4, 0.3, 0.0)]),
]
LOWER = [
    ("still", []),
    ("kick_r", [(16, "x", -1.2, 0.7, 0.0)]),
    ("squat", [(12, "x", -1.0, 0.4, 0.0), (16, "x", -1.0, 0.4, 0.0), (13, "x", 1.6, 0.4, 0.0), (17, "x", 1.6, 0.4, 0.0)]),
    ("walk", [(12, "x", 0.5, 0.8, 0.0), (16, "x", 0.5, 0.8, PI), (13, "x", 0.5, 1.6, 0.0), (17, "x", 0.5, 1.6, PI)]),
    ("knee_r", [(16, "x", -1.3, 0.5, 0.0), (17, "x", 1.8, 0.5, 0.0)]),
    ("side_r", [(16, "z", 0.7, 0.6, 0.0)]),
    ("march", [(12, "x", -0.9, 1.2, 0.0), (16, "x", -0.9, 1.2, PI), (13, "x", 1.3, 1.2, 0.0), (17, "x", 1.3, 1.2, PI)]),
    ("heel_r", [(17, "x", 2.0, 0.8, 0.0)]),
    ("jack_legs", [(12, "z", -0.5, 0.5, 0.0), (16, "z", 0.5, 0.5, 0.0)]),
    ("bounce", [(12, "x", -0.45, 1.0, 0.0), (16, "x", -0.45, 1.0, 0.0), (13, "x", 0.9, 1.0, 0.0), (17, "x", 0.9, 1.0, 0.0)]),
]
NUM_CLASSES = 60
CLASSES = [(c % 12, (c % 12 + 2 * (c // 12) + 1) % 10) for c in range(NUM_CLASSES)]  # (upper, lower) indices
IDLE = [(4, "x", 0.15, 0.3, 0.0), (8, "x", 0.15, 0.3, 0.0)]


def class_name(label):
    u, l = CLASSES[label]
    return f"{UPPER[u][0]}+{LOWER[l][0]}"


def _axis_rot(axis, ang):
    """(T,3,3) rotations about a body axis by angles ang (T,)."""
    c, s = np.cos(ang), np.sin(ang)
    o, z = np.ones_like(ang), np.zeros_like(ang)
    if axis == "x":
        m = [[o, z, z], [z, c, -s], [z, s, c]]
    elif axis == "y":
        m = [[c, z, s], [z, o, z], [-s, z, c]]
    else:
        m = [[c, -s, z], [s, c, z], [z, z, o]]
    return np.stack([np.stack(r, -1) for r in m], -2)


def animate(prims, T, rng, size=1.0):
    """Joint positions (T, 25, 3) of one person performing `prims` (list of primitive tuples)."""
    t = np.arange(T) / 30.0
    local = np.tile(np.eye(3), (T, 25, 1, 1))
    speed = rng.uniform(0.75, 1.3)
    phase0 = rng.uniform(0, 2 * np.pi)
    for joint, axis, amp, freq, phase in prims:
        a = amp * rng.uniform(0.7, 1.2)
        ang = a * 0.5 * (1 - np.cos(2 * np.pi * freq * speed * t + phase + phase0))
        local[:, joint] = local[:, joint] @ _axis_rot(axis, ang)
    glob = np.zeros((T, 25, 3, 3))
    pos = np.zeros((T, 25, 3))
    rest = REST * size * rng.uniform(0.92, 1.08, size=(25, 1))
    for j in ORDER:
        p = PARENT[j]
        if p < 0:
            glob[:, j] = local[:, j]
            continue
        pos[:, j] = pos[:, p] + glob[:, p] @ rest[j]
        glob[:, j] = glob[:, p] @ local[:, j]
    return pos


def make_clip(label, rng, *, two_person_p=0.25, noise=0.012, min_len=40, max_len=100):
    """One clip (M, T, 25, 3) float32 in camera coordinates."""
    u, l = CLASSES[label]
    T = int(rng.integers(min_len, max_len + 1))
    size = rng.uniform(0.85, 1.15)
    bodies = [animate(UPPER[u][1] + LOWER[l][1], T, rng, size)]
    if rng.random() < two_person_p:  # a second, idle person next to the actor
        idle = animate(IDLE, T, rng, rng.uniform(0.85, 1.15))
        bodies.append(idle + np.array([rng.choice([-1, 1]) * rng.uniform(0.7, 1.1), 0, rng.uniform(-0.3, 0.3)]))
    x = np.stack(bodies)  # (M, T, 25, 3)
    x[..., 1] += 1.0 * size  # hip height above the floor (y = 0 at the feet)
    yaw = rng.uniform(-np.pi / 4, np.pi / 4)
    c, s = np.cos(yaw), np.sin(yaw)
    R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    x = x @ R.T
    x += np.array([rng.uniform(-0.4, 0.4), rng.uniform(-1.0, -0.7), rng.uniform(2.6, 3.6)])  # camera placement
    x += rng.normal(0, noise, size=x.shape)
    return x.astype(np.float32)


def lt_counts(n_max, imb_factor, num_classes):
    """n_c = floor(n_max * (1/IF)^(c/(C-1))) (spec §2.3)."""
    return [int(np.floor(n_max * (1.0 / imb_factor) ** (c / max(num_classes - 1, 1)))) for c in range(num_classes)]


def build_dataset(*, num_classes=NUM_CLASSES, n_max=200, imb_factor=100, val_per_class=10, test_per_class=30, seed=0):
    """(pyskl_dict, counts): train pool = LT count + `val_per_class` extra clips per class (the
    extras are the held-out validation pool), balanced test split `synth_val`."""
    if not 2 <= num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes must be in [2, {NUM_CLASSES}], got {num_classes}")
    rng = np.random.default_rng(seed)
    counts = lt_counts(n_max, imb_factor, num_classes)
    annotations, train, test = [], [], []

    def add(name, label):
        kp = make_clip(label, rng)
        annotations.append({"frame_dir": name, "label": int(label), "keypoint": kp.astype(np.float16),
                            "total_frames": int(kp.shape[1])})

    for c in range(num_classes):
        for i in range(counts[c] + val_per_class):
            name = f"S001C001P{i:04d}R001A{c + 1:03d}"
            add(name, c)
            train.append(name)
        for i in range(test_per_class):
            name = f"S002C001P{i:04d}R001A{c + 1:03d}"
            add(name, c)
            test.append(name)
    data = {"split": {"synth_train": train, "synth_val": test}, "annotations": annotations}
    return data, counts
