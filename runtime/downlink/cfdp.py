"""CFDP Class 2 downlink (CCSDS 727.0-B-5) behind the :class:`~.link.Transmitter` interface.

Flight side: :class:`CfdpTransmitter` sends one product file per CFDP transaction with a
``cfdppy`` source handler (acknowledged mode, closure requested): the dest file name is the
product id (:func:`~.link.stored_name`), the Metadata PDU carries the id and the product's SHA-256
as Message-to-User TLVs, NAKed segments are sent again, and ``send`` is True only when the
ground's Finished PDU says ``NO_ERROR`` and ``DATA_COMPLETE``. The queue
(:mod:`~.queue`) drains into it through :func:`~.link.drain`; an item whose transaction ends any
other way (cut by the end of a pass, a timeout, a fault, a kill) goes back to ``queued`` and is
sent again under the same id.

Ground side: :class:`GroundStation` runs one ``cfdppy`` destination handler per transaction and
hands each delivered file to a :class:`~.link.Receiver`: the file is staged through
``durability.atomic_path``, its SHA-256 checked against the one the flight side sent, stored
once under its id (an id already stored is dropped and still acknowledged), and a mismatch turns
the Finished PDU into ``FILE_CHECKSUM_FAILURE`` so that the flight side sends it again.

Framing: every PDU travels in a CCSDS Space Packet (APID 0x0C0 down as TM, 0x0C1 up as TC;
:mod:`~.packets`), beside the telemetry packets of the other APIDs. The link is either in process
(:class:`SimulatedLink`) or UDP (:class:`UdpLink` and :func:`serve_udp`, loopback in the tests),
both with the impairments of :class:`Impairments`: file-data and directive PDU loss, reordering,
duplication, bit flips on the wire (the PDU CRC-16 catches them: a loss), damage to file data
before framing (nothing on the link catches it: the SHA-256 does), a bitrate cap, and a byte
budget per pass after which the link is dark.

Work-arounds for cfdp-py 0.7.0, each where it is needed below:

1. *The file checksum is checked only on the deferred-NAK path, and the default fault handler
   ignores a checksum failure*: the ground trusts its SHA-256 check, not CFDP's word.
2. *``_AckedModeParams.lost_seg_tracker`` is one shared mutable default*: :class:`_DestHandler`
   gives every transaction its own tracker (a fix, so several handlers can live in one process).
3. *A lost ACK(EOF) or ACK(Finished) is never recovered*: the ground answers a repeated EOF with
   ACK(EOF) and its Finished again, the flight side holds a Finished that overtakes the ACK(EOF)
   and answers a repeated Finished of a finished transaction with ACK(Finished); the ground stops
   repeating its Finished after ``ack_limit`` tries (cfdp-py would repeat it forever); whatever
   still ends without a clean Finished is retried by the queue and dropped by id on the ground.
4. *Timers run on wall-clock time and only advance inside ``state_machine()``*: both sides keep
   polling their handlers, and a transaction has a deadline of its own on the monotonic clock.
   cfdp-py's source has no timer at all while it waits for the Finished PDU in acknowledged
   mode: the flight side sends its EOF again when it has heard nothing for two ACK timeouts.
5. *An EOF that arrives before a lost Metadata PDU is forgotten once the Metadata is sent again*
   (found here: the handler goes back to receiving file data with the EOF behind it and waits
   for ever): the ground hands that EOF to the handler again.
6. *While the Metadata PDU is missing, every file-data PDU adds an overlapping gap ``(0, n)``
   that is never merged* (found here, with deferred NAKs: each NAK round asks for the file once
   per PDU received, a storm of retransmissions): the ground merges the gap list.
7. *File data that arrives before the Metadata PDU is dropped* and NAKed again once the EOF
   shows the gap (a Metadata PDU reordered behind a few file-data PDUs cost their whole size
   again: most of the excess re-sent with large PDUs): the ground keeps such file data for the
   Metadata and hands it over behind it.

Protocol choices (measured in ``bench/cfdp.py``): NAKs are deferred to the EOF (``immediate_nak =
false``: with immediate NAKs every reordered PDU was NAKed and sent twice), the ground holds an
EOF that comes with gaps for a grace (``eof_grace_packets``, ``eof_grace_s``) so PDUs reordered
behind it are not NAKed, and up to
``window`` transactions overlap (the next product's file data goes out while the previous ones
wait for their NAKs and Finished), so the link does not idle between products.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import select
import socket
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from cfdppy import CfdpState, IndicationConfig, LocalEntityConfig, PutRequest, RemoteEntityConfig
from cfdppy import exceptions as cfdp_errors
from cfdppy.filestore import NativeFilestore
from cfdppy.handler.dest import DestHandler, LostSegmentTracker
from cfdppy.handler.dest import TransactionStep as DestStep
from cfdppy.handler.source import SourceHandler
from cfdppy.handler.source import TransactionStep as SourceStep
from cfdppy.mib import (
    CheckTimerProvider,
    DefaultFaultHandlerBase,
    EntityType,
    RemoteEntityConfigTable,
)
from cfdppy.user import CfdpUserBase
from spacepackets.ccsds.spacepacket import PacketType
from spacepackets.cfdp import (
    ChecksumType,
    ConditionCode,
    DeliveryCode,
    DirectiveType,
    FileStatus,
    FilestoreResponseStatusCode,
    InvalidCrcError,
    MessageToUserTlv,
    PduFactory,
    TlvType,
    TransactionId,
    TransmissionMode,
)
from spacepackets.cfdp.defs import UnsupportedCfdpVersionError
from spacepackets.cfdp.pdu import (
    AckPdu,
    EofPdu,
    FileDataPdu,
    FinishedPdu,
    MetadataPdu,
    TransactionStatus,
)
from spacepackets.cfdp.pdu.file_data import FileDataParams
from spacepackets.cfdp.tlv.defs import TlvTypeMissmatchError
from spacepackets.countdown import Countdown
from spacepackets.seqcount import ProvidesSeqCount
from spacepackets.util import UnsignedByteField

from onboard.runtime.config import register_section
from onboard.runtime.downlink.link import Receiver, stored_name
from onboard.runtime.downlink.packets import (
    CFDP_DOWN_APID,
    CFDP_UP_APID,
    PacketError,
    PackReport,
    TelemetryDecoder,
    TelemetryPacker,
    read_jsonl,
    space_packet,
    split_packet,
)
from onboard.runtime.downlink.stac import GroundCatalogue, item_sha256
from onboard.runtime.durability import atomic_path, write_json, write_text
from onboard.runtime.errors import (
    ConfigError,
    ProductNameError,
    StagedFileMissingError,
    StorageError,
)
from onboard.runtime.telemetry import Telemetry

# -- configuration ---------------------------------------------------------------------------------

_CHECKSUMS = {"crc32": ChecksumType.CRC_32, "crc32c": ChecksumType.CRC_32C,
              "modular": ChecksumType.MODULAR, "null": ChecksumType.NULL_CHECKSUM}

SPACE_PACKET_HEADER = 6  # octets: the CCSDS primary header around every PDU


def _pdu_header_octets(config: CfdpLinkConfig) -> int:
    """A PDU's header and CRC: fixed part, two entity ids, a 4-octet sequence number."""
    return 4 + 2 * config.entity_id_bytes + 4 + 2 * config.pdu_crc


@dataclass(frozen=True)
class CfdpLinkConfig:
    """``[cfdp]``: the CFDP Class 2 link (``[link] kind = "cfdp"``).

    ``transport = "simulated"`` runs the ground station in process (its folder ``ground_folder``
    under the run's output folder); ``"udp"`` talks to ``onboard ground --listen host:port``.
    The impairments apply on the flight side of either transport, both ways (rates in [0, 1)).
    Timers are seconds; ``pdu_size`` is the largest PDU in octets (the file segment is what is
    left of it after the PDU header), the space packet adds 6 octets to each.
    """

    transport: Literal["simulated", "udp"] = "simulated"
    host: str = "127.0.0.1"
    port: int = 52001
    ground_folder: str = "ground"
    pdu_size: int = 1024
    flight_entity_id: int = 1
    ground_entity_id: int = 2
    entity_id_bytes: int = 2
    checksum: Literal["crc32", "crc32c", "modular", "null"] = "crc32"
    pdu_crc: bool = True
    bitrate_bps: float | None = None  # a cap on the downlink; None: as fast as the CPU goes
    pass_budget_bytes: int | None = None  # octets on the wire per pass; None: no end
    drop_rate: float = 0.0  # file-data PDUs lost on the way down
    directive_drop_rate: float = 0.0  # directive PDUs (metadata, EOF, ACK, NAK, Finished) lost
    telemetry_drop_rate: float = 0.0  # telemetry space packets lost (nothing sends them again)
    reorder_rate: float = 0.0
    reorder_depth: int = 8  # a reordered packet is held back behind up to this many others
    duplicate_rate: float = 0.0
    corrupt_rate: float = 0.0  # a bit flipped on the wire: the PDU's CRC-16 drops it
    segment_corrupt_rate: float = 0.0  # file data damaged before framing: only SHA-256 sees it
    seed: int = 0
    ack_timeout_s: float = 1.0
    ack_limit: int = 8
    nak_timeout_s: float = 1.0
    nak_limit: int = 32
    transaction_timeout_s: float = 120.0
    inactivity_s: float = 60.0  # the ground gives up a transaction it has not heard of this long
    window: int = 8  # transactions in flight at once (one product's file data at a time)
    # The ground NAKs a gap as soon as it sees one (True), or once the EOF came (False: a
    # reordered PDU fills its gap before anything is NAKed, so reordering costs nothing).
    immediate_nak: bool = False
    # The ground holds an EOF that comes while its file still has gaps until they fill, or
    # ``eof_grace_packets`` more packets came (of any transaction), or ``eof_grace_s`` passed,
    # so that PDUs reordered behind the EOF arrive before their gaps are NAKed.
    eof_grace_s: float = 0.05
    eof_grace_packets: int = 16

    def __post_init__(self) -> None:
        for name in ("drop_rate", "directive_drop_rate", "telemetry_drop_rate", "reorder_rate",
                     "duplicate_rate",
                     "corrupt_rate", "segment_corrupt_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"cfdp {name} must be in [0, 1), got {value}")
        if not 64 <= self.pdu_size <= 65000:
            raise ConfigError(f"cfdp pdu_size must be in [64, 65000], got {self.pdu_size}")
        if self.entity_id_bytes not in (1, 2, 4, 8):
            raise ConfigError(f"cfdp entity_id_bytes must be 1, 2, 4 or 8, got "
                              f"{self.entity_id_bytes}")
        for name in ("flight_entity_id", "ground_entity_id"):
            value = getattr(self, name)
            if not 0 <= value < 256 ** self.entity_id_bytes:
                raise ConfigError(f"cfdp {name} {value} does not fit {self.entity_id_bytes} "
                                  f"octets")
        if self.flight_entity_id == self.ground_entity_id:
            raise ConfigError("cfdp flight_entity_id and ground_entity_id must differ")
        if not 0 < self.port < 65536:
            raise ConfigError(f"cfdp port must be in [1, 65535], got {self.port}")
        if self.bitrate_bps is not None and not self.bitrate_bps > 0:
            raise ConfigError(f"cfdp bitrate_bps must be positive, got {self.bitrate_bps}")
        if self.pass_budget_bytes is not None and self.pass_budget_bytes <= 0:
            raise ConfigError(f"cfdp pass_budget_bytes must be positive, got "
                              f"{self.pass_budget_bytes}")
        if self.eof_grace_packets < 0:
            raise ConfigError(f"cfdp eof_grace_packets must be at least 0, got "
                              f"{self.eof_grace_packets}")
        if not 0.0 <= self.eof_grace_s < self.ack_timeout_s:
            raise ConfigError(f"cfdp eof_grace_s must be in [0, ack_timeout_s), got "
                              f"{self.eof_grace_s}")
        for name in ("ack_timeout_s", "nak_timeout_s", "transaction_timeout_s", "inactivity_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"cfdp {name} must be positive, got {getattr(self, name)}")
        for name in ("ack_limit", "nak_limit", "reorder_depth", "window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cfdp {name} must be at least 1, got {getattr(self, name)}")

    @property
    def flight_id(self) -> UnsignedByteField:
        return UnsignedByteField(self.flight_entity_id, self.entity_id_bytes)

    @property
    def ground_id(self) -> UnsignedByteField:
        return UnsignedByteField(self.ground_entity_id, self.entity_id_bytes)

    def remote(self, entity: UnsignedByteField, *, ack_limit: int | None = None
               ) -> RemoteEntityConfig:
        return RemoteEntityConfig(
            entity_id=entity, max_file_segment_len=None, max_packet_len=self.pdu_size,
            closure_requested=True, crc_on_transmission=self.pdu_crc,
            default_transmission_mode=TransmissionMode.ACKNOWLEDGED,
            crc_type=_CHECKSUMS[self.checksum],
            positive_ack_timer_interval_seconds=self.ack_timeout_s,
            positive_ack_timer_expiration_limit=ack_limit or self.ack_limit,
            immediate_nak_mode=self.immediate_nak, nak_timer_interval_seconds=self.nak_timeout_s,
            nak_timer_expiration_limit=self.nak_limit)


register_section("cfdp", CfdpLinkConfig, doc="the CFDP Class 2 link and its simulator")

# The cfdppy errors a handler raises for a PDU it will not take in its state (a late or
# duplicated PDU, one of another transaction): on a lossy link they are expected, not bugs.
_PDU_REFUSED = (cfdp_errors.PduIgnoredForSource, cfdp_errors.PduIgnoredForDest,
                cfdp_errors.InvalidTransactionSeqNum, cfdp_errors.InvalidNakPdu,
                cfdp_errors.InvalidSourceId, cfdp_errors.InvalidDestinationId,
                cfdp_errors.InvalidPduDirection, cfdp_errors.InvalidPduForSourceHandler,
                cfdp_errors.InvalidPduForDestHandler, cfdp_errors.NoRemoteEntityConfigFound)
# What decoding bytes off the link may raise: the link is not trusted.
# A damaged PDU can raise any of these from spacepackets; the last two do not derive from
# ValueError (a flipped version bit raises UnsupportedCfdpVersionError).
_UNDECODABLE = (InvalidCrcError, ValueError, IndexError, KeyError,
                UnsupportedCfdpVersionError, TlvTypeMissmatchError)

_TAG_ID = b"onboard:id:"
_TAG_SHA = b"onboard:sha256:"
_TAG_ITEM = b"onboard:item1:"  # a slice of the STAC Item JSON, zlib with _ITEM_ZDICT (v1)
# A preset dictionary for the Items :func:`~.stac.make_item` writes: their keys and constant
# values, so that a tile's Item (2.5 KB of compact JSON) takes about 500 octets instead of
# 900 and fits a 1 KiB Metadata PDU. Part of the link's format: changing it is a new tag.
_ITEM_ZDICT = (
    b'"onboard:scores":{"cloud_fraction":"clear_fraction":"change":},"onboard:aoi_weight":1.0,'
    b'"onboard:bundles":[],"onboard:product_kind":"full","near_lossless","thumbnail","mask",'
    b'"superres","onboard:priority":"onboard:max_error_dn":"onboard:pass":'
    b'"onboard:value_per_byte":"links":[],"assets":{"full":{"href":".tif","type":"image/tiff; '
    b'application=geotiff; profile=cloud-optimized","title":" of tile ","roles":["data"],'
    b'"file:size":"file:checksum":"1220","bands":[{"name":"B01"},{"name":"B02"},{"name":"B03"},'
    b'{"name":"B04"},{"name":"B05"},{"name":"B06"},{"name":"B07"},{"name":"B08"},{"name":"B8A"},'
    b'{"name":"B09"},{"name":"B10"},{"name":"B11"},{"name":"B12"}]}},"bbox":['
    b'"properties":{"datetime":"T00:00:00Z","proj:code":"EPSG:","proj:bbox":[,"proj:shape":[,'
    b'"proj:transform":[0.0,0.0,1.0],"eo:cloud_cover":"onboard:tile_id":"onboard:acquisition":'
    b'"onboard:window":[,"onboard:decision":"keep","demote","drop","onboard:reasons":[],'
    b'{"type":"Feature","stac_version":"1.1.0","stac_extensions":["https://stac-extensions.'
    b'github.io/eo/v1.1.0/schema.json","https://stac-extensions.github.io/projection/v2.0.0/'
    b'schema.json","https://stac-extensions.github.io/file/v2.1.0/schema.json"],"id":"",'
    b'"geometry":{"type":"Polygon","coordinates":[[[')
_TLV_MAX = 255  # the length octet of a TLV


def _split_tlvs(tag: bytes, raw: bytes) -> list[MessageToUserTlv]:
    room = _TLV_MAX - len(tag)
    chunks = [raw[i:i + room] for i in range(0, len(raw), room)] or [b""]
    return [MessageToUserTlv(tag + chunk) for chunk in chunks]


def _tags(item_id: str, sha256: str, item: bytes | None = None, *, room: int | None = None
          ) -> list[MessageToUserTlv] | None:
    """Message-to-User TLVs naming the product and carrying its compressed STAC Item, split
    over as many as they need (a TLV holds 255 octets); None when they take more than ``room``
    octets (the Metadata PDU must fit one PDU)."""
    messages = [MessageToUserTlv(_TAG_SHA + sha256.encode("ascii")),
                *_split_tlvs(_TAG_ID, item_id.encode("utf-8"))]
    if item is not None:
        messages += _split_tlvs(_TAG_ITEM, item)
    if room is not None and sum(2 + len(m.value) for m in messages) > room:
        return None
    return messages


@dataclass(frozen=True)
class _Tags:
    item_id: str | None
    sha256: str | None
    item: dict[str, Any] | None  # the STAC Item, when one came and it decoded
    item_broken: bool = False  # Item slices came that do not decode

    @property
    def product(self) -> tuple[str | None, str | None]:
        return self.item_id, self.sha256


def _read_tags(messages: list[MessageToUserTlv] | None) -> _Tags:
    pieces: list[bytes] = []
    item_pieces: list[bytes] = []
    sha = None
    for message in messages or []:
        value = bytes(message.value)
        if value.startswith(_TAG_ID):
            pieces.append(value[len(_TAG_ID):])
        elif value.startswith(_TAG_ITEM):
            item_pieces.append(value[len(_TAG_ITEM):])
        elif value.startswith(_TAG_SHA):
            sha = value[len(_TAG_SHA):].decode("ascii", "replace")
    item_id = b"".join(pieces).decode("utf-8", "replace") if pieces else None
    item = None
    if item_pieces:
        try:
            unpacker = zlib.decompressobj(zdict=_ITEM_ZDICT)
            raw = unpacker.decompress(b"".join(item_pieces)) + unpacker.flush()
            item = json.loads(raw.decode("utf-8"))
        except (zlib.error, UnicodeDecodeError, ValueError):
            item = None
        if not isinstance(item, dict):
            return _Tags(item_id, sha, None, True)
    return _Tags(item_id, sha, item)


def _key(pdu: Any) -> tuple[int, int]:
    return int(pdu.source_entity_id.value), int(pdu.transaction_seq_num.value)


class _Timers(CheckTimerProvider):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def provide_check_timer(self, local_entity_id: UnsignedByteField,
                            remote_entity_id: UnsignedByteField,
                            entity_type: EntityType) -> Countdown:
        return Countdown.from_seconds(self.seconds)


class _Faults(DefaultFaultHandlerBase):
    """Records every fault a handler declares (cfdp-py's defaults decide what each does)."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: list[str] = []

    def _note(self, kind: str, cond: ConditionCode) -> None:
        self.faults.append(f"{kind}:{cond.name}")

    def notice_of_suspension_cb(self, transaction_id: TransactionId, cond: ConditionCode,
                                progress: int) -> None:
        self._note("suspension", cond)

    def notice_of_cancellation_cb(self, transaction_id: TransactionId, cond: ConditionCode,
                                  progress: int) -> None:
        self._note("cancellation", cond)

    def abandoned_cb(self, transaction_id: TransactionId, cond: ConditionCode,
                     progress: int) -> None:
        self._note("abandoned", cond)

    def ignore_cb(self, transaction_id: TransactionId, cond: ConditionCode,
                  progress: int) -> None:
        self._note("ignored", cond)


class _QuietUser(CfdpUserBase):
    """The indications neither side acts on (the base class prints some to stdout)."""

    def transaction_indication(self, transaction_indication_params: Any) -> None:
        pass

    def eof_sent_indication(self, transaction_id: TransactionId) -> None:
        pass

    def transaction_finished_indication(self, params: Any) -> None:
        pass

    def metadata_recv_indication(self, params: Any) -> None:
        pass

    def file_segment_recv_indication(self, params: Any) -> None:
        pass

    def report_indication(self, transaction_id: TransactionId, status_report: Any) -> None:
        pass

    def suspended_indication(self, transaction_id: TransactionId,
                             cond_code: ConditionCode) -> None:
        pass

    def resumed_indication(self, transaction_id: TransactionId, progress: int) -> None:
        pass

    def fault_indication(self, transaction_id: TransactionId, cond_code: ConditionCode,
                         progress: int) -> None:
        pass

    def abandoned_indication(self, transaction_id: TransactionId, cond_code: ConditionCode,
                             progress: int) -> None:
        pass

    def eof_recv_indication(self, transaction_id: TransactionId) -> None:
        pass


_INDICATIONS = IndicationConfig(file_segment_recvd_indication_required=False)


# -- framing ---------------------------------------------------------------------------------------

class _Framer:
    """CFDP PDUs in space packets: one APID per direction, a sequence count each."""

    def __init__(self, apid: int, packet_type: PacketType) -> None:
        self.apid = apid
        self.packet_type = packet_type
        self.count = 0

    def wrap(self, pdu: bytes) -> bytes:
        packet = space_packet(self.apid, self.count, pdu, packet_type=self.packet_type)
        self.count = (self.count + 1) % (1 << 14)
        return packet


def _pdu_of(packet: bytes, apid: int) -> bytes | None:
    """The PDU in a CFDP space packet of ``apid``; None for any other packet."""
    header, data = split_packet(packet)
    return data if header.apid == apid else None


# -- the link --------------------------------------------------------------------------------------

@dataclass
class LinkStats:
    """What went over one direction of the link, and what the impairments did to it."""

    packets: int = 0
    bytes: int = 0  # octets handed to the link (before impairments)
    file_data_bytes: int = 0  # file data octets in the file-data PDUs among them
    dropped: int = 0
    reordered: int = 0
    duplicated: int = 0
    corrupted: int = 0  # wire bit flips
    segments_corrupted: int = 0  # file data damaged before framing
    refused_after_pass: int = 0  # packets offered once the pass budget was spent
    telemetry_bytes: int = 0  # octets of telemetry packets among ``bytes``

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Impairments:
    """Loss, reordering, duplication and damage of space packets on one direction of the link.

    Seeded, so a run can be repeated; packets held back for reordering come out behind up to
    ``depth`` later ones, or when the link goes quiet (:meth:`flush`).
    """

    def __init__(self, config: CfdpLinkConfig, stats: LinkStats, seed: int,
                 pdu_apid: int) -> None:
        self.config = config
        self.stats = stats
        self.rng = random.Random(seed)
        self.pdu_apid = pdu_apid
        self._held: list[list[Any]] = []  # [packets still to pass, packet]

    def apply(self, packet: bytes) -> list[bytes]:
        c, rng = self.config, self.rng
        out: list[bytes] = []
        for hold in self._held:
            hold[0] -= 1
        while self._held and self._held[0][0] <= 0:
            out.append(self._held.pop(0)[1])
        pdu = None
        with contextlib.suppress(*_UNDECODABLE, PacketError):
            pdu = _pdu_of(packet, self.pdu_apid)
        if pdu is None:
            # A telemetry packet: its own loss rate, and never reordered (the packets of an
            # APID come down in order, as on a virtual channel; the ground counts the gaps).
            if c.telemetry_drop_rate and rng.random() < c.telemetry_drop_rate:
                self.stats.dropped += 1
                return out
            return [*out, packet]
        file_data = not PduFactory.is_file_directive(pdu)
        if rng.random() < (c.drop_rate if file_data else c.directive_drop_rate):
            self.stats.dropped += 1
            return out
        if file_data and c.segment_corrupt_rate and rng.random() < c.segment_corrupt_rate:
            packet = self._damage_segment(packet, pdu)
        if c.corrupt_rate and rng.random() < c.corrupt_rate:
            self.stats.corrupted += 1
            flipped = bytearray(packet)
            # Past the space packet header: a damaged header is a lost packet on a real link
            # too (the frame layer would not deliver it), and the PDU CRC is what is tested.
            at = rng.randrange(6, len(flipped)) if len(flipped) > 6 else 0
            flipped[at] ^= 1 << rng.randrange(8)
            packet = bytes(flipped)
        copies = 2 if c.duplicate_rate and rng.random() < c.duplicate_rate else 1
        self.stats.duplicated += copies - 1
        for _ in range(copies):
            if c.reorder_rate and rng.random() < c.reorder_rate:
                self.stats.reordered += 1
                self._held.append([rng.randint(1, c.reorder_depth), packet])
                self._held.sort(key=lambda hold: hold[0])
            else:
                out.append(packet)
        return out

    def _damage_segment(self, packet: bytes, pdu: bytes | None) -> bytes:
        """Flip a bit of the file data and frame it again with valid CRCs: an upset in a
        buffer before the PDU was framed, which nothing on the link can see."""
        try:
            fd = FileDataPdu.unpack(pdu or b"")
        except _UNDECODABLE:
            return packet
        if not fd.file_data:
            return packet
        data = bytearray(fd.file_data)
        data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        damaged = FileDataPdu(fd.pdu_header.pdu_conf,
                              FileDataParams(file_data=bytes(data), offset=fd.offset))
        header, _ = split_packet(packet)
        self.stats.segments_corrupted += 1
        return space_packet(header.apid, header.seq_count, bytes(damaged.pack()),
                            packet_type=header.packet_type)

    def flush(self) -> list[bytes]:
        held = [hold[1] for hold in self._held]
        self._held.clear()
        return held


# The radio's transmit buffer, in seconds of the link: it goes on sending while the flight CPU
# is busy elsewhere for a moment (a checksum, a Finished to handle), so the link does not lose
# that time for good; it never lets the sender beat the bitrate on average.
_LINK_BUFFER_S = 0.01


class _Pacer:
    """Holds the sender to ``bitrate_bps`` (a token bucket of ``_LINK_BUFFER_S``)."""

    def __init__(self, bitrate_bps: float | None) -> None:
        self.bitrate = bitrate_bps
        self._free_at = 0.0

    def wait(self, nbytes: int) -> None:
        if not self.bitrate:
            return
        now = time.monotonic()
        self._free_at = max(self._free_at, now - _LINK_BUFFER_S) + nbytes * 8 / self.bitrate
        ahead = self._free_at - now
        if ahead > 0.001:
            time.sleep(ahead)


class FlightLink(Protocol):
    """What the flight side needs of a link: send down, receive up, the pass's end."""

    down: LinkStats
    up: LinkStats

    def send(self, packet: bytes) -> bool:
        """Put one packet on the downlink; False once the pass budget is spent."""
        ...

    def receive(self, timeout: float) -> list[bytes]:
        """Packets from the ground, waiting up to ``timeout`` seconds when there are none."""
        ...

    def start_pass(self, budget_bytes: int | None) -> None:
        """A new contact window with ``budget_bytes`` on the wire (None: no end)."""
        ...

    @property
    def closed(self) -> bool: ...


class _LinkBase:
    def __init__(self, config: CfdpLinkConfig) -> None:
        self.config = config
        self.down = LinkStats()
        self.up = LinkStats()
        self.down_impairments = Impairments(config, self.down, config.seed, CFDP_DOWN_APID)
        self.up_impairments = Impairments(config, self.up, config.seed + 1, CFDP_UP_APID)
        self.pacer = _Pacer(config.bitrate_bps)
        self._budget_left: int | None = config.pass_budget_bytes

    def start_pass(self, budget_bytes: int | None) -> None:
        self._budget_left = budget_bytes
        self.pacer = _Pacer(self.config.bitrate_bps)

    @property
    def closed(self) -> bool:
        return self._budget_left is not None and self._budget_left <= 0

    def _admit(self, packet: bytes) -> bool:
        """Count a packet against the pass's bytes; False (and the pass is over) when it does
        not fit. Telemetry shares the window with the products: it goes first at each contact,
        within its own budget too (the packer keeps to it), and the pass plans the products in
        what it leaves."""
        telemetry = len(packet) > 1 and ((packet[0] & 0x07) << 8 | packet[1]) != CFDP_DOWN_APID
        if self._budget_left is not None:
            if len(packet) > self._budget_left:
                self._budget_left = 0
                self.down.refused_after_pass += 1
                return False
            self._budget_left -= len(packet)
        if telemetry:
            self.down.telemetry_bytes += len(packet)
        self.pacer.wait(len(packet))
        self.down.packets += 1
        self.down.bytes += len(packet)
        with contextlib.suppress(*_UNDECODABLE, PacketError):
            pdu = _pdu_of(packet, CFDP_DOWN_APID)
            if pdu is not None and not PduFactory.is_file_directive(pdu):
                self.down.file_data_bytes += len(FileDataPdu.unpack(pdu).file_data)
        return True


class SimulatedLink(_LinkBase):
    """The flight side and an in-process :class:`GroundStation`, with impairments both ways."""

    def __init__(self, ground: GroundStation, config: CfdpLinkConfig) -> None:
        super().__init__(config)
        self.ground = ground
        self._inbox: deque[bytes] = deque()
        self._polled = 0.0

    def send(self, packet: bytes) -> bool:
        if not self._admit(packet):
            return False
        for delivered in self.down_impairments.apply(packet):
            self._to_ground(delivered)
        return True

    def _to_ground(self, packet: bytes) -> None:
        for reply in self.ground.receive(packet):
            self._up(reply)

    def _up(self, reply: bytes) -> None:
        self.up.packets += 1
        self.up.bytes += len(reply)
        self._inbox.extend(self.up_impairments.apply(reply))

    def receive(self, timeout: float) -> list[bytes]:
        now = time.monotonic()
        if now - self._polled > 0.005:  # the ground's timers, a few times per ten ms
            self._polled = now
            for reply in self.ground.poll():
                self._up(reply)
        if not self._inbox and timeout > 0:
            # Quiet: what was held back for reordering arrives now.
            for packet in self.down_impairments.flush():
                self._to_ground(packet)
            self._inbox.extend(self.up_impairments.flush())
            if not self._inbox:
                time.sleep(min(timeout, 0.002))
        out = list(self._inbox)
        self._inbox.clear()
        return out


class UdpLink(_LinkBase):
    """The flight side of a UDP link to :func:`serve_udp` (``onboard ground --listen``)."""

    def __init__(self, config: CfdpLinkConfig, host: str | None = None,
                 port: int | None = None) -> None:
        super().__init__(config)
        self.address = (host or config.host, port or config.port)
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.connect(self.address)
            self.sock.setblocking(False)
        except OSError as error:
            raise StorageError(None, f"cfdp link: cannot reach {self.address[0]}:"
                                     f"{self.address[1]}: {error}") from error
        self.refused = 0  # datagrams the host refused (no ground listening yet)

    def send(self, packet: bytes) -> bool:
        if not self._admit(packet):
            return False
        for delivered in self.down_impairments.apply(packet):
            self._send(delivered)
        return True

    def _send(self, packet: bytes) -> None:
        try:
            self.sock.send(packet)
        except (BlockingIOError, ConnectionRefusedError):
            self.refused += 1  # as good as lost: CFDP sends it again

    def receive(self, timeout: float) -> list[bytes]:
        out = self._drain()
        if not out and timeout > 0:
            for packet in self.down_impairments.flush():
                self._send(packet)
            out = list(self.up_impairments.flush())
            if not out:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if ready:
                    out = self._drain()
        return out

    def _drain(self) -> list[bytes]:
        out: list[bytes] = []
        while True:
            try:
                packet = self.sock.recv(65536)
            except (BlockingIOError, ConnectionRefusedError):
                return out
            self.up.packets += 1
            self.up.bytes += len(packet)
            out.extend(self.up_impairments.apply(packet))

    def close(self) -> None:
        self.sock.close()


# -- flight side -----------------------------------------------------------------------------------

class _DurableSeqCount(ProvidesSeqCount):
    """Transaction sequence numbers that survive a kill: numbers are reserved in blocks whose
    end is written (atomically) before the first of them is used, so a restart may skip some
    but never reuses one: the ground keys its transactions by them."""

    BLOCK = 64

    def __init__(self, path: Path) -> None:
        self.path = path
        # A flight side whose state was lost (a fresh output folder) must not reuse the numbers
        # of its earlier life, which a long-running ground still remembers: start anywhere.
        start = secrets.randbits(31)
        if path.exists():
            try:
                start = int(json.loads(path.read_text(encoding="utf-8"))["next"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise StorageError(path, f"cannot read the CFDP sequence count: {error}") from error
        self._next = start
        self._limit = start
        self._width = 32

    @property
    def max_bit_width(self) -> int:
        return self._width

    @max_bit_width.setter
    def max_bit_width(self, width: int) -> None:
        self._width = width

    def get_and_increment(self) -> int:
        if self._next >= self._limit:
            self._limit = self._next + self.BLOCK
            write_json(self.path, {"next": self._limit})
        value = self._next
        self._next += 1
        return value % (1 << self._width)


class _ProductFilestore(NativeFilestore):
    """Reads the product being sent through one open descriptor (cfdp-py's own filestore opens
    the file again for every segment), under the name it has on the ground: the Metadata PDU
    carries the source file name, and the flight side's folders are none of the ground's
    business (nor worth the octets a STAC Item needs)."""

    def __init__(self) -> None:
        super().__init__()
        self._path: Path | None = None
        self._fd: int | None = None
        self.names: dict[Path, Path] = {}  # the name sent -> the file read

    def _real(self, file: Path) -> Path:
        return self.names.get(file, file)

    def file_exists(self, path: Path) -> bool:
        return super().file_exists(self._real(path))

    def file_size(self, file: Path) -> int:
        return super().file_size(self._real(file))

    def calculate_checksum(self, checksum_type: ChecksumType, file_path: Path,
                           size_to_verify: int, segment_len: int = 4096) -> bytes:
        return super().calculate_checksum(checksum_type, self._real(file_path), size_to_verify,
                                          segment_len)

    def _open(self, file: Path) -> int:
        file = self._real(file)
        if self._fd is None or self._path != file:
            self.close()
            self._fd = os.open(file, os.O_RDONLY)
            self._path = file
        return self._fd

    def read_data(self, file: Path, offset: int | None, read_len: int | None = None) -> bytes:
        fd = self._open(file)
        if read_len is None:
            read_len = os.fstat(fd).st_size
        return os.pread(fd, read_len, offset or 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._path = None


class _SourceUser(_QuietUser):
    def __init__(self) -> None:
        self.files = _ProductFilestore()
        super().__init__(self.files)
        self.finished: Any = None

    def transaction_finished_indication(self, params: Any) -> None:
        self.finished = params.finished_params


@dataclass
class TransferResult:
    """One product's CFDP transaction, as the flight side saw it."""

    item_id: str
    acknowledged: bool
    reason: str  # "complete", or why not
    nbytes: int
    seconds: float
    transaction: tuple[int, int] | None = None
    condition: str | None = None
    delivery: str | None = None
    faults: list[str] = field(default_factory=list)
    error: str | None = None  # the product could not be read: nothing was sent

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_WAITING = (SourceStep.WAITING_FOR_EOF_ACK, SourceStep.WAITING_FOR_FINISHED)
_FILE_PHASE = (SourceStep.TRANSACTION_START, SourceStep.SENDING_METADATA,
               SourceStep.SENDING_FILE_DATA, SourceStep.SENDING_EOF)


class _Slot:
    """One source handler and the transaction it carries (a handler holds one at a time)."""

    def __init__(self, transmitter: CfdpTransmitter) -> None:
        config = transmitter.config
        self.faults = _Faults()
        self.user = _SourceUser()
        self.source = SourceHandler(
            LocalEntityConfig(config.flight_id, _INDICATIONS, self.faults), self.user,
            RemoteEntityConfigTable([config.remote(config.ground_id)]),
            _Timers(config.ack_timeout_s), transmitter.seq)
        self.begin("", 0, 0.0)

    def begin(self, item_id: str, nbytes: int, deadline: float) -> None:
        self.item_id = item_id
        self.nbytes = nbytes
        self.started = self.heard = self.polled = time.monotonic()
        self.deadline = deadline
        self.key: tuple[int, int] | None = None
        self.held_finished: Any = None
        self.last_eof: bytes | None = None
        self.user.finished = None
        self.faults.faults = []

    @property
    def in_file_phase(self) -> bool:
        return self.source.state != CfdpState.IDLE and self.source.step in _FILE_PHASE


class CfdpTransmitter:
    """A :class:`~.link.Transmitter` over CFDP Class 2: one transaction per product, up to
    ``config.window`` of them in flight (:meth:`transfer_many`)."""

    def __init__(self, config: CfdpLinkConfig, link: FlightLink, state_dir: str | Path,
                 telemetry: Telemetry | None = None) -> None:
        self.config = config
        self.link = link
        self.telemetry = telemetry
        state = Path(state_dir)
        self.state_dir = state
        self.seq = _DurableSeqCount(state / "cfdp-seq.json")
        # One source handler per transaction in flight: a cfdp-py handler carries one at a time.
        self._slots = [_Slot(self) for _ in range(config.window)]
        self.framer = _Framer(CFDP_DOWN_APID, PacketType.TM)
        self.packer = TelemetryPacker(max_packet=config.pdu_size)
        # Transactions finished here, for answering a Finished the ground repeats because our
        # ACK(Finished) was lost (work-around 3).
        self._finished: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.results: list[TransferResult] = []
        self.refused_pdus = 0
        self.undecodable = 0
        self.finished_reacked = 0
        self.eof_resent = 0
        self.items_too_big = 0  # STAC Items left out of a Metadata PDU they would not fit
        # Metadata PDUs' octets so far (sum, count), and the product bytes begun, for what the
        # next product will cost the pass.
        self._metadata_octets = (0, 0)
        self._product_bytes = 0

    def send(self, item_id: str, path: Path, sha256: str) -> bool:
        return self.transfer(item_id, path, sha256).acknowledged

    def overhead_bytes(self, nbytes: int) -> int:
        """Octets a product of ``nbytes`` puts on the downlink beyond its own: a Space Packet
        and PDU header per file-data segment, its Metadata PDU (the STAC Item in it: the mean of
        those sent so far) and its EOF. The planner and the drain charge it with the product,
        so a pass of many small products still fits its window. Retransmissions are charged at
        the share of file data re-sent so far (before any: the simulator's loss rate, none on a
        real link, whose loss the pass's margin covers)."""
        c = self.config
        header = _pdu_header_octets(c)
        per_segment = SPACE_PACKET_HEADER + header + 4  # + the segment's 4-octet offset
        segment = max(1, c.pdu_size - header - 4)
        if self._product_bytes:
            resent = max(0.0, self.link.down.file_data_bytes / self._product_bytes - 1.0)
        else:
            resent = c.drop_rate
        sent = int(nbytes) * (1.0 + resent)
        segments = max(1.0, sent / segment)
        total, count = self._metadata_octets
        # Before any product was sent: a tile's Item, compressed, is about 600 octets.
        metadata = total / count if count else SPACE_PACKET_HEADER + header + 12 + 100 + 600
        eof = SPACE_PACKET_HEADER + header + 1 + 1 + 4 + 8
        return int(round(sent - int(nbytes) + segments * per_segment + metadata + eof))

    def start_pass(self, budget_bytes: int | None) -> None:
        self.link.start_pass(budget_bytes)

    def end_pass(self) -> None:
        """After a drain: an in-process ground writes its catalogue and telemetry."""
        ground = getattr(self.link, "ground", None)
        if isinstance(ground, GroundStation):
            ground.flush()

    @property
    def link_bytes(self) -> int:
        """Octets put on the downlink so far (CFDP and telemetry packets, before loss)."""
        return self.link.down.bytes

    def transfer(self, item_id: str, path: str | Path, sha256: str) -> TransferResult:
        """One product, alone on the link."""
        items = iter([(item_id, Path(path), sha256)])
        results = list(self.transfer_many(lambda: next(items, None)))
        if results[0].error is not None:
            raise StorageError(Path(path), results[0].error)
        return results[0]

    def transfer_many(self, pull: Callable[[], tuple[str, Path, str] | None]
                      ) -> Iterator[TransferResult]:
        """Send what ``pull()`` hands out (``(id, path, sha256)``, None when there is no more),
        a transaction per product; yield each result as its transaction ends.

        Transactions overlap: the next product's Metadata goes out as soon as every transaction
        in flight has sent its EOF, so the link carries one product's file data at a time, in
        the order ``pull`` gives, while the others wait for their ACK(EOF), NAKs and Finished
        (up to ``config.window`` in flight). Retransmissions go out as the NAKs come, ahead of
        new file data. ``pull`` is called only when a transaction can start, so the caller
        decides on what is left of its budget at that moment. A product that cannot be read is
        a result with ``error`` set (the link goes on)."""
        active: list[_Slot] = []
        free = list(self._slots)
        exhausted = False
        while True:
            if not exhausted and free and not any(s.in_file_phase for s in active):
                item = pull()
                if item is None:
                    exhausted = True
                else:
                    slot = free.pop(0)
                    failed = self._begin(slot, *item, ahead=sum(s.nbytes for s in active))
                    if failed is not None:
                        free.insert(0, slot)
                        yield failed
                        continue
                    active.append(slot)
            if not active:
                if exhausted:
                    return
                continue
            cut = not self._advance(active)
            for slot in list(active):
                done = cut or slot.source.state == CfdpState.IDLE
                reason = "pass over" if cut and slot.source.state != CfdpState.IDLE else ""
                if not done and time.monotonic() > slot.deadline:
                    done = True
                    reason = (f"no Finished PDU within {slot.deadline - slot.started:.1f} s "
                              f"({slot.source.step.name.lower()})")
                if done:
                    active.remove(slot)
                    free.append(slot)
                    yield self._end(slot, reason)
            if cut:
                # The pass is over: nothing more starts (what ``pull`` would give waits).
                for slot in active:
                    free.append(slot)
                    yield self._end(slot, "pass over")
                return

    def _begin(self, slot: _Slot, item_id: str, path: Path, sha256: str, *, ahead: int
               ) -> TransferResult | None:
        """Start a transaction on ``slot``; a result when it cannot start."""
        started = time.monotonic()
        try:
            nbytes = path.stat().st_size
        except OSError as error:
            result = self._result(item_id, False, "unreadable", 0, started, None)
            result.error = f"cannot send {item_id!r}: {error.strerror or error}"
            return result
        if self.link.closed:
            return self._result(item_id, False, "pass over", nbytes, started, None)
        budget_s = self.config.transaction_timeout_s
        if self.config.bitrate_bps:
            # The transactions ahead of it share the link with it.
            budget_s += 3 * (nbytes + ahead) * 8 / self.config.bitrate_bps
        slot.begin(item_id, nbytes, started + budget_s)
        dest = stored_name(item_id)
        c = self.config
        # What the Metadata PDU holds besides its TLVs: PDU header (fixed part, two entity
        # ids, a 4-octet sequence number, the CRC), directive code, flags, file size (8 octets
        # at most), the two file names with their lengths.
        room = c.pdu_size - _pdu_header_octets(c) - (
            1 + 1 + 8 + 2 + 2 * len(dest))
        messages = _tags(item_id, sha256, self._item_of(path, sha256), room=room)
        if messages is None:
            # The Item does not fit one PDU: the product goes without it (counted), named and
            # checked by its SHA-256 as before.
            self.items_too_big += 1
            messages = _tags(item_id, sha256)
        self._product_bytes += nbytes
        total, count = self._metadata_octets
        self._metadata_octets = (total + SPACE_PACKET_HEADER + (c.pdu_size - room) + sum(
            2 + len(m.value) for m in messages), count + 1)
        slot.user.files.names = {Path(dest): path}
        request = PutRequest(destination_id=self.config.ground_id, source_file=Path(dest),
                             dest_file=Path(dest),
                             trans_mode=TransmissionMode.ACKNOWLEDGED, closure_requested=True,
                             msgs_to_user=messages)
        if not slot.source.put_request(request):
            slot.source.reset()
            slot.source.put_request(request)
        return None

    def _item_of(self, path: Path, sha256: str) -> bytes | None:
        """The product's STAC Item (its JSON beside it, as the pipeline writes it), compressed
        for the Metadata PDU; None when there is none or it does not describe this file."""
        try:
            item = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(item, dict) or sha256 not in json.dumps(item.get("assets", {})):
            return None
        packer = zlib.compressobj(9, zdict=_ITEM_ZDICT)
        raw = json.dumps(item, separators=(",", ":")).encode("utf-8")
        return packer.compress(raw) + packer.flush()

    def _advance(self, active: list[_Slot]) -> bool:
        """One turn of every transaction in flight: take what the ground sent, run the
        handlers, put their PDUs on the link; False when the pass ended."""
        by_key = {slot.key: slot for slot in active if slot.key is not None}
        sending = any(s.in_file_phase for s in active)
        for packet in self.link.receive(0.0 if sending else 0.002):
            pdu = self._decode(packet)
            if pdu is None:
                continue
            slot = by_key.get(_key(pdu))
            if slot is None:
                self._answer_old(pdu)
                continue
            slot.heard = time.monotonic()
            if isinstance(pdu, FinishedPdu) and slot.source.step == SourceStep.WAITING_FOR_EOF_ACK:
                # Work-around 3: the Finished overtook a lost ACK(EOF); cfdp-py would drop it,
                # so it waits until the ACK(EOF) comes (the ground sends one for every EOF
                # repeated on the ACK timer).
                slot.held_finished = pdu
                continue
            if not self._step(slot, pdu):
                return False
            slot.polled = slot.heard
        now = time.monotonic()
        for slot in active:
            if slot.source.state == CfdpState.IDLE:
                continue
            step = slot.source.step
            if slot.held_finished is not None and step == SourceStep.WAITING_FOR_FINISHED:
                pdu, slot.held_finished = slot.held_finished, None
                if not self._step(slot, pdu):
                    return False
                continue
            if step in _WAITING and now - slot.polled < 0.002:
                continue  # its timers are run a few times per ms, not once per PDU sent
            slot.polled = now
            if not self._step(slot, None):
                return False
            if slot.key is None and slot.source.transaction_id is not None:
                tid = slot.source.transaction_id
                slot.key = (int(tid.source_id.value), int(tid.seq_num.value))
            if step == SourceStep.WAITING_FOR_FINISHED and slot.last_eof is not None \
                    and now - slot.heard > 2 * self.config.ack_timeout_s:
                # Work-around 3: cfdp-py waits for a Finished with no timer in acknowledged
                # mode; if every repetition of it was lost, the EOF is sent again, which the
                # ground answers with ACK(EOF) and its Finished.
                slot.heard = now
                self.eof_resent += 1
                if not self.link.send(slot.last_eof):
                    return False
        return True

    def _end(self, slot: _Slot, reason: str) -> TransferResult:
        if slot.source.state != CfdpState.IDLE:
            slot.source.reset()
        slot.user.files.close()
        finished = slot.user.finished
        key = slot.key
        if key is not None and finished is not None:
            self._finished[key] = None
            while len(self._finished) > 1024:
                self._finished.popitem(last=False)
        ok = (not reason and finished is not None
              and finished.condition_code == ConditionCode.NO_ERROR
              and finished.delivery_code == DeliveryCode.DATA_COMPLETE)
        if not reason:
            reason = "complete" if ok else (
                f"Finished {finished.condition_code.name}/{finished.delivery_code.name}"
                if finished is not None else "abandoned: " + ",".join(slot.faults.faults))
        return self._result(slot.item_id, ok, reason, slot.nbytes, slot.started, key, finished,
                            slot.faults.faults)

    def _result(self, item_id: str, ok: bool, reason: str, nbytes: int, started: float,
                key: tuple[int, int] | None, finished: Any = None,
                faults: list[str] | None = None) -> TransferResult:
        result = TransferResult(item_id, ok, reason, nbytes, round(time.monotonic() - started, 4),
                                key, finished.condition_code.name if finished else None,
                                finished.delivery_code.name if finished else None,
                                list(faults or []))
        self.results.append(result)
        if self.telemetry is not None:
            self.telemetry.emit("downlink.cfdp", detail=True, **result.to_dict())
        return result

    def _step(self, slot: _Slot, pdu: Any) -> bool:
        """One state-machine call, its PDUs onto the link; False when the pass ended."""
        try:
            slot.source.state_machine(pdu)
        except _PDU_REFUSED:
            self.refused_pdus += 1
        source = slot.source
        sent = False
        while source.packets_ready:
            holder = source.get_next_packet()
            if holder is None:
                break
            packet = self.framer.wrap(bytes(holder.pdu.pack()))
            if holder.pdu_directive_type == DirectiveType.EOF_PDU:
                slot.last_eof = packet
            if not self.link.send(packet):
                return False
            sent = True
        if sent and source.step in _WAITING:
            # Retransmissions paced onto a slow link take time: the Finished is awaited from
            # when they went out, not from the NAK.
            slot.heard = time.monotonic()
        return True

    def _decode(self, packet: bytes) -> Any:
        try:
            raw = _pdu_of(packet, CFDP_UP_APID)
            return None if raw is None else PduFactory.from_raw(raw)
        except (*_UNDECODABLE, PacketError):
            self.undecodable += 1
            return None

    def idle(self, seconds: float) -> None:
        """Keep answering the ground for ``seconds`` between transfers (the end of a pass): a
        Finished it repeats because our ACK(Finished) was lost gets its ACK."""
        until = time.monotonic() + seconds
        while time.monotonic() < until and not self.link.closed:
            for packet in self.link.receive(0.005):
                pdu = self._decode(packet)
                if pdu is not None:
                    self._answer_old(pdu)

    def _answer_old(self, pdu: Any) -> None:
        """A repeated Finished of a transaction that finished here: our ACK was lost."""
        if isinstance(pdu, FinishedPdu) and _key(pdu) in self._finished:
            self.finished_reacked += 1
            ack = AckPdu(pdu.pdu_header.pdu_conf, DirectiveType.FINISHED_PDU,
                         pdu.condition_code, TransactionStatus.TERMINATED)
            self.link.send(self.framer.wrap(bytes(ack.pack())))

    def send_telemetry(self, records: list[dict[str, Any]],
                       budget_bytes: int | None = None) -> PackReport:
        """Telemetry records as space packets onto the link, within ``budget_bytes``."""
        report = PackReport()
        for packet in self.packer.pack(records, budget_bytes, report):
            if not self.link.send(packet):
                report.unsent += 1
        return report

    def send_telemetry_file(self, path: Path | None, budget_bytes: int | None
                            ) -> dict[str, Any]:
        """The records written to the JSON-lines file ``path`` since the last call, as space
        packets within ``budget_bytes`` (whole records, in order; one that does not fit is
        counted and stays on board, in the file). Where the last call stopped is kept in the
        state folder, so a restarted run does not send the same records again (a kill between
        sending and keeping it sends some twice: telemetry is at least once)."""
        if path is None:
            return {"records": 0}
        state = self.state_dir / "cfdp-telemetry.json"
        offset = 0
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            kept = json.loads(state.read_text(encoding="utf-8"))
            if not self.packer.counts:
                # The sequence counts run on across a restart: the ground reads a jump in
                # them as packets lost.
                self.packer.counts = {int(a): int(n) for a, n in kept["counts"].items()}
            if kept["path"] == str(path):
                offset = int(kept["offset"])
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if offset > size:  # a new file under the same name
                    offset = 0
                handle.seek(offset)
                chunk = handle.read(size - offset)
        except OSError as error:
            raise StorageError(path, f"cannot read telemetry: {error.strerror or error}") \
                from error
        whole = chunk[:chunk.rfind(b"\n") + 1]  # a line being written is sent next time
        records = read_jsonl(whole.decode("utf-8", "replace"), str(path))
        report = self.send_telemetry(records, budget_bytes)
        write_json(state, {"path": str(path), "offset": offset + len(whole),
                           "counts": {str(a): n for a, n in self.packer.counts.items()}})
        return {"records": report.records, "packets": report.packets, "bytes": report.bytes,
                "left_on_board": report.dropped, "unsent": report.unsent,
                "by_apid": {f"{apid:#05x}": n for apid, n in sorted(report.by_apid.items())}}


# -- ground side -----------------------------------------------------------------------------------

class _DestHandler(DestHandler):
    """cfdp-py's destination handler with work-around 2.

    In 0.7.0 ``_AckedModeParams.lost_seg_tracker`` is ``field(default=LostSegmentTracker())``: one
    tracker shared by every transaction of every handler in the process, never cleared when a
    transaction ends, so concurrent transactions (and one that follows an abandoned one) see
    each other's gaps. Every field wrapper the handler installs gets a tracker of its own.
    """

    @property  # type: ignore[override]
    def _params(self) -> Any:
        return self.__dict__["_own_params"]

    @_params.setter
    def _params(self, value: Any) -> None:
        value.acked_params.lost_seg_tracker = LostSegmentTracker()
        self.__dict__["_own_params"] = value


class _Discarded(Exception):
    """Thrown into a staging file's ``atomic_path`` to remove it."""


class _StagingFilestore(NativeFilestore):
    """Where one transaction's file is written: the hidden partial file of an ``atomic_path``
    onto the receiver's inbox (the one write path), renamed into place only when the transfer
    is complete; a killed ground leaves a partial that the next start removes."""

    def __init__(self, inbox: Path) -> None:
        super().__init__()
        self.inbox = inbox
        self.name: Path | None = None
        self._staging: contextlib.AbstractContextManager[Path] | None = None
        self.tmp: Path | None = None
        self._fd: int | None = None

    def _fd_for(self, file: Path) -> int:
        if self._fd is None or file != self.name:
            raise StagedFileMissingError(file)
        return self._fd

    def is_directory(self, path: Path) -> bool:
        return False

    def file_exists(self, path: Path) -> bool:
        return self._fd is not None and path == self.name

    def create_file(self, file: Path) -> FilestoreResponseStatusCode:
        name = file.as_posix()
        if not name or "/" in name or "\\" in name or name.startswith(".") or len(name) > 200:
            # cfdp-py turns this into a Filestore Rejection fault: the sender named a path, not
            # a product.
            raise ProductNameError(f"not a product file name: {name!r}")
        self.discard()
        self._staging = atomic_path(self.inbox / name)
        self.tmp = self._staging.__enter__()
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.name = file
        return FilestoreResponseStatusCode.CREATE_SUCCESS

    def truncate_file(self, file: Path) -> None:
        os.ftruncate(self._fd_for(file), 0)

    def write_data(self, file: Path, data: bytes, offset: int | None) -> None:
        os.pwrite(self._fd_for(file), data, offset or 0)

    def file_size(self, file: Path) -> int:
        return os.fstat(self._fd_for(file)).st_size

    def read_data(self, file: Path, offset: int | None, read_len: int | None = None) -> bytes:
        fd = self._fd_for(file)
        return os.pread(fd, os.fstat(fd).st_size if read_len is None else read_len, offset or 0)

    def calculate_checksum(self, checksum_type: ChecksumType, file_path: Path,
                           size_to_verify: int, segment_len: int = 4096) -> bytes:
        self._fd_for(file_path)
        assert self.tmp is not None
        return super().calculate_checksum(checksum_type, self.tmp, size_to_verify, segment_len)

    def delete_file(self, file: Path) -> FilestoreResponseStatusCode:
        self.discard()
        return FilestoreResponseStatusCode.DELETE_SUCCESS

    @property
    def open(self) -> bool:
        return self._fd is not None

    def commit(self) -> Path:
        """Make the staged file durable under its name in the inbox."""
        assert self._staging is not None and self._fd is not None and self.name is not None
        os.close(self._fd)
        self._fd = None
        staging, self._staging = self._staging, None
        staging.__exit__(None, None, None)
        return self.inbox / self.name.as_posix()

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._staging is not None:
            staging, self._staging = self._staging, None
            with contextlib.suppress(_Discarded):
                staging.__exit__(_Discarded, _Discarded(), None)


class _GroundUser(_QuietUser):
    def __init__(self, transaction: _GroundTransaction, inbox: Path) -> None:
        self.files = _StagingFilestore(inbox)
        super().__init__(self.files)
        self.transaction = transaction

    def metadata_recv_indication(self, params: Any) -> None:
        tags = _read_tags(params.msgs_to_user)
        self.transaction.item_id, self.transaction.sha256 = tags.product
        self.transaction.item = tags.item
        self.transaction.item_broken = tags.item_broken

    def eof_recv_indication(self, transaction_id: TransactionId) -> None:
        self.transaction.eof_seen = True

    def transaction_finished_indication(self, params: Any) -> None:
        self.transaction.complete(params.finished_params)


_EARLY_PDUS = 256  # file-data PDUs a transaction keeps while its Metadata PDU is late


class _GroundTransaction:
    """One transaction on the ground: its own handler, user and staging file."""

    def __init__(self, station: GroundStation, key: tuple[int, int]) -> None:
        self.station = station
        self.key = key
        self.user = _GroundUser(self, station.receiver.inbox)
        self.handler = _DestHandler(
            LocalEntityConfig(station.config.ground_id, _INDICATIONS, station.faults),
            self.user, station.remotes, _Timers(station.config.ack_timeout_s))
        self.item_id: str | None = None
        self.sha256: str | None = None
        self.item: dict[str, Any] | None = None
        self.item_broken = False
        self.held_eof: EofPdu | None = None  # an EOF that came with gaps, for the grace
        self.early: list[FileDataPdu] = []  # file data that came before the Metadata PDU
        self.hold_until = 0.0
        self.hold_until_packet = 0
        self._grace_over = False
        self.eof_seen = False
        self.eof: EofPdu | None = None
        self.completed = False
        self.outcome = "open"
        self.last_finished: bytes | None = None
        self.finished_sent = 0
        self.last_heard = time.monotonic()

    def feed(self, pdu: Any) -> list[bytes]:
        self.last_heard = time.monotonic()
        if self.handler.state == CfdpState.IDLE and not self.completed:
            # File data that overtook the Metadata PDU (reordered behind it): cfdp-py would
            # drop it and NAK the whole file up to it once the EOF came, so it waits here for
            # the Metadata and is handed over behind it.
            if isinstance(pdu, FileDataPdu) and len(self.early) < _EARLY_PDUS:
                self.early.append(pdu)
                return []
            if isinstance(pdu, MetadataPdu):
                out = self._feed(pdu)
                early, self.early = self.early, []
                for data in early:
                    out += self._feed(data)
                return out
        if self.early:
            # The Metadata is lost (an EOF came first) or too much came before it: what
            # arrived goes to the handler in order, as without the wait.
            early, self.early = self.early, []
            out = []
            for data in early:
                out += self._feed(data)
            return out + self._feed(pdu)
        return self._feed(pdu)

    def _feed(self, pdu: Any) -> list[bytes]:
        if isinstance(pdu, EofPdu):
            self.eof = pdu
            if not self.eof_seen and not self._grace_over and self._has_gaps(pdu) \
                    and self.station.config.eof_grace_s > 0:
                # Held for the grace (its ACK too: well within the sender's ACK timer), so
                # that what was reordered behind it fills its gaps instead of being NAKed.
                if self.held_eof is None:
                    self.hold_until = self.last_heard + self.station.config.eof_grace_s
                    self.hold_until_packet = (self.station.stats["pdus"]
                                              + self.station.config.eof_grace_packets)
                self.held_eof = pdu
                return []
        if isinstance(pdu, EofPdu) and self.eof_seen and not self._forgot_eof:
            # Work-around 3: the source repeats its EOF because our ACK(EOF) was lost, and
            # cfdp-py's handler ignores an EOF once it has one. Acknowledge it again, and send
            # the Finished again if there is one.
            self.station.stats["eof_reacked"] += 1
            out = [bytes(AckPdu(pdu.pdu_header.pdu_conf, DirectiveType.EOF_PDU,
                                pdu.condition_code, TransactionStatus.ACTIVE).pack())]
            return out + ([self.last_finished] if self.last_finished else [])
        out = self._run(pdu)
        if self.held_eof is not None and not self._has_gaps(self.held_eof):
            out += self._release_eof()
        if self._forgot_eof and self.eof is not None:
            # Work-around 5: an EOF that came before the (lost, then re-sent) Metadata PDU is
            # forgotten by cfdp-py when the Metadata arrives (it goes back to receiving file
            # data and would wait for ever); the EOF it had is handed to it again.
            self.station.stats["eof_refed"] += 1
            out += self._run(self.eof)
        return out

    @property
    def _forgot_eof(self) -> bool:
        return self.eof_seen and self.handler.step == DestStep.RECEIVING_FILE_DATA

    def _has_gaps(self, eof: EofPdu) -> bool:
        """Whether file data is missing that the EOF would have NAKed (metadata received)."""
        handler = self.handler
        if handler.step != DestStep.RECEIVING_FILE_DATA:
            return False
        acked = handler._params.acked_params
        return acked.lost_seg_tracker.num_lost_segments > 0 or handler.progress < eof.file_size

    def _release_eof(self) -> list[bytes]:
        eof, self.held_eof = self.held_eof, None
        self._grace_over = True
        return self._feed(eof) if eof is not None else []

    def poll(self) -> list[bytes]:
        if self.held_eof is not None and (time.monotonic() >= self.hold_until
                                          or self.station.stats["pdus"]
                                          >= self.hold_until_packet):
            self.station.stats["eof_held"] += 1
            return self._release_eof()
        if self.handler.state == CfdpState.IDLE:
            return []
        return self._run(None)

    def _run(self, pdu: Any) -> list[bytes]:
        try:
            self.handler.state_machine(pdu)
        except _PDU_REFUSED:
            self.station.stats["refused_pdus"] += 1
        except ValueError:
            # cfdp-py's lost-segment tracker refuses a segment that partly overlaps a gap;
            # the segment is lost to it, and the NAK procedure asks for it again.
            self.station.stats["refused_pdus"] += 1
        acked = self.handler._params.acked_params
        if acked.metadata_missing and acked.lost_seg_tracker.num_lost_segments > 1:
            # Work-around 6: while the Metadata PDU is missing, cfdp-py adds (0, progress) to
            # its gap list for every file-data PDU and never merges them; each NAK round then
            # asks for the file again once per PDU received (a retransmission storm that
            # grows with itself). Merged, it is one request for what came so far.
            acked.lost_seg_tracker.coalesce_lost_segments()
        out: list[bytes] = []
        while self.handler.packets_ready:
            holder = self.handler.get_next_packet()
            if holder is None:
                break
            raw = bytes(holder.pdu.pack())
            if holder.pdu_directive_type == DirectiveType.FINISHED_PDU:
                self.last_finished = raw
                self.finished_sent += 1
            out.append(raw)
        return out

    @property
    def done(self) -> bool:
        return self.completed and self.handler.state == CfdpState.IDLE

    def complete(self, finished: Any) -> None:
        """The handler's transfer completion: the SHA-256 decides, not CFDP (work-around 1)."""
        if self.completed:
            # cfdp-py calls this again when it cancels after its ACK limit; the first verdict
            # is the one that went out.
            return
        self.completed = True
        files = self.user.files
        station = self.station
        cfdp_ok = (finished.condition_code == ConditionCode.NO_ERROR
                   and finished.delivery_code == DeliveryCode.DATA_COMPLETE)
        if not cfdp_ok or not files.open or self.item_id is None or self.sha256 is None \
                or files.name is None or files.name.as_posix() != stored_name(self.item_id):
            files.discard()
            self.outcome = "incomplete" if not cfdp_ok else "unnamed"
            if cfdp_ok:  # CFDP says complete, but nothing names the product: not stored
                finished.condition_code = ConditionCode.FILESTORE_REJECTION
                finished.delivery_code = DeliveryCode.DATA_INCOMPLETE
                finished.file_status = FileStatus.DISCARDED_FILESTORE_REJECTION
            station._record(self)
            return
        # The product's STAC Item, when one came, states the checksum the catalogue publishes:
        # the stored bytes must match it (and the SHA-256 tag, which names the same bytes).
        expected = self.sha256
        if self.item is not None:
            stated = item_sha256(self.item)
            if stated != self.sha256 or self.item.get("id") != self.item_id:
                station.stats["items_refused"] += 1
                self.item = None  # an Item that does not describe this product: not catalogued
        elif self.item_broken:
            station.stats["items_refused"] += 1
        try:
            files.commit()
            duplicates = station.receiver.duplicates
            accepted = station.receiver.accept(self.item_id, expected)
            if accepted and self.item is not None:
                station.catalogue.add(self.item_id, self.item, stored_name(self.item_id))
        except StorageError as error:
            files.discard()
            accepted = False
            self.outcome = f"storage error: {error}"
            finished.condition_code = ConditionCode.FILESTORE_REJECTION
        else:
            if accepted:
                self.outcome = "duplicate" if station.receiver.duplicates > duplicates \
                    else "stored"
            else:
                self.outcome = "rejected"
                finished.condition_code = ConditionCode.FILE_CHECKSUM_FAILURE
        if not accepted:
            # The Finished PDU is made from this object after the indication: the flight side
            # learns the product did not arrive intact and sends it again.
            finished.delivery_code = DeliveryCode.DATA_INCOMPLETE
            finished.file_status = FileStatus.DISCARDED_DELIBERATELY
        station._record(self)

    def abandon(self) -> None:
        self.user.files.discard()
        if not self.completed:
            self.outcome = "abandoned"
            self.station._record(self)


@dataclass(frozen=True)
class _Retired:
    """What the station keeps of a transaction it finished: its Finished PDU, for a sender that
    missed it, and what identifies it against a sender reusing the number."""

    finished: bytes | None
    product: tuple[str | None, str | None]  # id, SHA-256
    eof: tuple[int, bytes] | None  # file size, checksum


def _messages(metadata: MetadataPdu) -> list[MessageToUserTlv]:
    return [MessageToUserTlv.from_tlv(tlv) for tlv in metadata.options_as_tlv() or []
            if tlv.tlv_type == TlvType.MESSAGE_TO_USER]


class GroundStation:
    """The ground's CFDP entity and telemetry decoder, writing into ``root``.

    ``root`` is a :class:`~.link.Receiver` folder (``store/`` one file per product id,
    ``received.jsonl`` its journal), plus ``transactions.jsonl`` (one line per transaction's
    outcome) and ``telemetry.jsonl`` (the decoded telemetry, rewritten by :meth:`flush`).
    """

    def __init__(self, root: str | Path, config: CfdpLinkConfig = CfdpLinkConfig()) -> None:
        self.root = Path(root)
        self.config = config
        self.receiver = Receiver(self.root)
        self.catalogue = GroundCatalogue(self.root, self.receiver.ids())
        self.faults = _Faults()
        # Work-around 3: cfdp-py's handler would repeat its Finished for ever (after its ACK
        # limit it cancels and starts again); the station stops it after ``ack_limit`` tries.
        self.remotes = RemoteEntityConfigTable([config.remote(config.flight_id,
                                                              ack_limit=1 << 30)])
        self.framer = _Framer(CFDP_UP_APID, PacketType.TC)
        self.active: dict[tuple[int, int], _GroundTransaction] = {}
        self.retired: OrderedDict[tuple[int, int], _Retired] = OrderedDict()
        self.telemetry = TelemetryDecoder()
        self.records: list[dict[str, Any]] = []
        self._flushed_records = 0
        self.outcomes: list[dict[str, Any]] = []
        self.stats: dict[str, int] = {"pdus": 0, "undecodable": 0, "refused_pdus": 0,
                                      "eof_reacked": 0, "eof_refed": 0, "finished_resent": 0,
                                      "stale_ignored": 0, "retired_finished": 0,
                                      "retired_inactive": 0, "items_refused": 0,
                                      "eof_held": 0}
        self._log = self.root / "transactions.jsonl"

    def receive(self, packet: bytes) -> list[bytes]:
        """Take one space packet off the link; the packets to send back."""
        try:
            header, data = split_packet(packet)
        except (PacketError, ValueError):
            self.stats["undecodable"] += 1
            return []
        if header.apid != CFDP_DOWN_APID:
            self.records.extend(self.telemetry.feed(packet))
            return []
        self.stats["pdus"] += 1
        try:
            pdu = PduFactory.from_raw(data)
        except _UNDECODABLE:
            self.stats["undecodable"] += 1
            return []
        if pdu is None:
            self.stats["undecodable"] += 1
            return []
        return [self.framer.wrap(raw) for raw in self._route(pdu)]

    def _route(self, pdu: Any) -> list[bytes]:
        key = _key(pdu)
        retired = self.retired.get(key)
        if retired is not None:
            if isinstance(pdu, MetadataPdu) \
                    and _read_tags(_messages(pdu)).product != retired.product:
                # Another product under a number this station has finished: the sender's
                # numbering started again; the new transaction is not the old one.
                del self.retired[key]
            else:
                return self._answer_retired(pdu, retired)
        transaction = self.active.get(key)
        if transaction is None:
            # Only what may open a Class 2 transaction opens one (metadata, file data or EOF
            # can come first when the first ones were lost); anything else is stale.
            directive = None if isinstance(pdu, FileDataPdu) else pdu.directive_type
            if directive not in (None, DirectiveType.METADATA_PDU, DirectiveType.EOF_PDU):
                self.stats["stale_ignored"] += 1
                return []
            transaction = _GroundTransaction(self, key)
            self.active[key] = transaction
        out = transaction.feed(pdu)
        self._settle(transaction)
        return out

    def _answer_retired(self, pdu: Any, retired: _Retired) -> list[bytes]:
        finished = retired.finished
        if isinstance(pdu, EofPdu) and retired.eof in (None, (pdu.file_size,
                                                               bytes(pdu.file_checksum))):
            # Work-around 3, after the transaction ended here: CFDP 4.7.2 wants every EOF
            # acknowledged, and the source needs the Finished it missed.
            self.stats["eof_reacked"] += 1
            out = [bytes(AckPdu(pdu.pdu_header.pdu_conf, DirectiveType.EOF_PDU,
                                pdu.condition_code, TransactionStatus.TERMINATED).pack())]
            if finished is not None:
                self.stats["finished_resent"] += 1
                out.append(finished)
            return out
        self.stats["stale_ignored"] += 1
        return []

    def _settle(self, transaction: _GroundTransaction) -> None:
        if transaction.done:
            self._retire(transaction)
        elif transaction.completed and transaction.finished_sent > self.config.ack_limit:
            self.stats["retired_finished"] += 1
            self._retire(transaction)

    def _retire(self, transaction: _GroundTransaction) -> None:
        transaction.abandon()
        self.active.pop(transaction.key, None)
        eof = transaction.eof
        self.retired[transaction.key] = _Retired(
            transaction.last_finished, (transaction.item_id, transaction.sha256),
            None if eof is None else (eof.file_size, bytes(eof.file_checksum)))
        while len(self.retired) > 4096:
            self.retired.popitem(last=False)

    def poll(self) -> list[bytes]:
        """Run every open transaction's timers; the packets to send back."""
        out: list[bytes] = []
        now = time.monotonic()
        for transaction in list(self.active.values()):
            out.extend(transaction.poll())
            if now - transaction.last_heard > self.config.inactivity_s \
                    and not transaction.completed:
                self.stats["retired_inactive"] += 1
                self._retire(transaction)
            else:
                self._settle(transaction)
        return [self.framer.wrap(raw) for raw in out]

    def _record(self, transaction: _GroundTransaction) -> None:
        record = {"event": transaction.outcome.split(":")[0], "id": transaction.item_id,
                  "transaction": list(transaction.key), "outcome": transaction.outcome,
                  "t": round(time.time(), 3)}
        self.outcomes.append(record)
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        # One appended line per transaction: an audit trail, not state (the receiver's journal
        # is the state), so it is appended without an fsync per line.
        try:
            with open(self._log, "a", encoding="utf-8") as handle:
                handle.write(line)
        except OSError as error:
            raise StorageError(self._log, f"cannot append: {error.strerror or error}") from error

    def flush(self) -> None:
        """Write the catalogue and the decoded telemetry (when new ones came) atomically."""
        self.catalogue.flush()
        if len(self.records) == self._flushed_records:
            return
        write_text(self.root / "telemetry.jsonl",
                   "".join(json.dumps(r, default=str, separators=(",", ":")) + "\n"
                           for r in self.records))
        self._flushed_records = len(self.records)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for record in self.outcomes:
            counts[record["event"]] = counts.get(record["event"], 0) + 1
        return {"outcomes": counts, "stored": len(self.receiver.ids()),
                "catalogued": len(self.catalogue.items),
                "duplicates": self.receiver.duplicates, "rejected": self.receiver.rejected,
                "open": len(self.active), "telemetry": self.telemetry.report.to_dict(),
                **self.stats}


def serve_udp(station: GroundStation, host: str, port: int, *, duration_s: float,
              idle_exit_s: float | None = None, ready: Callable[[int], None] | None = None,
              stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run ``station`` on a UDP socket until ``duration_s`` passed, the link was quiet for
    ``idle_exit_s`` after the first packet, or ``stop()`` says so; ``ready(port)`` is called
    once the socket is bound (``port`` 0 picks a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # A pass arrives in bursts faster than Python reads them: a few MB of socket buffer keep
    # the kernel from dropping what the impairments did not (the kernel may grant less).
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise StorageError(None, f"onboard ground: cannot listen on {host}:{port}: "
                                 f"{error.strerror or error}") from error
    sock.setblocking(False)
    # Replies the station's timers make go where their transaction's packets came from: two
    # senders may share an entity id (a restarted one, on a new port, beside its dead self).
    peers: OrderedDict[tuple[int, int], tuple[str, int]] = OrderedDict()
    started = last_packet = time.monotonic()
    heard = False
    polled = flushed = started
    if ready is not None:
        ready(sock.getsockname()[1])
    try:
        while True:
            now = time.monotonic()
            if now - started > duration_s or (stop is not None and stop()):
                break
            if idle_exit_s is not None and heard and now - last_packet > idle_exit_s \
                    and not station.active:
                break
            readable, _, _ = select.select([sock], [], [], 0.005)
            while readable:
                try:
                    packet, address = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                heard = True
                last_packet = time.monotonic()
                key = _transaction_of(packet, CFDP_DOWN_APID)
                if key is not None:
                    peers[key] = address
                    peers.move_to_end(key)
                    while len(peers) > 4096:
                        peers.popitem(last=False)
                for reply in station.receive(packet):
                    with contextlib.suppress(OSError):
                        sock.sendto(reply, address)
            now = time.monotonic()
            if now - polled > 0.005:
                polled = now
                for reply in station.poll():
                    address = peers.get(_transaction_of(reply, CFDP_UP_APID) or (-1, -1))
                    if address is not None:
                        with contextlib.suppress(OSError):
                            sock.sendto(reply, address)
            if now - flushed > 1.0:
                flushed = now
                station.flush()
    finally:
        sock.close()
        station.flush()
    return station.summary()


def _transaction_of(packet: bytes, apid: int) -> tuple[int, int] | None:
    """The transaction a CFDP space packet of ``apid`` belongs to (None for anything else)."""
    with contextlib.suppress(*_UNDECODABLE, PacketError):
        raw = _pdu_of(packet, apid)
        pdu = None if raw is None else PduFactory.from_raw(raw)
        if pdu is not None:
            return _key(pdu)
    return None


# -- factory ---------------------------------------------------------------------------------------

def open_transmitter(config: CfdpLinkConfig | Any, out_dir: str | Path,
                     telemetry: Telemetry | None = None) -> CfdpTransmitter:
    """The CFDP transmitter a run's ``[cfdp]`` section describes (a loaded
    :class:`~onboard.runtime.config.Config` or the section itself); its state (the transaction
    sequence count) lives in ``out_dir``, and so does the in-process ground of ``simulated``."""
    cfdp: CfdpLinkConfig = config if isinstance(config, CfdpLinkConfig) else \
        config.section("cfdp")
    out = Path(out_dir)
    link: FlightLink
    if cfdp.transport == "udp":
        link = UdpLink(cfdp)
    else:
        folder = Path(cfdp.ground_folder)
        link = SimulatedLink(GroundStation(folder if folder.is_absolute() else out / folder,
                                           cfdp), cfdp)
    return CfdpTransmitter(cfdp, link, out, telemetry)
