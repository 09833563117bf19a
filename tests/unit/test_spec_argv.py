"""VmSpec parsing and primary/shadow command lines (pure: no QEMU, no sockets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpshadow.errors import AccelError, ConfigError
from qmpshadow.qemu import accel as accel_mod
from qmpshadow.qemu.accel import AccelChoice, detect_accel
from qmpshadow.qemu.argv import RunPaths, primary_argv, qemu_opt, shadow_argv
from qmpshadow.qemu.spec import MemorySpec, VmSpec

FULL_TOML = """
name = "demo"
vcpus = 2
machine = "q35"
cpu = "qemu64,+ssse3"
accel = "tcg"
kernel = "guest/dirtier.elf"
kernel_args = "pattern=seq region=16M"
initrd = "/boot/initrd.img"
serial = "logs/serial.log"
extra_args = ["-device", "virtio-rng-pci"]

[memory]
size_mib = 256
backend = "file"
backend_id = "mem"
mem_path = "/dev/shm/demo.ram"
"""

RUN = RunPaths(Path("/run/qs/demo"))


def spec(**kw: Any) -> VmSpec:
    mem = kw.pop("memory", None) or MemorySpec(size_mib=128)
    return VmSpec(name=kw.pop("name", "vm1"), memory=mem, **kw)


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) pairs of an argv (flag options get '')."""
    out: list[tuple[str, str]] = []
    i = 1
    flags = {"-nodefaults", "-no-user-config", "-S"}
    while i < len(argv):
        if argv[i] in flags:
            out.append((argv[i], ""))
            i += 1
        else:
            out.append((argv[i], argv[i + 1]))
            i += 2
    return out


def values(argv: list[str], opt: str) -> list[str]:
    return [v for o, v in pairs(argv) if o == opt]


# ---------------------------------------------------------------- spec


def test_full_toml_parses_and_resolves_relative_paths(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text(FULL_TOML)
    s = VmSpec.from_toml(f)
    assert s.name == "demo"
    assert s.vcpus == 2
    assert s.machine == "q35"
    assert s.cpu == "qemu64,+ssse3"
    assert s.accel == "tcg"
    assert s.kernel == tmp_path / "guest/dirtier.elf"
    assert s.kernel_args == "pattern=seq region=16M"
    assert s.initrd == Path("/boot/initrd.img")
    assert s.serial == tmp_path / "logs/serial.log"
    assert s.extra_args == ("-device", "virtio-rng-pci")
    assert s.memory == MemorySpec(256, "file", "mem", Path("/dev/shm/demo.ram"))


def test_minimal_defaults() -> None:
    s = VmSpec.from_dict({"name": "a", "memory": {"size_mib": 64}})
    assert (s.vcpus, s.machine, s.cpu, s.accel, s.serial) == (1, "pc", "qemu64", "auto", True)
    assert s.memory == MemorySpec(size_mib=64, backend="ram", backend_id="pc.ram")
    assert s.kernel is None and s.extra_args == ()


def test_example_file_parses() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "vm.toml"
    s = VmSpec.from_toml(example)
    assert s.name


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"name": "a", "memory": {"size_mib": 64}, "vcpu": 2}, "vcpu"),
        ({"name": "a", "memory": {"size_mib": 64, "size": 1}}, "memory.size"),
        ({"name": "a"}, "memory"),
        ({"memory": {"size_mib": 64}}, "name"),
        ({"name": "a", "memory": {}}, "memory.size_mib"),
        ({"name": "a", "memory": {"size_mib": "64"}}, "memory.size_mib"),
        ({"name": "a", "memory": {"size_mib": True}}, "memory.size_mib"),
        ({"name": "a", "memory": {"size_mib": 0}}, "memory.size_mib"),
        ({"name": "a", "memory": 64}, "memory"),
        ({"name": "a", "memory": {"size_mib": 64}, "vcpus": True}, "vcpus"),
        ({"name": "a", "memory": {"size_mib": 64}, "vcpus": 0}, "vcpus"),
        ({"name": "a", "memory": {"size_mib": 64}, "vcpus": 1.5}, "vcpus"),
        ({"name": "a", "memory": {"size_mib": 64}, "accel": "xen"}, "accel"),
        ({"name": "a", "memory": {"size_mib": 64}, "machine": "pc,smm=off"}, "machine"),
        ({"name": "a", "memory": {"size_mib": 64}, "serial": 3}, "serial"),
        ({"name": "a", "memory": {"size_mib": 64}, "serial": ""}, "serial"),
        ({"name": "a", "memory": {"size_mib": 64}, "extra_args": "-S"}, "extra_args"),
        ({"name": "a", "memory": {"size_mib": 64}, "extra_args": ["-S", 1]}, "extra_args"),
        ({"name": "a", "memory": {"size_mib": 64}, "kernel_args": "x"}, "kernel"),
        ({"name": "a", "memory": {"size_mib": 64, "backend": "file"}}, "memory.mem_path"),
        ({"name": "a", "memory": {"size_mib": 64, "mem_path": "/x"}}, "memory.mem_path"),
        ({"name": "a", "memory": {"size_mib": 64, "backend": "hugetlb"}}, "memory.backend"),
        ({"name": "a", "memory": {"size_mib": 64, "backend_id": "1bad"}}, "memory.backend_id"),
        ({"name": "a/b", "memory": {"size_mib": 64}}, "name"),
        ({"name": "", "memory": {"size_mib": 64}}, "name"),
    ],
)
def test_invalid_specs_name_the_key(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        VmSpec.from_dict(data)
    assert needle in str(info.value)


def test_bad_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        VmSpec.from_toml_text("name = ", source="x.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        VmSpec.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "a"\n[memory]\nsize_mib = 64\nbogus = 1\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*memory\.bogus"):
        VmSpec.from_toml(bad)


_ids = st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(
    name=_ids,
    size=st.integers(1, 1 << 20),
    vcpus=st.integers(1, 64),
    backend=st.sampled_from(["ram", "file"]),
    backend_id=_ids,
    serial=st.one_of(st.booleans(), st.just("/var/log/s.log")),
    extra=st.lists(st.text(min_size=1, max_size=5), max_size=3),
)
def test_to_dict_round_trips(
    name: str, size: int, vcpus: int, backend: str, backend_id: str,
    serial: bool | str, extra: list[str],
) -> None:
    mem: dict[str, Any] = {"size_mib": size, "backend": backend, "backend_id": backend_id}
    if backend == "file":
        mem["mem_path"] = "/dev/shm/x.ram"
    s = VmSpec.from_dict(
        {"name": name, "memory": mem, "vcpus": vcpus, "serial": serial, "extra_args": extra}
    )
    assert VmSpec.from_dict(s.to_dict()) == s


# ---------------------------------------------------------------- argv


def test_primary_plain_ram_argv() -> None:
    argv = primary_argv(spec(), RUN, accel="tcg")
    assert argv[0] == "qemu-system-x86_64"
    assert argv[1:] == [
        "-name", "guest=vm1", "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "pc", "-accel", "tcg", "-cpu", "qemu64", "-smp", "1", "-m", "128M",
        "-qmp", "unix:/run/qs/demo/qmp.sock,server=on,wait=off",
        "-qmp", "unix:/run/qs/demo/qmp2.sock,server=on,wait=off",
        "-pidfile", "/run/qs/demo/qemu.pid",
        "-chardev", "file,id=serial0,path=/run/qs/demo/serial.log",
        "-serial", "chardev:serial0",
    ]  # fmt: skip
    assert "-object" not in argv and "-incoming" not in argv and "-S" not in argv


def test_primary_named_ram_backend_gets_an_object() -> None:
    s = spec(memory=MemorySpec(size_mib=64, backend_id="mem0"))
    argv = primary_argv(s, RUN, accel=AccelChoice("kvm", "test"))
    assert values(argv, "-object") == ["memory-backend-ram,id=mem0,size=64M"]
    assert values(argv, "-machine") == ["pc,memory-backend=mem0"]
    assert values(argv, "-accel") == ["kvm"]


def test_primary_file_backend_and_boot_options() -> None:
    s = spec(
        memory=MemorySpec(256, "file", "mem", Path("/dev/shm/a,b.ram")),
        kernel=Path("/k/dirtier.elf"), kernel_args="a=1,b=2", initrd=Path("/k/mod1,/k/mod2"),
        serial=Path("/var/log/vm.log"), extra_args=("-device", "isa-debug-exit"),
        vcpus=4, machine="q35", cpu="qemu64,+ssse3",
    )
    argv = primary_argv(s, RUN, accel="tcg")
    assert values(argv, "-object") == [
        "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/a,,b.ram,share=on"
    ]
    assert values(argv, "-machine") == ["q35,memory-backend=mem"]
    assert values(argv, "-m") == ["256M"]
    assert values(argv, "-smp") == ["4"]
    assert values(argv, "-cpu") == ["qemu64,+ssse3"]
    # -kernel/-append/-initrd are not key=value lists: no comma escaping.
    assert values(argv, "-kernel") == ["/k/dirtier.elf"]
    assert values(argv, "-append") == ["a=1,b=2"]
    assert values(argv, "-initrd") == ["/k/mod1,/k/mod2"]
    assert values(argv, "-chardev") == ["file,id=serial0,path=/var/log/vm.log"]
    assert argv[-2:] == ["-device", "isa-debug-exit"]


def test_no_serial_and_incoming_primary() -> None:
    argv = primary_argv(spec(serial=False), RUN, accel="tcg", incoming=True)
    assert "-serial" not in argv and "-chardev" not in argv
    assert argv[-3:] == ["-S", "-incoming", "defer"]


@pytest.mark.parametrize(
    "memory",
    [
        MemorySpec(size_mib=128),
        MemorySpec(size_mib=128, backend_id="mem"),
        MemorySpec(128, "file", "mem", Path("/dev/shm/p.ram")),
    ],
)
def test_shadow_matches_primary_except_ram_and_start(memory: MemorySpec) -> None:
    s = spec(memory=memory, kernel=Path("/k"), kernel_args="x")
    prim = primary_argv(s, RUN, accel="tcg")
    shad = shadow_argv(s, RUN, accel="tcg", mem_path="/dev/shm/s.ram")
    assert values(shad, "-object") == [
        f"memory-backend-file,id={memory.backend_id},size=128M,mem-path=/dev/shm/s.ram,share=on"
    ]
    assert values(shad, "-machine") == [f"pc,memory-backend={memory.backend_id}"]
    assert shad[-3:] == ["-S", "-incoming", "defer"]

    def device_model(argv: list[str]) -> list[tuple[str, str]]:
        return [(o, v) for o, v in pairs(argv) if o not in ("-object", "-machine", "-S",
                                                            "-incoming")]

    assert device_model(shad) == device_model(prim)


def test_shadow_refuses_the_primary_ram_file() -> None:
    s = spec(memory=MemorySpec(128, "file", "mem", Path("/dev/shm/p.ram")))
    with pytest.raises(ConfigError, match="primary's RAM file"):
        shadow_argv(s, RUN, accel="tcg", mem_path="/dev/shm/p.ram")


def test_unresolved_accel_is_refused() -> None:
    with pytest.raises(ConfigError, match="detect_accel"):
        primary_argv(spec(), RUN, accel="auto")


def test_qemu_opt_doubles_commas() -> None:
    assert qemu_opt("/a,b,,c") == "/a,,b,,,,c"
    assert qemu_opt(Path("/plain")) == "/plain"
    argv = primary_argv(spec(), RunPaths(Path("/r,1")), accel="tcg")
    assert "unix:/r,,1/qmp.sock,server=on,wait=off" in argv


def test_run_paths_refuse_long_socket_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="107"):
        RunPaths(Path("/" + "d" * 100))
    rp = RunPaths.create(tmp_path / "short")
    assert rp.root.is_dir()
    assert {p.name for p in (rp.qmp_sock, rp.qmp2_sock, rp.serial_log, rp.stderr_log,
                             rp.pidfile)} == {"qmp.sock", "qmp2.sock", "serial.log",
                                              "stderr.log", "qemu.pid"}


# ---------------------------------------------------------------- accel


def test_accel_tcg_needs_no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QMPSHADOW_ACCEL", raising=False)
    monkeypatch.setattr(accel_mod, "probe_kvm", lambda device="": pytest.fail("probed"))
    assert detect_accel("tcg").name == "tcg"


def test_accel_auto_falls_back_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QMPSHADOW_ACCEL", raising=False)
    choice = detect_accel("auto", device="/nonexistent/kvm")
    assert choice.name == "tcg"
    assert "/nonexistent/kvm" in choice.reason


def test_accel_explicit_kvm_unusable_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QMPSHADOW_ACCEL", raising=False)
    with pytest.raises(AccelError, match="tcg"):
        detect_accel("kvm", device="/nonexistent/kvm")


def test_accel_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMPSHADOW_ACCEL", "tcg")
    choice = detect_accel()
    assert choice.name == "tcg" and "QMPSHADOW_ACCEL" in choice.reason
    monkeypatch.setenv("QMPSHADOW_ACCEL", "kvm")
    with pytest.raises(AccelError, match="QMPSHADOW_ACCEL"):
        detect_accel(device="/nonexistent/kvm")
    monkeypatch.setenv("QMPSHADOW_ACCEL", "hvf")
    with pytest.raises(ConfigError, match="QMPSHADOW_ACCEL"):
        detect_accel()
    # An explicit argument wins over the environment.
    monkeypatch.setenv("QMPSHADOW_ACCEL", "kvm")
    assert detect_accel("tcg").name == "tcg"
    with pytest.raises(ConfigError, match="accel"):
        detect_accel("xen")
