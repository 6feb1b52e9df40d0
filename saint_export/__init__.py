"""saint-export: SAINT token pruning as static-budget, exportable graph operations.

The package imports lazily: `import saint_export.runtime` (numpy plus ONNX Runtime or TensorRT)
never loads torch; the names below load their module (and torch) on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "apply": "patch", "record_kept": "patch", "KeptTokens": "patch",
    "KeepSchedule": "schedule", "ScheduleError": "schedule", "Calibration": "schedule",
    "ExportConfig": "config",
    "export": "pipeline", "calibrate": "pipeline", "resolve_schedule": "pipeline", "resolve_llm_schedule": "pipeline",
    "ExportResult": "pipeline",
    "Progress": "pipeline",
    "evaluate": "evaluate", "evaluate_folder": "evaluate", "Evaluation": "evaluate",
    "tune": "tune", "TuneResult": "tune", "Objective": "tune",
    "SaintError": "errors", "InputError": "errors", "BackendError": "errors", "GateFailed": "errors",
    "Manifest": "manifest",
    "TAU": "spec", "VOTE_K": "spec", "GAMMA": "spec", "LLM_TAU": "spec",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        # `tune` is a package that is called (saint_export/tune/__init__.py says why)
        value = module if name == "tune" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
