"""Host capability probe behind `parma-sandbox check`; `up` uses its verdict to pick the TEE mode.

Every probe proves what it reports: KVM is judged by running a few instructions in a real guest,
not by the presence of /dev/kvm (some hosts expose a KVM that cannot run normal guests).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path

from sandbox.fsutil import atomic_write
from sandbox.paths import cache_dir, runtime_dir
from sandbox.run import find_tool, run, spawn
from sandbox.shared.errors import SandboxError
from sandbox.vmm.snp import host_sev_info

QEMU_SNP_MIN = (9, 1)

GENERIC_OVMF = (
    Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
    Path("/usr/share/OVMF/OVMF_CODE.fd"),
    Path("/usr/share/ovmf/OVMF.fd"),
)


def amdsev_ovmf_candidates() -> tuple[Path, ...]:
    return (
        cache_dir() / "firmware" / "OVMF.amdsev.fd",
        Path("/usr/share/ovmf/OVMF.amdsev.fd"),
        Path("/usr/share/edk2/ovmf/OVMF.amdsev.fd"),
    )


# Tools later steps call, with what they are for.
TOOLS = {
    "veritysetup": "reference dm-verity implementation (tests, benchmarks)",
    "e2fsck": "checks converted layer images (tests)",
    "debugfs": "reads ext4 images back (tests)",
    "mmdebstrap": "builds the UVM rootfs",
    "skopeo": "pushes images to the test registry",
    "docker-registry": "local OCI registry for tests",
    "virsh": "libvirt backend (debugging)",
    "cpio": "kernel build",
    "make": "kernel build",
    "gcc": "kernel build",
    "busybox": "trivial-init baseline in benchmarks",
}


class Availability(StrEnum):
    ok = "ok"
    missing = "missing"
    unusable = "unusable"
    info = "info"


class Tee(StrEnum):
    sev_snp = "sev-snp"
    emulated = "emulated"


class Accel(StrEnum):
    kvm = "kvm"
    tcg = "tcg"


@dataclass(frozen=True)
class Item:
    name: str
    status: Availability
    detail: str
    hint: str | None = None


@dataclass(frozen=True)
class CheckReport:
    items: tuple[Item, ...]
    tee: Tee
    accel: Accel
    reasons: tuple[str, ...]
    qemu_version: str | None = None
    generic_ovmf: str | None = None
    amdsev_ovmf: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def item(self, name: str) -> Item:
        return next(i for i in self.items if i.name == name)

    def to_json(self) -> dict[str, object]:
        return {
            "tee": self.tee.value,
            "accel": self.accel.value,
            "reasons": list(self.reasons),
            "qemu_version": self.qemu_version,
            "firmware": {"generic": self.generic_ovmf, "amdsev": self.amdsev_ovmf},
            "checks": [asdict(i) for i in self.items],
        }


def parse_qemu_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def probe_qemu() -> tuple[Item, Item, tuple[int, int, int] | None, Path | None]:
    try:
        qemu = find_tool("qemu-system-x86_64")
    except SandboxError as e:
        missing = Item("qemu", Availability.missing, str(e), e.hint)
        return missing, Item("qemu sev-snp-guest", Availability.missing, "no QEMU"), None, None
    out = run([qemu, "--version"], check=False, timeout=20).stdout.decode(errors="replace")
    version = parse_qemu_version(out)
    vtext = ".".join(map(str, version)) if version else "unknown version"
    qemu_item = Item("qemu", Availability.ok, f"{qemu} {vtext}")
    if version is None or version[:2] < QEMU_SNP_MIN:
        snp = Item("qemu sev-snp-guest", Availability.missing, f"QEMU {vtext} predates sev-snp-guest (needs 9.1)",
                   "install qemu-system-x86 from bookworm-backports ('make setup' does this)")
    else:
        objects = run([qemu, "-object", "help"], check=False, timeout=20).stdout.decode(errors="replace")
        if "sev-snp-guest" in objects:
            snp = Item("qemu sev-snp-guest", Availability.ok, "supported")
        else:
            snp = Item("qemu sev-snp-guest", Availability.missing, "this QEMU build lacks the sev-snp-guest object")
    return qemu_item, snp, version, qemu


def _kvm_probe_rom() -> bytes:
    """A 64 KiB BIOS image that proves a guest can leave real mode.

    From the reset vector it writes 'R' to the debug port 0xe9, loads a flat GDT, switches to 32-bit
    protected mode and writes 'P'. Some KVMs (e.g. PVM, which only runs PVM-built guests) execute the
    real-mode part and then hang at the mode switch, exactly where a Linux kernel would hang.
    """
    rom = bytearray(b"\xf4" * 0x10000)  # hlt everywhere
    # GDT at offset 0: null, flat 32-bit code (0x08), flat data (0x10); GDTR at 0x40 (ROM is at 0xFFFF0000).
    gdt = struct.pack("<3Q", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    rom[0:len(gdt)] = gdt
    rom[0x40:0x46] = struct.pack("<HI", len(gdt) - 1, 0xFFFF0000)
    real_mode = bytes([
        0xB0, ord("R"), 0xE6, 0xE9,                      # mov al,'R'; out 0xe9,al
        0x2E, 0x66, 0x0F, 0x01, 0x16, 0x40, 0x00,        # o32 lgdt cs:[0x40]
        0x0F, 0x20, 0xC0, 0x0C, 0x01, 0x0F, 0x22, 0xC0,  # mov eax,cr0; or al,1; mov cr0,eax
        0x66, 0xEA, *struct.pack("<IH", 0xFFFF0100, 0x08),  # jmp dword 0x08:0xFFFF0100
    ])
    rom[0xF000:0xF000 + len(real_mode)] = real_mode
    rom[0xFFF0:0xFFF3] = bytes([0xE9]) + struct.pack("<h", 0xF000 - 0xFFF3)  # reset vector: jmp 0xF000
    protected = bytes([
        0x66, 0xB8, 0x10, 0x00, 0x8E, 0xD8,              # mov ax,0x10; mov ds,ax
        0xB0, ord("P"), 0xE6, 0xE9,                      # mov al,'P'; out 0xe9,al
        0xF4, 0xEB, 0xFD,                                # hlt; jmp hlt
    ])
    rom[0x100:0x100 + len(protected)] = protected
    return bytes(rom)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm_cached(qemu: Path | None) -> Item:
    """probe_kvm, remembered for this boot and this QEMU binary (the probe costs up to 3 s when KVM hangs)."""
    if qemu is None:
        return probe_kvm(qemu)
    st = qemu.stat()
    key = f"{_boot_id()}:{qemu}:{st.st_mtime_ns}:{st.st_size}:{os.access('/dev/kvm', os.R_OK | os.W_OK)}"
    cache_file = runtime_dir() / "kvm-probe.json"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return Item(**{**cached["item"], "status": Availability(cached["item"]["status"])})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    item = probe_kvm(qemu)
    try:
        atomic_write(cache_file, json.dumps({"key": key, "item": asdict(item)}).encode())
    except SandboxError:
        pass  # a cache we cannot write only costs time
    return item


def probe_kvm(qemu: Path | None, timeout: float = 3.0) -> Item:
    dev = Path("/dev/kvm")
    if not dev.exists():
        return Item("kvm", Availability.missing, "/dev/kvm does not exist",
                    "enable virtualization in the BIOS/hypervisor and load kvm_amd or kvm_intel")
    if not os.access(dev, os.R_OK | os.W_OK):
        return Item("kvm", Availability.unusable, "/dev/kvm is not accessible to this user",
                    "add yourself to the 'kvm' group, or run as root")
    if qemu is None:
        return Item("kvm", Availability.unusable, "cannot probe KVM without QEMU")
    with tempfile.TemporaryDirectory(prefix="parma-kvm-probe-") as tmp:
        rom = Path(tmp) / "probe.rom"
        rom.write_bytes(_kvm_probe_rom())
        out = Path(tmp) / "debugcon.out"
        proc = spawn([qemu, "-accel", "kvm", "-machine", "pc", "-m", "16", "-nodefaults", "-display", "none",
                      "-bios", rom, "-debugcon", f"file:{out}", "-no-reboot"],
                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        ok = False
        while time.monotonic() < deadline:
            if out.exists() and b"P" in out.read_bytes():
                ok = True
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.kill()
        _, err = proc.communicate()
    if ok:
        return Item("kvm", Availability.ok, "a probe guest ran under KVM")
    reason = [ln for ln in err.decode(errors="replace").strip().splitlines()
              if "terminating on signal" not in ln and "warning:" not in ln]
    why = reason[-1] if reason else f"a probe guest hung switching to protected mode (no progress in {timeout:g} s)"
    return Item("kvm", Availability.unusable, f"/dev/kvm exists but cannot run a normal guest: {why}",
                "emulation will use TCG (slower, but fully functional)")


def probe_snp_host() -> list[Item]:
    items = []
    sev = Path("/dev/sev")
    items.append(Item("/dev/sev", Availability.ok if sev.exists() else Availability.missing,
                      "present" if sev.exists() else "absent: no AMD PSP driver on this host",
                      None if sev.exists() else "SEV-SNP needs an AMD EPYC host with SNP enabled in the BIOS"))
    param = Path("/sys/module/kvm_amd/parameters/sev_snp")
    try:
        value = param.read_text().strip()
        enabled = value in ("Y", "1")
        items.append(Item("kvm_amd sev_snp", Availability.ok if enabled else Availability.unusable,
                          f"parameter is {value}",
                          None if enabled else "load kvm_amd with sev_snp=1 (host kernel >= 6.11)"))
    except OSError:
        items.append(Item("kvm_amd sev_snp", Availability.missing, "kvm_amd is not loaded or has no sev_snp parameter",
                          "SEV-SNP needs kvm_amd on a host kernel >= 6.11"))
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    has = "sev_snp" in flags
    items.append(Item("cpu sev_snp flag", Availability.ok if has else Availability.missing,
                      "present" if has else "the CPU does not advertise sev_snp"))
    if has:
        items.append(probe_sev_parameters())
    return items


def probe_sev_parameters() -> Item:
    """The host values QEMU checks an SEV-SNP launch against (CPUID Fn8000_001F; sandbox/vmm/snp.py)."""
    try:
        info = host_sev_info()
    except SandboxError as e:
        return Item("sev launch parameters", Availability.unusable, e.message, e.hint)
    return Item("sev launch parameters", Availability.ok, f"cbitpos {info.cbitpos}, reduced-phys-bits "
                                                    f"{info.reduced_phys_bits} (from {info.source.value})")


def probe_firmware() -> tuple[Item, Item, Path | None, Path | None]:
    generic = next((p for p in GENERIC_OVMF if p.is_file()), None)
    g_item = Item("ovmf (generic)", Availability.ok if generic else Availability.missing,
                  str(generic) if generic else "no OVMF found", None if generic else "install the 'ovmf' package")
    amdsev = next((p for p in amdsev_ovmf_candidates() if p.is_file()), None)
    a_item = Item("ovmf (AmdSev, kernel hashes)", Availability.ok if amdsev else Availability.missing,
                  str(amdsev) if amdsev else "not built",
                  None if amdsev else "run 'make firmware-snp' (needed only for SEV-SNP launches)")
    return g_item, a_item, generic, amdsev


def probe_vsock() -> Item:
    dev = Path("/dev/vhost-vsock")
    if dev.exists() and os.access(dev, os.R_OK | os.W_OK):
        return Item("/dev/vhost-vsock", Availability.ok, "present; vsock can carry the agent channel")
    return Item("/dev/vhost-vsock", Availability.info, "absent; the agent channel uses virtio-serial")


def probe_tools() -> list[Item]:
    items = []
    for tool, why in TOOLS.items():
        try:
            path = find_tool(tool)
            items.append(Item(tool, Availability.ok, f"{path} ({why})"))
        except SandboxError as e:
            items.append(Item(tool, Availability.missing, why, e.hint))
    return items


@cache
def check_host() -> CheckReport:
    qemu_item, snp_qemu_item, version, qemu = probe_qemu()
    kvm_item = probe_kvm_cached(qemu)
    snp_items = probe_snp_host()
    g_item, a_item, generic, amdsev = probe_firmware()
    items = [qemu_item, snp_qemu_item, kvm_item, *snp_items, g_item, a_item, probe_vsock(), *probe_tools()]

    reasons = []
    if kvm_item.status != Availability.ok:
        reasons.append(f"KVM unusable: {kvm_item.detail}")
    for it in snp_items:
        if it.status != Availability.ok:
            reasons.append(f"no SEV-SNP: {it.name}: {it.detail}")
    if snp_qemu_item.status != Availability.ok:
        reasons.append(f"no SEV-SNP: {snp_qemu_item.detail}")
    if a_item.status != Availability.ok:
        reasons.append("no SEV-SNP: the AmdSev OVMF (with kernel hashes) is not built")
    snp_ready = all(i.status == Availability.ok for i in (kvm_item, snp_qemu_item, a_item, *snp_items))
    tee = Tee.sev_snp if snp_ready else Tee.emulated
    accel = Accel.kvm if kvm_item.status == Availability.ok else Accel.tcg
    vtext = ".".join(map(str, version)) if version else None
    return CheckReport(items=tuple(items), tee=tee, accel=accel, reasons=tuple(reasons), qemu_version=vtext,
                       generic_ovmf=str(generic) if generic else None, amdsev_ovmf=str(amdsev) if amdsev else None)
