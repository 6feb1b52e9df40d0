"""transformers vision towers: CLIP and SigLIP (with or without projection), and the tower inside
LLaVA (docs/vlm.md).

Pruning encoder layers become a subclass of their own class (a class swap: parameters, state_dict
and transformers' hidden-state capture, which matches layers by isinstance, stay as they are)
whose forward selects tokens after the attention residual, before layer_norm2 and the MLP.
Attention stays whatever the config says (SDPA by default): the keys are read off `k_proj` by a
forward hook, averaged over heads, as the timm adapter does. CLIP's CLS token is protected;
SigLIP has none. Survivors are put back in ascending (spatial) order, because a LLaVA language
model sees the image features as a sequence.

For LLaVA the schedule covers the tower's layers up to the one whose output LLaVA takes
(`vision_feature_layer`): later layers' outputs are discarded.

Checkpoints by name: the aliases of `hf_checkpoints.json` (whose configs ship with the package,
so `random` weights need no hub), their hub ids, and local checkpoint folders (save_pretrained).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from .. import compat
from ..core import gather_tokens
from ..errors import InputError
from ..images import Preprocess
from . import ModelInfo, ProbeParts, unsupported

family = "transformers"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"

# OpenAI CLIP's normalisation (CLIPImageProcessor defaults); SigLIP uses 0.5 / 0.5.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


CHECKPOINTS_FILE = Path(__file__).with_name("hf_checkpoints.json")


@functools.cache
def checkpoints() -> dict[str, dict]:
    """alias → {"repo": hub id, "config": the fields that fix its shapes}."""
    return json.loads(CHECKPOINTS_FILE.read_text())["checkpoints"]


MODEL_TYPES = ("llava", "clip", "clip_vision_model", "siglip", "siglip_vision_model")


def checkpoints_of(model_types) -> dict[str, dict]:
    """The aliases of some model types (the file lists every transformers adapter's)."""
    return {alias: e for alias, e in checkpoints().items() if e["config"]["model_type"] in model_types}


def resolve_name_of(name: str, model_types) -> str | None:
    """An alias or hub id of `model_types` → the hub id; a checkpoint folder whose config is one
    of them → itself (`model_types` None: any folder with a config)."""
    own = checkpoints_of(model_types if model_types is not None else MODEL_TYPES)
    if name in own:
        return own[name]["repo"]
    if any(entry["repo"] == name for entry in own.values()):
        return name
    config = Path(name) / "config.json"
    if not config.is_file():
        return None
    if model_types is None:
        return name
    try:
        return name if json.loads(config.read_text()).get("model_type") in model_types else None
    except ValueError:
        return None


def known_names_of(model_types) -> list[str]:
    own = checkpoints_of(model_types)
    return [*own, *(entry["repo"] for entry in own.values())]


def _own_checkpoints() -> dict[str, dict]:
    return checkpoints_of(MODEL_TYPES)


def resolve_name(name: str) -> str | None:
    """An alias → its hub id; a known hub id or a local checkpoint folder → itself (the other
    transformers adapters are asked first and claim their own model types' folders)."""
    return resolve_name_of(name, None)


def known_names() -> list[str]:
    return known_names_of(MODEL_TYPES)


def _config(source_name: str):
    from transformers import AutoConfig

    for entry in checkpoints().values():
        if entry["repo"] == source_name:
            fields = dict(entry["config"])
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
    try:
        return AutoConfig.from_pretrained(source_name)
    except (OSError, ValueError) as err:
        raise InputError(f"checkpoint folder {source_name!r} has no usable transformers config: "
                         f"{str(err).splitlines()[0]}") from None


def _model_class(config, source_name: str) -> type:
    CLIPVisionModel, _, SiglipVisionModel, _, LlavaForConditionalGeneration = _classes()
    classes = {"llava": LlavaForConditionalGeneration, "clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel,
               "siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel}
    if config.model_type not in classes:
        raise unsupported(f"{source_name!r} (a transformers {config.model_type!r} checkpoint)")
    return classes[config.model_type]


def create(source_name: str, pretrained: bool, img_size: int | None) -> torch.nn.Module:
    """The checkpoint's model: a tower, or LLaVA whose language model stays on the meta device
    (no memory, no weights): export needs only its vision tower and projector."""
    config = _config(source_name)
    cls = _model_class(config, source_name)
    vision_config = getattr(config, "vision_config", config)
    if img_size not in (None, vision_config.image_size):
        raise InputError(f"image size {img_size}: {source_name} takes {vision_config.image_size} (its position "
                         "embeddings fix it)")
    if config.model_type != "llava":
        return cls.from_pretrained(source_name) if pretrained else cls(vision_config)
    return vision_parts_only(cls, config, source_name, pretrained)


def vision_parts_only(cls: type, config, source_name: str, pretrained: bool) -> torch.nn.Module:
    """A LLaVA-style model (LLaVA, LLaVA-NeXT, OneVision) whose language model is on the meta
    device (no memory, no weights), its tower and projector in fp32: all that exports need."""
    from transformers import AutoModel

    if pretrained:
        model = cls.from_pretrained(source_name, dtype="auto")
        for part in compat.text_parts(model):  # free the language model
            part.to("meta")
        compat.vision_transformer(model).float()
        compat.projector(model).float()
        return model
    device = torch.get_default_device()
    with torch.device("meta"):
        model = cls(config)
    with torch.device(device):
        compat.set_vision_tower(model, AutoModel.from_config(config.vision_config))
        compat.set_projector(model, type(compat.projector(model))(config))
    return model


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    raise InputError(f"weights file {str(path)!r}: transformers checkpoints are folders; pass the folder "
                     "(save_pretrained) as the model, with pretrained weights")


def _classes():
    from transformers import (CLIPVisionModel, CLIPVisionModelWithProjection, LlavaForConditionalGeneration,
                              LlavaModel, SiglipVisionModel)
    return CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel, LlavaModel, LlavaForConditionalGeneration


def matches(model: torch.nn.Module) -> bool:
    try:
        return isinstance(model, (*_classes(), ImageFeatures))
    except ImportError:  # transformers not installed: not this family
        return False


tower = compat.vision_transformer
is_llava = compat.is_llava
layers = compat.encoder_layers


def num_protected(model: torch.nn.Module) -> int:
    """1 for CLIP (its CLS token), 0 for SigLIP (no class token)."""
    return _protected(tower(model).config)


def _protected(vision_config) -> int:
    return 1 if vision_config.model_type.startswith("clip") else 0


def feature_depth(model: torch.nn.Module) -> int:
    """The layers whose output reaches the features: all of a tower's; LLaVA's up to its feature
    layer (hidden_states[i] is the output of layer i - 1)."""
    if not is_llava(model):
        return len(layers(model))
    return _llava_feature_depth(model.config, type(model).__name__)


def _llava_feature_depth(config, name: str) -> int:
    layer, total = config.vision_feature_layer, config.vision_config.num_hidden_layers
    if not isinstance(layer, int):
        raise unsupported(f"{name} with several vision feature layers {layer} (pruning between "
                          "them would break their concatenation)")
    index = compat.feature_layer_index(layer, total)
    if index == 0:
        raise unsupported(f"{name} taking the tower's embeddings (vision_feature_layer {layer})")
    return index


def describe(model: torch.nn.Module) -> ModelInfo:
    return _info(tower(model).config, feature_depth(model))


def describe_llava_config(config, name: str = "LLaVA") -> ModelInfo:
    """`describe` for a LLaVA config without its model (the vLLM plugin's view of the tower)."""
    return _info(config.vision_config, _llava_feature_depth(config, name))


def _info(config, depth: int) -> ModelInfo:
    """ModelInfo of a vision config whose first `depth` layers feed the features."""
    return ModelInfo(depth=depth, num_patches=(config.image_size // config.patch_size) ** 2,
                     num_protected=_protected(config), embed_dim=config.hidden_size,
                     mlp_ratio=config.intermediate_size / config.hidden_size, img_size=config.image_size,
                     patch_size=config.patch_size)


_SUBCLASSES: dict[type, type] = {}


def saint_layer_class(base: type) -> type:
    """`base` (CLIPEncoderLayer, SiglipEncoderLayer) with SAINT between attention and MLP."""
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"Saint{base.__name__}", (base,), {"forward": _saint_forward,
                                                                   "__module__": __name__})
    return _SUBCLASSES[base]


def _saint_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """The encoder layer's own forward with the selection after the attention residual."""
    if attention_mask is not None:
        raise InputError("SAINT pruning layers do not support attention masks")
    return compat.encoder_layer_forward(self, hidden_states, functools.partial(_select, self), **kwargs)


def _head_mean(layer, keys: torch.Tensor) -> torch.Tensor:
    """The key projection's output [B, N, heads · d] → keys averaged over heads [B, N, d]."""
    batch, tokens, _ = keys.shape
    return keys.view(batch, tokens, compat.attention_heads(layer), -1).mean(2)


def _select(layer, hidden_states: torch.Tensor) -> torch.Tensor:
    keys = layer.saint_keys.pop()  # from the hook
    # No dropper: a block that images of this size do not prune at (LLaVA-NeXT's per-size budgets)
    keep_index = None if layer.saint_dropper is None else layer.saint_dropper(_head_mean(layer, keys))
    # The survivors, ascending (for ImageFeatures.track_positions: where each token came from).
    layer.saint_kept = None if keep_index is None else keep_index.sort(dim=1).values
    return hidden_states if layer.saint_kept is None else gather_tokens(hidden_states, layer.saint_kept)


def patch(model: torch.nn.Module, droppers: dict) -> None:
    patch_tower(model, droppers)
    schedule = next(iter(droppers.values())).state.schedule if droppers else None
    if is_llava(model) and schedule is not None and schedule.drops is not None:
        from .. import vlm

        vlm.install(model, *image_token_counts(model, sum(schedule.drops)))


def patch_tower(model: torch.nn.Module, droppers: dict) -> None:
    """The pruning encoder layers of the tower (also LLaVA-NeXT's and OneVision's)."""
    for index, dropper in droppers.items():
        layer = layers(model)[index]
        layer.__class__ = saint_layer_class(type(layer))
        layer.saint_dropper = dropper
        layer.saint_keys = []
        compat.key_projection(layer).register_forward_hook(
            lambda module, args, out, layer=layer: layer.saint_keys.append(out))


def block_forward(layer: torch.nn.Module, hidden_states: torch.Tensor, select) -> torch.Tensor:
    """An unpatched encoder layer's forward with `select(keys)` → kept token indices (or None: all)
    after the attention residual, as a pruning layer runs. `tune` runs layers through it."""
    keys = []
    hook = compat.key_projection(layer).register_forward_hook(lambda module, args, out: keys.append(out))

    def choose(hidden):
        keep_index = select(_head_mean(layer, keys.pop()))
        # ascending, as `_select` keeps them: the next layer's A/B split depends on the order
        return hidden if keep_index is None else gather_tokens(hidden, keep_index.sort(dim=1).values)
    try:
        return compat.encoder_layer_forward(layer, hidden_states, choose)
    finally:
        hook.remove()


def probe_parts(model: torch.nn.Module) -> ProbeParts:
    """The tower's stem, the layers that feed the features, and the rest of the exported graph:
    LLaVA's feature selection and projector, or what the tower's forward does after its encoder."""
    stem = torch.nn.Sequential(*compat.tower_stem(model))
    head = ImageFeatures(model).project if is_llava(model) else functools.partial(compat.tower_head, model)
    return ProbeParts(stem, list(layers(model)[:feature_depth(model)]), block_forward, head)


class ImageFeatures(torch.nn.Module):
    """What an exported graph of this family computes from pixel_values.

    LLaVA: the tower run only up to its feature layer, the feature selection ('default' drops
    the first token) and the projector: [B, K, D_llm], what LLaVA puts at its image placeholders
    (tests check it equals transformers' `get_image_features`). A tower: its own forward's
    last_hidden_state [B, K, D], or image_embeds [B, D] for a projection variant.

    With `track_positions` (LLaVA-style models only) it also returns each feature's patch index in
    the image's raster order, [B, K] int64 (what LLaVA-NeXT needs to stitch crops). `droppers`
    (layer index → TokenDropper) are put into the pruning layers before each forward: LLaVA-NeXT's
    budget depends on the image size, so one set of layers serves several."""

    def __init__(self, model: torch.nn.Module, track_positions: bool = False, droppers: dict | None = None):
        super().__init__()
        self.droppers = droppers
        self.saint = getattr(model, "saint", None)  # the same state: the parity gate records selections
        self.track_positions = track_positions
        self.llava = is_llava(model)
        if self.llava:
            self.stem = torch.nn.Sequential(*compat.tower_stem(model))
            self.layers = torch.nn.ModuleList(layers(model)[:feature_depth(model)])
            self.drop_first = model.config.vision_feature_select_strategy == "default"
            self.projector = compat.projector(model)
            self.saint_vision_config = model.config.vision_config
        else:
            self.model = model
            self.output = "image_embeds" if hasattr(model, "visual_projection") else "last_hidden_state"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.llava:
            return getattr(self.model(pixel_values=pixel_values), self.output)
        hidden = self.stem(pixel_values)
        alive = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        for index, layer in enumerate(self.layers):
            if self.droppers is not None and hasattr(layer, "saint_dropper"):
                layer.saint_dropper = self.droppers.get(index)
            layer.saint_kept = None
            hidden = layer(hidden, None)
            if self.track_positions and layer.saint_kept is not None:
                alive = alive.gather(1, layer.saint_kept)
        features = self.project(hidden)
        if not self.track_positions:
            return features
        protected = _protected(self.saint_vision_config)
        return features, (alive[:, 1:] if self.drop_first else alive) - protected

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """LLaVA: the feature layer's tokens → the features (the selection strategy, the projector)."""
        return self.projector(hidden[:, 1:] if self.drop_first else hidden)


def export_module(model: torch.nn.Module) -> torch.nn.Module:
    return ImageFeatures(model)


def features_record(model: torch.nn.Module, dropped: int) -> dict | None:
    """For LLaVA, what an LLM runtime needs to take the exported features (docs/vlm.md)."""
    if not is_llava(model):
        return None
    original, kept = image_token_counts(model, dropped)
    return {
        "tokens_per_image": kept, "unpruned_tokens_per_image": original,
        "hidden_size": model.config.text_config.hidden_size,
        "vision_feature_layer": model.config.vision_feature_layer,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
        "protected_tokens": num_protected(model), "image_token_id": model.config.image_token_id,
        "tensorrt_llm": f"build the LLM engine with --max_multimodal_len = max_batch_size × {kept}; the runner "
                        f"passes image_features as the prompt table with {kept} fake prompt ids per image",
        "vllm": f"pass image_features as image embeddings (enable_mm_embeds=True); each image then takes {kept} "
                "placeholders",
        "transformers": f"write {kept} image placeholders per image (or {original}: saint_export.apply on the "
                        "LLaVA model fits the prompt)",
    }


def llm_image_tokens(model: torch.nn.Module, tower_dropped: int | None) -> int:
    """LLaVA's image tokens per LLM row when the tower drops `tower_dropped` (None: dynamic)."""
    if not is_llava(model):
        raise InputError(f"an LLM schedule needs a VLM (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL or "
                         f"Qwen3-VL), not {type(model).__name__}")
    if tower_dropped is None:
        raise InputError("an LLM schedule needs a static tower schedule (the image-token count must be known)")
    return image_token_counts(model, tower_dropped)[1]


def image_token_counts(model: torch.nn.Module, dropped: int) -> tuple[int, int]:
    """LLaVA's image features per image: (unpruned, after `dropped` tokens are gone)."""
    return llava_image_token_counts(model.config, describe(model), dropped)


def llava_image_token_counts(config, info: ModelInfo, dropped: int) -> tuple[int, int]:
    """The same from a LLaVA config and its tower's ModelInfo. The 'default' strategy removes the
    tower's first token (CLS), 'full' keeps every token."""
    removed = 1 if config.vision_feature_select_strategy == "default" else 0
    tokens = info.num_patches + info.num_protected - removed
    return tokens, tokens - dropped


def low_precision_modules(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in layers(model).modules() if isinstance(m, torch.nn.Linear)]


def preprocess(model: torch.nn.Module) -> Preprocess:
    """The checkpoints' image processors: CLIP resizes the shorter side to the input size, centre
    crops and uses OpenAI's mean and std; SigLIP resizes to the square input size (modelled here as
    a centre crop of the resized shorter side) with mean = std = 0.5."""
    size = describe(model).img_size
    if num_protected(model):
        return Preprocess(size=size, mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0, interpolation="bicubic")
    return Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, interpolation="bicubic")


def label_names(model: torch.nn.Module) -> None:
    return None


def class_indices(model: torch.nn.Module, class_names) -> dict[str, int]:
    raise InputError(f"{type(model).__name__} has no classification head: accuracy on class folders needs a classifier")
