"""The source lease machine during a planned switchover (sans-I/O, fake clock).

A switchover stops the primary at its final epoch (HandoverStarted), then either releases
the lease once the shadow committed that epoch (HandoverCommitted) or aborts
(HandoverAborted). While it is in progress nothing may resume the primary and nothing may
kill it; after the release the machine is terminal.
"""

from __future__ import annotations

from qmpshadow.cluster.lease import (
    AckReceived,
    Action,
    AnnounceRelease,
    ClusterTiming,
    EndProtection,
    FencerSafe,
    GenerationSeen,
    HandoverAborted,
    HandoverCommitted,
    HandoverStarted,
    KillPrimary,
    PathKind,
    PrimaryExited,
    ResumePrimary,
    SendRenewal,
    ShadowOffline,
    ShadowOnline,
    SourceLease,
    SourceState,
    StopPrimary,
    Tick,
)

T = ClusterTiming()  # heartbeat 100 ms, lease 4000 ms


def _protected() -> tuple[SourceLease, float]:
    sm = SourceLease(T, generation=3, session="s1", now=0.0)
    sm.handle(ShadowOnline(now=0.0, conn="c1", generation=3))
    assert sm.state is SourceState.PROTECTED
    now = 0.0
    for _ in range(5):  # renewals acknowledged: the lease is valid
        now += T.heartbeat
        acts = sm.handle(Tick(now=now))
        for a in acts:
            if isinstance(a, SendRenewal):
                sm.handle(AckReceived(now=now, seq=a.seq, generation=3, path=PathKind.LINK,
                                      session="s1"))
    return sm, now


def _renew_and_ack(sm: SourceLease, start: float, seconds: float) -> list[Action]:
    """Ticks every heartbeat for ``seconds``, acknowledging each renewal at once."""
    out: list[Action] = []
    now = start
    while now < start + seconds:
        now += T.heartbeat
        for a in sm.handle(Tick(now=now)):
            out.append(a)
            if isinstance(a, SendRenewal):
                out += sm.handle(AckReceived(now=now, seq=a.seq, generation=sm.generation,
                                             path=PathKind.BROKER, session="s1"))
    return out


def test_handover_stops_for_good_until_released() -> None:
    sm, now = _protected()
    acts = sm.handle(HandoverStarted(now=now))
    assert sm.state is SourceState.FENCED and sm.handover
    assert any(isinstance(a, FencerSafe) for a in acts)
    # acks keep coming (renewals go on, naming the shadow) but never resume the primary,
    # and no reacquire timeout kills it, however long the final epoch takes
    acts = _renew_and_ack(sm, now, 3 * T.reacquire)
    assert any(isinstance(a, SendRenewal) and a.named == "c1" for a in acts)
    assert not [a for a in acts if isinstance(a, (ResumePrimary, KillPrimary, StopPrimary))]
    assert sm.state is SourceState.FENCED and not sm.may_run()
    # a clean end of protection does not interfere with a switchover in progress
    assert sm.handle(EndProtection(now=now)) == [] and not sm.ending
    acts = sm.handle(HandoverCommitted(now=now + 1))
    assert sm.state is SourceState.RELEASED
    rel = [a for a in acts if isinstance(a, AnnounceRelease)]
    assert rel and rel[0].generation == 3 and "switchover" in rel[0].reason
    # terminal: nothing brings the primary back
    assert sm.handle(AckReceived(now=now + 2, seq=sm.seq, generation=3, path=PathKind.LINK,
                                 session="s1")) == []
    assert sm.handle(PrimaryExited(now=now + 3)) == []
    assert sm.handle(Tick(now=now + 100)) == []


def test_handover_aborted_resumes_only_on_a_fresh_ack() -> None:
    sm, now = _protected()
    sm.handle(HandoverStarted(now=now))
    old_seq = sm.seq
    now += 1.0
    sm.handle(HandoverAborted(now=now, reason="no commit"))
    assert sm.state is SourceState.FENCED and not sm.handover
    # an ack of a renewal sent before the abort does not give the lease back
    assert not [a for a in sm.handle(AckReceived(now=now, seq=old_seq, generation=3,
                                                 path=PathKind.LINK, session="s1"))
                if isinstance(a, ResumePrimary)]
    acts = _renew_and_ack(sm, now, 0.5)
    assert any(isinstance(a, ResumePrimary) for a in acts)
    assert sm.state is SourceState.PROTECTED and sm.may_run()


def test_handover_aborted_without_acks_hands_over_after_reacquire() -> None:
    sm, now = _protected()
    sm.handle(HandoverStarted(now=now))
    sm.handle(HandoverAborted(now=now))
    acts: list[Action] = []
    t = now
    while t < now + T.reacquire + 1:
        t += T.heartbeat
        acts += sm.handle(Tick(now=t))
    assert any(isinstance(a, KillPrimary) for a in acts)
    assert not any(isinstance(a, ResumePrimary) for a in acts)


def test_newer_generation_during_handover_deposes_without_resume() -> None:
    sm, now = _protected()
    sm.handle(HandoverStarted(now=now))
    acts = sm.handle(GenerationSeen(now=now, generation=4, what="lease of x"))
    assert sm.state is SourceState.DEPOSED
    assert not [a for a in acts if isinstance(a, (ResumePrimary, AnnounceRelease))]
    assert sm.handle(HandoverCommitted(now=now)) == []  # never releases a lease not ours


def test_shadow_gone_during_handover_then_abort_resumes_unprotected() -> None:
    sm, now = _protected()
    sm.handle(HandoverStarted(now=now))
    # the broker's last will for the named connection arrives in time
    acts = sm.handle(ShadowOffline(now=now + 0.1, conn="c1"))
    assert not [a for a in acts if isinstance(a, ResumePrimary)]
    assert sm.state is SourceState.FENCED
    acts = sm.handle(HandoverAborted(now=now + 0.2))
    assert any(isinstance(a, ResumePrimary) for a in acts)
    assert sm.state is SourceState.UNPROTECTED


def test_handover_refused_unless_protected() -> None:
    sm = SourceLease(T, generation=1, session="s1", now=0.0)
    assert sm.handle(HandoverStarted(now=0.0)) == []
    assert sm.state is SourceState.UNPROTECTED and not sm.handover
    assert sm.handle(HandoverCommitted(now=0.0)) == []
