"""The layer contract of docs/architecture.md holds: import-linter's contracts pass on this tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_pass():
    script = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [str(script), "--no-logo", "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in (
        "processing <- models <- inference <- apps <- entry points KEPT",
        "data does not import models or anything above them KEPT",
        "no import cycles between the modules of any package KEPT",
        "pallava.files (JSON/JSONL helpers) imports nothing else from pallava KEPT",
    ):
        assert contract in result.stdout
