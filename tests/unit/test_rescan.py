"""Rescan diffing: fingerprints of model directories, the plan, the settle wait, and rescans coalescing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tensorgate.server.repository import Repository, RepositorySettings
from tensorgate.server.repository.rescan import (
    RescanPlan,
    RescanReport,
    fingerprint,
    ignored_name,
    model_directories,
    plan_rescan,
    settle,
)


def _model(root: Path, name: str = "m") -> Path:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.onnx").write_bytes(b"x" * 10)
    (root / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    return root / name


def test_plan_sorts_models_into_load_reload_unload_and_unchanged() -> None:
    same = (("1/model.onnx", 10, 1),)
    plan = plan_rescan(
        {"kept": same, "edited": same, "gone": same, "never_read": None},
        {"kept": same, "edited": (("1/model.onnx", 11, 2),), "new": (), "never_read": same},
    )
    assert plan == RescanPlan(load=["new"], reload=["edited", "never_read"], unload=["gone"], unchanged=["kept"])
    assert plan
    assert not plan_rescan({"kept": same}, {"kept": same})


def test_fingerprint_sees_size_and_mtime_changes(tmp_path: Path) -> None:
    model = _model(tmp_path)
    before = fingerprint(model)
    assert [path for path, _, _ in before] == ["1/model.onnx", "config.pbtxt"]
    assert fingerprint(model) == before
    (model / "1" / "model.onnx").write_bytes(b"y" * 11)
    assert fingerprint(model) != before
    after_size = fingerprint(model)
    stat = (model / "config.pbtxt").stat()
    os.utime(model / "config.pbtxt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fingerprint(model) != after_size


def test_hidden_and_temporary_files_do_not_count(tmp_path: Path) -> None:
    model = _model(tmp_path)
    before = fingerprint(model)
    (model / "2").mkdir()
    for name in ("model.onnx.tmp", ".model.onnx.swp", "model.onnx~", "model.onnx.part", "#model.onnx#"):
        (model / "2" / name).write_bytes(b"half")
    (model / ".staging" / "3").mkdir(parents=True)
    (model / ".staging" / "3" / "model.onnx").write_bytes(b"staged")
    assert fingerprint(model) == before
    # Publishing by rename is what counts.
    (model / ".staging" / "3").rename(model / "3")
    assert [path for path, _, _ in fingerprint(model)] == ["1/model.onnx", "3/model.onnx", "config.pbtxt"]


def test_model_directories_skip_hidden_and_temporary_names(tmp_path: Path) -> None:
    for name in ("a", "b", ".hidden", "c.tmp", "d~"):
        (tmp_path / name).mkdir()
    (tmp_path / "file").write_text("not a model")
    assert sorted(model_directories(tmp_path)) == ["a", "b"]
    assert ignored_name(".x")
    assert ignored_name("x.partial")
    assert not ignored_name("model.onnx")


def test_settle_waits_until_nothing_changes_over_a_period(tmp_path: Path) -> None:
    model = _model(tmp_path)
    target = model / "1" / "model.onnx"
    periods: list[float] = []
    growing = [b"a" * 20, b"a" * 30]  # a writer still appending during the first two periods

    async def sleep(seconds: float) -> None:
        periods.append(seconds)
        if growing:
            with target.open("ab") as handle:
                handle.write(growing.pop(0))

    settled = asyncio.run(settle([model], 0.5, sleep=sleep))
    assert periods == [0.5, 0.5, 0.5]  # changed, changed, then one quiet period
    assert settled[model] == fingerprint(model)
    assert {path: size for path, size, _ in settled[model]}["1/model.onnx"] == 10 + 20 + 30


def test_settle_with_no_period_returns_at_once_and_a_writer_that_never_stops_is_capped(tmp_path: Path) -> None:
    model = _model(tmp_path)

    async def never(seconds: float) -> None:
        raise AssertionError("no wait expected")

    assert asyncio.run(settle([model], 0, sleep=never)) == {model: fingerprint(model)}
    rounds = 0

    async def endless_writer(seconds: float) -> None:
        nonlocal rounds
        rounds += 1
        with (model / "config.pbtxt").open("a") as handle:
            handle.write("# more\n")

    asyncio.run(settle([model], 0.1, sleep=endless_writer, max_rounds=5))
    assert rounds == 5


def test_report_says_what_changed() -> None:
    report = RescanReport(loaded=["a"], reloaded=["b"], unloaded=["c"], failed={"b": "bad config"})
    assert str(report) == "loaded a; reloaded b; unloaded c; b failed (bad config)"
    assert str(RescanReport(unchanged=["a"])) == "nothing changed"


class _CountingRepository(Repository):
    """Rescans block until released, and are counted."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.started = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def rescan(self) -> RescanReport:
        self.started += 1
        self.entered.set()
        await self.release.wait()
        self.release.clear()
        return RescanReport()


async def test_rescan_requests_during_a_rescan_coalesce_into_one_more(tmp_path: Path) -> None:
    repository = _CountingRepository(tmp_path)
    repository.request_rescan()
    await repository.entered.wait()
    for _ in range(5):  # e.g. a burst of SIGHUPs while the first rescan runs
        repository.request_rescan()
    repository.entered.clear()
    repository.release.set()
    await repository.entered.wait()  # the one more
    repository.release.set()
    await repository.close()
    assert repository.started == 2
    repository.request_rescan()  # after close: ignored
    await asyncio.sleep(0)
    assert repository.started == 2


async def test_a_rescan_of_the_real_repository_diffs_against_what_is_loaded(tmp_path: Path) -> None:
    # Directories that are not models fail to load; that is enough to see the plan applied and recorded.
    _model(tmp_path, "a")
    repository = Repository(tmp_path, RepositorySettings(settle_seconds=0))
    await repository.load()
    try:
        assert [entry.name for entry in repository.models()] == ["a"]
        assert (await repository.rescan()).unchanged == ["a"]
        _model(tmp_path, "b")
        (tmp_path / "a" / "config.pbtxt").write_text('name: "a"\nmax_batch_size: 4\n')
        report = await repository.rescan()
        assert (report.loaded, report.reloaded, sorted(report.failed)) == (["b"], ["a"], ["a", "b"])
        assert (await repository.rescan()).unchanged == ["a", "b"]  # failed loads are not retried unchanged
        await repository.unload_model("b")
        assert (await repository.rescan()).unchanged == ["a", "b"]  # unloaded on request: it stays unloaded
        assert repository.model("b").reason == "unloaded"
        (tmp_path / "b" / "config.pbtxt").write_text('name: "b"\nmax_batch_size: 2\n')
        assert (await repository.rescan()).reloaded == ["b"]  # until its files change
        assert repository.model("b").reason != "unloaded"
        (tmp_path / "b" / "1" / "model.onnx").unlink()
        (tmp_path / "b" / "1").rmdir()
        (tmp_path / "b" / "config.pbtxt").unlink()
        (tmp_path / "b").rmdir()
        report = await repository.rescan()
        assert report.unloaded == ["b"]
        assert [entry.name for entry in repository.models()] == ["a"]
    finally:
        await repository.close()
