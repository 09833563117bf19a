"""Checkpoint sources: consistent incremental epochs of a running primary.

``colo``: qmpshadow is the secondary endpoint of QEMU's COLO protocol (needs KVM).
``shared_ram``: the primary's RAM is a shared file that qmpshadow scans (works under TCG).
Both yield :class:`~qmpshadow.source.epoch.CapturedEpoch`.
"""
