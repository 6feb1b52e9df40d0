"""saint-export: SAINT token pruning as static-budget, exportable graph operations."""
from ._compat import import_torchvision

import_torchvision()

from . import ops  # noqa: E402  (registers torch.ops.saint.similarity_topk)
from .core import GAMMA, TAU, VOTE_K  # noqa: E402
from .errors import SaintError  # noqa: E402
from .patch import apply, record_kept  # noqa: E402
from .schedule import KeepSchedule, ScheduleError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["apply", "record_kept", "KeepSchedule", "ScheduleError", "SaintError", "TAU", "VOTE_K", "GAMMA",
           "ops", "__version__"]
