"""The transformers reference for the vLLM plugin's tests of the families whose adapters need
transformers ≥ compat.VLM_FAMILIES_MIN, above vLLM's pinned release, so the tests run this in the
main environment: `se.apply` on the checkpoint, greedy generation of each of the module's images
with its PROMPT.

    python reference.py MODULE CHECKPOINT SCHEDULE TAU NEW_TOKENS   → JSON [[prompt length, tokens], …]

MODULE: tiny_qwen (Qwen2.5-VL, Qwen3-VL) or tiny_anyres_checkpoints (LLaVA-NeXT, LLaVA-OneVision).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import saint_export as se  # noqa: E402


def main(module: str, checkpoint: str, schedule: str, tau: float, new_tokens: int) -> list:
    import importlib

    from saint_export import compat

    compat.import_torchvision()  # before transformers' image processors
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family = importlib.import_module(module)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    se.apply(model, schedule, tau=tau)
    processor = AutoProcessor.from_pretrained(checkpoint)
    seen = []  # the prompt length the language model gets, after the input fit
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    results = []
    for image in family.images():
        inputs = processor(text=family.PROMPT, images=image, return_tensors="pt")
        seen.clear()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        results.append([seen[0], out[0, inputs.input_ids.shape[1]:].tolist()])
    return results


if __name__ == "__main__":
    module, checkpoint, schedule, tau, new_tokens = sys.argv[1:6]
    print(json.dumps(main(module, checkpoint, schedule, float(tau), int(new_tokens))))
