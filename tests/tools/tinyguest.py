"""A 100-byte multiboot "kernel" for backend tests: it prints a marker on COM1 and halts.

It lets the VM backends be tested with a real QEMU (and a real libvirtd) without the UVM: QEMU's
-kernel loads multiboot images (Multiboot 0.6.96, section 3.1: header with the a.out kludge, flag 16,
so no ELF is needed). The code runs in 32-bit protected mode at the entry address.
"""

from __future__ import annotations

import struct
from pathlib import Path

from sandbox.vmm.config import Accel, Disk, Tee, VmConfig

LOAD_ADDR = 0x100000
MARKER = b"TINYGUEST-READY\n"


def multiboot_image(marker: bytes = MARKER) -> bytes:
    header_len = 32
    code_at = LOAD_ADDR + header_len
    # mov dx,0x3f8 / mov esi,msg / lodsb / test al,al / jz done / out dx,al / jmp lodsb / cli / hlt / jmp hlt
    code = bytearray()
    code += b"\x66\xba\xf8\x03"
    msg_fixup = len(code) + 1
    code += b"\xbe\x00\x00\x00\x00"
    loop = len(code)
    code += b"\xac\x84\xc0\x74\x03\xee"
    code += b"\xeb" + struct.pack("b", loop - (len(code) + 2))
    code += b"\xfa\xf4\xeb\xfd"
    msg_addr = code_at + len(code)
    code[msg_fixup:msg_fixup + 4] = struct.pack("<I", msg_addr)
    body = bytes(code) + marker + b"\0"
    total = header_len + len(body)
    magic, flags = 0x1BADB002, 0x00010000
    checksum = (-(magic + flags)) & 0xFFFFFFFF
    header = struct.pack("<8I", magic, flags, checksum, LOAD_ADDR, LOAD_ADDR, LOAD_ADDR + total,
                         LOAD_ADDR + total, code_at)
    return header + body


def tiny_config(tmp: Path, name: str = "tiny") -> VmConfig:
    kernel = tmp / "tiny.mb"
    kernel.write_bytes(multiboot_image())
    disk = tmp / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    return VmConfig(name=name, tee=Tee.emulated, accel=Accel.tcg, vcpus=1, memory_mib=64, kernel=kernel,
                    cmdline="tiny", disks=(Disk(disk, "parma-root"),),
                    agent_sockets=(tmp / "a0.sock", tmp / "a1.sock"), console_log=tmp / "console.log",
                    qmp_socket=tmp / "qmp.sock", pidfile=tmp / "qemu.pid", network=False)
