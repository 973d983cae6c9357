"""The downlink planner: values, the multiple-choice knapsack per window, the audit file."""

from __future__ import annotations

import csv
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from onboard.runtime.downlink.planner import (
    Candidate,
    ContactWindow,
    PlanError,
    PlannerConfig,
    candidates_for,
    exact_optimum,
    plan,
    repack,
    value_of,
)
from onboard.runtime.errors import ConfigError
from onboard.runtime.scores import Decision, TileScore

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)
KINDS = {"full": 1.0, "near_lossless": 0.4, "mask": 0.02, "thumbnail": 0.005}  # share of full


def window(budget: int, minutes: float = 0) -> ContactWindow:
    """A window of exactly ``budget`` bytes, ``minutes`` after NOW."""
    return ContactWindow(NOW + timedelta(minutes=minutes), duration_s=1.0, bitrate_bps=budget * 8,
                         margin=0.0)


def score(tile: str, clear: float | None = 0.9, change: float | None = None,
          decision: Decision = Decision.KEEP, aoi: float = 1.0) -> TileScore:
    values = {}
    if clear is not None:
        values["clear_fraction"] = clear
    if change is not None:
        values["change"] = change
    s = TileScore(tile, tile.split("/")[0], (0, 0, 256, 256), aoi_weight=aoi, values=values)
    if decision != Decision.KEEP:
        s.lower(decision, f"test says {decision}")
    return s


def scene(rng: random.Random, tiles: int, config: PlannerConfig | None = None,
          drop_share: float = 0.2) -> tuple[list[Candidate], list[TileScore]]:
    """A realistic pass: 4-6 MB full products, cloud and change scores, a few AOI tiles,
    acquisitions over the last day, some tiles dropped or demoted by the stages."""
    config = config or PlannerConfig()
    candidates, scores = [], []
    for t in range(tiles):
        decision = Decision.KEEP
        roll = rng.random()
        if roll < drop_share:
            decision = Decision.DROP
        elif roll < drop_share + 0.1:
            decision = Decision.DEMOTE
        s = score(f"acq{t % 5}/{t // 5}_0", clear=rng.random(),
                  change=rng.random() if rng.random() < 0.7 else None, decision=decision,
                  aoi=3.0 if rng.random() < 0.1 else 1.0)
        scores.append(s)
        full = rng.randint(4_000_000, 6_000_000)
        sizes = {k: max(1, int(full * share * rng.uniform(0.8, 1.2))) for k, share in KINDS.items()}
        acquired = NOW - timedelta(hours=24 * (t % 5) / 5)
        candidates += candidates_for(s, sizes, NOW, acquired, config)
    return candidates, scores


def random_instance(rng: random.Random) -> list[Candidate]:
    """Unstructured: 1-4 products per tile, sizes and values independent."""
    out = []
    for t in range(rng.randint(5, 120)):
        for k in range(rng.randint(1, 4)):
            out.append(Candidate(f"t{t}", "a", f"k{k}", rng.randint(1, 1000), rng.random()))
    return out


def check_invariants(result, candidates: list[Candidate]) -> None:
    budgets = result.budgets
    used_and_budget = zip(result.bytes_per_window, budgets, strict=True)
    assert all(used <= budget for used, budget in used_and_budget)
    tiles = [c.tile_id for c in result.chosen()]
    assert len(tiles) == len(set(tiles)), "two products of one tile"
    for index, w in result.window_of.items():
        assert candidates[index].nbytes <= budgets[w]
        assert candidates[index].value > 0


# -- windows and values ----------------------------------------------------------------------


def test_window_budget_keeps_back_the_protocol_margin() -> None:
    w = ContactWindow(NOW, duration_s=600, bitrate_bps=100e6)
    assert w.margin == 0.05
    assert w.budget_bytes == int(600 * 100e6 / 8 * 0.95)
    assert w.end == NOW + timedelta(minutes=10)
    with pytest.raises(ConfigError, match="margin"):
        ContactWindow(NOW, 600, 1e6, margin=1.0)
    with pytest.raises(ConfigError, match="duration_s"):
        ContactWindow(NOW, -1, 1e6)


def test_value_follows_clear_change_aoi_age_and_demotion() -> None:
    config = PlannerConfig(change_weight=1.0, change_prior=0.5, age_half_life_s=3600,
                           demote_factor=0.25)
    base, reason = value_of(score("a/0_0", clear=0.8, change=0.0), "full", NOW, NOW, config)
    assert base == pytest.approx(0.8)
    assert "clear 0.80" in reason and "change 0.00" in reason
    changed, _ = value_of(score("a/0_0", clear=0.8, change=1.0), "full", NOW, NOW, config)
    assert changed == pytest.approx(1.6)
    # No change score is unknown, not zero: it takes the prior.
    unknown, reason = value_of(score("a/0_0", clear=0.8), "full", NOW, NOW, config)
    assert unknown == pytest.approx(0.8 * 1.5)
    assert "change unknown" in reason
    aoi, reason = value_of(score("a/0_0", clear=0.8, change=0.0, aoi=3.0), "full", NOW, NOW,
                           config)
    assert aoi == pytest.approx(2.4) and "aoi 3" in reason
    old, reason = value_of(score("a/0_0", clear=0.8, change=0.0), "full", NOW,
                           NOW - timedelta(hours=2), config)
    assert old == pytest.approx(0.2) and "age 2.0 h" in reason
    naive, _ = value_of(score("a/0_0", clear=0.8, change=0.0), "full", NOW,
                        datetime(2024, 6, 1, 11, 0), config)  # naive is UTC
    assert naive == pytest.approx(0.4)
    demoted, reason = value_of(score("a/0_0", 0.8, 0.0, Decision.DEMOTE), "full", NOW, NOW,
                               config)
    assert demoted == pytest.approx(0.2) and "demoted" in reason
    thumb, _ = value_of(score("a/0_0", clear=0.8, change=0.0), "thumbnail", NOW, NOW, config)
    assert thumb == pytest.approx(0.8 * config.utility["thumbnail"])
    with pytest.raises(ConfigError, match="quicklook"):
        value_of(score("a/0_0"), "quicklook", NOW, NOW, config)


def test_dropped_and_failed_tiles_get_no_candidates() -> None:
    config = PlannerConfig()
    sizes = {"full": 1000, "thumbnail": 10}
    for decision in (Decision.DROP, Decision.FAILED):
        s = score("a/1_1", clear=1.0, change=1.0, decision=decision)
        assert candidates_for(s, sizes, NOW, NOW, config) == []
        value, reason = value_of(s, "full", NOW, NOW, config)
        assert value == 0.0 and str(decision) in reason and "test says" in reason
    kept = candidates_for(score("a/1_1"), sizes, NOW, NOW, config)
    assert [(c.kind, c.nbytes, c.product_id) for c in kept] == [
        ("full", 1000, "a/1_1/full"), ("thumbnail", 10, "a/1_1/thumbnail")]


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="utility.full"):
        PlannerConfig(utility={"full": -1.0})
    with pytest.raises(ConfigError, match="demote_factor"):
        PlannerConfig(demote_factor=2.0)


def test_planner_section_loads_from_toml_tables() -> None:
    from onboard.runtime.config import config_from_dict

    loaded = config_from_dict({"planner": {"utility": {"full": 1.0, "mask": 0.2},
                                           "age_half_life_s": 7200}})
    section = loaded.section("planner")
    assert isinstance(section, PlannerConfig)
    assert section.utility == {"full": 1.0, "mask": 0.2} and section.age_half_life_s == 7200.0


# -- the knapsack ----------------------------------------------------------------------------


def test_one_product_per_tile_by_value_per_byte_not_fifo() -> None:
    candidates = [
        Candidate("a", "s", "full", 100, 1.0),
        Candidate("a", "s", "thumbnail", 5, 0.05),
        Candidate("b", "s", "full", 100, 3.0),
        Candidate("b", "s", "thumbnail", 5, 0.15),
        Candidate("c", "s", "full", 100, 0.5),
        Candidate("c", "s", "thumbnail", 5, 0.025),
    ]
    result = plan(candidates, [window(210)])
    chosen = {(c.tile_id, c.kind) for c in result.chosen()}
    # Two fulls fit: b and a (the most valuable), and c's thumbnail in what is left.
    assert chosen == {("b", "full"), ("a", "full"), ("c", "thumbnail")}
    assert result.bytes_per_window == [205]
    assert result.value == pytest.approx(4.025)
    # FIFO of full products in acquisition order sends a and b, nothing else fits.
    assert result.baseline_value == pytest.approx(4.0)


def test_never_over_budget_and_near_the_exact_optimum_on_random_instances() -> None:
    ratios = []
    for seed in range(30):
        rng = random.Random(seed)
        candidates = random_instance(rng)
        budget = int(sum(c.nbytes for c in candidates) / 3 * rng.uniform(0.05, 0.8))
        result = plan(candidates, [window(budget)])
        check_invariants(result, candidates)
        optimum = exact_optimum(candidates, budget)
        assert optimum is not None and optimum >= result.value - 1e-9
        ratios.append(result.value / optimum)
    print(f"\nrandom: planner/optimum min {min(ratios):.4f}, mean "
          f"{sum(ratios) / len(ratios):.4f} over {len(ratios)} instances")
    assert min(ratios) >= 0.97


def test_realistic_passes_near_the_optimum_and_far_above_downlink_everything() -> None:
    ratios, gains = [], []
    for seed in range(10):
        rng = random.Random(100 + seed)
        candidates, scores = scene(rng, rng.randint(64, 400))
        all_full = sum(c.nbytes for c in candidates if c.kind == "full")
        budget = int(all_full * rng.uniform(0.1, 0.5))
        # "Downlink everything" also spends bytes on the tiles the stages dropped.
        baseline = [Candidate(s.tile_id, s.acquisition, "full", 5_000_000,
                              value_of(s, "full", NOW, NOW, PlannerConfig())[0])
                    for s in scores]
        result = plan(candidates, [window(budget)], baseline=baseline)
        check_invariants(result, candidates)
        dropped = {s.tile_id for s in scores if not s.usable}
        assert not dropped & {c.tile_id for c in result.chosen()}
        optimum = exact_optimum(candidates, budget)
        assert optimum is not None
        ratios.append(result.value / optimum)
        gains.append(result.value / result.baseline_value)
    print(f"\nrealistic: planner/optimum min {min(ratios):.4f}; planner/FIFO-everything min "
          f"{min(gains):.2f}x")
    assert min(ratios) >= 0.97
    assert min(gains) > 1.0


def test_zero_value_and_oversized_products_are_never_chosen() -> None:
    candidates = [
        Candidate("a", "s", "full", 500, 9.0),  # bigger than any window
        Candidate("a", "s", "thumbnail", 10, 0.1),
        Candidate("b", "s", "full", 50, 0.0),  # worth nothing
    ]
    result = plan(candidates, [window(100), window(200, 90)])
    assert [(c.tile_id, c.kind) for c in result.chosen()] == [("a", "thumbnail")]
    why = {(r["tile_id"], r["kind"]): r["why"] for r in result.rows()}
    assert why[("a", "full")].startswith("not chosen: does not fit any window (500 B")
    assert why[("b", "full")].startswith("not chosen: no value")


def test_multiple_windows_full_later_beats_thumbnail_now() -> None:
    # Window 0 fits two fulls, window 1 two more: a greedy filling window 0 alone would take
    # every tile's dense thumbnail first and leave those tiles nothing better later.
    candidates = []
    for t in range(4):
        candidates.append(Candidate(f"t{t}", "s", "full", 100, 1.0 + t))
        candidates.append(Candidate(f"t{t}", "s", "thumbnail", 10, 0.2))
    windows = [window(200, 0), window(200, 90)]
    result = plan(candidates, windows)
    check_invariants(result, candidates)
    assert sorted(c.kind for c in result.chosen()) == ["full"] * 4
    assert result.value == pytest.approx(10.0)
    assert exact_optimum(candidates, [200, 200]) == pytest.approx(10.0)
    # The densest go first.
    assert {c.tile_id for c in result.chosen(0)} == {"t3", "t2"}


def test_windows_are_planned_in_time_order_and_big_products_go_where_they_fit() -> None:
    candidates = [Candidate("big", "s", "full", 300, 5.0), Candidate("small", "s", "full", 80,
                                                                      2.0)]
    late, early = window(400, 120), window(100, 0)
    result = plan(candidates, [late, early])  # given out of order
    assert result.windows == [early, late]
    assert result.window_index("small/full") == 0
    assert result.window_index("big/full") == 1


def test_multiple_windows_near_the_optimum() -> None:
    # Windows holding a few to a few dozen products each: against the optimum of one budget of
    # their total (an upper bound: it ignores that a product must fit in one window).
    ratios = []
    for seed in range(12):
        rng = random.Random(300 + seed)
        candidates, _ = scene(rng, rng.randint(40, 120))
        all_full = sum(c.nbytes for c in candidates if c.kind == "full")
        budgets = [int(all_full * rng.uniform(0.05, 0.2)) for _ in range(rng.randint(2, 4))]
        result = plan(candidates, [window(b, 90 * i) for i, b in enumerate(budgets)])
        check_invariants(result, candidates)
        bound = exact_optimum(candidates, sum(budgets))
        assert bound is not None and bound >= result.value - 1e-9
        ratios.append(result.value / bound)
    print(f"\nmulti-window: planner/upper bound min {min(ratios):.4f}")
    assert min(ratios) >= 0.97


def test_small_windows_against_the_exact_multi_window_optimum() -> None:
    # The hard corner: windows that hold one or two products, where packing is most of the
    # problem. Stated and checked: at least 0.9 of the exact optimum, 0.95 on average.
    ratios = []
    for seed in range(15):
        rng = random.Random(400 + seed)
        candidates, _ = scene(rng, rng.randint(8, 16))
        all_full = sum(c.nbytes for c in candidates if c.kind == "full")
        budgets = [int(all_full * rng.uniform(0.05, 0.2)) for _ in range(rng.randint(2, 3))]
        result = plan(candidates, [window(b, 90 * i) for i, b in enumerate(budgets)])
        check_invariants(result, candidates)
        optimum = exact_optimum(candidates, budgets, time_limit_s=20)
        assert optimum is not None and optimum >= result.value - 1e-9
        ratios.append(result.value / optimum)
    print(f"\nsmall windows: planner/exact min {min(ratios):.4f}, mean "
          f"{sum(ratios) / len(ratios):.4f}")
    assert min(ratios) >= 0.9
    assert sum(ratios) / len(ratios) >= 0.95


def test_tens_of_thousands_of_candidates_are_planned_within_every_budget() -> None:
    # How fast is a benchmark's question (bench/), not a test's: this checks the plan.
    candidates, _ = scene(random.Random(7), 10_000, drop_share=0.0)
    windows = [ContactWindow(NOW, 600, 150e6), ContactWindow(NOW + timedelta(hours=1), 420,
                                                              150e6)]
    result = plan(candidates, windows)
    check_invariants(result, candidates)
    assert len(candidates) == 40_000
    assert all(b - used < 6_000_000 for b, used in zip(result.budgets, result.bytes_per_window,
                                                           strict=True))


def test_duplicate_product_ids_are_refused() -> None:
    with pytest.raises(PlanError, match="a/full"):
        plan([Candidate("a", "s", "full", 10, 1.0), Candidate("a", "s", "full", 20, 2.0)],
             [window(100)])
    with pytest.raises(PlanError, match="nbytes"):
        Candidate("a", "s", "full", 0, 1.0)


def test_repack_with_the_real_sizes_stays_within_budget() -> None:
    candidates = [Candidate(f"t{t}", "s", "full", 100, 1.0 + t / 10) for t in range(5)]
    first = plan(candidates, [window(300)])
    assert len(first.chosen()) == 3
    made = {c.product_id: 140 for c in first.chosen()}  # the estimates were 40 % short
    second = repack(first, made)
    check_invariants(second, second.candidates)
    assert second.bytes_per_window[0] <= 300
    assert all(not c.estimated for c in second.candidates if c.product_id in made)


# -- the audit -------------------------------------------------------------------------------


def test_audit_rows_cover_every_candidate_and_say_why(tmp_path: Path) -> None:
    candidates = [
        Candidate("a", "s", "full", 100, 3.0, reason="full 1 x clear 0.90"),
        Candidate("a", "s", "thumbnail", 5, 0.1),
        Candidate("a", "s", "mask", 50, 0.05),  # dominated by the thumbnail
        Candidate("b", "s", "full", 100, 2.0),
        Candidate("c", "s", "full", 100, 1.0),
    ]
    result = plan(candidates, [window(200)])
    rows = result.rows()
    assert len(rows) == len(candidates)
    by = {(r["tile_id"], r["kind"]): r for r in rows}
    assert by[("a", "full")]["chosen"] == 0
    assert by[("a", "full")]["why"].startswith("chosen for window 0")
    assert by[("a", "full")]["value_reason"] == "full 1 x clear 0.90"
    assert by[("a", "full")]["value_per_byte"] == pytest.approx(0.03)
    assert by[("a", "thumbnail")]["chosen"] is None
    assert "full of this tile chosen" in by[("a", "thumbnail")]["why"]
    assert by[("b", "full")]["chosen"] == 0
    assert "budget of every window exhausted" in by[("c", "full")]["why"]
    summary = result.summary()
    assert summary["planned_bytes"] == [200] and summary["budget_bytes"] == [200]
    assert summary["value"] == pytest.approx(5.0)
    assert summary["chosen_by_kind"] == {"full": 2}

    jsonl = result.write(tmp_path / "plan.jsonl")
    read = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert read == json.loads(json.dumps(rows))
    table = list(csv.DictReader(result.write(tmp_path / "plan.csv").open()))
    assert [r["why"] for r in table] == [r["why"] for r in rows]
    assert table[2]["chosen"] == ""  # not chosen: an empty cell, not "None"
    assert not list(tmp_path.glob(".*.partial"))
