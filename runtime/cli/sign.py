"""``onboard sign``: sign bundles on the ground, make key pairs, and show who signed a bundle.

    onboard sign BUNDLE... --key KEY.ed25519 [--out SIGNED.onboard]
    onboard sign --new-key NAME [--dir keys/]      (the same as onboard keys new)
    onboard sign --check BUNDLE... [--trust KEY.ed25519.pub ...]

Signing keeps the manifest and every member byte for byte and adds (or replaces) the bundle's
signature; a board whose ``[signatures]`` section trusts the key's public half then loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onboard.runtime.bundle import Bundle
from onboard.runtime.bundle.signature import (
    Keyring,
    TrustPolicy,
    load_signing_key,
    read_signature,
    sign_bundle,
    verify_bundle,
)
from onboard.runtime.cli.keys import new_key
from onboard.runtime.errors import ConfigError


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", type=Path, nargs="*", help="bundles (.onboard) to sign or "
                        "check")
    parser.add_argument("--key", type=Path, help="the private key to sign with (NAME.ed25519)")
    parser.add_argument("--out", type=Path, help="write the signed bundle here instead of in "
                        "place (one bundle only)")
    parser.add_argument("--new-key", metavar="NAME", help="make an Ed25519 key pair NAME.ed25519 "
                        "(private) and NAME.ed25519.pub (public)")
    parser.add_argument("--dir", type=Path, default=Path("."), help="folder for --new-key "
                        "(default: the current one)")
    parser.add_argument("--check", action="store_true", help="show who signed each bundle; "
                        "with --trust, verify against those public keys")
    parser.add_argument("--trust", type=Path, action="append", default=[],
                        help="a trusted public key file or folder of them (repeatable)")


def run(args: argparse.Namespace) -> int:
    if args.new_key:
        return _new_key(args)
    if not args.bundles:
        raise ConfigError("name the bundles to sign or check (or --new-key NAME)")
    if args.check:
        return _check(args)
    if args.key is None:
        raise ConfigError("--key KEY.ed25519 is needed to sign (or --check to verify)")
    if args.out is not None and len(args.bundles) != 1:
        raise ConfigError(f"--out takes one bundle, got {len(args.bundles)}")
    key = load_signing_key(args.key)
    for bundle in args.bundles:
        written = sign_bundle(bundle, key, args.out)
        print(f"{written}: signed by {key.name} ({key.key_id})")
    return 0


def _new_key(args: argparse.Namespace) -> int:
    if args.bundles or args.key or args.check:
        raise ConfigError("--new-key makes a key pair; it takes no bundle, --key or --check")
    new_key(args.new_key, args.dir)  # the same as `onboard keys new`
    return 0


def _check(args: argparse.Namespace) -> int:
    policy = TrustPolicy(Keyring.load(args.trust)) if args.trust else None
    for path in args.bundles:
        bundle = Bundle.open(path)
        signature = read_signature(bundle)
        if policy is not None:
            verdict = verify_bundle(bundle, policy)
            print(f"{path}: {verdict.status} by {verdict.key_name} ({verdict.key_id})")
        elif signature is None:
            print(f"{path}: unsigned")
        else:
            print(f"{path}: signed by {signature.key_name} ({signature.key_id}), not verified "
                  "(no --trust key given)")
    return 0
