"""The Triton Inference Server bundled in the `nvidia-pytriton` wheel, run as a subprocess.

That wheel ships a real `tritonserver` (2.51, the NGC 24.10 release) with only its Python backend.
We use the server binary alone (not PyTriton's Python API) and apply what it needs to start
outside PyTriton (docs/serving.md):

- the bundled shared libraries through `LD_LIBRARY_PATH` (PyTriton does the same);
- this interpreter's own libpython first on `LD_LIBRARY_PATH`, or the Python-backend stub loads
  the system's libpython against this interpreter's standard library;
- a backend folder holding the Python backend and the stub built for this Python version;
- this environment's `bin` first on `PATH` and its site folders on `PYTHONPATH`, so the stub's
  interpreter imports numpy, onnxruntime and saint_export from here.

The server runs in its own process group: `stop` signals it and, if anything of it is still alive
after the grace period, kills the whole group, so no stub process outlives it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError, InputError

SERVE_EXTRA = "pip install 'saint-export[serve]'"
BUNDLED_VERSION = "2.51"  # the server in nvidia-pytriton 0.7 (NGC release 24.10)
BACKEND_MISSING = "unable to find backend library"  # how Triton reports a backend it does not have
EXIT_TIMEOUT_S = 5  # how long Triton waits for in-flight requests after SIGTERM


@dataclass(frozen=True)
class Distribution:
    """Where the bundled server's files are."""
    root: Path  # pytriton/tritonserver: bin/, backends/python/, caches/, python_backend_stubs/
    libraries: Path  # nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    def stub(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise InputError(f"the bundled Triton has no Python-backend stub for Python {version} (it has "
                             f"{', '.join(sorted(p.name for p in (self.root / 'python_backend_stubs').iterdir()))})")
        return stub


def distribution() -> Distribution:
    """The bundled Triton server, found without importing PyTriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"serving needs the Triton server from nvidia-pytriton: {SERVE_EXTRA}")
    package = Path(list(spec.submodule_search_locations)[0])
    found = Distribution(package / "tritonserver", package.parent / "nvidia_pytriton.libs")
    if not found.binary.is_file():
        raise InputError(f"nvidia-pytriton at {package} has no tritonserver binary; reinstall it ({SERVE_EXTRA})")
    return found


def server_environment(dist: Distribution) -> dict:
    env = dict(os.environ)
    libraries = [str(dist.libraries)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libraries.insert(0, sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    package_parent = str(Path(__file__).resolve().parents[2])  # where saint_export is imported from
    paths = [package_parent, *site.getsitepackages()]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise InputError(f"{what} port {port} on {host} is not available ({err.strerror})") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Error lines a GPU-less host always logs, whatever happens next.
HARMLESS = ("CudaDriverHelper has not been initialized", "Unable to allocate pinned system memory")


def log_errors(log: str) -> list[str]:
    """Triton's error lines (glog 'E' lines), without their prefix, plus its final 'error:' line."""
    found = []
    for line in log.splitlines():
        match = re.match(r"E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] (.*)", line)
        if match:
            # Triton quotes its messages; a stub's Python error carries its traceback after "\n".
            found.append(match.group(1).strip().strip('"').split("\\n")[0].strip())
        elif line.startswith("error: "):
            found.append(line[len("error: "):].strip())
    return [line for line in found if not line.startswith(HARMLESS)]


class TritonServer:
    """`with TritonServer(repository, http_port=…) as server:` starts the server, waits until it is
    ready, and stops it (SIGTERM, then the whole process group) on exit."""

    def __init__(self, repository: Path, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, extra_args: tuple[str, ...] = ()):
        self.repository = Path(repository).absolute()
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self._workspace: Path | None = None

    @property
    def log_path(self) -> Path:
        return self._workspace / "tritonserver.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def command(self, backends: Path, dist: Distribution) -> list[str]:
        return [str(dist.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                f"--cache-directory={dist.root / 'caches'}", f"--http-address={self.host}",
                f"--http-port={self.http_port}", f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--disable-auto-complete-config", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
                "--metrics-config=summary_latencies=true", *self.extra_args]

    def start(self, timeout: float = 180.0) -> "TritonServer":
        dist = distribution()
        for port, what in ((self.http_port, "HTTP"), (self.grpc_port, "gRPC"), (self.metrics_port, "metrics")):
            check_port_free(self.host, port, what)
        self._workspace = Path(tempfile.mkdtemp(prefix="saint-triton-"))
        backends = python_backend_folder(self._workspace, dist)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(backends, dist), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_environment(dist),
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not self.ready():
                if self.process.poll() is not None:
                    errors = log_errors(self.log())
                    raise BackendError(f"Triton stopped while starting (exit {self.process.returncode}): "
                                       f"{errors[0] if errors else 'see its log'}")
                if time.monotonic() > deadline:
                    raise BackendError(f"Triton was not ready after {timeout:.0f} s")
                time.sleep(0.2)
        except BaseException:  # a failure, Ctrl-C or SIGTERM while starting: leave nothing running
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        try:
            with urllib.request.urlopen(f"http://{host}:{self.http_port}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace: float = 12.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then kill what is left of the process group."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # stubs, if any outlived the server
            self.process.wait()
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None
        return self.process.returncode if self.process else None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def python_backend_folder(workspace: Path, dist: Distribution) -> Path:
    """A backend folder with the bundled Python backend and the stub for this Python version."""
    python = workspace / "backends" / "python"
    python.mkdir(parents=True)
    for item in (dist.root / "backends" / "python").iterdir():
        if item.is_file():
            (python / item.name).symlink_to(item)
    (python / "triton_python_backend_stub").symlink_to(dist.stub())
    return python.parent


def check_repository(repository: Path, config_name: str | None = None, timeout: float = 60.0) -> dict[str, str]:
    """Run the bundled server's own configuration checks over a model repository (no model is
    served). Returns model → outcome, where the outcome is "ready", the backend-lookup failure that
    a machine without that backend gives for a valid config, or Triton's rejection."""
    dist = distribution()
    with tempfile.TemporaryDirectory(prefix="saint-triton-check-") as workspace:
        backends = python_backend_folder(Path(workspace), dist)
        server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                              extra_args=("--exit-on-error=true", "--model-control-mode=none",
                                          *([f"--model-config-name={config_name}"] if config_name else [])))
        command = server.command(backends, dist)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                    env=server_environment(dist))
        except subprocess.TimeoutExpired:
            raise BackendError(f"Triton's check of {repository} did not finish in {timeout:.0f} s") from None
    outcomes = {}
    for message in log_errors(result.stdout + result.stderr):
        poll = re.match(r"Poll failed for model directory '([^']+)': (.*)", message)
        load = re.match(r"failed to load '([^']+)'(?: version \d+)?: (.*)", message)
        if poll or load:
            outcomes[(poll or load).group(1)] = (poll or load).group(2)
    return outcomes
