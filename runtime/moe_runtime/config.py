"""Runtime configuration: frozen dataclasses built once in `__main__` and passed down.

Owns `GatingConfig` (how the MoE block routes) and, as the serving issue grows it, `RuntimeConfig`.
No environment reads here or anywhere below `__main__`.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_runtime.errors import ConfigError

GATING_MODES = ("dynamic", "static")


@dataclass(frozen=True)
class GatingConfig:
    """How tokens reach experts.

    mode: "dynamic" (dropless, exact per-expert counts; the paper's contribution) or "static"
        (the fairseq/GShard capacity baseline).
    capacity_fraction: static only, dimensionless; per-expert capacity C = ceil(f * T) token-slots
        for T tokens in the batch (the paper's "capacity factor": 0.05 for its LM, 1.0 for MT; for
        E=8, top-2, f = 0.25 equals GShard's capacity factor 1.0).
    """

    mode: str = "dynamic"
    capacity_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in GATING_MODES:
            raise ConfigError(f"gating.mode must be one of {', '.join(GATING_MODES)}, got {self.mode!r}")
        if not self.capacity_fraction > 0:
            raise ConfigError(f"gating.capacity_fraction must be > 0, got {self.capacity_fraction}")
