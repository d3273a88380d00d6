"""The rootfs tar as the UVM's root device: ext4 with a dm-verity tree appended, and the command line.

Conversion uses the project's own tar->ext4 writer and dm-verity code (sandbox.layers, sandbox.shared.
verity). The layout is the one ACI's UVM uses (parma-aci.md §1.1): `ext4 | hash tree`, no verity
superblock, so the tree starts at block N (= data blocks) and the table is
`verity 1 /dev/vda /dev/vda 4096 4096 N N sha256 <root> <salt>`. The root hash and salt sit on the
kernel command line (dm-mod.create=), which SEV-SNP measures (kernel-hashes), so the whole rootfs,
the agent included, is pinned by the launch measurement.

The salt is not random per build: it is derived from the tar's SHA-256, which keeps it unique per
rootfs content while the same tar always gives the same image, root hash and measurement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sandbox.fsutil import atomic_dir, file_lock
from sandbox.layers.convert import CONVERTER_VERSION, convert_tar_to_ext4
from sandbox.layers.tar2ext4 import Ext4Options
from sandbox.paths import cache_dir
from sandbox.progress import step
from sandbox.shared.verity import dm_table_line, format_verity
from sandbox.uvm.fetch import sha256_file
from sandbox.uvm.overlay import INIT_PATH, RootfsTar

RECIPE_VERSION = 1
SALT_CONTEXT = b"parma-sandbox/uvm-rootfs-salt/v1\0"
# The rootfs is the UVM's first virtio-blk disk. The launcher must attach it first (disks[0]).
ROOT_DEVICE = "/dev/vda"
DM_NAME = "uvm-root"
# dm-verity optional argument: verify blocks in softirq context instead of a workqueue when possible
# (falls back to the workqueue on failure): about 4% faster to agent-ready under TCG.
VERITY_OPTIONS = ("try_verify_in_tasklet",)
# A base filesystem, not an OCI layer: no whiteout conversion, no overlay origin marks.
EXT4_OPTIONS = Ext4Options(whiteouts=False, origin_xattr=False)


@dataclass(frozen=True)
class RootfsImage:
    path: Path              # ext4 data blocks, then the verity tree (no superblock)
    sha256: str             # of the whole image file
    size: int
    root_hash: str
    salt: bytes
    data_blocks: int
    hash_start_block: int
    tar_sha256: str
    key: str

    def dm_table(self, device: str = ROOT_DEVICE) -> str:
        table = dm_table_line(device, device, data_blocks=self.data_blocks, hash_start_block=self.hash_start_block,
                              root_hash=self.root_hash, salt=self.salt)
        # verity.rst: optional parameters follow as <count> <args...>
        return f"{table} {len(VERITY_OPTIONS)} {' '.join(VERITY_OPTIONS)}" if VERITY_OPTIONS else table


def derive_salt(tar_sha256: str) -> bytes:
    return hashlib.sha256(SALT_CONTEXT + bytes.fromhex(tar_sha256)).digest()


def options_key(options: object) -> object:
    """The writer options as JSON-able data that names functions and classes by their qualified names.

    Not repr(): the options hold functions (the dialect's xattr block writer), whose repr carries their
    address, so the key and the cached image would change with every process."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return {f.name: options_key(getattr(options, f.name)) for f in dataclasses.fields(options)}
    if isinstance(options, type) or callable(options):
        return f"{getattr(options, '__module__', '?')}.{getattr(options, '__qualname__', repr(options))}"
    if isinstance(options, bytes):
        return options.hex()
    return options


def image_key(tar: RootfsTar) -> str:
    doc = {"recipe": RECIPE_VERSION, "tar": tar.sha256, "converter": CONVERTER_VERSION,
           "options": options_key(EXT4_OPTIONS)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _load(d: Path, key: str) -> RootfsImage | None:
    meta = d / "rootfs.json"
    if not meta.is_file():
        return None
    m = json.loads(meta.read_text())
    return RootfsImage(path=d / "rootfs.img", sha256=m["sha256"], size=m["size"], root_hash=m["root_hash"],
                       salt=bytes.fromhex(m["salt"]), data_blocks=m["data_blocks"],
                       hash_start_block=m["hash_start_block"], tar_sha256=m["tar_sha256"], key=key)


def convert_rootfs(tar: Path, out: Path, *, tar_sha256: str) -> dict[str, object]:
    """tar -> `out` (ext4 + appended tree); returns the verity parameters. Deterministic."""
    ext4 = convert_tar_to_ext4(tar, out, options=EXT4_OPTIONS, name="the UVM rootfs")
    salt = derive_salt(tar_sha256)
    with step("Hashing the UVM rootfs (dm-verity)"):
        info = format_verity(out, salt=salt, superblock=False)
    return {"root_hash": info.root_hash, "salt": salt.hex(), "data_blocks": info.data_blocks,
            "hash_start_block": info.hash_start_block, "ext4_size": ext4.ext4_size, "entries": ext4.entries}


def build_rootfs_image(tar: RootfsTar) -> RootfsImage:
    key = image_key(tar)
    final = cache_dir() / "uvm" / "rootfs" / key
    if hit := _load(final, key):
        return hit
    with file_lock(final.with_name(f"{key}.lock")):
        if hit := _load(final, key):
            return hit
        with atomic_dir(final) as stage:
            img = stage / "rootfs.img"
            params = convert_rootfs(tar.tar, img, tar_sha256=tar.sha256)
            (stage / "rootfs.json").write_text(json.dumps({
                **params, "sha256": sha256_file(img), "size": img.stat().st_size, "tar_sha256": tar.sha256,
                "converter": CONVERTER_VERSION,
            }, indent=2) + "\n")
    hit = _load(final, key)
    assert hit is not None
    return hit


def kernel_cmdline(image: RootfsImage, *, init: str = f"/{INIT_PATH}") -> str:
    """The measured command line: serial console, and the verified root pinned by root hash and salt."""
    return " ".join([
        "console=ttyS0",
        "quiet",                                    # boot log off the (slow, emulated) serial line;
                                                    # errors such as dm-verity corruption still print
        f"dm-mod.waitfor={ROOT_DEVICE}",
        f'dm-mod.create="{DM_NAME},,,ro,{image.dm_table()}"',
        "root=/dev/dm-0", "ro", "rootfstype=ext4",
        f"init={init}",
    ])
