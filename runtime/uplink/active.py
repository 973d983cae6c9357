"""The active set: what ``onboard run`` uses, switched atomically at pass boundaries only, with
automatic rollback when a new set fails its first passes.

A *set* is a config and the bundles it names. An uplinked set is copied into its own folder
``STATE/uplink/sets/<id>/`` (the config and the uplinked bundles it names by relative path) and
never changed after; the *golden* set is the board's factory config, in place. ``active.json``
(written through :func:`~onboard.runtime.durability.write_json`: the switch is one rename) names
the golden, active, previous and pending sets and the pass now running.

- ``activate(config)``: verify the config and every bundle it names (see :mod:`.verify`), build
  the set folder, and make it *pending*. Nothing switches yet.
- :func:`active_config` (a pass boundary: called before a pass) first judges a pass that began
  and never finished (a crash or a kill), then promotes the pending set, records the pass as
  running, and returns the config to run. A pass already running keeps what it loaded.
- :func:`pass_finished` (after the pass) judges the pass from its output (:mod:`.health`). A set
  on probation that fails is rolled back at the next boundary: to the previous set, or, when
  there is none or it failed too, to the golden set. A golden set that fails is reported and
  kept: there is nothing safer to go to.
- ``rollback(to)``: the same switch by command, also at the next boundary.

Each switch and its reason goes to telemetry (``STATE/uplink/telemetry.jsonl``, and the pass's
own telemetry when its output folder is known): the set id, its config and its bundles as
``name@version`` and SHA-256, which is how the STAC Items name the bundles that scored a product.

Disk: set folders other than the active, previous and pending ones are deleted at each switch;
see :mod:`.staging` for the staged chunks and received files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onboard.runtime.durability import atomic_path, write_json
from onboard.runtime.errors import ConfigError, OnboardError, StorageError
from onboard.runtime.telemetry import Telemetry
from onboard.runtime.uplink.health import HealthPolicy, PassHealth, judge_pass
from onboard.runtime.uplink.staging import Staging

UPLINK = "uplink"
STATE_FILE = "active.json"
SETTINGS_FILE = "settings.json"


def _now() -> float:
    return round(time.time(), 3)


class Uplink:
    """The uplink state of one board, under ``state_dir/uplink``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.folder = self.state_dir / UPLINK
        settings = self.folder / SETTINGS_FILE
        if not settings.is_file():
            raise ConfigError(f"{self.folder}: no uplink state here; run `onboard uplink init "
                              f"--state {self.state_dir} --golden CONFIG` once on the board")
        self.settings: dict[str, Any] = _read_json(settings)
        self.policy = HealthPolicy(**self.settings["health"])
        self.staging = Staging(self.folder, self.settings["staging_budget_bytes"],
                               self.settings["received_budget_bytes"])

    # -- set up ----------------------------------------------------------------------------------

    @classmethod
    def init(cls, state_dir: str | Path, golden: str | Path,
             trusted_keys: list[Path] | None = None, policy: HealthPolicy | None = None,
             staging_budget_bytes: int = 256 * 2**20,
             received_budget_bytes: int = 512 * 2**20) -> Uplink:
        """Set up the uplink state with ``golden`` (the factory config) active. The board trusts
        ``trusted_keys``, by default the keys the golden config's ``[signatures]`` names."""
        from onboard.runtime.uplink.verify import verify_config

        state_dir = Path(state_dir)
        folder = state_dir / UPLINK
        golden = Path(golden).resolve()
        if trusted_keys is None:
            trusted_keys = list(_golden_keys(golden))
        trusted = [str(Path(p).resolve()) for p in trusted_keys]
        trust = _trust(trusted)
        check = verify_config(golden, trust)  # the board's own bundles: no self-test asked
        settings = {"golden": str(golden), "trusted_keys": trusted,
                    "health": (policy or HealthPolicy()).to_dict(),
                    "staging_budget_bytes": staging_budget_bytes,
                    "received_budget_bytes": received_budget_bytes}
        write_json(folder / SETTINGS_FILE, settings)
        uplink = cls(state_dir)
        with uplink._locked():
            if not (folder / STATE_FILE).is_file():
                record = _set_record("golden", golden, None, check, "golden", 0)
                uplink._save({"golden": record, "active": record, "previous": None,
                              "pending": None, "running": None, "next_set": 1, "failed": []})
                uplink._emit(None, "uplink_init", golden=record,
                             trusted_keys=[str(p) for p in trusted])
        return uplink

    @property
    def trust(self) -> Any:
        return _trust(self.settings["trusted_keys"])

    # -- state -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time: a receive, an activation and a pass boundary may race."""
        path = self.folder / "lock"
        try:
            handle = open(path, "a+")
        except OSError as error:
            raise StorageError(path, f"cannot open the lock: {error.strerror or error}") from error
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def state(self) -> dict[str, Any]:
        return _read_json(self.folder / STATE_FILE)

    def _save(self, state: dict[str, Any]) -> None:
        write_json(self.folder / STATE_FILE, state)

    def _emit(self, out: Path | None, event: str, /, **fields: Any) -> dict[str, Any]:
        sinks = [self.folder / "telemetry.jsonl"]
        if out is not None:
            sinks.append(Path(out) / "telemetry.jsonl")
        record: dict[str, Any] = {}
        for sink in sinks:
            telemetry = Telemetry(sink)
            try:
                record = telemetry.emit(event, **fields)
                telemetry.sync()
            finally:
                telemetry.close()
        return record

    # -- receiving and verifying -----------------------------------------------------------------

    def receive(self, paths: list[Path]) -> list[dict[str, Any]]:
        """Stage chunk files (or every ``*.chunk`` in folders); each outcome as a dict."""
        files: list[Path] = []
        for path in paths:
            files.extend(sorted(Path(path).glob("*.chunk")) if Path(path).is_dir() else [path])
        outcomes = []
        with self._locked():
            for path in files:
                outcome = self.staging.receive_file(path)
                outcomes.append(outcome.to_dict())
                if outcome.status == "assembled":
                    self._emit(None, "uplink_received", upload=outcome.upload,
                               file=str(outcome.assembled))
        return outcomes

    def verify(self, name: str) -> dict[str, Any]:
        """Verify a received bundle (every check) or config (and the bundles it names)."""
        from onboard.runtime.uplink.verify import verify_bundle

        path = self.staging.path_of(name)
        if name.endswith(".toml"):
            folder = self._build_set_folder(path, self.folder / "sets" / ".verify")
            try:
                return self._verify_set(folder / path.name, folder).to_dict()
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return verify_bundle(path, self.trust).to_dict()

    def _verify_set(self, config: Path, folder: Path) -> Any:
        from onboard.runtime.uplink.verify import verify_config

        return verify_config(config, self.trust, uplinked=[folder])

    def _build_set_folder(self, config: Path, folder: Path) -> Path:
        """Copy ``config`` and the received bundles it names (relative paths) into ``folder``."""
        from onboard.runtime import pipeline  # noqa: F401 - registers the sections
        from onboard.runtime.config import load_config
        from onboard.runtime.uplink.verify import engine_configs

        shutil.rmtree(folder, ignore_errors=True)
        loaded = load_config(config)
        wanted: list[Path] = []
        for where, engine in engine_configs(loaded):
            for role in ("bundle", "golden"):
                path = getattr(engine, role)
                if path is None or Path(path).resolve().parent != config.parent.resolve():
                    continue  # an absolute path: a bundle already on board
                if not Path(path).is_file():
                    received = [r["name"] for r in self.staging.assembled()]
                    raise ConfigError(f"{config.name}: {where}.{role} names {Path(path).name}, "
                                      f"which has not been received (received: "
                                      f"{received or 'none'}); uplink it first")
                wanted.append(Path(path))
        for source in [config, *wanted]:
            with atomic_path(folder / source.name) as tmp:
                shutil.copyfile(source, tmp)
        return folder

    # -- switching -------------------------------------------------------------------------------

    def activate(self, config_name: str, reason: str = "") -> dict[str, Any]:
        """Verify a received config and its bundles and make them the pending set (switched to
        at the next pass boundary). Refused: the error says why; the active set is untouched."""
        config = self.staging.path_of(config_name)
        with self._locked():
            state = self.state()
            set_id = f"set-{state['next_set']:04d}"
            folder = self.folder / "sets" / set_id
            try:
                self._build_set_folder(config, folder)
                check = self._verify_set(folder / config.name, folder)
            except OnboardError as error:
                shutil.rmtree(folder, ignore_errors=True)
                self._emit(None, "uplink_refused", config=config_name,
                           error=type(error).__name__, reason=str(error),
                           active=state["active"]["id"])
                raise
            record = _set_record(set_id, folder / config.name, folder, check, "probation",
                                 self.policy.probation_passes)
            superseded = state["pending"]
            state["next_set"] += 1
            state["pending"] = {"set": record, "kind": "activate",
                                "reason": reason or f"uplinked {config_name}",
                                "requested": _now()}
            self._save(state)
        self._emit(None, "uplink_pending", set=record, kind="activate",
                   reason=state["pending"]["reason"],
                   superseded=None if superseded is None else superseded["set"]["id"])
        return state["pending"]

    def rollback(self, to: str = "previous", reason: str = "") -> dict[str, Any]:
        """Switch back by command at the next pass boundary: to the previous set or golden."""
        if to not in ("previous", "golden"):
            raise ConfigError(f"rollback goes to 'previous' or 'golden', not {to!r}")
        with self._locked():
            state = self.state()
            target = state["previous"] if to == "previous" else state["golden"]
            if target is None:
                raise ConfigError(f"{self.folder}: there is no previous set to roll back to "
                                  "(use --to golden)")
            pending = self._schedule_rollback(state, target, f"commanded: {reason or to}")
            self._save(state)
        self._emit(None, "uplink_pending", set=pending["set"], kind="rollback",
                   reason=pending["reason"])
        return pending

    def _schedule_rollback(self, state: dict[str, Any], target: dict[str, Any],
                           reason: str) -> dict[str, Any]:
        target = dict(target)
        if target["id"] != "golden":
            target.update(status="probation", probation_left=self.policy.probation_passes)
        state["pending"] = {"set": target, "kind": "rollback", "reason": reason,
                            "requested": _now()}
        return state["pending"]

    def begin_pass(self, out: str | Path | None = None) -> Path:
        """The pass boundary: judge a pass that never finished, switch to the pending set,
        record the pass as running; returns the config the pass must run."""
        out = None if out is None else Path(out)
        events: list[tuple[str, dict[str, Any]]] = []
        with self._locked():
            state = self.state()
            running = state["running"]
            if running is not None:
                health = PassHealth(False, True, [
                    f"the pass that began at {running['started']} with {running['set']} never "
                    "finished: it crashed or was killed"])
                events += self._judged(state, health, running)
            pending = state["pending"]
            if pending is not None:
                before = state["active"]
                new = pending["set"]
                if pending["kind"] == "activate":
                    if before["status"] != "failed" and before["id"] != "golden":
                        state["previous"] = before
                else:
                    state["previous"] = None  # the set rolled away from is not a fallback
                state["active"] = new
                state["pending"] = None
                events.append(("uplink_switch", {
                    "from": before["id"], "to": new["id"], "kind": pending["kind"],
                    "reason": pending["reason"], "config": new["config"],
                    "bundles": new["bundles"]}))
                self._evict_sets(state)
            active = state["active"]
            state["running"] = {"set": active["id"], "started": _now(),
                                "out": None if out is None else str(out)}
            self._save(state)
        for event, fields in events:
            self._emit(out, event, **fields)
        self._emit(out, "uplink_active", set=active["id"], status=active["status"],
                   config=active["config"], bundles=active["bundles"])
        return Path(active["config"])

    def end_pass(self, out: str | Path, error: str | None = None) -> PassHealth:
        """Judge the pass that wrote ``out`` (``error``: what stopped it, if it raised); a set
        on probation that fails is rolled back at the next boundary."""
        out = Path(out)
        with self._locked():
            state = self.state()
            running = state["running"]
            if running is None:
                raise ConfigError(f"{self.folder}: no pass is running (pass_finished without "
                                  "active_config before it)")
            health = judge_pass(out, self.policy, error)
            events = self._judged(state, health, running)
            state["running"] = None
            self._save(state)
        for event, fields in events:
            self._emit(out, event, **fields)
        return health

    def _judged(self, state: dict[str, Any], health: PassHealth,
                running: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        active = state["active"]
        events: list[tuple[str, dict[str, Any]]] = [("uplink_pass", {
            "set": running["set"], "status": active["status"], "out": running.get("out"),
            "set_bundles": active["bundles"], **health.to_dict()})]
        if not health.judged:
            return events
        if health.healthy:
            if active["status"] == "probation":
                active["probation_left"] -= 1
                if active["probation_left"] <= 0:
                    active["status"] = "proven"
                    events.append(("uplink_proven", {"set": active["id"]}))
            return events
        if active["id"] == "golden":
            events.append(("uplink_golden_unhealthy", {"reasons": health.reasons}))
            return events
        if active["status"] != "probation":
            # A proven set that has a bad pass (a scene of nothing but sea glint) stays.
            events.append(("uplink_unhealthy_pass", {"set": active["id"],
                                                     "reasons": health.reasons}))
            return events
        active["status"] = "failed"
        state["failed"] = [*state.get("failed", []), active["id"]][-16:]
        previous = state["previous"]
        target = previous if previous is not None and previous["status"] != "failed" \
            and previous["id"] not in state["failed"] else state["golden"]
        reason = f"{active['id']} failed its probation: {'; '.join(health.reasons)}"
        if state["pending"] is not None:
            # A newer set or a commanded rollback is already on its way: it replaces the
            # failed set at the boundary, and the operator's reason stays the one recorded.
            events.append(("uplink_rollback_superseded", {
                "set": active["id"], "reason": reason,
                "pending": state["pending"]["set"]["id"]}))
            return events
        pending = self._schedule_rollback(state, target, reason)
        events.append(("uplink_rollback_scheduled", {"from": active["id"], "to": target["id"],
                                                     "reason": reason,
                                                     "kind": pending["kind"]}))
        return events

    def _evict_sets(self, state: dict[str, Any]) -> None:
        keep = {s["id"] for s in (state["active"], state["previous"],
                                  (state["pending"] or {}).get("set")) if s}
        sets = self.folder / "sets"
        if not sets.is_dir():
            return
        for folder in sets.iterdir():
            if folder.is_dir() and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = self.state()
        return {
            "state": str(self.folder),
            "uploads": [u.to_dict() for u in self.staging.uploads()],
            "unreadable_chunks": len(self.staging.unreadable_refusals()),
            "received": [{k: r[k] for k in ("name", "kind", "bytes", "sha256", "t")}
                         for r in self.staging.assembled()],
            "active": state["active"], "previous": state["previous"],
            "pending": state["pending"], "golden": state["golden"]["config"],
            "running": state["running"], "failed": state.get("failed", []),
            "staged_bytes": self.staging.staged_bytes(),
            "budgets": {"staging_bytes": self.settings["staging_budget_bytes"],
                        "received_bytes": self.settings["received_budget_bytes"]},
            "health": self.policy.to_dict(),
        }


def _set_record(set_id: str, config: Path, folder: Path | None, check: Any, status: str,
                probation: int) -> dict[str, Any]:
    return {"id": set_id, "config": str(config), "folder": None if folder is None else str(folder),
            "bundles": [{"bundle": b.bundle_id, "sha256": b.sha256, "path": str(b.path),
                         "signature": b.signature.get("signature"),
                         "key": b.signature.get("key_name")} for b in check.bundles],
            "created": _now(), "status": status, "probation_left": probation}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StorageError(path, "missing: the uplink state was not initialised") from None
    except (OSError, ValueError) as error:
        raise StorageError(path, f"cannot read the uplink state: {error}") from error


def _trust(paths: list[str]) -> Any:
    from onboard.runtime.bundle.signature import TrustPolicy

    if not paths:
        return None
    return TrustPolicy.trusting(*paths)


def _golden_keys(golden: Path) -> tuple[Path, ...]:
    from onboard.runtime import pipeline  # noqa: F401 - registers the sections
    from onboard.runtime.config import load_config

    section = load_config(golden).get("signatures")
    return () if section is None else tuple(section.trusted_keys)


# -- the hook for `onboard run` --------------------------------------------------------------------

def active_config(state_dir: str | Path, out: str | Path | None = None) -> Path:
    """At a pass boundary: the config the next pass runs (switching to a pending set first,
    and judging a pass that never finished). Call :func:`pass_finished` after the pass."""
    return Uplink(state_dir).begin_pass(out)


def pass_finished(state_dir: str | Path, out: str | Path,
                  error: BaseException | str | None = None) -> PassHealth:
    """After a pass that ran :func:`active_config`'s config into ``out``: judge it (a new set
    that fails its first passes is rolled back at the next boundary)."""
    message = None if error is None else (error if isinstance(error, str)
                                          else f"{type(error).__name__}: {error}")
    return Uplink(state_dir).end_pass(out, message)


__all__ = ["HealthPolicy", "PassHealth", "Uplink", "active_config", "pass_finished"]
