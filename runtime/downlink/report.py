"""The pass report: a short markdown page a mission operator reads after a pass.

Tiles seen, dropped, kept; bytes planned against each contact window's budget; value captured
against the exact optimum and against "downlink everything"; what was sent and acknowledged;
and where the stages spent their time. Everything in it comes from the run's summary, which is
also written as JSON beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onboard.runtime.durability import write_text


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.3f} MB"


def render(summary: dict[str, Any]) -> str:
    lines = [f"# Pass report: {summary.get('name', 'onboard run')}", ""]
    lines += [f"Run at {summary.get('started')} UTC, {summary.get('wall_s', 0):.1f} s; "
              f"{summary.get('input_mpx', 0):.2f} Mpx of input at "
              f"{summary.get('mpx_per_s', 0):.2f} Mpx/s end to end.", ""]
    lines += ["## Acquisitions", "",
              "| acquisition | tiles | kept | demoted | dropped | failed | Mpx/s | quicklook |",
              "|---|---|---|---|---|---|---|---|"]
    for acq in summary.get("acquisitions", []):
        d = acq["decisions"]
        ql = acq.get("quicklook")
        lines.append(f"| {acq['id']} | {acq['tiles']} | {d['keep']} | {d['demote']} | "
                     f"{d['drop']} | {d['failed']} | {acq['mpx_per_s']:.2f} | "
                     f"{f'![]({ql})' if ql else ''} |")
    errors = summary.get("errors", [])
    if errors:
        lines += ["", "Acquisitions that could not be used:", ""]
        lines += [f"- `{e['source']}`: {e['error']}: {e['message']}" for e in errors]
    plan = summary.get("plan", {})
    lines += ["", "## Plan", "",
              "| window | start | budget | planned | used |", "|---|---|---|---|---|"]
    for i, window in enumerate(plan.get("windows", [])):
        budget, planned = window["budget_bytes"], window["planned_bytes"]
        lines.append(f"| {i} | {window['start']} | {_mb(budget)} | {_mb(planned)} | "
                     f"{planned / budget:.0%} |" if budget else f"| {i} | | | | |")
    value, optimum, everything = (plan.get("value"), plan.get("exact_optimum"),
                                  plan.get("downlink_everything_value"))
    lines += ["", f"- candidates: {plan.get('candidates', 0)} products of "
                  f"{plan.get('candidate_tiles', 0)} usable tiles; chosen: "
                  f"{plan.get('chosen', 0)} ({plan.get('chosen_kinds', {})})",
              f"- value captured: {value:.3f}" if value is not None else "- value: n/a"]
    estimated = plan.get("planner_value_on_estimates")
    if optimum and estimated is not None:
        lines.append(f"- on the size estimates it planned with, the planner reached "
                     f"{estimated:.3f}: {estimated / optimum:.1%} of the exact optimum of the "
                     f"same candidates ({optimum:.3f}, integer program)")
    if everything is not None:
        lines.append(f"- \"downlink everything\" (full tiles in acquisition order, same budget): "
                     f"{everything:.3f} value, {plan.get('downlink_everything_tiles', 0)} tiles")
    if plan.get("repacked"):
        lines.append(f"- repacked after making the products: {plan['repacked']} product(s) "
                     f"no longer fit once their real size was known")
    link = summary.get("link")
    if link:
        lines += ["", "## Link", "",
                  f"- sent {link.get('sent', 0)} items, {_mb(link.get('bytes_sent'))}; "
                  f"acknowledged {link.get('acknowledged', 0)}; still queued "
                  f"{link.get('queued', 0)}"]
    storage = summary.get("storage", {})
    if storage:
        lines += ["", "## Storage", "",
                  f"- used {_mb(storage.get('used_bytes'))} of {_mb(storage.get('budget_bytes'))}"
                  f" (products {_mb(storage.get('products_bytes'))}, telemetry "
                  f"{_mb(storage.get('telemetry_bytes'))}, queue "
                  f"{_mb(storage.get('queue_bytes'))}); products refused for space: "
                  f"{storage.get('refused', 0)}"]
    stages = summary.get("timings_s", {})
    if stages:
        lines += ["", "## Where the time went", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.3f} |" for name, seconds in stages.items()]
    telemetry = summary.get("telemetry", {})
    if telemetry:
        lines += ["", f"Telemetry: {_mb(telemetry.get('bytes'))} written "
                      f"(budget {_mb(telemetry.get('budget_bytes'))}); "
                      f"{telemetry.get('dropped', 0)} detail records over budget not written."]
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, summary: dict[str, Any]) -> Path:
    return write_text(path, render(summary))
