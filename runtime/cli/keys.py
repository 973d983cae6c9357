"""``onboard keys``: make and list the Ed25519 keys that sign bundles.

    onboard keys new NAME [--dir DIR]
    onboard keys list [DIR_OR_FILE ...]

``new`` writes ``NAME.ed25519`` (private, mode 0600: it stays on the ground) and
``NAME.ed25519.pub`` (public: the board's ``[signatures]`` section names it), and never overwrites
a key. ``list`` shows every key file it finds with its name, key id, which half it is, and whether
it is the project's TEST key, whose private half is in the repository (anyone can sign with it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from onboard.runtime.bundle.signature import (
    PRIVATE_SUFFIX,
    PUBLIC_SUFFIX,
    SigningKey,
    load_public_key,
    load_signing_key,
)
from onboard.runtime.errors import ConfigError, OnboardError

# The id of keys/onboard-test.ed25519: its private half is public, so a bundle signed by it
# proves nothing about who made it. Listing says so, so that nobody flies it by mistake.
TEST_KEY_ID = "223ad9949f275860"


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    new = sub.add_parser("new", help="make an Ed25519 key pair NAME.ed25519 (private) and "
                         "NAME.ed25519.pub (public)")
    new.add_argument("name", help="the key's name (a plain file name)")
    new.add_argument("--dir", type=Path, default=Path("."),
                     help="folder to write the pair into (default: the current one)")
    listing = sub.add_parser("list", help="list key files: name, key id, private or public, "
                             "and whether it is the project's test key")
    listing.add_argument("paths", type=Path, nargs="*",
                         help="folders or key files (default: the current folder)")


def run(args: argparse.Namespace) -> int:
    if args.keys_command == "new":
        new_key(args.name, args.dir)
        return 0
    if args.keys_command == "list":
        return list_keys(args.paths or [Path(".")])
    raise ConfigError("name an action: onboard keys new NAME, or onboard keys list [DIR ...]")


def new_key(name: str, folder: Path) -> SigningKey:
    """Make and save a key pair ``name`` in ``folder`` (refusing to overwrite either half),
    printing where each half went and the key id."""
    key = SigningKey.generate(name)
    for existing in (folder / f"{key.name}{PRIVATE_SUFFIX}", folder / f"{key.name}{PUBLIC_SUFFIX}"):
        if existing.exists():
            raise ConfigError(f"{existing}: exists; refusing to overwrite a key")
    private, public = key.save(folder)
    print(f"private key: {private} (keep it on the ground; never uplink it)")
    print(f"public key:  {public} (name it in the board's [signatures] trusted_keys)")
    print(f"key id:      {key.key_id}")
    return key


@dataclass(frozen=True)
class KeyFile:
    """One key file found by :func:`find_keys`: ``problem`` is set when it cannot be read."""

    path: Path
    half: str  # "private" or "public"
    name: str = ""
    key_id: str = ""
    problem: str = ""

    @property
    def is_test_key(self) -> bool:
        return self.key_id == TEST_KEY_ID


def _half(path: Path) -> str | None:
    if path.name.endswith(PUBLIC_SUFFIX):
        return "public"
    if path.name.endswith(PRIVATE_SUFFIX):
        return "private"
    return None


def find_keys(paths: list[Path]) -> list[KeyFile]:
    """Every ``*.ed25519`` / ``*.ed25519.pub`` file in the folders (not recursive) or named
    directly, read; a file that is not a valid key is listed with its problem."""
    candidates: list[Path] = []
    for path in paths:
        if path.is_dir():
            candidates.extend(sorted(p for p in path.iterdir() if p.is_file() and _half(p)))
        elif path.exists():
            candidates.append(path)
        else:
            raise ConfigError(f"{path}: no such key file or folder")
    found: list[KeyFile] = []
    for path in candidates:
        half = _half(path) or "public"  # a file named directly: try it as a public key
        try:
            if half == "private":
                key = load_signing_key(path)
                found.append(KeyFile(path, half, key.name, key.key_id))
            else:
                public = load_public_key(path)
                found.append(KeyFile(path, half, public.name, public.key_id))
        except OnboardError as error:
            found.append(KeyFile(path, half, problem=str(error)))
    return found


def list_keys(paths: list[Path]) -> int:
    """Print one line per key file; 1 when a file is not a valid key, or a private and a public
    half of the same name are not one pair."""
    keys = find_keys(paths)
    if not keys:
        print(f"no key files (*{PRIVATE_SUFFIX}, *{PUBLIC_SUFFIX}) in "
              f"{', '.join(str(p) for p in paths)}")
        return 0
    bad = 0
    ids: dict[tuple[Path, str], set[str]] = {}
    for key in keys:
        if key.problem:
            bad += 1
            print(f"{key.path}: {key.half:<7}  NOT A VALID KEY: {key.problem}")
            continue
        ids.setdefault((key.path.parent, key.name), set()).add(key.key_id)
        note = "  TEST KEY (its private half is public: tests only)" if key.is_test_key else ""
        print(f"{key.name:<24} {key.key_id}  {key.half:<7}  {key.path}{note}")
    for (folder, name), found in sorted(ids.items()):
        if len(found) > 1:
            bad += 1
            print(f"{folder / name}: the private and public halves are different keys "
                  f"({', '.join(sorted(found))})")
    return 1 if bad else 0
