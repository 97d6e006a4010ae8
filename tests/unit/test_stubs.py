"""The committed stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "client" / "tensorgate"


def _generated(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*_pb2*.py*")}


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = _generated(tmp_path / "tensorgate")
    assert fresh, "the generator wrote nothing"
    assert fresh == _generated(COMMITTED), "stubs were added or removed: run `make proto` and commit"
    different = [
        name
        for name in sorted(fresh)
        if not filecmp.cmp(tmp_path / "tensorgate" / name, COMMITTED / name, shallow=False)
    ]
    assert not different, f"stale stubs (run `make proto` and commit): {different}"
