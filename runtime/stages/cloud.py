"""The cloud stage: each tile's cloud and shadow masks, clear fraction, and the gate's verdict.

Cloud gating at source is the flight-proven use of onboard AI: Φ-Sat-1 dropped images over 70 %
cloud and saved about 30 % of its downlink.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onboard.runtime.errors import ConfigError
from onboard.runtime.inference import NODATA_CLASS, Predictor
from onboard.runtime.sources.base import Tile

CLEAR, CLOUD, SHADOW = 0, 1, 2
ACTIONS = ("drop", "demote")


@dataclass(frozen=True)
class CloudGate:
    """Tiles with more than ``max_cloud_fraction`` cloud (plus shadow, if counted) are dropped
    or demoted (kept, at lower downlink priority)."""

    max_cloud_fraction: float = 0.7
    action: str = "drop"
    count_shadow: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_cloud_fraction <= 1.0:
            raise ConfigError(f"max_cloud_fraction must be in [0, 1], got "
                              f"{self.max_cloud_fraction}")
        if self.action not in ACTIONS:
            raise ConfigError(f"cloud gate action must be one of {ACTIONS}, got {self.action!r}")


@dataclass
class CloudVerdict:
    """What the cloud stage found in one tile and what the gate decided."""

    mask: np.ndarray  # (H, W) uint8: 0 clear, 1 cloud, 2 shadow, 255 no data
    cloud_fraction: float
    shadow_fraction: float
    clear_fraction: float
    decision: str  # "keep" | "drop" | "demote"
    reason: str


class CloudStage:
    def __init__(self, predictor: Predictor, gate: CloudGate | None = None) -> None:
        if predictor.engine.manifest.task != "cloud":
            raise ConfigError(f"the cloud stage needs a cloud bundle, got task "
                              f"{predictor.engine.manifest.task!r} "
                              f"({predictor.engine.bundle.path.name})")
        self.predictor = predictor
        self.gate = gate or CloudGate()

    def process(self, tile: Tile) -> CloudVerdict:
        output = self.predictor.run([self.predictor.prepare(tile.frame)])[0]
        mask = self.predictor.to_product(output, tile.frame)[0]
        core = mask[tile.placement.core.relative_to(tile.placement.window).slices]
        return self.verdict(core, mask)

    def verdict(self, core: np.ndarray, mask: np.ndarray) -> CloudVerdict:
        """Fractions over the pixels the tile owns that carry data."""
        known = core != NODATA_CLASS
        n = max(int(known.sum()), 1)
        cloud = float((core == CLOUD).sum() / n)
        shadow = float((core == SHADOW).sum() / n)
        clear = float((core == CLEAR).sum() / n)
        covered = cloud + shadow if self.gate.count_shadow else cloud
        what = "cloud and shadow" if self.gate.count_shadow else "cloud"
        if not known.any():
            return CloudVerdict(mask, 0.0, 0.0, 0.0, self.gate.action, "no valid pixels")
        if covered > self.gate.max_cloud_fraction:
            reason = (f"{covered:.0%} {what} > {self.gate.max_cloud_fraction:.0%} limit")
            return CloudVerdict(mask, cloud, shadow, clear, self.gate.action, reason)
        reason = f"{covered:.0%} {what} <= {self.gate.max_cloud_fraction:.0%} limit"
        return CloudVerdict(mask, cloud, shadow, clear, "keep", reason)
