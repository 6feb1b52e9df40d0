"""Keep schedules (docs/keep-schedules.md): how many patch tokens each block drops.

| form              | meaning                                                              |
| ----------------- | -------------------------------------------------------------------- |
| none              | no pruning                                                           |
| dynamic           | the reference method's data-dependent r in blocks 0 … ⌊D/2⌋−1 (eager) |
| early<P>[@<B>]    | reach round(P% · n₀) patches by the end of the first B (⌊D/2⌋) blocks |
| r:<r0>,<r1>,…     | explicit drops for blocks 0, 1, …                                    |
| calib:<file.json> | drops measured by `saint-export calibrate`                           |
| degree<N>@<L>[/<r0>] | the released VLM code's rule: block L keeps N patches by iterative |
|                   | full-graph degree (LLaVA-1.5's paper setting: degree375@19)           |
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .spec import drop_problem, max_drop
from .errors import InputError

DEGREE_R0 = 16  # the released code's starting step divisor for the degree rule
EXPORTABLE_HINT = "use early<P> (e.g. early50) or calib:<file.json> for a static budget"
NOT_EXPORTABLE = f"keep schedule 'dynamic' cannot be exported (its token counts depend on the data); {EXPORTABLE_HINT}"


class ScheduleError(InputError):
    """A keep schedule that is malformed or impossible for the model."""


@dataclass(frozen=True)
class KeepSchedule:
    spec: str
    depth: int
    num_patches: int
    # Per-block drop counts; None for `dynamic`, where r is decided per batch at run time.
    drops: tuple[int, ...] | None
    num_protected: int = 1
    # The block width and MLP ratio only feed the FLOPs ratio; without them there is none (no
    # silent default width: the ratio must be the same wherever it is computed).
    embed_dim: int | None = None
    mlp_ratio: float | None = None
    # "vote": SAINT's bipartite vote (the operator); "degree": the released VLM code's iterative
    # full-graph degree rule (core.degree_keep_index), starting from the step divisor r0.
    rule: str = "vote"
    r0: int = DEGREE_R0
    # Blocks of the model each schedule block stands for (ModelInfo.spans; None: one each). Those
    # before a pruning block run on its tokens in; only the FLOPs ratio reads this.
    spans: tuple[int, ...] | None = None
    # For the FLOPs ratio of towers that prune in units (Qwen's 2 × 2 merge groups: 4 tokens) and
    # attend within windows between their pruning blocks (ModelInfo.unit_tokens, .window_tokens).
    unit_tokens: int = 1
    window_tokens: int | None = None

    @classmethod
    def parse(cls, spec: str, depth: int, num_patches: int, *, num_protected: int = 1,
              embed_dim: int | None = None, mlp_ratio: float | None = None,
              early_target=None) -> "KeepSchedule":
        """Resolve `spec` for a model with `depth` blocks and `num_patches` patch tokens.

        Pass `embed_dim` and `mlp_ratio` (or use `for_model`) to get the FLOPs ratio.
        `early_target(P)` is the patch count `early<P>` brings the tokens to (default round(P% ·
        num_patches); LLaVA-NeXT scales it to what the unpruned model feeds the language model)."""
        if depth < 1 or num_patches < 1:
            raise ScheduleError(f"need depth ≥ 1 and num_patches ≥ 1, got {depth} and {num_patches}")
        kind, arg = parse_spec(spec)
        if kind == "degree":
            return cls(spec, depth, num_patches, _degree_drops(spec, *arg, depth, num_patches), num_protected,
                       embed_dim, mlp_ratio, "degree", arg[2])
        if kind == "none":
            drops = (0,) * depth
        elif kind == "dynamic":
            drops = None
        elif kind == "early":
            percent, blocks = arg
            target = None if early_target is None else early_target(percent)
            drops = _early_drops(spec, percent, depth // 2 if blocks is None else blocks, depth, num_patches, target)
        elif kind == "r":
            drops = arg
        else:
            drops = _read_calibration(arg, depth, num_patches)
        if drops is not None:
            if len(drops) > depth:
                raise ScheduleError(f"keep schedule {spec!r} lists {len(drops)} blocks but the model has {depth}")
            drops = tuple(drops) + (0,) * (depth - len(drops))
            _check_limits(spec, drops, num_patches)
        return cls(spec, depth, num_patches, drops, num_protected, embed_dim, mlp_ratio)

    @classmethod
    def for_model(cls, spec: "str | KeepSchedule", info) -> "KeepSchedule":
        """`spec` resolved for a model described by `info` (an adapter's ModelInfo). A schedule
        resolved before must fit the model's depth and patches; it takes the model's other facts."""
        if isinstance(spec, KeepSchedule):
            if (spec.depth, spec.num_patches) != (info.depth, info.num_patches):
                raise ScheduleError(f"keep schedule {spec.spec!r} was resolved for depth {spec.depth} and "
                                    f"{spec.num_patches} patches, but the model has depth {info.depth} and "
                                    f"{info.num_patches} patches")
            return dataclasses.replace(spec, num_protected=info.num_protected, embed_dim=info.embed_dim,
                                       mlp_ratio=info.mlp_ratio, spans=info.spans, unit_tokens=info.unit_tokens,
                                       window_tokens=info.window_tokens)
        return dataclasses.replace(cls.parse(spec, info.depth, info.num_patches, num_protected=info.num_protected,
                                             embed_dim=info.embed_dim, mlp_ratio=info.mlp_ratio,
                                             early_target=info.early_target), spans=info.spans,
                                   unit_tokens=info.unit_tokens, window_tokens=info.window_tokens)

    @property
    def is_static(self) -> bool:
        return self.drops is not None

    def require_static(self) -> None:
        if not self.is_static:
            raise ScheduleError(NOT_EXPORTABLE)

    @property
    def pruning_blocks(self) -> list[int]:
        if self.drops is None:
            return list(range(self.depth // 2))
        return [i for i, r in enumerate(self.drops) if r > 0]

    @property
    def blocks_at_any_size(self) -> list[int]:
        """The blocks this schedule may prune when resolved for another token count (images of
        another size): an `early` schedule's whole stage, else its pruning blocks."""
        kind, arg = parse_spec(self.spec)
        if kind == "early":
            return list(range(self.depth // 2 if arg[1] is None else arg[1]))
        return self.pruning_blocks

    def patch_counts(self) -> list[int]:
        """Patch tokens entering each block, plus the count after the last block."""
        counts = [self.num_patches]
        for r in self.drops or (0,) * self.depth:
            counts.append(counts[-1] - r)
        return counts

    def macs(self) -> float:
        """Multiply-accumulates of the transformer blocks under this schedule (static only)."""
        self.require_static()
        if self.embed_dim is None or self.mlp_ratio is None:
            raise ScheduleError("the FLOPs ratio needs the model's width and MLP ratio: resolve the schedule "
                                "with KeepSchedule.for_model or saint_export.resolve_schedule")
        counts = self.patch_counts()
        spans = self.spans or (1,) * self.depth
        # The blocks a pruning block stands for run on its tokens in, within windows where the model
        # has them; the pruning block itself attends fully.
        return sum((span - 1) * _block_macs(counts[i], counts[i], self, windowed=True)
                   + _block_macs(counts[i], counts[i + 1], self, windowed=False) for i, span in enumerate(spans))

    def flops_ratio(self) -> float:
        """Transformer-block MACs of this schedule over the unpruned model's (static only)."""
        return self.macs() / dataclasses.replace(self, drops=(0,) * self.depth).macs()

    def table(self) -> str:
        """The per-block table: block, tokens in, dropped, tokens out."""
        p = self.num_protected
        lines = [f"keep schedule {self.spec!r}: depth {self.depth}, {self.num_patches} patches + {p} protected"]
        names = list(range(self.depth))
        if self.spans and max(self.spans) > 1:  # some of the model's blocks: name them by the model's index
            names = [sum(self.spans[:i + 1]) - 1 for i in range(self.depth)]
            lines = [f"keep schedule {self.spec!r}: {self.depth} pruning blocks ({', '.join(map(str, names))}) of "
                     f"{sum(self.spans)}, {self.num_patches} tokens + {p} protected"]
        if self.rule == "degree":
            block = self.pruning_blocks[0]
            steps = degree_steps(self.patch_counts()[block], self.patch_counts()[block + 1], self.r0)
            lines.append(f"rule: iterative full-graph degree in block {block}, rounds dropping "
                         f"{', '.join(map(str, steps))}")
        lines += [f"{'block':>5}  {'tokens in':>9}  {'dropped':>7}  {'tokens out':>10}"]
        if self.drops is None:
            for i in range(self.depth):
                r = "dynamic" if i < self.depth // 2 else "0"
                lines.append(f"{i:>5}  {'?':>9}  {r:>7}  {'?':>10}")
            lines.append("FLOPs ratio: data-dependent (dynamic)")
            return "\n".join(lines)
        counts = self.patch_counts()
        for i, r in enumerate(self.drops):
            lines.append(f"{names[i]:>5}  {counts[i] + p:>9}  {r:>7}  {counts[i + 1] + p:>10}")
        if self.embed_dim is None:
            lines.append("FLOPs ratio: needs the model's width (KeepSchedule.for_model)")
        else:
            lines.append(f"FLOPs ratio to unpruned (transformer blocks): {self.flops_ratio():.3f}"
                         f"  (ideal speed-up {1 / self.flops_ratio():.2f}x)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        counts = self.patch_counts() if self.drops else None
        return {
            "spec": self.spec, "depth": self.depth, "num_patches": self.num_patches,
            "num_protected": self.num_protected,
            "blocks": None if self.drops is None else [
                {"block": i, "tokens_in": counts[i] + self.num_protected, "dropped": r,
                 "tokens_out": counts[i + 1] + self.num_protected} for i, r in enumerate(self.drops)],
            "flops_ratio": None if self.drops is None or self.embed_dim is None else self.flops_ratio(),
            "rule": self.rule, **({"r0": self.r0} if self.rule == "degree" else {}),
        }


_DEGREE = re.compile(r"degree(\d+)@(\d+)(?:/(\d+))?")
_EARLY = re.compile(r"early(\d+(?:\.\d+)?)(?:@(\d+))?")
_R_LIST = re.compile(r"r:(\d+(?:,\d+)*)")


def parse_spec(spec: str):
    """Syntax only (no model needed): returns (kind, argument) or raises ScheduleError."""
    if not isinstance(spec, str):
        raise ScheduleError(f"keep schedule must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if text in ("none", "dynamic"):
        return text, None
    if m := _EARLY.fullmatch(text):
        percent = float(m.group(1))
        if not 0 < percent <= 100:
            raise ScheduleError(f"keep schedule {spec!r}: the percentage must be in (0, 100]")
        blocks = int(m.group(2)) if m.group(2) else None
        if blocks == 0:
            raise ScheduleError(f"keep schedule {spec!r}: the stage needs at least one block (@1 or more)")
        return "early", (percent, blocks)
    if m := _R_LIST.fullmatch(text):
        return "r", tuple(int(v) for v in m.group(1).split(","))
    if m := _DEGREE.fullmatch(text):
        return "degree", (int(m.group(1)), int(m.group(2)), int(m.group(3) or DEGREE_R0))
    if text.startswith("calib:") and len(text) > len("calib:"):
        return "calib", Path(text[len("calib:"):])
    raise ScheduleError(
        f"malformed keep schedule {spec!r}: expected none, dynamic, early<P>, early<P>@<B>, "
        "r:<r0>,<r1>,…, calib:<file.json> or degree<N>@<L>[/<r0>]")


def _early_drops(text, percent, stage, depth, num_patches, target=None):
    if stage > depth:
        raise ScheduleError(f"keep schedule {text!r}: the stage has {stage} blocks but the model has {depth}")
    if stage == 0:
        raise ScheduleError(f"keep schedule {text!r}: a {depth}-block model has no early stage; use early<P>@<B>")
    if target is None:
        target = math.floor(percent / 100 * num_patches + 0.5)
    if target < 1:
        raise ScheduleError(f"keep schedule {text!r}: keeps {target} of {num_patches} patches; "
                            "at least one patch token must remain")
    drops, n = [], num_patches
    for block in range(stage):
        r = min(math.ceil((n - target) / (stage - block)), max_drop(n))
        drops.append(r)
        n -= r
    if n != target:
        raise ScheduleError(
            f"keep schedule {text!r}: cannot reach {target} of {num_patches} patches in {stage} blocks "
            f"(each block drops at most half; the budget recursion ends at {n}): keep more or use more blocks")
    return drops


def degree_steps(num_patches: int, keep: int, r0: int = DEGREE_R0) -> list[int]:
    """The degree rule's drops per round: r = min(n − keep, n // r_prev), starting from r0.

    The released code reuses the divisor as the step, so steps oscillate (576 → 375 drops 36, 15,
    35, 14, 34, 13, 33, 12, 9); they depend on the counts only, so they unroll statically."""
    steps, n, r = [], num_patches, r0
    while n > keep:
        r = min(n - keep, n // r)
        if r < 1:
            raise ScheduleError(f"the degree rule stalls at {n} patches (its step n // {steps[-1] if steps else r0} "
                                "is 0); use a smaller /<r0>")
        steps.append(r)
        n -= r
    return steps


def _degree_drops(text, keep, block, r0, depth, num_patches):
    if block >= depth:
        raise ScheduleError(f"keep schedule {text!r}: block {block} does not exist (the model has blocks 0 … "
                            f"{depth - 1})")
    if not 1 <= keep < num_patches:
        raise ScheduleError(f"keep schedule {text!r}: keeps {keep} of {num_patches} patches; expected 1 … "
                            f"{num_patches - 1}")
    if r0 < 1:
        raise ScheduleError(f"keep schedule {text!r}: the step divisor r0 must be ≥ 1")
    degree_steps(num_patches, keep, r0)
    drops = [0] * depth
    drops[block] = num_patches - keep
    return drops


def _check_limits(text, drops, num_patches):
    n = num_patches
    for block, r in enumerate(drops):
        problem = drop_problem(n, r)
        if problem:
            raise ScheduleError(f"keep schedule {text!r}: block {block} {problem}")
        n -= r


CALIBRATION_FORMAT = "saint-export-calibration/1"


@dataclass(frozen=True)
class Calibration:
    """Per-block budgets measured with the dynamic method (what `calib:<file>` reads).

    `per_image_drops[i][b]` is the r that block b chose for image i alone; `drops` is their
    `percentile`, floored and kept within the per-block limits."""
    model: str
    depth: int
    num_patches: int
    tau: float
    K: int
    gamma: float
    percentile: float
    per_image_drops: list
    drops: list

    def to_json(self) -> str:
        return json.dumps({"format": CALIBRATION_FORMAT, **dataclasses.asdict(self)}, indent=1) + "\n"

    def save(self, path: Path) -> Path:
        from .artifacts import atomic_write_text

        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        data = json.loads(Path(path).read_text())
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def _read_calibration(path: Path, depth: int, num_patches: int):
    """The drops of a calibration file: ours, or any JSON with a 'drops' list."""
    try:
        data = json.loads(path.read_text())
        drops = data["drops"]
    except FileNotFoundError:
        raise ScheduleError(f"calibration file {str(path)!r} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ScheduleError(f"calibration file {str(path)!r} is not a saint-export calibration "
                            f"(expected JSON with a 'drops' list): {err}") from None
    if not (isinstance(drops, list) and all(isinstance(r, int) and r >= 0 for r in drops)):
        raise ScheduleError(f"calibration file {str(path)!r}: 'drops' must be a list of non-negative integers")
    for key, expected in (("depth", depth), ("num_patches", num_patches)):
        if key in data and data[key] != expected:
            raise ScheduleError(f"calibration file {str(path)!r} was measured with {key}={data[key]}, "
                                f"but this model has {key}={expected}")
    return drops


def _block_macs(patches_in: int, patches_out: int, s: KeepSchedule, windowed: bool) -> float:
    """MACs of one pre-norm block: attention on the tokens in, MLP on the tokens kept. Windowed
    attention counts each token against a window's worth of keys, thinned in proportion to the
    tokens left (survivors spread over the windows), as per-window attention costs."""
    unit = s.unit_tokens
    n_in, n_out, c = (patches_in + s.num_protected) * unit, (patches_out + s.num_protected) * unit, s.embed_dim
    attended = n_in
    if windowed and s.window_tokens is not None:
        unpruned = (s.num_patches + s.num_protected) * unit
        attended = min(s.window_tokens, unpruned) * n_in / unpruned
    attention = 4 * n_in * c * c + 2 * n_in * attended * c  # qkv + proj, QKᵀ + AV
    mlp = 2 * n_out * c * int(c * s.mlp_ratio)
    return attention + mlp
