"""The group's disk scratch: a host-provided raw disk, encrypted and integrity-protected inside the guest.

Stack (the combination ACI's encrypted scratch uses: cryptsetup `--cipher aes-xts-plain64 --integrity
hmac-sha256 --sector-size 4096`, no journal, no wipe):

    ext4 (sandbox.guest.mkext4)                     mounted at SCRATCH_DIR, nodev, nosuid
    dm-crypt  capi:authenc(hmac(sha256),xts(aes))-plain64, 4 KiB sectors, a 32-byte tag per sector
    dm-integrity  standalone, direct writes (D), tags interleaved with data, a one-section journal (unused)
    the raw disk (virtio-blk or SCSI), a sparse file on the host

The key is 96 random bytes (64 for AES-256-XTS, 32 for HMAC-SHA256) read from the kernel's CSPRNG into a
buffer this module wipes once the table is loaded; the kernel's dm-crypt table is then its only copy. It
is never logged, never returned, and not derivable from anything outside the guest. The host sees only
ciphertext and tags: it can destroy the scratch (then reads fail with EILSEQ/EIO and ext4 turns the
filesystem read-only), but neither read nor alter it undetected. What dm-integrity does not stop is
replaying an older (data, tag) pair of the same sector: the scratch is confidential and tamper-evident
per sector, not a Merkle tree (dm-integrity's own limitation, and ACI's).

The scratch lives only as long as the VM: nothing persists the key, so the disk is unreadable afterwards.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from sandbox.guest import devmapper, mkext4, sysapi
from sandbox.shared.errors import GuestOperationFailed
from sandbox.shared.protocol import GROUP_SCRATCH_DIR

SCRATCH_DIR = Path(GROUP_SCRATCH_DIR)
CIPHER = "capi:authenc(hmac(sha256),xts(aes))-plain64"
XTS_KEY_BYTES = 64            # AES-256 in XTS mode takes two 256-bit keys
HMAC_KEY_BYTES = 32           # dm-crypt's key is the cipher key followed by the authentication key
TAG_BYTES = 32                # one HMAC-SHA256 per sector, stored by dm-integrity
SECTOR_BYTES = 4096           # dm-crypt sector_size and dm-integrity block_size
SECTORS_PER_BLOCK = SECTOR_BYTES // 512
MIN_DISK_BYTES = 64 << 20
SUPERBLOCK_BYTES = 4096       # dm-integrity's superblock area (SB_SECTORS), zeroed so the kernel formats
# dm-integrity's journal size when it formats a device. Direct mode never uses the journal, but a format
# writes all of it: by default 1/128 of the disk up to 64 MiB (an 8 GiB scratch: 64 MiB, most of the
# set-up's time under TCG). One sector asks for the least the kernel allows (it rounds up to one section).
JOURNAL_SECTORS = 1
BLKGETSIZE64 = 0x80081272     # _IOR(0x12, 114, size_t), include/uapi/linux/fs.h
HEX = b"0123456789abcdef"


class ScratchError(GuestOperationFailed):
    pass


@dataclass(frozen=True)
class Scratch:
    device: Path                      # the raw disk
    integrity: devmapper.DmDevice
    crypt: devmapper.DmDevice
    mountpoint: Path
    size_bytes: int                   # what the filesystem got (the disk minus tags and dm-integrity metadata)


def disk_size(device: Path) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.path.isfile(device):
            return os.fstat(fd).st_size
        size: int = struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        return size
    finally:
        os.close(fd)


def integrity_target(device: Path, sectors: int) -> devmapper.Target:
    """dm-integrity (dm-integrity.rst): no offset, 32-byte tags supplied by dm-crypt, D(irect) mode, 4 KiB
    blocks, the compact tag-area padding of new devices, and the smallest journal (JOURNAL_SECTORS)."""
    return devmapper.Target(0, sectors, "integrity", f"{device} 0 {TAG_BYTES} D 3 block_size:{SECTOR_BYTES} fix_padding "
                                                     f"journal_sectors:{JOURNAL_SECTORS}")


def crypt_target(backing: Path, sectors: int, key: bytearray) -> devmapper.Target:
    """dm-crypt (dm-crypt.rst) with an AEAD whose tags go to the integrity device underneath. The parameters
    are built in a bytearray (devmapper.create(secret=True) wipes it), never in a str."""
    if len(key) != XTS_KEY_BYTES + HMAC_KEY_BYTES:
        raise ValueError("wrong key size")
    params = bytearray(f"{CIPHER} ".encode())
    for b in key:
        params.append(HEX[b >> 4])
        params.append(HEX[b & 15])
    params += f" 0 {backing} 0 2 integrity:{TAG_BYTES}:aead sector_size:{SECTOR_BYTES}".encode()
    return devmapper.Target(0, sectors, "crypt", params)


def provided_sectors(status_params: str | bytearray) -> int:
    """dm-integrity's STATUSTYPE_INFO is "<mismatches> <provided data sectors> <recalculated sector or ->"."""
    if not isinstance(status_params, str):   # devmapper.status() gives text; only a table we made holds bytes
        raise ScratchError("unexpected dm-integrity status (not text)")
    fields = status_params.split()
    if len(fields) < 2 or not fields[1].isdigit():
        raise ScratchError(f"unexpected dm-integrity status {status_params!r}")
    return int(fields[1])


def random_key() -> bytearray:
    key = bytearray(XTS_KEY_BYTES + HMAC_KEY_BYTES)
    os.getrandom(1)            # returns once the kernel's CSPRNG is seeded (it never blocks afterwards)
    with open("/dev/urandom", "rb", buffering=0) as f:
        if f.readinto(key) != len(key):
            raise ScratchError("short read from /dev/urandom")
    return key


def _zero_superblock(device: Path) -> None:
    """Whatever the host put at the start of the disk, dm-integrity formats it afresh: a superblock from the
    host would choose the geometry (and, in journal mode, replay a journal)."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.pwrite(fd, bytes(SUPERBLOCK_BYTES), 0) != SUPERBLOCK_BYTES:
            raise ScratchError(f"short write to {device}")
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(name: str) -> None:
    try:
        devmapper.remove(name)
    except OSError:
        pass


def setup(device: Path, *, name: str = "parma-scratch", mountpoint: Path = SCRATCH_DIR) -> Scratch:
    """Turn the raw `device` into an encrypted, integrity-protected ext4 mounted at `mountpoint`."""
    try:
        size = disk_size(device)
    except OSError as e:
        raise ScratchError(f"cannot open the scratch disk {device}: {e.strerror or e}") from None
    if size < MIN_DISK_BYTES:
        raise ScratchError(f"the scratch disk {device} has {size} bytes; at least {MIN_DISK_BYTES >> 20} MiB needed")
    integrity_name = f"{name}-integrity"
    try:
        _zero_superblock(device)
        # A first, one-block table makes the kernel format the superblock and compute how many sectors
        # are left for data; the real table then asks for exactly those.
        probe = devmapper.create(integrity_name, (integrity_target(device, SECTORS_PER_BLOCK),), readonly=False)
        provided = provided_sectors(devmapper.status(probe.name)[0].params)
        devmapper.remove(probe.name)
        sectors = provided - provided % SECTORS_PER_BLOCK
        integrity = devmapper.create(integrity_name, (integrity_target(device, sectors),), readonly=False)
    except OSError as e:
        _remove_quietly(integrity_name)
        raise ScratchError(f"cannot set up dm-integrity on {device}: {e.strerror or e}") from None
    try:
        key = random_key()
        try:
            crypt = devmapper.create(name, (crypt_target(integrity.node, sectors, key),), readonly=False,
                                     secret=True)
        finally:
            devmapper.wipe(key)
    except OSError as e:
        _remove_quietly(integrity_name)
        raise ScratchError(f"cannot set up dm-crypt on {device}: {e.strerror or e}") from None
    try:
        fd = os.open(crypt.node, os.O_WRONLY | os.O_CLOEXEC)
        try:
            mkext4.format_device(fd, sectors * 512, label=b"parma-scratch")
        finally:
            os.close(fd)
        mountpoint.mkdir(parents=True, exist_ok=True)
        sysapi.mount(str(crypt.node), mountpoint, "ext4", sysapi.MS_NODEV | sysapi.MS_NOSUID, mkext4.MOUNT_OPTIONS)
    except (OSError, mkext4.Ext4FormatError) as e:
        _remove_quietly(name)
        _remove_quietly(integrity_name)
        raise ScratchError(f"cannot make the scratch filesystem on {device}: {getattr(e, 'strerror', None) or e}") \
            from None
    return Scratch(device, integrity, crypt, mountpoint, sectors * 512)


def teardown(scratch: Scratch) -> None:
    """Unmount and remove both mappings; the key goes with the dm-crypt table."""
    sysapi.umount(scratch.mountpoint)
    devmapper.remove(scratch.crypt.name)
    devmapper.remove(scratch.integrity.name)
