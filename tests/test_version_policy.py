"""The version policy on snapshots of version records: which version should serve, and the steps
towards it, in the availability-preserving order (load fully, switch, then unload the old)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from server.version_policy import Action, ModelView, Step, VersionView, aspired_version, next_step
from server.versions import ModelRecords, ModelState, VersionRecord

SERVING, READY = ModelState.SERVING, ModelState.READY
UNLOADED, FAILED, DRAINING = ModelState.UNLOADED, ModelState.FAILED, ModelState.DRAINING


def model(*versions: VersionView, pinned: int = 0) -> ModelView:
    serving = next((v.version for v in versions if v.state is SERVING), 0)
    return ModelView(versions=tuple(sorted(versions, key=lambda v: v.version)), serving=serving, pinned=pinned)


def play(view: ModelView, failing: frozenset[int] = frozenset()) -> tuple[list[tuple[Action, int]], ModelView]:
    """Applies the policy's steps as the manager does (a load of a version in `failing` fails) until
    there are none; returns the steps and the final snapshot."""
    steps: list[tuple[Action, int]] = []
    for _ in range(20):
        step = next_step(view)
        if step is None:
            return steps, view
        steps.append((step.action, step.version))
        view = _apply(view, step, failing)
    raise AssertionError(f"the policy did not settle: {steps}")


def _apply(view: ModelView, step: Step, failing: frozenset[int]) -> ModelView:
    def state(v: VersionView) -> VersionView:
        if v.version == step.version:
            new = {Action.RETRY: UNLOADED, Action.FAIL: FAILED, Action.SERVE: SERVING, Action.UNLOAD: DRAINING,
                   Action.LOAD: FAILED if v.version in failing else READY}[step.action]
            return replace(v, state=new, files_changed=False)
        if step.action is Action.SERVE and v.state is SERVING:
            return replace(v, state=READY)  # the version it replaced stays loaded until unloaded
        return v

    versions = tuple(state(v) for v in view.versions)
    serving = step.version if step.action is Action.SERVE else view.serving
    return replace(view, versions=versions, serving=serving)


def test_first_load_loads_then_serves_the_newest_complete_version() -> None:
    view = model(VersionView(1), VersionView(2))
    assert aspired_version(view) == 2
    steps, end = play(view)
    assert steps == [(Action.LOAD, 2), (Action.SERVE, 2)]
    assert end.serving == 2


def test_a_newer_version_is_loaded_fully_before_it_serves_and_the_old_one_goes_after() -> None:
    steps, end = play(model(VersionView(1, SERVING), VersionView(2)))
    assert steps == [(Action.LOAD, 2), (Action.SERVE, 2), (Action.UNLOAD, 1)]
    assert [v.state for v in end.versions] == [DRAINING, SERVING]
    # A version an admin call loaded stays loaded when it stops serving.
    steps, end = play(model(VersionView(1, SERVING, kept=True), VersionView(2)))
    assert steps == [(Action.LOAD, 2), (Action.SERVE, 2)]
    assert [v.state for v in end.versions] == [READY, SERVING]


def test_a_newer_version_that_fails_leaves_the_old_one_serving() -> None:
    steps, end = play(model(VersionView(1, SERVING), VersionView(2)), failing=frozenset({2}))
    assert steps == [(Action.LOAD, 2)]
    assert end.serving == 1 and [v.state for v in end.versions] == [SERVING, FAILED]
    assert next_step(end) is None  # not tried again while its files stay the same
    # On a first load, the next newest is tried at once.
    steps, end = play(model(VersionView(1), VersionView(2)), failing=frozenset({2}))
    assert steps == [(Action.LOAD, 2), (Action.LOAD, 1), (Action.SERVE, 1)]


def test_an_older_version_removed_from_disk_changes_nothing() -> None:
    view = model(VersionView(1, UNLOADED, on_disk=False), VersionView(2, SERVING))
    assert next_step(view) is None
    steps, _ = play(replace(view, versions=(*view.versions, VersionView(3))))
    assert steps == [(Action.LOAD, 3), (Action.SERVE, 3), (Action.UNLOAD, 2)]


def test_a_serving_version_removed_from_disk_serves_until_another_takes_over() -> None:
    assert next_step(model(VersionView(2, SERVING, on_disk=False))) is None  # nothing else: keep serving
    assert next_step(model(VersionView(1, FAILED), VersionView(2, SERVING, on_disk=False))) is None
    steps, end = play(model(VersionView(1), VersionView(2, SERVING, on_disk=False)))
    assert steps == [(Action.LOAD, 1), (Action.SERVE, 1), (Action.UNLOAD, 2)]
    assert end.serving == 1


def test_a_failed_version_whose_files_changed_is_retried() -> None:
    view = model(VersionView(1, SERVING), VersionView(2, FAILED, files_changed=True))
    assert next_step(view) == Step(Action.RETRY, 2)
    steps, end = play(view)
    assert steps == [(Action.RETRY, 2), (Action.LOAD, 2), (Action.SERVE, 2), (Action.UNLOAD, 1)]
    assert end.serving == 2
    # Unchanged files, or a version no longer on disk: no retry.
    assert next_step(model(VersionView(1, SERVING), VersionView(2, FAILED))) is None
    assert next_step(model(VersionView(1, SERVING), VersionView(2, FAILED, on_disk=False, files_changed=True))) is None


def test_an_incomplete_version_fails_without_a_load_and_is_retried_when_its_files_change() -> None:
    view = model(VersionView(1, SERVING), VersionView(2, incomplete="no manifest.json"))
    assert next_step(view) == Step(Action.FAIL, 2, "incomplete: no manifest.json")
    steps, end = play(view)
    assert steps == [(Action.FAIL, 2)] and end.serving == 1
    # More files arrived but it is still incomplete: retried, and failed again without a load.
    still = replace(end, versions=(end.versions[0], replace(end.versions[1], files_changed=True)))
    assert play(still)[0] == [(Action.RETRY, 2), (Action.FAIL, 2)]
    # Now complete.
    done = replace(end, versions=(end.versions[0], replace(end.versions[1], files_changed=True, incomplete=None)))
    assert play(done)[0] == [(Action.RETRY, 2), (Action.LOAD, 2), (Action.SERVE, 2), (Action.UNLOAD, 1)]


def test_a_pinned_version_serves_instead_of_the_newest_unless_it_cannot() -> None:
    steps, _ = play(model(VersionView(1), VersionView(2, SERVING), pinned=1))
    assert steps == [(Action.LOAD, 1), (Action.SERVE, 1), (Action.UNLOAD, 2)]
    assert next_step(model(VersionView(1, FAILED), VersionView(2, SERVING), pinned=1)) is None
    assert next_step(model(VersionView(2, SERVING), pinned=7)) is None  # missing: keep serving


def test_a_draining_version_that_should_serve_again_is_loaded_again() -> None:
    steps, _ = play(model(VersionView(1, DRAINING), VersionView(2, SERVING), pinned=1))
    assert steps == [(Action.LOAD, 1), (Action.SERVE, 1), (Action.UNLOAD, 2)]


def test_nothing_is_unloaded_while_nothing_serves() -> None:
    assert next_step(model(VersionView(1, READY), VersionView(2, FAILED), pinned=2)) is None


def test_the_snapshot_of_the_managers_records() -> None:
    records = ModelRecords(pinned=3)
    one = records.versions[1] = VersionRecord("m", 1, Path("m/1"), state=SERVING, keep_loaded=True)
    records.versions[2] = VersionRecord("m", 2, Path("m/2"), state=FAILED, signature=(("a", 1, 1),),
                                        files=(("a", 1, 2),), incomplete="no manifest.json", on_disk=False)
    records.serving = one
    view = ModelView.of(records)
    assert view == ModelView(versions=(VersionView(1, SERVING, kept=True),
                                       VersionView(2, FAILED, on_disk=False, incomplete="no manifest.json",
                                                   files_changed=True)),
                             serving=1, pinned=3)
