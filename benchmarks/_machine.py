"""The machine a benchmark ran on, for its report (one place for every script)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def _first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python and (when imported) torch with its intra-op threads."""
    mem = _first("/proc/meminfo", "MemTotal")
    info: dict[str, Any] = {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "ram_gib": int(mem.split()[0]) / 2**20 if mem else float("nan"),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """``CPU, N cores, X GiB RAM; OS; Python v[, torch v (T intra-op threads)]``."""
    mi = info or machine_info()
    line = f"CPU: {mi['cpu']}, {mi['cores']} cores, {mi['ram_gib']:.1f} GiB RAM; {mi['os']}; Python {mi['python']}"
    if "torch" in mi:
        line += f", torch {mi['torch']} ({mi['torch_threads']} intra-op threads)"
    return line


def other_cpu_busy(seconds: float = 3.0) -> float | None:
    """Fraction of all cores busy over ``seconds`` (from ``/proc/stat``), sampled while the caller is idle: how
    much other work the machine runs right now. The load average lags by minutes (a benchmark run just before
    still shows in it); this does not. ``None`` where ``/proc/stat`` is absent."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]), idle

    a = sample()
    time.sleep(seconds)
    b = sample()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])
