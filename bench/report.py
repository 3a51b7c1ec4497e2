"""Shared by the benchmarks: a description of the machine and the command, and BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from pathlib import Path

import psutil
import timm
import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device, threads: int) -> str:
    """CPU (and GPU), cores, torch/timm versions and torch threads, on one line."""
    cores = f"{os.cpu_count()} logical cores ({psutil.cpu_count(logical=False)} physical)"
    parts = [
        f"CPU {cpu_model()}, {cores}",
        f"torch {torch.__version__}",
        f"timm {timm.__version__}",
        f"torch threads {threads}",
    ]
    if device.type == "cuda":
        parts.insert(1, f"GPU {torch.cuda.get_device_name(device)}")
    return "; ".join(parts)


def command_line(module: str) -> str:
    """The command that ran this benchmark, as a user would type it."""
    return f"python -m {module} {' '.join(shlex.quote(arg) for arg in sys.argv[1:])}".strip()


def load_average() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace (or add) the section starting at ``heading`` in ``path``; other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    body = section.rstrip("\n") + "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _match: body + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)
