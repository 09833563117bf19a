"""Fixtures of the fault-injection suite: the private ``broker`` of tests/cluster and the
QEMU fixtures (``short_tmp``, ``launch_vm``, ``tcg``) of tests/integration."""

from tests.cluster.conftest import broker  # noqa: F401  (fixtures)
from tests.integration.conftest import (  # noqa: F401  (fixtures)
    launch_vm,
    short_tmp,
    tcg,
    vm_spec,
)
