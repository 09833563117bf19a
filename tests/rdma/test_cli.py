"""`--transport rdma` on the agents' command line, on this host (real CLI processes).

Without an RDMA device both agents stop at once with an error that says so and names
``--transport tcp``; an rdma transport needs a tcp:HOST:PORT endpoint for its control
channel. (The rdma path itself runs inside the soft-RoCE guest: tests/rdma/test_in_guest.py.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qmpshadow.transport import rdma
from tests.faults.e2e import CLI, write_spec


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60,
                          check=False)


def test_shadow_and_protect_without_a_device_name_tcp(tmp_path: Path) -> None:
    if rdma.available() is None:
        pytest.skip("this host has a usable RDMA device: the no-device error cannot happen")
    spec = str(write_spec(tmp_path / "vm.toml", tmp_path / "p.ram"))
    shadow = _run("shadow", "--spec", spec, "--replica", str(tmp_path / "replica"),
                  "--listen", "tcp:127.0.0.1:0", "--insecure-loopback", "--transport", "rdma")
    assert shadow.returncode == 2, shadow
    assert "--transport rdma" in shadow.stderr and "--transport tcp" in shadow.stderr, shadow
    assert "no RDMA device" in shadow.stderr, shadow
    protect = _run("protect", "--spec", spec, "--qmp", str(tmp_path / "none.sock"),
                   "--to", "tcp:127.0.0.1:9", "--insecure-loopback", "--transport", "rdma")
    assert protect.returncode == 2, protect
    assert "--transport tcp" in protect.stderr, protect


def test_rdma_needs_a_tcp_endpoint(tmp_path: Path) -> None:
    spec = str(write_spec(tmp_path / "vm.toml", tmp_path / "p.ram"))
    out = _run("shadow", "--spec", spec, "--replica", str(tmp_path / "replica"),
               "--listen", f"unix:{tmp_path / 'l.sock'}", "--transport", "rdma")
    assert out.returncode == 2, out
    assert "needs a tcp:HOST:PORT endpoint" in out.stderr, out
