"""The version policy: which version of a model should serve, and the next step towards it.

A pure function over a snapshot of one model's version records, like TensorFlow Serving's
AspiredVersionsManager policy: the manager asks for the next step, applies it, and asks again until
there is none. The policy is availability-preserving:
- the version that should serve is the pinned one, else the newest on disk that has not failed;
- it is loaded, warmed and checked fully before it serves (LOAD, then SERVE); only then is the
  version it replaces released (UNLOAD), unless an admin call loaded that one to stay;
- a version that fails to load never serves, and what serves keeps serving; a pinned version that is
  missing or failed changes nothing either; a serving version removed from disk serves until another
  version can take over;
- a failed version is tried again only once its files change (RETRY); a version the scan found
  incomplete fails without a load (FAIL).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from server.versions import LOADED_STATES, ModelRecords, ModelState


class Action(enum.Enum):
    RETRY = "retry"  # a failed version whose files changed: forget the failure
    FAIL = "fail"  # a version the scan found incomplete: never load it
    LOAD = "load"  # load, warm and check the version that should serve
    SERVE = "serve"  # switch serving to that version, now loaded
    UNLOAD = "unload"  # drain and release a loaded version that neither serves nor was loaded to stay


@dataclass(frozen=True)
class Step:
    action: Action
    version: int
    reason: str = ""  # for FAIL: the reason the version keeps


@dataclass(frozen=True)
class VersionView:
    """What the policy reads of one version record."""

    version: int
    state: ModelState = ModelState.UNLOADED
    on_disk: bool = True
    incomplete: str | None = None  # why the last scan found the version incomplete; None = complete
    files_changed: bool = False  # its files differ from those it was last tried with
    kept: bool = False  # loaded by an admin call: stays loaded when it stops serving


@dataclass(frozen=True)
class ModelView:
    """A snapshot of one model's versions: all the policy decides on."""

    versions: tuple[VersionView, ...] = ()
    serving: int = 0  # 0 = none serves
    pinned: int = 0  # 0 = follow the newest

    @staticmethod
    def of(records: ModelRecords) -> ModelView:
        return ModelView(
            versions=tuple(
                VersionView(version=v, state=r.state, on_disk=r.on_disk, incomplete=r.incomplete,
                            files_changed=r.files != r.signature, kept=r.keep_loaded)
                for v, r in sorted(records.versions.items())),
            serving=records.serving.version if records.serving is not None else 0,
            pinned=records.pinned,
        )


def aspired_version(model: ModelView) -> int:
    """The version that should serve: the pinned one, else the newest on disk that has not failed
    (0 = none)."""
    if model.pinned:
        return model.pinned
    return max((v.version for v in model.versions if v.on_disk and v.state is not ModelState.FAILED), default=0)


def next_step(model: ModelView) -> Step | None:
    """The next step towards the aspired version; None when there is nothing to do."""
    for v in model.versions:
        if v.on_disk and v.state is ModelState.FAILED and v.files_changed:
            return Step(Action.RETRY, v.version)
    for v in model.versions:
        if v.on_disk and v.state is ModelState.UNLOADED and v.incomplete is not None:
            return Step(Action.FAIL, v.version, f"incomplete: {v.incomplete}")
    target = aspired_version(model)
    wanted = next((v for v in model.versions if v.version == target), None)
    if target != model.serving and wanted is not None and wanted.state is not ModelState.FAILED:
        return Step(Action.SERVE if wanted.state in LOADED_STATES else Action.LOAD, target)
    if model.serving:  # released only while another version serves
        for v in model.versions:
            if v.state in LOADED_STATES and v.version != model.serving and not v.kept:
                return Step(Action.UNLOAD, v.version)
    return None
