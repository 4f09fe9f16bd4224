"""This process's memory, for tests and benchmarks that check host memory stays bounded and flat."""

from __future__ import annotations


def rss_bytes() -> int:
    """The resident set (``VmRSS``) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS (Linux only)")
