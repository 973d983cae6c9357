"""Bundles: the uplinked file is verified byte for byte before any engine sees it."""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import ukis_bundle

from onboard.runtime.bundle import (
    MANIFEST,
    SCHEMA_VERSION,
    TRAILER_PREFIX,
    TRAILER_SIZE,
    Bundle,
    InputSpec,
    Manifest,
    OutputSpec,
    write_bundle,
)
from onboard.runtime.cli import main
from onboard.runtime.cli.info import describe
from onboard.runtime.errors import (
    BundleChecksumError,
    BundleError,
    BundleFormatError,
    BundleNotFoundError,
    BundleSchemaError,
    EngineInputError,
    OnboardError,
)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    return ukis_bundle.build(tmp_path_factory.mktemp("bundle") / "ukis.onboard")


def _data_offset(path: Path, member: str) -> tuple[int, int]:
    """(offset of the member's bytes in the file, their length)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _repack(src: Path, dst: Path, edit=None, drop: tuple[str, ...] = ()) -> Path:
    """Rewrite a bundle with an edited manifest and/or members left out, trailer recomputed.

    This is how a badly made (not a damaged) bundle looks: every checksum in it is right.
    """
    with zipfile.ZipFile(src) as archive:
        manifest = json.loads(archive.read(MANIFEST))
        members = {n: archive.read(n) for n in archive.namelist() if n != MANIFEST}
    if edit is not None:
        edit(manifest)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest))
        for name, data in members.items():
            if name not in drop:
                archive.writestr(name, data)
    body = dst.read_bytes()[:-2]
    digest = hashlib.sha256(body).hexdigest().encode()
    dst.write_bytes(body + TRAILER_SIZE.to_bytes(2, "little") + TRAILER_PREFIX + digest)
    return dst


def test_round_trip_verifies_every_member(bundle_path, tmp_path):
    bundle = Bundle.open(bundle_path)
    m = bundle.manifest
    # One input, one output, nothing schema 2 adds: written as schema 1, for older boards.
    assert m.schema_version == 1 and m.task == "cloud" and m.precision == "fp32"
    assert m.input.bands == ["blue", "green", "red", "nir"]
    assert m.output.classes == {0: "clear", 1: "cloud", 2: "cloud shadow"}
    onnx = ukis_bundle.onnx_bytes()
    assert m.files == {"model.onnx": hashlib.sha256(onnx).hexdigest()}
    assert bundle.sha256 == hashlib.sha256(bundle_path.read_bytes()).hexdigest()
    assert bundle.read("model.onnx") == onnx
    out = bundle.extract(tmp_path / "x")
    assert (out / "model.onnx").read_bytes() == onnx
    assert Manifest.from_json((out / MANIFEST).read_text()) == m


def test_same_members_give_the_same_file(bundle_path, tmp_path):
    # Deterministic bytes: the ground can re-create a bundle and compare hashes before uplink.
    created = Bundle.open(bundle_path).manifest.created
    again = ukis_bundle.build(tmp_path / "again.onboard", created=created)
    assert again.read_bytes() == bundle_path.read_bytes()


def _positions(path: Path) -> dict[str, int]:
    onnx, onnx_len = _data_offset(path, "model.onnx")
    manifest, manifest_len = _data_offset(path, MANIFEST)
    size = path.stat().st_size
    return {
        "first byte (zip header)": 0,
        "manifest: its first byte": manifest,
        "manifest: inside the input scale": manifest + path.read_bytes()[
            manifest:manifest + manifest_len].index(b'"scale"') + 14,
        "onnx member: first byte": onnx,
        "onnx member: a weight in the middle": onnx + onnx_len // 2,
        "onnx member: last byte": onnx + onnx_len - 1,
        "central directory": onnx + onnx_len + 20,
        "trailer length field": size - TRAILER_SIZE - 2,
        "trailer prefix": size - TRAILER_SIZE + 3,
        "trailer digest, last byte": size - 1,
    }


@pytest.mark.parametrize("where", [
    "first byte (zip header)", "manifest: its first byte", "manifest: inside the input scale",
    "onnx member: first byte", "onnx member: a weight in the middle", "onnx member: last byte",
    "central directory", "trailer length field", "trailer prefix", "trailer digest, last byte",
])
def test_one_flipped_byte_anywhere_is_refused(bundle_path, tmp_path, where):
    position = _positions(bundle_path)[where]
    data = bytearray(bundle_path.read_bytes())
    data[position] ^= 0x04
    damaged = tmp_path / "damaged.onboard"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BundleChecksumError) as caught:
        Bundle.open(damaged)
    message = str(caught.value)
    assert str(damaged) in message and "checksum mismatch" in message
    if where.startswith("onnx member"):
        assert "'model.onnx'" in message
    if where.startswith("manifest"):
        assert f"'{MANIFEST}'" in message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, OnboardError)


def test_truncated_bundle_is_refused(bundle_path, tmp_path):
    short = tmp_path / "short.onboard"
    short.write_bytes(bundle_path.read_bytes()[: 1_000_000])
    with pytest.raises(BundleChecksumError):
        Bundle.open(short)


def test_not_a_bundle(test_data, tmp_path):
    with pytest.raises(BundleFormatError, match="not an onboard bundle"):
        Bundle.open(test_data / "oscd" / "paris" / "imgs_1" / "paris_B02.tif")
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("model.onnx", b"not a model")
    with pytest.raises(BundleFormatError, match="not an onboard bundle"):
        Bundle.open(plain)
    with pytest.raises(BundleNotFoundError, match="no such bundle"):
        Bundle.open(tmp_path / "missing.onboard")


def test_newer_schema_is_refused(bundle_path, tmp_path):
    def newer(manifest: dict) -> None:
        manifest["schema_version"] = SCHEMA_VERSION + 1
        manifest["engines_v2"] = {"onnxruntime": {"file": "model.onnx"}}

    path = _repack(bundle_path, tmp_path / "v2.onboard", newer)
    with pytest.raises(BundleSchemaError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        Bundle.open(path)


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.update(task="flood"), "unknown task 'flood'"),
    (lambda m: m.pop("schema_version"), "schema_version must be"),
    (lambda m: m["input"].update(scale=[1.0]), "input.scale must be 4 finite numbers"),
    (lambda m: m["input"].update(gsd_m=-10), "input.gsd_m must be a positive"),
    (lambda m: m["output"].update(kind="boxes"), "output.kind must be one of"),
    (lambda m: m.update(precision="fp8"), "precision must be one of"),
    (lambda m: m.update(engines={"tflite": "model.onnx"}), "unknown backend 'tflite'"),
    (lambda m: m.update(colour="blue"), "unknown field(s) ['colour']"),
])
def test_invalid_manifest_is_refused(bundle_path, tmp_path, edit, problem):
    path = _repack(bundle_path, tmp_path / "bad.onboard", edit)
    with pytest.raises(BundleSchemaError) as caught:
        Bundle.open(path)
    assert problem in str(caught.value) and str(path) in str(caught.value)


def test_missing_engine_member_is_refused(bundle_path, tmp_path):
    def forget(manifest: dict) -> None:
        del manifest["files"]["model.onnx"]

    path = _repack(bundle_path, tmp_path / "no-engine.onboard", forget, drop=("model.onnx",))
    with pytest.raises(BundleFormatError, match="engine file 'model.onnx' for backend "
                                                "'onnxruntime' is missing"):
        Bundle.open(path)
    # Listed with a checksum but not in the file.
    path = _repack(bundle_path, tmp_path / "dropped.onboard", drop=("model.onnx",))
    with pytest.raises(BundleFormatError, match="listed in the manifest but missing"):
        Bundle.open(path)


def test_member_without_checksum_is_refused(bundle_path, tmp_path):
    path = _repack(bundle_path, tmp_path / "smuggled.onboard", lambda m: m["files"].pop(
        "model.onnx"))
    with pytest.raises(BundleFormatError, match="no checksum"):
        Bundle.open(path)


def test_write_refuses_a_bundle_it_could_not_load(tmp_path):
    target = tmp_path / "never.onboard"
    manifest = ukis_bundle.manifest({"onnxruntime": "model.onnx", "openvino": "model.xml"})
    with pytest.raises(BundleFormatError, match="model.xml"):
        write_bundle(target, manifest, {"model.onnx": b"onnx", "model.bin": b"weights"})
    with pytest.raises(BundleFormatError, match="not a plain relative path"):
        write_bundle(target, ukis_bundle.manifest(), {"model.onnx": b"", "../evil": b""})
    with pytest.raises(BundleSchemaError, match="unknown task"):
        write_bundle(target, ukis_bundle.manifest(task="flood"), {"model.onnx": b""})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_write_accepts_member_files_on_disk(tmp_path):
    weights = tmp_path / "model.onnx"
    weights.write_bytes(ukis_bundle.onnx_bytes())
    path = write_bundle(tmp_path / "from-disk.onboard", ukis_bundle.manifest(),
                        {"model.onnx": weights})
    assert Bundle.open(path).read("model.onnx") == weights.read_bytes()


def test_normalise_real_dn(bundle_path, test_data):
    spec = Bundle.open(bundle_path).manifest.input
    folder = test_data / "oscd" / "paris" / "imgs_2"
    dn = np.stack([tifffile.imread(folder / f"paris_{b}.tif") for b in ("B02", "B03", "B04",
                                                                           "B08")])
    x = spec.normalise(dn)
    assert x.dtype == np.float32 and x.shape == dn.shape
    expected = dn[3].astype(np.float64) * spec.scale[3] + spec.offset[3]
    np.testing.assert_allclose(x[3], expected, rtol=1e-5, atol=1e-5)
    assert spec.normalise(dn[None]).shape == (1, *dn.shape)
    with pytest.raises(EngineInputError, match="takes 4 .*blue, green, red, nir"):
        spec.normalise(dn[:3])
    with pytest.raises(EngineInputError, match="must be"):
        spec.normalise(dn[0])


def test_input_spec_defaults(tmp_path, test_data):
    # What the defaults mean: float32 NCHW model input, and they survive a bundle round trip.
    spec = InputSpec(bands=["blue", "green", "red", "nir"], scale=[1e-4] * 4, offset=[0.0] * 4,
                     tile_size=256, gsd_m=10.0)
    dn = tifffile.imread(test_data / "oscd" / "paris" / "imgs_2" / "paris_B04.tif")
    dn = np.stack([dn] * 4)[None]
    x = spec.normalise(dn)
    assert x.dtype == np.float32 and x.shape == dn.shape
    np.testing.assert_allclose(x, dn * 1e-4, rtol=1e-6)
    manifest = ukis_bundle.manifest()
    manifest.inputs = [spec]
    path = write_bundle(tmp_path / "defaults.onboard", manifest,
                        {"model.onnx": ukis_bundle.onnx_bytes()})
    reread = Bundle.open(path).manifest.input
    assert (reread.dtype, reread.layout) == ("float32", "NCHW") and reread == spec


def test_onboard_info_prints_the_manifest(bundle_path, capsys):
    assert main(["info", str(bundle_path)]) == 0
    text = capsys.readouterr().out
    assert "ukis-csmask-4b-l1c 1.0.0-4BL1C: task cloud, fp32, schema 1" in text
    assert "checksums verified" in text and Bundle.open(bundle_path).sha256 in text
    assert "nir       model input = DN ×" in text and "1  cloud" in text
    assert "onnxruntime  model.onnx (39.6 MB)" in text
    assert main(["info", "--json", str(bundle_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == describe(bundle_path)
    assert info["kind"] == "bundle" and info["manifest"]["output"]["classes"]["2"] == \
        "cloud shadow"


def test_onboard_info_reports_a_damaged_bundle(bundle_path, tmp_path, capsys):
    data = bytearray(bundle_path.read_bytes())
    data[-200] ^= 1
    damaged = tmp_path / "damaged.onboard"
    damaged.write_bytes(bytes(data))
    assert main(["info", str(damaged)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_bundle_errors_are_value_errors(bundle_path, tmp_path):
    # A damaged and a badly made bundle, caught as bundle errors and as plain ValueErrors.
    data = bytearray(bundle_path.read_bytes())
    data[-200] ^= 1
    damaged = tmp_path / "damaged.onboard"
    damaged.write_bytes(bytes(data))
    bad = _repack(bundle_path, tmp_path / "bad.onboard", lambda m: m.update(task="flood"))
    for path, error in ((damaged, BundleChecksumError), (bad, BundleSchemaError)):
        for kind in (error, BundleError, ValueError):
            with pytest.raises(kind, match=path.name):
                Bundle.open(path)


# -- schema 2: named inputs and outputs ---------------------------------------------------------

BANDS = ["blue", "green", "red", "nir"]


def _siamese_manifest(**changes: object) -> Manifest:
    """A change detector's manifest: two L1C images in, a class score map and a latent out."""
    def image(name: str) -> InputSpec:
        return InputSpec(bands=BANDS, scale=[1e-4] * 4, offset=[0.0] * 4, tile_size=64,
                         gsd_m=10.0, name=name, radiometric_offset=-1000.0)

    fields: dict[str, object] = dict(
        name="siamese", version="0.1.0", task="change",
        inputs=[image("before"), image("after")],
        outputs=[OutputSpec(kind="labels", channels=1, classes={0: "same", 1: "changed"},
                            name="change"),
                 OutputSpec(kind="vector", channels=16, cell_size=16, name="latent",
                            description="one 16-long vector per 16x16 px cell")],
        precision="fp32", engines={"onnxruntime": "model.onnx"})
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_schema_2_round_trip_keeps_every_named_input_and_output(tmp_path):
    manifest = _siamese_manifest()
    path = write_bundle(tmp_path / "siamese.onboard", manifest, {"model.onnx": b"graph"})
    opened = Bundle.open(path).manifest
    assert opened.schema_version == SCHEMA_VERSION == 2 and opened == manifest
    assert [s.name for s in opened.inputs] == ["before", "after"]
    assert opened.inputs[1].radiometric_offset == -1000.0
    change, latent = opened.outputs
    assert (change.kind, change.classes) == ("labels", {0: "same", 1: "changed"})
    assert (latent.kind, latent.channels, latent.cell_size) == ("vector", 16, 16)
    assert opened.input is opened.inputs[0] and opened.output is opened.outputs[0]
    with zipfile.ZipFile(path) as archive:
        raw = json.loads(archive.read(MANIFEST))
    assert "inputs" in raw and "input" not in raw and raw["outputs"][0]["classes"] == {
        "0": "same", "1": "changed"}


def test_single_model_with_schema_2_content_is_written_as_schema_2(tmp_path):
    # One input, but a radiometric offset: schema 1 cannot say it, so schema 2 is written.
    manifest = ukis_bundle.manifest()
    manifest.input.radiometric_offset = -1000.0
    assert manifest.required_schema_version() == 2
    assert json.loads(manifest.to_json())["schema_version"] == 2
    manifest.input.radiometric_offset = 0.0
    assert json.loads(manifest.to_json())["schema_version"] == 1
    manifest.schema_version = 2  # asked for: written as 2 even though 1 would do
    text = manifest.to_json()
    assert json.loads(text)["inputs"][0]["name"] == "input"
    assert Manifest.from_json(text) == manifest


@pytest.mark.parametrize("bundle", sorted(Path(__file__).parents[1].glob(
    "models/cloud/*.onboard")), ids=lambda p: p.name)
def test_shipped_schema_1_bundles_read_onto_one_element_lists(bundle):
    manifest = Bundle.open(bundle).manifest
    assert manifest.schema_version == 1
    assert len(manifest.inputs) == 1 and len(manifest.outputs) == 1
    assert manifest.input.name == "input" and manifest.output.name == "output"
    assert manifest.input.radiometric_offset == 0.0 and manifest.output.cell_size == 0
    assert json.loads(manifest.to_json())["input"]["bands"] == manifest.input.bands


def test_manifest_takes_input_and_output_for_one_of_each():
    single = ukis_bundle.manifest()
    assert Manifest(name="m", version="1", task="cloud", input=single.input,
                    output=single.output, precision="fp32",
                    engines={"onnxruntime": "model.onnx"}).inputs == [single.input]
    with pytest.raises(TypeError, match="inputs=|input="):
        Manifest(name="m", version="1", task="cloud", outputs=[single.output],
                 precision="fp32", engines={"onnxruntime": "model.onnx"})


def _schema_2_dict() -> dict:
    return json.loads(_siamese_manifest().to_json())


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["inputs"][1].update(name="before"), "inputs[1].name 'before' is used twice"),
    (lambda m: m.update(inputs=[]), "'inputs' must be a non-empty list"),
    (lambda m: m["inputs"][0].update(radiometric_offset="-1000"),
     "inputs[0].radiometric_offset must be a finite number"),
    (lambda m: m["inputs"][1].update(scale=[1.0]), "inputs[1].scale must be 4 finite numbers"),
    (lambda m: m["outputs"][0].update(channels=2), "outputs[0].channels must be 1 for kind "
                                                   "'labels'"),
    (lambda m: m["outputs"][0].update(classes={"300": "x"}), "outputs[0].classes['300'] is out "
                                                             "of range"),
    (lambda m: m["outputs"][1].update(classes={"0": "x"}), "outputs[1].classes must be empty"),
    (lambda m: m["outputs"][1].update(cell_size=24), "cell_size 24 does not divide"),
    (lambda m: m["outputs"][1].update(scale_factor=2), "outputs[1].scale_factor must be 1"),
    (lambda m: m["outputs"][0].update(cell_size=4), "cell_size is for kind 'vector' only"),
    (lambda m: m["outputs"][0].update(kind="boxes"), "outputs[0].kind must be one of"),
    (lambda m: m["outputs"][1].update(name=""), "outputs[1].name must be a non-empty string"),
    (lambda m: m.update(input=m["inputs"][0]), "schema 2 lists 'inputs' and 'outputs'"),
    (lambda m: m.update(schema_version=1), "schema 1 has 'input' and 'output'"),
])
def test_invalid_schema_2_manifest_is_refused(edit, problem, tmp_path):
    data = _schema_2_dict()
    edit(data)
    where = tmp_path / "bad.onboard"
    with pytest.raises(BundleSchemaError) as caught:
        Manifest.from_json(json.dumps(data), where)
    assert problem in str(caught.value) and str(where) in str(caught.value)


def test_schema_1_knows_only_its_own_output_kinds(bundle_path, tmp_path):
    path = _repack(bundle_path, tmp_path / "v1-vector.onboard",
                   lambda m: m["output"].update(kind="vector"))
    with pytest.raises(BundleSchemaError, match=r"output.kind must be one of \('classes', "
                                                r"'values'\)"):
        Bundle.open(path)
    path = _repack(bundle_path, tmp_path / "v1-named.onboard",
                   lambda m: m["input"].update(name="image"))
    with pytest.raises(BundleSchemaError, match=r"unknown input field\(s\) \['name'\]"):
        Bundle.open(path)
