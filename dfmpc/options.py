"""The ``dfmpc`` command's option values, checked before anything is loaded: one line naming the problem and the fix.

No torch here: a mistake in the arguments is reported at once, and output paths are tried (created and removed)
before any evaluation starts, so that an unwritable ``--save`` does not fail after minutes of work.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .catalog import METHOD_DESCRIPTIONS, MODELS, unknown_model_message
from .errors import DfmpcError
from .paths import DATASETS

__all__ = ["INT_LIMITS", "parse_methods", "parse_floats", "parse_images", "parse_data_dirs", "check_positive", "check_seed",
           "check_model", "check_output_file", "check_output_dir", "parse_setting", "parse_set_flags",
           "write_json"]


def parse_methods(value: str, flag: str = "--method") -> list[str]:
    """One method name, a comma-separated list, or 'all' (every method, in the order of ``dfmpc methods``)."""
    names = list(METHOD_DESCRIPTIONS) if value.strip() == "all" else [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise DfmpcError(f"{flag} names no method; give names from `dfmpc methods`, comma-separated, or 'all'")
    for name in names:
        if name not in METHOD_DESCRIPTIONS:
            raise DfmpcError(f"unknown method {name!r}; choose from {', '.join(METHOD_DESCRIPTIONS)} or 'all' "
                             "(dfmpc methods lists them)")
    return list(dict.fromkeys(names))  # a name given twice runs once


def parse_floats(name: str, value: str) -> list[float]:
    """A comma-separated list of non-negative numbers (a sweep), e.g. "0,0.5"."""
    out = []
    for item in str(value).split(","):
        try:
            x = float(item)
        except ValueError:
            raise DfmpcError(f"--{name} takes numbers separated by commas, got {value!r}") from None
        if not 0 <= x < math.inf:  # also rejects NaN, inf and overflowing literals such as 1e400
            raise DfmpcError(f"--{name} must be a finite non-negative number, got {item.strip()}")
        out.append(x)
    return out


def check_model(name: str) -> None:
    """A model name that ``dfmpc models`` lists; else one line with the closest listed names."""
    if name.strip().lower() not in MODELS:
        raise DfmpcError(unknown_model_message(name))


def parse_images(value: str | None):
    """``--images``: None (not given), "all", or a positive count."""
    if value is None or value.strip().lower() == "all":
        return None if value is None else "all"
    try:
        n = int(value)
    except ValueError:
        raise DfmpcError(f"--images takes a positive number or 'all', got {value!r}") from None
    if not 1 <= n <= INT_LIMITS["--images"]:
        raise DfmpcError(f"--images takes a positive number (at most {INT_LIMITS['--images']:,}) or 'all', got {value!r}")
    return n


def parse_data_dirs(values, default_dataset: str | None = None) -> dict:
    """``--data-dir [DATASET=]DIR`` (repeatable) as {dataset: folder}; a bare DIR needs ``default_dataset``."""
    out = {}
    for item in values or ():
        name, sep, path = item.partition("=")
        if not sep:
            if default_dataset is None:
                raise DfmpcError(f"--data-dir {item!r} does not say which data set; write DATASET=DIR, "
                                 f"e.g. cifar10={item}")
            name, path = default_dataset, item
        name = name.strip().lower()
        if name not in DATASETS:
            raise DfmpcError(f"--data-dir names unknown data set {name!r}; use one of {', '.join(DATASETS)}")
        if not Path(path).expanduser().is_dir():
            raise DfmpcError(f"--data-dir {path!r} is not a folder; pass the folder that holds the {name} images")
        out[name] = path
    return out


#: the largest value each integer flag takes: beyond these a run would exhaust the machine or overflow a seed
INT_LIMITS = {"--batch-size": 65_536, "--threads": 1024, "--jobs": 64, "--repeat": 10_000, "--images": 10**9,
              "--seed": 2**32 - 1}


def check_positive(flag: str, value, unset_ok: bool = True) -> None:
    """``value`` is None (where allowed) or an integer from 1 to the flag's limit (:data:`INT_LIMITS`)."""
    if value is None and unset_ok:
        return
    if value is None or value < 1:
        raise DfmpcError(f"{flag} must be at least 1, got {value}")
    limit = INT_LIMITS.get(flag)
    if limit is not None and value > limit:
        raise DfmpcError(f"{flag} must be at most {limit:,}, got {value}")


def check_seed(value) -> None:
    """``--seed``: an integer from 0 to 2^32 - 1 (what every random generator it seeds accepts)."""
    if not 0 <= value <= INT_LIMITS["--seed"]:
        raise DfmpcError(f"--seed must be from 0 to {INT_LIMITS['--seed']:,}, got {value}")


def _unwritable(flag: str, path, error: OSError) -> DfmpcError:
    return DfmpcError(f"{flag} {str(path)!r} cannot be written ({error.strerror or type(error).__name__}); "
                      "give a path in a folder you can write to")


def check_output_file(path: str | None, flag: str) -> None:
    """Fail before any work if ``path`` cannot be written: its folders are created and the file is opened for
    appending (which changes nothing in an existing file; a new one is removed again)."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise DfmpcError(f"{flag} {path!r} is a folder; give a file name, e.g. {target / 'result.json'}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = target.exists()
        with open(target, "ab"):
            pass
        if not existed:
            target.unlink()
    except OSError as e:
        raise _unwritable(flag, path, e) from None


def check_output_dir(path: str | os.PathLike | None, flag: str) -> None:
    """Fail before any work if no file can be written into folder ``path`` (created if missing)."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise DfmpcError(f"{flag} {str(path)!r} is a file, not a folder; give a folder for the results")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        raise _unwritable(flag, path, e) from None


def parse_setting(text: str, example, flag: str):
    """``text`` (as a command line gives it) converted to the type of ``example``, the setting's default: true/false
    for a boolean, a finite number for a number (or for a default of None; "none" or "all" give None), a
    comma-separated list for a list or tuple (of the type of its first item), else the text. ``flag`` names the
    setting in the message, e.g. ``--set restarts=``."""
    if isinstance(example, (list, tuple)):
        item = example[0] if example else ""
        return type(example)(parse_setting(t.strip(), item, flag) for t in text.split(",") if t.strip())
    if isinstance(example, bool):
        if text.lower() not in ("true", "false"):
            raise DfmpcError(f"{flag} takes true or false, got {text!r}")
        return text.lower() == "true"
    if isinstance(example, (int, float)) or example is None:
        if text.lower() in ("all", "none"):
            return None
        try:
            value = type(example)(text) if example is not None else int(text)
        except ValueError:
            raise DfmpcError(f"{flag} takes a number, got {text!r}") from None
        if not math.isfinite(value):  # float("inf"), float("1e400"), float("nan")
            raise DfmpcError(f"{flag} takes a finite number, got {text!r}")
        return value
    return text


def parse_set_flags(items) -> dict:
    """``--set KEY=VALUE`` (repeatable) as {key: value text}; one line for an item that is not KEY=VALUE."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DfmpcError(f"--set takes KEY=VALUE, e.g. restarts=1; got {item!r}")
        out[key.strip()] = value.strip()
    return out


def write_json(path: str, out: dict, flag: str) -> None:
    """Write ``out`` as JSON to ``path`` (given by ``flag``), creating its folder; one line if it cannot."""
    import json

    try:
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(path).expanduser().write_text(json.dumps(out, indent=2) + "\n")
    except OSError as e:
        raise DfmpcError(f"{flag} {path!r} cannot be written ({e.strerror or type(e).__name__})") from None
