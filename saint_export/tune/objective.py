"""The objective grammar: what the user asks `tune` for, and the risk each quality objective bounds.

    speedup>=X          the chosen schedule's median speed-up, met on its lower confidence bound
    latency-ms<=X       its median milliseconds per batch, met on the upper bound
    disagreement<=P%    the share of images whose top-1 class changes, certified ≤ P%
    accuracy-drop<=P%   certified through the disagreement (an image can only lose its correct
                        class if its prediction changes), so labels are needed only to report it
    cosine>=X[@Q%]      at least Q% (default 90%) of images keep an output cosine ≥ X with the
                        unpruned model, i.e. the share below X is certified ≤ 100 − Q%

Percentages carry their sign: `disagreement<=1` is refused, not read as 1% or 100%.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

GRAMMAR = ("speedup>=X", "latency-ms<=X", "disagreement<=P%", "accuracy-drop<=P%", "cosine>=X[@Q%]")
COSINE_SHARE = 0.9  # the share of images `cosine>=X` holds for, unless it says @Q%
_PATTERN = re.compile(r"\s*(speedup>=|latency-ms<=|disagreement<=|accuracy-drop<=|cosine>=)\s*([0-9.]+)\s*(%?)"
                      r"\s*(?:@\s*([0-9.]+)\s*(%?))?\s*")


@dataclass(frozen=True)
class Objective:
    kind: str  # speedup | latency-ms | disagreement | accuracy-drop | cosine
    limit: float  # speed-up (x), milliseconds, a fraction (disagreement, accuracy drop) or a cosine
    text: str
    share: float = COSINE_SHARE  # cosine only: the share of images that must reach `limit`

    @property
    def on_speed(self) -> bool:
        return self.kind in ("speedup", "latency-ms")

    @property
    def risk_limit(self) -> float | None:
        """The largest failure rate the certificate allows (quality objectives): disagreements, or
        images whose cosine falls below the limit."""
        if self.on_speed:
            return None
        return 1 - self.share if self.kind == "cosine" else self.limit

    @classmethod
    def parse(cls, text: str) -> "Objective":
        match = _PATTERN.fullmatch(str(text))
        if not match:
            raise InputError(f"objective {text!r}: expected one of {', '.join(GRAMMAR)} (e.g. speedup>=2, "
                             "disagreement<=1%)")
        kind, value, percent, share, share_percent = match[1].rstrip("<=>"), float(match[2]), bool(match[3]), \
            match[4], bool(match[5])
        if share is not None and kind != "cosine":
            raise InputError(f"objective {text!r}: only cosine takes @Q% (the share of images)")
        if kind in ("disagreement", "accuracy-drop"):
            if not percent:
                raise InputError(f"objective {text!r}: write the {kind} as a percentage, e.g. {kind}<={value:g}%")
            if not 0 < value < 100:
                raise InputError(f"objective {text!r}: the {kind} must be within (0, 100)%")
            return cls(kind, value / 100, text.strip())
        if kind == "cosine":
            if percent or not 0 < value <= 1:
                raise InputError(f"objective {text!r}: the cosine must be a number in (0, 1]")
            if share is not None and (not share_percent or not 0 < float(share) < 100):
                raise InputError(f"objective {text!r}: the share of images must be a percentage in (0, 100), "
                                 "e.g. cosine>=0.99@95%")
            return cls(kind, value, text.strip(), COSINE_SHARE if share is None else float(share) / 100)
        if percent or value <= 0:
            raise InputError(f"objective {text!r}: the {kind} must be a positive number")
        return cls(kind, value, text.strip())
