#!/usr/bin/env python3
"""Print one of the README's two commands for a fresh machine, exactly as written there.

    python3 .ci/readme_command.py tests    # the fenced block that installs and runs pytest
    python3 .ci/readme_command.py main     # the fenced block that installs and runs the main job

CI runs the README's test command through this, so CI and readers run the same text (the rule is the one
../shared/tools/fresh-clone-check uses: the first fenced bash block holding "pip install" and "pytest").
"""
import re
import sys
from pathlib import Path

blocks = [b.strip() for b in re.findall(r"```(?:bash|sh|console)?\n(.*?)```",
                                        (Path(__file__).resolve().parents[1] / "README.md").read_text(), re.S)]
which = sys.argv[1] if len(sys.argv) > 1 else "tests"
if which == "tests":
    found = [b for b in blocks if "pip install" in b and "pytest" in b]
elif which == "main":
    found = [b for b in blocks if "pip install" in b and "pytest" not in b]
else:
    sys.exit(f"usage: {sys.argv[0]} tests|main")
if not found:
    sys.exit(f"README.md has no fenced {which} command")
print(found[0])
