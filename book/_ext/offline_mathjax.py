"""Sphinx extension: the book serves MathJax itself, so every formula renders without network access.

Without it, Sphinx points each page at MathJax on a CDN: offline (and in the browser check, which runs with
the network off) a reader sees raw ``\\(\\lambda_1\\)``. Here, MathJax 3 comes from the npm registry's
tarball (``mathjax`` |version|), checked against its published sha512, unpacked once into
``_build/.mathjax`` and copied into the build's ``_static/mathjax``; ``mathjax_path`` points there.

Where the tarball comes from, first found wins:
  1. ``$DFMPC_MATHJAX_TGZ``: a local copy (e.g. ``npm pack mathjax@3.2.2`` on a machine without internet);
  2. ``_build/.mathjax/mathjax-<version>.tgz``: the copy of an earlier build;
  3. a download from the npm registry (once).
If none works the build warns (a strict build, ``-W``, fails) and the pages fall back to the CDN.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

from sphinx.util import logging

VERSION = "3.2.2"
TARBALL_URL = f"https://registry.npmjs.org/mathjax/-/mathjax-{VERSION}.tgz"
# dist.integrity of mathjax@3.2.2 on the npm registry (`npm view mathjax@3.2.2 dist.integrity`)
SHA512 = "Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
# What the pages need from the package's es5/ folder: the combined TeX+MathML->CommonHTML component,
# its fonts, and what it loads lazily (TeX extensions, the menu and the accessibility tools the menu offers).
# The speech-rule engine (sre/, 4 MB) is left out: it is only loaded when a reader turns speech on.
NEEDED = ("tex-mml-chtml.js", "output/chtml/fonts", "input/tex/extensions", "ui", "a11y", "adaptors")

logger = logging.getLogger(__name__)


def _integrity_ok(tgz: Path) -> bool:
    return base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode() == SHA512


def _tarball(cache: Path) -> Path:
    """A verified copy of the MathJax tarball; raises OSError/ValueError when none can be had."""
    local = os.environ.get("DFMPC_MATHJAX_TGZ")
    if local:
        tgz = Path(local).expanduser()
        if not tgz.is_file() or not _integrity_ok(tgz):
            raise ValueError(f"DFMPC_MATHJAX_TGZ={local} is not the mathjax-{VERSION}.tgz of the npm registry")
        return tgz
    tgz = cache / f"mathjax-{VERSION}.tgz"
    if tgz.is_file() and _integrity_ok(tgz):
        return tgz
    cache.mkdir(parents=True, exist_ok=True)
    partial = tgz.with_suffix(".part")
    with urllib.request.urlopen(TARBALL_URL, timeout=60) as response:
        partial.write_bytes(response.read())
    if not _integrity_ok(partial):
        partial.unlink()
        raise ValueError(f"{TARBALL_URL} does not match its published sha512")
    partial.replace(tgz)
    return tgz


def _unpack(tgz: Path, static: Path) -> None:
    """Copy the NEEDED parts of package/es5/ into ``static``/mathjax (only plain files, no links)."""
    target = static / "mathjax"
    stamp = target / ".version"
    if (target / "tex-mml-chtml.js").is_file() and stamp.is_file() and stamp.read_text() == VERSION:
        return
    shutil.rmtree(target, ignore_errors=True)
    prefix = "package/es5/"
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if not member.isfile() or rel is None or ".." in Path(rel).parts:
                continue
            if not any(rel == part or rel.startswith(part + "/") for part in NEEDED):
                continue
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
    stamp.write_text(VERSION)


def _use_local_mathjax(app, config) -> None:
    cache = Path(app.outdir).parent / ".mathjax"  # _build/.mathjax beside _build/html
    static = cache / "static"
    try:
        _unpack(_tarball(cache), static)
    except (OSError, ValueError, tarfile.TarError) as err:
        logger.warning(f"MathJax {VERSION} could not be fetched ({err}); the pages load it from a CDN instead, "
                       "so formulas render only online. Offline: set DFMPC_MATHJAX_TGZ to `npm pack mathjax@3.2.2`")
        return
    config.html_static_path = [*config.html_static_path, str(static)]
    config.mathjax_path = "mathjax/tex-mml-chtml.js"  # relative to _static


def setup(app):
    app.connect("config-inited", _use_local_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
