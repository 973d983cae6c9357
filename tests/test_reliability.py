"""Bad input never gives a confident answer, a traceback or a half-written file (issue 14).

Every damaged input here is made from the repository's real crops: the OSCD Hong Kong and Paris
bands in tests/data, and the shipped cloud bundles.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from onboard.runtime.bundle import Bundle, InputSpec, Manifest, OutputSpec, write_bundle
from onboard.runtime.bundle.container import _write_archive
from onboard.runtime.cli import main
from onboard.runtime.downlink.products import write_geotiff
from onboard.runtime.durability import Journal, partial_name
from onboard.runtime.errors import BundleSchemaError, CorruptTiffError, OnboardError, SceneError
from onboard.runtime.inference import NODATA_CLASS
from onboard.runtime.sources.geotiff import MAX_SCENE_PIXELS, GeoTiffScene
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.sources.spool import Spool
from onboard.runtime.windows import Window

REPO = Path(__file__).resolve().parents[1]
CLOUD_BUNDLE = REPO / "models" / "cloud" / "cloud-4band-fp32-ort.onboard"
BANDS = ["blue", "green", "red", "nir"]


@pytest.fixture(scope="module")
def paris(test_data: Path) -> Path:
    return test_data / "oscd" / "paris" / "imgs_2"


@pytest.fixture(scope="module")
def paris_frame(paris: Path):
    with_bands = OscdScene(paris, bands=["B02", "B03", "B04", "B08"])
    frame = with_bands.read(Window(0, 0, with_bands.height, with_bands.width))
    with_bands.close()
    return frame


@pytest.fixture(scope="module")
def band_pixels(test_data: Path) -> np.ndarray:
    with tifffile.TiffFile(test_data / "oscd" / "hongkong" / "imgs_1" / "hongkong_B02.tif") as t:
        return t.asarray()  # (95, 100) uint16, real Sentinel-2 DN


def _predict(capsys, *args: str | Path) -> tuple[int, str, str]:
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- 1. non-finite or absurd input never yields a confident answer -----------------------------

@pytest.mark.parametrize("scale", ["nan", "inf", "1e40", "0", "-1"])
def test_a_bad_scale_is_refused_before_anything_runs(tmp_path, capsys, paris, scale):
    out = tmp_path / "mask.tif"
    code, stdout, err = _predict(capsys, CLOUD_BUNDLE, paris, "--out", out, f"--scale={scale}")
    assert code == 1 and "--scale must be a finite number" in err and stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _float_scene(path: Path, frame, pixels: np.ndarray) -> Path:
    return write_geotiff(path, pixels.astype(np.float32), BANDS, frame.georef)


@pytest.mark.parametrize("fill", [np.nan, np.inf, 3e38])
def test_a_scene_with_no_usable_pixel_is_an_error_not_a_mask(tmp_path, capsys, paris_frame,
                                                              fill):
    scene = _float_scene(tmp_path / "scene.tif", paris_frame,
                         np.full(paris_frame.pixels.shape, fill))
    out = tmp_path / "mask.tif"
    code, stdout, err = _predict(capsys, CLOUD_BUNDLE, scene, "--out", out,
                                 "--telemetry", tmp_path / "t.jsonl")
    assert code == 1 and "no usable pixel" in err and "nothing written" in err
    assert not out.exists() and not out.with_suffix(".png").exists()
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "predict_refused"


def test_absurd_pixels_are_no_data_and_the_rest_is_classified(tmp_path, capsys, paris_frame):
    """Finite 3e38 pixels used to come out as a confident class: they are no data now."""
    pixels = paris_frame.pixels.astype(np.float32)
    pixels[:, 20:60, 30:80] = 3e38
    scene = _float_scene(tmp_path / "scene.tif", paris_frame, pixels)
    out = tmp_path / "mask.tif"
    code, stdout, _ = _predict(capsys, CLOUD_BUNDLE, scene, "--out", out, "--bands",
                               ",".join(BANDS))
    assert code == 0
    with GeoTiffScene(out) as written:
        mask = written.read_pixels(Window(0, 0, written.height, written.width))[0]
    absurd = np.zeros(mask.shape, bool)
    absurd[20:60, 30:80] = True
    assert (mask[absurd] == NODATA_CLASS).all()
    assert (mask[~absurd] != NODATA_CLASS).all()
    assert f"nodata_fraction: {absurd.mean():.4f}" in stdout


def _log_bundle(path: Path, blue_offset: float) -> Path:
    """A real ONNX graph (1×1 conv picking blue, green, red, then Log) whose logits are NaN or
    -inf wherever blue reflectance + ``blue_offset`` is not positive."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.zeros((3, 4, 1, 1), np.float32)
    weight[[0, 1, 2], [0, 1, 2]] = 1.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["picked"]),
         helper.make_node("Log", ["picked"], ["output"])],
        "log_of_bands",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4, "h", "w"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = Manifest(
        name="log-of-bands", version="1", task="cloud", precision="fp32",
        engines={"onnxruntime": "model.onnx"},
        input=InputSpec(bands=BANDS, scale=[1e-4] * 4, offset=[blue_offset, 0.0, 0.0, 0.0],
                        tile_size=64, gsd_m=10.0),
        output=OutputSpec(kind="classes", channels=3, classes={0: "blue", 1: "green",
                                                               2: "red"}))
    return write_bundle(path, manifest, {"model.onnx": model.SerializeToString()})


def test_non_finite_logits_are_no_data_warned_and_reported(tmp_path, capsys, paris,
                                                           paris_frame):
    blue = paris_frame.pixels[0].astype(np.float32) * np.float32(1e-4)
    offset = -float(np.median(blue))  # half the pixels get a negative blue: Log gives NaN
    bundle = _log_bundle(tmp_path / "log.onboard", offset)
    out = tmp_path / "mask.tif"
    telemetry = tmp_path / "t.jsonl"
    code, stdout, err = _predict(capsys, bundle, paris, "--out", out, "--telemetry", telemetry)
    assert code == 0
    assert "not finite" in err and "no data in the product" in err
    with GeoTiffScene(out) as written:
        mask = written.read_pixels(Window(0, 0, written.height, written.width))[0]
    expected_nodata = blue + np.float32(offset) <= 0
    assert 0.3 < expected_nodata.mean() < 0.7
    assert np.array_equal(mask == NODATA_CLASS, expected_nodata)
    assert set(np.unique(mask[~expected_nodata])) <= {0, 1, 2}
    events = {json.loads(line)["event"]: json.loads(line)
              for line in telemetry.read_text().splitlines()}
    assert events["nonfinite_output"]["tiles"] > 0
    assert events["predict_done"]["nonfinite_output_tiles"] > 0
    assert f"nodata_fraction: {expected_nodata.mean():.4f}" in stdout


def test_all_non_finite_logits_exit_non_zero(tmp_path, capsys, paris):
    bundle = _log_bundle(tmp_path / "log.onboard", -1.0)  # every blue input is negative
    out = tmp_path / "mask.tif"
    code, _, err = _predict(capsys, bundle, paris, "--out", out)
    assert code == 1 and "no usable pixel: the model's output was not finite" in err
    assert not out.exists()


# -- 2. the declared image size is checked -----------------------------------------------------

def _patch_tags(path: Path, values: dict[int, int]) -> Path:
    """Overwrite inline SHORT/LONG tag values of the first page in place."""
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        for code, value in values.items():
            tag = tif.pages.first.tags[code]
            fmt = {3: "<H", 4: "<I"}[int(tag.dtype)]
            data[tag.valueoffset:tag.valueoffset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))
    return path


def _one_strip(path: Path, pixels: np.ndarray) -> Path:
    tifffile.imwrite(path, pixels, rowsperstrip=pixels.shape[0])
    return path


@pytest.mark.parametrize("edge", [100_000, 1_000_000])
def test_a_tiny_tiff_declaring_a_huge_image_is_refused_before_any_allocation(
        tmp_path, capsys, band_pixels, edge):
    path = _patch_tags(_one_strip(tmp_path / "huge.tif", band_pixels),
                       {256: edge, 257: edge, 278: edge})
    assert path.stat().st_size < 20_000
    with pytest.raises(SceneError, match="implausible image size") as caught:
        GeoTiffScene(path)
    assert f"declares {edge} × {edge} px" in str(caught.value)
    assert f"{MAX_SCENE_PIXELS:,} px per band" in str(caught.value)
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert "implausible image size" in err and str(path) in err


def test_the_pixel_limit_is_configurable_and_the_bytes_are_checked_too(tmp_path, band_pixels):
    # Under a raised limit, an uncompressed strip still has to hold what it declares.
    path = _patch_tags(_one_strip(tmp_path / "wide.tif", band_pixels), {256: 150})
    with pytest.raises(CorruptTiffError, match="stores 19000 bytes"):
        GeoTiffScene(path)
    huge = _patch_tags(_one_strip(tmp_path / "huge.tif", band_pixels),
                       {256: 100_000, 257: 100_000, 278: 100_000})
    with pytest.raises(SceneError, match="a read may allocate"):
        GeoTiffScene(huge, max_pixels=10**12)
    small = _one_strip(tmp_path / "small.tif", band_pixels)
    with pytest.raises(SceneError, match="the limit is 1,000 px per band"):
        GeoTiffScene(small, max_pixels=1000)
    with GeoTiffScene(small) as scene:  # the untouched file still reads back exactly
        assert np.array_equal(scene.read_pixels(Window(0, 0, 95, 100))[0], band_pixels)


# -- 3. tracebacks become errors ---------------------------------------------------------------

def test_rows_per_strip_zero_is_a_corrupt_tiff(tmp_path, band_pixels):
    path = _patch_tags(_one_strip(tmp_path / "rps0.tif", band_pixels), {278: 0})
    with pytest.raises(CorruptTiffError, match="RowsPerStrip is 0"):
        GeoTiffScene(path)


def _fuzz_bases(folder: Path, test_data: Path, band_pixels: np.ndarray) -> dict[str, bytes]:
    """Real crops in the layouts the reader handles: tiled zstd (as committed), strips,
    planar tiles, chunky LZW strips."""
    stack = OscdScene(test_data / "oscd" / "hongkong" / "imgs_1",
                      bands=["B02", "B03", "B04", "B08"])
    pixels = stack.read(Window(0, 0, stack.height, stack.width)).pixels
    stack.close()
    tifffile.imwrite(folder / "strips.tif", band_pixels, rowsperstrip=16)
    tifffile.imwrite(folder / "planar.tif", pixels, planarconfig="separate", tile=(32, 32),
                     photometric="minisblack", compression="zlib")
    tifffile.imwrite(folder / "chunky.tif", np.moveaxis(pixels, 0, -1), photometric="minisblack",
                     planarconfig="contig", rowsperstrip=8, compression="lzw")
    bases = {p.stem: p.read_bytes() for p in sorted(folder.glob("*.tif"))}
    bases["committed"] = (test_data / "oscd" / "hongkong" / "imgs_1" /
                          "hongkong_B02.tif").read_bytes()
    return bases


def test_mutated_headers_give_onboard_errors_only(tmp_path, test_data, band_pixels):
    """250 real crops with 1-4 bytes of their header and tags changed: each one reads or is
    refused with an OnboardError (before the fix: 19 of 400 raised ZeroDivisionError,
    "zip() argument 2 is longer than argument 1" or TypeError)."""
    bases = _fuzz_bases(tmp_path, test_data, band_pixels)
    rng = random.Random(20241114)
    outcomes = {"read": 0, "refused": 0}
    crashes: list[str] = []
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    for number in range(250):
        name = rng.choice(sorted(bases))
        data = bytearray(bases[name])
        head = min(len(data), 700)  # the header, the IFD and the tag values tifffile writes
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(4, head)] = rng.randrange(256)
        path = tmp_path / f"mutant{number}.tif"
        path.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with GeoTiffScene(path) as scene:
                    scene.read_pixels(Window(0, 0, scene.height, scene.width))
            outcomes["read"] += 1
        except OnboardError as error:
            assert str(path) in str(error)  # the message names the file
            outcomes["refused"] += 1
        except Exception as error:  # what this test exists to find
            crashes.append(f"{name} #{number}: {type(error).__name__}: {error}")
        path.unlink()
    assert crashes == []
    assert outcomes["refused"] > 50 and outcomes["read"] > 50  # the mutations did both


def test_out_under_a_file_names_the_real_problem(tmp_path, capsys, paris):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"a file")
    code, _, err = _predict(capsys, CLOUD_BUNDLE, paris, "--out", blocker / "mask.tif")
    assert code == 1 and f"{blocker} is a file, not a folder" in err
    assert "Traceback" not in err and blocker.read_bytes() == b"a file"


def test_out_on_a_read_only_path_names_the_write_that_failed(tmp_path, capsys, paris):
    target = Path("/sys/kernel/onboard-reliability-test.tif")  # sysfs: not writable, even as root
    if not target.parent.is_dir():
        pytest.skip("no /sys/kernel on this system")
    code, _, err = _predict(capsys, CLOUD_BUNDLE, paris, "--out", target, "--no-png")
    assert code == 1 and f"{target}: cannot write product: cannot write" in err
    assert "Traceback" not in err


def test_info_into_a_closed_pipe_ends_quietly(test_data):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line, as `| head` gone early
    try:
        result = subprocess.run([sys.executable, "-c", "import sys; from onboard.runtime.cli "
                                 "import main; sys.exit(main())", "info", str(CLOUD_BUNDLE)],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 0
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


# -- 4. half-written files ---------------------------------------------------------------------

def test_predict_removes_what_a_killed_run_left_half_written(tmp_path, capsys, paris):
    out = tmp_path / "out" / "mask.tif"
    out.parent.mkdir()
    dead = out.parent / ".mask.tif.999999999.0badc0de.partial"  # no process has this pid
    dead.write_bytes(b"half a GeoTIFF")
    live = partial_name(out.parent / "other.tif")  # this process's: a writer still running
    live.write_bytes(b"being written")
    code, _, _ = _predict(capsys, CLOUD_BUNDLE, paris, "--out", out)
    assert code == 0 and out.exists() and out.with_suffix(".png").exists()
    assert not dead.exists() and live.exists()


SPOOL_CONSUMER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from onboard.runtime.durability import remove_partials, write_bytes
    from onboard.runtime.sources.geotiff import GeoTiffScene
    from onboard.runtime.sources.spool import Spool
    from onboard.runtime.windows import Window

    spool_dir, products = Path(sys.argv[1]), Path(sys.argv[2])
    spool = Spool(spool_dir, settle_s=0)  # finishes rejections, cleans its own state
    # The consumer's own output is its to clean, as PassRunner cleans its products folder.
    print("ready", len(remove_partials(products)), flush=True)

    def handle(item):
        with GeoTiffScene(item.path) as scene:  # a truncated file raises CorruptTiffError
            pixels = scene.read_pixels(Window(0, 0, scene.height, scene.width))
        write_bytes(products / (item.path.stem + ".raw"), pixels.tobytes())
        return {"pixels": int(pixels.size)}

    spool.drain(handle)
    print("drained", flush=True)
""")


def _fill_spool(folder: Path, sources: list[Path], bad: set[int]) -> None:
    base = 1_700_000_000_000_000_000
    for number, source in enumerate(sources):
        target = folder / f"{number:02d}.tif"
        data = source.read_bytes()
        target.write_bytes(data[: len(data) // 2] if number in bad else data)
        os.utime(target, ns=(base + number, base + number))


def _check_spool(folder: Path, bad: set[int], finished: bool) -> None:
    records = Journal(folder / ".onboard" / "journal.jsonl").records
    final: dict[str, list[str]] = {}
    for record in records:
        final.setdefault(record["file"], []).append(record["state"])
    for name, states in final.items():
        number = int(name[:2])
        # Never both, never twice: done once, or rejecting (then rejected) once.
        assert states in (["done"], ["rejecting"], ["rejecting", "rejected"]), (name, states)
        assert (states == ["done"]) == (number not in bad), (name, states)
    if finished:
        assert len(final) == len(list((folder / "quarantine").iterdir())) + sum(
            1 for s in final.values() if s == ["done"])


@pytest.mark.slow
def test_a_spool_consumer_killed_at_random_points_neither_skips_nor_repeats(tmp_path, test_data):
    sources = sorted((test_data / "oscd").glob("*/imgs_*/*.tif"))[:36]
    bad = {3, 11, 17, 29}
    script = tmp_path / "consumer.py"
    script.write_text(SPOOL_CONSUMER)
    rng = random.Random(1114)
    folders = [tmp_path / f"spool{i}" for i in range(8)]
    for folder in folders:
        (folder / "products").mkdir(parents=True)
        _fill_spool(folder, sources, bad)
    kills = interrupted = half_written = 0
    for _ in range(7):
        children = [subprocess.Popen([sys.executable, str(script), str(f), str(f / "products")],
                                     stdout=subprocess.PIPE, text=True) for f in folders]
        for child in children:
            assert child.stdout is not None
            ready, removed = child.stdout.readline().split()
            assert ready == "ready"
            half_written += int(removed)
            time.sleep(rng.uniform(0.0, 0.02))  # the drain starts right after "ready"
            child.send_signal(signal.SIGKILL)
        for folder, child in zip(folders, children, strict=True):
            child.wait()
            assert child.stdout is not None
            interrupted += "drained" not in child.stdout.read()
            child.stdout.close()
            kills += 1
            _check_spool(folder, bad, finished=False)
    # Kills landed mid-drain (how many depends on the machine's speed and load, so the floor
    # is low; every kill's aftermath was checked above, mid-drain or not).
    assert kills >= 50 and interrupted >= 1, (kills, interrupted, half_written)
    print(f"spool kill test: {kills} kills, {interrupted} mid-drain, {half_written} partial files")
    for folder in folders:
        finished = subprocess.run([sys.executable, str(script), str(folder),
                                   str(folder / "products")], capture_output=True, text=True)
        assert finished.returncode == 0 and "drained" in finished.stdout, finished.stderr
        half_written += int(finished.stdout.split()[1])
        _check_spool(folder, bad, finished=True)
        records = Journal(folder / ".onboard" / "journal.jsonl").records
        done = [r["file"] for r in records if r["state"] == "done"]
        rejected = [r["file"] for r in records if r["state"] == "rejected"]
        assert sorted(done + rejected) == [f"{n:02d}.tif" for n in range(len(sources))]
        assert sorted(rejected) == [f"{n:02d}.tif" for n in sorted(bad)]
        assert sorted(p.name for p in (folder / "quarantine").iterdir()) == sorted(rejected)
        for number, source in enumerate(sources):  # every product whole and right
            if number in bad:
                continue
            with GeoTiffScene(source) as scene:
                pixels = scene.read_pixels(Window(0, 0, scene.height, scene.width))
            assert (folder / "products" / f"{number:02d}.raw").read_bytes() == pixels.tobytes()
        leftovers = [p for p in folder.rglob("*.partial")]
        assert leftovers == [] and Spool(folder, settle_s=0).pending() == []


# -- 5. options and manifests are checked ------------------------------------------------------

@pytest.mark.parametrize(("option", "problem"), [
    (["--overlap", "255"], "--overlap must be an integer in [0, 128]"),
    (["--overlap", "-1"], "--overlap must be 0 or more pixels"),
    (["--batch", "0"], "--batch must be in [1, 1024]"),
    (["--threads", "0"], "--threads must be in [1, 256]"),
])
def test_out_of_range_options_are_refused_not_capped(tmp_path, capsys, paris, option, problem):
    out = tmp_path / "mask.tif"
    code, _, err = _predict(capsys, CLOUD_BUNDLE, paris, "--out", out, *option)
    assert code == 1 and problem in err and not out.exists()


@pytest.mark.parametrize(("tile_size", "message"), [
    (100_000, "input.tile_size must be an integer in [8, 4096], got 100000"),
    (1, "input.tile_size must be an integer in [8, 4096], got 1"),
])
def test_a_re_checksummed_manifest_with_an_absurd_tile_size_is_refused(tmp_path, tile_size,
                                                                       message):
    """The manifest is edited and the bundle's checksums re-made, as anyone could: the damage
    checks pass, so the schema must refuse it."""
    shipped = Bundle.open(CLOUD_BUNDLE)
    manifest = json.loads(shipped.manifest_bytes)
    manifest["input"]["tile_size"] = tile_size
    members = {name: shipped.read(name) for name in shipped.members}
    forged = _write_archive(tmp_path / "forged.onboard",
                            (json.dumps(manifest, indent=2) + "\n").encode(), None, members)
    with pytest.raises(BundleSchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Bundle.open(forged)


def test_shipped_bundles_and_scenes_are_inside_every_limit(sample_pass):
    for path in sorted((REPO / "models" / "cloud").glob("*.onboard")):
        Bundle.open(path)
    scene = OscdScene(sample_pass / "imgs_1")
    assert (scene.height, scene.width) == (256, 256)
    scene.close()
