"""Bundle signatures: only bundles signed by a trusted key load, whatever their checksums say.

Everything runs on the shipped cloud bundles (signed with the project's TEST key, keys/) and on
copies of them changed the way an attacker who can write files would change them.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from onboard.runtime.bundle import SIGNATURE, Bundle
from onboard.runtime.bundle.container import _write_archive
from onboard.runtime.bundle.signature import (
    Keyring,
    SigningKey,
    TrustPolicy,
    load_public_key,
    load_signing_key,
    read_signature,
    sign_bundle,
    trusting,
    verify_bundle,
)
from onboard.runtime.cli import main
from onboard.runtime.config import config_from_dict, load_config
from onboard.runtime.engines import open_engine
from onboard.runtime.errors import BundleChecksumError, BundleSignatureError, ConfigError
from onboard.runtime.pipeline import SAMPLE_CONFIG
from onboard.runtime.stages import StageContext
from onboard.runtime.stages.cloud import build_cloud_stage
from onboard.runtime.telemetry import Telemetry

REPO = Path(__file__).resolve().parents[1]
TEST_KEY = REPO / "keys" / "onboard-test.ed25519"
TEST_PUBLIC = REPO / "runtime" / "sample" / "keys" / "onboard-test.ed25519.pub"
TEST_KEY_ID = "223ad9949f275860"
# Every bundle the repository ships: cloud, change and super-resolution.
SHIPPED = sorted(p for kind in ("cloud", "change", "superres")
                 for p in (REPO / "models" / kind).glob("*.onboard"))
PRIMARY = REPO / "models" / "cloud" / "cloud-4band-int8-ort.onboard"
GOLDEN = REPO / "models" / "cloud" / "cloud-4band-fp32-ort.onboard"


@pytest.fixture(scope="module")
def policy() -> TrustPolicy:
    return TrustPolicy.trusting(TEST_PUBLIC)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> SigningKey:
    key = SigningKey.generate("stranger")
    key.save(tmp_path_factory.mktemp("stranger"))
    return key


def _forge(source: Path, target: Path, edit, keep_signature: bool = True) -> Path:
    """``source`` with its manifest edited and every checksum and the trailer made anew, as
    anyone who can write a file can do; the old signature is kept (or dropped)."""
    bundle = Bundle.open(source)
    manifest = json.loads(bundle.manifest_bytes)
    edit(manifest)
    members = {name: bundle.read(name) for name in bundle.members}
    signature = bundle.signature if keep_signature else None
    return _write_archive(target, (json.dumps(manifest, indent=2) + "\n").encode(), signature,
                          members)


def test_the_test_key_pair_matches_and_is_named(tmp_path):
    private, public = load_signing_key(TEST_KEY), load_public_key(TEST_PUBLIC)
    assert private.name == public.name == "onboard-test"
    assert private.key_id == public.key_id == TEST_KEY_ID
    assert (REPO / "keys" / "onboard-test.ed25519.pub").read_bytes() == TEST_PUBLIC.read_bytes()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_bundles_are_signed_by_the_test_key(path, policy):
    bundle = Bundle.open(path)
    verdict = verify_bundle(bundle, policy)
    assert (verdict.status, verdict.key_id, verdict.key_name) == \
        ("verified", TEST_KEY_ID, "onboard-test")
    signature = read_signature(bundle)
    assert signature is not None and signature.manifest_sha256 == bundle.manifest_sha256


@pytest.mark.parametrize(("edit", "what"), [
    (lambda m: m["input"].update(scale=[v * 1000 for v in m["input"]["scale"]]), "scales ×1000"),
    (lambda m: m["output"].update(classes={"0": "cloud", "1": "clear", "2": "shadow"}),
     "class names swapped"),
])
def test_a_re_checksummed_manifest_passes_the_checksums_but_not_the_signature(
        tmp_path, policy, edit, what):
    forged = _forge(PRIMARY, tmp_path / "forged.onboard", edit)
    bundle = Bundle.open(forged)  # integrity holds: the checksums were made anew
    with pytest.raises(BundleSignatureError, match="changed after signing") as caught:
        verify_bundle(bundle, policy)
    assert str(forged) in str(caught.value) and TEST_KEY_ID in str(caught.value)
    with pytest.raises(BundleSignatureError):  # and open_engine refuses to load it
        open_engine(forged, threads=1, trust=policy)


def test_a_bundle_re_signed_by_an_unknown_key_is_refused_naming_the_key(tmp_path, policy,
                                                                        stranger):
    forged = _forge(PRIMARY, tmp_path / "forged.onboard",
                    lambda m: m["output"].update(classes={"0": "cloud", "1": "clear",
                                                          "2": "shadow"}))
    sign_bundle(forged, stranger)
    with pytest.raises(BundleSignatureError) as caught:
        verify_bundle(Bundle.open(forged), policy)
    message = str(caught.value)
    assert str(forged) in message and stranger.key_id in message and "stranger" in message
    assert "does not trust" in message and TEST_KEY_ID in message  # what it does trust


def test_a_signature_copied_from_another_key_id_does_not_verify(tmp_path, policy, stranger):
    """The stranger signs, then claims the test key's id: the keyring's key refuses it."""
    copy = sign_bundle(PRIMARY, stranger, tmp_path / "claimed.onboard")
    record = json.loads(Bundle.open(copy).signature)
    record["key_id"], record["key_name"] = TEST_KEY_ID, "onboard-test"
    bundle = Bundle.open(copy)
    members = {name: bundle.read(name) for name in bundle.members}
    _write_archive(copy, bundle.manifest_bytes, json.dumps(record).encode(), members)
    with pytest.raises(BundleSignatureError, match="does not verify against trusted key"):
        verify_bundle(Bundle.open(copy), policy)


def test_unsigned_bundles_are_refused_when_required_and_reported_when_not(tmp_path, policy):
    unsigned = _forge(PRIMARY, tmp_path / "unsigned.onboard", lambda m: None,
                      keep_signature=False)
    with pytest.raises(BundleSignatureError, match="unsigned") as caught:
        verify_bundle(Bundle.open(unsigned), policy)
    assert str(unsigned) in str(caught.value) and TEST_KEY_ID in str(caught.value)
    lenient = TrustPolicy(policy.keyring, required=False)
    telemetry = Telemetry()
    engine = open_engine(unsigned, threads=1, trust=lenient, telemetry=telemetry)
    engine.close()
    events = {e["event"]: e for e in telemetry.events}
    assert events["engine_open"]["signature"] == "unsigned" and "bundle_unsigned" in events
    # Without trusted keys nothing is checked, and telemetry says so.
    telemetry = Telemetry()
    open_engine(unsigned, threads=1, telemetry=telemetry).close()
    assert telemetry.events[-1]["signature"] == "not checked"


def test_a_damaged_signature_is_caught_as_damage_before_it_is_parsed(tmp_path):
    copy = Path(shutil.copy(PRIMARY, tmp_path / "copy.onboard"))
    data = bytearray(copy.read_bytes())
    at = data.index(b'"signature": "') + 20
    data[at] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(BundleChecksumError):
        Bundle.open(copy)


def test_golden_fallback_still_works_and_is_reported(tmp_path, policy, stranger):
    primary = sign_bundle(PRIMARY, stranger, tmp_path / "primary.onboard")
    telemetry = Telemetry()
    engine = open_engine(primary, threads=1, fallback=GOLDEN, trust=policy, telemetry=telemetry)
    try:
        assert engine.fallback_from == str(primary)
        assert engine.bundle.path == GOLDEN and engine.signature.status == "verified"
    finally:
        engine.close()
    refused = next(e for e in telemetry.events if e["event"] == "bundle_refused")
    assert refused["error"] == "BundleSignatureError" and stranger.key_id in refused["message"]
    opened = telemetry.events[-1]
    assert opened["event"] == "engine_open" and opened["fallback_from"] == str(primary)
    assert opened["key_id"] == TEST_KEY_ID
    # A golden bundle is held to the same check.
    golden = sign_bundle(GOLDEN, stranger, tmp_path / "golden.onboard")
    with pytest.raises(BundleSignatureError, match=stranger.key_id):
        open_engine(primary, threads=1, fallback=golden, trust=policy)


def test_the_sample_config_trusts_the_test_key_and_its_stage_verifies(tmp_path, stranger):
    config = load_config(SAMPLE_CONFIG)
    section = config.section("signatures")
    sample_policy = TrustPolicy.from_config(section)
    assert sample_policy is not None and sample_policy.required
    assert list(sample_policy.keyring.keys) == [TEST_KEY_ID]
    context = StageContext(Telemetry(), tmp_path / "state")
    with trusting(sample_policy):  # what the pipeline installs from the config's section
        stage = build_cloud_stage(config.section("cloud"), context)
        stage.engine.close()
        assert stage.engine.signature.status == "verified"
        # The same stage config with a bundle signed by a stranger runs the golden bundle.
        cloud = config.section("cloud")
        foreign = sign_bundle(cloud.bundle, stranger, tmp_path / "foreign.onboard")
        stage = build_cloud_stage(replace(cloud, bundle=foreign), context)
        stage.engine.close()
        assert stage.engine.fallback_from == str(foreign)
    assert any(e["event"] == "bundle_refused" and stranger.key_id in e["message"]
               for e in context.telemetry.events)


def test_the_signatures_section_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="key file not found"):
        config_from_dict({"signatures": {"trusted_keys": ["nope.ed25519.pub"]}}, base=tmp_path)
    with pytest.raises(ConfigError, match="needs trusted_keys"):
        config_from_dict({"signatures": {"required": True}})
    (tmp_path / "bad.ed25519.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        config_from_dict({"signatures": {"trusted_keys": ["bad.ed25519.pub"]}}, base=tmp_path)
    config = config_from_dict({"signatures": {"trusted_keys": [str(TEST_PUBLIC.parent)],
                                              "required": False}})
    policy = TrustPolicy.from_config(config.section("signatures"))
    assert policy is not None and not policy.required and TEST_KEY_ID in policy.keyring
    assert TrustPolicy.from_config(config_from_dict({}).section("signatures")) is None


def test_onboard_sign_makes_keys_signs_and_checks(tmp_path, capsys):
    assert main(["sign", "--new-key", "mission", "--dir", str(tmp_path)]) == 0
    private, public = tmp_path / "mission.ed25519", tmp_path / "mission.ed25519.pub"
    assert private.stat().st_mode & 0o077 == 0  # the private half is the owner's only
    key_id = Keyring.load([public]).describe()[0].split("(")[1].rstrip(")")
    assert main(["sign", "--new-key", "mission", "--dir", str(tmp_path)]) == 1  # no overwrite
    signed = tmp_path / "signed.onboard"
    assert main(["sign", str(PRIMARY), "--key", str(private), "--out", str(signed)]) == 0
    assert main(["sign", "--check", str(signed), "--trust", str(public)]) == 0
    assert main(["sign", "--check", str(signed), "--trust", str(TEST_PUBLIC)]) == 1
    out = capsys.readouterr()
    assert f"verified by mission ({key_id})" in out.out
    assert f"signed by key 'mission' (id {key_id}), which this runtime does not trust" in out.err
    # Signing keeps the manifest and every member byte for byte.
    before, after = Bundle.open(PRIMARY), Bundle.open(signed)
    assert after.manifest_bytes == before.manifest_bytes
    assert all(after.read(m) == before.read(m) for m in before.members)
    with zipfile.ZipFile(signed) as archive:
        assert archive.namelist()[:2] == ["manifest.json", SIGNATURE]


def test_predict_trusts_only_the_keys_it_is_given(tmp_path, capsys, test_data, stranger):
    scene = test_data / "oscd" / "paris" / "imgs_2"
    foreign = sign_bundle(PRIMARY, stranger, tmp_path / "foreign.onboard")
    out = tmp_path / "mask.tif"
    assert main(["predict", str(foreign), str(scene), "--out", str(out), "--trust",
                 str(TEST_PUBLIC)]) == 1
    assert stranger.key_id in capsys.readouterr().err and not out.exists()
    assert main(["predict", str(PRIMARY), str(scene), "--out", str(out), "--trust",
                 str(TEST_PUBLIC), "--no-png"]) == 0
    assert out.exists()


def test_info_shows_who_signed_a_bundle(capsys):
    assert main(["info", str(PRIMARY)]) == 0
    assert f"signature: by key 'onboard-test' (id {TEST_KEY_ID}), not checked" in \
        capsys.readouterr().out
    assert main(["info", "--json", str(PRIMARY)]) == 0
    assert json.loads(capsys.readouterr().out)["signature"]["key_id"] == TEST_KEY_ID


def test_onboard_keys_makes_and_lists_keys_and_marks_the_test_key(tmp_path, capsys):
    folder = tmp_path / "ground"
    assert main(["keys", "new", "mission-2027", "--dir", str(folder)]) == 0
    made = capsys.readouterr().out
    private, public = folder / "mission-2027.ed25519", folder / "mission-2027.ed25519.pub"
    assert private.stat().st_mode & 0o077 == 0
    key_id = load_signing_key(private).key_id
    assert load_public_key(public).key_id == key_id and f"key id:      {key_id}" in made
    assert main(["keys", "new", "mission-2027", "--dir", str(folder)]) == 1  # no overwrite
    assert "refusing to overwrite" in capsys.readouterr().err
    assert load_signing_key(private).key_id == key_id

    assert main(["keys", "list", str(folder), str(REPO / "keys")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4
    mine = [r for r in rows if r.startswith("mission-2027")]
    assert [r.split()[1:3] for r in mine] == [[key_id, "private"], [key_id, "public"]]
    assert not any("TEST KEY" in r for r in mine)
    test = [r for r in rows if r.startswith("onboard-test")]
    assert [r.split()[1:3] for r in test] == [[TEST_KEY_ID, "private"], [TEST_KEY_ID, "public"]]
    assert all("TEST KEY" in r for r in test)

    # A broken file and halves of two different keys under one name are reported, rc 1.
    other = SigningKey.generate("mission-2027")
    (folder / "mission-2027.ed25519.pub").unlink()
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "mission-2027.ed25519.pub", folder)
    (folder / "broken.ed25519.pub").write_text("not a key")
    assert main(["keys", "list", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "broken.ed25519.pub: public   NOT A VALID KEY" in out
    assert "the private and public halves are different keys" in out
    assert key_id in out and other.key_id in out


def test_onboard_keys_new_and_sign_new_key_make_the_same_kind_of_pair(tmp_path, capsys):
    assert main(["sign", "--new-key", "a", "--dir", str(tmp_path)]) == 0
    assert main(["keys", "new", "b", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    for name in ("a", "b"):
        key = load_signing_key(tmp_path / f"{name}.ed25519")
        signed = sign_bundle(PRIMARY, key, tmp_path / f"{name}.onboard")
        verdict = verify_bundle(Bundle.open(signed),
                                TrustPolicy.trusting(tmp_path / f"{name}.ed25519.pub"))
        assert verdict.key_id == key.key_id
    assert main(["keys", "list", str(tmp_path / "nowhere")]) == 1
    assert "no such key file or folder" in capsys.readouterr().err
