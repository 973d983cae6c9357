"""The pure parts of the change downlink bench (``bench/change_downlink.py``) on small inputs
whose answers are known by hand: which tiles are changed and clear, the pooled curve over
cities, the delivered fraction at a bytes fraction, and the goal line of the report."""

from __future__ import annotations

import numpy as np
import pytest

from onboard.bench.change_downlink import _at, _positives, markdown, pooled

OURS, ORDER, CLOUD_ONLY = "ours (cloud + change)", "downlink everything in order", \
    "cloud gating only"


def _tile(name: str, window: tuple[int, int, int, int], clear: float) -> dict:
    return {"tile_id": f"city-2018/{name}", "window": window, "clear": clear,
            "change": None, "usable": True}


def test_positives_are_clear_tiles_with_more_than_one_percent_changed():
    mask = np.zeros((20, 40), bool)
    mask[0, 0] = True  # tile a: 1 of 100 px changed, exactly 1 %: not changed
    mask[0, 10:12] = True  # tile b: 2 of 100 px: changed
    mask[0:10, 20:30] = True  # tile c: all changed, but cloudy
    mask[10, 30] = mask[10, 31] = True  # tile d: 2 px, clear at exactly 95 %: changed
    tiles = [_tile("a", (0, 0, 10, 10), 1.0), _tile("b", (0, 10, 10, 10), 0.99),
             _tile("c", (0, 20, 10, 10), 0.5), _tile("d", (10, 30, 10, 10), 0.95),
             _tile("e", (10, 0, 10, 10), 0.9499)]
    changed, clear = _positives(tiles, mask)
    assert changed == {"city-2018/b", "city-2018/d"}
    assert clear == {"city-2018/a", "city-2018/b", "city-2018/d"}


def _city(name: str, changed: int, everything: int, arms: dict[str, list[tuple]]) -> dict:
    return {"city": name, "tiles": 10, "clear_tiles": 8, "changed_clear_tiles": changed,
            "everything_bytes": everything, "ours_scored_tiles": 6, "ours_new_tiles": 2,
            "arms": {arm: [{"fraction": f, "bytes": b, "delivered": d} for f, b, d in points]
                     for arm, points in arms.items()}}


CITIES = [
    _city("one", 4, 1000, {OURS: [(0.3, 300, 3), (1.0, 1000, 4)],
                           ORDER: [(0.3, 290, 1), (1.0, 1000, 4)]}),
    _city("two", 6, 3000, {OURS: [(0.3, 900, 3), (1.0, 3000, 6)],
                           ORDER: [(0.3, 910, 2), (1.0, 3000, 6)]}),
]


def test_pooled_sums_delivered_tiles_and_bytes_over_the_cities():
    curves = pooled(CITIES)
    assert list(curves) == [OURS, ORDER]
    ours, order = curves[OURS], curves[ORDER]
    # (3 + 3) of (4 + 6) changed clear tiles for (300 + 900) of (1000 + 3000) bytes.
    assert ours[0] == {"budget_fraction": 0.3, "bytes_fraction": 0.3,
                       "delivered_fraction": 0.6}
    assert order[0]["bytes_fraction"] == pytest.approx(1200 / 4000)
    assert order[0]["delivered_fraction"] == pytest.approx(0.3)
    assert ours[1]["delivered_fraction"] == order[1]["delivered_fraction"] == 1.0
    # One city pooled alone is that city's own curve.
    alone = pooled([CITIES[0]])[OURS]
    assert [p["delivered_fraction"] for p in alone] == [0.75, 1.0]
    # No changed tile at all: no division by zero, nothing delivered.
    empty = pooled([_city("none", 0, 100, {OURS: [(0.5, 50, 0)]})])[OURS]
    assert empty[0]["delivered_fraction"] == 0.0


def test_at_interpolates_the_curve_from_the_origin():
    curve = [{"bytes_fraction": 0.1, "delivered_fraction": 0.2},
             {"bytes_fraction": 0.5, "delivered_fraction": 0.6}]
    assert _at(curve, 0.0) == 0.0
    assert _at(curve, 0.05) == pytest.approx(0.1)  # between the origin and the first point
    assert _at(curve, 0.1) == pytest.approx(0.2)
    assert _at(curve, 0.3) == pytest.approx(0.4)
    assert _at(curve, 0.9) == pytest.approx(0.6)  # past the last point: its value


def test_the_report_states_the_goal_per_arm_and_per_city():
    result = {"cities": CITIES, "pooled": pooled(CITIES), "wall_s": 12.0}
    text = markdown(result)
    assert "Measured: 60.0% — **not met**." in text
    assert f"| {OURS} | 60.0% (30% B) |" in text
    # ORDER in city one: 1 of 4 at 0.29 of the bytes, 4 at 1.0: 0.25 + 0.75 × 0.01 / 0.71
    assert f"- one: {OURS} 75.0%, {ORDER} 26.1%" in text
    met = [_city("all", 2, 100, {OURS: [(0.3, 30, 2), (1.0, 100, 2)]})]
    assert "Measured: 100.0% — met." in markdown({"cities": met, "pooled": pooled(met),
                                                  "wall_s": 1.0})
