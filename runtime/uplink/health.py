"""Was a pass healthy? Read from what the pipeline wrote: ``summary.json``, the scores of each
acquisition and the pass's telemetry, so a pass run in another process (or killed) is judged
the same way.

Unhealthy: the run raised or left no ``summary.json`` (a crash or a kill); a bundle was refused
when the stages were built (the golden fallback ran instead of the set); more tiles failed by the
model's fault (engine errors, deadlines, non-finite output: not unreadable frames or
backpressure) than ``max_failed_fraction``; more tiles with non-finite output than
``max_non_finite_fraction``; a score out of its range (a ``*_fraction`` outside [0, 1], or any
value not finite).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Failures that say nothing about the model: the frame, the buffer, the product maker.
_NOT_THE_MODEL = ("read:", "backpressure:", "product ")


@dataclass(frozen=True)
class HealthPolicy:
    """When a new set is rolled back: it must pass ``probation_passes`` passes in a row."""

    probation_passes: int = 2
    max_failed_fraction: float = 0.10
    max_non_finite_fraction: float = 0.02

    def to_dict(self) -> dict[str, Any]:
        return {"probation_passes": self.probation_passes,
                "max_failed_fraction": self.max_failed_fraction,
                "max_non_finite_fraction": self.max_non_finite_fraction}


@dataclass
class PassHealth:
    healthy: bool
    judged: bool  # False when the pass scored no tile: it proves nothing either way
    reasons: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    bundles: list[str] = field(default_factory=list)  # name@version as the STAC Items say

    def to_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "judged": self.judged, "reasons": self.reasons,
                "counts": self.counts, "bundles": self.bundles}


def _run_telemetry(out: Path) -> list[dict[str, Any]]:
    """The telemetry records of the last pass into ``out`` (the file is appended per run):
    from the last ``uplink_active`` record :func:`~.active.active_config` wrote, or else from
    the engines opened just before the last ``run_start``."""
    path = out / "telemetry.jsonl"
    if not path.is_file():
        return []
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run
            if isinstance(record, dict):
                records.append(record)
    kinds = [r.get("event") for r in records]
    if "uplink_active" in kinds:
        return records[len(kinds) - 1 - kinds[::-1].index("uplink_active"):]
    if "run_start" not in kinds:
        return records
    start = len(kinds) - 1 - kinds[::-1].index("run_start")
    while start > 0 and kinds[start - 1] in ("engine_open", "engine_built", "bundle_refused",
                                             "engine_cache_damaged"):
        start -= 1
    return records[start:]


def judge_pass(out: str | Path, policy: HealthPolicy, error: str | None = None) -> PassHealth:
    out = Path(out)
    events = _run_telemetry(out)
    bundles = sorted({f"{s.get('bundle')}@{s.get('version')}" for e in events
                      if e.get("event") == "run_start" for s in e.get("stages", [])})
    if error is not None:
        return PassHealth(False, True, [f"the run failed: {error}"], bundles=bundles)
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return PassHealth(False, True, [f"the run left no readable {out / 'summary.json'}: it "
                                        "crashed or was killed before the end of the pass"],
                          bundles=bundles)
    counts = {"tiles": 0, "failed_by_model": 0, "non_finite": 0, "out_of_range": 0,
              "stage_errors": 0, "stage_deadlines": 0, "bundles_refused": 0}
    reasons: list[str] = []
    for acquisition in summary.get("acquisitions", []):
        scores = out / f"scores-{acquisition['id']}.jsonl"
        try:
            lines = scores.read_text(encoding="utf-8").splitlines()
        except OSError:
            reasons.append(f"{scores.name} is missing: the pass did not record its scores")
            continue
        for line in lines:
            score = json.loads(line)
            counts["tiles"] += 1
            last = (score.get("reasons") or [""])[-1]
            if score.get("decision") == "failed" and not last.startswith(_NOT_THE_MODEL):
                counts["failed_by_model"] += 1
            if any("not finite" in r for r in score.get("reasons", [])):
                counts["non_finite"] += 1
            for key, value in score.get("values", {}).items():
                if not math.isfinite(value) or (key.endswith("_fraction")
                                                and not 0.0 <= value <= 1.0):
                    counts["out_of_range"] += 1
                    break
    refused = []
    for event in events:
        kind = event.get("event")
        if kind == "stage_error":
            counts["stage_errors"] += 1
        elif kind == "stage_deadline":
            counts["stage_deadlines"] += 1
        elif kind == "bundle_refused":
            counts["bundles_refused"] += 1
            refused.append(f"{event.get('path')}: {event.get('message')}")
    tiles = counts["tiles"]
    if refused:
        reasons.append(f"a bundle of the set was refused and the golden one ran instead: "
                       f"{refused[0]}")
    if tiles:
        failed = counts["failed_by_model"] / tiles
        if failed > policy.max_failed_fraction:
            reasons.append(f"{counts['failed_by_model']} of {tiles} tiles failed in the "
                           f"stages ({failed:.0%} > {policy.max_failed_fraction:.0%}; "
                           f"{counts['stage_errors']} stage errors, "
                           f"{counts['stage_deadlines']} deadlines)")
        non_finite = counts["non_finite"] / tiles
        if non_finite > policy.max_non_finite_fraction:
            reasons.append(f"{counts['non_finite']} of {tiles} tiles gave non-finite model "
                           f"output ({non_finite:.0%} > {policy.max_non_finite_fraction:.0%})")
        if counts["out_of_range"]:
            reasons.append(f"{counts['out_of_range']} of {tiles} tiles have scores out of "
                           "range")
    return PassHealth(not reasons, bool(tiles) or bool(reasons), reasons, counts, bundles)
