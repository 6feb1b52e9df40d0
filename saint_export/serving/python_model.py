"""Triton Python-backend models that serve an exported folder through `saint_export.runtime`.

Imported inside Triton's Python-backend stub (where `triton_python_backend_utils` exists) by the
one-line `model.py` files that `saint_export.serving.repository.write_serving_repository` writes.
Triton has already checked each request's input names, dtypes, shapes and batch size against
config.pbtxt before `execute` sees it; what is left to check here is what only we can: that bytes
are an image.

- `Classifier`: `pixel_values` FP32 [B, 3, H, W] → `logits` FP32 [B, classes]. The requests of one
  dynamic batch run as one runtime call and are split back.
- `ImageClassifier`: `images` BYTES [B, 1] (encoded JPEG/PNG/…) → the top-k `class_ids`, `scores`
  (softmax probabilities) and `labels`. It decodes and preprocesses with the folder's preprocess
  record, then calls the `Classifier` model through Triton (BLS), so image traffic shares its
  dynamic batcher, instances and statistics.
"""
from __future__ import annotations

import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import InputError, SaintError
from ..manifest import Manifest
from ..runtime import top_k


def _parameters(args) -> dict:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def _error(message: str, bad_request: bool = False):
    """An error response; bad requests get INVALID_ARG (HTTP 400), the rest INTERNAL (500)."""
    code = pb_utils.TritonError.INVALID_ARG if bad_request else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class Classifier:
    def initialize(self, args) -> None:
        from .. import runtime

        params = _parameters(args)
        self.runner = runtime.open(params["folder"], params.get("backend", "auto"),
                                   allow_unverified=params.get("allow_unverified") == "true",
                                   threads=int(params.get("threads", "0")) or None)
        pb_utils.Logger.log_info(f"saint-export: serving {params['folder']} on {self.runner.backend}"
                                 + "".join(f"; {note}" for note in self.runner.notes))

    def execute(self, requests):
        name = self.runner.input_name
        arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for request in requests]
        try:
            logits = self.runner.infer(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        except SaintError as err:
            return [_error(str(err), bad_request=isinstance(err, InputError)) for _ in requests]
        bounds = np.cumsum([len(a) for a in arrays])[:-1]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.runner.output_name, part)])
                for part in np.split(logits, bounds)]

    def finalize(self) -> None:
        self.runner.close()


class ImageClassifier:
    def initialize(self, args) -> None:
        params = _parameters(args)
        self.target = params["classifier"]
        self.top_k = int(params["top_k"])
        # The folder was checked before the server started, and the classifier model checks it
        # again when it opens it; this model only needs its preprocessing and tensor names.
        self.manifest = Manifest.read(params["folder"])
        labels = params.get("labels")
        self.labels = open(labels).read().splitlines() if labels else None

    def _decode(self, blob, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(bytes(blob))) as image:
                return self.manifest.preprocess(image)
        except UnidentifiedImageError:
            reason = f"{len(blob)} bytes in no image format PIL can decode"
        except Exception as err:  # PIL raises many types for damaged files (OSError, SyntaxError, bombs, …)
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"images[{index}] is not a readable image ({reason})")

    def execute(self, requests):
        responses, pixels, owners = [None] * len(requests), [], []
        for i, request in enumerate(requests):
            blobs = pb_utils.get_input_tensor_by_name(request, "images").as_numpy().reshape(-1)
            try:
                pixels.append(np.stack([self._decode(blob, j) for j, blob in enumerate(blobs)]))
                owners.append(i)
            except ValueError as err:
                responses[i] = _error(str(err), bad_request=True)
        if not owners:
            return responses
        call = pb_utils.InferenceRequest(model_name=self.target, requested_output_names=[self.manifest.output.name],
                                         inputs=[pb_utils.Tensor(self.manifest.input.name, np.concatenate(pixels))])
        result = call.exec()
        if result.has_error():
            for i in owners:
                responses[i] = _error(f"{self.target}: {result.error().message()}")
            return responses
        logits = pb_utils.get_output_tensor_by_name(result, self.manifest.output.name).as_numpy()
        indices, scores = top_k(logits, self.top_k)
        bounds = np.cumsum([len(p) for p in pixels])[:-1]
        for i, ids, probs in zip(owners, np.split(indices, bounds), np.split(scores, bounds)):
            names = np.array([[(self.labels[c] if self.labels else str(c)).encode() for c in row] for row in ids],
                             dtype=np.object_)
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("class_ids", ids.astype(np.int64)), pb_utils.Tensor("scores", probs),
                pb_utils.Tensor("labels", names)])
        return responses
