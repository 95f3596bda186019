"""argparse + `--config file.{yaml,json}` + later CLI overrides, with the resolved config dumped.

Precedence: parser defaults < config file < flags given on the command line. Config keys are the
flag names with dashes or underscores (`batch-size` or `batch_size`); an unknown key or a value of
the wrong type is an error that names the key.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import yaml


class InputError(ValueError):
    """Something the user gave (a flag, a file, a list line, a checkpoint) is wrong. `run_main`
    prints it as one line naming what and where, without a traceback (unless --debug)."""


def add_common_args(parser, **defaults):
    """The flags every script shares (design.md). `defaults` override by dest name."""
    d = dict(data_root="data", output_dir="runs/out", epochs=1, batch_size=32, lr=0.01, seed=0,
             resume="", device="auto", workers=4, weights="")
    unknown = set(defaults) - set(d)
    if unknown:
        raise TypeError(f"add_common_args: unknown default(s) {sorted(unknown)}; expected some of {sorted(d)}")
    d.update(defaults)
    g = parser.add_argument_group("common")
    g.add_argument("--data-root", default=d["data_root"], help="dataset root directory")
    g.add_argument("--output-dir", default=d["output_dir"], help="where config, logs, checkpoints and results go")
    g.add_argument("--epochs", type=int, default=d["epochs"])
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process")
    g.add_argument("--lr", type=float, default=d["lr"])
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--resume", default=d["resume"], help="checkpoint path, or 'auto' = <output-dir>/checkpoint.pth")
    g.add_argument("--eval-only", action="store_true", help="evaluate the given/resumed checkpoint and exit")
    g.add_argument("--device", default=d["device"], help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", action="store_true", help="mixed precision (bf16 autocast) on GPU")
    g.add_argument("--workers", type=int, default=d["workers"], help="DataLoader workers per process")
    g.add_argument("--synthetic", action="store_true", help="use the offline synthetic data instead of --data-root")
    g.add_argument("--weights", default=d["weights"], help="local pretrained weights file (never downloaded)")
    g.add_argument("--strict", action="store_true", help="a missing/corrupt media file is an error, not a skip")
    g.add_argument("--from-scratch", action="store_true",
                   help="allow a real-data run without --weights (random init; not comparable to the papers)")
    g.add_argument("--allow-partial-weights", action="store_true",
                   help="load --weights even when backbone keys are missing/unexpected (listed in the log)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="DANGEROUS: load checkpoints/weights with the full unpickler, which can run code from the "
                        "file; only for files you made yourself")
    g.add_argument("--debug", action="store_true", help="show the full traceback for input errors")
    return g


def require_weights(args, what="the backbone"):
    """A real-data run (not --synthetic) needs --weights unless --from-scratch says otherwise."""
    if getattr(args, "weights", "") or getattr(args, "synthetic", False) or getattr(args, "from_scratch", False):
        return
    raise InputError(f"no --weights given: {what} would train from random init on real data; pass "
                     f"--weights PATH (a local file), or --from-scratch to do this on purpose")


def validate_common(args):
    """Range and path checks of the common flags, before any work starts."""
    checks = [("epochs", 0, "an integer >= 0"), ("batch_size", 1, "an integer >= 1"),
              ("workers", 0, "an integer >= 0")]
    for dest, lo, expected in checks:
        v = getattr(args, dest, None)
        if v is not None and v < lo:
            raise InputError(f"--{dest.replace('_', '-')} {v}: expected {expected}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2 ** 32:
        raise InputError(f"--seed {seed}: expected an integer in 0..2**32-1")
    lr = getattr(args, "lr", None)
    if lr is not None and not (lr > 0 and lr < float("inf")):
        raise InputError(f"--lr {lr}: expected a finite number > 0")
    out = getattr(args, "output_dir", None)
    if out:
        check_output_dir(out)


def check_output_dir(path):
    """--output-dir must be a directory (or creatable) and writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"--output-dir {p}: exists and is not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"--output-dir {p}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"--output-dir {p}: {probe} is not writable")


def run_main(main, argv=None):
    """Run a script's `main(argv)`; an InputError (CheckpointError, VideoDecodeError, ...) is one
    line on stderr and exit status 2, with the traceback only under --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except InputError as e:
        if "--debug" in argv:
            raise
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        raise SystemExit(2) from None


def _load_file(path):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                         f"{' '.join(str(e).split())}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _convert(action, key, value, path):
    """Check/convert one config value against the argparse action that owns it."""
    def bad(expected):
        return ValueError(f"config {path}: key '{key}' has value {value!r} ({type(value).__name__}), expected {expected}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return [_convert_scalar(action, key, v, bad) for v in value]
    return _convert_scalar(action, key, value, bad)


def _convert_scalar(action, key, value, bad):
    t = action.type
    if value is None:
        return None
    if t is None or t is str:
        if isinstance(value, (dict, list)):
            raise bad("a string")
        value = str(value)
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    else:
        try:
            value = t(value)
        except (TypeError, ValueError) as e:
            raise bad(f"a value accepted by {getattr(t, '__name__', t)} ({e})") from e
    if action.choices is not None and value not in action.choices:
        raise bad(f"one of {list(action.choices)}")
    return value


def _cli_dests(parser, argv):
    """dest names of the flags that appear on the command line (to let them beat the file)."""
    dests = set()
    for tok in argv:
        if not tok.startswith("--"):
            continue
        opt = tok.split("=", 1)[0]
        for action in parser._actions:
            if opt in action.option_strings:
                dests.add(action.dest)
    return dests


def parse_args(parser, argv=None):
    """Parse CLI + optional `--config`; returns the resolved Namespace (with `.config` = the file)."""
    if not any("--config" in a.option_strings for a in parser._actions):
        parser.add_argument("--config", default="", help="YAML/JSON file whose keys are flag names")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.config:
        _apply_config_file(parser, args, argv)
    try:
        validate_common(args)
    except InputError as e:
        fail(parser, str(e))
    from common import checkpoint  # (checkpoint imports this module)
    checkpoint.check_input_files(args)
    return args


def fail(parser, message):
    """One line `prog: error: message` on stderr, exit status 2 (parser.error would also print the
    whole usage, dozens of lines for these scripts)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _apply_config_file(parser, args, argv):
    try:
        data = _load_file(args.config)
    except (OSError, ValueError) as e:
        fail(parser, str(e))
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    on_cli = _cli_dests(parser, argv)
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key == "config":  # a dumped config.yaml records the file it came from
            continue
        if key not in by_dest:
            known = ", ".join(sorted(k.replace("_", "-") for k in by_dest))
            fail(parser, f"config {args.config}: unknown key '{raw_key}' (known keys: {known})")
        try:
            value = _convert(by_dest[key], raw_key, value, args.config)
        except ValueError as e:
            fail(parser, str(e))
        if key not in on_cli:
            setattr(args, key, value)


def config_dict(args):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}


def save_config(args, output_dir):
    """Write the resolved config as `<output_dir>/config.yaml` (atomically) and return its path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_dict(args), sort_keys=True))
    os.replace(tmp, path)
    return path
