"""TCB_VERSION (SNP ABI 56860 "TCB_VERSION Structure"; 8 bytes; snp.md §1.5).

Milan/Genoa (struct version 0): byte 0 BOOT_LOADER, 1 TEE, 2..5 reserved, 6 SNP, 7 MICROCODE.
Turin (struct version 1):       byte 0 FMC, 1 BOOT_LOADER, 2 TEE, 3 SNP, 4..6 reserved, 7 MICROCODE.
The raw value is kept as is, so a report re-serialises to the exact bytes it was parsed from.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.shared.errors import InputError
from sandbox.shared.snp.product import TcbLayout

# Byte index of each security patch level (SPL) per layout.
_OFFSETS: dict[TcbLayout, dict[str, int]] = {
    TcbLayout.LEGACY: {"bl": 0, "tee": 1, "snp": 6, "ucode": 7},
    TcbLayout.TURIN: {"fmc": 0, "bl": 1, "tee": 2, "snp": 3, "ucode": 7},
}

# Component names in KDS query order (go-sev-guest/snpguest use this order; Turin adds fmcSPL).
COMPONENTS = ("bl", "tee", "snp", "ucode", "fmc")


@dataclass(frozen=True)
class TcbVersion:
    raw: bytes
    layout: TcbLayout

    def __post_init__(self) -> None:
        if len(self.raw) != 8:
            raise InputError(f"TCB_VERSION must be 8 bytes, got {len(self.raw)}")

    @classmethod
    def from_parts(cls, layout: TcbLayout, *, bl: int, tee: int, snp: int, ucode: int,
                   fmc: int | None = None) -> TcbVersion:
        values = {"bl": bl, "tee": tee, "snp": snp, "ucode": ucode}
        if layout == TcbLayout.TURIN:
            values["fmc"] = fmc or 0
        elif fmc:
            raise InputError("only Turin's TCB_VERSION has an FMC SPL")
        raw = bytearray(8)
        for name, value in values.items():
            if not 0 <= value <= 255:
                raise InputError(f"TCB SPL {name}={value} does not fit in a byte")
            raw[_OFFSETS[layout][name]] = value
        return cls(bytes(raw), layout)

    @classmethod
    def from_u64(cls, value: int, layout: TcbLayout) -> TcbVersion:
        return cls(value.to_bytes(8, "little"), layout)

    def relayout(self, layout: TcbLayout) -> TcbVersion:
        return TcbVersion(self.raw, layout)

    def spls(self) -> dict[str, int]:
        """The security patch levels this layout defines, by KDS name (bl, tee, snp, ucode[, fmc])."""
        offsets = _OFFSETS[self.layout]
        return {name: self.raw[offsets[name]] for name in COMPONENTS if name in offsets}

    @property
    def bl(self) -> int:
        return self.spls()["bl"]

    @property
    def tee(self) -> int:
        return self.spls()["tee"]

    @property
    def snp(self) -> int:
        return self.spls()["snp"]

    @property
    def ucode(self) -> int:
        return self.spls()["ucode"]

    @property
    def fmc(self) -> int | None:
        return self.spls().get("fmc")

    def meets(self, minimum: TcbVersion) -> list[str]:
        """Components below `minimum` (empty when every SPL is >= the minimum's)."""
        mine = self.spls()
        return [f"{name} {mine.get(name, 0)} < {value}" for name, value in minimum.spls().items()
                if mine.get(name, 0) < value]

    def to_dict(self) -> dict[str, int | str]:
        return {**self.spls(), "raw": self.raw.hex()}

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.spls().items())


def parse_tcb_spec(text: str, layout: TcbLayout) -> TcbVersion:
    """A minimum TCB from the command line: 'bl=3,tee=0,snp=8,ucode=115[,fmc=1]' or a 16-hex-digit
    u64 as AMD tools print it (e.g. '7308000000000003')."""
    text = text.strip()
    if "=" not in text:
        try:
            value = int(text.removeprefix("0x"), 16)
        except ValueError:
            value = -1
        if not 0 <= value < 2**64:
            raise InputError(f"invalid TCB {text!r}", hint="use bl=N,tee=N,snp=N,ucode=N[,fmc=N] or a "
                                                           "16-hex-digit TCB_VERSION like 7308000000000003")
        return TcbVersion.from_u64(value, layout)
    parts: dict[str, int] = {}
    for item in text.split(","):
        name, _, digits = item.partition("=")
        name = name.strip().lower()
        if name not in COMPONENTS or not digits.strip().isdigit():
            raise InputError(f"invalid TCB component {item!r} in {text!r}",
                             hint="components are bl, tee, snp, ucode and (Turin) fmc, e.g. bl=3,tee=0,snp=8,ucode=115")
        parts[name] = int(digits)
    return TcbVersion.from_parts(layout, bl=parts.get("bl", 0), tee=parts.get("tee", 0),
                                 snp=parts.get("snp", 0), ucode=parts.get("ucode", 0), fmc=parts.get("fmc"))
