"""tests/rdma: the RDMA transport, tested for real on soft-RoCE inside a QEMU guest.

On the host, pytest collects ``test_unavailable.py`` (no RDMA needed) and
``test_in_guest.py``, which records epochs from a real primary, boots the soft-RoCE guest
(qemu-scripts/rdma-guest) and runs ``tests/rdma/guest/`` plus the conformance suite's rdma
case inside it. ``tests/rdma/guest/`` is collected only inside that guest
(``QMPSHADOW_IN_RDMA_GUEST=1``, set by the guest's runner), so the host never imports
pyverbs for it.
"""

from __future__ import annotations

import os

IN_GUEST = os.environ.get("QMPSHADOW_IN_RDMA_GUEST") == "1"

collect_ignore = ["test_in_guest.py"] if IN_GUEST else ["guest"]
