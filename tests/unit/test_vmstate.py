"""The vmstate decoder on real device payloads recorded from QEMU 7.2 (see
test_vmstate_payloads.py), and on hostile ones."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpshadow.errors import StreamFormatError
from qmpshadow.migstream.events import DeviceSection
from qmpshadow.migstream.vmstate import (
    DecodedDevice,
    Field,
    FieldChange,
    changed_byte_ranges,
    decode_device,
    device_descriptions,
    diff_fields,
    format_value,
)
from tests.unit.test_vmstate_payloads import device_sections, vmdesc_json

VMDESC: dict[str, Any] = json.loads(vmdesc_json())
DESCS = device_descriptions(VMDESC)
A = {(s.idstr, s.instance_id): s for s in device_sections("a")}
B = {(s.idstr, s.instance_id): s for s in device_sections("b")}


def _decode(sec: DeviceSection) -> DecodedDevice:
    return decode_device(DESCS[(sec.idstr, sec.instance_id)], sec.payload)


def _dev(key: tuple[str, int], which: dict[tuple[str, int], DeviceSection] = A
         ) -> DecodedDevice:
    return _decode(which[key])


def test_fixture_matches_the_vmdesc() -> None:
    assert list(A) == [(d["name"], d["instance_id"]) for d in VMDESC["devices"]]
    assert list(B) == list(A)
    assert len(A) == 31
    assert ("kvmclock", 0) not in A  # recorded under TCG


@pytest.mark.parametrize("key", list(A), ids=lambda k: f"{k[0]}/{k[1]}")
def test_every_device_decodes_exactly(key: tuple[str, int]) -> None:
    for which in (A, B):
        dev = _dev(key, which)
        assert dev.name == key[0] and dev.instance_id == key[1]
        payload = which[key].payload
        # fields are in stream order, inside the payload, never overlapping
        end = 0
        for f in dev.fields:
            assert f.offset >= end and f.offset + f.size <= len(payload)
            assert payload[f.offset:f.offset + f.size] == (
                f.value if isinstance(f.value, bytes)
                else payload[f.offset:f.offset + f.size])
            end = f.offset + f.size
        assert len({f.path for f in dev.fields}) == len(dev.fields)  # unique paths


def test_known_values() -> None:
    serial = _dev(("serial", 0)).values()
    # the guest programs COM1 for 115200 8N1: divisor 1, LCR 3 (8 bits, no parity, 1 stop)
    assert serial["state.divider"] == 1 and serial["state.lcr"] == 3
    glob = _dev(("globalstate", 0)).values()
    runstate = glob["runstate"]
    assert isinstance(runstate, bytes) and runstate.startswith(b"running\0")
    assert glob["size"] == len(b"running") + 1
    cpu = _dev(("cpu", 0)).values()
    cr0 = cpu["env.cr[0]"]
    assert isinstance(cr0, int) and cr0 & 1  # protected mode
    eip = cpu["env.eip"]
    assert isinstance(eip, int) and 0x100000 <= eip < 0x200000  # inside the guest kernel
    # typed values: ints, bools, bytes; timers signed (-1 = not armed)
    rtc = _dev(("mc146818rtc", 0)).values()
    assert rtc["periodic_timer"] == -1
    assert isinstance(rtc["cmos_data"], bytes) and len(rtc["cmos_data"]) == 128


def test_structure_rules() -> None:
    hpet = _dev(("hpet", 0)).values()
    # compressed array of structs: array_len 3 -> timer[0..2]
    assert [hpet[f"timer[{i}].tn"] for i in range(3)] == [0, 1, 2]
    ide = _dev(("0000:00:01.1/ide", 0)).values()
    # uncompressed arrays are listed per index; nested struct names keep QEMU's "[n]"
    assert "bmdma[0].cmd" in ide and "bmdma[1].cmd" in ide
    assert "parent_obj.config[0]" in ide
    cpu = _dev(("cpu", 0)).values()
    # a VMSTATE_WITH_TMP field carries its vmsd inline
    assert "env.fpregs[7].tmp.tmp_mant" in cpu and "env.fpregs[7].tmp.tmp_exp" in cpu
    fw = _dev(("fw_cfg", 0)).values()
    # subsections, named by their vmsd name
    assert fw["fw_cfg/acpi_mr.rsdp_mr_size"] == 20
    pit = _dev(("i8254", 0)).values()
    # a top-level field literally named like an array element gets a "#2" suffix
    assert "channels[0].next_transition_time" in pit
    assert "channels[0].next_transition_time#2" in pit


def test_diff_between_two_states_of_one_vm() -> None:
    changes = {k: diff_fields(_dev(k).fields, _dev(k, B).fields) for k in A}
    cpu = {c.path for c in changes[("cpu", 0)]}
    assert "env.eip" in cpu  # the vCPU moved on
    assert changes[("serial", 0)] == []  # COM1 was not reprogrammed
    assert changes[("PCIHost", 0)] == []
    assert changes[("fw_cfg", 0)] == []
    for c in changes[("cpu", 0)]:
        assert c.old is not None and c.new is not None and c.old != c.new


def test_diff_fields_only_on_one_side_and_bytes() -> None:
    a = [Field("x", "uint8", 0, 1, 1), Field("gone", "uint8", 1, 1, 2),
         Field("buf", "buffer", 2, 4, b"\0\0\0\0")]
    b = [Field("x", "uint8", 0, 1, 1), Field("buf", "buffer", 1, 4, b"\0\1\1\0"),
         Field("new", "bool", 5, 1, True)]
    out = diff_fields(a, b)
    assert out == [FieldChange("buf", "buffer", b"\0\0\0\0", b"\0\1\1\0"),
                   FieldChange("new", "bool", None, True),
                   FieldChange("gone", "uint8", 2, None)]
    assert out[0].as_dict()["changed_bytes"] == [[1, 3]]
    assert out[1].as_dict() == {"path": "new", "type": "bool", "old": None, "new": True}


def test_changed_byte_ranges_and_format() -> None:
    assert changed_byte_ranges(b"abcd", b"abcd") == []
    assert changed_byte_ranges(b"abcd", b"xbcy") == [(0, 1), (3, 4)]
    assert changed_byte_ranges(b"ab", b"abcd") == [(2, 4)]
    assert format_value(5) == "5 (0x5)"
    assert format_value(-1) == "-1 (0xffffffffffffffff)"
    assert format_value(True) == "true" and format_value(None) == "(absent)"
    assert format_value(b"\x01\x02") == "0102"
    assert format_value(bytes(40)).endswith("... (40 bytes)")


# ---------------------------------------------------------------------------- hostile input

def _desc(key: tuple[str, int]) -> Mapping[str, Any]:
    return DESCS[key]


def test_truncated_payload_at_every_offset() -> None:
    for key, stride in ((("serial", 0), 1), (("fw_cfg", 0), 1), (("hpet", 0), 1),
                        (("cpu", 0), 11)):
        payload = A[key].payload
        for cut in range(0, len(payload), stride):
            try:
                dev = decode_device(_desc(key), payload[:cut])
            except StreamFormatError:
                continue
            # only a cut just before a subsection decodes: subsections are optional
            assert payload[cut] == 0x05, (key, cut)
            assert dev.fields[-1].offset + dev.fields[-1].size <= cut


def test_extra_bytes_are_reported() -> None:
    payload = A[("serial", 0)].payload
    with pytest.raises(StreamFormatError, match="describes 11 bytes but the section holds 12"):
        decode_device(_desc(("serial", 0)), payload + b"\0")


def test_undescribed_subsection() -> None:
    desc = dict(_desc(("fw_cfg", 0)))
    desc["subsections"] = [s for s in desc["subsections"] if s["vmsd_name"] != "fw_cfg/dma"]
    with pytest.raises(StreamFormatError, match="subsection 'fw_cfg/dma' is not described"):
        decode_device(desc, A[("fw_cfg", 0)].payload)


@pytest.mark.parametrize("bad", [
    {"name": "d", "fields": "nope"},
    {"name": "d", "fields": [{"type": "uint8", "size": 1}]},
    {"name": "d", "fields": [{"name": "x", "type": "uint8", "size": -1}]},
    {"name": "d", "fields": [{"name": "x", "type": "uint8", "size": 1, "array_len": -2}]},
])
def test_malformed_descriptions(bad: dict[str, Any]) -> None:
    with pytest.raises(StreamFormatError, match="vmdesc entry"):
        decode_device(bad, b"\0" * 8)


def test_device_descriptions_validates() -> None:
    with pytest.raises(StreamFormatError, match="'devices' list"):
        device_descriptions({})
    with pytest.raises(StreamFormatError, match="lacks a name"):
        device_descriptions({"devices": [{"name": 3}]})


def test_deep_nesting_is_bounded() -> None:
    desc: dict[str, Any] = {"name": "leaf", "type": "uint8", "size": 1}
    for _ in range(40):
        desc = {"name": "s", "type": "struct", "struct": {"fields": [desc]}, "size": 1}
    with pytest.raises(StreamFormatError, match="nesting deeper"):
        decode_device({"name": "d", "fields": [desc]}, b"\0")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(A)), st.data())
def test_mutated_payloads_decode_or_raise_format_errors(key: tuple[str, int],
                                                        data: st.DataObject) -> None:
    payload = bytearray(A[key].payload)
    for _ in range(data.draw(st.integers(1, 4))):
        if not payload:
            break
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    with contextlib.suppress(StreamFormatError):
        decode_device(_desc(key), bytes(payload[:cut]))
