"""The downlink plan: which product of which tile goes down in which contact window.

Every usable tile offers a few products (thumbnail, mask, near-lossless, full), each with a size
and a value; at most one of them goes down. Filling a pass's byte budget is then a
multiple-choice knapsack, not a queue: a cloud-free changed tile in the area of interest may be
worth its full product, a hazy one only its mask, and a tile down in FIFO order is worth nothing
in particular.

The solver (:func:`plan`) is a greedy over each tile's convex hull of (bytes, value), the
classic LP-rounding heuristic for the multiple-choice knapsack, followed by an exchange step
around the split item and a fill of the leftover bytes. It runs over the total budget of all
windows, so a tile is not handed a thumbnail in the first pass when the second has room for its
full product; the chosen products are then packed into the windows in order of value per byte
(the best go down first), and what is left of each window is filled. Tens of thousands of
candidates take well under a second. :func:`exact_optimum` solves the same instance as an integer
program (scipy, ground side only) so the plan can report how far it is from the optimum.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.config import register_section
from onboard.runtime.durability import write_bytes
from onboard.runtime.errors import ConfigError, OnboardError
from onboard.runtime.scores import Decision, TileScore

DEFAULT_UTILITY: dict[str, float] = {
    "full": 1.0,
    "near_lossless": 0.9,
    "mask": 0.15,
    "thumbnail": 0.05,
}

# How many untaken hull steps after the split item the exchange step tries to force in: each
# try costs one fill (a few vectorised passes), and beyond a handful the gain is nil.
EXCHANGE_TRIES = 8


class PlanError(OnboardError, ValueError):
    """A candidate or window the planner cannot use (negative size, no tile id, ...)."""


def as_utc(moment: datetime) -> datetime:
    # A naive time is taken as UTC, like the config's date-times: comparing naive and aware
    # times would otherwise raise in the middle of a pass.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class ContactWindow:
    """One pass over a ground station: when, how long, how fast.

    ``margin`` is the share of the raw link bytes kept back for protocol overhead (CCSDS framing,
    CFDP PDU headers, retransmissions of NAKed segments): 5 % by default, so the budget is
    ``duration_s × bitrate_bps / 8 × (1 − margin)`` bytes, rounded down.
    """

    start: datetime
    duration_s: float
    bitrate_bps: float
    margin: float = 0.05
    # Bytes of the window already spent before products (the telemetry sent first at contact).
    reserved_bytes: int = 0

    def __post_init__(self) -> None:
        if self.reserved_bytes < 0:
            raise ConfigError(f"contact window at {self.start}: reserved_bytes must be >= 0, got "
                              f"{self.reserved_bytes}")
        if not (self.duration_s >= 0 and math.isfinite(self.duration_s)):
            raise ConfigError(f"contact window at {self.start}: duration_s must be a finite "
                              f"number >= 0, got {self.duration_s}")
        if not (self.bitrate_bps >= 0 and math.isfinite(self.bitrate_bps)):
            raise ConfigError(f"contact window at {self.start}: bitrate_bps must be a finite "
                              f"number >= 0, got {self.bitrate_bps}")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"contact window at {self.start}: margin must be in [0, 1), got "
                              f"{self.margin}")

    @property
    def budget_bytes(self) -> int:
        return max(0, int(self.capacity_bytes * (1 - self.margin)) - self.reserved_bytes)

    @property
    def capacity_bytes(self) -> int:
        """What the link itself carries in the window: the margin is kept back from the plan,
        not from the link, so that overhead beyond the estimate still goes down."""
        return int(self.duration_s * self.bitrate_bps / 8)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)

    def to_dict(self) -> dict[str, Any]:
        return {"start": as_utc(self.start).isoformat(), "end": as_utc(self.end).isoformat(),
                "duration_s": self.duration_s, "bitrate_bps": self.bitrate_bps,
                "margin": self.margin, "reserved_bytes": self.reserved_bytes,
                "budget_bytes": self.budget_bytes}


@dataclass(frozen=True)
class Candidate:
    """One product one tile could send down.

    ``nbytes`` is the product maker's estimate before the product is made and its real size
    after (``estimated`` says which); ``reason`` says how ``value`` was reached.
    """

    tile_id: str
    acquisition: str
    kind: str
    nbytes: int
    value: float
    reason: str = ""
    product_id: str = ""  # defaults to "<tile_id>/<kind>": the id the queue and ground use
    acquired: datetime | None = None
    estimated: bool = True

    def __post_init__(self) -> None:
        if not self.tile_id:
            raise PlanError(f"candidate {self.kind!r}: empty tile_id")
        if isinstance(self.nbytes, bool) or not isinstance(self.nbytes, (int, np.integer)):
            raise PlanError(f"candidate {self.tile_id}/{self.kind}: nbytes must be an integer, "
                            f"got {self.nbytes!r}")
        if self.nbytes <= 0:
            raise PlanError(f"candidate {self.tile_id}/{self.kind}: nbytes must be > 0, got "
                            f"{self.nbytes}")
        if not (self.value >= 0 and math.isfinite(self.value)):
            raise PlanError(f"candidate {self.tile_id}/{self.kind}: value must be a finite "
                            f"number >= 0, got {self.value}")
        if not self.product_id:
            object.__setattr__(self, "product_id", f"{self.tile_id}/{self.kind}")
        object.__setattr__(self, "nbytes", int(self.nbytes))

    @property
    def value_per_byte(self) -> float:
        return self.value / self.nbytes


@dataclass(frozen=True)
class PlannerConfig:
    """``[planner]``: what a product is worth.

    A product's value is ``utility[kind] × clear × (1 + change_weight × change) × aoi_weight ×
    0.5 ** (age / age_half_life_s)``, times ``demote_factor`` for a demoted tile. A score the
    stages did not measure is unknown, not zero: it takes its prior (``clear_prior``,
    ``change_prior``). ``age_half_life_s = 0`` turns ageing off.
    """

    utility: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_UTILITY))
    change_weight: float = 1.0
    change_prior: float = 0.5
    clear_prior: float = 1.0
    age_half_life_s: float = 86400.0
    demote_factor: float = 0.3
    baseline_kind: str = "full"  # the product "downlink everything" would send

    def __post_init__(self) -> None:
        if not self.utility:
            raise ConfigError("[planner] utility: needs at least one product kind")
        for kind, utility in self.utility.items():
            if not (utility >= 0 and math.isfinite(utility)):
                raise ConfigError(f"[planner] utility.{kind}: must be a finite number >= 0, "
                                  f"got {utility}")
        for name in ("change_weight", "age_half_life_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"[planner] {name}: must be a finite number >= 0, got {value}")
        for name in ("change_prior", "clear_prior", "demote_factor"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"[planner] {name}: must be in [0, 1], got {value}")


register_section("planner", PlannerConfig, doc="downlink planner: value of each product kind")


def value_of(score: TileScore, kind: str, now: datetime, acquired: datetime | None,
             config: PlannerConfig) -> tuple[float, str]:
    """What ``kind`` of ``score``'s tile is worth at ``now``, and why in a few words.

    A dropped or failed tile is worth nothing (:func:`candidates_for` gives it no candidate).
    """
    if not score.usable:
        why = "; ".join(score.reasons) or "no reason recorded"
        return 0.0, f"{score.decision}: {why}"
    utility = config.utility.get(kind)
    if utility is None:
        raise ConfigError(f"[planner] utility: no value for product kind {kind!r}; known: "
                          f"{sorted(config.utility)}")
    parts = [f"{kind} {utility:g}"]

    clear = score.values.get("clear_fraction")
    if clear is None or not math.isfinite(clear):
        clear = config.clear_prior
        parts.append(f"clear unknown ({clear:g})")
    else:
        clear = min(max(float(clear), 0.0), 1.0)
        parts.append(f"clear {clear:.2f}")

    change = score.values.get("change")
    if change is None or not math.isfinite(change):
        change = config.change_prior
        parts.append(f"change unknown ({change:g})")
    else:
        change = min(max(float(change), 0.0), 1.0)
        parts.append(f"change {change:.2f}")
    interest = 1.0 + config.change_weight * change

    aoi = max(float(score.aoi_weight), 0.0)
    if aoi != 1.0:
        parts.append(f"aoi {aoi:g}")

    age_factor = 1.0
    if acquired is None:
        parts.append("age unknown")
    elif config.age_half_life_s > 0:
        age_s = max((as_utc(now) - as_utc(acquired)).total_seconds(), 0.0)
        age_factor = 0.5 ** (age_s / config.age_half_life_s)
        parts.append(f"age {age_s / 3600:.1f} h ({age_factor:.2f})")

    demote = config.demote_factor if score.decision == Decision.DEMOTE else 1.0
    if score.decision == Decision.DEMOTE:
        parts.append(f"demoted ({demote:g})")
    value = utility * clear * interest * aoi * age_factor * demote
    return value, " x ".join(parts)


def candidates_for(score: TileScore, sizes: Mapping[str, int], now: datetime,
                   acquired: datetime | None, config: PlannerConfig) -> list[Candidate]:
    """One candidate per product kind in ``sizes`` (kind -> estimated bytes); none for a
    dropped or failed tile."""
    if not score.usable:
        return []
    out = []
    for kind, nbytes in sizes.items():
        value, reason = value_of(score, kind, now, acquired, config)
        out.append(Candidate(score.tile_id, score.acquisition, kind, int(nbytes), value, reason,
                             acquired=acquired))
    return out


# -- the solver ------------------------------------------------------------------------------


class _Instance:
    """The usable candidates as flat arrays, each tile's options sorted into its Pareto front
    (more bytes only for more value)."""

    def __init__(self, candidates: Sequence[Candidate], eligible: Sequence[int]) -> None:
        by_tile: dict[str, list[int]] = {}
        for index in eligible:
            by_tile.setdefault(candidates[index].tile_id, []).append(index)
        self.tiles = list(by_tile)
        self.front: list[list[int]] = []  # per tile: candidate indices, bytes ascending
        self.dominated: dict[int, int] = {}  # candidate index -> the one that dominates it
        for indices in by_tile.values():
            indices.sort(key=lambda i: (candidates[i].nbytes, -candidates[i].value, i))
            front: list[int] = []
            for i in indices:
                if front and candidates[i].value <= candidates[front[-1]].value:
                    self.dominated[i] = front[-1]
                else:
                    front.append(i)
            self.front.append(front)
        option_tile, option_cand = [], []
        for t, front in enumerate(self.front):
            for i in front:
                option_tile.append(t)
                option_cand.append(i)
        self.option_tile = np.asarray(option_tile, dtype=np.int64)
        self.option_cand = np.asarray(option_cand, dtype=np.int64)
        self.option_bytes = np.asarray([candidates[i].nbytes for i in option_cand],
                                       dtype=np.float64)
        self.option_value = np.asarray([candidates[i].value for i in option_cand],
                                       dtype=np.float64)
        # Per candidate index, so the fill can look up a tile's current choice in one gather.
        self.cand_bytes = np.asarray([c.nbytes for c in candidates] or [0], dtype=np.float64)
        self.cand_value = np.asarray([c.value for c in candidates] or [0], dtype=np.float64)
        self.candidates = candidates

    def bytes_of(self, index: int) -> int:
        return 0 if index < 0 else self.candidates[index].nbytes

    def value_of(self, index: int) -> float:
        return 0.0 if index < 0 else self.candidates[index].value


def _hull(candidates: Sequence[Candidate], front: list[int]) -> list[int]:
    """The upper convex hull of (bytes, value) from the origin: the options an LP relaxation
    would ever pick, their incremental efficiencies decreasing."""
    hull: list[tuple[float, float, int]] = [(0.0, 0.0, -1)]
    for i in front:
        w, v = candidates[i].nbytes, candidates[i].value
        while len(hull) >= 2:
            (w1, v1, _), (w2, v2, _) = hull[-2], hull[-1]
            if (v2 - v1) * (w - w1) <= (v - v1) * (w2 - w1):
                hull.pop()  # on or below the chord: never the LP's choice
            else:
                break
        hull.append((w, v, i))
    return [i for _, _, i in hull[1:]]


@dataclass
class _Solution:
    choice: np.ndarray  # per tile: candidate index or -1
    remaining: int

    def copy(self) -> _Solution:
        return _Solution(self.choice.copy(), self.remaining)


def _total(inst: _Instance, solution: _Solution | np.ndarray) -> float:
    choice = solution.choice if isinstance(solution, _Solution) else solution
    return float(inst.cand_value[choice[choice >= 0]].sum())


def _fill(inst: _Instance, solution: _Solution, by_gain: bool,
          allowed: np.ndarray | None = None) -> None:
    """Spend the leftover bytes on the upgrades (or new products) that still fit, best first by
    efficiency (or by plain gain: on a small leftover one big gain can beat many dense ones)."""
    if inst.option_tile.size == 0:
        return
    while True:
        current = solution.choice[inst.option_tile]
        has = current >= 0
        safe = np.where(has, current, 0)
        cur_bytes = np.where(has, inst.cand_bytes[safe], 0.0)
        cur_value = np.where(has, inst.cand_value[safe], 0.0)
        extra = inst.option_bytes - cur_bytes
        gain = inst.option_value - cur_value
        ok = (gain > 0) & (extra > 0) & (extra <= solution.remaining)
        if allowed is not None:
            ok &= allowed[inst.option_tile]
        if not ok.any():
            return
        score = gain if by_gain else gain / np.where(extra > 0, extra, 1.0)
        best = int(np.argmax(np.where(ok, score, -np.inf)))
        tile = int(inst.option_tile[best])
        solution.remaining -= int(extra[best])
        solution.choice[tile] = int(inst.option_cand[best])


def _best_fill(inst: _Instance, solution: _Solution,
               allowed: np.ndarray | None = None) -> _Solution:
    results = []
    for by_gain in (False, True):
        trial = solution.copy()
        _fill(inst, trial, by_gain, allowed)
        results.append(trial)
    return max(results, key=lambda s: _total(inst, s))


def _solve(inst: _Instance, budget: int) -> _Solution:
    """The MCKP heuristic for one budget: hull greedy, exchange around the split, fill."""
    candidates = inst.candidates
    steps: list[tuple[float, int, int, int]] = []  # (-efficiency, tile, hull position, index)
    for t, front in enumerate(inst.front):
        previous_w, previous_v = 0, 0.0
        for k, i in enumerate(_hull(candidates, front)):
            w, v = candidates[i].nbytes, candidates[i].value
            steps.append((-(v - previous_v) / (w - previous_w), t, k, i))
            previous_w, previous_v = w, v
    steps.sort()

    greedy = _Solution(np.full(len(inst.tiles), -1, dtype=np.int64), budget)
    level = [0] * len(inst.tiles)  # hull steps taken per tile
    history: list[tuple[int, int]] = []  # (tile, choice before), in the order taken
    untaken: list[tuple[int, int]] = []  # (tile, index) of the first steps that did not fit
    for _, t, k, i in steps:
        if level[t] != k:
            continue  # an earlier step of this tile did not fit: its chain is broken
        extra = candidates[i].nbytes - inst.bytes_of(int(greedy.choice[t]))
        if extra <= greedy.remaining:
            history.append((t, int(greedy.choice[t])))
            greedy.choice[t] = i
            greedy.remaining -= extra
            level[t] += 1
        elif len(untaken) < EXCHANGE_TRIES:
            untaken.append((t, i))

    best = _best_fill(inst, greedy)
    best_value = _total(inst, best)
    # Exchange: force one of the first steps that did not fit, make room by undoing the
    # greedy's last (least efficient) steps of other tiles, then fill.
    for t, i in untaken:
        trial = greedy.copy()
        trial.remaining -= candidates[i].nbytes - inst.bytes_of(int(trial.choice[t]))
        trial.choice[t] = i
        for tile, before in reversed(history):
            if trial.remaining >= 0:
                break
            if tile == t:
                continue
            trial.remaining += inst.bytes_of(int(trial.choice[tile])) - inst.bytes_of(before)
            trial.choice[tile] = before
        if trial.remaining < 0:
            continue
        trial = _best_fill(inst, trial)
        value = _total(inst, trial)
        if value > best_value + 1e-12:
            best, best_value = trial, value
    return best


# -- the plan --------------------------------------------------------------------------------


@dataclass
class Plan:
    """The chosen products per window, and why every candidate was or was not chosen."""

    windows: list[ContactWindow]
    candidates: list[Candidate]
    window_of: dict[int, int]  # candidate index -> window index (in time order)
    why: list[str]
    baseline_value: float = 0.0  # "downlink everything": full products, FIFO by acquisition
    baseline_bytes: int = 0
    config: PlannerConfig = field(default_factory=PlannerConfig)

    @property
    def budgets(self) -> list[int]:
        return [w.budget_bytes for w in self.windows]

    @property
    def bytes_per_window(self) -> list[int]:
        used = [0] * len(self.windows)
        for index, w in self.window_of.items():
            used[w] += self.candidates[index].nbytes
        return used

    @property
    def value(self) -> float:
        return float(sum(self.candidates[i].value for i in self.window_of))

    def chosen(self, window: int | None = None) -> list[Candidate]:
        """The chosen products in sending order: by window, then value per byte."""
        picked = [(w, i) for i, w in self.window_of.items() if window is None or w == window]
        picked.sort(key=lambda p: (p[0], -self.candidates[p[1]].value_per_byte, p[1]))
        return [self.candidates[i] for _, i in picked]

    def window_index(self, product_id: str) -> int | None:
        for index, w in self.window_of.items():
            if self.candidates[index].product_id == product_id:
                return w
        return None

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for index, c in enumerate(self.candidates):
            out.append({
                "tile_id": c.tile_id,
                "acquisition": c.acquisition,
                "kind": c.kind,
                "product_id": c.product_id,
                "bytes": c.nbytes,
                "estimated": c.estimated,
                "value": round(c.value, 9),
                "value_per_byte": c.value_per_byte,
                "chosen": self.window_of.get(index),
                "why": self.why[index],
                "value_reason": c.reason,
            })
        return out

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for c in self.chosen():
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        return {
            "windows": [w.to_dict() for w in self.windows],
            "budget_bytes": self.budgets,
            "planned_bytes": self.bytes_per_window,
            "candidates": len(self.candidates),
            "tiles": len({c.tile_id for c in self.candidates}),
            "chosen": len(self.window_of),
            "chosen_by_kind": kinds,
            "value": self.value,
            "baseline_value": self.baseline_value,
            "baseline_bytes": self.baseline_bytes,
            "baseline": f"every {self.config.baseline_kind} product, FIFO in acquisition order",
        }

    def write(self, path: str | Path) -> Path:
        """The audit file: one row per candidate, CSV for a ``.csv`` path, JSON lines
        otherwise; written atomically."""
        path = Path(path)
        rows = self.rows()
        if path.suffix.lower() == ".csv":
            buffer = io.StringIO()
            columns = list(rows[0]) if rows else ["tile_id", "kind", "bytes", "value", "chosen",
                                                  "why"]
            writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
            text = buffer.getvalue()
        else:
            text = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
        return write_bytes(path, text.encode("utf-8"))


def _fifo_baseline(candidates: Sequence[Candidate], budgets: Sequence[int],
                   kind: str) -> tuple[float, int]:
    """"Downlink everything": each tile's ``kind`` product in acquisition order, a window
    closing at the first product that does not fit what is left of it."""
    earliest = datetime.min.replace(tzinfo=timezone.utc)
    queue = sorted((c for c in candidates if c.kind == kind),
                   key=lambda c: (as_utc(c.acquired) if c.acquired else earliest, c.acquisition,
                                  c.tile_id))
    value, sent, position = 0.0, 0, 0
    for budget in budgets:
        left = budget
        while position < len(queue) and queue[position].nbytes <= left:
            left -= queue[position].nbytes
            value += queue[position].value
            sent += queue[position].nbytes
            position += 1
    return value, sent


_Packing = tuple[np.ndarray, np.ndarray, list[int]]  # choice, window per tile, bytes left


def _pack(inst: _Instance, selection: np.ndarray, budgets: Sequence[int],
          largest_first: bool) -> _Packing:
    """Put each selected product in a window: densest first into the first window with room,
    or largest first into the tightest window with room. A product that fits nowhere falls
    back to the best smaller product of its tile that does."""
    candidates = inst.candidates
    remaining = list(budgets)
    assigned = np.full(len(inst.tiles), -1, dtype=np.int64)
    choice = np.full(len(inst.tiles), -1, dtype=np.int64)
    order = [t for t in range(len(inst.tiles)) if selection[t] >= 0]
    if largest_first:
        order.sort(key=lambda t: (-candidates[selection[t]].nbytes, t))
    else:
        order.sort(key=lambda t: (-candidates[selection[t]].value_per_byte,
                                  -candidates[selection[t]].value, t))
    for t in order:
        front = inst.front[t]
        top = front.index(int(selection[t]))
        for i in reversed(front[: top + 1]):
            size = candidates[i].nbytes
            fits = [w for w, left in enumerate(remaining) if size <= left]
            if fits:
                w = min(fits, key=lambda w: (remaining[w], w)) if largest_first else fits[0]
                remaining[w] -= size
                assigned[t], choice[t] = w, i
                break
    return choice, assigned, remaining


def _window_by_window(inst: _Instance, eligible: Sequence[int],
                      budgets: Sequence[int]) -> _Packing:
    """Each window in time order solved alone over the tiles earlier windows left."""
    candidates = inst.candidates
    tile_index = {tile: t for t, tile in enumerate(inst.tiles)}
    remaining = list(budgets)
    assigned = np.full(len(inst.tiles), -1, dtype=np.int64)
    choice = np.full(len(inst.tiles), -1, dtype=np.int64)
    for w, budget in enumerate(budgets):
        left = [i for i in eligible if candidates[i].nbytes <= budget
                and assigned[tile_index[candidates[i].tile_id]] < 0]
        if not left:
            continue
        sub = _Instance(candidates, left)
        solution = _solve(sub, budget)
        for s, i in enumerate(solution.choice):
            if i >= 0:
                t = tile_index[sub.tiles[s]]
                choice[t], assigned[t] = int(i), w
        remaining[w] = solution.remaining
    return choice, assigned, remaining


def _share(inst: _Instance, eligible: Sequence[int], budgets: Sequence[int]) -> _Packing:
    """Three ways to share the windows out, the best kept (ties to the first, which sends the
    densest products earliest): one choice over the total budget packed densest first, the
    same packed largest first (bin packing, when products are large against the windows), and
    window by window in time order."""
    selection = _solve(inst, sum(budgets)).choice
    trials = [_pack(inst, selection, budgets, largest_first=False),
              _pack(inst, selection, budgets, largest_first=True)]
    if len(budgets) > 1:
        trials.append(_window_by_window(inst, eligible, budgets))
    for trial in trials:
        _fill_windows(inst, trial)
    return max(trials, key=lambda trial: _total(inst, trial[0]))


def _improve(inst: _Instance, packing: _Packing, eligible: Sequence[int],
             budgets: Sequence[int]) -> _Packing:
    """Share each pair of windows out again over their tiles and the free ones, the other
    windows held; kept only where it gains. This moves a product between windows (a tile's
    near-lossless from a small window to its full product in a large one), which matters when
    products are large against the windows. All pairs up to five windows, neighbours beyond."""
    count = len(budgets)
    if count < 2:
        return packing
    pairs = ([(a, b) for a in range(count) for b in range(a + 1, count)] if count <= 5
             else [(a, a + 1) for a in range(count - 1)])
    candidates = inst.candidates
    tile_index = {tile: t for t, tile in enumerate(inst.tiles)}
    choice, assigned, remaining = packing[0].copy(), packing[1].copy(), list(packing[2])
    for a, b in pairs:
        cap = max(budgets[a], budgets[b])
        free = [i for i in eligible if candidates[i].nbytes <= cap
                and assigned[tile_index[candidates[i].tile_id]] in (-1, a, b)]
        if not free:
            continue
        sub = _Instance(candidates, free)
        sub_choice, sub_assigned, sub_left = _share(sub, free, [budgets[a], budgets[b]])
        mine = (assigned == a) | (assigned == b)
        if _total(sub, sub_choice) <= float(inst.cand_value[choice[mine]].sum()) + 1e-12:
            continue
        choice[mine], assigned[mine] = -1, -1
        for s, i in enumerate(sub_choice):
            if i >= 0:
                t = tile_index[sub.tiles[s]]
                choice[t], assigned[t] = int(i), (a, b)[int(sub_assigned[s])]
        remaining[a], remaining[b] = sub_left
    return choice, assigned, remaining


def _fill_windows(inst: _Instance, packing: _Packing) -> None:
    """Spend what each window has left on new tiles or upgrades of tiles already in it."""
    choice, assigned, remaining = packing
    for w in range(len(remaining)):
        allowed = (assigned == -1) | (assigned == w)
        before = np.where(allowed, choice, -1)
        solution = _best_fill(inst, _Solution(before.copy(), remaining[w]), allowed)
        for t in np.flatnonzero(allowed & (solution.choice != before)):
            choice[t], assigned[t] = solution.choice[t], w
        remaining[w] = solution.remaining


def plan(candidates: Iterable[Candidate], windows: Sequence[ContactWindow],
         config: PlannerConfig | None = None,
         baseline: Sequence[Candidate] | None = None) -> Plan:
    """Choose at most one product per tile and a window for each, within every window's budget.

    ``baseline`` lists the products "downlink everything" would send (every tile's full
    product, dropped tiles included, at their value); by default the ``baseline_kind``
    candidates.
    """
    config = config or PlannerConfig()
    candidates = list(candidates)
    ordered = sorted(windows, key=lambda w: as_utc(w.start))
    budgets = [w.budget_bytes for w in ordered]
    cap = max(budgets, default=0)
    seen: dict[str, int] = {}
    for index, c in enumerate(candidates):
        if seen.setdefault(c.product_id, index) != index:
            raise PlanError(f"product id {c.product_id!r} is offered twice (candidates "
                            f"{seen[c.product_id]} and {index})")

    eligible = [i for i, c in enumerate(candidates) if c.value > 0 and c.nbytes <= cap]
    inst = _Instance(candidates, eligible)

    packing = _improve(inst, _share(inst, eligible, budgets), eligible, budgets)
    _fill_windows(inst, packing)  # a re-shared pair may have freed tiles another window takes
    choice, assigned, remaining = packing

    window_of = {int(choice[t]): int(assigned[t]) for t in range(len(inst.tiles))
                 if choice[t] >= 0}
    tile_choice = {inst.tiles[t]: int(choice[t]) for t in range(len(inst.tiles))
                   if choice[t] >= 0}
    why = []
    for index, c in enumerate(candidates):
        if index in window_of:
            why.append(f"chosen for window {window_of[index]}: the best value per byte for "
                       f"this tile within the budget")
        elif c.value <= 0:
            why.append(f"not chosen: no value ({c.reason or 'zero'})")
        elif c.nbytes > cap:
            why.append(f"not chosen: does not fit any window ({c.nbytes} B > largest budget "
                       f"{cap} B)")
        elif c.tile_id in tile_choice:
            other = candidates[tile_choice[c.tile_id]]
            why.append(f"not chosen: {other.kind} of this tile chosen (one product per tile)")
        elif index in inst.dominated:
            other = candidates[inst.dominated[index]]
            why.append(f"not chosen: {other.kind} of this tile is worth as much in fewer bytes")
        elif all(c.nbytes > left for left in remaining):
            why.append("not chosen: budget of every window exhausted by products of higher "
                       "value per byte")
        else:
            # Fill leaves no fitting positive gain, so this is unreachable; kept honest.
            why.append("not chosen: left out by the heuristic although it fits")

    base = baseline if baseline is not None else candidates
    baseline_value, baseline_bytes = _fifo_baseline(base, budgets, config.baseline_kind)
    result = Plan(ordered, candidates, window_of, why, baseline_value, baseline_bytes, config)
    for w, used in enumerate(result.bytes_per_window):
        if used > budgets[w]:  # a bug, never a plan to fly
            raise PlanError(f"window {w}: planned {used} B over its budget {budgets[w]} B")
    return result


def repack(previous: Plan, actual_bytes: Mapping[str, int]) -> Plan:
    """Plan again once products are made: ``actual_bytes`` (product id -> real compressed
    size) replaces the estimates of those products."""
    updated = [replace(c, nbytes=int(actual_bytes[c.product_id]), estimated=False)
               if c.product_id in actual_bytes else c for c in previous.candidates]
    return plan(updated, previous.windows, previous.config)


def exact_optimum(candidates: Iterable[Candidate], budget_bytes: int | Sequence[int],
                  time_limit_s: float = 60.0) -> float | None:
    """The exact optimum of the same choice (at most one product per tile; one budget, or one
    per window with each product in one window), by integer programming.

    scipy is not a flight dependency: None without it, and None when the solver could not prove
    optimality within ``time_limit_s``.
    """
    budgets = [int(budget_bytes)] if isinstance(budget_bytes, (int, np.integer)) else [
        int(b) for b in budget_bytes]
    cap = max(budgets, default=0)
    items = [c for c in candidates if c.value > 0 and c.nbytes <= cap]
    if not items:
        return 0.0
    tiles_count = len({c.tile_id for c in items})
    if len(budgets) == 1 and tiles_count * (cap + 1) <= _DP_CELLS:
        return _exact_by_dynamic_programming(items, cap)
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix
    except ImportError:
        return None
    tiles = {t: k for k, t in enumerate(dict.fromkeys(c.tile_id for c in items))}
    n, m = len(items), len(budgets)
    rows, cols, data = [], [], []
    for i, c in enumerate(items):
        for w in range(m):
            var = i * m + w
            rows += [tiles[c.tile_id], len(tiles) + w]
            cols += [var, var]
            data += [1.0, float(c.nbytes)]
    matrix = coo_matrix((data, (rows, cols)), shape=(len(tiles) + m, n * m)).tocsr()
    upper = np.asarray([1.0] * len(tiles) + [float(b) for b in budgets])
    fits = np.asarray([1.0 if c.nbytes <= budgets[w] else 0.0 for c in items for w in range(m)])
    cost = -np.repeat(np.asarray([c.value for c in items]), m)
    with _quiet_stdout():  # HiGHS prints debugging lines from C, past Python's sys.stdout
        result = milp(cost, constraints=LinearConstraint(matrix, -np.inf, upper),
                      integrality=np.ones(n * m), bounds=Bounds(0.0, fits),
                      options={"time_limit": time_limit_s, "mip_rel_gap": 1e-9})
    if result.status != 0 or result.x is None:
        return None
    return float(-result.fun)


# Tiles × budget bytes up to which the exact optimum of one window is found by dynamic
# programming over whole bytes (about 0.1 s per 10^8 cells) instead of an integer program.
_DP_CELLS = 400_000_000


def _exact_by_dynamic_programming(items: Sequence[Candidate], budget: int) -> float:
    """The multiple-choice knapsack solved exactly: best[b] is the most value within b bytes
    over the tiles so far, each tile adding at most one of its products."""
    by_tile: dict[str, list[Candidate]] = {}
    for c in items:
        by_tile.setdefault(c.tile_id, []).append(c)
    best = np.zeros(budget + 1)
    for options in by_tile.values():
        nxt = best.copy()
        for c in options:
            np.maximum(nxt[c.nbytes:], best[: budget + 1 - c.nbytes] + c.value,
                       out=nxt[c.nbytes:])
        best = nxt
    return float(best[-1])


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null for the duration (C code writes there directly)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
