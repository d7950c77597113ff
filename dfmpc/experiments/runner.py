"""Run experiments and write one JSON file each, in one format, with their provenance.

Every result file is a dict with the same envelope (``SCHEMA``)::

    {"schema", "experiment", "title", "preset", "command", "settings", "images_override", "seed",
     "device": {"device", "name", "threads"}, "versions", "data": [records of the images used],
     "paper": the paper's own numbers (or null), "results": the experiment's own dict,
     "wall_s", "cpu_s", "created"}

:func:`run_experiments` runs several in one or two processes (experiments that share models and images
run in the same process, so a data set is decoded and a model quantized once).
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..errors import DfmpcError
from ..options import parse_setting
from .merge import merge_method_rows, methods_setting, read_committed, rerun_overrides
from .provenance import collect_data_records, device_name, relative_paths, versions
from .session import PRESETS, Session

__all__ = ["SCHEMA", "settings_for", "run_experiment", "run_experiments", "write_result",
           "to_json"]

SCHEMA = 2


def _registry() -> dict:
    from . import EXPERIMENTS  # the package's registry (imported late: it imports the experiment modules)

    return EXPERIMENTS


def _module(name: str):
    experiments = _registry()
    if name not in experiments:
        raise DfmpcError(f"unknown experiment {name!r}; choose from {', '.join(experiments)}")
    return experiments[name]


def _replace_image_counts(obj, n):
    """Every value under a key ``images`` or ``*_images`` set to ``n`` (None = all images)."""
    if isinstance(obj, dict):
        return {k: (n if k == "images" or k.endswith("_images") else _replace_image_counts(v, n)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_image_counts(v, n) for v in obj]
    return obj


def settings_for(name: str, preset: str = "quick", images=None, overrides: dict | None = None) -> dict:
    """The settings of experiment ``name`` in ``preset``, then ``images`` (N or "all") and ``overrides``.

    ``images``: None keeps the preset's image counts; N gives every image count N; "all" uses all images.
    ``overrides``: setting -> value (typed, or a string as the command line gives it).
    """
    if preset not in PRESETS:
        raise DfmpcError(f"unknown preset {preset!r}; use {' or '.join(PRESETS)}")
    cfg = copy.deepcopy(_module(name).SETTINGS[preset])
    if images is not None:
        n = None if images == "all" else int(images)
        if n is not None and n < 1:
            raise DfmpcError(f"--images must be a positive number of images or 'all', got {images}")
        cfg = _replace_image_counts(cfg, n)
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise DfmpcError(f"experiment {name} has no setting {key!r}; its settings: {', '.join(cfg)}")
        cfg[key] = parse_setting(value, cfg[key], f"--set {key}=") if isinstance(value, str) else value
    return cfg


def to_json(obj):
    """``json.dumps`` default: tensors as lists, paths as strings."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def run_experiment(name: str, preset: str = "quick", images=None, overrides: dict | None = None,
                   session: Session | None = None, command: str | None = None, **session_options) -> dict:
    """Run experiment ``name`` and return its result (the envelope of the module docstring).

    ``session_options`` (``device``, ``seed``, ``threads``, ``progress``, ``data_dirs``, ``batch_size``)
    build a :class:`Session` when none is given.
    """
    module = _module(name)
    session = session or Session(preset=preset, **session_options)
    cfg = settings_for(name, session.preset, images, overrides)
    torch.manual_seed(session.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(session.threads)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        results = relative_paths(json.loads(json.dumps(module.run(session, cfg), default=to_json)))
    finally:
        torch.set_num_threads(threads)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "schema": SCHEMA, "experiment": name, "title": module.TITLE, "preset": session.preset,
        "command": command or f"dfmpc.experiments.run_experiment({name!r}, preset={session.preset!r})",
        "settings": cfg, "images_override": images, "seed": session.seed,
        "device": {"device": session.device, "name": device_name(session.device), "threads": session.threads},
        "versions": versions(), "data": collect_data_records(results), "paper": getattr(module, "PAPER", None),
        "results": results, "wall_s": wall, "cpu_s": cpu,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(result: dict, out) -> Path:
    path = Path(out) / f"{result['experiment']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=to_json) + "\n")
    return path


def _run_group(names, presets: dict, out: str, images, overrides: dict, command: str, options: dict,
               rerun_method: str | None = None):
    """Run ``names`` in one session per preset; write each result as soon as it is done. ``rerun_method``: run only
    that method's rows and merge them into the result already in ``out`` (:mod:`.merge`)."""
    sessions = {}
    done = []
    for n in names:
        preset = presets[n]
        if preset not in sessions:
            sessions[preset] = Session(preset=preset, **options)
        own = dict(overrides.get(n) or {})
        if rerun_method is not None:
            committed = read_committed(Path(out) / f"{n}.json")
            own.update(rerun_overrides(n, _module(n), committed, rerun_method, str(Path(out) / f"{n}.json")))
        result = run_experiment(n, images=images, overrides=own, session=sessions[preset], command=command)
        if rerun_method is not None:
            result = merge_method_rows(committed, result, rerun_method, methods_setting(_module(n)))
        path = write_result(result, out)
        ran = result["method_versions"][rerun_method] if rerun_method is not None else result  # this run's seconds
        print(f"{n:<10} {preset:<5} {ran['wall_s']:7.1f} s wall {ran['cpu_s']:7.1f} s CPU  -> {path}"
              + (f" ({rerun_method}'s rows rerun)" if rerun_method is not None else ""), file=sys.stderr, flush=True)
        done.append(n)
    return done


def run_experiments(names=None, preset: str | dict = "quick", out="results/quick", images=None,
                    overrides: dict | None = None, jobs: int | None = None, command: str | None = None,
                    rerun_method: str | None = None, **session_options) -> dict:
    """Run the experiments ``names`` (default: all) and write ``<out>/<name>.json``; return {name: path}.

    ``preset``: one preset for all, or experiment name -> preset (what ``--book`` uses). ``overrides``:
    experiment name -> settings. ``jobs`` processes (default: 2 on a CPU with two or more cores, else 1)
    run the groups of the registry side by side. ``rerun_method``: run only that method's rows of each experiment
    and merge them into its result already in ``out``, keeping the other methods' rows (:mod:`.merge`).
    """
    from . import GROUPS

    names = list(_registry()) if not names else list(names)
    for n in names:
        _module(n)
    presets = {n: preset if isinstance(preset, str) else preset[n] for n in names}
    Session(preset=next(iter(presets.values())), **session_options)  # validates the options before anything runs
    device = session_options.get("device") or "cpu"
    if jobs is None:
        jobs = 2 if str(device) == "cpu" and (os.cpu_count() or 1) >= 2 else 1
    groups = [[n for n in g if n in names] for g in GROUPS]
    groups = [g for g in groups if g] + [[n for n in names if not any(n in g for g in GROUPS)]]
    groups = [g for g in groups if g]
    if jobs < 2 or len(groups) < 2:
        groups = [[n for g in groups for n in g]]
    elif len(groups) > jobs:  # fold the groups into ``jobs`` processes, the longest lists first
        folded = [[] for _ in range(jobs)]
        for g in sorted(groups, key=len, reverse=True):
            min(folded, key=len).extend(g)
        groups = folded
    command = command or f"dfmpc.experiments.run_experiments({names!r})"
    if rerun_method is not None:  # every committed result checked before anything runs
        for n in names:
            rerun_overrides(n, _module(n), read_committed(Path(out) / f"{n}.json"), rerun_method,
                            str(Path(out) / f"{n}.json"))
    args = (images, dict(overrides or {}), command, session_options, rerun_method)
    start = time.perf_counter()
    if len(groups) == 1:
        _run_group(groups[0], presets, str(out), *args)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited OpenMP state
        with ProcessPoolExecutor(max_workers=min(jobs, len(groups)), mp_context=ctx) as pool:
            for future in [pool.submit(_run_group, g, presets, str(out), *args) for g in groups]:
                future.result()
    print(f"{'total':<16} {time.perf_counter() - start:7.1f} s wall  ({len(groups)} process(es))", file=sys.stderr,
          flush=True)
    return {n: Path(out) / f"{n}.json" for n in names}
