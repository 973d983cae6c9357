"""Downlink value of change detection through ``onboard run`` on held-out OSCD cities.

    python -m onboard.bench.change_downlink [--data ../shared/data] [--cities beihai ...]

Each city is one run of ``onboard run`` per arm and budget: date 1 then date 2, each followed by
a contact window; the metric is on the second window. A tile (32 × 32 px, the cell) is **truly
changed** when more than 1 % of its pixels changed (OSCD mask value 2) and **clear** when the
cloud stage finds at least 95 % of its date-2 pixels clear; it is **delivered** when its full
product is in the second window's plan. For byte budgets of a fraction of "downlink everything"
(every date-2 tile's full product, real compressed bytes), the fraction of changed clear tiles
delivered, for:

- **ours**: ``[cloud]`` + ``[change]`` (the change bundle scoring date 2 against the store that
  date 1 filled), the planner valuing change (``change_weight`` 20, fixed before any run: a
  change score of 0 to 1 then outweighs the tiles' spread of compressed sizes);
- **cloud gating only**: ``[cloud]`` alone, the same planner (change unknown for every tile);
- **downlink everything in order**: every date-2 tile's full product in scan order until the
  budget is spent (computed from the real sizes of the unlimited run).

The products are the full tiles only, so "delivered" means the full product reached the plan.
Writes ``bench/results/change_downlink.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from onboard.models.data import default_data_root

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CLOUD = REPO / "models" / "cloud" / "cloud-4band-int8-ort.onboard"
CHANGE = REPO / "models" / "change" / "change-13band-int8-ort.onboard"
CHANGE_GOLDEN = REPO / "models" / "change" / "change-13band-fp32-ort.onboard"
FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
TILE = 32
HALO = 32
CHANGE_WEIGHT = 20.0
CLEAR = 0.95
POSITIVE = 0.01
BITRATE = 1e6


def heldout_cities() -> list[str]:
    """The change model's held-out cities, as its bundle names them."""
    from onboard.runtime.bundle import Bundle

    extra = Bundle.open(CHANGE).manifest.extra.get("change", {})
    return list(extra.get("heldout_cities") or ("beihai", "bordeaux", "nantes"))


def _config(city: Path, dates: tuple[str, str], budget_bytes: int, change: bool) -> str:
    def window(day: str, budget: int) -> str:
        duration = max(budget, 1) * 8 / (BITRATE * 0.95)
        return (f"[[passes]]\nstart = {day[:4]}-{day[4:6]}-{day[6:]}T12:00:00Z\n"
                f"duration_s = {duration:.6f}\nbitrate_bps = {BITRATE:g}\n")

    text = (f'[source]\nkind = "oscd"\npaths = ["{city}"]\n'
            f"[tiling]\ntile = {TILE}\nhalo = {HALO}\n[buffer]\nbatch = 32\n"
            f'[cloud]\nbundle = "{CLOUD}"\nthreads = 2\nbatch = 32\n'
            f'[cloud.gate]\nmax_cloud_fraction = 0.6\naction = "demote"\n'
            f'[products]\nkinds = ["full"]\n'
            f"[planner]\nchange_weight = {CHANGE_WEIGHT}\n"
            f"[storage]\nbudget_bytes = {8 * 2**30}\n[telemetry]\nbudget_bytes = 4194304\n")
    if change:
        text += (f'[change]\nbundle = "{CHANGE}"\ngolden = "{CHANGE_GOLDEN}"\nthreads = 2\n'
                 f"batch = 16\n")
    # The first window carries a little of date 1 (its value is not measured here).
    return text + window(dates[0], 200_000) + window(dates[1], budget_bytes)


def _truth(city: Path) -> np.ndarray:
    from onboard.runtime.sources.oscd import OscdPair

    pair = OscdPair(city, bands=("B02",))
    try:
        mask = pair.change_mask()
    finally:
        pair.close()
    assert mask is not None, f"{city}: no change mask"
    return mask


def _run(city: Path, dates: tuple[str, str], budget: int, change: bool, work: Path
         ) -> dict[str, Any]:
    from onboard.runtime import pipeline

    folder = Path(tempfile.mkdtemp(dir=work))
    config = folder / "onboard.toml"
    config.write_text(_config(city, dates, budget, change))
    started = time.perf_counter()
    result = pipeline.run(config, folder / "out")
    wall = time.perf_counter() - started
    second = result.acquisitions[-1]
    rows = [json.loads(line) for line in
            (folder / "out" / "plan-1.jsonl").read_text().splitlines()]
    chosen = {r["tile_id"]: r["bytes"] for r in rows
              if r["chosen"] is not None and r["acquisition"] == second.acquisition}
    tiles = [{"tile_id": s.tile_id, "window": s.window,
              "clear": s.values.get("clear_fraction", 0.0),
              "change": s.values.get("change"), "usable": s.usable} for s in second.scores]
    sizes = {r["tile_id"]: r["bytes"] for r in rows if r["acquisition"] == second.acquisition
             and not r.get("estimated", False)}
    shutil.rmtree(folder)
    return {"chosen": chosen, "tiles": tiles, "sizes": sizes, "wall_s": wall,
            "planned_bytes": result.summary["plan"]["windows"][1]["planned_bytes"]}


def _positives(tiles: list[dict[str, Any]], mask: np.ndarray) -> tuple[set[str], set[str]]:
    """(changed clear tiles, clear tiles) of date 2."""
    changed, clear = set(), set()
    for tile in tiles:
        row, col, h, w = tile["window"]
        if tile["clear"] >= CLEAR:
            clear.add(tile["tile_id"])
            if mask[row:row + h, col:col + w].mean() > POSITIVE:
                changed.add(tile["tile_id"])
    return changed, clear


def bench_city(root: Path, name: str, work: Path) -> dict[str, Any]:
    city = root / name
    days = [line.split(":")[1].strip() for line in (city / "dates.txt").read_text().splitlines()
            if ":" in line]
    dates = (days[0], days[1])
    mask = _truth(city)
    everything_run = _run(city, dates, 10**10, True, work)
    sizes = everything_run["sizes"]
    order = sorted(sizes, key=lambda t: tuple(int(v) for v in t.split("/")[-1].split("_")))
    everything = sum(sizes.values())
    changed, clear = _positives(everything_run["tiles"], mask)
    out: dict[str, Any] = {"city": name, "tiles": len(everything_run["tiles"]),
                           "clear_tiles": len(clear), "changed_clear_tiles": len(changed),
                           "everything_bytes": everything, "arms": {}}
    # Downlink everything in order: scan order until the budget is spent.
    in_order = []
    for fraction in FRACTIONS + (1.0,):
        budget, spent, sent = fraction * everything, 0, set()
        for tile in order:
            if spent + sizes[tile] > budget:
                break
            spent += sizes[tile]
            sent.add(tile)
        in_order.append({"fraction": fraction, "bytes": spent,
                         "delivered": len(changed & sent)})
    out["arms"]["downlink everything in order"] = in_order
    for arm, change in (("ours (cloud + change)", True), ("cloud gating only", False)):
        points = []
        for fraction in FRACTIONS:
            run = _run(city, dates, int(fraction * everything), change, work)
            points.append({"fraction": fraction, "bytes": run["planned_bytes"],
                           "delivered": len(changed & set(run["chosen"])),
                           "wall_s": round(run["wall_s"], 2)})
        points.append({"fraction": 1.0, "bytes": everything_run["planned_bytes"],
                       "delivered": len(changed & set(everything_run["chosen"]))})
        out["arms"][arm] = points
    scored = [t["change"] for t in everything_run["tiles"] if t["change"] is not None]
    out["ours_scored_tiles"] = len(scored)
    out["ours_new_tiles"] = sum(t["change"] is None and t["tile_id"] in clear
                                for t in everything_run["tiles"])
    return out


def pooled(cities: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Delivered fraction of all changed clear tiles against bytes over all cities' budgets."""
    total_changed = sum(c["changed_clear_tiles"] for c in cities)
    total_bytes = sum(c["everything_bytes"] for c in cities)
    arms: dict[str, list[dict[str, float]]] = {}
    for arm in cities[0]["arms"]:
        curve = []
        for i, point in enumerate(cities[0]["arms"][arm]):
            delivered = sum(c["arms"][arm][i]["delivered"] for c in cities)
            spent = sum(c["arms"][arm][i]["bytes"] for c in cities)
            curve.append({"budget_fraction": point["fraction"],
                          "bytes_fraction": spent / total_bytes,
                          "delivered_fraction": delivered / max(total_changed, 1)})
        arms[arm] = curve
    return arms


def figure(path: Path, cities: list[dict[str, Any]], curves: dict[str, list[dict[str, float]]]
           ) -> Path | None:
    """One panel per city and one pooled: delivered fraction against bytes fraction (Pillow)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        print("Pillow not installed (the [dev] extra): no PNG", file=sys.stderr)
        return None
    panels = [("pooled", curves)] + [(c["city"], pooled([c])) for c in cities]
    size, margin, top = 300, 44, 40
    width = len(panels) * (size + margin + 16) + 16
    image = Image.new("RGB", (width, size + top + margin + 70), "white")
    draw = ImageDraw.Draw(image)
    colours = {"ours (cloud + change)": (31, 119, 180), "cloud gating only": (255, 127, 14),
               "downlink everything in order": (120, 120, 120)}
    draw.text((16, 8), "Changed clear tiles delivered (full product) against bytes / bytes of "
                       "downlinking everything; held-out OSCD cities, onboard run, 32 px tiles",
              fill="black")
    for index, (title, arms) in enumerate(panels):
        x0 = 16 + margin + index * (size + margin + 16)
        y0 = top

        def at(fx: float, fy: float, x0: int = x0, y0: int = y0) -> tuple[float, float]:
            return (x0 + fx * size, y0 + (1 - fy) * size)

        draw.rectangle([x0, y0, x0 + size, y0 + size], outline="black")
        for tick in (0.25, 0.5, 0.75):
            draw.line([at(tick, 0), at(tick, 1)], fill=(225, 225, 225))
            draw.line([at(0, tick), at(1, tick)], fill=(225, 225, 225))
        for tick in (0.0, 0.5, 1.0):
            draw.text((at(tick, 0)[0] - 8, y0 + size + 4), f"{tick:g}", fill="black")
            draw.text((x0 - 24, at(0, tick)[1] - 6), f"{tick:g}", fill="black")
        # The goal: 95 % delivered within 30 % of the bytes.
        draw.line([at(0.3, 0), at(0.3, 1)], fill=(170, 170, 170), width=1)
        draw.line([at(0, 0.95), at(1, 0.95)], fill=(170, 170, 170), width=1)
        draw.text((x0 + 4, y0 + 4), title, fill="black")
        for arm, curve in arms.items():
            points = [at(0, 0)] + [at(min(p["bytes_fraction"], 1.0), p["delivered_fraction"])
                                   for p in curve]
            draw.line(points, fill=colours[arm], width=2)
            for px, py in points[1:]:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colours[arm])
        draw.text((x0 + size // 2 - 60, y0 + size + 18), "bytes / everything", fill="black")
    for i, (arm, colour) in enumerate(colours.items()):
        y = top + size + 42 + 14 * (i // 2)
        x = 16 + margin + (i % 2) * 330
        draw.rectangle([x, y + 3, x + 18, y + 9], fill=colour)
        draw.text((x + 24, y), arm, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _at(curve: list[dict[str, float]], x: float) -> float:
    """Delivered fraction at a bytes fraction, interpolated along the measured curve."""
    xs = [0.0] + [p["bytes_fraction"] for p in curve]
    ys = [0.0] + [p["delivered_fraction"] for p in curve]
    return float(np.interp(x, xs, ys))


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Change detection: downlink value through `onboard run`", "",
             f"Held-out OSCD cities {', '.join(c['city'] for c in result['cities'])} (the change "
             "model never trained or calibrated on them). 32 × 32 px tiles (one change cell "
             "each), halo 32 px; a tile is changed when more than 1 % of its pixels changed, "
             f"clear when at least {CLEAR:.0%} of its date-2 pixels are clear (cloud stage); "
             "delivered when its full product is in the date-2 window's plan. Planner "
             f"`change_weight` {CHANGE_WEIGHT:g}, products: full only. Bundles: "
             f"{CHANGE.name}, {CLOUD.name}. {result['wall_s']:.0f} s for the whole bench.", "",
             "| city | tiles | clear | changed clear | bytes of everything | ours scored / new |",
             "|---|---|---|---|---|---|"]
    for c in result["cities"]:
        lines.append(f"| {c['city']} | {c['tiles']} | {c['clear_tiles']} | "
                     f"{c['changed_clear_tiles']} | {c['everything_bytes']:,} | "
                     f"{c['ours_scored_tiles']} / {c['ours_new_tiles']} |")
    lines += ["", "Pooled over the cities: fraction of changed clear tiles delivered against the "
              "fraction of the bytes of downlinking everything.", "",
              "| arm | " + " | ".join(f"budget {f:.0%}" for f in FRACTIONS + (1.0,)) +
              " | at 30 % of the bytes |",
              "|---|" + "---|" * (len(FRACTIONS) + 2)]
    for arm, curve in result["pooled"].items():
        cells = [f"{p['delivered_fraction']:.1%} ({p['bytes_fraction']:.0%} B)" for p in curve]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {_at(curve, 0.3):.1%} |")
    ours = _at(result["pooled"]["ours (cloud + change)"], 0.3)
    lines += ["", f"Goal: at least 95 % of changed clear tiles within 30 % of the bytes. "
              f"Measured: {ours:.1%} — " + ("met." if ours >= 0.95 else "**not met**."), "",
              "Per city (delivered fraction at 30 % of the bytes):", ""]
    for c in result["cities"]:
        curves = pooled([c])
        lines.append(f"- {c['city']}: " + ", ".join(f"{arm} {_at(curve, 0.3):.1%}"
                                                    for arm, curve in curves.items()))
    lines += ["", "![curve](change_downlink.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--cities", nargs="*")
    parser.add_argument("--figure-only", action="store_true",
                        help="redraw the PNG and the markdown from the JSON of the last run")
    args = parser.parse_args(argv)
    if args.figure_only:
        result = json.loads((RESULTS / "change_downlink.json").read_text())
        (RESULTS / "change_downlink.md").write_text(markdown(result))
        figure(RESULTS / "change_downlink.png", result["cities"], result["pooled"])
        return 0
    root = args.data / "oscd" if (args.data / "oscd").is_dir() else args.data
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="change-downlink-") as work:
        cities = [bench_city(root, name, Path(work)) for name in args.cities or heldout_cities()]
    result = {"cities": cities, "pooled": pooled(cities), "wall_s": time.perf_counter() - started,
              "tile": TILE, "halo": HALO, "change_weight": CHANGE_WEIGHT,
              "bundles": [CHANGE.name, CLOUD.name]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "change_downlink.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "change_downlink.md").write_text(markdown(result))
    figure(RESULTS / "change_downlink.png", cities, result["pooled"])
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
