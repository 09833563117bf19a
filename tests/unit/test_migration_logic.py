"""The migration's decisions without QEMU: options, settings, progress parsing, supervisor,
rollback plan, destination spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpshadow.errors import ConfigError
from qmpshadow.migration.destination import destination_argv, destination_spec
from qmpshadow.migration.options import (
    MigrateOptions,
    changed_settings,
    parse_assignment,
    parse_bandwidth,
    parse_param_value,
    parse_switch,
    plan_settings,
)
from qmpshadow.migration.progress import MigrationStats, Progress, describe
from qmpshadow.migration.supervisor import Action, Step, Supervisor, plan_rollback
from qmpshadow.qemu.argv import RunPaths
from qmpshadow.qemu.spec import MemorySpec, VmSpec

# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(("text", "value"), [
    ("1048576", 1 << 20), ("200M", 200 << 20), ("200m", 200 << 20), ("1G", 1 << 30),
    ("512K", 512 << 10), ("1.5M", 3 << 19), ("100MiB/s", 100 << 20), ("64MB", 64 << 20),
])
def test_parse_bandwidth(text: str, value: int) -> None:
    assert parse_bandwidth(text) == value


@pytest.mark.parametrize("text", ["", "fast", "-1M", "0", "10X", "M"])
def test_parse_bandwidth_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="bandwidth"):
        parse_bandwidth(text)


def test_assignments() -> None:
    assert parse_assignment("xbzrle", "--cap") == ("xbzrle", "on")
    assert parse_assignment("max-cpu-throttle=50", "--param") == ("max-cpu-throttle", "50")
    with pytest.raises(ConfigError, match="lowercase QMP name"):
        parse_assignment("Bad Name=1", "--cap")
    assert parse_switch("ON", "x") and not parse_switch("off", "x")
    with pytest.raises(ConfigError, match="expected on or off"):
        parse_switch("maybe", "x")
    assert parse_param_value("50") == 50 and parse_param_value("-3") == -3
    assert parse_param_value("true") is True and parse_param_value("zstd") == "zstd"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"multifd_channels": 0}, "multifd channels"),
    ({"multifd_channels": 256}, "multifd channels"),
    ({"downtime_limit_ms": -1}, "downtime limit"),
    ({"downtime_limit_ms": 2_000_001}, "downtime limit"),
    ({"bandwidth": 0}, "bandwidth"),
    ({"postcopy_after": 0}, "postcopy after"),
    ({"timeout": 0}, "timeout"),
    ({"stall_timeout": -1}, "stall timeout"),
    ({"source_after": "kill"}, "source after"),
    ({"transport": "rdma"}, "transport"),
    ({"capabilities": {"Bad": True}}, "capability"),
    ({"multifd_channels": 2, "capabilities": {"multifd": False}}, "needed by another"),
])
def test_options_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MigrateOptions(**kwargs)  # type: ignore[arg-type]


def test_plan_settings_defaults() -> None:
    src, dst = plan_settings(MigrateOptions())
    assert src.capabilities == {"events": True} and src.parameters == {}
    assert dst.capabilities == {"events": True} and dst.parameters == {}


def test_plan_settings_both_sides() -> None:
    opts = MigrateOptions(multifd_channels=4, auto_converge=True, downtime_limit_ms=50,
                          bandwidth=1 << 30, postcopy_after=3,
                          capabilities={"xbzrle": True, "x-ignore-shared": True},
                          parameters={"max-cpu-throttle": 60, "multifd-compression": "zstd"})
    src, dst = plan_settings(opts)
    assert src.capabilities == {"events": True, "multifd": True, "auto-converge": True,
                                "postcopy-ram": True, "xbzrle": True, "x-ignore-shared": True}
    # only what the destination must share
    assert dst.capabilities == {"events": True, "multifd": True, "postcopy-ram": True,
                                "x-ignore-shared": True}
    assert src.parameters == {"multifd-channels": 4, "downtime-limit": 50,
                              "max-bandwidth": 1 << 30, "max-cpu-throttle": 60,
                              "multifd-compression": "zstd"}
    assert dst.parameters == {"multifd-channels": 4, "multifd-compression": "zstd"}


def test_changed_settings_keeps_previous_values_of_changes_only() -> None:
    src, _ = plan_settings(MigrateOptions(multifd_channels=2, bandwidth=1 << 20))
    restore = changed_settings(
        src, {"events": False, "multifd": True, "xbzrle": False},
        {"multifd-channels": 2, "max-bandwidth": 134217728, "downtime-limit": 300})
    assert restore.capabilities == {"events": False}  # multifd was on already
    assert restore.parameters == {"max-bandwidth": 134217728}  # channels unchanged

# ---------------------------------------------------------------------------- progress


ACTIVE = {
    "status": "active", "total-time": 1200, "setup-time": 4, "expected-downtime": 80,
    "cpu-throttle-percentage": 20,
    "ram": {"transferred": 5000000, "remaining": 1000000, "total": 67108864,
            "duplicate": 15000, "normal": 1200, "normal-bytes": 4915200,
            "dirty-pages-rate": 250, "mbps": 300.5, "dirty-sync-count": 3,
            "page-size": 4096, "multifd-bytes": 0, "postcopy-requests": 0},
}


def test_progress_from_query() -> None:
    p = Progress.from_query(ACTIVE)
    assert p.status == "active" and p.passes == 3 and p.transferred == 5000000
    assert p.dirty_rate == 250 * 4096 and p.expected_downtime_ms == 80
    assert p.throttle_percent == 20 and 0.98 < p.fraction < 0.99
    line = describe(p)
    assert "pass 3" in line and "expected downtime 80 ms" in line and "throttle 20%" in line


@pytest.mark.parametrize("reply", [
    {}, {"status": 5}, {"status": "active", "ram": "x"},
    {"status": "active", "ram": {"transferred": "many", "dirty-sync-count": True}},
])
def test_progress_tolerates_odd_replies(reply: dict[str, object]) -> None:
    p = Progress.from_query(reply)
    assert p.transferred == 0 and p.passes == 0
    assert p.status in ("none", "active")


def test_stats_format_and_dict() -> None:
    final = Progress.from_query({**ACTIVE, "status": "completed", "downtime": 12})
    stats = MigrationStats.build(final, guest_pause_ms=30.0, wall_time_ms=1500.0,
                                 postcopy=False, uri="tcp:127.0.0.1:4444",
                                 source_after="pause",
                                 destination={"pid": 42, "qmp": "/r/qmp.sock", "netns": None})
    text = stats.format()
    assert "Job type:" in text and "Completed" in text
    assert "Downtime (QEMU):" in text and "12 ms" in text
    assert "Guest paused (STOP→RESUME):" in text and "30 ms" in text
    assert "left paused" in text
    doc = stats.as_dict()
    assert doc["downtime_ms"] == 12 and doc["passes"] == 3 and doc["destination"]["pid"] == 42

# ---------------------------------------------------------------------------- supervisor


def _p(status: str = "active", transferred: int = 0, passes: int = 1, **kw: object
       ) -> Progress:
    return Progress(status=status, transferred=transferred, passes=passes, **kw)  # type: ignore[arg-type]


def test_supervisor_waits_then_succeeds() -> None:
    sup = Supervisor(MigrateOptions(), start=0.0)
    assert sup.observe(0.1, _p("setup")).action is Action.WAIT
    assert sup.observe(0.5, _p(transferred=10)).action is Action.WAIT
    assert sup.observe(1.0, _p("completed", 20)).action is Action.SUCCEEDED


def test_supervisor_stall_is_measured_from_the_last_movement() -> None:
    sup = Supervisor(MigrateOptions(stall_timeout=5, timeout=1000), start=0.0)
    for t in range(10):  # moving: never stalls
        assert sup.observe(float(t), _p(transferred=t * 100)).action is Action.WAIT
    assert sup.observe(13.0, _p(transferred=900)).action is Action.WAIT
    d = sup.observe(14.0, _p(transferred=900))
    assert d.action is Action.ABORT
    assert "no progress for 5 s" in d.reason and "link to the destination is cut" in d.reason


def test_supervisor_timeout_with_hint() -> None:
    sup = Supervisor(MigrateOptions(timeout=10, stall_timeout=100), start=0.0)
    d = sup.observe(10.0, _p(transferred=5, dirty_rate=50e6, mbps=400.0))
    assert d.action is Action.ABORT
    assert "timeout of 10 s" in d.reason and "--auto-converge" in d.reason


def test_supervisor_switches_to_postcopy_once() -> None:
    sup = Supervisor(MigrateOptions(postcopy_after=2), start=0.0)
    assert sup.observe(1, _p(transferred=1, passes=1)).action is Action.WAIT
    d = sup.observe(2, _p(transferred=2, passes=2))
    assert d.action is Action.START_POSTCOPY and "pass 2" in d.reason
    assert sup.observe(3, _p(transferred=3, passes=3)).action is Action.WAIT
    assert sup.observe(4, _p("postcopy-active", 4)).action is Action.WAIT
    assert sup.in_postcopy


def test_supervisor_dead_destination() -> None:
    sup = Supervisor(MigrateOptions(), start=0.0)
    d = sup.observe(1, _p(transferred=5), dest_exit=-9)
    assert d.action is Action.ABORT
    assert d.reason == "the destination QEMU was killed by signal 9 during the migration"
    d = sup.observe(1, _p("failed", 5, error="Broken pipe"), dest_exit=1)
    assert d.reason == ("the destination QEMU exited with status 1 during the migration "
                        "(the source reports: Broken pipe)")
    d = sup.observe(1, _p("completed", 5), dest_exit=-9)
    assert d.action is Action.ABORT and "just as the source completed" in d.reason


def test_supervisor_failures_after_postcopy_are_lost() -> None:
    sup = Supervisor(MigrateOptions(), start=0.0)
    sup.observe(1, _p("postcopy-active", 5))
    assert sup.observe(2, _p("postcopy-active", 6), dest_exit=-9).action is Action.LOST
    sup = Supervisor(MigrateOptions(), start=0.0)
    sup.observe(1, _p("postcopy-active", 5))
    assert sup.observe(2, _p("failed", 6, error="x")).action is Action.LOST
    assert Supervisor(MigrateOptions(), 0).observe(
        1, _p("postcopy-paused")).action is Action.LOST
    # no stall or timeout decisions past the point of no return
    sup = Supervisor(MigrateOptions(timeout=1, stall_timeout=1), start=0.0)
    assert sup.observe(100, _p("postcopy-active", 5)).action is Action.WAIT


@pytest.mark.parametrize(("status", "words"), [
    ("failed", "QEMU reports the migration failed: boom"),
    ("cancelled", "cancelled outside qmpshadow"),
    ("cancelling", "cancelled outside qmpshadow"),
    ("none", "reports no migration"),
    ("colo", "COLO"),
])
def test_supervisor_qemu_side_failures(status: str, words: str) -> None:
    d = Supervisor(MigrateOptions(), 0).observe(1, _p(status, error="boom"))
    assert d.action is Action.FAILED and words in d.reason


def test_plan_rollback() -> None:
    full = [Step.CANCEL, Step.KILL_DESTINATION, Step.WAIT_SETTLED, Step.CONT_SOURCE,
            Step.RESTORE_SETTINGS]
    assert plan_rollback(source_status="active", destination_alive=True) == full
    assert plan_rollback(source_status=None, destination_alive=True) == full
    # nothing in flight: no cancel; a dead destination is not killed again
    assert plan_rollback(source_status="failed", destination_alive=False) == [
        Step.WAIT_SETTLED, Step.CONT_SOURCE, Step.RESTORE_SETTINGS]
    # the destination always goes before the source may continue
    steps = plan_rollback(source_status="completed", destination_alive=True)
    assert steps.index(Step.KILL_DESTINATION) < steps.index(Step.CONT_SOURCE)

# ---------------------------------------------------------------------------- destination


def test_destination_spec_serial_and_memory(tmp_path: Path) -> None:
    spec = VmSpec(name="v", memory=MemorySpec(size_mib=64), serial=tmp_path / "s.log")
    assert destination_spec(spec, mem_path=None).serial is True
    with pytest.raises(ConfigError, match="only meaningful"):
        destination_spec(spec, mem_path=tmp_path / "x.ram")
    shared = VmSpec(name="v", memory=MemorySpec(size_mib=64, backend="file", backend_id="mem",
                                                mem_path=tmp_path / "src.ram"))
    with pytest.raises(ConfigError, match="--dest-mem-path"):
        destination_spec(shared, mem_path=None)
    with pytest.raises(ConfigError, match="is the source's RAM file"):
        destination_spec(shared, mem_path=tmp_path / "src.ram")
    moved = destination_spec(shared, mem_path=tmp_path / "dst.ram")
    assert moved.memory.mem_path == tmp_path / "dst.ram" and moved.memory.backend_id == "mem"


def test_destination_argv_netns(tmp_path: Path) -> None:
    run = RunPaths.create(tmp_path / "r")
    spec = VmSpec(name="v", memory=MemorySpec(size_mib=64))
    argv = destination_argv(spec, run, accel="tcg", netns="ns1")
    assert argv[:4] == ["ip", "netns", "exec", "ns1"]
    assert argv[-3:] == ["-S", "-incoming", "defer"]
    assert destination_argv(spec, run, accel="tcg")[0] == "qemu-system-x86_64"
