"""One family of errors, split by who can fix them (the CLI maps each to an exit code).

- `InputError` (exit 2): bad input the caller can fix: a malformed schedule, an unknown model, an
  unusable checkpoint, an unwritable output, a wrong array shape, a corrupt or foreign folder.
- `BackendError` (exit 1): a backend failed on valid input (TensorRT's parser or builder, a
  deserialization, the plugin build); the message carries the backend's own words.
- `GateFailed` (exit 3): a parity gate failed; the message is the table of what failed.

Messages name the value ("checkpoint file 'x.pth' …"), never a CLI flag.
"""


class SaintError(Exception):
    """Base of every saint-export error."""


class InputError(SaintError, ValueError):
    """Bad input that the caller can fix."""


class BackendError(SaintError, RuntimeError):
    """A backend (ONNX Runtime, TensorRT, the plugin build) failed on valid input."""


class GateFailed(SaintError):
    """A parity gate failed; the message is the table of what failed. Nothing was written."""
