"""What the GPU report is measured on: the device, the library versions, and the device's
bf16 matmul rate (the yardstick of design.md's floor), as a markdown table.

    python -m benchmarks.gpu.environment
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

import torch

# design.md: one 28-step 1024x1024 Ovis-Image image, with guidance, is about 2.86 PFLOP.
OVIS_IMAGE_FLOP = 2.86e15
LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "huggingface-hub",
    "accelerate",
    "torchao",
    "fastapi",
    "sqlalchemy",
)


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def driver() -> str:
    """The NVIDIA driver's version, from nvidia-smi where there is one."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    try:
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"
    return answer.stdout.strip() or "?"


def rows() -> list[tuple[str, str]]:
    """(what, value) pairs for the table."""
    found = [
        ("date (UTC)", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")),
        ("host", f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs"),
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
    ]
    found += [(name, version(name)) for name in LIBRARIES]
    if not torch.cuda.is_available():
        found.append(("device", "CPU only: torch sees no CUDA GPU"))
        return found
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    found += [
        ("GPU", f"{props.name}, compute capability {props.major}.{props.minor}"),
        ("GPU memory", f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"),
        ("CUDA (torch's)", str(torch.version.cuda)),
        ("driver", driver()),
    ]
    try:
        from benchmarks.engine import measured_bf16_peak
    except ImportError as exc:  # the engine's libraries are missing: say so, go on
        found.append(("bf16 matmul", f"not measured: {exc}"))
        return found
    peak = measured_bf16_peak(device)
    if peak:
        floor = OVIS_IMAGE_FLOP / peak
        found += [
            ("bf16 matmul, measured", f"{peak / 1e12:.0f} TFLOP/s (8192^3, 10 runs)"),
            ("Ovis-Image floor", f"{floor:.2f} s per 1024x1024 28-step image (2.86 PFLOP)"),
        ]
    return found


def main() -> int:
    print("| what | value |")
    print("|---|---|")
    for what, value in rows():
        print(f"| {what} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
