"""The code stays as CONTRIBUTING.md describes it: every module has __all__, no private name crosses a module,
no module is over 400 lines, and the library core holds no experiment code."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dfmpc"
MODULES = sorted(PACKAGE.rglob("*.py"))
CORE = [PACKAGE / f"{name}.py" for name in ("quantizers", "compensation", "moments", "graph", "plan", "size", "report",
                                             "api", "numerics", "clipping", "rounding", "placement")]
CORE += sorted((PACKAGE / "methods").glob("*.py"))


def _ids(paths):
    return [str(p.relative_to(PACKAGE)) for p in paths]


@pytest.mark.parametrize("path", MODULES, ids=_ids(MODULES))
def test_module_is_small_and_declares_its_interface(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 400, f"{path.name} has {len(text.splitlines())} lines; split it"
    tree = ast.parse(text)
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    assert "__all__" in names, f"{path.name} has no __all__"


@pytest.mark.parametrize("path", MODULES, ids=_ids(MODULES))
def test_no_private_name_is_imported_from_another_module(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("", "dfmpc") or (
                isinstance(node, ast.ImportFrom) and node.level > 0):
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            assert not private, f"{path.name} imports private {private} from {node.module}"


@pytest.mark.parametrize("path", CORE, ids=_ids(CORE))
def test_the_core_holds_no_experiment_code(path):
    tree = ast.parse(path.read_text())
    imported = {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    banned = {m for m in imported if {"experiments", "data", "evaluate", "models", "cli"} & set(m.split("."))}
    assert not banned, f"{path.relative_to(PACKAGE)} imports {banned}"


def test_every_module_can_be_imported_first():
    """Importing any module of the package first, in a fresh interpreter, works: no import cycle that only an
    unlucky import order reveals (dfmpc.pipeline once imported dfmpc.experiments, whose session imports it back).
    One interpreter imports torch and the other libraries, then forks a child per module."""
    import subprocess
    import sys
    import textwrap

    names = ["dfmpc." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
             for p in MODULES]
    script = textwrap.dedent("""
        import os, sys, importlib
        import torch, torchvision, numpy  # the heavy libraries once, before any fork
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException as e:
                    print(f"{name}: {type(e).__name__}: {e}", flush=True)
                    os._exit(1)
                os._exit(0)
            if os.waitpid(pid, 0)[1] != 0:
                failed.append(name)
        sys.exit(1 if failed else 0)
    """)
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr
