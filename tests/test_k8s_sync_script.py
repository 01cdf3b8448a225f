"""The object-store overlay's sidecar: its ConfigMap is deploy/k8s-overlays/object-store/sync.sh,
and the script publishes only complete versions (run against a fake rclone on local folders).
The overlay is rendered by `tests.k8s_render.RENDERER` (kubectl where found, else the in-repo one).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_format.repository import check_version
from tests.helpers import SmallModelFactory
from tests.k8s_helpers import OVERLAYS, one
from tests.k8s_render import render

SYNC_SCRIPT = OVERLAYS / "object-store" / "sync.sh"


# --- the object-store sidecar's sync script ----------------------------------------------------------------

FAKE_RCLONE = '''#!{python}
"""rclone's `lsf --dirs-only` and `sync --checksum` on local folders, for the sync script's test."""
import os, shutil, sys
flags = {{a for a in sys.argv[1:] if a.startswith("--")}}
args = [a for a in sys.argv[1:] if not a.startswith("--")]
if args[0] == "lsf" and flags == {{"--dirs-only"}}:
    for name in sorted(os.listdir(args[1])):
        if os.path.isdir(os.path.join(args[1], name)):
            print(name + "/")
elif args[0] == "sync" and flags == {{"--checksum"}}:
    src, dst = args[1], args[2]
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(dst):
        if not os.path.exists(os.path.join(src, name)):
            os.remove(os.path.join(dst, name))
    for name in os.listdir(src):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
else:
    sys.exit("fake rclone: unsupported " + " ".join(sys.argv[1:]))
'''


@pytest.fixture()
def sync_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rclone = bin_dir / "rclone"
    rclone.write_text(FAKE_RCLONE.format(python=sys.executable))
    rclone.chmod(0o755)
    yield {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MODEL_SOURCE": str(tmp_path / "remote"),
           "MODEL_REPO": str(tmp_path / "local"), "READY_FILE": str(tmp_path / "ready"), "SYNC_ONCE": "1"}


def _run_sync(env: dict[str, str], **extra: str) -> str:
    out = subprocess.run(["sh", str(SYNC_SCRIPT)], env={**env, **extra}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_sync_script_is_the_configmap() -> None:
    config_map = one(render(OVERLAYS / "object-store"), "ConfigMap")
    assert config_map["data"]["sync.sh"] == SYNC_SCRIPT.read_text(encoding="utf-8")
    sidecar = one(render(OVERLAYS / "object-store"), "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar, started before the server"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert sidecar["startupProbe"]["exec"]["command"] == ["test", "-f", env["READY_FILE"]]
    assert env["MODEL_REPO"] == "/models"


def test_sync_script_publishes_only_complete_versions(sync_env: dict[str, str],
                                                      small_model_factory: SmallModelFactory) -> None:
    remote, local = Path(sync_env["MODEL_SOURCE"]) / "tiny", Path(sync_env["MODEL_REPO"]) / "tiny"
    for version in (1, 2, 3):
        shutil.copytree(small_model_factory(version=version), remote / str(version))
    (remote / "2" / "manifest.json").unlink()  # still uploading: no manifest yet
    tokenizer = remote / "3" / "tokenizer.json"
    good = tokenizer.read_bytes()
    tokenizer.write_bytes(good[:-1])  # one file short of what the manifest says
    (remote / ".staging-upload").mkdir()  # not a version

    log = _run_sync(sync_env)
    assert Path(sync_env["READY_FILE"]).exists()
    assert "published tiny/1" in log
    assert sorted(p.name for p in local.iterdir()) == [".staging-sync-2", ".staging-sync-3", "1"]
    assert check_version(local / "1", "tiny", 1).complete

    tokenizer.write_bytes(good)  # the upload finished
    log = _run_sync(sync_env, KEEP_VERSIONS="1")
    assert "published tiny/3" in log and "removed tiny/1" in log
    assert sorted(p.name for p in local.iterdir()) == ["3"]  # 2 is out of the window: its staging goes too
    status = check_version(local / "3", "tiny", 3)
    assert status.complete, status.error
    assert (hashlib.sha256((local / "3" / "tokenizer.json").read_bytes()).hexdigest()
            == hashlib.sha256(good).hexdigest())

    shutil.rmtree(remote / "3")  # a bad release withdrawn from the bucket: pods fall back to 1
    log = _run_sync(sync_env, KEEP_VERSIONS="2")
    assert "removed tiny/3" in log and "published tiny/1" in log
    assert sorted(p.name for p in local.iterdir()) == [".staging-sync-2", "1"]
    assert check_version(local / "1", "tiny", 1).complete
    log = _run_sync(sync_env, KEEP_VERSIONS="2")  # steady state: nothing copied, nothing removed
    assert "published" not in log and "removed" not in log
