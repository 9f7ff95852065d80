"""What this machine can run: NVIDIA GPUs, Apple Silicon, CPU cores and RAM, installed backend libraries.

Detection never imports a backend library (``importlib.util.find_spec`` only), never needs root, and
degrades to "not found" rather than failing: a volunteer with a broken driver still gets the CPU backend.
These facts stay on this machine; they only pick the backend and model.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    driver: str = ""


@dataclass(frozen=True)
class HardwareFacts:
    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, arm64, aarch64
    cpu_count: int  # cores this process may use
    ram_total_gb: float
    ram_available_gb: float
    gpus: tuple[GPU, ...] = ()
    apple_silicon: bool = False
    gpu_source: str = ""  # how GPUs were found (pynvml / nvidia-smi), or why not
    backends_installed: dict[str, bool] = field(default_factory=dict)

    @property
    def gpu_memory_gb(self) -> float:
        # vLLM runs one model per GPU here: the largest GPU decides what fits.
        return max((g.memory_gb for g in self.gpus), default=0.0)

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["gpu_memory_gb"] = self.gpu_memory_gb
        return data


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _meminfo(path: Path = Path("/proc/meminfo")) -> tuple[float, float] | None:
    """(total, available) in GiB from /proc/meminfo (Linux)."""
    try:
        fields = {}
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
        return fields["MemTotal"] / GIB, fields.get("MemAvailable", fields["MemTotal"]) / GIB
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _sysctl_int(name: str) -> int | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True)
        return int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _ram() -> tuple[float, float]:
    info = _meminfo()
    if info:
        return info
    total = _sysctl_int("hw.memsize")  # macOS
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 0
    return total / GIB, total / GIB


def _gpus_pynvml() -> tuple[GPU, ...] | None:
    if importlib.util.find_spec("pynvml") is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else name
                total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
                gpus.append(GPU(name=name, memory_gb=round(total / GIB, 1), driver=driver))
            return tuple(gpus)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # a missing or broken driver must not stop a CPU volunteer
        return None


def parse_nvidia_smi(output: str) -> tuple[GPU, ...]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits``."""
    gpus = []
    for line in output.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2:
            continue
        try:
            mib = float(parts[1])
        except ValueError:
            continue
        gpus.append(GPU(name=parts[0], memory_gb=round(mib / 1024, 1), driver=parts[2] if len(parts) > 2 else ""))
    return tuple(gpus)


def _gpus_nvidia_smi() -> tuple[GPU, ...] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(out.stdout)


def installed_backends() -> dict[str, bool]:
    from annotator.backends import BACKEND_MODULES

    return {name: importlib.util.find_spec(module) is not None for name, module in BACKEND_MODULES.items()}


def detect() -> HardwareFacts:
    system, machine = platform.system(), platform.machine()
    total, available = _ram()
    gpus = _gpus_pynvml()
    source = "pynvml"
    if gpus is None:
        gpus = _gpus_nvidia_smi()
        source = "nvidia-smi"
    if gpus is None:
        gpus, source = (), "no NVIDIA driver found (no pynvml, no nvidia-smi)"
    elif not gpus:
        source += ": no GPU listed"
    return HardwareFacts(
        system=system,
        machine=machine,
        cpu_count=_cpu_count(),
        ram_total_gb=round(total, 1),
        ram_available_gb=round(available, 1),
        gpus=gpus,
        apple_silicon=system == "Darwin" and machine == "arm64",
        gpu_source=source,
        backends_installed=installed_backends(),
    )
