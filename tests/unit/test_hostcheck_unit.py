from __future__ import annotations

from sandbox.hostcheck import _kvm_probe_rom, parse_qemu_version


def test_parse_qemu_version() -> None:
    assert parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)") == (10, 0, 2)
    assert parse_qemu_version("QEMU emulator version 7.2") == (7, 2, 0)
    assert parse_qemu_version("garbage") is None


def test_probe_rom_layout() -> None:
    rom = _kvm_probe_rom()
    assert len(rom) == 0x10000
    assert rom[0xFFF0] == 0xE9  # reset vector jumps into the ROM body
