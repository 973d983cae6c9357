"""Uplink: staging of chunks, verification and self-test, the atomic switch, rollback.

:mod:`.chunks` is the chunk format and the ground's splitter, :mod:`.staging` assembles chunks
across restarts, :mod:`.verify` checks bundles (checksums, signature, runtime version, engines,
self-test) and configs, :mod:`.health` judges a pass from what it wrote, and :mod:`.active`
switches the active set at pass boundaries and rolls it back. See ``docs/uplink.md``.

The hook for ``onboard run``: ``config = active_config(state_dir, out)`` before the pass and
``pass_finished(state_dir, out, error)`` after it.
"""

from onboard.runtime.uplink.active import Uplink, active_config, pass_finished
from onboard.runtime.uplink.chunks import Chunk, Refusal, parse_chunk, split_file
from onboard.runtime.uplink.health import HealthPolicy, PassHealth, judge_pass
from onboard.runtime.uplink.staging import Outcome, Staging, UploadStatus

__all__ = ["Chunk", "HealthPolicy", "Outcome", "PassHealth", "Refusal", "Staging",
           "UploadStatus", "Uplink", "active_config", "judge_pass", "parse_chunk",
           "pass_finished", "split_file"]
