"""Hardware and software tags for manifests and benchmark rows.

``hardware_info()`` is everything worth recording; ``hardware_fingerprint()`` hashes only the
fields that identify a machine *class* (no hostname, free memory or timestamps), so the same
draft benchmarked on another GPU gets a new cache key while reruns on the same box do not.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from importlib import metadata
from typing import Any

from storage.keys import REPO_ROOT, digest

STABLE_FIELDS = ("device_type", "gpu_name", "gpu_count", "gpu_mem_gb", "compute_capability",
                 "cpu_model", "cpu_count", "torch", "transformers", "dtype")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_mem_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        return round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return 0.0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.lru_cache(maxsize=4)
def hardware_info(dtype: str | None = None) -> dict[str, Any]:
    """Device, host and software tags. torch is imported lazily (storage knows no models)."""
    info: dict[str, Any] = {
        "device_type": "cpu", "gpu_name": None, "gpu_count": 0, "gpu_mem_gb": None,
        "compute_capability": None, "driver": None, "cuda_runtime": None,
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count() or 0, "host_mem_gb": _host_mem_gb(),
        "python": platform.python_version(), "torch": _version("torch"),
        "transformers": _version("transformers"), "package_version": _version("dflash-pipeline"),
        "git_sha": git_sha(), "dtype": dtype or "float32",
    }
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device_type="cuda", gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                        gpu_mem_gb=round(props.total_memory / 2**30, 1),
                        compute_capability=f"{props.major}.{props.minor}",
                        cuda_runtime=torch.version.cuda, driver=_nvidia_driver(),
                        dtype=dtype or "bfloat16")
    except ImportError:
        pass
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware_fingerprint(info: dict[str, Any] | None = None) -> str:
    info = info or hardware_info()
    return digest({k: info.get(k) for k in STABLE_FIELDS})[:16]


def hardware_tag(info: dict[str, Any] | None = None) -> str:
    """A short, path- and key-safe name of the device: ``nvidia-h200-x1`` or ``cpu-<model>-2c``."""
    info = info or hardware_info()
    if info["device_type"] == "cuda":
        name = f"{info['gpu_name']}-x{info['gpu_count']}"
    else:
        name = f"cpu-{info['cpu_model']}-{info['cpu_count']}c"
    return slug(name)


def slug(text: str, max_len: int = 60) -> str:
    """Lowercase letters, digits and dashes only (Prefect artifact keys, hive partitions)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].strip("-") or "unknown"
