"""Live migration without libvirt: orchestration over QMP with rollback.

- :mod:`.options`: what to migrate with (capabilities, parameters, limits), sans-I/O;
- :mod:`.progress`: ``query-migrate`` as typed progress and final statistics, sans-I/O;
- :mod:`.supervisor`: when to switch to postcopy, give up, and how to roll back, sans-I/O;
- :mod:`.destination`: the destination QEMU (survives qmpshadow's exit);
- :mod:`.orchestrator`: :func:`~.orchestrator.migrate`, the asyncio shell.

See docs/migration.md.
"""
