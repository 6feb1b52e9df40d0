"""Serving exported folders with Triton Inference Server (docs/serving.md).

    from saint_export import serving
    serving.write_repository("engines/vit_b16-early50", "triton-repo")   # for an NGC Triton container
    with serving.Service("engines/vit_b16-early50", http_port=8000) as service:   # serve it here
        ...                                  # HTTP/gRPC on service.http_url / service.grpc_url

`Service` runs the Triton server bundled in nvidia-pytriton (`pip install 'saint-export[serve]'`)
with Python-backend models that call `saint_export.runtime`. It refuses a corrupt or unverified
folder before anything starts.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError
from ..runtime import BACKENDS, check_engine, check_folder
from . import configs
from .repository import DEFAULT_TOP_K, Repository, write_repository, write_serving_repository
from .server import TritonServer, check_repository, free_port

__all__ = ["Service", "describe", "write_repository", "check_repository", "Repository", "TritonServer", "free_port"]


class Service:
    """An exported folder served on Triton: `with Service(folder) as service:` returns once the
    models are ready, and stops the server (no process left) when the block ends."""

    def __init__(self, folder, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, model_name: str = "saint", instances: int = 1,
                 queue_delay_us: int = configs.DEFAULT_QUEUE_DELAY_US, backend: str = "auto",
                 allow_unverified: bool = False, threads: int | None = None, top_k: int = DEFAULT_TOP_K):
        self.folder = Path(folder)
        self.manifest = check_folder(self.folder, allow_unverified)
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        if backend == "tensorrt":  # refused here in one line rather than by the model inside the server
            check_engine(self.folder, self.manifest)
        self.model_name, self.host = model_name, host
        self._options = dict(model_name=model_name, instances=instances, queue_delay_us=queue_delay_us,
                             backend=backend, allow_unverified=allow_unverified, threads=threads, top_k=top_k)
        self.server = TritonServer(Path("."), host=host, http_port=http_port, grpc_port=grpc_port,
                                   metrics_port=metrics_port)
        self.repository: Repository | None = None

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.server.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.server.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.server.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def backend(self) -> str:
        """The runtime backend the served model chose (from its log line)."""
        found = re.findall(r"saint-export: serving .* on ([\w-]+)", self.server.log())
        return found[-1] if found else "unknown"

    def start(self, timeout: float = 180.0) -> "Service":
        folder = Path(tempfile.mkdtemp(prefix="saint-serve-"))
        try:
            self.repository = write_serving_repository(self.folder, folder / "models", self.manifest,
                                                       **self._options)
            self.server.repository = self.repository.path
            self.server.start(timeout)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return self

    def stop(self) -> int | None:
        code = self.server.stop()
        if self.repository is not None:
            shutil.rmtree(self.repository.path.parent, ignore_errors=True)
        return code

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def describe(service: Service) -> str:
    """What `saint-export serve` prints once the models are ready: endpoints and a client example."""
    m, name = service.manifest, service.model_name
    shape = ", ".join(map(str, m.input.shape[1:]))
    return "\n".join([
        f"ready: serving {service.folder} ({m.model['name']}, {m.keep_schedule['spec']}) on Triton with "
        f"{service.backend}, batches up to {m.batch[2]}",
        f"  HTTP     http://{service.http_url}   (/v2/health/ready, /v2/models/{name}, /v2/models/{name}/stats)",
        f"  gRPC     {service.grpc_url}",
        f"  metrics  {service.metrics_url}",
        f"  models   {name}: {m.input.name} FP32 [batch, {shape}] → {m.output.name} FP32; "
        f"{name}_images: images BYTES [batch, 1] (JPEG/PNG) → class_ids, scores, labels",
        "example:",
        "  import numpy as np, tritonclient.http as httpclient",
        f"  client = httpclient.InferenceServerClient(\"{service.http_url}\")",
        f"  x = np.zeros((1, {shape}), np.float32)",
        f"  request = httpclient.InferInput(\"{m.input.name}\", x.shape, \"FP32\")",
        "  request.set_data_from_numpy(x)",
        f"  logits = client.infer(\"{name}\", [request]).as_numpy(\"{m.output.name}\")",
        "Ctrl-C or SIGTERM stops the server."])
