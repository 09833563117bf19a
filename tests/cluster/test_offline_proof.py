"""When a report that the shadow's connection is gone lets a fenced primary resume
(sans-I/O, fake clock).

Found on real QEMU (test_partition.py::test_primary_host_cut_off, 1 run in ~8): the
primary's host was cut off, it fenced itself, the shadow promoted at the lease end and its
agent then closed its broker connection with ``online: false``. That status reached the old
primary's agent when the network came back, 0.2 s after its lease end: it counted as "the
shadow died before it could promote" and the old primary resumed, next to the promoted
copy, until the new generation's lease arrived 18 ms later.
"""

from __future__ import annotations

from qmpshadow.cluster.lease import (
    AckReceived,
    ClusterTiming,
    PathKind,
    ResumePrimary,
    SendRenewal,
    ShadowOffline,
    ShadowOnline,
    SourceLease,
    SourceState,
    StopConfirmed,
    StopPrimary,
    Tick,
)

T = ClusterTiming()


def fenced() -> SourceLease:
    """Protected with acknowledged renewals, then cut off: fenced at the soft deadline."""
    sm = SourceLease(T, generation=1, session="s1", now=0.0)
    sm.handle(ShadowOnline(now=0.0, conn="c1", generation=1))
    now = 0.0
    for _ in range(5):
        now += T.heartbeat
        for a in sm.handle(Tick(now=now)):
            if isinstance(a, SendRenewal):
                sm.handle(AckReceived(now=now, seq=a.seq, generation=1, path=PathKind.LINK,
                                      session="s1"))
    acts = sm.handle(Tick(now=sm.soft_deadline))
    assert any(isinstance(a, StopPrimary) for a in acts)
    sm.handle(StopConfirmed(now=sm.soft_deadline + 0.01))
    assert sm.state is SourceState.FENCED
    return sm


def test_gone_after_the_lease_end_proves_nothing() -> None:
    sm = fenced()
    # the shadow may have promoted at the lease end and closed (or crashed) just after
    acts = sm.handle(ShadowOffline(now=sm.lease_end + 0.2, conn="c1", generation=1))
    assert not [a for a in acts if isinstance(a, ResumePrimary)]
    assert sm.state is SourceState.FENCED


def test_gone_before_the_lease_end_resumes_unprotected() -> None:
    sm = fenced()
    acts = sm.handle(ShadowOffline(now=sm.lease_end - 0.05, conn="c1", generation=1))
    assert any(isinstance(a, ResumePrimary) for a in acts)
    assert sm.state is SourceState.UNPROTECTED


def test_a_promoted_shadows_goodbye_deposes() -> None:
    sm = fenced()
    acts = sm.handle(ShadowOffline(now=sm.lease_end - 0.05, conn="c1", generation=2))
    assert not [a for a in acts if isinstance(a, ResumePrimary)]
    assert sm.state is SourceState.DEPOSED
