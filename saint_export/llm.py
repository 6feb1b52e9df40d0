"""SAINT inside LLaVA's language model: image tokens dropped during prefill (LLM-only and hybrid
modes; docs/vlm.md).

After each layer the schedule names, the image tokens of each prompt row (found from the
placeholder ids, never a constant offset) are scored with the SAINT rule on that layer's
post-rotary cached keys averaged over key/value heads, with nothing protected inside the span.
Tokens dropped after layer l are gone from layer l + 1 on; layer l and its cache keep them. Text,
system and padding tokens are never dropped; survivors keep their original positions (their
rotary cos/sin are gathered, not recomputed) and stay in ascending order, so causality holds.
Each later stage gets its own causal mask, sized to its own (shorter) cache, in prefill and at
every decoding step. No fork of the model code: a pre-hook on LlavaModel reads the image mask,
one on the language model reads the phase, and the decoder layers are class-swapped.

Supported: DynamicCache with greedy or sampling `generate`, batch ≥ 1 with left padding, the same
image-token count in every row. Not supported: static caches, beam search, assisted decoding,
chunked prefill, re-used caches.

LLM schedules (validated before any model work):

| form | meaning |
| --- | --- |
| `none` | nothing dropped |
| `dynamic[@<a>-<b>]` | the reference: after each layer a … b, r = ⌊batch mean of the rows with ≥ K votes⌋ (default layers: the reference's 7–16 of 32, scaled to the depth) |
| `r:<r0>,<r1>,…` | drop r_i image tokens after layer i |
| `span<P>@<a>-<b>` | bring the image span to round(P% · n) over layers a … b, as `early<P>` does in the tower |
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from . import compat, core
from .errors import InputError
from .schedule import ScheduleError, _early_drops
from .spec import TOPK_LIMIT, drop_problem, max_drop
from .vlm import column_index, padding_side

REFERENCE_LAYERS = (7, 16)  # of LLaVA-1.5-7B's 32 decoder layers
OTHER_TOKENS = 36  # text and system tokens assumed beside the image for the prefill FLOPs ratio


@dataclass(frozen=True)
class LlmSchedule:
    spec: str
    depth: int  # decoder layers
    image_tokens: int | None  # image tokens per row entering the language model; None: per row at prefill
    drops: tuple[int, ...] | None  # after each layer; None for dynamic, or until a row's count is known
    dynamic_layers: tuple[int, int] | None = None  # first and last pruning layer of `dynamic`
    _pruning_layers: tuple[int, ...] | None = None  # of a schedule resolved per row

    @classmethod
    def parse(cls, spec: str, depth: int, image_tokens: int | None) -> "LlmSchedule":
        """`spec` for `depth` decoder layers and `image_tokens` per row (None: the syntax and the
        layers are checked now, the counts per row at prefill with `for_row`)."""
        text = str(spec).strip()
        if image_tokens is None and text != "none" and not text.startswith("dynamic"):
            probe = cls.parse(text, depth, 2 * TOPK_LIMIT)  # a count every rule accepts: syntax and layers
            return cls(text, depth, None, None, _pruning_layers=tuple(probe.pruning_layers))
        if text == "none":
            return cls(text, depth, image_tokens, (0,) * depth)
        match = re.fullmatch(r"dynamic(?:@(\d+)-(\d+))?", text)
        if match:
            first, last = (int(match[1]), int(match[2])) if match[1] else _reference_layers(depth)
            _check_range(text, first, last, depth)
            return cls(text, depth, image_tokens, None, (first, last))
        match = re.fullmatch(r"r:(\d+(?:,\d+)*)", text)
        if match:
            drops = tuple(int(r) for r in match[1].split(","))
            if len(drops) > depth:
                raise ScheduleError(f"LLM schedule {text!r} lists {len(drops)} layers but the language model has {depth}")
            drops += (0,) * (depth - len(drops))
        else:
            match = re.fullmatch(r"span(\d+(?:\.\d+)?)@(\d+)-(\d+)", text)
            if not match:
                raise ScheduleError(f"LLM schedule {text!r}: expected none, dynamic[@<a>-<b>], r:<r0>,<r1>,… or "
                                    "span<P>@<a>-<b> (e.g. span50@7-16)")
            percent, first, last = float(match[1]), int(match[2]), int(match[3])
            _check_range(text, first, last, depth)
            if not 0 < percent <= 100:
                raise ScheduleError(f"LLM schedule {text!r}: P must be in (0, 100], got {percent:g}")
            stage = _early_drops(text, percent, last - first + 1, last - first + 1, image_tokens)
            drops = (0,) * first + tuple(stage) + (0,) * (depth - last - 1)
        n = image_tokens
        for layer, r in enumerate(drops):
            problem = drop_problem(n, r)
            if problem:
                problem = problem.replace("patch token", "image token").replace("patches", "image tokens")
                raise ScheduleError(f"LLM schedule {text!r}: layer {layer} {problem}")
            n -= r
        return cls(text, depth, image_tokens, drops)

    @property
    def is_dynamic(self) -> bool:
        return self.dynamic_layers is not None

    @property
    def pruning_layers(self) -> list[int]:
        if self.is_dynamic:
            return list(range(self.dynamic_layers[0], self.dynamic_layers[1] + 1))
        if self.drops is None:
            return list(self._pruning_layers)
        return [i for i, r in enumerate(self.drops) if r]

    def for_row(self, image_tokens: int) -> "LlmSchedule":
        """This schedule for a row holding `image_tokens` image tokens."""
        if self.image_tokens == image_tokens or self.is_dynamic:
            return self
        return LlmSchedule.parse(self.spec, self.depth, image_tokens)

    def counts(self) -> list[int]:
        """Image tokens entering each layer (static schedules)."""
        counts = [self.image_tokens]
        for r in self.drops:
            counts.append(counts[-1] - r)
        return counts

    def prefill_flops_ratio(self, other_tokens: int = OTHER_TOKENS) -> float:
        """Prefill cost of the decoder layers, pruned over unpruned, counting tokens per layer
        (linear layers dominate; attention's quadratic term is left out)."""
        if self.drops is None:
            raise ScheduleError("the prefill FLOPs ratio of a dynamic or per-row LLM schedule depends on the data")
        counts = self.counts()
        return sum(counts[i] + other_tokens for i in range(self.depth)) / (self.depth * (counts[0] + other_tokens))

    def table(self) -> str:
        tokens = "image tokens per row as each prompt holds" if self.image_tokens is None else \
            f"{self.image_tokens} image tokens per row"
        lines = [f"LLM schedule {self.spec!r}: {self.depth} decoder layers, {tokens}",
                 f"{'layer':>5}  {'image tokens in':>15}  {'dropped after':>13}"]
        if self.image_tokens is None and not self.is_dynamic:
            lines += [f"{i:>5}  {'?':>15}  {'per row' if i in self.pruning_layers else '0':>13}"
                      for i in range(self.depth)]
            lines.append("prefill FLOPs ratio: per row (each prompt's image-token count)")
            return "\n".join(lines)
        if self.drops is None:
            first, last = self.dynamic_layers
            lines += [f"{i:>5}  {'?':>15}  {'dynamic' if first <= i <= last else '0':>13}" for i in range(self.depth)]
            lines.append("prefill FLOPs ratio: data-dependent (dynamic)")
            return "\n".join(lines)
        counts = self.counts()
        lines += [f"{i:>5}  {counts[i]:>15}  {r:>13}" for i, r in enumerate(self.drops)]
        ratio = self.prefill_flops_ratio()
        lines.append(f"prefill FLOPs ratio (decoder layers, {OTHER_TOKENS} other tokens): {ratio:.3f} "
                     f"(ideal speed-up {1 / ratio:.2f}x)")
        return "\n".join(lines)


def _reference_layers(depth: int) -> tuple[int, int]:
    first = round(REFERENCE_LAYERS[0] * depth / 32)
    last = max(first, min(depth - 2, round(REFERENCE_LAYERS[1] * depth / 32)))
    return first, last


def _check_range(text: str, first: int, last: int, depth: int) -> None:
    if not 0 <= first <= last < depth:
        raise ScheduleError(f"LLM schedule {text!r}: layers {first}-{last} are not within 0-{depth - 1}")


@dataclass
class LlmState:
    """What `install` attached to the model (as `model.saint_llm`)."""
    schedule: LlmSchedule
    tau: float
    vote_k: int
    gamma: float
    # While recording, per pruning layer and prefill: (layer, dropped, original positions of the
    # image tokens kept [B, n - dropped]).
    trace: list | None = field(default=None, repr=False)
    run: dict = field(default_factory=dict, repr=False)  # per-forward state


def install(model, schedule: LlmSchedule, tau: float, vote_k: int, gamma: float) -> LlmState:
    core_model = compat.llava_core(model)
    lm = compat.language_model(model)
    image_token = model.config.image_token_id
    state = LlmState(schedule, float(tau), int(vote_k), float(gamma))
    st = state.run
    pruning = set(schedule.pruning_layers)
    decoder_layers = compat.decoder_layers(model)
    base = type(decoder_layers[0])  # LlamaDecoderLayer, or the decoder layer of another language model
    if any(type(layer) is not base for layer in decoder_layers):
        raise InputError(f"{type(lm).__name__} mixes decoder layer types; LLM-side SAINT needs one")

    def core_pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[1] > 1:  # a prefill (decoding steps keep the prompt's mask)
            st["image"] = None if ids is None else ids == image_token

    def lm_pre_hook(module, args, kwargs):
        cache = compat.cache_argument(kwargs)
        st["past"] = compat.cache_length(cache)
        st["prefill"] = st["past"] == 0
        st["mask2d"], st["step"] = kwargs.get("attention_mask"), {}
        if st["prefill"]:
            if cache is None and kwargs.get("use_cache") is False:
                raise InputError("LLM-side SAINT reads each layer's cached keys: run with use_cache=True (the default)")
            image = st.get("image")
            embeds = kwargs.get("inputs_embeds")
            if image is None or embeds is None or image.shape[1] != embeds.shape[1] or not bool(image.any()):
                raise InputError("LLM-side SAINT needs image placeholders in input_ids: this prompt has no image span")
            st["drops"] = _row_drops(schedule, image.sum(1).tolist())
            st["side"] = padding_side(model, st["mask2d"])
            st.update(stages=[], T=embeds.shape[1], image_now=image,
                      original=torch.arange(embeds.shape[1], device=embeds.device).expand(len(image), -1))
        return None

    core_model.register_forward_pre_hook(core_pre_hook, with_kwargs=True)
    lm.register_forward_pre_hook(lm_pre_hook, with_kwargs=True)

    # The cache arrives in **kwargs under whichever name this transformers release uses, and is
    # passed on the same way (compat.cache_argument).
    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        i = compat.decoder_layer_index(self)
        cache = compat.cache_argument(kwargs)
        stage = next((s for s in reversed(st["stages"]) if s["start"] <= i), None) if "stages" in st else None
        if stage is not None and st["prefill"]:
            attention_mask, position_ids, position_embeddings = stage["mask"], stage["pos"], stage["emb"]
        elif stage is not None:  # decoding: the stage's kept prompt columns plus the generated ones
            if stage["start"] not in st["step"]:
                mask2d = _decoding_mask(stage, st, hidden_states.shape[1])
                st["step"][stage["start"]] = compat.causal_mask(lm.config, hidden_states, mask2d, cache,
                                                                position_ids, layer=stage["start"])
            attention_mask = st["step"][stage["start"]]
        hidden_states = base.forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                     position_embeddings=position_embeddings, **kwargs)
        if st["prefill"] and i in pruning:
            hidden_states = _prune(i, hidden_states, position_ids, position_embeddings, cache, stage)
        return hidden_states

    def _prune(i, h, position_ids, position_embeddings, cache, stage):
        image = st["image_now"]
        keys = compat.cached_keys(cache, i).mean(1)  # post-rotary, averaged over key/value heads: [B, T, d]
        spans, keeps, votes = [], [], []
        for row in range(len(h)):  # rows may hold different numbers of image tokens
            span = image[row].nonzero()[:, 0]  # ascending
            drop = 0 if schedule.is_dynamic else st["drops"][row][i]
            keep, vote_rows = core.similarity_topk(keys[row:row + 1, span].float(), 0, drop, state.tau,
                                                   state.vote_k, state.gamma)
            spans.append(span), keeps.append(keep[0]), votes.append(vote_rows)
        if schedule.is_dynamic:  # SAINT order with nothing protected: the r best-scored A tokens come first
            r = core.dynamic_drop(torch.cat(votes))
            # One r for the batch (the reference's rule), at most what a row with fewer image tokens can drop.
            dropped = [min(r, max_drop(len(span))) for span in spans]
            keeps = [keep[d:] for keep, d in zip(keeps, dropped)]
        else:
            dropped = [drops[i] for drops in st["drops"]]
        kept_image = [span[keep.sort().values] for span, keep in zip(spans, keeps)]
        if state.trace is not None:
            kept = [st["original"][row, columns] for row, columns in enumerate(kept_image)]
            even = len(set(dropped)) == 1 and len({len(k) for k in kept}) == 1
            state.trace.append((i, dropped[0], torch.stack(kept)) if even else (i, dropped, kept))
        if not any(dropped):
            return h
        previous = stage["mask2d"] if stage is not None else st["mask2d"]
        # Text stays, padding goes (the width becomes the longest real row), kept image tokens stay.
        keep_mask = ~image if previous is None else ~image & previous.bool()
        for row, columns in enumerate(kept_image):
            keep_mask[row, columns] = True
        if previous is None and len(set(dropped)) > 1:  # rows now differ in length: padding needs a mask
            previous = torch.ones_like(image, dtype=torch.long)
        index, pad = column_index(keep_mask, left=st["side"] == "left")

        def gather(x, fill=None):
            x = x.expand(len(h), *x.shape[1:])
            out = x.gather(1, index.view(len(h), -1, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
            return out if fill is None else out.masked_fill(pad, fill)

        h, embeddings = gather(h), tuple(gather(e) for e in position_embeddings)
        positions = None if position_ids is None else gather(position_ids, 0)
        mask2d = None if previous is None else gather(previous, 0)
        st["image_now"], st["original"] = gather(image, False), gather(st["original"], 0)
        mask = compat.causal_mask(lm.config, h, mask2d, cache, positions, layer=i + 1)
        st["stages"].append(dict(start=i + 1, mask=mask, pos=positions, emb=embeddings, mask2d=mask2d,
                                 length=h.shape[1]))
        return h

    saint_layer = type(f"Saint{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    for decoder_layer in decoder_layers:
        decoder_layer.__class__ = saint_layer
    model.saint_llm = state
    return state


def _row_drops(schedule: LlmSchedule, image_tokens: list[int]) -> list[tuple[int, ...]] | None:
    """Each row's drops per layer (None for dynamic). A schedule resolved for a count needs it in
    every row; one resolved per row is checked against each row's count."""
    if schedule.is_dynamic:
        return None
    if schedule.image_tokens is not None:
        if any(n != schedule.image_tokens for n in image_tokens):
            raise InputError(f"the LLM schedule was resolved for {schedule.image_tokens} image tokens per row, "
                             f"but the prompts hold {image_tokens}")
        return [schedule.drops] * len(image_tokens)
    drops = []
    for row, n in enumerate(image_tokens):
        try:
            drops.append(schedule.for_row(n).drops)
        except ScheduleError as err:
            raise ScheduleError(f"prompt row {row} ({n} image tokens): {err}") from None
    return drops


def _decoding_mask(stage: dict, st: dict, new_tokens: int):
    """The 2-D mask of a stage at a decoding step: its kept prompt columns, then the columns
    generated since the prompt (all valid where the caller passed no mask)."""
    if stage["mask2d"] is None and st["mask2d"] is None:
        return None
    prompt = stage["mask2d"]
    if prompt is None:
        prompt = torch.ones(len(st["mask2d"]), stage["length"], dtype=st["mask2d"].dtype, device=st["mask2d"].device)
    if st["mask2d"] is not None:
        generated = st["mask2d"][:, st["T"]:]
    else:
        generated = prompt.new_ones(len(prompt), st["past"] + new_tokens - st["T"])
    return torch.cat([prompt, generated], 1)


def resolve(spec: str, model, tower_dropped: int | None, name: str | None = None) -> LlmSchedule:
    """`spec` for the VLM `model` (called `name` in errors) whose tower drops `tower_dropped`
    tokens per image (None: dynamic). Its adapter says how many image tokens reach the language
    model (`llm_image_tokens`; None: each row's own count, resolved at prefill)."""
    from .adapters import find_adapter

    try:
        counter = getattr(find_adapter(model), "llm_image_tokens", None)
    except InputError:
        counter = None
    if counter is None:
        raise InputError(f"an LLM schedule needs a VLM (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL or "
                         f"Qwen3-VL), not {name or type(model).__name__}")
    image_tokens = counter(model, tower_dropped)
    return LlmSchedule.parse(spec, compat.language_model(model).config.num_hidden_layers, image_tokens)
