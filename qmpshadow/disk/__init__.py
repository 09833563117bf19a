"""Disk replication: dirty bitmaps + blockdev-backup into an NBD target (docs/disks.md)."""
