"""Runners: one interface (`infer`, `close`, context manager) over ONNX Runtime and TensorRT.

The base class owns what every backend shares: checking the input against the manifest,
splitting batches above the profile's maximum, and closing. Subclasses implement `_run` for one
batch that fits the profile, and must be safe to call from many threads at once.
"""
from __future__ import annotations

import queue
from pathlib import Path

import numpy as np

from ..errors import BackendError, InputError
from ..manifest import TensorRecord


class Runner:
    backend = "?"

    def __init__(self, path: Path, input: TensorRecord, output: TensorRecord, max_batch: int):
        self.path = Path(path)  # the model or engine file
        self.input_name, self.output_name = input.name, output.name
        self.image_shape = tuple(input.shape[1:])  # (3, H, W)
        self.max_batch = max_batch
        self.extra_output_names: tuple[str, ...] = ()  # a features folder's other outputs (runtime.open sets them)
        self.notes: list[str] = []  # why this backend (what auto skipped)
        self.folder, self.manifest = None, None  # set by runtime.open
        self._closed = False

    def infer(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [B, 3, H, W] → logits float32 [B, classes] (a features folder: its main output);
        batches above the profile's maximum are split and the results concatenated."""
        return self._batched(pixel_values, lambda part: [self._run(part)])[0]

    def infer_all(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Every output by name: the main one and a features folder's extra outputs (the
        manifest's `features.extra_outputs`: `image_positions`, Qwen3-VL's `deepstack_features`),
        which an LLM runtime needs beside the features."""
        names = (self.output_name, *self.extra_output_names)
        return dict(zip(names, self._batched(pixel_values, lambda part: self._run_all(part, names))))

    def _batched(self, pixel_values: np.ndarray, run) -> list[np.ndarray]:
        if self._closed:
            raise InputError("this runner is closed")
        x = self._check(pixel_values)
        parts = [run(x[start:start + self.max_batch]) for start in range(0, len(x), self.max_batch)]
        return parts[0] if len(parts) == 1 else [np.concatenate(column) for column in zip(*parts)]

    def _check(self, x) -> np.ndarray:
        expected = f"[batch, {', '.join(map(str, self.image_shape))}]"
        if not isinstance(x, np.ndarray):
            raise InputError(f"{self.input_name} must be a numpy array {expected}, got {type(x).__name__}")
        if x.dtype != np.float32:
            raise InputError(f"{self.input_name} must be float32, got {x.dtype} (convert with .astype(np.float32))")
        if x.ndim != 4:
            raise InputError(f"{self.input_name} must have rank 4 {expected}, got rank {x.ndim} {list(x.shape)}")
        if tuple(x.shape[1:]) != self.image_shape or x.shape[0] < 1:
            raise InputError(f"{self.input_name} must be {expected} with batch ≥ 1, got {list(x.shape)}")
        return np.ascontiguousarray(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _run_all(self, x: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend} {self.path}>"


class OrtRunner(Runner):
    """ONNX Runtime. One session serves every thread: `InferenceSession.run` is thread-safe
    (onnxruntime's threading documentation), and one session keeps one copy of the weights."""

    def __init__(self, path: Path, input: TensorRecord, output: TensorRecord, max_batch: int, device: str = "auto",
                 threads: int | None = None):
        super().__init__(path, input, output, max_batch)
        import onnxruntime as ort

        available = ort.get_available_providers()
        from ..gpu import cuda_device

        want_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available
                                         and cuda_device() is not None)
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise InputError(f"backend onnxruntime-cuda needs onnxruntime-gpu; this ONNX Runtime offers "
                             f"{', '.join(available)}")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        self.session = ort_session(self.path, providers, threads)
        active = self.session.get_providers()
        # onnxruntime-gpu falls back to the CPU silently when CUDA libraries are missing: ask the session.
        if want_cuda and active[0] != "CUDAExecutionProvider":
            if device == "cuda":
                raise BackendError(f"ONNX Runtime could not start CUDA (active providers: {', '.join(active)})")
            self.notes.append(f"ONNX Runtime CUDA not used: the session fell back to {', '.join(active)}")
        self.backend = "onnxruntime-cuda" if active[0] == "CUDAExecutionProvider" else "onnxruntime-cpu"

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def _run_all(self, x: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        return self.session.run(list(names), {self.input_name: x})

    def close(self) -> None:
        self.session = None
        super().close()


def ort_session(path: Path, providers: list[str] | None = None, threads: int | None = None):
    """An ONNX Runtime session that reports a failure in one line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types, with the reason in the text
        raise BackendError(f"ONNX Runtime could not load {Path(path).name}: {str(err).strip().splitlines()[0]}") \
            from None


class TrtRunner(Runner):
    """TensorRT or TensorRT-RTX with a pool of execution contexts (a context serves one call at a
    time; the engine and its weights are shared). Device memory through Polygraphy's CUDA
    wrapper (ctypes over the CUDA runtime, no torch). Every output is bound, in the engine's dtypes;
    `infer_all` returns a features engine's extra outputs too.

    Not yet run anywhere: no machine available to this project has had both TensorRT and a GPU."""

    def __init__(self, path: Path, input: TensorRecord, output: TensorRecord, max_batch: int, backend,
                 plugin_library: Path | None, contexts: int = 2):
        super().__init__(path, input, output, max_batch)
        from polygraphy import cuda

        from ..trt.backend import load_plugin, make_logger

        self._cuda = cuda
        trt = backend.module
        if plugin_library is not None:
            load_plugin(backend, plugin_library)
        logger = make_logger(trt)
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendError(f"{backend.name} could not deserialize {self.path.name}: "
                               f"{'; '.join(logger.errors)[:500]}")
        self.backend = backend.name
        self._check_io(input, output)
        self._trt_nptype = trt.nptype
        self._outputs = [name for name in map(self.engine.get_tensor_name, range(self.engine.num_io_tensors))
                         if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT]
        self._pool: queue.Queue = queue.Queue()
        for _ in range(max(1, contexts)):
            self._pool.put((self.engine.create_execution_context(), cuda.Stream()))

    def _check_io(self, *records: TensorRecord) -> None:
        """The engine's inputs and outputs are the manifest's (-1 is TensorRT's dynamic axis)."""
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        for record in records:
            if record.name not in names:
                raise InputError(f"{self.path.name} has no tensor {record.name!r} (it has {', '.join(sorted(names))}): "
                                 "the manifest belongs to another engine")
            shape = list(self.engine.get_tensor_shape(record.name))
            expected = [-1 if d == "batch" else d for d in record.shape]
            if len(shape) != len(expected) or any(e is not None and e != d for e, d in zip(expected, shape)):
                raise InputError(f"{self.path.name}: {record.name} is {shape} in the engine but "
                                 f"{record.shape} in the manifest")

    def _nptype(self, dtype) -> type:
        """TensorRT's dtype → numpy's, or one line for one numpy lacks (bfloat16, fp8 I/O)."""
        try:
            return self._trt_nptype(dtype)
        except TypeError:
            raise BackendError(f"{self.path.name} has {dtype} inputs or outputs, which numpy has no type for: "
                               "export with float32 I/O") from None

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._run_all(x, (self.output_name,))[0].astype(np.float32, copy=False)

    def _run_all(self, x: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        """One batch; every output of the engine is bound (TensorRT runs only with all of them
        bound), each in the dtype the engine gives it, and `names` are returned. The input is cast
        to the engine's input dtype (an engine built with fp16 I/O takes fp16)."""
        cuda, engine = self._cuda, self.engine
        context, stream = self._pool.get()
        try:
            x = x.astype(self._nptype(engine.get_tensor_dtype(self.input_name)), copy=False)
            context.set_input_shape(self.input_name, x.shape)
            outputs = {name: np.empty(tuple(context.get_tensor_shape(name)),
                                      dtype=self._nptype(engine.get_tensor_dtype(name))) for name in self._outputs}
            missing = [name for name in names if name not in outputs]
            if missing:
                raise InputError(f"{self.path.name} has no output {', '.join(missing)} (it has "
                                 f"{', '.join(outputs)}): the manifest belongs to another engine")
            buffers = {name: cuda.DeviceArray(shape=a.shape, dtype=a.dtype)
                       for name, a in {self.input_name: x, **outputs}.items()}
            try:
                buffers[self.input_name].copy_from(x, stream)
                for name, buffer in buffers.items():
                    context.set_tensor_address(name, buffer.ptr)
                if not context.execute_async_v3(stream.ptr):
                    raise BackendError(f"{self.backend} failed to run {self.path.name}")
                for name, out in outputs.items():
                    buffers[name].copy_to(out, stream)
                stream.synchronize()
            finally:
                for buffer in buffers.values():
                    buffer.free()
            return [outputs[name] for name in names]
        finally:
            self._pool.put((context, stream))

    def close(self) -> None:
        while not self._pool.empty():
            self._pool.get()[1].free()
        self.engine = None
        super().close()
