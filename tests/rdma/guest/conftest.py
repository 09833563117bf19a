"""Fixtures of the in-guest RDMA tests (collected only inside the soft-RoCE guest)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpshadow.transport import LinkOptions, rdma
from qmpshadow.transport.certs import init_dev_pki
from qmpshadow.transport.tcp import TlsConfig


@pytest.fixture(autouse=True)
def _need_rdma() -> None:
    reason = rdma.available()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_dev_pki(d, ["source", "shadow"])
    return d


@contextlib.asynccontextmanager
async def rdma_pair(options: LinkOptions | None = None, *, tls_dir: Path | None = None
                    ) -> AsyncIterator[tuple[rdma.RdmaLink, rdma.RdmaLink, rdma.RdmaListener]]:
    """(client, server, listener) over rxe0; all closed on exit."""
    srv_tls = cli_tls = None
    if tls_dir is not None:
        srv_tls = TlsConfig.from_dir(tls_dir, name="shadow", peers="source")
        cli_tls = TlsConfig.from_dir(tls_dir, name="source", peers="shadow")
    lst = await rdma.listen("127.0.0.1", 0, tls=srv_tls, insecure_loopback=tls_dir is None,
                            options=options)
    try:
        client = await rdma.connect(lst.host, lst.port, tls=cli_tls,
                                    insecure_loopback=tls_dir is None, options=options)
        server = await lst.accept()
        assert isinstance(client, rdma.RdmaLink) and isinstance(server, rdma.RdmaLink)
        try:
            yield client, server, lst
        finally:
            client.abort()
            server.abort()
    finally:
        await lst.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rdma_resources() -> dict[str, int]:
    """This process's verbs objects per type (``rdma resource show``: pd, cq, qp, mr...)."""
    out = subprocess.run(["rdma", "resource", "show"], capture_output=True, text=True,
                         check=True).stdout
    counts: dict[str, int] = {}
    for kind, n in re.findall(r"\b(pd|cq|qp|mr|ctx) (\d+)", out):
        counts[kind] = counts.get(kind, 0) + int(n)
    return counts
