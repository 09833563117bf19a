"""Unix-socket links: SO_PEERCRED checks both ways, socket file handling."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpshadow.errors import ConfigError, TransportError
from qmpshadow.frames.wire import Heartbeat, encode_frame
from qmpshadow.transport import PeerAuthError, local

HB = encode_frame(Heartbeat(generation=1, epoch=0, seq=1, timestamp_ns=2))


async def test_peer_credentials_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    lst = await local.listen(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        accept = asyncio.create_task(lst.accept())
        async with await local.connect(path) as c, await accept as s:
            for link in (c, s):
                assert link.peer.uid == os.geteuid() and link.peer.pid == os.getpid()
                assert link.peer.authenticated and not link.peer.encrypted
                assert link.peer.transport == "local" and link.peer.address == str(path)
            await s.send(HB)
            assert encode_frame(await c.receive()) == HB
    finally:
        await lst.close()
    assert not path.exists()  # the listener removes its socket file


async def test_uid_not_allowed_either_side(tmp_path: Path) -> None:
    path = tmp_path / "b.sock"
    other = os.geteuid() + 4242
    lst = await local.listen(path, allowed_uids=[other])
    try:
        with pytest.raises(PeerAuthError, match=r"server at .* refused this side"):
            await local.connect(path)
        async with asyncio.timeout(5):
            while not lst.stats.rejected:
                await asyncio.sleep(0.01)
        err = str(lst.stats.recent_rejections[-1])
        assert f"runs as uid {os.geteuid()}" in err and f"expected one of [{other}]" in err
    finally:
        await lst.close()
    lst = await local.listen(path)
    try:
        with pytest.raises(PeerAuthError, match=f"server on .* runs as uid {os.geteuid()}"):
            await local.connect(path, allowed_uids=[other])
    finally:
        await lst.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="qs-local-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_process_of_another_user_is_refused(shared_dir: Path) -> None:
    """A real process running as 'nobody' connects (the socket is made world-writable for
    the test): the kernel's SO_PEERCRED names its uid and the listener refuses it.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 to run as another user")
    path = shared_dir / "c.sock"
    lst = await local.listen(path, mode=0o666)
    script = (
        "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
        "print(s.recv(8)); s.close()"
    )
    try:
        out = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: subprocess.run([python, "-c", script, str(path)], user=65534,
                                   capture_output=True, text=True, timeout=20),
        )
        assert out.returncode == 0, out.stderr
        assert "QSLK\\x01\\x01" in out.stdout  # the refusal preamble
        err = lst.stats.recent_rejections[-1]
        assert isinstance(err, PeerAuthError) and "runs as uid 65534" in str(err)
        assert lst.stats.accepted == 0
    finally:
        await lst.close()


async def test_socket_file_handling(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    # A stale socket (its process died) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    lst = await local.listen(path)
    try:
        # A live one is not.
        with pytest.raises(TransportError, match="another process is listening"):
            await local.listen(path)
    finally:
        await lst.close()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        await local.listen(regular)
    with pytest.raises(ConfigError, match="at most 107"):
        await local.listen(tmp_path / ("x" * 120))
    with pytest.raises(TransportError, match="expected an agent listening"):
        await local.connect(tmp_path / "nobody-here.sock")
    with pytest.raises(ConfigError, match="allowed_uids is empty"):
        await local.connect(path, allowed_uids=[])
