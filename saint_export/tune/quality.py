"""How far a pruned model's outputs are from the unpruned model's, per image.

A classifier is compared on its class distributions (KL, top-1 change, logit cosine); a tower on
its features, each image's [K, D] averaged over tokens first (a pruned tower has fewer tokens, and
what the dropped ones carried must now be carried by the others).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from ..adapters import find_adapter


def feature_cosine(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image: the cosine of the outputs with the unpruned ones ([B, K, D] token-averaged)."""
    if outputs.dim() == 3:
        outputs, reference = outputs.mean(1), reference.mean(1)
    return torch.nn.functional.cosine_similarity(outputs.double(), reference.double(), dim=-1)


def kl_divergence(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image: KL(unpruned ‖ pruned) of the class distributions."""
    ref = reference.double().log_softmax(-1)
    return (ref.exp() * (ref - logits.double().log_softmax(-1))).sum(-1)


def proxy_loss(outputs: torch.Tensor, reference: torch.Tensor, classifier: bool) -> float:
    """What the search minimises: the mean KL for a classifier, 1 − the mean feature cosine else."""
    if classifier:
        return float(kl_divergence(outputs, reference).mean())
    return float(1 - feature_cosine(outputs, reference).mean())


def model_outputs(model, pixels: torch.Tensor, batch: int) -> torch.Tensor:
    """What the exported graph of `model` computes (logits or features), in batches."""
    module = find_adapter(model).export_module(model)
    with torch.no_grad():
        return torch.cat([module(pixels[i:i + batch]).float() for i in range(0, len(pixels), batch)])


@dataclass
class Scores:
    """One schedule on one split of the images: per-image measures and their summaries."""
    loss: float  # the search's proxy (mean KL, or 1 − mean cosine)
    cosine: list  # per image
    disagree: list | None = None  # per image, 0/1 (classifiers)
    correct: list | None = None  # per image, 0/1 (with labels)

    def failures(self, objective) -> int:
        """The images that break a quality objective: disagreements, or cosines under its limit."""
        if objective.kind == "cosine":
            return int(sum(c < objective.limit for c in self.cosine))
        return int(sum(self.disagree))


def score(base, pixels, reference, labels, spec_text: str, batch: int, hp, classifier: bool) -> Scores:
    """The model patched as export patches it (not the prober: their agreeing is what
    tests/test_tune.py checks) against the unpruned `reference` outputs."""
    from ..patch import apply

    tau, K, gamma = hp
    outputs = reference if spec_text == "r:0" else model_outputs(
        apply(copy.deepcopy(base), spec_text, tau=tau, K=K, gamma=gamma), pixels, batch)
    scores = Scores(proxy_loss(outputs, reference, classifier), feature_cosine(outputs, reference).tolist())
    if classifier:
        scores.disagree = (outputs.argmax(-1) != reference.argmax(-1)).int().tolist()
    if labels is not None:
        scores.correct = (outputs.argmax(-1).numpy() == np.asarray(labels)).astype(int).tolist()
    return scores
