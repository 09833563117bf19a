"""qemu."""
