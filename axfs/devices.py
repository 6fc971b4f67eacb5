"""What the machine has: the CPU and, through NVML where there is one, NVIDIA GPUs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Gpu:
    index: int
    name: str
    memory_used: int
    memory_total: int
    utilisation: int
    temperature: int | None
    power_watts: float | None


def cpu_lines() -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = mem_avail = 0
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        mem_total = int(info["MemTotal"].split()[0]) * 1024
        mem_avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    load1, _, _ = os.getloadavg()
    return [
        f"cpu0.name: {model}",
        f"cpu0.cores: {os.cpu_count() or 0}",
        f"cpu0.memory_total: {mem_total // (1 << 20)} MiB",
        f"cpu0.memory_available: {mem_avail // (1 << 20)} MiB",
        f"cpu0.load_1min: {load1:.2f}",
    ]


def gpus() -> tuple[list[Gpu], str]:
    """The NVIDIA GPUs NVML sees, and a word on why there are none when there are none."""
    try:
        import pynvml
    except ImportError:
        return [], "nvml not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return [], f"nvml unavailable ({e})"
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            try:
                temp: int | None = pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
            except pynvml.NVMLError:
                temp = None
            try:
                power: float | None = pynvml.nvmlDeviceGetPowerUsage(h) / 1000
            except pynvml.NVMLError:
                power = None
            found.append(Gpu(i, name if isinstance(name, str) else name.decode(),
                             int(mem.used), int(mem.total), int(util.gpu), temp, power))
        return found, "ok"
    except pynvml.NVMLError as e:
        return [], f"nvml error ({e})"
    finally:
        pynvml.nvmlShutdown()


def render() -> str:
    lines = cpu_lines()
    found, why = gpus()
    for g in found:
        lines += [
            f"gpu{g.index}.name: {g.name}",
            f"gpu{g.index}.memory_used: {g.memory_used // (1 << 20)} MiB",
            f"gpu{g.index}.memory_total: {g.memory_total // (1 << 20)} MiB",
            f"gpu{g.index}.utilisation: {g.utilisation} %",
        ]
        if g.temperature is not None:
            lines.append(f"gpu{g.index}.temperature: {g.temperature} C")
        if g.power_watts is not None:
            lines.append(f"gpu{g.index}.power: {g.power_watts:.1f} W")
    if not found:
        lines.append(f"gpus: none ({why})")
    return "\n".join(lines) + "\n"
