"""Bundle signatures: who made a bundle, not only that it arrived whole.

The container's checksums catch damage, but anyone who can write a file can also write new
checksums (scales ×1000, class names swapped: both verify). So what is uplinked is signed on the
ground with an Ed25519 key and verified on board against the public keys configured there.

What is signed is the SHA-256 of the bundle's ``manifest.json``, behind a fixed context string.
The manifest holds the SHA-256 of every other member and the container refuses a member it does
not list, so this one signature covers every byte that reaches an engine, and it does not
change when the same content is re-zipped. The signature travels inside the bundle as the member
``signature.json``, the one member the manifest cannot list (it signs the manifest); the bundle's
trailer still covers it, so a damaged signature is refused as damage before it is parsed here.

Keys are PEM files: the private half (PKCS #8) ``NAME.ed25519``, the public half
(SubjectPublicKeyInfo) ``NAME.ed25519.pub``. A key's id is the first 16 hex digits of the
SHA-256 of its raw public key; its name is the file's. The runtime trusts a keyring: the public
keys the ``[signatures]`` config section names. When it names any, a bundle must be signed by
one of them (``required = false`` still refuses a wrong signature, and lets an unsigned bundle
through with a warning in telemetry); with none, signatures are not checked.

The key pair in the repository's ``keys/`` is a TEST key: its private half is public, so it
proves the mechanism and nothing else. Flight configs name the mission's own keys.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from onboard.runtime.bundle.container import SIGNATURE, Bundle, write_signed
from onboard.runtime.config import register_section
from onboard.runtime.durability import write_bytes
from onboard.runtime.errors import BundleSignatureError, ConfigError

ALGORITHM = "ed25519"
PRIVATE_SUFFIX = ".ed25519"
PUBLIC_SUFFIX = ".ed25519.pub"
# Bound into every signed message, so a signature made for anything else never verifies here.
_CONTEXT = b"onboard bundle signature v1\nmanifest.json sha256 "
_SIGNATURE_FIELDS = {"schema", "algorithm", "key_id", "key_name", "manifest_sha256",
                     "signature", "created"}


def key_id_of(public_raw: bytes) -> str:
    """A key's id: the first 16 hex digits of the SHA-256 of its 32 raw public-key bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _key_name(path: Path) -> str:
    name = path.name
    for suffix in (PUBLIC_SUFFIX, ".pub", PRIVATE_SUFFIX, ".pem"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key: its name, its id and the key."""

    name: str
    key_id: str
    key: Ed25519PublicKey = field(repr=False, compare=False)
    path: Path | None = None

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs bundles on the ground."""

    name: str
    key: Ed25519PrivateKey = field(repr=False, compare=False)

    @property
    def public(self) -> PublicKey:
        public = self.key.public_key()
        return PublicKey(self.name, key_id_of(_raw_public(public)), public)

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"key name {name!r} must be a plain file name")
        return cls(name, Ed25519PrivateKey.generate())

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``NAME.ed25519`` (private, mode 0600) and ``NAME.ed25519.pub`` into
        ``folder``; returns both paths."""
        folder = Path(folder)
        private = folder / f"{self.name}{PRIVATE_SUFFIX}"
        public = folder / f"{self.name}{PUBLIC_SUFFIX}"
        pem = self.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        write_bytes(private, pem)
        private.chmod(0o600)
        write_bytes(public, self.public.pem())
        return private, public

    def sign_manifest(self, manifest_sha256: str) -> bytes:
        """The ``signature.json`` member for a manifest with this SHA-256."""
        record = {
            "schema": 1, "algorithm": ALGORITHM, "key_id": self.key_id, "key_name": self.name,
            "manifest_sha256": manifest_sha256,
            "signature": base64.b64encode(self.key.sign(_message(manifest_sha256))).decode(),
            "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        }
        return (json.dumps(record, indent=2) + "\n").encode()


def _message(manifest_sha256: str) -> bytes:
    return _CONTEXT + manifest_sha256.encode("ascii")


def load_signing_key(path: str | Path) -> SigningKey:
    """A private key file (PEM, PKCS #8, unencrypted Ed25519); :class:`ConfigError` if not."""
    path = Path(path)
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path}: not an unencrypted PEM private key: {error}") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return SigningKey(_key_name(path), key)


def load_public_key(path: str | Path) -> PublicKey:
    """A public key file (PEM SubjectPublicKeyInfo, Ed25519); :class:`ConfigError` if not."""
    path = Path(path)
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path}: not a PEM public key: {error}") from error
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return PublicKey(_key_name(path), key_id_of(_raw_public(key)), key, path)


def _read_key_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: key file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read key file: {error.strerror or error}") from error
    if len(data) > 64 * 1024:
        raise ConfigError(f"{path}: {len(data)} bytes is not a key file")
    return data


class Keyring:
    """The public keys a runtime trusts, by key id."""

    def __init__(self, keys: list[PublicKey] | tuple[PublicKey, ...] = ()) -> None:
        self.keys: dict[str, PublicKey] = {}
        for key in keys:
            self.keys[key.key_id] = key

    @classmethod
    def load(cls, paths: list[Path] | tuple[Path, ...]) -> Keyring:
        """Keys from public key files, or from every ``*.pub`` in a folder."""
        keys: list[PublicKey] = []
        for path in paths:
            path = Path(path)
            if path.is_dir():
                found = sorted(path.glob("*.pub"))
                if not found:
                    raise ConfigError(f"{path}: no public key (*.pub) in the keyring folder")
                keys.extend(load_public_key(p) for p in found)
            else:
                keys.append(load_public_key(path))
        return cls(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self.keys

    def get(self, key_id: str) -> PublicKey | None:
        return self.keys.get(key_id)

    def describe(self) -> list[str]:
        return [f"{k.name} ({k.key_id})" for k in self.keys.values()]


@dataclass(frozen=True)
class SignatureConfig:
    """``[signatures]``: the public keys that may sign the bundles this runtime loads.

    ``trusted_keys``: public key files (``*.ed25519.pub``) or folders of them, relative to the
    config file. ``required``: refuse unsigned bundles; defaults to true when keys are named.
    """

    trusted_keys: tuple[Path, ...] = ()
    required: bool | None = None

    def __post_init__(self) -> None:
        if self.required and not self.trusted_keys:
            raise ConfigError("required = true needs trusted_keys: no bundle could be verified")
        # Load now, so a missing or malformed key is a config error before the first pass.
        Keyring.load(self.trusted_keys)


register_section("signatures", SignatureConfig,
                 doc="which public keys may sign bundles (Ed25519)")


@dataclass(frozen=True)
class TrustPolicy:
    """What :func:`verify_bundle` accepts: bundles signed by a key of ``keyring``; unsigned ones
    only when ``required`` is false."""

    keyring: Keyring
    required: bool = True

    @classmethod
    def from_config(cls, config: SignatureConfig | None) -> TrustPolicy | None:
        """The policy a ``[signatures]`` section asks for; None when it names no key."""
        if config is None or not config.trusted_keys:
            return None
        required = True if config.required is None else config.required
        return cls(Keyring.load(config.trusted_keys), required)

    @classmethod
    def trusting(cls, *paths: str | Path, required: bool = True) -> TrustPolicy:
        return cls(Keyring.load([Path(p) for p in paths]), required)


@dataclass(frozen=True)
class Signature:
    """A bundle's parsed ``signature.json``."""

    key_id: str
    key_name: str
    manifest_sha256: str
    signature: bytes = field(repr=False)
    created: str = ""

    @classmethod
    def parse(cls, data: bytes, path: Path) -> Signature:
        def fail(problem: str) -> BundleSignatureError:
            return BundleSignatureError(path, f"{SIGNATURE}: {problem}")

        try:
            record: Any = json.loads(data)
        except (UnicodeDecodeError, ValueError) as error:
            raise fail(f"not valid JSON: {error}") from error
        if not isinstance(record, dict):
            raise fail("must be a JSON object")
        unknown = sorted(set(record) - _SIGNATURE_FIELDS)
        if unknown or record.get("schema") != 1:
            raise fail(f"schema {record.get('schema')!r} with field(s) {unknown} is not one "
                       "this runtime reads")
        if record.get("algorithm") != ALGORITHM:
            raise fail(f"algorithm {record.get('algorithm')!r}; this runtime verifies "
                       f"{ALGORITHM} only")
        for key in ("key_id", "key_name", "manifest_sha256", "signature"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise fail(f"{key!r} must be a non-empty string")
        try:
            raw = base64.b64decode(record["signature"], validate=True)
        except ValueError as error:
            raise fail(f"the signature is not base64: {error}") from error
        if len(raw) != 64:
            raise fail(f"an Ed25519 signature has 64 bytes, this one {len(raw)}")
        return cls(record["key_id"], record["key_name"], record["manifest_sha256"], raw,
                   str(record.get("created", "")))


@dataclass(frozen=True)
class Verdict:
    """What the signature check found; ``status`` is ``verified``, ``unsigned`` (let through:
    signatures not required) or ``not checked`` (no trusted keys configured)."""

    status: str
    key_id: str | None = None
    key_name: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"signature": self.status, "key_id": self.key_id, "key_name": self.key_name}


def read_signature(bundle: Bundle) -> Signature | None:
    """The bundle's signature, parsed but not yet trusted; None when it has none."""
    if bundle.signature is None:
        return None
    return Signature.parse(bundle.signature, bundle.path)


def verify_bundle(bundle: Bundle, policy: TrustPolicy | None) -> Verdict:
    """Check ``bundle``'s signature against ``policy``; :class:`BundleSignatureError` naming the
    bundle and the key when it is not signed by a trusted key (or unsigned when required)."""
    if policy is None:
        return Verdict("not checked")
    signature = read_signature(bundle)
    trusted = ", ".join(policy.keyring.describe()) or "none"
    if signature is None:
        if policy.required:
            raise BundleSignatureError(
                bundle.path, f"unsigned, and this runtime requires bundles signed by a trusted "
                             f"key (trusted: {trusted}); sign it on the ground with "
                             "`onboard sign`")
        return Verdict("unsigned")
    who = f"key {signature.key_name!r} (id {signature.key_id})"
    if signature.manifest_sha256 != bundle.manifest_sha256:
        raise BundleSignatureError(
            bundle.path, f"the signature by {who} is for another manifest (SHA-256 "
                         f"{signature.manifest_sha256[:16]}…, this one "
                         f"{bundle.manifest_sha256[:16]}…): the bundle was changed after signing")
    key = policy.keyring.get(signature.key_id)
    if key is None:
        raise BundleSignatureError(
            bundle.path, f"signed by {who}, which this runtime does not trust "
                         f"(trusted: {trusted})")
    if not key.verify(signature.signature, _message(bundle.manifest_sha256)):
        raise BundleSignatureError(
            bundle.path, f"the signature does not verify against trusted key {key.name!r} (id "
                         f"{key.key_id}): the bundle was changed after signing, or forged")
    return Verdict("verified", key.key_id, key.name)


def sign_bundle(path: str | Path, key: SigningKey, out: str | Path | None = None) -> Path:
    """Sign the bundle at ``path`` with ``key`` into ``out`` (default: in place, atomically).

    The manifest and the members are kept byte for byte; only the signature member is new (or
    replaced), so the bundle's file hash changes and its manifest's does not.
    """
    bundle = Bundle.open(path)
    return write_signed(bundle, key.sign_manifest(bundle.manifest_sha256), out)


# -- the policy open_engine applies when its caller names none ---------------------------------

_lock = threading.Lock()
_active: TrustPolicy | None = None


def install_trust_policy(policy: TrustPolicy | None) -> TrustPolicy | None:
    """Make ``policy`` the one every :func:`~onboard.runtime.engines.open_engine` call without
    its own ``trust`` applies (None: signatures not checked); returns the previous one."""
    global _active
    with _lock:
        previous, _active = _active, policy
    return previous


def active_trust_policy() -> TrustPolicy | None:
    with _lock:
        return _active


@contextlib.contextmanager
def trusting(policy: TrustPolicy | None) -> Iterator[TrustPolicy | None]:
    """``policy`` for the engines opened inside the ``with`` block."""
    previous = install_trust_policy(policy)
    try:
        yield policy
    finally:
        install_trust_policy(previous)
