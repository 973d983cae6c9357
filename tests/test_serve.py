"""``onboard serve``: the TCP frame protocol and the server, over loopback only.

Every test talks to a real server (the sample config's INT8 cloud stage) on 127.0.0.1 through
real sockets; every wait has a timeout, so nothing here can hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

import onboard.runtime.stages  # noqa: F401 - registers the stage sections
from onboard.runtime.config import load_config
from onboard.runtime.errors import ProtocolError
from onboard.runtime.pipeline import SAMPLE_CONFIG, Acquisition, Pipeline
from onboard.runtime.serve import FrameServer, ServeOptions
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.sources.tcp import (
    MAGIC,
    PREAMBLE,
    VERSION,
    FrameHeader,
    Limits,
    ReceivedFrame,
    end_message,
    frame_message,
    header_for,
    iter_replies,
    read_payload,
    read_prefix,
    send_frame,
)
from onboard.runtime.telemetry import Telemetry
from onboard.runtime.windows import Window

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def config():
    return load_config(SAMPLE_CONFIG)


@pytest.fixture(scope="module")
def dates(sample_pass):
    """Both dates of the real sample, date 2 on date 1's grid, all 13 bands."""
    first = OscdScene(sample_pass / "imgs_1")
    second = OscdScene(sample_pass / "imgs_2", grid=first.grid)
    return [first, second]


def whole(scene):
    return scene.read(Window(0, 0, scene.height, scene.width))


@contextlib.contextmanager
def serving(config, **options) -> Iterator[FrameServer]:
    with tempfile.TemporaryDirectory() as tmp:
        server = FrameServer(config, Path(tmp) / "state", ServeOptions(port=0, **options),
                             log=Telemetry(keep=True)).start()
        try:
            yield server
        finally:
            server.shutdown()


class Client:
    def __init__(self, server: FrameServer, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(server.address)
        self.replies = iter_replies(self.sock)

    def next(self, kind: str | None = None) -> dict:
        """The next reply (of ``kind``, skipping telemetry)."""
        for reply in self.replies:
            if reply["type"] == "telemetry":
                continue
            if kind is None or reply["type"] == kind:
                return reply
        raise AssertionError(f"connection closed before a {kind or 'reply'}")

    def all(self) -> list[dict]:
        return list(self.replies)

    def close(self) -> None:
        self.sock.close()


def wait_for(predicate, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def good_frame_answered(server: FrameServer, dates) -> None:
    """The server still serves: a new client's frame is scored."""
    client = Client(server)
    frame = whole(dates[0])
    send_frame(client.sock, header_for(frame, "still-serving"), frame.pixels)
    client.sock.sendall(end_message())
    result = client.next("result")
    assert result["id"] == "still-serving" and len(result["tiles"]) == 64
    assert client.next("end")["scored"] == 1
    client.close()


# -- the protocol ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "float32", "int16"])
def test_protocol_round_trip(dates, dtype):
    frame = whole(dates[0])
    pixels = frame.pixels.astype(dtype)
    header = replace(header_for(frame, "hongkong-1", place="hongkong", nodata=0,
                                sent=1.5), dtype=dtype)
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(TIMEOUT_S)
        b.settimeout(TIMEOUT_S)
        # 1.7 MB: more than the socket buffers hold, so send from another thread.
        sender = threading.Thread(target=send_frame, args=(a, header, pixels))
        sender.start()
        prefix = read_prefix(b, Limits(), "peer")
        got = FrameHeader.parse(prefix.header, prefix.payload_len, "peer")
        received = read_payload(b, got, "peer")
        sender.join(TIMEOUT_S)
    assert got == header
    assert got.bands == frame.bands and got.acquired == frame.acquired
    np.testing.assert_array_equal(received, pixels)
    scene = ReceivedFrame(got, received)
    window = Window(40, 72, 64, 32)
    part, original = scene.read(window, ["blue", "nir"]), dates[0].read(window, ["blue", "nir"])
    np.testing.assert_array_equal(part.pixels, original.pixels.astype(dtype))
    assert part.georef == original.georef and part.gsd_m == pytest.approx(original.gsd_m)


def test_message_layout_is_as_documented(dates):
    frame = whole(dates[0])
    header = header_for(frame, "x")
    head, payload = frame_message(header, frame.pixels)
    magic, version, kind, reserved, header_len, payload_len = PREAMBLE.unpack(head[:20])
    assert (magic, version, kind, reserved) == (MAGIC, VERSION, 1, 0)
    assert header_len == len(head) - 20 and json.loads(head[20:])["id"] == "x"
    assert payload_len == len(payload) == 13 * 256 * 256 * 2
    assert end_message() == b"OBFR\x01\x02\x00\x00" + bytes(12)


GOOD = {"id": "a", "shape": [2, 4, 4], "dtype": "uint16", "bands": ["B02", "B08"],
        "gsd_m": 10.0}


@pytest.mark.parametrize("change, problem", [
    ({"id": "has space"}, "id must be"),
    ({"shape": [2, 4]}, "shape must be"),
    ({"shape": [2, 0, 4]}, "outside"),
    ({"dtype": "complex64"}, "dtype must be one of"),
    ({"bands": ["B02"]}, "bands must be 2 distinct"),
    ({"bands": ["B02", "b02"]}, "bands must be 2 distinct"),
    ({"transform": [1, 0, 0, 0, 0, 0]}, "not invertible"),
    ({"gsd_m": None}, "needs a transform or gsd_m"),
    ({"acquired": "yesterday"}, "acquired must be ISO 8601"),
    ({"nodata": "none"}, "nodata must be"),
    ({"crs_epsg": "4326"}, "crs_epsg must be"),
])
def test_header_errors_name_the_field(change, problem):
    data = json.dumps({**GOOD, **change}).encode()
    with pytest.raises(ProtocolError, match=problem):
        FrameHeader.parse(data, 2 * 4 * 4 * 2, "peer")


def test_header_payload_size_must_match():
    with pytest.raises(ProtocolError, match="payload is 10 bytes but shape"):
        FrameHeader.parse(json.dumps(GOOD).encode(), 10, "peer")
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        FrameHeader.parse(b"\xff{", 64, "peer")
    when = FrameHeader.parse(json.dumps({**GOOD, "acquired": "2016-09-27T10:00:00Z"}).encode(),
                             64).acquired
    assert when == datetime(2016, 9, 27, 10, tzinfo=timezone.utc)


# -- the server: the same answers as a local run ------------------------------------------------


def test_results_equal_a_local_pipeline_score(config, dates, tmp_path):
    """Both dates of the real sample over TCP give exactly the tile scores that
    ``Pipeline.score`` gives on the scenes read from disk."""
    local = Pipeline(config, Telemetry(keep=False), tmp_path / "state")
    try:
        expected = {}
        for i, scene in enumerate(dates):
            ident = f"hongkong-{i + 1}"
            result = local.score(Acquisition(ident, "hongkong", scene, scene.acquired))
            expected[ident] = [s.to_dict() for s in result.scores]
    finally:
        local.close()
    with serving(config) as server:
        client = Client(server)
        hello = client.next("hello")
        assert hello["protocol"] == VERSION and hello["bands"] == ["blue", "green", "red", "nir"]
        for i, scene in enumerate(dates):
            frame = whole(scene)
            # Date 2 on date 1's grid reads 0 outside its footprint, marked invalid.
            send_frame(client.sock, header_for(frame, f"hongkong-{i + 1}", place="hongkong",
                                               nodata=0 if i else None), frame.pixels)
        client.sock.sendall(end_message())
        replies = client.all()
        client.close()
    results = {r["id"]: r for r in replies if r["type"] == "result"}
    assert set(results) == set(expected)
    for ident, tiles in expected.items():
        assert results[ident]["tiles"] == tiles
        assert len(tiles) == 64
    # Not a constant answer: the tiles' measured cloud differs (it is compared above exactly).
    assert len({round(t["values"]["clear_fraction"], 3) for tiles in expected.values()
                for t in tiles}) > 2
    telemetry = [r["record"]["event"] for r in replies if r["type"] == "telemetry"]
    assert telemetry.count("acquisition") == 2 and "tile" in telemetry
    assert replies[-1] == {"type": "end", "frames": 2, "scored": 2, "dropped": 0, "errors": 0,
                           "telemetry_dropped": 0}


# -- the server survives what clients do --------------------------------------------------------


def test_malformed_and_oversized_messages(config, dates):
    with serving(config, max_frame_bytes=4 * 2**20) as server:
        # Not our protocol at all: a fatal error, the connection closes.
        client = Client(server)
        client.next("hello")
        client.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        error = client.next("error")
        assert error["fatal"] and "not an onboard frame message" in error["message"]
        assert client.all() == []
        client.close()

        # A frame claiming a terabyte is refused from its preamble, before any allocation.
        client = Client(server)
        client.sock.sendall(PREAMBLE.pack(MAGIC, VERSION, 1, 0, 10, 2**40) + b"{}" * 5)
        error = client.next("error")
        assert "exceeds the 4194304-byte limit; refused unread" in error["message"]
        client.close()

        # A newer protocol version is named.
        client = Client(server)
        client.sock.sendall(PREAMBLE.pack(MAGIC, 9, 1, 0, 0, 0))
        assert "protocol version 9 is not supported" in client.next("error")["message"]
        client.close()

        # A bad header within a well-framed message: that frame is refused and skipped, the
        # connection goes on and scores the next frame.
        client = Client(server)
        client.sock.sendall(PREAMBLE.pack(MAGIC, VERSION, 1, 0, 5, 8) + b"{oops" + bytes(8))
        frame = whole(dates[0])
        bad = replace(header_for(frame, "no-nir"), bands=frame.bands[:7] + ("X8",)
                      + frame.bands[8:])
        send_frame(client.sock, bad, frame.pixels)
        offset = replace(header_for(frame, "offset"), radiometric_offset=-1000.0)
        send_frame(client.sock, offset, frame.pixels)
        send_frame(client.sock, header_for(frame, "good"), frame.pixels)
        client.sock.sendall(end_message())
        replies = [r for r in client.all() if r["type"] != "telemetry"]
        client.close()
        errors = [r for r in replies if r["type"] == "error"]
        assert [e["fatal"] for e in errors] == [False, False, False]
        assert "not UTF-8 JSON" in errors[0]["message"]
        assert "lacks the bands ['nir']" in errors[1]["message"]
        assert "radiometric offset -1000 DN" in errors[2]["message"]
        assert [r["id"] for r in replies if r["type"] == "result"] == ["good"]
        assert replies[-1]["errors"] == 3 and replies[-1]["scored"] == 1

        good_frame_answered(server, dates)
        assert server.stats["protocol_errors"] == 3
        assert server.stats["peak_buffered_bytes"] <= 4 * 2**20
        wait_for(lambda: server.stats["buffered_bytes"] == 0, "buffers freed")


def test_disconnect_mid_frame(config, dates):
    with serving(config) as server:
        frame = whole(dates[0])
        head, payload = frame_message(header_for(frame, "cut"), frame.pixels)
        for cut in (7, len(head) - 3, len(head) + len(payload) // 2):
            client = Client(server)
            client.sock.sendall((head + bytes(payload))[:cut])
            client.close()
        wait_for(lambda: server.stats["disconnects"] == 3, "three disconnects")
        events = [e for e in server._log.events if e["event"] == "protocol_error"]
        assert any("disconnected after 7 of 20 bytes of a preamble" in e["message"]
                   for e in events)
        assert any(f"of {len(payload)} bytes of frame cut" in e["message"] for e in events)
        good_frame_answered(server, dates)
        wait_for(lambda: server.stats["buffered_bytes"] == 0, "buffers freed")


def test_drops_past_the_queue_and_refuses_extra_clients(config, dates):
    frame = whole(dates[0])
    with serving(config, queue_frames=1, max_clients=1) as server:
        client = Client(server)
        client.next("hello")
        other = Client(server)
        busy = other.next("error")
        assert "busy: 1 clients already connected" in busy["message"]
        other.close()
        for i in range(12):
            send_frame(client.sock, header_for(frame, f"f{i}"), frame.pixels)
        client.sock.sendall(end_message())
        replies = [r for r in client.all() if r["type"] in ("result", "dropped")]
        client.close()
    assert len(replies) == 12  # every frame answered: scored or dropped, none lost silently
    dropped = [r for r in replies if r["type"] == "dropped"]
    assert dropped and "queue_frames 1" in dropped[0]["reason"]
    assert server.stats["peak_buffered_bytes"] <= 2 * frame.pixels.nbytes


def test_slow_reader_is_cut_off_and_others_are_served(config, dates):
    crop = dates[0].read(Window(0, 0, 64, 64))
    options = dict(reply_buffer_bytes=16384, socket_send_buffer=4096, send_timeout_s=2.0)
    with serving(config, **options) as server:
        slow = Client(server, rcvbuf=4096)
        sent = 0
        with contextlib.suppress(OSError):  # the server hangs up on it
            while sent < 2000 and server.stats["slow_readers"] == 0:
                send_frame(slow.sock, header_for(crop, f"s{sent}"), crop.pixels)
                sent += 1
        wait_for(lambda: server.stats["slow_readers"] >= 1, "the slow reader to be cut off")
        slow.close()
        good_frame_answered(server, dates)
        assert server.stats["peak_buffered_bytes"] <= ServeOptions(**options).memory_bound_bytes
    events = [e for e in server._log.events if e["event"] == "slow_reader"]
    assert events and "slow reader: more than 16384 bytes of replies left unread" in \
        events[0]["message"]


def test_cli_serves_and_stops_by_itself(dates, tmp_path):
    """``onboard serve --port 0 --max-frames 1``: prints where it listens, answers one frame,
    exits 0."""
    process = subprocess.Popen(
        [sys.executable, "-c", "from onboard.runtime.cli import main; raise SystemExit(main())",
         "serve", "--port", "0", "--max-frames",
         "1", "--state", str(tmp_path / "state"), "--log", str(tmp_path / "serve.jsonl")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = json.loads(process.stdout.readline())
        host, port = first["serving"].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
        frame = whole(dates[0])
        send_frame(sock, header_for(frame, "cli"), frame.pixels)
        replies = iter_replies(sock)
        result = next(r for r in replies if r["type"] == "result")
        assert result["id"] == "cli" and len(result["tiles"]) == 64
        sock.close()
        assert process.wait(TIMEOUT_S) == 0
        last = json.loads(process.stdout.read().strip().splitlines()[-1])
        assert last["served"]["scored"] == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    events = [json.loads(line)["event"] for line in (tmp_path / "serve.jsonl").open()]
    assert events[0] == "serve_start" and "client_connected" in events
