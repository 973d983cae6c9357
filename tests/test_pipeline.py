"""`onboard run`: the flight pipeline end to end on the bundled sample and on damaged input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import tifffile
from stac_pydantic import Item

from onboard.runtime import pipeline
from onboard.runtime.bundle import Bundle, write_bundle
from onboard.runtime.config import EngineConfig, load_config
from onboard.runtime.errors import ConfigError, OnboardError
from onboard.runtime.scores import Decision
from onboard.runtime.stages import StageContext, TileWork, register_stage

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models" / "cloud"
SAMPLE_TOML = REPO / "runtime" / "sample" / "onboard.toml"


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The default command, as README's first line runs it."""
    out = tmp_path_factory.mktemp("run") / "out"
    started = time.perf_counter()
    result = subprocess.run(["onboard", "run", "--out", str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result, time.perf_counter() - started


def _config(tmp_path: Path, body: str, paths: str = "") -> Path:
    sample = REPO / "runtime" / "sample" / "hongkong"
    text = (f'[source]\nkind = "oscd"\npaths = [{paths or repr(str(sample))}]\n'
            f'[cloud]\nbundle = "{MODELS / "cloud-4band-int8-ort.onboard"}"\nthreads = 1\n'
            + body)
    path = tmp_path / "onboard.toml"
    path.write_text(text.replace("'", '"'))
    return path


def test_the_default_run_plans_both_dates_of_the_sample(sample_run):
    out, result, _ = sample_run
    summary = json.loads((out / "summary.json").read_text())
    acquisitions = summary["acquisitions"]
    assert [a["id"][:17] for a in acquisitions] == ["hongkong-20160927", "hongkong-20180323"]
    assert all(a["tiles"] >= 64 for a in acquisitions)  # a real choice for the planner
    assert "value captured" in result.stdout and str(out) in result.stdout
    plan = summary["plan"]
    for window in plan["windows"]:
        assert 0 < window["planned_bytes"] <= window["budget_bytes"]
        if window["exact_optimum"]:
            assert window["planner_value_on_estimates"] >= 0.97 * window["exact_optimum"]
    # The plan beats "downlink everything" in the same budgets.
    assert plan["value"] > plan["downlink_everything_value"]
    for name in ("report.md", "telemetry.jsonl", "plan-0.jsonl", "plan-1.jsonl"):
        assert (out / name).stat().st_size > 0
    for acquisition in acquisitions:
        png = out / acquisition["quicklook"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_at_most_one_product_per_tile_and_each_is_real(sample_run):
    out, _, _ = sample_run
    rows = [json.loads(line) for name in ("plan-0.jsonl", "plan-1.jsonl")
            for line in (out / name).read_text().splitlines()]
    chosen = [r for r in rows if r["chosen"] is not None]
    tiles = [r["tile_id"] for r in chosen]
    assert len(tiles) == len(set(tiles)) and chosen
    assert {r["kind"] for r in chosen} <= {"thumbnail", "mask", "full", "near_lossless"}
    for row in chosen:
        product = out / "products" / f"{row['product_id']}"
        files = list(product.parent.glob(product.name + ".*"))
        tif = [f for f in files if f.suffix in (".tif", ".png")]
        assert len(tif) == 1
        # The plan's bytes are the product's real compressed size.
        assert tif[0].stat().st_size == row["bytes"] and row["estimated"] is False


def test_stac_items_validate_offline(sample_run):
    out, _, _ = sample_run
    items = sorted((out / "products").glob("*.json"))
    assert items
    for path in items[:20]:
        data = json.loads(path.read_text())
        Item.model_validate(data)
        assert data["stac_version"] == "1.1.0"
        lon, lat = data["geometry"]["coordinates"][0][0]
        assert 113.9 < lon < 114.5 and 22.1 < lat < 22.6  # Hong Kong, in WGS84
        asset = next(iter(data["assets"].values()))
        assert (path.parent / asset["href"]).stat().st_size == asset["file:size"]


def test_the_link_delivered_every_sent_product_once(sample_run):
    out, _, _ = sample_run
    summary = json.loads((out / "summary.json").read_text())
    stored = sorted((out / "ground" / "store").iterdir())
    assert summary["link"]["acknowledged"] == len(stored) > 0
    assert summary["queue"].get("acknowledged", 0) == len(stored)


def test_telemetry_is_json_lines_with_band_statistics(sample_run):
    out, _, _ = sample_run
    records = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    events = {r["event"] for r in records}
    assert {"run_start", "engine_open", "acquisition", "tile", "pass", "run_done"} <= events
    tile = next(r for r in records if r["event"] == "tile")
    assert set(tile["bands"]) == {"B02", "B03", "B04", "B08"}
    assert {"mean", "std", "saturated", "invalid"} <= set(tile["bands"]["B02"])
    assert tile["decision"] in ("keep", "demote", "drop", "failed") and tile["reasons"]
    acquisition = next(r for r in records if r["event"] == "acquisition")
    assert {"read", "cloud", "wall"} <= set(acquisition["timings_s"])


def test_a_telemetry_budget_bounds_the_file_and_counts_what_it_left_out(tmp_path):
    config = _config(tmp_path, "[telemetry]\nbudget_bytes = 8000\n[tiling]\ntile = 32\n")
    result = pipeline.run(config, tmp_path / "out")
    size = (tmp_path / "out" / "telemetry.jsonl").stat().st_size
    assert result.summary["telemetry"]["dropped"] > 0
    # Detail records stop at the budget; the summaries after it are still written.
    records = (tmp_path / "out" / "telemetry.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["event"] == "run_done"
    assert size < 8000 + 20000


def test_a_corrupt_band_file_skips_that_acquisition_and_the_pass_goes_on(tmp_path):
    city = tmp_path / "hongkong"
    shutil.copytree(REPO / "runtime" / "sample" / "hongkong", city)
    band = city / "imgs_2" / "hongkong_B02.tif"
    band.write_bytes(band.read_bytes()[:300])  # truncated in flight
    result = pipeline.run(_config(tmp_path, "[tiling]\ntile = 64\n", repr(str(city))),
                          tmp_path / "out")
    assert [a.acquisition[:17] for a in result.acquisitions] == ["hongkong-20160927"]
    assert len(result.errors) == 1 and "hongkong_B02.tif" in result.errors[0]["message"]
    assert result.summary["plan"]["chosen"] > 0


def _hot_scene(tmp_path: Path) -> Path:
    path = tmp_path / "hot.tif"
    pixels = np.full((4, 128, 128), 3e38, np.float32)  # finite, absurd
    tifffile.imwrite(path, pixels, planarconfig="separate", photometric="minisblack",
                     description=json.dumps({"onboard": {"bands": ["blue", "green", "red",
                                                                   "nir"]}}))
    return path


def _hot_run(tmp_path: Path, bundle: Path) -> pipeline.RunResult:
    text = (f'[source]\nkind = "geotiff"\npaths = ["{_hot_scene(tmp_path)}"]\n'
            f'[tiling]\ntile = 64\n[cloud]\nbundle = "{bundle}"\nthreads = 1\n')
    (tmp_path / "c.toml").write_text(text)
    return pipeline.run(tmp_path / "c.toml", tmp_path / "out")


def test_absurd_pixels_never_come_out_clear(tmp_path):
    scores = _hot_run(tmp_path, MODELS / "cloud-4band-fp32-ort.onboard").acquisitions[0].scores
    assert scores and all(s.decision != Decision.KEEP and s.values.get("clear_fraction", 0) == 0
                          for s in scores)


def test_non_finite_model_output_fails_the_tiles(tmp_path):
    """A manifest whose scale lets 3e38 DN overflow float32: the engine returns inf/NaN."""
    source = Bundle.open(MODELS / "cloud-4band-fp32-ort.onboard")
    manifest = source.manifest
    manifest.inputs[0].scale = [1e3] * 4
    members = {name: source.read(name) for name in manifest.engines.values()}
    bundle = write_bundle(tmp_path / "overflow.onboard", manifest, members)
    result = _hot_run(tmp_path, bundle)
    scores = result.acquisitions[0].scores
    assert scores and all(s.decision == Decision.FAILED for s in scores)
    assert all("not finite" in s.reasons[-1] for s in scores)
    assert result.summary["plan"]["chosen"] == 0


def test_a_source_offset_the_bundle_does_not_expect_is_refused(tmp_path):
    config = _config(tmp_path, "").read_text().replace(
        "[cloud]", "radiometric_offset = -1000.0\n[cloud]")
    (tmp_path / "o.toml").write_text(config)
    with pytest.raises(ConfigError, match="radiometric offset of 0 DN but the source states -1000"):
        pipeline.run(tmp_path / "o.toml", tmp_path / "out")


def test_a_missing_bundle_without_a_fallback_names_the_file(tmp_path):
    text = _config(tmp_path, "").read_text().replace("cloud-4band-int8-ort", "nope")
    (tmp_path / "m.toml").write_text(text)
    result = subprocess.run(["onboard", "run", str(tmp_path / "m.toml"), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "nope.onboard" in result.stderr and "Traceback" not in result.stderr


def test_the_area_of_interest_weights_the_tiles_inside_it(tmp_path):
    aoi = tmp_path / "aoi.geojson"
    # The western half of the sample (it spans 114.2520-114.2760 E).
    aoi.write_text(json.dumps({"type": "Polygon", "coordinates": [[
        [114.20, 22.20], [114.264, 22.20], [114.264, 22.40], [114.20, 22.40], [114.20, 22.20]]]}))
    config = _config(tmp_path, f'[tiling]\ntile = 64\n[aoi]\ngeojson = "{aoi}"\nweight = 3.0\n')
    result = pipeline.run(config, tmp_path / "out")
    weights = {s.tile_id[-7:]: s.aoi_weight for s in result.acquisitions[0].scores}
    assert weights["000_000"] == 3.0 and weights["000_003"] == 1.0
    assert sorted(set(weights.values())) == [1.0, 3.0]


# -- a stage that is one file and one config section, to drive the pipeline's own guards --------


@dataclass(frozen=True)
class SleepyConfig:
    seconds: float = 0.0
    hang_on_batch: int = -1  # this batch never answers


class SleepyStage:
    name: ClassVar[str] = "sleepy"
    bands = ("red",)

    calls = 0  # over every instance: the pipeline replaces a stage that hung

    def __init__(self, config: SleepyConfig) -> None:
        self.config = config

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name, "bundle": "none", "version": "0"}

    def close(self) -> None:
        pass

    def process(self, batch: list[TileWork]) -> list:
        SleepyStage.calls += 1
        if SleepyStage.calls - 1 == self.config.hang_on_batch:
            threading.Event().wait(30)  # an engine that hangs
        time.sleep(self.config.seconds)
        for work in batch:
            work.score.values["clear_fraction"] = 1.0
        return [w.score for w in batch]


register_stage("sleepy", SleepyConfig, lambda config, context: SleepyStage(config), order=90)


def test_a_hung_batch_fails_its_tiles_and_the_pass_goes_on(tmp_path):
    SleepyStage.calls = 0
    config = _config(tmp_path, "[tiling]\ntile = 32\n[buffer]\nbatch = 8\ndeadline_s = 1.0\n"
                               "[sleepy]\nhang_on_batch = 2\n")
    result = pipeline.run(config, tmp_path / "out")
    scores = result.acquisitions[0].scores
    failed = [s for s in scores if s.decision == Decision.FAILED]
    assert len(failed) == 8 and all("deadline" in s.reasons[-1] for s in failed)
    assert len(scores) - len(failed) == 56  # every other batch went on through a fresh stage
    events = [json.loads(x)["event"] for x in (tmp_path / "out" / "telemetry.jsonl")
              .read_text().splitlines()]
    assert "stage_deadline" in events and "stage_reset" in events


def test_backpressure_drop_policy_records_every_dropped_tile(tmp_path):
    config = _config(tmp_path, "[tiling]\ntile = 32\n[buffer]\nbatch = 4\nbatches = 1\n"
                               "policy = 'drop'\n[sleepy]\nseconds = 0.15\n")
    result = pipeline.run(config, tmp_path / "out")
    acquisition = result.acquisitions[0]
    dropped = [s for s in acquisition.scores if "backpressure" in " ".join(s.reasons)]
    assert acquisition.dropped_by_backpressure == len(dropped) > 0
    records = [json.loads(x) for x in (tmp_path / "out" / "telemetry.jsonl")
               .read_text().splitlines()]
    logged = [t for r in records if r["event"] == "backpressure_drop"
              and r["acquisition"] == acquisition.acquisition for t in r["tiles"]]
    assert sorted(logged) == sorted(s.tile_id for s in dropped)


def test_the_sample_config_is_typed_and_engine_options_are_checked(tmp_path):
    config = load_config(SAMPLE_TOML)
    assert config.section("tiling").tile == 32 and len(config.section("passes")) == 2
    assert isinstance(config.section("cloud"), EngineConfig)
    with pytest.raises(ConfigError, match="threads must be in"):
        EngineConfig(bundle=Path("x"), threads=0)
    assert issubclass(ConfigError, OnboardError)


def test_the_flight_run_never_imports_torch(tmp_path):
    code = ("import sys; from onboard.runtime import pipeline; "
            f"pipeline.run({str(SAMPLE_TOML)!r}, {str(tmp_path / 'o')!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)


def test_stage_context_carries_the_source_offset():
    context = StageContext(telemetry=None, state_dir=Path("."), radiometric_offset=-1000.0)
    assert context.radiometric_offset == -1000.0


FULL_DISK = """
import resource, signal, sys
from onboard.runtime.cli import main
# A file-size limit makes the kernel refuse writes past it, as a full disk does.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
sys.exit(main(["run", "--out", sys.argv[1]]))
"""


def test_a_full_disk_stops_the_run_cleanly_and_loses_nothing_queued(tmp_path):
    from onboard.runtime.downlink.queue import DownlinkQueue, file_sha256

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "onboard run: error:" in result.stderr and "Traceback" not in result.stderr
    assert str(out) in result.stderr  # the message names the file that could not be written
    assert not list(out.rglob("*.partial"))
    # Whatever was queued before the disk filled is whole: its file is there, bit for bit.
    with DownlinkQueue(out / "queue.sqlite") as queue:
        items = queue.items()
        for item in items:
            assert item.path.exists() and file_sha256(item.path) == item.sha256
    assert items  # the limit is hit late in the run (the quicklook), after both passes queued
    # The same command without the limit completes over what the failed run left.
    again = subprocess.run(["onboard", "run", "--out", str(out)], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]


def test_the_run_can_downlink_over_cfdp_with_losses(tmp_path):
    """The same pass through CFDP Class 2 with 5 % of file-data PDUs lost: what the queue
    marks acknowledged is on the ground once, bit for bit."""
    from onboard.runtime.downlink.link import stored_name
    from onboard.runtime.downlink.queue import DownlinkQueue, file_sha256

    text = SAMPLE_TOML.read_text().replace('kind = "folder"', 'kind = "cfdp"')
    sample = REPO / "runtime" / "sample"
    text = (text.replace('"hongkong"', repr(str(sample / "hongkong")).replace("'", '"'))
            .replace('"../../models', f'"{REPO}/models')
            .replace('"keys/', f'"{sample}/keys/'))
    (tmp_path / "c.toml").write_text(text + "\n[cfdp]\ndrop_rate = 0.05\nseed = 3\n")
    result = pipeline.run(tmp_path / "c.toml", tmp_path / "out")
    assert result.summary["link"]["acknowledged"] > 0
    with DownlinkQueue(tmp_path / "out" / "queue.sqlite") as queue:
        acknowledged = queue.items("acknowledged")
    store = tmp_path / "out" / "ground" / "store"
    assert len(list(store.iterdir())) == len(acknowledged)
    for item in acknowledged:
        assert file_sha256(store / stored_name(item.id)) == item.sha256


def _superres_pass(tmp_path: Path, task: str, duration_s: float, products: str = ""
                   ) -> tuple[Any, list[list[dict[str, Any]]]]:
    """The sample in 64-pixel tiles with the shipped INT8 ``task`` bundle as the superres
    bundle, a contact window after each date (``duration_s`` at 80 kbit/s); the run and the
    rows of each pass's plan file."""
    sr = REPO / "models" / "superres" / f"superres-{task}-int8-ort.onboard"
    passes = "".join(f"[[passes]]\nstart = {day}T12:00:00Z\nduration_s = {duration_s}\n"
                     "bitrate_bps = 80000\n" for day in ("2016-09-27", "2018-03-23"))
    body = ("[tiling]\ntile = 64\n"
            "[products]\nkinds = ['thumbnail', 'full', 'superres']\n" + products +
            f"[superres]\nbundle = '{sr}'\nthreads = 1\n"
            "[planner]\nutility = {thumbnail = 0.05, full = 1.0, superres = 3.0}\n" + passes)
    result = pipeline.run(_config(tmp_path, body), tmp_path / "out")
    plans = [[json.loads(line) for line in (tmp_path / "out" / f"plan-{i}.jsonl")
              .read_text().splitlines()] for i in (0, 1)]
    return result, plans


def _onboard_tags(path: Path) -> dict[str, Any]:
    """What onboard wrote into a product GeoTIFF's description."""
    with tifffile.TiffFile(path) as tif:
        return json.loads(tif.pages[0].description)["onboard"]


def test_superres_products_are_made_only_for_chosen_tiles(tmp_path):
    """With ×2 super-resolution among the product kinds and passes of 380 kB, room for about
    six of its 70 kB products, the planner chooses it for some tiles of each date and not the
    others: a superres file exists for exactly the chosen superres rows of the plan files,
    fewer than the superres candidates, and some candidates were never made (the model never
    ran for them: their rows are still estimates). The product is the ×2 bands at 5 m."""
    result, plans = _superres_pass(tmp_path, "x2", 40)
    products = tmp_path / "out" / "products"
    rows = [r for plan in plans for r in plan if r["kind"] == "superres"]
    chosen = [r for r in rows if r["chosen"] is not None]
    assert {p.stem for p in products.glob("*-superres.tif")} == {r["product_id"] for r in chosen}
    assert 0 < len(chosen) < len(rows)
    for plan in plans:
        candidates = [r for r in plan if r["kind"] == "superres"]
        picked = [r for r in candidates if r["chosen"] is not None]
        assert 0 < len(picked) < len(candidates) == 16  # every tile of the date a candidate
        assert any(r["estimated"] for r in candidates)  # never made
        for r in picked:  # at their real size, the file's
            assert (products / f"{r['product_id']}.tif").stat().st_size == r["bytes"]
    assert result.summary["plan"]["chosen_kinds"]["superres"] == len(chosen)
    path = products / f"{chosen[0]['product_id']}.tif"
    with tifffile.TiffFile(path) as tif:
        pixels = tif.asarray()
    assert pixels.shape[-2:] == (128, 128) or pixels.shape[:2] == (128, 128)
    assert _onboard_tags(path)["scale_factor"] == 2
    item = json.loads(path.with_suffix(".json").read_text())
    assert item["properties"]["proj:shape"] == [128, 128]
    assert item["properties"]["onboard:bundles"][-1] == "superres-x2@0.1.0"


def test_a_sharpening_bundle_in_a_pass_is_planned_at_what_it_makes(tmp_path):
    """The shipped sharpening bundle as the superres bundle: its products are its six 20 m
    bands sharpened onto the tile's own 10 m grid, scale factor 1 as its manifest states (not
    the ×2 default), and the plan sizes them so. Tolerances: against the mean product the
    pass made (the plan's rows at real size; what it chose is biased to the smaller ones), the
    first pass's estimates (the size model's first guess) within 20 %, the second's (learnt
    from the first's products, under the scene's band names) within 15 %; every product
    written within 40 % of its pass's estimate. The old estimate, four bands at ×2, was twice
    the mean product (62.6 kB against 31 kB)."""
    result, plans = _superres_pass(tmp_path, "sharpen", 20)
    products = sorted((tmp_path / "out" / "products").glob("*-superres.tif"))
    assert products
    for path in products:
        tags = _onboard_tags(path)
        assert tags["scale_factor"] == 1 and tags["bundle"] == "superres-sharpen@0.3.0"
        assert tags["bands"] == ["B05", "B06", "B07", "B8A", "B11", "B12"]
        with tifffile.TiffFile(path) as tif:
            assert tif.asarray().shape in ((6, 64, 64), (64, 64, 6))
        item = json.loads(path.with_suffix(".json").read_text())
        assert item["properties"]["proj:shape"] == [64, 64]
        assert item["properties"]["onboard:bundles"] == ["cloud-4band@0.4.0",
                                                         "superres-sharpen@0.3.0"]
    for plan, tolerance in zip(plans, (0.20, 0.15), strict=True):
        rows = [r for r in plan if r["kind"] == "superres"]
        estimates = {r["bytes"] for r in rows if r["estimated"]}
        made = [r["bytes"] for r in rows if not r["estimated"]]
        written = [r["bytes"] for r in rows if r["chosen"] is not None]
        assert len(estimates) == 1 and written  # every tile 64², so one estimate per pass
        estimate = estimates.pop()
        assert abs(estimate / float(np.mean(made)) - 1) < tolerance, (estimate, made)
        assert all(abs(w / estimate - 1) < 0.4 for w in written), (estimate, written)
    # A [products] section that says otherwise is refused before anything runs.
    for i, stated in enumerate(("superres_scale = 2\n",
                                "superres_bands = ['blue', 'green', 'red', 'nir']\n")):
        (tmp_path / f"refused{i}").mkdir()
        with pytest.raises(ConfigError, match="superres_(scale|bands).*superres-sharpen@0.3.0"):
            _superres_pass(tmp_path / f"refused{i}", "sharpen", 20, stated)


def test_superres_among_the_kinds_needs_its_section_and_a_value(tmp_path):
    with pytest.raises(ConfigError, match="no \\[superres\\] section"):
        pipeline.run(_config(tmp_path, "[products]\nkinds = ['full', 'superres']\n"),
                     tmp_path / "out")


@pytest.mark.slow
def test_onboard_run_killed_at_random_points_loses_nothing_and_stores_nothing_twice(tmp_path):
    """SIGKILL `onboard run` 50 times at random points over one output folder, then let it
    finish: nothing half-written is left, every queued product is whole, and the ground holds
    each delivered product exactly once."""
    import random as _random

    from onboard.runtime.downlink.link import Receiver, stored_name
    from onboard.runtime.downlink.queue import DownlinkQueue, file_sha256

    out = tmp_path / "out"
    rng = _random.Random(9)
    kills = 0
    while kills < 50:
        child = subprocess.Popen(["onboard", "run", "--out", str(out)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.4, 1.8))  # the sample run takes about 2 s here
        if child.poll() is None:
            child.kill()
            kills += 1
        child.wait()
        child.stderr.close()
    final = subprocess.run(["onboard", "run", "--out", str(out)], capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert not list(out.rglob("*.partial"))
    with DownlinkQueue(out / "queue.sqlite") as queue:
        items = queue.items()
        acknowledged = {i.id for i in items if i.state == "acknowledged"}
        for item in items:
            assert file_sha256(item.path) == item.sha256, item.id
    receiver = Receiver(out / "ground")
    assert receiver.ids() == acknowledged and acknowledged
    assert all(n == 1 for n in receiver.stored_counts().values())
    for item_id in acknowledged:
        assert (out / "ground" / "store" / stored_name(item_id)).exists()
