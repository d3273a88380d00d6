"""The certificate table that comes with an extended report (snp.md §2.4).

It is the buffer filled by SNP_GET_EXT_REPORT, configfs-tsm's `auxblob` and the GHCB extended guest
request (GHCB spec 56421 "SNP Extended Guest Request", certificate table): 24-byte entries
{GUID[16] in RFC 4122 byte order, offset u32, length u32} ended by an all-zero entry; offsets count
from the start of the table and point at DER certificates.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from enum import StrEnum

from sandbox.shared.errors import InputError

ENTRY = struct.Struct("<16sII")


class CertKind(StrEnum):
    ARK = "ark"
    ASK = "ask"  # also used for the ASVK
    VCEK = "vcek"
    VLEK = "vlek"
    CRL = "crl"


GUIDS = {
    CertKind.ARK: uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"),
    CertKind.ASK: uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"),
    CertKind.VCEK: uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"),
    CertKind.VLEK: uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"),
    CertKind.CRL: uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea"),
}
KIND_OF = {guid: kind for kind, guid in GUIDS.items()}


@dataclass(frozen=True)
class CertEntry:
    guid: uuid.UUID
    data: bytes

    @property
    def kind(self) -> CertKind | None:
        """None for GUIDs this project does not know (they are kept, not interpreted)."""
        return KIND_OF.get(self.guid)


def parse_cert_table(buf: bytes) -> list[CertEntry]:
    entries: list[CertEntry] = []
    pos = 0
    while True:
        if pos + ENTRY.size > len(buf):
            if not buf.strip(b"\0"):
                return entries  # an all-zero (or empty) buffer: the host supplied no certificates
            raise InputError(f"certificate table: no terminating entry within {len(buf)} bytes")
        raw_guid, offset, length = ENTRY.unpack_from(buf, pos)
        pos += ENTRY.size
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            return entries
        if offset + length > len(buf) or offset < pos:
            raise InputError(f"certificate table: entry {len(entries)} points outside the table "
                             f"(offset {offset}, length {length}, table {len(buf)} bytes)")
        entries.append(CertEntry(uuid.UUID(bytes=raw_guid), bytes(buf[offset:offset + length])))


def build_cert_table(entries: list[CertEntry]) -> bytes:
    header = ENTRY.size * (len(entries) + 1)
    out = bytearray()
    blobs = bytearray()
    for entry in entries:
        out += ENTRY.pack(entry.guid.bytes, header + len(blobs), len(entry.data))
        blobs += entry.data
    out += bytes(ENTRY.size)
    return bytes(out + blobs)


def entry(kind: CertKind, data: bytes) -> CertEntry:
    return CertEntry(GUIDS[kind], data)
