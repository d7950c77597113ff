"""The experiments behind the book: the paper's tables and figures, the method comparison, the diagnosis.

    dfmpc experiments [NAME ...] [--quick | --full | --book] [--images N|all] [--out DIR] [--device cuda]

Each experiment is one module of this package with ``NAME``, ``TITLE``, ``SETTINGS`` (one dict per preset),
``PAPER`` (the paper's own numbers, or None), ``run(session, settings) -> dict`` and optionally
``BOOK_PRESET`` (the preset of the result the book shows; default "quick"); :data:`EXPERIMENTS` lists them.
Adding one means adding its module and its name below (see CONTRIBUTING.md).

Presets:

* ``quick``: the offline copies (``$DFMPC_SHARED``: CIFAR-10 test set as JPEG, 1,300 ImageNet validation
  images), fixed random image subsets, coarse grids; minutes on a CPU. CI runs it.
* ``full``: all images, fine grids, the real data sets where they can be had (a download, or
  ``--data-dir DATASET=DIR``), falling back to the offline copies (recorded in the JSON); for a GPU.

The book shows the results committed in ``book/data/`` (:func:`load_result`), each produced with the preset
of :data:`BOOK_PRESETS`; ``dfmpc experiments --book`` regenerates all of them. The offline data support
relative comparisons only: JPEG costs the CIFAR-10 models about ten points, and the ImageNet subset is
easier than the full validation set.
"""
from . import (
               adoption,
               authors_data_free,
               baselines,
               compare,
               coverage,
               deviations,
               diagnosis,
               engine,
               fig3,
               fig4,
               fig5,
               pair_roles,
               speed,
               synthetic_means,
               table1,
               table2,
               table34,
               timing,
               wa,
               zeroq_authors,
)
from .book import book_data_dir, data_label, describe, load_result, md_table
from .runner import SCHEMA, run_experiment, run_experiments, settings_for
from .session import PRESETS, Session

__all__ = ["EXPERIMENTS", "GROUPS", "BOOK_PRESETS", "BOOK_OVERRIDES", "PRESETS", "SCHEMA", "Session", "run_experiment",
           "run_experiments", "settings_for", "load_result", "book_data_dir", "describe", "data_label", "md_table"]

EXPERIMENTS = {m.NAME: m for m in (table1, table2, table34, fig3, fig4, fig5, timing, diagnosis, compare, baselines,
                                   deviations, coverage, wa, engine, zeroq_authors, authors_data_free, speed,
                                   pair_roles, adoption, synthetic_means)}

#: Experiments that share models and images run in the same process; two processes fill two cores.
#: (An experiment in no group runs in a process of its own.)
GROUPS = (("table1", "fig3", "fig4", "diagnosis", "coverage", "baselines", "deviations"),
          ("compare", "table34", "fig5", "table2", "timing", "speed"))

#: The preset of every result the book shows (``book/data/<name>.json``): the comparison, the baselines' checks
#: and the coverage in full, the paper's experiments in the quick preset (a CPU would need hours for their grids).
BOOK_PRESETS = {name: getattr(module, "BOOK_PRESET", "quick") for name, module in EXPERIMENTS.items()}
#: Settings the book's result changes in its preset (``--book`` applies them before any ``--set``): the diagnosis
#: runs its placement section on the full test set of ResNet-56, the rest of it in the quick preset.
BOOK_OVERRIDES = {name: dict(getattr(module, "BOOK_OVERRIDES", {})) for name, module in EXPERIMENTS.items()}
