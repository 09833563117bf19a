"""Moved to tests/faults/e2e.py (the fault-injection suite); kept for old imports."""

from tests.faults.e2e import (  # noqa: F401
    CLI,
    Agent,
    RunStates,
    cluster_args,
    kill_pid,
    pid_alive,
    write_spec,
)
