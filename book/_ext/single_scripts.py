"""Sphinx extension: each page includes each script once.

Under Jupyter Book 1.x, sphinx-thebe and sphinx-togglebutton register their inline scripts twice (their
``env-before-read-docs`` handlers run once per read pass), so every page declared ``const THEBE_JS_URL``
twice and the browser logged "Identifier 'THEBE_JS_URL' has already been declared" on every page. The
browser check (.ci/check_book_html.py) fails a page on any console error; this keeps the first of
identical scripts (same file or body and attributes, whatever their priority).
"""

from __future__ import annotations


def _drop_repeated_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if scripts:
        kept, seen = [], set()
        for script in scripts:
            # the same file or inline body (None and "" both mean inline) and attributes, whatever the priority
            key = (getattr(script, "filename", script) or "", tuple(sorted(getattr(script, "attributes", {}).items())))
            if key not in seen:
                seen.add(key)
                kept.append(script)
        scripts[:] = kept  # in place: the builder's own list, which later pages start from


def setup(app):
    # first of all handlers: html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", _drop_repeated_scripts, priority=1)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
