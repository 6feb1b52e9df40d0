"""Which CUDA GPU this machine has, asked of the driver directly (ctypes: no torch, no CUDA toolkit)."""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

# CUdevice_attribute values from the CUDA driver API (cuda.h).
_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR = 75, 76


@dataclass(frozen=True)
class Device:
    name: str
    compute_capability: str  # "9.0"


@functools.lru_cache(maxsize=None)
def cuda_device(index: int = 0) -> Device | None:
    """GPU `index` as the driver sees it (CUDA_VISIBLE_DEVICES applies), or None without one."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if (driver.cuInit(0) or driver.cuDeviceGetCount(ctypes.byref(count)) or count.value <= index
            or driver.cuDeviceGet(ctypes.byref(device), index)
            or driver.cuDeviceGetAttribute(ctypes.byref(major), _COMPUTE_CAPABILITY_MAJOR, device)
            or driver.cuDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_CAPABILITY_MINOR, device)
            or driver.cuDeviceGetName(name, len(name), device)):
        return None  # any driver error: no usable GPU
    return Device(name.value.decode(errors="replace"), f"{major.value}.{minor.value}")


def compute_capability() -> str | None:
    device = cuda_device()
    return device.compute_capability if device else None
