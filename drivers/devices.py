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


def free_gpu_memory() -> list[tuple[int, int]]:
    """(NVML index, free bytes) of each NVIDIA GPU; [] without NVML or a GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        return [(i, int(pynvml.nvmlDeviceGetMemoryInfo(
                    pynvml.nvmlDeviceGetHandleByIndex(i)).free))
                for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError as e:
        log.warning("nvml could not read GPU memory: %s", e)
        return []
    finally:
        pynvml.nvmlShutdown()


def plan_gpu_layers(layers: int, model_bytes: int, kv_bytes: int, free_bytes: int,
                    reserve_bytes: int = 512 << 20) -> int:
    """How many of a model's ``layers`` repeating layers to offload to a GPU with
    ``free_bytes`` free, keeping ``reserve_bytes`` for llama.cpp's compute buffers and
    the CUDA context; llama.cpp's ``n_gpu_layers``.

    The estimate: the weights (``model_bytes``, the file's size will do) are split in
    ``layers + 1`` equal shares, one a layer and one for the token embedding and the
    output head; each offloaded layer also holds its part of the KV cache
    (``kv_bytes / layers``). When everything fits, the answer is ``layers + 1``: every
    layer and the output (llama.cpp's "all"); else as many layers as fit, the output
    staying on the CPU; 0 when not even one does.
    """
    if layers <= 0:
        return 0
    budget = free_bytes - reserve_bytes
    if model_bytes + kv_bytes <= budget:
        return layers + 1
    per_layer = model_bytes / (layers + 1) + kv_bytes / layers
    if per_layer <= 0:  # nothing to place, and not even the reserve fits
        return 0
    return max(0, min(layers, int(budget // per_layer)))


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
