"""The emulated PSP's port: how an emulation-mode guest asks the host for a signed report.

On SEV-SNP hardware the guest asks the PSP, a processor outside its reach, for MSG_REPORT_REQ and gets a
report signed with the VCEK, a key the guest never sees. Emulation keeps that shape: the emulated PSP
runs on the host, beside QEMU (sandbox/attest/psp_service.py), and holds the emulated VCEK's private
key; the guest reaches it through the virtio-serial port `org.parma.psp` (sandbox/guest/snp_report.py),
one JSON line per request and per reply. So the key stays out of the guest, as on hardware, and the
guest needs no signing code (nor OpenSSL) to attest.

Request: {"id": hex, "report_data": 64 bytes as hex, "vmpl": 0..3}
Reply:   {"id": the request's id, "report": base64, "cert_table": base64} or {"id": ..., "error": text}

Either side may be hostile to the other only in the way emulation allows (the host already holds the
emulated keys), but both decode strictly and bound every line: a bad line is an error, never a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, TypeVar

from sandbox.shared.codec import Base64, FieldError, Hex, Match, MaxLen, Message, Range, decode, encode
from sandbox.shared.errors import InputError
from sandbox.shared.jsonstrict import loads_bounded
from sandbox.shared.snp.report import REPORT_SIZE

PORT_NAME = "org.parma.psp"
REPORT_DATA_SIZE = 64
MAX_CERT_TABLE = 64 * 1024   # an ARK + ASK + VCEK table is under 5 KiB
MAX_LINE = 128 * 1024        # a reply's base64 of MAX_CERT_TABLE + the report, with room to spare
ID_PATTERN = "[0-9a-f]{16,64}"

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class PspReportRequest(Message):
    """MSG_REPORT_REQ: the caller's REPORT_DATA and the VMPL to report at."""

    id: Annotated[str, Match(ID_PATTERN, "16 to 64 lower-case hex digits")]
    report_data: Annotated[bytes, Hex(), MaxLen(REPORT_DATA_SIZE)]
    vmpl: Annotated[int, Range(0, 3)]

    def __post_init__(self) -> None:
        if len(self.report_data) != REPORT_DATA_SIZE:
            raise FieldError(f"must be {REPORT_DATA_SIZE} bytes, got {len(self.report_data)}", ".report_data")


@dataclass(frozen=True)
class PspReportReply(Message):
    """The signed report and the certificate table, or why there is none."""

    id: Annotated[str, Match(ID_PATTERN, "16 to 64 lower-case hex digits")]
    report: Annotated[bytes, Base64(), MaxLen(REPORT_SIZE)] = b""
    cert_table: Annotated[bytes, Base64(), MaxLen(MAX_CERT_TABLE)] = b""
    error: Annotated[str, MaxLen(1000)] | None = None


def to_line(message: Message) -> bytes:
    """One message as a JSON line."""
    return json.dumps(encode(message), separators=(",", ":"), sort_keys=True).encode() + b"\n"


def from_line(cls: type[M], line: bytes, *, source: str) -> M:
    """Decode one line (without its newline); InputError naming `source` if it is not a `cls`."""
    if len(line) > MAX_LINE:
        raise InputError(f"{source}: a line of more than {MAX_LINE} bytes")
    raw = loads_bounded(line, source, max_nesting=2)
    try:
        return decode(cls, raw)
    except FieldError as e:
        raise InputError(f"{source}: {e}") from None
