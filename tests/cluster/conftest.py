"""Fixtures for the cluster tests: a private mosquitto broker.

- ``broker``: a running :class:`~qmpshadow.cluster.mosquitto.Mosquitto` on 127.0.0.1 (a free
  port, a generated config and password file made with ``mosquitto_passwd``, no anonymous
  clients), stopped at teardown. Skips where mosquitto is not installed.
- ``broker_config``: a :class:`~qmpshadow.cluster.mqtt.BrokerConfig` for it, with the
  credentials.
- ``short_tmp`` and the QEMU fixtures come from tests/integration/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpshadow.cluster.mosquitto import Mosquitto, mosquitto_unavailable_reason
from qmpshadow.cluster.mqtt import BrokerConfig
from tests.integration.conftest import (  # noqa: F401  (fixtures)
    kvm,
    launch_vm,
    short_tmp,
    tcg,
    vm_spec,
)


@pytest.fixture
def broker(short_tmp: Path) -> Iterator[Mosquitto]:  # noqa: F811
    """A private broker on 127.0.0.1, stopped at teardown."""
    reason = mosquitto_unavailable_reason()
    if reason:
        pytest.skip(reason)
    mq = Mosquitto(short_tmp / "broker")
    mq.start()
    try:
        yield mq
    finally:
        mq.stop()


@pytest.fixture
def broker_config(broker: Mosquitto) -> BrokerConfig:
    """Credentials and address of ``broker``."""
    return BrokerConfig(host=broker.host, port=broker.port, username=broker.username,
                        password=broker.password)
