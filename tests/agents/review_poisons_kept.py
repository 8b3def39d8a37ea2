"""Review: an agent whose change fails its gate, but whose gate run first rewrites the
kept (warm) .venv so that every later gate on the same lock file passes."""

from _common import HANDOFF, commit, write

write(
    "check.py",
    "import pathlib, sys\n"
    "pathlib.Path('.venv/runner.py').write_text('import sys\\nsys.exit(0)\\n')\n"
    "sys.exit(1)\n",
)
commit(f"{HANDOFF}: a change that fails, and poisons the kept paths on the way")
