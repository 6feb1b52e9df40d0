"""`config.pbtxt` files, built as Triton's own protobuf message (`tritonclient`'s `model_config_pb2`)
and printed with protobuf's text format, so a field Triton does not have cannot be written.

Everything a config states about the model comes from the folder's manifest: tensor names, dims
and dtypes, and the batch profile (`max_batch_size` is never above the profile's maximum: Triton's
TensorRT backend refuses a plan whose profile is smaller than the config's batch).
"""
from __future__ import annotations

from pathlib import Path

from ..artifacts import atomic_write_text
from ..errors import InputError
from ..manifest import Manifest, TensorRecord
from .server import SERVE_EXTRA

DEFAULT_QUEUE_DELAY_US = 1000


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise InputError(f"writing Triton configs needs tritonclient: {SERVE_EXTRA}") from None
    return model_config_pb2


def data_type(dtype: str) -> int:
    pb = _pb()
    types = {"float32": pb.TYPE_FP32, "float16": pb.TYPE_FP16, "bfloat16": pb.TYPE_BF16, "int64": pb.TYPE_INT64,
             "int32": pb.TYPE_INT32, "bytes": pb.TYPE_STRING}
    if dtype not in types:
        raise InputError(f"no Triton data type for {dtype!r}")
    return types[dtype]


def tensor(record: TensorRecord, *, output: bool = False, labels: str | None = None):
    """A batched input or output: `dims` leave out the batch axis (Triton adds it)."""
    pb = _pb()
    message = (pb.ModelOutput if output else pb.ModelInput)(name=record.name, data_type=data_type(record.dtype),
                                                           dims=[int(d) for d in record.shape[1:]])
    if labels:
        message.label_filename = labels  # enables Triton's classification extension (class_count)
    return message


def model_config(name: str, inputs: list, outputs: list, *, max_batch_size: int, kind: str = "KIND_CPU",
                 instances: int = 1, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, platform: str | None = None,
                 backend: str | None = None, model_filename: str | None = None, parameters: dict | None = None):
    """One model. No preferred batch sizes: a size a single request never reaches would make every
    request wait the whole queue delay (docs/serving.md)."""
    pb = _pb()
    if instances < 1:
        raise InputError(f"instances must be ≥ 1, got {instances}")
    if queue_delay_us < 0:
        raise InputError(f"the queue delay must be ≥ 0 µs, got {queue_delay_us}")
    config = pb.ModelConfig(name=name, max_batch_size=max_batch_size, input=inputs, output=outputs)
    if platform:
        config.platform = platform
    if backend:
        config.backend = backend
    if model_filename:
        config.default_model_filename = model_filename
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=instances, kind=getattr(pb.ModelInstanceGroup, kind))
    config.version_policy.latest.num_versions = 1
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    return config


def model_tensors(manifest: Manifest, labels: str | None) -> tuple[list, list]:
    """The folder's input, and its outputs: the main one and a features folder's extra outputs
    (`image_positions`, `deepstack_features`), which an LLM runtime needs beside the features."""
    extra = [TensorRecord(t["name"], t["shape"], t["dtype"])
             for t in (manifest.features or {}).get("extra_outputs", [])]
    return [tensor(manifest.input)], [tensor(manifest.output, output=True, labels=labels),
                                      *(tensor(record, output=True) for record in extra)]


def to_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse(text: str):
    """Parse a config.pbtxt with Triton's message definition (raises text_format.ParseError)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())


def write(config, path: Path) -> Path:
    return atomic_write_text(path, to_text(config))
