"""The bundle manifest: what a model takes, what it gives, and which engine files run it.

Schema 2 (current) describes a model by lists of named tensors, so that models with more than
one input (a siamese change detector takes the image before and the image after) or with a
latent vector output (an encoder) are described as exactly as a single-image segmenter::

    {"schema_version": 2, "name": ..., "version": ..., "task": "change",
     "inputs": [{"name": "before", "bands": [...], "scale": [...], "offset": [...],
                 "tile_size": 128, "gsd_m": 10.0, "dtype": "float32", "layout": "NCHW",
                 "radiometric_offset": 0.0},
                {"name": "after", ...}],
     "outputs": [{"name": "change", "kind": "classes", "channels": 2,
                  "classes": {"0": "unchanged", "1": "changed"}, "scale_factor": 1,
                  "cell_size": 0, "description": "logits"}],
     "precision": "fp32", "engines": {...}, "metrics": {...}, "toolchain": {...},
     "files": {...}, "created": "...", "extra": {...}}

Names are the model graph's tensor names: engines feed and fetch by them
(:meth:`Engine.run_named`). A model with one input and one output may use other names in its
graph; the engine then binds the manifest's single input and output by position.

Input fields: ``bands`` (STAC common names), ``scale``/``offset`` per band (model input =
``DN * scale + offset``), ``tile_size`` and ``gsd_m`` as trained, ``dtype``, ``layout``, and
``radiometric_offset``: the DN offset of the data the model was trained on, as the product
metadata states it (Sentinel-2 L1C since processing baseline 04.00 has ``RADIO_ADD_OFFSET``
-1000; data from before, such as OSCD, 0). The pipeline refuses a source whose stated offset
differs, because a 1000 DN shift moves dark surfaces by 0.1 reflectance without any error.

Output kinds, for an input batch ``(N, C, H, W)`` (the first input's, where there are several)
and ``s`` = ``scale_factor``:

- ``classes``: per-class scores ``(N, channels, H*s, W*s)``; the caller takes the argmax
  (one channel: a sigmoid score for classes 0 and 1). ``classes`` names them.
- ``labels``: the class index per pixel, computed inside the graph (argmax in the graph),
  ``(N, 1, H*s, W*s)`` integers; ``channels`` is 1 and ``classes`` names the values
  (0..255, the class map products hold).
- ``values``: physical values ``(N, channels, H*s, W*s)`` (e.g. reflectance for
  super-resolution).
- ``vector``: a latent vector of length ``channels`` per tile, ``(N, channels)`` when
  ``cell_size`` is 0, or per ``cell_size`` x ``cell_size`` cell of input pixels,
  ``(N, channels, H / cell_size, W / cell_size)``; ``scale_factor`` is 1 and ``classes`` empty.

Schema 1 (every bundle shipped before multi-input models) has one ``input`` object and one
``output`` object with the same fields less ``name``, ``radiometric_offset`` and ``cell_size``,
and output kinds ``classes`` and ``values`` only. It is read onto one-element lists named
``input`` and ``output`` with radiometric offset 0. :meth:`Manifest.to_json` writes the lowest
schema version that holds the manifest (and at least ``schema_version``), so a bundle that needs
nothing new still loads on boards whose runtime predates schema 2.

``manifest.input`` and ``manifest.output`` are the first input and output, for code that runs
single-input, single-output models.

Every problem is a :class:`BundleSchemaError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.errors import BundleSchemaError, EngineInputError, UsageError

SCHEMA_VERSION = 2  # the newest this runtime reads
TASKS = ("cloud", "change", "superres", "segmentation")
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
OUTPUT_KINDS = ("classes", "labels", "values", "vector")
SCHEMA_1_OUTPUT_KINDS = ("classes", "values")
INPUT_DTYPES = ("float32", "float16")
LAYOUTS = ("NCHW",)
MAX_LABEL = 255  # class maps are uint8
# The sizes a manifest may declare. They are what the runtime allocates from (a batch of
# tiles, the stitched output), so a manifest re-written with tile_size 100 000 must be refused
# here, not by the kernel's out-of-memory killer; tile_size 1 is no model's.
TILE_SIZE_RANGE = (8, 4096)  # pixels per tile edge
MAX_BANDS = 1024  # per input
MAX_CHANNELS = 4096  # per output (latent vectors included)
MAX_SCALE_FACTOR = 8  # output grid / input grid (×8 super-resolution)
# Schema 1 manifests do not name their tensors; these are the names they are read with.
DEFAULT_INPUT_NAME = "input"
DEFAULT_OUTPUT_NAME = "output"

MANIFEST = "manifest.json"

_Fail = Callable[[str], BundleSchemaError]


@dataclass
class InputSpec:
    """What one model input takes: bands by STAC common name, and DN -> model input per band."""

    bands: list[str]
    scale: list[float]
    offset: list[float]
    tile_size: int  # the tile edge the model was trained at, in pixels
    gsd_m: float  # the ground sampling distance it was trained at
    dtype: str = "float32"  # the model input's dtype
    layout: str = "NCHW"
    name: str = DEFAULT_INPUT_NAME  # the graph's input tensor name
    # The DN offset of the training data (Sentinel-2 L1C baseline >= 04.00: -1000).
    radiometric_offset: float = 0.0

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Raw DN ``(C,H,W)`` or ``(N,C,H,W)`` -> float32 model input, ``DN * scale + offset``."""
        array = np.asarray(pixels)
        if array.ndim not in (3, 4):
            raise EngineInputError(
                f"pixels must be (C,H,W) or (N,C,H,W), got shape {array.shape}")
        if array.shape[-3] != len(self.bands):
            raise EngineInputError(
                f"pixels have {array.shape[-3]} bands on axis -3, the model takes "
                f"{len(self.bands)} ({', '.join(self.bands)})")
        scale = np.asarray(self.scale, np.float32).reshape(-1, 1, 1)
        offset = np.asarray(self.offset, np.float32).reshape(-1, 1, 1)
        return (array.astype(np.float32, copy=False) * scale + offset).astype(np.float32,
                                                                             copy=False)


@dataclass
class OutputSpec:
    """What one model output gives: see the module docstring for the shape of each kind."""

    kind: str  # "classes" | "labels" | "values" | "vector"
    channels: int
    classes: dict[int, str] = field(default_factory=dict)
    scale_factor: int = 1  # output grid / input grid, e.g. 2 for x2 super-resolution
    description: str = ""
    name: str = DEFAULT_OUTPUT_NAME  # the graph's output tensor name
    cell_size: int = 0  # vector only: input pixels per latent cell edge; 0: one per tile


@dataclass(init=False)
class Manifest:
    """Everything the runtime and the operators need to know about a bundle.

    Build it with ``inputs=[...]`` and ``outputs=[...]``, or, for a single-input,
    single-output model, with ``input=`` and ``output=``.
    """

    name: str
    version: str
    task: str
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    precision: str  # "fp32" | "fp16" | "int8"
    engines: dict[str, str]  # backend -> member; openvino: the .xml, its .bin beside it
    metrics: dict[str, float]
    toolchain: dict[str, str]
    files: dict[str, str]  # member -> sha256, by write_bundle
    # The lowest schema version to write (raised to what the content needs); once read or
    # written, the version of the file.
    schema_version: int
    created: str
    extra: dict[str, Any]

    def __init__(self, *, name: str, version: str, task: str,
                 inputs: list[InputSpec] | None = None, outputs: list[OutputSpec] | None = None,
                 precision: str, engines: dict[str, str],
                 metrics: dict[str, float] | None = None, toolchain: dict[str, str] | None = None,
                 files: dict[str, str] | None = None, schema_version: int = 1,
                 created: str = "", extra: dict[str, Any] | None = None,
                 input: InputSpec | None = None,  # the schema 1 field names, for one of each
                 output: OutputSpec | None = None) -> None:
        self.name, self.version, self.task = name, version, task
        self.inputs = _one_or_many(inputs, input, "input")
        self.outputs = _one_or_many(outputs, output, "output")
        self.precision = precision
        self.engines = dict(engines)
        self.metrics = dict(metrics or {})
        self.toolchain = dict(toolchain or {})
        self.files = dict(files or {})
        self.schema_version = schema_version
        self.created = created
        self.extra = dict(extra or {})

    @property
    def input(self) -> InputSpec:
        """The first input: the only one of a single-input model."""
        return self.inputs[0]

    @input.setter
    def input(self, spec: InputSpec) -> None:
        self.inputs[0] = spec

    @property
    def output(self) -> OutputSpec:
        """The first output: the only one of a single-output model."""
        return self.outputs[0]

    @output.setter
    def output(self, spec: OutputSpec) -> None:
        self.outputs[0] = spec

    def required_schema_version(self) -> int:
        """The lowest schema version that can hold this manifest."""
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            return 2
        spec, out = self.inputs[0], self.outputs[0]
        if (spec.name != DEFAULT_INPUT_NAME or spec.radiometric_offset != 0
                or out.name != DEFAULT_OUTPUT_NAME or out.kind not in SCHEMA_1_OUTPUT_KINDS
                or out.cell_size != 0):
            return 2
        return 1

    def to_json(self) -> str:
        version = max(self.required_schema_version(), self.schema_version)
        data = asdict(self)
        for out in data["outputs"]:
            out["classes"] = {str(k): v for k, v in out["classes"].items()}
        inputs, outputs = data.pop("inputs"), data.pop("outputs")
        if version == 1:
            for spec in inputs:
                del spec["name"], spec["radiometric_offset"]
            for out in outputs:
                del out["name"], out["cell_size"]
            described = {"input": inputs[0], "output": outputs[0]}
        else:
            described = {"inputs": inputs, "outputs": outputs}
        data.pop("schema_version")
        head = {key: data.pop(key) for key in ("name", "version", "task")}
        ordered = {"schema_version": version, **head, **described, **data}
        return json.dumps(ordered, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, path: str | Path | None = None) -> Manifest:
        """Parse and validate a manifest; raises :class:`BundleSchemaError` naming the problem."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BundleSchemaError(path, f"{MANIFEST} is not valid JSON: {error}") from error
        return manifest_from_dict(data, path)


def _one_or_many(many: list[Any] | None, one: Any | None, singular: str) -> list[Any]:
    if one is None:
        if many is None:
            raise UsageError(f"Manifest needs {singular}s=[...] or {singular}=...")
        return list(many)
    # dataclasses.replace(manifest, input=spec) passes the old one-element list as well.
    if many is not None and len(many) > 1:
        raise UsageError(f"Manifest got both {singular}= and {singular}s= with "
                        f"{len(many)} {singular}s; give one of them")
    return [one]


# -- validation --------------------------------------------------------------------------------

_COMMON_FIELDS = {"schema_version", "name", "version", "task", "precision", "engines",
                  "metrics", "toolchain", "files", "created", "extra"}
_TOP_FIELDS = {1: _COMMON_FIELDS | {"input", "output"}, 2: _COMMON_FIELDS | {"inputs", "outputs"}}
_INPUT_FIELDS_1 = {"bands", "scale", "offset", "tile_size", "gsd_m", "dtype", "layout"}
_OUTPUT_FIELDS_1 = {"kind", "channels", "classes", "scale_factor", "description"}
_INPUT_FIELDS = {1: _INPUT_FIELDS_1, 2: _INPUT_FIELDS_1 | {"name", "radiometric_offset"}}
_OUTPUT_FIELDS = {1: _OUTPUT_FIELDS_1, 2: _OUTPUT_FIELDS_1 | {"name", "cell_size"}}


def manifest_from_dict(data: Any, path: str | Path | None) -> Manifest:
    """Validate a parsed manifest of any schema version this runtime reads."""
    def fail(problem: str) -> BundleSchemaError:
        return BundleSchemaError(path, f"{MANIFEST}: {problem}")

    if not isinstance(data, dict):
        raise fail("must be a JSON object")
    version = data.get("schema_version")
    # Checked first: a newer manifest may have fields this runtime cannot know.
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail(f"schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise fail(f"schema version {version} is newer than this runtime understands "
                   f"({SCHEMA_VERSION}); update onboard on board before uplinking this bundle")
    unknown = set(data) - _TOP_FIELDS[version]
    if unknown:
        hint = {1: "; schema 1 has 'input' and 'output'",
                2: "; schema 2 lists 'inputs' and 'outputs'"}[version] \
            if unknown & {"input", "output", "inputs", "outputs"} else ""
        raise fail(f"unknown field(s) {sorted(unknown)} for schema version {version}{hint}")
    for key in ("name", "version", "task", "precision"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise fail(f"{key!r} must be a non-empty string")
    if data["task"] not in TASKS:
        raise fail(f"unknown task {data['task']!r}; this runtime runs {', '.join(TASKS)}")
    if data["precision"] not in PRECISIONS:
        raise fail(f"precision must be one of {PRECISIONS}, got {data['precision']!r}")

    engines = _str_dict(data.get("engines"), "engines", fail)
    if not engines:
        raise fail("'engines' names no engine file")
    for backend in engines:
        if backend not in BACKENDS:
            raise fail(f"unknown backend {backend!r} in 'engines'; known: {', '.join(BACKENDS)}")
    if "openvino" in engines and not engines["openvino"].endswith(".xml"):
        raise fail(f"the openvino engine must be an IR .xml file, got {engines['openvino']!r}")
    files = _str_dict(data.get("files", {}), "files", fail)
    for member, digest in files.items():
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise fail(f"files[{member!r}] is not a lowercase hex SHA-256")
    toolchain = _str_dict(data.get("toolchain", {}), "toolchain", fail)
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise fail("'metrics' must map names to numbers")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise fail("'extra' must be an object")
    created = data.get("created", "")
    if not isinstance(created, str):
        raise fail("'created' must be a string")

    if version == 1:
        inputs = [_input_from_dict(data.get("input"), "input", 1, fail)]
        outputs = [_output_from_dict(data.get("output"), "output", 1, fail)]
    else:
        inputs = [_input_from_dict(item, f"inputs[{i}]", 2, fail)
                  for i, item in enumerate(_list(data.get("inputs"), "inputs", fail))]
        outputs = [_output_from_dict(item, f"outputs[{i}]", 2, fail)
                   for i, item in enumerate(_list(data.get("outputs"), "outputs", fail))]
        _check_unique([s.name for s in inputs], "inputs", fail)
        _check_unique([s.name for s in outputs], "outputs", fail)
    for i, out in enumerate(outputs):
        if out.cell_size and inputs[0].tile_size % out.cell_size:
            raise fail(f"outputs[{i}].cell_size {out.cell_size} does not divide the first "
                       f"input's tile_size {inputs[0].tile_size}")

    return Manifest(
        name=data["name"], version=data["version"], task=data["task"],
        inputs=inputs, outputs=outputs, precision=data["precision"], engines=engines,
        metrics={str(k): float(v) for k, v in metrics.items()}, toolchain=toolchain,
        files=files, schema_version=version, created=created, extra=extra)


def _list(value: Any, key: str, fail: _Fail) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise fail(f"{key!r} must be a non-empty list")
    return value


def _check_unique(names: list[str], key: str, fail: _Fail) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise fail(f"{key}[{i}].name {name!r} is used twice; names must be unique")
        seen.add(name)


def _check_object(data: Any, where: str, fields: set[str], fail: _Fail) -> None:
    """``data`` is a JSON object with no field outside ``fields``."""
    if not isinstance(data, dict):
        raise fail(f"'{where}' must be an object")
    unknown = set(data) - fields
    if unknown:
        raise fail(f"unknown {where} field(s) {sorted(unknown)}")


def _name(data: dict[str, Any], where: str, default: str, fail: _Fail) -> str:
    name = data.get("name", default)
    if not isinstance(name, str) or not name or name != name.strip():
        raise fail(f"{where}.name must be a non-empty string without surrounding spaces, "
                   f"got {name!r}")
    return name


def _positive_int(data: dict[str, Any], key: str, where: str, default: int | None,
                  fail: _Fail, minimum: int = 1, maximum: int | None = None) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum \
            or (maximum is not None and value > maximum):
        kind = f"an integer in [{minimum}, {maximum}]" if maximum is not None else \
            "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise fail(f"{where}.{key} must be {kind}, got {value!r}")
    return value


def _input_from_dict(data: Any, where: str, version: int, fail: _Fail) -> InputSpec:
    _check_object(data, where, _INPUT_FIELDS[version], fail)
    bands = data.get("bands")
    if not isinstance(bands, list) or not bands or not all(
            isinstance(b, str) and b for b in bands):
        raise fail(f"{where}.bands must be a non-empty list of band names")
    if len(bands) > MAX_BANDS:
        raise fail(f"{where}.bands lists {len(bands)} bands; at most {MAX_BANDS}")
    for key in ("scale", "offset"):
        values = data.get(key)
        if not isinstance(values, list) or len(values) != len(bands) or not all(
                _finite_number(v) for v in values):
            raise fail(f"{where}.{key} must be {len(bands)} finite numbers, one per band")
    if any(v == 0 for v in data["scale"]):
        raise fail(f"{where}.scale must not be 0 (the band would be ignored)")
    tile = _positive_int(data, "tile_size", where, None, fail, *TILE_SIZE_RANGE)
    gsd = data.get("gsd_m")
    if not _finite_number(gsd) or gsd <= 0:
        raise fail(f"{where}.gsd_m must be a positive number, got {gsd!r}")
    dtype = data.get("dtype", "float32")
    if dtype not in INPUT_DTYPES:
        raise fail(f"{where}.dtype must be one of {INPUT_DTYPES}, got {dtype!r}")
    layout = data.get("layout", "NCHW")
    if layout not in LAYOUTS:
        raise fail(f"{where}.layout must be one of {LAYOUTS}, got {layout!r}")
    radiometric = data.get("radiometric_offset", 0.0)
    if not _finite_number(radiometric):
        raise fail(f"{where}.radiometric_offset must be a finite number (DN), "
                   f"got {radiometric!r}")
    return InputSpec(bands=list(bands), scale=[float(v) for v in data["scale"]],
                     offset=[float(v) for v in data["offset"]], tile_size=tile,
                     gsd_m=float(gsd), dtype=dtype, layout=layout,
                     name=_name(data, where, DEFAULT_INPUT_NAME, fail),
                     radiometric_offset=float(radiometric))


def _output_from_dict(data: Any, where: str, version: int, fail: _Fail) -> OutputSpec:
    _check_object(data, where, _OUTPUT_FIELDS[version], fail)
    kinds = SCHEMA_1_OUTPUT_KINDS if version == 1 else OUTPUT_KINDS
    kind = data.get("kind")
    if kind not in kinds:
        raise fail(f"{where}.kind must be one of {kinds}, got {kind!r}")
    channels = _positive_int(data, "channels", where, None, fail, maximum=MAX_CHANNELS)
    if kind == "labels" and channels != 1:
        raise fail(f"{where}.channels must be 1 for kind 'labels' (one class index per "
                   f"pixel), got {channels}")
    raw = data.get("classes", {})
    if not isinstance(raw, dict):
        raise fail(f"{where}.classes must map class values to names")
    # One score channel is a sigmoid for two classes; labels are class map values.
    limit = MAX_LABEL + 1 if kind == "labels" else max(channels, 2)
    classes: dict[int, str] = {}
    for key, value in raw.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise fail(f"{where}.classes key {key!r} is not an integer") from None
        if not 0 <= index < limit or not isinstance(value, str):
            raise fail(f"{where}.classes[{key!r}] is out of range for "
                       + (f"a class map (0..{MAX_LABEL})" if kind == "labels"
                          else f"{channels} channel(s)"))
        classes[index] = value
    if kind in ("classes", "labels") and not classes:
        raise fail(f"{where}.classes must name the classes when {where}.kind is {kind!r}")
    if kind == "vector" and classes:
        raise fail(f"{where}.classes must be empty for kind 'vector'")
    factor = _positive_int(data, "scale_factor", where, 1, fail, maximum=MAX_SCALE_FACTOR)
    cell = _positive_int(data, "cell_size", where, 0, fail, minimum=0)
    if kind == "vector" and factor != 1:
        raise fail(f"{where}.scale_factor must be 1 for kind 'vector' (cell_size sets its grid)")
    if kind != "vector" and cell:
        raise fail(f"{where}.cell_size is for kind 'vector' only, got {cell} for {kind!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail(f"{where}.description must be a string")
    return OutputSpec(kind=kind, channels=channels, classes=classes, scale_factor=factor,
                      description=description,
                      name=_name(data, where, DEFAULT_OUTPUT_NAME, fail), cell_size=cell)


def _str_dict(value: Any, key: str, fail: _Fail) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise fail(f"{key!r} must map strings to strings")
    return dict(value)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)
