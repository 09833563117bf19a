"""qmpshadow: shadow replicas, failover and live migration for raw QEMU over QMP."""

__version__ = "0.1.0"
