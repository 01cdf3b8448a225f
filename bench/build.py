"""Step 1: how long `python -m tools.build_model --demo --precision int8` takes, and what it writes."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.kit.data import REPO_ROOT


def time_build(reference: Path | None) -> dict[str, Any]:
    """Builds the demo model into a temporary repository (removed afterwards).

    `reference` is the version folder the other steps measure; the new build's checksums are
    compared with its manifest, since the demo build is seeded and must be reproducible.
    """
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        cmd = [sys.executable, "-m", "tools.build_model", "--demo", "--precision", "int8", "--out", tmp]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"ok": False, "seconds": round(seconds, 2), "error": proc.stderr[-2000:]}
        version_dir = next(Path(tmp, "demo").iterdir())
        manifest = json.loads((version_dir / "manifest.json").read_text())
        sizes = {name: (version_dir / name).stat().st_size for name in ("model.onnx", "model.int8.onnx")
                 if (version_dir / name).exists()}
        same: bool | None = None
        if reference is not None and (reference / "manifest.json").exists():
            ref = json.loads((reference / "manifest.json").read_text())
            same = ref.get("sha256") == manifest.get("sha256")
        return {
            "ok": True,
            "command": "python -m tools.build_model --demo --precision int8 --out <tmp>",
            "seconds": round(seconds, 2),
            "file_bytes": sizes,
            "file_mib": {k: round(v / 2**20, 1) for k, v in sizes.items()},
            "int8_size_ratio": round(sizes["model.int8.onnx"] / sizes["model.onnx"], 3)
            if len(sizes) == 2 else None,
            "identical_to_measured_model": same,
        }
