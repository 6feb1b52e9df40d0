"""The transformers reference for the vLLM plugin's Qwen2.5-VL test: `se.apply` on transformers'
Qwen2.5-VL, greedy generation of each of tiny_qwen's images. Its adapter needs transformers ≥
compat.VLM_FAMILIES_MIN, above vLLM's pinned release, so the test runs this in the main
environment:

    python qwen_reference.py CHECKPOINT SCHEDULE TAU NEW_TOKENS   → JSON [[prompt length, tokens], …]

(Qwen2.5-VL or Qwen3-VL, whichever the checkpoint holds).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import saint_export as se  # noqa: E402
import tiny_qwen  # noqa: E402


def main(checkpoint: str, schedule: str, tau: float, new_tokens: int) -> list:
    from saint_export import compat

    compat.import_torchvision()  # before transformers' image processors
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    se.apply(model, schedule, tau=tau)
    processor = AutoProcessor.from_pretrained(checkpoint)
    seen = []  # the prompt length the language model gets, after the input fit
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    results = []
    for image in tiny_qwen.images():
        inputs = processor(text=tiny_qwen.PROMPT, images=image, return_tensors="pt")
        seen.clear()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        results.append([seen[0], out[0, inputs.input_ids.shape[1]:].tolist()])
    return results


if __name__ == "__main__":
    checkpoint, schedule, tau, new_tokens = sys.argv[1:5]
    print(json.dumps(main(checkpoint, schedule, float(tau), int(new_tokens))))
