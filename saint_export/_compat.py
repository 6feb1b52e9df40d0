"""Import-order fix for CPU-only torch with the CUDA build of torchvision (PyPI ships only that).

Importing timm imports torchvision, whose import fails on a CPU torch with
"operator torchvision::nms does not exist". ViTs need none of torchvision's C++ ops, so we
declare the two missing op schemas and import again. With a matching torchvision nothing happens.
"""
import sys

import torch


def import_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _keep_alive.append(lib)
        import torchvision  # noqa: F401


_keep_alive: list = []  # the Library object must outlive this call, or its ops are dropped
