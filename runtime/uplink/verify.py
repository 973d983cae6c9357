"""Verification before anything switches: checksums, signature, runtime version, engines,
self-test; and a config checked against the bundles it names, as ``onboard run`` would.

The self-test travels in the bundle. Its manifest's ``extra["selftest"]`` (schema 2 keeps
``extra`` free-form, so no schema change) names members holding reference tiles::

    "selftest": {"tiles": ["selftest/0.npz", ...], "rtol": 0.001, "atol": 0.001,
                 "min_within": 1.0, "min_agreement": 0.999,
                 "made_with": {"backend": "onnxruntime", "onboard": "0.1.0", ...}}

Each ``.npz`` (read with ``allow_pickle=False``) holds ``input.<name>``: raw DN ``(C, H, W)`` per
manifest input (normalised on board with the manifest's own scale and offset, so that path is
tested too), and ``expected.<name>``: the model output per manifest output, made on the ground by
:func:`add_selftest`. On board, every output value must lie within ``atol + rtol * |expected|``
for at least ``min_within`` of the values, be finite, and for ``classes``/``labels`` outputs the
class per pixel must agree on at least ``min_agreement`` of the pixels. Members are covered by the
manifest's checksums and so by the signature: tampered expected outputs either fail the signature
or, re-signed, fail the comparison.

Runtime version: a bundle records the onboard that built it (``toolchain["onboard"]``). It loads
on a runtime of the same series (the same major version; in 0.x, the same minor) that is at least
as new: a bundle built by a newer runtime may use what this one does not have.
"""

from __future__ import annotations

import importlib.util
import io
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.bundle import Bundle, Manifest, write_bundle
from onboard.runtime.errors import BundleError, BundleSchemaError, ConfigError, OnboardError

SELFTEST = "selftest"
_BACKEND_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino",
                    "tensorrt": "tensorrt"}


def runtime_version() -> str:
    try:
        return version("onboard")
    except PackageNotFoundError:
        return "0.0.0"


def _release(text: str) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return None if match is None else tuple(int(g or 0) for g in match.groups())


def check_runtime_version(manifest: Manifest, path: Path, runtime: str | None = None) -> str:
    """The bundle's builder version if this runtime may run it; :class:`BundleSchemaError`
    naming both versions if not."""
    runtime = runtime or runtime_version()
    built = manifest.toolchain.get("onboard")
    if not built:
        raise BundleSchemaError(path, "the manifest does not say which onboard version built it "
                                      "(toolchain.onboard); refusing to guess")
    have, need = _release(runtime), _release(built)
    if need is None or have is None:
        raise BundleSchemaError(path, f"cannot read the version {built!r} (bundle) or "
                                      f"{runtime!r} (runtime)")
    series = (lambda v: v[:2]) if have[0] == 0 else (lambda v: v[:1])
    accepted = ".".join(map(str, series(have))) + ".x"
    if series(need) != series(have) or need > have:
        raise BundleSchemaError(
            path, f"built for onboard {built}; this board runs onboard {runtime}, which runs "
                  f"bundles built by {accepted} up to {runtime}: rebuild it with the board's "
                  "version or update the board's runtime first")
    return built


def available_backends() -> list[str]:
    """The inference backends whose runtime is installed on this board."""
    return [b for b, module in _BACKEND_MODULES.items()
            if importlib.util.find_spec(module) is not None]


def check_engines(manifest: Manifest, path: Path, backend: str | None = None) -> str:
    """The backend the bundle will run on here; :class:`BundleError` if it has none."""
    here = available_backends()
    if backend is not None:
        if backend not in manifest.engines:
            raise BundleError(path, f"the config runs it on {backend!r} but the bundle has "
                                    f"engine files for {sorted(manifest.engines)} only")
        if backend not in here:
            raise BundleError(path, f"it needs the {backend!r} backend, which is not installed "
                                    f"on this board (installed: {here or 'none'})")
        return backend
    usable = [b for b in manifest.engines if b in here]
    if not usable:
        raise BundleError(path, f"it has engine files for {sorted(manifest.engines)}; this board "
                                f"has {here or 'no backend'}")
    return usable[0]


# -- the self-test -------------------------------------------------------------------------------

@dataclass
class SelfTestResult:
    tiles: int
    backend: str
    worst: dict[str, float] = field(default_factory=dict)  # output -> worst measure seen

    def to_dict(self) -> dict[str, Any]:
        return {"tiles": self.tiles, "backend": self.backend,
                "worst": {k: round(v, 6) for k, v in self.worst.items()}}


def _selftest_spec(bundle: Bundle) -> dict[str, Any]:
    spec = bundle.manifest.extra.get(SELFTEST)
    path = bundle.path

    def fail(problem: str) -> BundleSchemaError:
        return BundleSchemaError(path, f"manifest extra.{SELFTEST}: {problem}")

    if spec is None:
        raise BundleError(path, "the bundle carries no self-test (manifest extra.selftest with "
                                "reference tiles); an uplinked bundle must prove itself on the "
                                "board's engine before it runs: add one with add_selftest")
    if not isinstance(spec, dict):
        raise fail("must be an object")
    tiles = spec.get("tiles")
    if not isinstance(tiles, list) or not tiles or not all(isinstance(t, str) for t in tiles):
        raise fail("'tiles' must be a non-empty list of member names")
    for member in tiles:
        if member not in bundle.manifest.files:
            raise fail(f"tile {member!r} is not a member of the bundle")
    for key, default, low, high in (("rtol", 1e-3, 0.0, math.inf), ("atol", 1e-3, 0.0, math.inf),
                                    ("min_within", 1.0, 0.0, 1.0),
                                    ("min_agreement", 1.0, 0.0, 1.0)):
        value = spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not low <= value <= high:
            raise fail(f"{key!r} must be a number in [{low:g}, {high:g}], got {value!r}")
    return spec


def run_selftest(bundle: Bundle, backend: str = "onnxruntime", device: str = "cpu",
                 trust: Any = None) -> SelfTestResult:
    """Run the bundle's reference tiles on this board's engine; :class:`BundleError` naming the
    tile, the output and by how much when an output is not reproduced within tolerance."""
    from onboard.runtime.engines import open_engine

    spec = _selftest_spec(bundle)
    manifest = bundle.manifest
    rtol, atol = float(spec.get("rtol", 1e-3)), float(spec.get("atol", 1e-3))
    min_within = float(spec.get("min_within", 1.0))
    min_agreement = float(spec.get("min_agreement", 1.0))
    result = SelfTestResult(len(spec["tiles"]), backend)
    options: dict[str, Any] = {"threads": 1, "batch_size": 1, "warmup": 0}
    if trust is not None:
        options["trust"] = trust
    try:
        engine = open_engine(bundle, backend, device, **options)
    except OnboardError as error:
        raise BundleError(bundle.path, f"self-test: the engine does not load on {backend}/"
                                       f"{device}: {error}") from error
    with engine:
        for member in spec["tiles"]:
            where = f"self-test tile {member}"
            try:
                with np.load(io.BytesIO(bundle.read(member)), allow_pickle=False) as data:
                    arrays = {key: data[key] for key in data.files}
            except (ValueError, OSError) as error:
                raise BundleError(bundle.path, f"{where}: not a readable .npz: {error}") from error
            feeds = {}
            for input_spec in manifest.inputs:
                dn = arrays.get(f"input.{input_spec.name}")
                if dn is None or dn.ndim != 3:
                    raise BundleError(bundle.path, f"{where}: needs input.{input_spec.name} as "
                                                   "raw DN (C, H, W)")
                feeds[input_spec.name] = input_spec.normalise(dn[None])
            try:
                got = engine.run_named(feeds)
            except OnboardError as error:
                raise BundleError(bundle.path, f"{where}: the engine failed: {error}") from error
            for out in manifest.outputs:
                expected = arrays.get(f"expected.{out.name}")
                if expected is None:
                    raise BundleError(bundle.path, f"{where}: no expected.{out.name}")
                _compare(bundle.path, where, out.name, out.kind, got[out.name][0], expected,
                         rtol, atol, min_within, min_agreement, result)
    return result


def _compare(path: Path, where: str, name: str, kind: str, got: np.ndarray,
             expected: np.ndarray, rtol: float, atol: float, min_within: float,
             min_agreement: float, result: SelfTestResult) -> None:
    if got.shape != expected.shape:
        raise BundleError(path, f"{where}: output {name!r} has shape {got.shape}, the reference "
                                f"{expected.shape}")
    got64, want = got.astype(np.float64), expected.astype(np.float64)
    if not np.isfinite(got64).all():
        raise BundleError(path, f"{where}: output {name!r} is not finite on this board's engine")
    if not np.isfinite(want).all():
        raise BundleError(path, f"{where}: the reference output {name!r} is not finite")
    diff = np.abs(got64 - want)
    within = float(np.mean(diff <= atol + rtol * np.abs(want)))
    result.worst[f"{name}.within"] = min(result.worst.get(f"{name}.within", 1.0), within)
    result.worst[f"{name}.max_abs_diff"] = max(result.worst.get(f"{name}.max_abs_diff", 0.0),
                                               float(diff.max()))
    if within < min_within:
        raise BundleError(
            path, f"{where}: output {name!r} is not reproduced on this board's engine: "
                  f"{within:.2%} of the values lie within atol {atol:g} + rtol {rtol:g} × "
                  f"|expected| (needs {min_within:.2%}; max |difference| {diff.max():.4g})")
    if kind in ("classes", "labels") and got.ndim == 3:
        if kind == "labels":
            agreement = float(np.mean(got64[0] == want[0]))
        elif got.shape[0] == 1:
            agreement = float(np.mean((got64[0] > 0) == (want[0] > 0)))
        else:
            agreement = float(np.mean(got64.argmax(0) == want.argmax(0)))
        result.worst[f"{name}.agreement"] = min(result.worst.get(f"{name}.agreement", 1.0),
                                                agreement)
        if agreement < min_agreement:
            raise BundleError(
                path, f"{where}: output {name!r}: the class of {agreement:.2%} of the pixels "
                      f"agrees with the reference (needs {min_agreement:.2%})")


def add_selftest(bundle_path: str | Path, tiles: Sequence[dict[str, np.ndarray] | np.ndarray],
                 out: str | Path, *, rtol: float = 1e-3, atol: float = 1e-3,
                 min_within: float = 1.0, min_agreement: float = 1.0,
                 backend: str = "onnxruntime", signer: Any = None) -> Path:
    """Ground side: ``bundle_path`` with reference ``tiles`` (raw DN ``(C, H, W)``, or a dict
    of them by input name) and the outputs this runtime's ``backend`` gives for them, as a new
    bundle at ``out``. ``signer``: a :class:`~onboard.runtime.bundle.signature.SigningKey`'s
    ``sign_manifest``, to sign it in the same write."""
    source = Bundle.open(bundle_path)
    manifest = source.manifest
    members: dict[str, bytes | Path] = {
        name: source.read(name) for name in source.members
        if not name.startswith(f"{SELFTEST}/")}
    from onboard.runtime.engines import open_engine

    names = []
    with open_engine(source, backend, "cpu", threads=1, batch_size=1, warmup=0) as engine:
        for i, tile in enumerate(tiles):
            by_input = tile if isinstance(tile, dict) else {manifest.inputs[0].name: tile}
            feeds = {spec.name: spec.normalise(np.asarray(by_input[spec.name])[None])
                     for spec in manifest.inputs}
            outputs = engine.run_named(feeds)
            arrays = {f"input.{k}": np.asarray(v) for k, v in by_input.items()}
            for name, value in outputs.items():
                if not np.isfinite(value).all():
                    raise BundleError(source.path, f"reference tile {i}: output {name!r} is not "
                                                   "finite; choose another tile")
                arrays[f"expected.{name}"] = value[0]
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)  # type: ignore[arg-type]
            member = f"{SELFTEST}/{i}.npz"
            members[member] = buffer.getvalue()
            names.append(member)
    manifest.schema_version = max(manifest.schema_version, 2)
    manifest.extra[SELFTEST] = {
        "tiles": names, "rtol": rtol, "atol": atol, "min_within": min_within,
        "min_agreement": min_agreement,
        "made_with": {"backend": backend, "onboard": runtime_version(),
                      backend: _module_version(backend)}}
    options = {} if signer is None else {"signer": signer}
    return write_bundle(out, manifest, members, **options)


def _module_version(module: str) -> str:
    try:
        return version(module)
    except PackageNotFoundError:
        return "unknown"


# -- a bundle ------------------------------------------------------------------------------------

@dataclass
class BundleCheck:
    """What verification found for one bundle (every step passed when it exists)."""

    path: Path
    name: str
    version: str
    task: str
    sha256: str
    signature: dict[str, Any]
    built_by: str
    backend: str
    selftest: dict[str, Any] | None

    @property
    def bundle_id(self) -> str:
        """As STAC Items name it (``onboard:bundles``)."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "bundle": self.bundle_id, "task": self.task,
                "sha256": self.sha256, **self.signature, "built_by": self.built_by,
                "backend": self.backend, "selftest": self.selftest}


def verify_bundle(path: str | Path, trust: Any, *, backend: str | None = None,
                  device: str = "cpu", selftest: bool = True) -> BundleCheck:
    """Every check, in order, the first failure raised as a :class:`BundleError` naming the
    bundle and the reason: checksums (container), signature (``trust``: a
    :class:`~onboard.runtime.bundle.signature.TrustPolicy`), runtime version, engines on this
    board, self-test."""
    from onboard.runtime.bundle.signature import verify_bundle as verify_signature

    bundle = Bundle.open(path)  # checksums of every member, the trailer, the schema
    verdict = verify_signature(bundle, trust)
    manifest = bundle.manifest
    built = check_runtime_version(manifest, bundle.path)
    chosen = check_engines(manifest, bundle.path, backend)
    tested = run_selftest(bundle, chosen, device, trust).to_dict() if selftest else None
    return BundleCheck(bundle.path, manifest.name, manifest.version, manifest.task,
                       bundle.sha256, verdict.describe(), built, chosen, tested)


# -- a config ------------------------------------------------------------------------------------

@dataclass
class ConfigCheck:
    path: Path
    bundles: list[BundleCheck]
    stages: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"config": str(self.path), "stages": self.stages,
                "bundles": [b.to_dict() for b in self.bundles]}


def engine_configs(config: Any) -> list[tuple[str, Any]]:
    """Every engine section of a loaded config (``(where, EngineConfig)``), nested ones too."""
    from onboard.runtime.config import EngineConfig

    found: list[tuple[str, Any]] = []

    def walk(where: str, value: Any) -> None:
        if isinstance(value, EngineConfig):
            found.append((where, value))
        if is_dataclass(value) and not isinstance(value, type):
            for f in fields(value):
                walk(f"{where}.{f.name}", getattr(value, f.name))
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                walk(f"{where}[{i}]", item)

    for name, section in config.values.items():
        walk(f"[{name}]", section)
    return found


def verify_config(path: str | Path, trust: Any, *, uplinked: Iterable[Path] = (),
                  device: str = "cpu") -> ConfigCheck:
    """Type-check ``path`` as ``onboard run`` does, then verify every bundle it names; the
    bundles under one of ``uplinked`` (folders) need every check, self-test included, the
    board's own (golden, factory) bundles the container's and the signature's.

    The stages are built once, as a pass would build them (so a bundle of the wrong task or
    radiometric offset for its stage is refused here, not at the first pass), and closed."""
    from onboard.runtime import pipeline  # registers every section and stage
    from onboard.runtime.config import load_config
    from onboard.runtime.stages import registered_stages
    from onboard.runtime.telemetry import Telemetry

    path = Path(path)
    config = load_config(path)
    stages = [spec.name for spec in registered_stages() if spec.name in config]
    if not stages:
        raise ConfigError(f"{path}: no stage is configured; known: "
                          f"{[s.name for s in registered_stages()]}")
    _check_signature_section(config, trust, path)
    _check_source(config, path)
    folders = [Path(f).resolve() for f in uplinked]
    checks: list[BundleCheck] = []
    for where, engine in engine_configs(config):
        for role in ("bundle", "golden"):
            bundle_path = getattr(engine, role)
            if bundle_path is None:
                continue
            resolved = Path(bundle_path).resolve()
            new = any(resolved.is_relative_to(folder) for folder in folders)
            try:
                checks.append(verify_bundle(bundle_path, trust, backend=engine.backend,
                                            device=engine.device, selftest=new))
            except OnboardError as error:
                raise type(error)(*_error_args(error, f"{path}: {where}.{role}")) from error
    telemetry = Telemetry(None)
    scratch = Path(tempfile.mkdtemp(prefix="onboard-uplink-verify-"))
    try:
        built = pipeline.Pipeline(config, telemetry, scratch)
        built.close()
    except OnboardError as error:
        raise ConfigError(f"{path}: the stages do not build as a pass would build them: "
                          f"{error}") from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    refused = [e for e in telemetry.events if e["event"] == "bundle_refused"]
    if refused:
        raise BundleError(refused[0]["path"], f"refused when the stages were built "
                                              f"({refused[0]['message']}); the golden bundle "
                                              "would run instead")
    return ConfigCheck(path, checks, stages)


def _error_args(error: OnboardError, where: str) -> tuple[Any, ...]:
    if isinstance(error, BundleError):
        return (error.path, f"{error.problem} (named by {where})")
    return (f"{where}: {error}",)


def _check_signature_section(config: Any, trust: Any, path: Path) -> None:
    """An uplinked config may narrow what the board trusts, never widen it: otherwise the
    config could carry a key of its own and make any bundle it names trusted."""
    from onboard.runtime.bundle.signature import Keyring

    section = config.get("signatures")
    if section is None or not section.trusted_keys:
        return
    board = set() if trust is None else set(trust.keyring.keys)
    for key in Keyring.load(section.trusted_keys).keys.values():
        if key.key_id not in board:
            raise ConfigError(f"{path}: [signatures] trusts key {key.name!r} (id {key.key_id}), "
                              "which the board does not trust; an uplinked config cannot add "
                              "keys")
    if section.required is False:
        raise ConfigError(f"{path}: [signatures] required = false would let unsigned bundles "
                          "run; an uplinked config cannot lower the board's trust")


def _check_source(config: Any, path: Path) -> None:
    source = config.get("source")
    if source is None:
        return
    for item in getattr(source, "paths", ()) or ():
        if not Path(item).exists():
            raise ConfigError(f"{path}: [source] path {item} does not exist on this board "
                              "(board paths in an uplinked config must be absolute)")
