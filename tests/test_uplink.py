"""Uplink: chunks assembled once across SIGKILLs, bundles refused for a clear reason, and a bad
set rolled back automatically at the next pass boundary, on real bundles and real imagery."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from onboard.runtime import pipeline
from onboard.runtime.bundle import Bundle, write_bundle
from onboard.runtime.bundle.signature import SigningKey, TrustPolicy, load_signing_key
from onboard.runtime.engines import open_engine
from onboard.runtime.errors import BundleError, ConfigError
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.uplink import HealthPolicy, Staging, Uplink, active_config, pass_finished
from onboard.runtime.uplink.chunks import encode_chunk, parse_chunk, split_file
from onboard.runtime.uplink.verify import add_selftest, verify_bundle
from onboard.runtime.windows import Window

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models" / "cloud"
KEY = REPO / "keys" / "onboard-test.ed25519"
SAMPLE = REPO / "runtime" / "sample" / "hongkong"
CROP = REPO / "tests" / "data" / "oscd" / "hongkong" / "imgs_1"
BANDS = ["blue", "green", "red", "nir"]
KILLS = 50


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tile(row: int, col: int, size: int, folder: Path = CROP) -> np.ndarray:
    return OscdScene(folder).read(Window(row, col, size, size), BANDS).pixels


def _uplink(board: Uplink, path: Path, tmp: Path, chunk_bytes: int = 50_000) -> None:
    """Ground to board: split, send every chunk, as the procedure in docs/uplink.md does."""
    outcomes = board.receive(split_file(path, chunk_bytes, tmp / f"chunks-{path.name}"))
    assert outcomes[-1]["status"] == "assembled", outcomes


def _config(folder: Path, bundle: str, name: str = "onboard.toml") -> Path:
    path = folder / name
    path.write_text(
        f'[source]\nkind = "oscd"\npaths = ["{SAMPLE}"]\n[tiling]\ntile = 64\n'
        f'[cloud]\nbundle = "{bundle}"\ngolden = "{MODELS / "cloud-4band-fp32-ort.onboard"}"\n'
        f'threads = 1\n[signatures]\ntrusted_keys = ["{KEY}.pub"]\n')
    return path


def _with(source: Path, out: Path, *, version: str | None = None, scale: float | None = None,
          toolchain_onboard: str | None = None, key: SigningKey | None = None,
          tiles: list[np.ndarray] | None = None) -> Path:
    """A real cloud bundle, changed as the ground could change it, with a self-test, signed."""
    bundle = Bundle.open(source)
    manifest = bundle.manifest
    if version:
        manifest.version = version
    if scale:
        manifest.inputs[0].scale = [scale] * len(manifest.inputs[0].scale)
    if toolchain_onboard:
        manifest.toolchain["onboard"] = toolchain_onboard
    members = {name: bundle.read(name) for name in manifest.engines.values()}
    plain = write_bundle(out.with_suffix(".plain"), manifest, members)
    signer = (key or load_signing_key(KEY)).sign_manifest
    return add_selftest(plain, tiles or [_tile(0, 0, 64), _tile(32, 40, 48)], out,
                        signer=signer)


# -- staging under SIGKILL ---------------------------------------------------------------------

_WORKER = """
import sys
from pathlib import Path
from onboard.runtime.uplink.staging import Staging
staging = Staging(sys.argv[1])
print("ready", flush=True)
for line in Path(sys.argv[2]).read_text().split():
    staging.receive_file(line)
print("done", flush=True)
"""


def _assembled(state: Path) -> list[dict]:
    journal = state / "journal.jsonl"
    if not journal.exists():
        return []
    # Opening the journal is what a restart does: a torn last line is dropped, damage is not.
    staging = Staging(state)
    return [r for r in staging.journal if r["event"] == "assembled"]


def test_chunks_in_random_order_with_duplicates_a_corrupted_chunk_and_sigkills(tmp_path):
    source = MODELS / "cloud-4band-int8-ort.onboard"
    original = source.read_bytes()
    state = tmp_path / "state"
    rng = random.Random(17)

    # Without kills first: one corrupted chunk is refused by index and asked for again.
    chunks = split_file(source, 4096, tmp_path / "c0", upload="first")
    bad_index = 7
    damaged = bytearray(chunks[bad_index].read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    (tmp_path / "bad.chunk").write_bytes(bytes(damaged))
    staging = Staging(state)
    feed = [c for c in chunks if c != chunks[bad_index]] + rng.sample(chunks, 6)
    rng.shuffle(feed)
    refused = staging.receive_file(tmp_path / "bad.chunk")
    assert refused.status == "refused" and refused.index == bad_index
    assert "checksum mismatch" in refused.reason and "send it again" in refused.reason
    outcomes = [staging.receive_file(c).status for c in feed]
    assert outcomes.count("duplicate") == 6 and "assembled" not in outcomes
    (upload,) = staging.uploads()
    assert upload.missing == [bad_index] and bad_index in upload.refused
    assert staging.receive_file(chunks[bad_index]).status == "assembled"
    assert (state / "received" / source.name).read_bytes() == original

    # Then the same with SIGKILLs at random moments: each upload is a fresh split; each worker
    # restarts from the top of its feed (the ground sends again what was not acknowledged).
    kills, uploads = 0, []
    landed = {"before any chunk": 0, "mid-staging": 0, "all staged, not assembled": 0,
              "assembled": 0}
    while kills < KILLS:
        number = len(uploads)
        name = f"bundle-{number}.onboard"
        chunks = split_file(source, 4096, tmp_path / f"c{number + 1}", upload=f"up-{number}",
                            name=name)
        bad = rng.randrange(len(chunks))
        damaged = bytearray(chunks[bad].read_bytes())
        damaged[-1] ^= 0x01
        corrupt = tmp_path / f"bad-{number}.chunk"
        corrupt.write_bytes(bytes(damaged))
        feed = chunks + rng.sample(chunks, 8) + [corrupt]
        rng.shuffle(feed)
        feed.remove(chunks[bad])
        feed.append(chunks[bad])  # its good copy only comes after the bad one: resent
        listing = tmp_path / f"feed-{number}.txt"
        listing.write_text("\n".join(str(p) for p in feed))
        uploads.append(name)
        while True:
            worker = subprocess.Popen([sys.executable, "-c", _WORKER, str(state), str(listing)],
                                      stdout=subprocess.PIPE, text=True)
            assert worker.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.12))
            killed = worker.poll() is None
            if killed:
                os.kill(worker.pid, signal.SIGKILL)
                kills += 1
            worker.wait()
            parts = len(list((state / "staging" / f"up-{number}").glob("*.part")))
            records = [r for r in _assembled(state) if r["name"] == name]
            if killed:
                landed["assembled" if records else "before any chunk" if not parts else
                       "all staged, not assembled" if parts == len(chunks) else
                       "mid-staging"] += 1
            assert len(records) <= 1
            target = state / "received" / name
            if target.exists():  # atomic: never a prefix of the file
                assert target.read_bytes() == original
            if records:
                break
    for name in uploads:
        assert [r["name"] for r in _assembled(state)].count(name) == 1
        assert (state / "received" / name).read_bytes() == original
    assert not list((state / "staging").iterdir())  # staged chunks removed once assembled
    assert not list((state / "received").glob(".*.partial"))
    assert kills >= KILLS
    print(f"{kills} SIGKILLs over {len(uploads)} uploads; where they landed: {landed}")


def test_a_chunk_whose_header_was_damaged_cannot_land_in_another_slot():
    header = {"upload": "u", "name": "a.onboard", "kind": "bundle", "index": 1, "total": 3,
              "file_bytes": 9, "file_sha256": "0" * 64}
    data = bytearray(encode_chunk(header, b"abc"))
    assert parse_chunk(bytes(data)).index == 1
    data[data.index(b'"index":1') + 8] = ord("2")  # the payload is intact, the slot is not
    refused = parse_chunk(bytes(data))
    assert "checksum mismatch" in refused.reason and refused.index == 2


# -- verification ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    return _with(MODELS / "cloud-4band-int8-ort.onboard", folder / "cloud-v3.onboard",
                 version="0.3.0")


@pytest.fixture()
def board(tmp_path) -> Uplink:
    return Uplink.init(tmp_path / "state", pipeline.SAMPLE_CONFIG,
                       policy=HealthPolicy(probation_passes=1))


def test_a_verified_bundle_reproduces_its_self_test_on_this_board(good_bundle):
    check = verify_bundle(good_bundle, TrustPolicy.trusting(f"{KEY}.pub"))
    assert check.signature["signature"] == "verified" and check.bundle_id == "cloud-4band@0.3.0"
    assert check.selftest["tiles"] == 2 and check.selftest["worst"]["output.within"] == 1.0


def _refused(board: Uplink, bundle: Path, tmp: Path, match: str) -> str:
    before = (board.folder / "active.json").read_bytes()
    _uplink(board, bundle, tmp)
    _uplink(board, _config(tmp, bundle.name, f"{bundle.stem}.toml"), tmp)
    with pytest.raises((BundleError, ConfigError), match=match) as refused:
        board.activate(f"{bundle.stem}.toml")
    assert (board.folder / "active.json").read_bytes() == before  # the active set untouched
    assert board.state()["pending"] is None
    events = [json.loads(line) for line in (board.folder / "telemetry.jsonl").open()]
    assert events[-1]["event"] == "uplink_refused" and bundle.name in events[-1]["reason"]
    return str(refused.value)


def test_tampered_self_test_unknown_key_and_other_runtime_are_refused(board, good_bundle,
                                                                     tmp_path):
    # Expected outputs changed on the ground and re-signed by a trusted key: the board's
    # engine does not reproduce them.
    bundle = Bundle.open(good_bundle)
    manifest = bundle.manifest
    members = {name: bundle.read(name) for name in bundle.members}
    with np.load(io.BytesIO(members["selftest/0.npz"])) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["expected.output"] = arrays["expected.output"] + 0.5
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    members["selftest/0.npz"] = buffer.getvalue()
    tampered = write_bundle(tmp_path / "tampered.onboard", manifest, members,
                            signer=load_signing_key(KEY).sign_manifest)
    reason = _refused(board, tampered, tmp_path, "self-test tile selftest/0.npz")
    assert "not reproduced on this board's engine" in reason

    intruder = SigningKey.generate("intruder")
    unknown = _with(MODELS / "cloud-4band-int8-ort.onboard", tmp_path / "unknown.onboard",
                    version="0.3.1", key=intruder)
    reason = _refused(board, unknown, tmp_path, "does not trust")
    assert "intruder" in reason and intruder.key_id in reason

    future = _with(MODELS / "cloud-4band-int8-ort.onboard", tmp_path / "future.onboard",
                   version="0.3.2", toolchain_onboard="0.9.0")
    reason = _refused(board, future, tmp_path, "built for onboard 0.9.0")
    assert "this board runs onboard" in reason

    # A config uplinked without its bundle names what is missing; nothing switches either.
    _uplink(board, _config(tmp_path, "never-sent.onboard", "orphan.toml"), tmp_path)
    with pytest.raises(ConfigError, match="never-sent.onboard, which has not been received"):
        board.activate("orphan.toml")
    assert board.state()["active"]["id"] == "golden"


# -- activation and rollback -----------------------------------------------------------------

def _nan_bundle(tmp: Path) -> Path:
    """A real cloud bundle whose input scale lets bright real pixels overflow float32, with a
    self-test on a dark tile that does not: it passes verification and NaNs in flight."""
    source = MODELS / "cloud-4band-fp32-ort.onboard"
    dark = _tile(0, 0, 16, SAMPLE / "imgs_2")
    engine = open_engine(source, threads=1, warmup=0)
    lo, hi = 30.0, 36.0  # log10 of the scale: finite at lo, not at hi, on the dark tile
    for _ in range(14):
        mid = (lo + hi) / 2
        out = engine.run(np.ascontiguousarray(dark[None].astype(np.float32) * 10.0 ** mid))
        lo, hi = (mid, hi) if np.isfinite(out).all() else (lo, mid)
    engine.close()
    return _with(source, tmp / "cloud-overflow.onboard", version="0.4.0",
                 scale=10.0 ** (lo - 0.02), tiles=[dark])


def _pass(state: Path, out: Path) -> dict:
    """One pass as `onboard run --active STATE` runs it: the hook around pipeline.run."""
    config = active_config(state, out)
    try:
        pipeline.run(config, out)
    except Exception as error:
        return pass_finished(state, out, error).to_dict()
    return pass_finished(state, out).to_dict()


def _events(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.open()) if r["event"] == kind]


_KILLED_PASS = """
import sys, time
from onboard.runtime import pipeline, uplink
config = uplink.active_config(sys.argv[1], sys.argv[2])
print(config, flush=True)
pipeline.run(config, sys.argv[2])
time.sleep(60)  # killed before pass_finished: a crash
"""


def test_a_set_that_yields_nan_is_rolled_back_at_the_next_pass_and_golden_after_that(
        board, good_bundle, tmp_path):
    state = board.state_dir
    telemetry = board.folder / "telemetry.jsonl"
    _uplink(board, good_bundle, tmp_path)
    _uplink(board, _config(tmp_path, good_bundle.name, "good.toml"), tmp_path)
    board.activate("good.toml")
    assert board.state()["active"]["id"] == "golden"  # nothing switches mid-pass
    first = _pass(state, tmp_path / "pass-1")
    assert first["healthy"] and board.state()["active"]["status"] == "proven"
    item = json.loads(next((tmp_path / "pass-1" / "products").glob("*.json")).read_text())
    assert item["properties"]["onboard:bundles"] == ["cloud-4band@0.3.0"]  # what ran, per product

    nan = _nan_bundle(tmp_path)
    _uplink(board, nan, tmp_path)
    _uplink(board, _config(tmp_path, nan.name, "nan.toml"), tmp_path)
    board.activate("nan.toml")  # verification passes: its self-test tile is dark
    second = _pass(state, tmp_path / "pass-2")
    assert not second["healthy"] and second["counts"]["non_finite"] > 0
    assert any("non-finite" in r for r in second["reasons"])
    scheduled = _events(telemetry, "uplink_rollback_scheduled")[-1]
    assert scheduled["from"] == "set-0002" and scheduled["to"] == "set-0001"
    assert "non-finite" in scheduled["reason"]
    assert board.state()["active"]["id"] == "set-0002"  # until the next boundary

    # The next pass runs the previous set; a SIGKILL ends it before it finishes.
    out = tmp_path / "pass-3"
    runner = subprocess.Popen([sys.executable, "-c", _KILLED_PASS, str(state), str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert "set-0001" in runner.stdout.readline()
    switch = _events(telemetry, "uplink_switch")[-1]
    assert (switch["from"], switch["to"], switch["kind"]) == ("set-0002", "set-0001", "rollback")
    assert "non-finite" in switch["reason"] and _events(out / "telemetry.jsonl", "uplink_switch")
    runner.kill()  # mid-pass: it never reaches pass_finished
    runner.wait()

    # Both the new and the previous set failed: back to golden, the default sample config.
    config = active_config(state, tmp_path / "pass-4")
    assert config == pipeline.SAMPLE_CONFIG.resolve()
    switch = _events(telemetry, "uplink_switch")[-1]
    assert (switch["from"], switch["to"]) == ("set-0001", "golden")
    assert "never finished" in switch["reason"]
    result = pipeline.run(config, tmp_path / "pass-4")  # the default `onboard run`, unchanged
    health = pass_finished(state, tmp_path / "pass-4")
    assert health.healthy and len(result.acquisitions) == 2 and result.summary["plan"]["chosen"]


def test_rollback_by_command_waits_for_the_pass_boundary(board, good_bundle, tmp_path):
    _uplink(board, good_bundle, tmp_path)
    _uplink(board, _config(tmp_path, good_bundle.name, "good.toml"), tmp_path)
    board.activate("good.toml")
    config = active_config(board.state_dir)  # a pass begins with the new set
    assert config.parent.name == "set-0001"
    board.rollback("golden", "operator")
    assert board.state()["active"]["id"] == "set-0001"  # the running pass keeps its set
    assert board.status()["pending"]["kind"] == "rollback"
    result = subprocess.run(["onboard", "uplink", "status",
                             "--state", str(board.state_dir)], capture_output=True, text=True)
    assert "pending    golden" in result.stdout and "rollback" in result.stdout
    assert active_config(board.state_dir) == pipeline.SAMPLE_CONFIG.resolve()
    switch = _events(board.folder / "telemetry.jsonl", "uplink_switch")[-1]
    assert switch["reason"] == "commanded: operator"
