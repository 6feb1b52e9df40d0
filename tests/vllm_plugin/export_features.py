"""A features folder exported from a tiny checkpoint (ONNX), for the tests of the hand-off from our
engines to vLLM. Its adapters need transformers ≥ compat.VLM_FAMILIES_MIN, so the tests run this in
the main environment:

    python export_features.py CHECKPOINT FOLDER SCHEDULE TAU IMG_SIZE
"""
import sys

import saint_export as se


def main(checkpoint: str, folder: str, schedule: str, tau: float, img_size: int) -> None:
    from saint_export import compat

    compat.import_torchvision()
    config = se.ExportConfig(keep_schedule=schedule, tau=tau, target="onnx", img_size=img_size, parity_images=2)
    result = se.export(checkpoint, folder, weights="pretrained", config=config)
    assert result.parity.passed


if __name__ == "__main__":
    checkpoint, folder, schedule, tau, img_size = sys.argv[1:6]
    main(checkpoint, folder, schedule, float(tau), int(img_size))
