"""Telemetry as CCSDS Space Packets (CCSDS 133.0-B-2), packed on board, decoded on the ground.

The runtime's telemetry is JSON lines (:mod:`onboard.runtime.telemetry`); on the link each record
travels as one Space Packet, or several when it is longer than one packet may carry. The format:

======================  =======  ===============================================================
field                   octets   content
======================  =======  ===============================================================
primary header          6        version 0, type TM (0), secondary header flag 1, APID (11 bits,
                                 one per record stream, :data:`STREAM_APIDS`), sequence flags
                                 (unsegmented, or first / continuation / last of a long record),
                                 14-bit sequence count per APID (wraps at 16384), data length
secondary header        6        time of the record (its ``t``): CUC-style, 4 octets of whole
                                 seconds since 1970-01-01 UTC, 2 octets of 1/65536 s; the same
                                 in every packet of a segmented record
user data               n        a slice of the record as compact UTF-8 JSON (no newline)
packet error control    2        CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF: the CRC CFDP PDUs
                                 use) over every octet before it
======================  =======  ===============================================================

The APID names the stream (tiles, passes, acquisitions, engines, products, runs); the record keeps
its own ``event``, so decoding never depends on the table. Space Packets carry no retransmission:
a packet lost or damaged on the link is gone, and the ground counts it (a gap in an APID's
sequence counts, a CRC that does not match), drops a record it cannot rebuild whole, and decodes
every other record to exactly the dict the flight side wrote.

APIDs 0x0C0 and 0x0C1 carry CFDP PDUs (:mod:`onboard.runtime.downlink.cfdp`); 0x7FF is the idle
APID of the standard.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fastcrc
from spacepackets.ccsds.spacepacket import (
    SPACE_PACKET_HEADER_SIZE,
    PacketType,
    SequenceFlags,
    SpacePacketHeader,
)

from onboard.runtime.errors import OnboardError

# Record streams: each event name goes to the APID of the first prefix it starts with.
STREAM_APIDS: dict[str, int] = {
    "run": 0x020,       # run_start, run_done, predict_done
    "tile": 0x021,      # tile, tile_error: the per-frame detail
    "pass": 0x022,      # pass summaries
    "downlink": 0x022,  # downlink.drain rides with its pass
    "acquisition": 0x023,
    "backpressure": 0x023,
    "spool": 0x023,
    "engine": 0x024,
    "stage": 0x024,
    "bundle": 0x024,
    "product": 0x025,
    "storage": 0x025,
}
OTHER_APID = 0x02F  # any event no prefix names
CFDP_DOWN_APID = 0x0C0  # CFDP PDUs flight -> ground
CFDP_UP_APID = 0x0C1  # CFDP PDUs ground -> flight
IDLE_APID = 0x7FF

SECONDARY_HEADER_LEN = 6
CRC_LEN = 2
OVERHEAD = SPACE_PACKET_HEADER_SIZE + SECONDARY_HEADER_LEN + CRC_LEN  # 14 octets per packet
MAX_DATA_FIELD = 65536  # the data length field counts one less than the data field
_SEQ_MODULO = 1 << 14


class PacketError(OnboardError, ValueError):
    """A space packet cannot be decoded (too short, a CRC that does not match)."""


def apid_for(event: str) -> int:
    for prefix, apid in STREAM_APIDS.items():
        if event.startswith(prefix):
            return apid
    return OTHER_APID


def _time_field(t: float) -> bytes:
    seconds = max(0.0, float(t))
    whole = int(seconds)
    fine = min(int(round((seconds - whole) * 65536)), 65535)
    return struct.pack("!IH", whole & 0xFFFFFFFF, fine)


def crc16(data: bytes) -> int:
    return fastcrc.crc16.ibm_3740(data)


def space_packet(apid: int, seq_count: int, data: bytes, *,
                 packet_type: PacketType = PacketType.TM,
                 seq_flags: SequenceFlags = SequenceFlags.UNSEGMENTED,
                 secondary_header: bytes = b"") -> bytes:
    """One Space Packet: primary header, optional secondary header, ``data``."""
    body = secondary_header + data
    if not 1 <= len(body) <= MAX_DATA_FIELD:
        raise PacketError(f"a space packet data field holds 1 to {MAX_DATA_FIELD} octets, "
                          f"got {len(body)}")
    header = SpacePacketHeader(packet_type=packet_type, apid=apid,
                               seq_count=seq_count % _SEQ_MODULO, data_len=len(body) - 1,
                               sec_header_flag=bool(secondary_header), seq_flags=seq_flags)
    return bytes(header.pack()) + body


def split_packet(packet: bytes) -> tuple[SpacePacketHeader, bytes]:
    """The header and the data field of one whole packet."""
    if len(packet) < SPACE_PACKET_HEADER_SIZE + 1:
        raise PacketError(f"a space packet has at least 7 octets, got {len(packet)}")
    header = SpacePacketHeader.unpack(packet)
    if header.packet_len != len(packet):
        raise PacketError(f"space packet APID {header.apid:#05x}: its length field says "
                          f"{header.packet_len} octets, got {len(packet)}")
    return header, packet[SPACE_PACKET_HEADER_SIZE:]


def iter_packets(stream: bytes) -> Iterator[bytes]:
    """Cut a byte stream of concatenated packets into packets (a torn tail is dropped)."""
    at = 0
    while at + SPACE_PACKET_HEADER_SIZE <= len(stream):
        length = SPACE_PACKET_HEADER_SIZE + struct.unpack_from("!H", stream, at + 4)[0] + 1
        if at + length > len(stream):
            return
        yield stream[at:at + length]
        at += length


@dataclass
class PackReport:
    records: int = 0
    packets: int = 0
    bytes: int = 0
    dropped: int = 0  # records that did not fit the budget
    unsent: int = 0  # packets the link refused (the pass was over)
    by_apid: dict[int, int] = field(default_factory=dict)  # packets per APID


class TelemetryPacker:
    """Packs telemetry records into space packets, a sequence count per APID.

    ``max_packet`` bounds each packet's total length (a record longer than its data field is
    segmented). A packer lives as long as the link: its sequence counts run on across passes,
    as the ground's gap detection expects.
    """

    def __init__(self, max_packet: int = 1024) -> None:
        if not OVERHEAD + 1 <= max_packet <= SPACE_PACKET_HEADER_SIZE + MAX_DATA_FIELD:
            raise PacketError(f"max_packet must be in [{OVERHEAD + 1}, "
                              f"{SPACE_PACKET_HEADER_SIZE + MAX_DATA_FIELD}], got {max_packet}")
        self.max_packet = max_packet
        self.counts: dict[int, int] = {}

    def pack_record(self, record: dict[str, Any]) -> list[bytes]:
        """The packets of one record, in order."""
        apid = apid_for(str(record.get("event", "")))
        body = json.dumps(record, default=str, separators=(",", ":")).encode("utf-8")
        chunk = self.max_packet - OVERHEAD
        pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
        stamp = _time_field(float(record.get("t", 0.0)))
        packets = []
        for index, piece in enumerate(pieces):
            if len(pieces) == 1:
                flags = SequenceFlags.UNSEGMENTED
            elif index == 0:
                flags = SequenceFlags.FIRST_SEGMENT
            elif index == len(pieces) - 1:
                flags = SequenceFlags.LAST_SEGMENT
            else:
                flags = SequenceFlags.CONTINUATION_SEGMENT
            count = self.counts.get(apid, 0)
            self.counts[apid] = (count + 1) % _SEQ_MODULO
            unsealed = space_packet(apid, count, piece + b"\0\0", seq_flags=flags,
                                    secondary_header=stamp)[:-CRC_LEN]
            packets.append(unsealed + struct.pack("!H", crc16(unsealed)))
        return packets

    def pack(self, records: Iterable[dict[str, Any]], budget_bytes: int | None = None,
             report: PackReport | None = None) -> list[bytes]:
        """Packets for ``records`` in order, while they fit ``budget_bytes``; a record that does
        not fit is counted in ``report.dropped`` (smaller ones after it still go)."""
        report = report if report is not None else PackReport()
        out: list[bytes] = []
        for record in records:
            packets = self._dry_pack(record, budget_bytes, report)
            if packets is None:
                report.dropped += 1
                continue
            out.extend(packets)
            report.records += 1
            report.packets += len(packets)
            report.bytes += sum(len(p) for p in packets)
            for packet in packets:
                apid = ((packet[0] & 0x07) << 8) | packet[1]
                report.by_apid[apid] = report.by_apid.get(apid, 0) + 1
        return out

    def _dry_pack(self, record: dict[str, Any], budget_bytes: int | None,
                  report: PackReport) -> list[bytes] | None:
        if budget_bytes is None:
            return self.pack_record(record)
        # Size first, so a record that does not fit leaves the sequence counts untouched (a
        # skipped record is not a gap on the link).
        body = len(json.dumps(record, default=str, separators=(",", ":")).encode("utf-8"))
        chunk = self.max_packet - OVERHEAD
        size = body + OVERHEAD * max(1, math.ceil(body / chunk))
        if report.bytes + size > budget_bytes:
            return None
        return self.pack_record(record)


@dataclass
class DecodeReport:
    packets: int = 0
    records: int = 0
    corrupt: int = 0  # packets whose CRC or framing did not check
    lost: int = 0  # packets missing by the sequence counts
    broken_records: int = 0  # records dropped because a segment was lost or damaged
    foreign: int = 0  # packets of APIDs that are not telemetry (CFDP, idle)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class TelemetryDecoder:
    """Rebuilds telemetry records from space packets, in arrival order, counting what was lost.

    Packets of one APID are expected in sequence-count order (as a space link delivers them);
    a jump in the count is lost packets and breaks the record being reassembled.
    """

    def __init__(self) -> None:
        self.report = DecodeReport()
        self._expected: dict[int, int] = {}
        self._partial: dict[int, list[bytes]] = {}

    def feed(self, packet: bytes) -> list[dict[str, Any]]:
        """Decode one packet; the records it completes."""
        self.report.packets += 1
        try:
            header, data = split_packet(packet)
        except (PacketError, ValueError):
            self.report.corrupt += 1
            return []
        if header.apid in (CFDP_DOWN_APID, CFDP_UP_APID, IDLE_APID):
            self.report.foreign += 1
            return []
        if not header.sec_header_flag or len(data) < SECONDARY_HEADER_LEN + CRC_LEN \
                or crc16(packet) != 0:
            # A CRC over the data and its own value gives zero when nothing changed.
            self.report.corrupt += 1
            return []
        apid, count = header.apid, header.seq_count
        expected = self._expected.get(apid)
        if expected is not None and count != expected:
            self.report.lost += (count - expected) % _SEQ_MODULO
            if self._partial.pop(apid, None) is not None:
                self.report.broken_records += 1
        self._expected[apid] = (count + 1) % _SEQ_MODULO
        piece = data[SECONDARY_HEADER_LEN:-CRC_LEN]
        flags = header.seq_flags
        if flags == SequenceFlags.UNSEGMENTED:
            return self._record(piece)
        if flags == SequenceFlags.FIRST_SEGMENT:
            if self._partial.pop(apid, None) is not None:
                self.report.broken_records += 1
            self._partial[apid] = [piece]
            return []
        pieces = self._partial.get(apid)
        if pieces is None:
            return []  # the start of this record was lost; counted when it was
        pieces.append(piece)
        if flags == SequenceFlags.LAST_SEGMENT:
            del self._partial[apid]
            return self._record(b"".join(pieces))
        return []

    def _record(self, body: bytes) -> list[dict[str, Any]]:
        try:
            record = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self.report.broken_records += 1
            return []
        if not isinstance(record, dict):
            self.report.broken_records += 1
            return []
        self.report.records += 1
        return [record]

    def feed_all(self, packets: Iterable[bytes]) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for packet in packets:
            records.extend(self.feed(packet))
        return records


def read_jsonl(text: str, where: str = "telemetry") -> list[dict[str, Any]]:
    """The records of a JSON-lines telemetry file; a torn last line (a writer killed mid-line)
    is left out, damage before it is an error naming ``where``."""
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise PacketError(f"{where}: line {number} is not JSON") from None
        if not isinstance(record, dict):
            raise PacketError(f"{where}: line {number} is not a record")
        records.append(record)
    return records
