"""The bench's markdown tables and PNG charts (Pillow, from the [dev] extra)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# Second figures some rows carry beside their metric, and how the table names them.
_SECOND = {"value_human": "on the human-labelled scene", "value_rmse": "RMSE baseline",
           "value_sharpen": "sharpening task"}


def _metric(row: dict[str, Any]) -> str:
    if row.get("metric") and row["metric"] != "n/a" and "value" in row:
        text = f"{row['metric']} {row['value']:.4f}"
        extra = [f"{name} {row[key]:.4f}" for key, name in _SECOND.items() if key in row]
        return text + (f" ({'; '.join(extra)})" if extra else "")
    if row.get("why"):
        return f"n/a ({row['why']})"
    return "–"  # measured in another row of the same engine (the metric is run once)


def matrix_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | backend | precision | threads | size KB | latency p50 / p99 ms per tile "
             "| Mpx/s (best) | vs peers (Mpx/s ratio) | peak RSS MB | energy J/Mpx | metric |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        backend = r.get("backend") or "-"
        if r.get("how") and r["how"] not in ("shipped engine", "peer"):
            backend = f"{backend} ({r['how']})"
        head = (f"| {r['model']} | {backend} | {r.get('precision', '-')} | "
                f"{r.get('threads', '-')} | {_f(r.get('size_kb'), 1)} |")
        if "skipped" in r or "error" in r or "mpx_s" not in r:
            why = r.get("skipped") or r.get("error") or "not measured"
            lines.append(f"{head} – | – | – | – | – | not run: {why} |")
            continue
        vs = ", ".join(f"{v:.1f}× {k}" for k, v in sorted(r.get("vs", {}).items()))
        energy = _f(r.get("energy_j_per_mpx"), 3) if r.get("energy_j_per_mpx") is not None \
            else "n/a"
        lines.append(f"{head} {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['mpx_s']:.2f} "
                     f"({r['mpx_s_best']:.2f}) | {vs or '–'} | {r['peak_rss_mb']:.0f} | "
                     f"{energy} | {_metric(r)} |")
    return "\n".join(lines) + "\n"


def e2e_markdown(e2e: dict[str, Any]) -> str:
    lines = ["| run | input | Mpx/s of 13-band input | wall s | read s (reader thread) | "
             "stats s | stages s | rest s (run: plan, products, queue, link; score: "
             "quicklook, tile telemetry, masks) | peak RSS MB | energy J/Mpx "
             "| load 1 min |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in e2e.get("runs", []):
        if "error" in r:
            lines.append(f"| {r['label']} | {r.get('input', '')} | not run: {r['error']} "
                         "| | | | | | | | |")
            continue
        t = r["timings_s"]
        stages = sum(v for k, v in t.items() if k not in ("read", "stats", "wall"))
        rest = r.get("plan_products_queue_link_s")
        main = r.get("main_thread_s")
        if rest is None and main:
            rest = sum(main.values())
        energy = _f(r.get("energy_j_per_mpx"), 3) if r.get("energy_j_per_mpx") is not None \
            else "n/a"
        wall = r.get("wall_s", t["wall"])
        lines.append(f"| {r['label']} | {r['input']} | **{r['mpx_per_s']:.2f}** | {wall:.2f} "
                     f"| {t['read']:.2f} | {t['stats']:.3f} | {stages:.2f} | "
                     f"{_f(rest)} | {r['peak_rss_mb']:.0f} | {energy} | {r['load_avg_1m']} |")
    decode = e2e.get("decode", [])
    if decode:
        lines += ["", "| decode only, same windows, one thread | Mpx/s |", "|---|---|"]
        lines += [f"| {d['label']} | {d['mpx_per_s']:.1f} |" for d in decode if "error" not in d]
    return "\n".join(lines) + "\n"


def hil_markdown(hil: dict[str, Any]) -> str:
    lines = ["| line rate px/s | offered Mpx/s | frames | scored | dropped | deferred by the "
             "link | sustained Mpx/s | latency p50 / p99 / max s | equals a local run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in hil.get("runs", []):
        eq = r.get("equal")
        if eq is None:
            eq_text = ("scored frames yes; drops expected" if r.get("scored_equal")
                       else f"NO ({r.get('mismatch')})")
        else:
            eq_text = "yes" if eq else f"NO ({r.get('mismatch')})"
        lat = r.get("latency_s", {})
        lines.append(f"| {r['line_rate_px_s']:.0f} ({r['label']}) | "
                     f"{r['line_rate_px_s'] / 1e6:.2f} | {r['frames']} | {r['scored']} | "
                     f"{r['dropped']} | {r['deferred']} | {r['sustained_mpx_s']:.2f} | "
                     f"{_f(lat.get('p50'))} / {_f(lat.get('p99'))} / {_f(lat.get('max'))} | "
                     f"{eq_text} |")
    return "\n".join(lines) + "\n"


# -- charts ---------------------------------------------------------------------------------------


def _image(width: int, height: int) -> tuple[Any, Any] | None:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        print("Pillow not installed (the [dev] extra): no PNG charts", file=sys.stderr)
        return None
    image = Image.new("RGB", (width, height), "white")
    return image, ImageDraw.Draw(image)


def _ascii(text: str) -> str:
    """Pillow's default font has no superscripts or multiplication sign."""
    return text.replace("²", "^2").replace("×", "x")


BLUE, ORANGE, GREY = (40, 110, 200), (200, 80, 40), (150, 150, 150)


def throughput_chart(rows: list[dict[str, Any]], path: Path) -> bool:
    """Mpx/s of every measured row, bundles blue and peers orange, log scale."""
    measured = [r for r in rows if "mpx_s" in r]
    if not measured:
        return False
    label_w, bar_w, row_h = 420, 460, 20
    made = _image(label_w + bar_w + 90, row_h * len(measured) + 40)
    if made is None:
        return False
    image, draw = made
    draw.text((6, 6), "throughput, Mpx/s of input (log scale); blue: onboard bundles, orange: "
                      "peers", fill="black")
    low = np.log10(min(r["mpx_s"] for r in measured) / 2)
    high = np.log10(max(r["mpx_s"] for r in measured) * 1.5)
    for i, r in enumerate(measured):
        y = 28 + row_h * i
        via = " (from ONNX)" if r.get("how") == "from the ONNX model" else ""
        draw.text((6, y + 4), _ascii(f"{r['model']} {r.get('backend')}{via} "
                                     f"{r.get('precision')} {r.get('threads')}t")[:70],
                  fill="black")
        length = max(int(bar_w * (np.log10(r["mpx_s"]) - low) / (high - low)), 2)
        colour = ORANGE if r.get("peer_of") else BLUE
        draw.rectangle([label_w, y + 3, label_w + length, y + row_h - 3], fill=colour)
        draw.text((label_w + length + 6, y + 4), f"{r['mpx_s']:.2f}", fill="black")
    image.save(path)
    return True


def latency_chart(rows: list[dict[str, Any]], path: Path) -> bool:
    """p50 (bar) and p99 (tick) latency per tile of every measured row, log scale."""
    measured = [r for r in rows if "p50_ms" in r]
    if not measured:
        return False
    label_w, bar_w, row_h = 420, 460, 20
    made = _image(label_w + bar_w + 130, row_h * len(measured) + 40)
    if made is None:
        return False
    image, draw = made
    draw.text((6, 6), "latency per tile, ms (log scale): bar p50, black tick p99", fill="black")
    low = np.log10(min(r["p50_ms"] for r in measured) / 2)
    high = np.log10(max(r["p99_ms"] for r in measured) * 1.5)

    def x(ms: float) -> int:
        return label_w + int(bar_w * (np.log10(ms) - low) / (high - low))

    for i, r in enumerate(measured):
        y = 28 + row_h * i
        via = " (from ONNX)" if r.get("how") == "from the ONNX model" else ""
        draw.text((6, y + 4), _ascii(f"{r['model']} {r.get('backend')}{via} "
                                     f"{r.get('precision')} {r.get('threads')}t")[:70],
                  fill="black")
        colour = ORANGE if r.get("peer_of") else BLUE
        draw.rectangle([label_w, y + 4, max(x(r["p50_ms"]), label_w + 2), y + row_h - 4],
                       fill=colour)
        tick = x(r["p99_ms"])
        draw.rectangle([tick - 1, y + 1, tick + 1, y + row_h - 1], fill="black")
        draw.text((tick + 6, y + 4), f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}", fill="black")
    image.save(path)
    return True


STAGE_COLOURS = {"read": (120, 170, 60), "stats": (230, 180, 40), "stages": BLUE,
                 "rest": GREY}


def e2e_chart(e2e: dict[str, Any], path: Path) -> bool:
    """Each end-to-end run's Mpx/s (bar) and where its wall time went (stacked shares)."""
    runs = [r for r in e2e.get("runs", []) if "error" not in r]
    if not runs:
        return False
    label_w, bar_w, row_h = 330, 420, 44
    made = _image(label_w + bar_w + 120, row_h * len(runs) + 60)
    if made is None:
        return False
    image, draw = made
    draw.text((6, 6), "end to end: Mpx/s of 13-band input (top bar, log scale) and the share "
                      "of wall time (bottom)", fill="black")
    legend_x = 6
    for name, colour in (("reader (overlaps)", STAGE_COLOURS["read"]),
                         ("stats", STAGE_COLOURS["stats"]), ("stages", STAGE_COLOURS["stages"]),
                         ("plan/products/other", STAGE_COLOURS["rest"])):
        draw.rectangle([legend_x, 24, legend_x + 10, 34], fill=colour)
        draw.text((legend_x + 14, 23), name, fill="black")
        legend_x += 150
    low = np.log10(min(r["mpx_per_s"] for r in runs) / 3)
    high = np.log10(max(r["mpx_per_s"] for r in runs) * 1.5)
    for i, r in enumerate(runs):
        y = 44 + row_h * i
        draw.text((6, y + 6), _ascii(r["label"])[:52], fill="black")
        length = max(int(bar_w * (np.log10(r["mpx_per_s"]) - low) / (high - low)), 2)
        draw.rectangle([label_w, y + 2, label_w + length, y + 18], fill=BLUE)
        draw.text((label_w + length + 6, y + 4), f"{r['mpx_per_s']:.2f} Mpx/s", fill="black")
        t = r["timings_s"]
        wall = r.get("wall_s", t["wall"])
        stages = sum(v for k, v in t.items() if k not in ("read", "stats", "wall"))
        parts = [("stats", t["stats"]), ("stages", stages),
                 ("rest", max(wall - t["stats"] - stages, 0.0))]
        x0 = label_w
        for name, seconds in parts:
            width = int(bar_w * seconds / wall) if wall > 0 else 0
            draw.rectangle([x0, y + 22, x0 + width, y + 34], fill=STAGE_COLOURS[name])
            x0 += width
        read = int(bar_w * min(t["read"] / wall, 1.0)) if wall > 0 else 0
        draw.rectangle([label_w, y + 36, label_w + read, y + 39], fill=STAGE_COLOURS["read"])
    image.save(path)
    return True
