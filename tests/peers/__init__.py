"""Helpers that run the real peers (qemu-storage-daemon, a Linux guest under QEMU) for tests."""
