"""ATTESTATION_REPORT versions 2, 3 and 5 (SNP ABI 56860 Table "ATTESTATION_REPORT Structure").

0x4A0 bytes, little-endian; the signature covers bytes 0x000..0x29F (snp.md §1.1). v3 adds
CPUID_FAM_ID/MOD_ID/STEP at 0x188..0x18A; v5 adds LAUNCH_MIT_VECTOR/CURRENT_MIT_VECTOR at
0x1F8/0x200. Parsing is strict: every reserved range must be zero (as go-sev-guest also requires),
and `to_bytes()` reproduces the parsed bytes exactly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from sandbox.shared import sha2
from sandbox.shared.errors import CheckFailed, InputError
from sandbox.shared.snp.key_info import KeyInfo, SigningKey
from sandbox.shared.snp.platform_info import PlatformInfo
from sandbox.shared.snp.policy import GuestPolicy
from sandbox.shared.snp.product import (
    FAMILY_ZEN5,
    Cpuid,
    Product,
    TcbLayout,
    layout_of,
    looks_like_turin_chip_id,
    product_from_cpuid,
)
from sandbox.shared.snp.tcb import TcbVersion

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0  # bytes 0x000..0x29F are signed
SUPPORTED_VERSIONS = (2, 3, 5)
SIG_ALGO_ECDSA_P384_SHA384 = 1
SIG_FIELD = 72  # r and s are 72-byte little-endian fields; only the low 48 bytes are used

# Fixed-size byte fields: name -> (offset, size).
BYTES_FIELDS = {
    "family_id": (0x010, 16),
    "image_id": (0x020, 16),
    "report_data": (0x050, 64),
    "measurement": (0x090, 48),
    "host_data": (0x0C0, 32),
    "id_key_digest": (0x0E0, 48),
    "author_key_digest": (0x110, 48),
    "report_id": (0x140, 32),
    "report_id_ma": (0x160, 32),
    "chip_id": (0x1A0, 64),
}
TCB_FIELDS = {"current_tcb": 0x038, "reported_tcb": 0x180, "committed_tcb": 0x1E0, "launch_tcb": 0x1F0}
OFF_VERSION, OFF_GUEST_SVN, OFF_POLICY = 0x000, 0x004, 0x008
OFF_VMPL, OFF_SIG_ALGO, OFF_PLATFORM_INFO, OFF_KEY_INFO = 0x030, 0x034, 0x040, 0x048
OFF_CPUID = 0x188  # v3+: family, model, stepping (one byte each)
OFF_CURRENT_VERSION, OFF_COMMITTED_VERSION = 0x1E8, 0x1EC  # build, minor, major, reserved
OFF_LAUNCH_MIT, OFF_CURRENT_MIT = 0x1F8, 0x200  # v5
OFF_SIG_R, OFF_SIG_S = 0x2A0, 0x2E8


def _reserved_ranges(version: int) -> list[tuple[int, int]]:
    """[start, end) ranges that must be zero for a version."""
    ranges = [(0x04C, 0x050), (0x1EB, 0x1EC), (0x1EF, 0x1F0), (0x330, REPORT_SIZE)]
    ranges.append((0x188 if version < 3 else 0x18B, 0x1A0))
    ranges.append((0x1F8 if version < 5 else 0x208, SIGNED_SIZE))
    return ranges


class ReportFormatError(CheckFailed):
    """Bytes that are not a well-formed ATTESTATION_REPORT. A report is evidence, so this is a failed
    check (exit 1); a command that only decodes a user's file (`attest display`) calls it bad input."""


@dataclass(frozen=True)
class FirmwareVersion:
    major: int
    minor: int
    build: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}"


@dataclass(frozen=True)
class AttestationReport:
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: PlatformInfo
    key_info: KeyInfo
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid: Cpuid | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: FirmwareVersion
    committed_version: FirmwareVersion
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    product: Product | None = None  # not in the bytes: derived (CPUID, heuristics) or supplied

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise ReportFormatError(f"unsupported ATTESTATION_REPORT version {self.version}")
        for name, (_, size) in BYTES_FIELDS.items():
            if len(getattr(self, name)) != size:
                raise ReportFormatError(f"report field {name} must be {size} bytes")
        if (self.cpuid is None) != (self.version < 3):
            raise ReportFormatError("CPUID fields exist exactly in report versions 3 and later")
        if (self.launch_mit_vector is None or self.current_mit_vector is None) != (self.version < 5):
            raise ReportFormatError("mitigation vectors exist exactly in report version 5")

    # Bytes ------------------------------------------------------------------------------------
    def signed_bytes(self) -> bytes:
        return self.to_bytes()[:SIGNED_SIZE]

    def to_bytes(self) -> bytes:
        out = bytearray(REPORT_SIZE)
        struct.pack_into("<IIQ", out, OFF_VERSION, self.version, self.guest_svn, self.policy.raw)
        struct.pack_into("<II", out, OFF_VMPL, self.vmpl, self.signature_algo)
        struct.pack_into("<Q", out, OFF_PLATFORM_INFO, self.platform_info.raw)
        struct.pack_into("<I", out, OFF_KEY_INFO, self.key_info.raw)
        for name, (offset, size) in BYTES_FIELDS.items():
            out[offset:offset + size] = getattr(self, name)
        for name, offset in TCB_FIELDS.items():
            out[offset:offset + 8] = getattr(self, name).raw
        if self.cpuid is not None:
            out[OFF_CPUID:OFF_CPUID + 3] = bytes([self.cpuid.family, self.cpuid.model, self.cpuid.stepping])
        for offset, fw in ((OFF_CURRENT_VERSION, self.current_version),
                           (OFF_COMMITTED_VERSION, self.committed_version)):
            out[offset:offset + 3] = bytes([fw.build, fw.minor, fw.major])
        if self.version >= 5:
            struct.pack_into("<QQ", out, OFF_LAUNCH_MIT, self.launch_mit_vector, self.current_mit_vector)
        out[OFF_SIG_R:OFF_SIG_R + SIG_FIELD] = self.signature_r.to_bytes(SIG_FIELD, "little")
        out[OFF_SIG_S:OFF_SIG_S + SIG_FIELD] = self.signature_s.to_bytes(SIG_FIELD, "little")
        return bytes(out)

    def with_signature(self, r: int, s: int) -> AttestationReport:
        return replace(self, signature_r=r, signature_s=s)

    @property
    def signing_key(self) -> SigningKey | None:
        return self.key_info.signing_key

    @property
    def tcb_layout(self) -> TcbLayout:
        return self.reported_tcb.layout

    def with_product(self, product: Product) -> AttestationReport:
        """The same report read as coming from `product` (re-interprets the TCB fields)."""
        layout = layout_of(product)
        return replace(self, product=product, **{name: getattr(self, name).relayout(layout)
                                                 for name in TCB_FIELDS})

    # Presentation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        """Every field, in report order. Hex strings for byte fields; TCBs decoded per product."""
        return {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": hex(self.policy.raw),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "sig_algo": self.signature_algo,
            "current_tcb": self.current_tcb.to_dict(),
            "platform_info": hex(self.platform_info.raw),
            "key_info": self.key_info.to_dict(),
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "report_id_ma": self.report_id_ma.hex(),
            "reported_tcb": self.reported_tcb.to_dict(),
            "cpuid_fam_mod_step": (None if self.cpuid is None
                                   else [self.cpuid.family, self.cpuid.model, self.cpuid.stepping]),
            "chip_id": self.chip_id.hex(),
            "committed_tcb": self.committed_tcb.to_dict(),
            "current_ver": str(self.current_version),
            "committed_ver": str(self.committed_version),
            "launch_tcb": self.launch_tcb.to_dict(),
            "launch_mit_vector": hex(self.launch_mit_vector or 0),
            "current_mit_vector": hex(self.current_mit_vector or 0),
            "sha384_signed_part": sha2.sha384(self.signed_bytes()).hexdigest(),
            "signature_r_le": self.signature_r.to_bytes(SIG_FIELD, "little").hex(),
            "signature_s_le": self.signature_s.to_bytes(SIG_FIELD, "little").hex(),
            "decoded": {
                "product": self.product.value if self.product else None,
                "tcb_layout": self.tcb_layout.value,
                "policy": self.policy.to_dict(),
                "platform_info": self.platform_info.to_dict(),
                "signing_key": self.signing_key.name if self.signing_key is not None else None,
                "cpuid_eax": None if self.cpuid is None else f"0x{self.cpuid.eax:08x}",
            },
        }


def _product_for(version: int, cpuid: Cpuid | None, chip_id: bytes, given: Product | None) -> Product | None:
    if cpuid is not None:
        found = product_from_cpuid(cpuid)
        if given is not None and found is not None and found != given:
            # the caller's product is wrong, not the report
            raise InputError(f"wrong product: the report comes from a {found.value} CPU ({cpuid}), "
                             f"not {given.value}",
                             hint=f"drop --product or use --product {found.value}")
        return found or given
    if given is not None:
        return given
    return Product.TURIN if looks_like_turin_chip_id(chip_id) else None


def parse_report(data: bytes, *, product: Product | None = None, source: str = "report") -> AttestationReport:
    """Parse and validate a report. `product` is needed only for v2 reports that don't reveal it."""
    if len(data) != REPORT_SIZE:
        what = "truncated" if len(data) < REPORT_SIZE else "too long"
        raise ReportFormatError(f"{source}: {what}: {len(data)} bytes, an ATTESTATION_REPORT is {REPORT_SIZE}",
                                hint="pass the raw 1184-byte report (binary or hex text)")
    (version,) = struct.unpack_from("<I", data, OFF_VERSION)
    if version not in SUPPORTED_VERSIONS:
        raise ReportFormatError(f"{source}: unsupported ATTESTATION_REPORT version {version}",
                                hint="versions 2, 3 and 5 are supported")
    problems = [f"bytes 0x{start:03x}..0x{end - 1:03x} (reserved) are not zero"
                for start, end in _reserved_ranges(version) if any(data[start:end])]
    guest_svn, policy_raw = struct.unpack_from("<IQ", data, OFF_GUEST_SVN)
    policy = GuestPolicy(policy_raw)
    (key_info_raw,) = struct.unpack_from("<I", data, OFF_KEY_INFO)
    key_info = KeyInfo(key_info_raw)
    problems += policy.reserved_problems() + key_info.reserved_problems()
    if problems:
        raise ReportFormatError(f"{source}: malformed ATTESTATION_REPORT v{version}: " + "; ".join(problems))

    fields = {name: bytes(data[off:off + size]) for name, (off, size) in BYTES_FIELDS.items()}
    cpuid = Cpuid(*data[OFF_CPUID:OFF_CPUID + 3]) if version >= 3 else None
    found = _product_for(version, cpuid, fields["chip_id"], product)
    if found is None and cpuid is not None and cpuid.family == FAMILY_ZEN5:
        layout = TcbLayout.TURIN  # an unlisted Zen 5 part: Turin's layout is the best reading
    else:
        layout = layout_of(found)
    tcbs = {name: TcbVersion(bytes(data[off:off + 8]), layout) for name, off in TCB_FIELDS.items()}
    vmpl, sig_algo = struct.unpack_from("<II", data, OFF_VMPL)
    (platform_raw,) = struct.unpack_from("<Q", data, OFF_PLATFORM_INFO)
    mit = struct.unpack_from("<QQ", data, OFF_LAUNCH_MIT) if version >= 5 else (None, None)

    def fw(offset: int) -> FirmwareVersion:
        build, minor, major = data[offset:offset + 3]
        return FirmwareVersion(major, minor, build)

    return AttestationReport(
        version=version, guest_svn=guest_svn, policy=policy, vmpl=vmpl, signature_algo=sig_algo,
        platform_info=PlatformInfo(platform_raw), key_info=key_info, cpuid=cpuid,
        current_version=fw(OFF_CURRENT_VERSION), committed_version=fw(OFF_COMMITTED_VERSION),
        launch_mit_vector=mit[0], current_mit_vector=mit[1],
        signature_r=int.from_bytes(data[OFF_SIG_R:OFF_SIG_R + SIG_FIELD], "little"),
        signature_s=int.from_bytes(data[OFF_SIG_S:OFF_SIG_S + SIG_FIELD], "little"),
        product=found, family_id=fields["family_id"], image_id=fields["image_id"],
        report_data=fields["report_data"], measurement=fields["measurement"], host_data=fields["host_data"],
        id_key_digest=fields["id_key_digest"], author_key_digest=fields["author_key_digest"],
        report_id=fields["report_id"], report_id_ma=fields["report_id_ma"], chip_id=fields["chip_id"],
        current_tcb=tcbs["current_tcb"], reported_tcb=tcbs["reported_tcb"], committed_tcb=tcbs["committed_tcb"],
        launch_tcb=tcbs["launch_tcb"],
    )


def decode_report_file(raw: bytes, *, source: str = "report") -> bytes:
    """Raw report bytes from a file holding either the binary report or its hex text."""
    if len(raw) == REPORT_SIZE:
        return raw
    text = raw.strip()
    if text and all(c in b"0123456789abcdefABCDEF \t\r\n" for c in text):
        try:
            return bytes.fromhex(text.decode())
        except ValueError as e:
            raise ReportFormatError(f"{source}: looks like hex text but does not decode: {e}") from e
    return raw
