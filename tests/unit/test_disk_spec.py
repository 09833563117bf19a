"""``[[disks]]`` of the VM spec: parsing, errors, round trip, command lines per role."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpshadow.disk.spec import DiskSpec, disk_argv, disk_sizes, disks_from_list
from qmpshadow.errors import ConfigError
from qmpshadow.qemu.argv import RunPaths, primary_argv, shadow_argv
from qmpshadow.qemu.spec import VmSpec

TOML = """
name = "dk"
[memory]
size_mib = 64
backend = "file"
backend_id = "mem"
mem_path = "/dev/shm/dk.ram"
[[disks]]
id = "disk0"
path = "d0.raw"
shadow_path = "/srv/s0.raw"
[[disks]]
id = "disk1"
path = "/data/d,1.raw"
mode = "shared"
"""


def test_toml_disks_parse_and_round_trip(tmp_path: Path) -> None:
    spec = VmSpec.from_toml_text(TOML, base_dir=tmp_path)
    d0, d1 = spec.disks
    assert d0 == DiskSpec(id="disk0", path=tmp_path / "d0.raw",
                          shadow_path=Path("/srv/s0.raw"))
    assert d1.mode == "shared" and d1.image("shadow") == d1.path == Path("/data/d,1.raw")
    assert d0.image("shadow") == Path("/srv/s0.raw") and d0.image("primary") == d0.path
    assert VmSpec.from_dict(spec.to_dict()) == spec


def test_argv_per_role(tmp_path: Path) -> None:
    spec = VmSpec.from_toml_text(TOML, base_dir=tmp_path)
    run = RunPaths(Path("/run/qs/dk"))
    prim = primary_argv(spec, run, accel="tcg")
    shad = shadow_argv(spec, run, accel="tcg", mem_path="/dev/shm/dk.shadow.ram")
    assert f"file,node-name=disk0-file,filename={tmp_path / 'd0.raw'}" in prim
    assert "file,node-name=disk0-file,filename=/srv/s0.raw" in shad
    # commas in file names are doubled for QEMU's option parser; shared: the same image
    assert "file,node-name=disk1-file,filename=/data/d,,1.raw" in prim
    assert "file,node-name=disk1-file,filename=/data/d,,1.raw" in shad
    assert "ide-hd,drive=disk1,bus=ide.0,unit=1" in prim
    assert disk_argv((), "primary") == []


@pytest.mark.parametrize(("raw", "needle"), [
    ({"id": "d0", "path": "a"}, "shadow_path"),
    ({"id": "0d", "path": "a", "mode": "shared"}, "QEMU id"),
    ({"id": "d0", "path": "a", "mode": "mirror", "shadow_path": "b"}, "disks.mode"),
    ({"id": "d0", "path": "", "shadow_path": "b"}, r"disks\[0\]\.path: expected a non-empty"),
    ({"id": "d0", "path": "a", "shadow_path": "a"}, "primary's image"),
    ({"id": "d0", "path": "a", "shadow_path": "b", "size": 3}, "unknown key"),
])
def test_bad_disks_are_refused(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        disks_from_list([raw], None)


def test_list_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="array of tables"):
        disks_from_list({"id": "d0"}, None)
    one = {"id": "d0", "path": "a", "mode": "shared"}
    with pytest.raises(ConfigError, match="unique"):
        disks_from_list([one, one], None)
    with pytest.raises(ConfigError, match="at most 4"):
        disks_from_list([dict(one, id=f"d{i}") for i in range(5)], None)
    with pytest.raises(ConfigError, match="create the raw image"):
        disk_sizes((DiskSpec(id="d0", path=tmp_path / "missing.raw", mode="shared"),))
