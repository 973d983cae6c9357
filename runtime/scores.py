"""The one score and decision type: what every stage writes and the planner ranks.

A :class:`TileScore` follows one tile through the stages. Each stage adds the numbers it
measured (``values``: ``clear_fraction``, ``change``, ...) and may lower the decision, never
raise it: a tile a stage dropped stays dropped, whatever a later stage thinks of it. Every
change of decision carries its reason, so the plan can say why a tile came down or did not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Decision(enum.IntEnum):
    """Ordered: a lower decision wins when two stages disagree."""

    FAILED = 0  # the tile could not be processed (corrupt, engine error, non-finite output)
    DROP = 1  # not worth any downlink
    DEMOTE = 2  # kept, at lower priority
    KEEP = 3

    def __str__(self) -> str:
        return self.name.lower()


@dataclass
class TileScore:
    """What the stages found in one tile of one acquisition.

    ``window`` is (row, col, height, width) of the tile's core on the acquisition's grid: the
    pixels the tile owns (tiles overlap for context; cores do not).
    """

    tile_id: str  # unique and stable across restarts: "<acquisition>/<row>_<col>"
    acquisition: str
    window: tuple[int, int, int, int]
    decision: Decision = Decision.KEEP
    reasons: list[str] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)
    aoi_weight: float = 1.0  # > 1 inside the area of interest, as configured

    def lower(self, decision: Decision, reason: str) -> None:
        """Record a stage's verdict: the decision only ever goes down."""
        self.reasons.append(reason)
        if decision < self.decision:
            self.decision = decision

    def fail(self, reason: str) -> None:
        self.lower(Decision.FAILED, reason)

    @property
    def usable(self) -> bool:
        """Worth a product: neither failed nor dropped."""
        return self.decision >= Decision.DEMOTE

    def to_dict(self) -> dict[str, Any]:
        return {
            "tile_id": self.tile_id,
            "acquisition": self.acquisition,
            "window": list(self.window),
            "decision": str(self.decision),
            "reasons": list(self.reasons),
            "values": {k: round(float(v), 6) for k, v in self.values.items()},
            "aoi_weight": self.aoi_weight,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TileScore:
        return cls(
            tile_id=str(data["tile_id"]),
            acquisition=str(data["acquisition"]),
            window=tuple(int(v) for v in data["window"]),  # type: ignore[arg-type]
            decision=Decision[str(data["decision"]).upper()],
            reasons=list(data.get("reasons", [])),
            values={k: float(v) for k, v in data.get("values", {}).items()},
            aoi_weight=float(data.get("aoi_weight", 1.0)),
        )
