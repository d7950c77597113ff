"""Sphinx extension: a pybtex style "authoryear" whose bibliography labels match the book's
author-year citations ("Chen et al., 2023" instead of "[3]").

Loaded through ``sphinx: local_extensions`` in _config.yml and selected with
``bibtex_default_style: authoryear``. Entries are sorted by author, year and title (as BibTeX's plain).
"""

from __future__ import annotations

from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle


def _last_name(person) -> str:
    return " ".join(person.prelast_names + person.last_names).replace("{", "").replace("}", "")


class AuthorYearLabelStyle(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        labels = []
        for entry in sorted_entries:
            persons = entry.persons.get("author") or entry.persons.get("editor") or []
            if not persons:
                names = entry.fields.get("key", entry.key)
            elif len(persons) == 1:
                names = _last_name(persons[0])
            elif len(persons) == 2:
                names = f"{_last_name(persons[0])} and {_last_name(persons[1])}"
            else:
                names = f"{_last_name(persons[0])} et al."
            labels.append(f"{names}, {entry.fields.get('year', 'n.d.')}")
        # "Nagel et al., 2019a" / "2019b" when two entries would get the same label
        counts, seen = Counter(labels), Counter()
        for label in labels:
            if counts[label] > 1:
                seen[label] += 1
                yield label + "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
            else:
                yield label


class AuthorYearStyle(PlainStyle):
    default_label_style = AuthorYearLabelStyle


def setup(app):
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
