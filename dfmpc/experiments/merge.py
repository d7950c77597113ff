"""Rerun one method's rows of a committed result and keep every other method's: ``--rerun-method METHOD``.

Why: dfmpc+ changes with every design choice the development half adopts, the competitors do not, and rerunning
the comparison, the coverage and the checks of the authors' settings whole costs hours of one CPU for rows that
come out the same. An experiment whose rows are independent per method (each names its ``method``; a row's
numbers depend on nothing but its method, its model, its bits and the images) declares the setting that lists
its methods (``METHODS_SETTING``); :func:`merge_method_rows` then takes that method's rows from a new run restricted
to it, and everything else from the committed result, after checking that they can stand side by side:

* the same experiment, preset, settings (the method list aside), seed, image count and device (threads included);
* everything the new run measured that is not one of the method's rows (the full-precision scores, the images,
  the layout) equal to the committed result's (floats to a relative 1e-6, :func:`_close`): if the full-precision
  predictions moved, the other methods' rows no longer hold, and the experiment must be rerun whole;
* the same rows of the method (model, bits, variant ...) in the same order, in a list that holds other methods'
  rows too; a list of the method's rows alone (the comparison's ablation of dfmpc+) is the rerun's, whatever rows
  it has. The method's description is the rerun's.

Provenance: the envelope (``versions``, ``command``, ``created``, ``wall_s``) stays that of the run that made the
whole file; ``method_versions`` names, for every method whose rows were rerun since, the code (``versions``: commit,
dirty tree, libraries), the command, the date and the seconds of the run its rows come from
(:func:`row_versions` reads the two together).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DfmpcError

__all__ = ["methods_setting", "read_committed", "rerun_overrides", "merge_method_rows", "row_methods", "row_versions"]

#: Fields of a row that say which row it is (besides ``method``); the others are what it measured.
ROW_IDENTITY = ("model", "bits", "variant", "config", "act_bits")
#: Envelope fields that may differ between the committed result and the rerun (when and how long it ran).
_RUN_FIELDS = ("command", "versions", "data", "results", "wall_s", "cpu_s", "created", "method_versions", "settings")


def methods_setting(module) -> str | None:
    """The setting of an experiment module that lists the methods whose rows it measures (``METHODS_SETTING``), or
    None: its rows cannot be rerun one method at a time."""
    return getattr(module, "METHODS_SETTING", None)


def read_committed(path) -> dict | None:
    """The committed result at ``path`` (None where there is none); DfmpcError where it is not a result file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DfmpcError(f"{path} cannot be read as a result ({e.__class__.__name__}); run the experiment whole") from None
    if not isinstance(result, dict) or not {"experiment", "settings", "results", "versions"} <= set(result):
        raise DfmpcError(f"{path} is not a result of dfmpc experiments; run the experiment whole")
    return result


def row_methods(result: dict) -> list[str]:
    """Every method that has rows in ``result``, in order of first appearance."""
    found: dict[str, None] = {}

    def walk(x):
        if _is_rows(x):
            found.update((r["method"], None) for r in x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(result["results"])
    return list(found)


def row_versions(result: dict) -> dict:
    """method -> the ``versions`` (commit, dirty tree, libraries) of the code that measured its rows in ``result``."""
    rerun = result.get("method_versions") or {}
    return {m: (rerun[m]["versions"] if m in rerun else result["versions"]) for m in row_methods(result)}


def rerun_overrides(name: str, module, committed: dict | None, method: str, where: str) -> dict:
    """The settings override that restricts experiment ``name`` to ``method`` (``{METHODS_SETTING: [method]}``),
    after checking that ``committed`` (the result at ``where``) is one to merge ``method``'s rows into."""
    key = methods_setting(module)
    if key is None:
        raise DfmpcError(f"experiment {name} cannot rerun one method's rows (its rows are not one per method); "
                         f"run it whole")
    if committed is None:
        raise DfmpcError(f"--rerun-method needs the committed result {where} to keep the other methods' rows from; "
                         f"run {name} whole first")
    if committed.get("experiment") != name:
        raise DfmpcError(f"{where} is not a result of experiment {name}; run {name} whole")
    if method not in row_methods(committed):
        raise DfmpcError(f"{where} has no rows of method {method!r} (it has {', '.join(row_methods(committed))}); "
                         f"run {name} whole to add a method")
    return {key: [method]}


def merge_method_rows(committed: dict, new: dict, method: str, key: str) -> dict:
    """``committed`` with ``method``'s rows taken from ``new`` (a run of the same experiment restricted to
    ``method`` by its setting ``key``), and ``method_versions`` recording where every method's rows come from.
    DfmpcError, naming the first difference, where the two cannot stand side by side (module docstring)."""
    where = f"the committed {committed.get('experiment')} result"
    for field in set(committed) | set(new):
        if field not in _RUN_FIELDS and committed.get(field) != new.get(field):
            raise DfmpcError(f"{where} was made with {field} {committed.get(field)!r}, this run with "
                             f"{new.get(field)!r}; rerun it with the same, or run it whole")
    old_settings, new_settings = dict(committed["settings"]), dict(new["settings"])
    old_settings.pop(key, None)
    new_settings.pop(key, None)
    for name in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(name) != new_settings.get(name):
            raise DfmpcError(f"{where} was made with {name}={old_settings.get(name)!r}, this run with "
                             f"{new_settings.get(name)!r}; rerun it with the same settings, or run it whole")
    results = _merge(committed["results"], new["results"], method, "results")
    rerun = {"versions": new["versions"], "command": new["command"], "created": new["created"],
             "wall_s": new["wall_s"], "cpu_s": new["cpu_s"]}
    # the settings of the whole file: the rerun's, with the committed method list (recorded from now on by
    # experiments that did not list their methods as a setting when the committed result ran)
    settings = {**new["settings"], key: committed["settings"].get(key, row_methods(committed))}
    return {**committed, "settings": settings, "results": results,
            "method_versions": {**(committed.get("method_versions") or {}), method: rerun}}


def _is_rows(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(r, dict) and "method" in r for r in x)


def _identity(row: dict) -> tuple:
    return tuple((k, row[k]) for k in ROW_IDENTITY if k in row)


def _merge(old, new, method: str, path: str):
    if _is_rows(old) or _is_rows(new):
        return _merge_rows(old, new, method, path)
    if isinstance(old, dict) and isinstance(new, dict):
        if path.endswith(".methods"):  # the methods' descriptions: the rerun's method's, and the others' kept
            if set(new) - {method} or method not in old:
                raise DfmpcError(f"{path}: the rerun describes methods other than {method!r}; run the experiment whole")
            return {m: new[method] if m == method else d for m, d in old.items()}
        missing = set(old) ^ set(new)
        if missing:
            raise DfmpcError(f"{path}: the rerun's layout differs from the committed result's "
                             f"({', '.join(sorted(missing))}); run the experiment whole")
        return {k: _merge(old[k], new[k], method, f"{path}.{k}") for k in old}
    if isinstance(old, list) and isinstance(new, list):
        if path.endswith(".methods"):  # the method list: the rerun's is a subset
            if not set(new) <= set(old):
                raise DfmpcError(f"{path}: the rerun has methods the committed result has not; run it whole")
            return old
        if len(old) != len(new):
            raise DfmpcError(f"{path}: {len(new)} entries in the rerun, {len(old)} in the committed result; "
                             f"run the experiment whole")
        return [_merge(a, b, method, f"{path}[{i}]") for i, (a, b) in enumerate(zip(old, new))]
    if old != new and not _close(old, new):
        raise DfmpcError(f"{path} is {new!r} in the rerun and {old!r} in the committed result: what the other "
                         f"methods' rows rest on changed, so they no longer hold; run the experiment whole")
    return old


def _close(a, b) -> bool:
    """Two floats equal to a relative 1e-6: a mean over thousands of images (the loss) varies in its eighth digit
    between runs of the same code, while one prediction more or less changes an accuracy by 1e-4 or more."""
    return (isinstance(a, float) and isinstance(b, float) and not isinstance(a, bool)
            and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12))


def _merge_rows(old, new, method: str, path: str) -> list:
    old, new = list(old or []), list(new or [])
    if any(r["method"] != method for r in new):
        raise DfmpcError(f"{path}: the rerun measured methods other than {method!r}; run the experiment whole")
    if old and all(r["method"] == method for r in old):  # rows of this method alone (an ablation): all new
        return new
    mine = [_identity(r) for r in old if r["method"] == method]
    if mine != [_identity(r) for r in new]:
        raise DfmpcError(f"{path}: the rerun's rows of {method!r} are not the committed result's (models, bits or "
                         f"variants differ); run the experiment whole")
    fresh = iter(new)
    return [next(fresh) if r["method"] == method else r for r in old]
