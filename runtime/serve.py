"""``onboard serve``: the flight pipeline behind a TCP frame link, for hardware-in-loop benches.

A bench host plays the instrument: it streams frames (``runtime/sources/tcp.py``, specified in
``docs/hil.md``) and the board scores each one as an acquisition through the very
:class:`~onboard.runtime.pipeline.Pipeline` that ``onboard run`` builds from the same config,
then streams back the tile decisions and the pipeline's telemetry as JSON lines.

Threads: one accept loop; per connection a reader (frames in) and a writer (replies out); one
scorer that owns the pipeline and scores frames one at a time in arrival order. Nothing a client
does can stall the others or grow memory without bound:

* a frame is checked (preamble, header, size, bands, radiometric offset) before its buffer is
  allocated; framing errors close that connection, header errors skip the frame's bytes;
* each connection has at most ``queue_frames`` frames received and waiting; past that a frame
  is dropped unread (``policy = "drop"``, what an instrument that cannot wait sees) or the
  reader stops reading until one is scored (``"block"``: TCP backpressure defers the sender);
* replies wait in a buffer of ``reply_buffer_bytes``; telemetry lines are dropped (counted)
  when it is full, and a client that leaves even its results unread is cut off;
* a message that started must arrive whole within ``message_timeout_s``.

So the server holds at most ``max_clients × (queue_frames + 1)`` frames of at most
``max_frame_bytes`` and, per client, ``reply_buffer_bytes`` of replies plus the one result line
that may overfill it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from onboard.runtime.bands import common_name
from onboard.runtime.config import Config, load_config
from onboard.runtime.errors import ConfigError, OnboardError, ProtocolError
from onboard.runtime.pipeline import Acquisition, Pipeline, TelemetryConfig
from onboard.runtime.sources.tcp import (
    KIND_END,
    VERSION,
    FrameHeader,
    Limits,
    ReceivedFrame,
    read_payload,
    read_prefix,
    skip_payload,
)
from onboard.runtime.telemetry import Telemetry

_POLL_S = 0.25  # how often blocked threads look up to see whether to stop


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see FrameServer.address)
    max_frame_bytes: int = 256 * 2**20
    queue_frames: int = 2  # per connection: frames received and waiting to be scored
    policy: Literal["drop", "block"] = "drop"
    max_clients: int = 4
    reply_buffer_bytes: int = 8 * 2**20
    send_timeout_s: float = 10.0  # a reply that cannot be sent for this long cuts the client off
    message_timeout_s: float = 30.0  # a message, once begun, must arrive whole within this
    max_frames: int | None = None  # stop after this many frames were answered (bounded sessions)
    socket_send_buffer: int | None = None  # SO_SNDBUF of accepted sockets (tests shrink it)

    def __post_init__(self) -> None:
        if self.policy not in ("drop", "block"):
            raise ConfigError(f"serve policy must be 'drop' or 'block', got {self.policy!r}")
        for name in ("max_frame_bytes", "queue_frames", "max_clients", "reply_buffer_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve {name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")

    @property
    def memory_bound_bytes(self) -> int:
        """The most the server holds in frames and replies at once, taking a result line to be
        no larger than the reply buffer (replies: the buffer plus one line that overfills it)."""
        return self.max_clients * ((self.queue_frames + 1) * self.max_frame_bytes
                                   + 2 * self.reply_buffer_bytes)


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()


class _Connection:
    """One client: its socket, its bounded reply buffer and its count of waiting frames."""

    def __init__(self, server: FrameServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.closed = threading.Event()
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._lock = threading.Condition()
        self._finishing = False  # no more frames: close once every reply is out
        self._end_sent = False
        self._fatal = False  # an error line is the last thing to send
        self._linger = False  # then read what the client still sends for a moment, and close
        self.pending = 0  # frames received and not yet answered
        self.counts = {"frames": 0, "scored": 0, "dropped": 0, "errors": 0,
                       "telemetry_dropped": 0}

    # -- replies ----------------------------------------------------------------------------

    def send(self, record: dict[str, Any]) -> None:
        self.send_line(_line(record), droppable=False)

    def send_line(self, line: bytes, droppable: bool) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            limit = self.server.options.reply_buffer_bytes
            # A reply always fits while the buffer is under its limit (a result of many tiles
            # may be larger than the limit itself); telemetry only where it fits whole.
            if (self._out_bytes + len(line) > limit) if droppable else (self._out_bytes > limit):
                if droppable:
                    self.counts["telemetry_dropped"] += 1
                    return
                overflow = True
            else:
                overflow = False
                self._out.append(line)
                self._out_bytes += len(line)
                self._lock.notify_all()
        if overflow:
            self.server._count("slow_readers")
            self.fail(ProtocolError(self.peer, f"slow reader: more than "
                                               f"{self.server.options.reply_buffer_bytes} bytes "
                                               f"of replies left unread; disconnected",
                                    fatal=True), "slow_reader")

    def writer(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._out and not self.closed.is_set() and not self._fatal \
                            and not (self._finishing and self.pending == 0):
                        self._lock.wait(_POLL_S)
                    if self.closed.is_set():
                        return
                    if not self._out and self._fatal:
                        break
                    if not self._out and not self._end_sent:
                        # Every frame answered: the last line says what became of them all.
                        self._end_sent = True
                        self._out.append(_line({"type": "end", **self.counts}))
                    if not self._out:
                        break
                    line = self._out.popleft()
                    self._out_bytes -= len(line)
                self._send_all(line)
            with contextlib.suppress(OSError):  # the client may be gone already
                self.sock.shutdown(socket.SHUT_WR)
                if self._linger:
                    self._drain()
        except OSError as error:
            if isinstance(error, TimeoutError) and not self._fatal:
                self.server._count("slow_readers")
            self.server.log("client_error", peer=self.peer, error=type(error).__name__,
                            message=str(error.strerror or error))
        finally:
            self.close()

    def _send_all(self, line: bytes) -> None:
        view = memoryview(line)
        deadline = time.monotonic() + self.server.options.send_timeout_s
        while view:
            if self.closed.is_set():
                return
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"slow reader: a reply could not be sent within "
                                       f"{self.server.options.send_timeout_s:g} s") from None
                continue
            view = view[sent:]

    def _drain(self) -> None:
        """After a fatal error: read and discard what the client is still sending (bounded in
        time and bytes), so closing does not reset the connection before it reads the error."""
        scratch = bytearray(65536)
        deadline, left = time.monotonic() + 1.0, 64 * 2**20
        while left > 0 and time.monotonic() < deadline:
            try:
                n = self.sock.recv_into(scratch)
            except TimeoutError:
                continue
            if n == 0:
                return
            left -= n

    def finish(self) -> None:
        with self._lock:
            self._finishing = True
            self._lock.notify_all()

    def frame_done(self) -> None:
        with self._lock:
            self.pending -= 1
            self._lock.notify_all()

    def wait_for_room(self) -> bool:
        """Block policy: wait until a queue slot frees; False if the connection closed."""
        with self._lock:
            while self.pending >= self.server.options.queue_frames:
                if self.closed.is_set() or self.server.stopping.is_set():
                    return False
                self._lock.wait(_POLL_S)
            return True

    # -- ending -----------------------------------------------------------------------------

    def fail(self, error: OnboardError, event: str, linger: bool = False) -> None:
        """Report ``error`` in the server log and, in place of any reply still waiting, to the
        client; the writer then closes (``linger``: after reading what the client still sends,
        which only the reader's own thread may ask for, once it has stopped reading)."""
        self.server.log(event, peer=self.peer, error=type(error).__name__, message=str(error))
        with self._lock:
            if self.closed.is_set():
                return
            self._out.clear()
            line = _line({"type": "error", "error": type(error).__name__,
                          "message": str(error), "fatal": True})
            self._out.append(line)
            self._out_bytes = len(line)
            self._fatal = True
            self._linger = linger
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            self._out.clear()
            self._out_bytes = 0
            self._lock.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@dataclass
class _Job:
    connection: _Connection
    header: FrameHeader
    pixels: np.ndarray
    received: float  # time.time() when the last byte arrived


class _TelemetryRouter:
    """The pipeline's telemetry sink: each line goes to the client whose frame is being scored
    (and to the server's own log, if any)."""

    def __init__(self) -> None:
        self.connection: _Connection | None = None
        self.log: Telemetry | None = None

    def write(self, line: str) -> int:
        connection = self.connection
        if connection is not None:
            connection.send_line(('{"type":"telemetry","record":' + line.rstrip("\n")
                                  + "}\n").encode(), droppable=True)
        return len(line)

    def flush(self) -> None:
        pass


class FrameServer:
    """Scores frames received over TCP with the pipeline a runtime config describes.

    ``serve_forever`` runs until :meth:`shutdown` (or ``max_frames`` answers); :meth:`start`
    runs it on a thread."""

    def __init__(self, config: Config, state_dir: Path, options: ServeOptions | None = None,
                 log: Telemetry | None = None) -> None:
        self.options = options or ServeOptions()
        self.limits = Limits(max_frame_bytes=self.options.max_frame_bytes)
        self.config = config
        self._log = log
        self._router = _TelemetryRouter()
        tconf: TelemetryConfig = config.section("telemetry")
        self.telemetry = Telemetry(self._router, tconf.budget_bytes, keep=False)
        self.pipeline = Pipeline(config, self.telemetry, state_dir)
        self.stopping = threading.Event()
        self._jobs: deque[_Job] = deque()
        self._jobs_ready = threading.Condition()
        self._connections: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.stats = {"clients": 0, "refused_clients": 0, "frames": 0, "scored": 0,
                      "dropped": 0, "frame_errors": 0, "protocol_errors": 0, "slow_readers": 0,
                      "disconnects": 0, "buffered_bytes": 0, "peak_buffered_bytes": 0}
        self._answered = 0
        try:
            self._listener = socket.create_server((self.options.host, self.options.port))
        except OSError as error:
            self.pipeline.close()
            raise ConfigError(f"cannot listen on {self.options.host}:{self.options.port}: "
                              f"{error.strerror or error}") from error
        self._listener.settimeout(_POLL_S)
        self._serving: threading.Thread | None = None
        text = config.path.read_bytes() if config.path else b""
        self.hello = {"type": "hello", "protocol": VERSION,
                      "max_frame_bytes": self.options.max_frame_bytes,
                      "max_header_bytes": self.limits.max_header_bytes,
                      "queue_frames": self.options.queue_frames, "policy": self.options.policy,
                      "bands": list(self.pipeline.bands),
                      "radiometric_offset": self.pipeline.source.radiometric_offset,
                      "tiling": {"tile": self.pipeline.tiling.tile,
                                 "halo": self.pipeline.tiling.halo},
                      "stages": [s.describe() for s in self.pipeline.stages],
                      "config": str(config.path) if config.path else None,
                      "config_sha256": hashlib.sha256(text).hexdigest() if text else None}

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def log(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log.emit(event, **fields)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n
            if key == "buffered_bytes":
                self.stats["peak_buffered_bytes"] = max(self.stats["peak_buffered_bytes"],
                                                        self.stats["buffered_bytes"])

    # -- running ----------------------------------------------------------------------------

    def start(self) -> FrameServer:
        self._serving = threading.Thread(target=self.serve_forever, name="onboard-serve",
                                         daemon=True)
        self._serving.start()
        return self

    def serve_forever(self) -> None:
        scorer = threading.Thread(target=self._score_loop, name="onboard-serve-scorer",
                                  daemon=True)
        scorer.start()
        self.log("serve_start", host=self.address[0], port=self.address[1],
                 options=self.options.__dict__)
        try:
            while not self.stopping.is_set():
                try:
                    sock, address = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self.stopping.is_set():
                        break
                    raise
                self._accept(sock, f"{address[0]}:{address[1]}")
        finally:
            self.stopping.set()
            with self._jobs_ready:
                self._jobs_ready.notify_all()
            scorer.join()
            self._close_all()

    def _accept(self, sock: socket.socket, peer: str) -> None:
        sock.settimeout(_POLL_S)
        if self.options.socket_send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.options.socket_send_buffer)
        connection = _Connection(self, sock, peer)
        with self._lock:
            live = sum(1 for c in self._connections if not c.closed.is_set())
            busy = live >= self.options.max_clients
            if not busy:
                self._connections = {c for c in self._connections if not c.closed.is_set()}
                self._connections.add(connection)
        if busy:
            self._count("refused_clients")
            error = ProtocolError(peer, f"busy: {self.options.max_clients} clients already "
                                        f"connected", fatal=True)
            self.log("client_refused", peer=peer, message=str(error))
            try:
                sock.sendall(_line({"type": "error", "error": type(error).__name__,
                                    "message": str(error), "fatal": True}))
            except OSError:
                pass
            connection.close()
            return
        self._count("clients")
        self.log("client_connected", peer=peer)
        connection.send(self.hello)
        for target, name in ((self._read_loop, "reader"), (connection.writer, "writer")):
            thread = threading.Thread(target=target, args=(connection,) if name == "reader"
                                      else (), name=f"onboard-serve-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._threads = [t for t in self._threads if t.is_alive()]

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, close every connection and the pipeline."""
        self.stopping.set()
        if self._serving is not None:
            self._serving.join(timeout_s)
        else:
            self._close_all()

    def _close_all(self) -> None:
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            connections = list(self._connections)
        # Let each writer send what is already answered (bounded), then close whatever is left.
        for connection in connections:
            connection.finish()
        deadline = time.monotonic() + 5.0
        for connection in connections:
            connection.closed.wait(max(0.0, deadline - time.monotonic()))
            connection.close()
        for thread in self._threads:
            thread.join(2.0)
        self.pipeline.close()
        self.telemetry.close()

    def __enter__(self) -> FrameServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- a connection's frames in -------------------------------------------------------------

    def _read_loop(self, connection: _Connection) -> None:
        peer, sock, timeout = connection.peer, connection.sock, self.options.message_timeout_s

        def waiting() -> bool:
            return not (self.stopping.is_set() or connection.closed.is_set())

        try:
            while waiting():
                if self.options.policy == "block" and not connection.wait_for_room():
                    break
                prefix = read_prefix(sock, self.limits, peer, timeout, waiting)
                if prefix is None or prefix.kind == KIND_END:
                    # "end", or the client closed its sending side (it may still read): the
                    # writer closes once every frame received is answered.
                    self.log("client_end", peer=peer, how="end message" if prefix else "eof")
                    break
                connection.counts["frames"] += 1
                self._count("frames")
                try:
                    header = FrameHeader.parse(prefix.header, prefix.payload_len, peer)
                    self._check(header, peer)
                except ProtocolError as error:
                    # The framing is intact: skip this frame's bytes and carry on.
                    skip_payload(sock, prefix.payload_len, peer, timeout)
                    self._frame_error(connection, error, _header_id(prefix.header))
                    continue
                if connection.pending >= self.options.queue_frames:
                    skip_payload(sock, prefix.payload_len, peer, timeout)
                    connection.counts["dropped"] += 1
                    self._count("dropped")
                    connection.send({"type": "dropped", "id": header.id,
                                     "reason": f"{connection.pending} frames already waiting "
                                               f"(queue_frames {self.options.queue_frames})",
                                     "received": time.time(), "extra": header.extra})
                    self._answer()
                    continue
                self._count("buffered_bytes", header.payload_bytes)
                try:
                    pixels = read_payload(sock, header, peer, timeout)
                except BaseException:
                    self._count("buffered_bytes", -header.payload_bytes)
                    raise
                with connection._lock:
                    connection.pending += 1
                connection.send({"type": "received", "id": header.id, "received": time.time(),
                                 "waiting": connection.pending, "extra": header.extra})
                with self._jobs_ready:
                    self._jobs.append(_Job(connection, header, pixels, time.time()))
                    self._jobs_ready.notify()
        except ProtocolError as error:
            if "disconnected" in error.problem:
                self._count("disconnects")
            else:
                self._count("protocol_errors")
            connection.fail(error, "protocol_error", linger=True)
            return
        except OSError as error:
            self._count("disconnects")
            connection.fail(ProtocolError(peer, f"connection failed: {error.strerror or error}",
                                          fatal=True), "protocol_error", linger=True)
            return
        connection.finish()

    def _check(self, header: FrameHeader, peer: str) -> None:
        """Refuse a frame the stages cannot score as sent, naming what is wrong."""
        have = {b.upper() for b in header.bands}
        have |= {str(common_name(b)).lower() for b in header.bands}
        missing = [b for b in self.pipeline.bands if b.upper() not in have and b.lower()
                   not in have]
        if missing:
            raise ProtocolError(peer, f"frame {header.id}: lacks the bands {missing} the stages "
                                      f"read (it has {list(header.bands)})")
        expected = self.pipeline.source.radiometric_offset
        if header.radiometric_offset != expected:
            raise ProtocolError(peer, f"frame {header.id}: radiometric offset "
                                      f"{header.radiometric_offset:g} DN, but this pipeline is "
                                      f"configured for {expected:g} DN; refusing to guess")

    def _frame_error(self, connection: _Connection, error: OnboardError,
                     ident: str | None) -> None:
        connection.counts["errors"] += 1
        self._count("frame_errors")
        self.log("frame_error", peer=connection.peer, id=ident, error=type(error).__name__,
                 message=str(error))
        connection.send({"type": "error", "id": ident, "error": type(error).__name__,
                         "message": str(error), "fatal": False})
        self._answer()

    def _answer(self) -> None:
        """Count one frame answered; stop once ``max_frames`` were."""
        with self._lock:
            self._answered += 1
            done = self.options.max_frames is not None and \
                self._answered >= self.options.max_frames
        if done:
            self.stopping.set()

    # -- scoring --------------------------------------------------------------------------------

    def _score_loop(self) -> None:
        while True:
            with self._jobs_ready:
                while not self._jobs:
                    if self.stopping.is_set():
                        return
                    self._jobs_ready.wait(_POLL_S)
                job = self._jobs.popleft()
            try:
                self._score(job)
            finally:
                self._count("buffered_bytes", -job.header.payload_bytes)
                job.connection.frame_done()

    def _score(self, job: _Job) -> None:
        connection, header = job.connection, job.header
        if connection.closed.is_set():
            self.log("frame_abandoned", peer=connection.peer, id=header.id)
            return
        started = time.time()
        self._router.connection = connection
        self.telemetry.new_pass()  # the telemetry budget is per frame
        try:
            scene = ReceivedFrame(header, job.pixels, f"tcp:{connection.peer}/{header.id}")
            result = self.pipeline.score(Acquisition(header.id, header.place, scene,
                                                     header.acquired))
        except OnboardError as error:
            self._frame_error(connection, error, header.id)
            return
        except Exception as error:  # the server keeps serving whatever one frame did
            self._frame_error(connection, ProtocolError(
                connection.peer, f"frame {header.id}: scoring failed: "
                                 f"{type(error).__name__}: {error}"), header.id)
            return
        finally:
            self._router.connection = None
        connection.counts["scored"] += 1
        self._count("scored")
        finished = time.time()
        connection.send({"type": "result", "id": header.id, "place": header.place,
                         "shape": list(result.shape), "mpx": result.input_mpx,
                         "tiles": [s.to_dict() for s in result.scores],
                         "decisions": result.counts(),
                         "dropped_by_backpressure": result.dropped_by_backpressure,
                         "timings_s": {k: round(v, 6) for k, v in result.timings_s.items()},
                         "received": job.received, "started": started, "finished": finished,
                         "waited_s": started - job.received, "scored_s": finished - started,
                         "extra": header.extra})
        self._answer()


def _header_id(data: bytes) -> str | None:
    try:
        ident = json.loads(data).get("id")
    except (ValueError, AttributeError):
        return None
    return ident if isinstance(ident, str) and len(ident) <= 128 else None


def serve(config_path: str | Path, state_dir: Path, options: ServeOptions,
          log: Telemetry | None = None, ready: Any = None) -> dict[str, Any]:
    """``onboard serve``: build the pipeline from the config and serve until interrupted (or
    ``max_frames``); ``ready(host, port)`` is called once listening. Returns the server's
    counts."""
    server = FrameServer(load_config(config_path), state_dir, options, log)
    if ready is not None:
        ready(*server.address)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stopping.set()
        server._close_all()
    return dict(server.stats)
