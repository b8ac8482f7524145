"""What the search ran on, for the profile."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import jax


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if
                line.startswith("model name")), platform.processor() or platform.machine())
    return {"platform": dev.platform, "kind": dev.device_kind, "cpu": cpu, "cores": os.cpu_count()}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []
