"""What a launch must measure as, and who vouches for it.

`prepare()` decides, before the VM exists: HOST_DATA (the policy hash); on SEV-SNP the launch
parameters (sandbox/vmm/snp.py, read from the host) and from them the predicted MEASUREMENT; in
emulation the measurement the same UVM has on SEV-SNP with the default launch parameters, which the
emulated PSP reports. With an ID key (or a ready ID block) it adds the ID block that makes the PSP
itself refuse any other measurement; the emulated PSP performs the same SNP_LAUNCH_FINISH checks.

`check_config()` recomputes the measurement from the finished VmConfig (the object the QEMU argv and
the libvirt XML are rendered from) and refuses to launch if it differs from the prediction: one
source of launch parameters, enforced at run time as well as by the tests.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.attest.id_keys import IdMaterial, check_launch, load_private_key, make_id_material
from sandbox.attest.psp import write_psp_material
from sandbox.hostcheck import Tee
from sandbox.log import log
from sandbox.shared.errors import InputError, StateError
from sandbox.uvm.measure import launch_digest, launch_measurement, reference_measurement, snp_request
from sandbox.vmm.config import VmConfig
from sandbox.vmm.snp import SNP_POLICY_DEFAULT, SnpLaunch, host_sev_info, snp_launch


@dataclass(frozen=True)
class IdentityOptions:
    """What the user asks `up` to vouch for the launch with (all optional)."""

    id_key: Path | None = None              # sign an ID block here (convenient; the key is then on this host)
    author_key: Path | None = None
    id_block: Path | None = None            # or use one signed elsewhere ('measure --id-key ... --id-out FILE')
    expect_measurement: bytes | None = None  # a reference value from elsewhere; the report must equal it
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0

    def __post_init__(self) -> None:
        if self.id_key is not None and self.id_block is not None:
            raise InputError("give either --id-key (sign here) or --id-block (signed elsewhere), not both")
        if self.author_key is not None and self.id_key is None:
            raise InputError("--author-key signs the ID key: it needs --id-key")


@dataclass(frozen=True)
class LaunchIdentity:
    tee: Tee
    host_data: bytes
    measurement: bytes | None                # the prediction (None: emulation without the AmdSev OVMF)
    snp: SnpLaunch | None = None
    id_material: IdMaterial | None = None
    expect_measurement: bytes | None = None  # the user's reference value, if any

    @property
    def expected_measurement(self) -> bytes | None:
        """What the post-launch self-check demands: the user's reference value, else the prediction."""
        return self.expect_measurement or self.measurement

    def to_json(self) -> dict[str, Any]:
        snp = self.snp
        return {
            "tee": self.tee.value, "host_data": self.host_data.hex(),
            "predicted_measurement": self.measurement.hex() if self.measurement else None,
            "expected_measurement": self.expected_measurement.hex() if self.expected_measurement else None,
            "snp": None if snp is None else {
                "cpu_model": snp.cpu_model, "cbitpos": snp.cbitpos, "reduced_phys_bits": snp.reduced_phys_bits,
                "guest_features": hex(snp.guest_features), "policy": hex(snp.policy),
                "kernel_hashes": snp.kernel_hashes, "firmware": str(snp.firmware)},
            "id": self.id_material.to_json() if self.id_material else None,
        }


def load_id_block_file(path: Path) -> tuple[bytes, bytes, bool]:
    """(ID block, ID auth, author key enabled) from the JSON `parma-sandbox measure --id-out` writes."""
    try:
        doc = json.loads(Path(path).read_text())
        return (base64.b64decode(doc["id_block"], validate=True), base64.b64decode(doc["id_auth"], validate=True),
                bool(doc["author_key_enabled"]))
    except OSError as e:
        raise InputError(f"cannot read the ID block file {path}: {e.strerror}") from e
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise InputError(f"{path}: not an ID block file ({e})",
                         hint="write one with 'parma-sandbox measure --uvm ... --id-key KEY --id-out FILE'") from e


def _id_material(opts: IdentityOptions, measurement: bytes | None, policy: int) -> IdMaterial | None:
    if opts.id_key is None and opts.id_block is None:
        return None
    if measurement is None:
        raise InputError("an ID block needs the expected measurement, and this UVM has none (no AmdSev OVMF)",
                         hint="run 'make firmware-snp'")
    if opts.id_key is not None:
        return make_id_material(measurement=measurement, policy=policy, id_key=load_private_key(opts.id_key),
                                author_key=load_private_key(opts.author_key, "author key") if opts.author_key
                                else None, family_id=opts.family_id, image_id=opts.image_id,
                                guest_svn=opts.guest_svn)
    assert opts.id_block is not None
    block, auth, author = load_id_block_file(opts.id_block)
    try:
        # The PSP would refuse it at SNP_LAUNCH_FINISH; say so before launching, with the reason.
        return check_launch(block, auth, measurement=measurement, policy=policy, author_key_enabled=author)
    except InputError as e:
        raise InputError(f"{opts.id_block}: {e.message}",
                         hint="the ID block was signed for another UVM, vCPU count or policy; re-create it with "
                              "'parma-sandbox measure --uvm --mode snp --vcpus N --vcpu-type MODEL --id-key KEY "
                              "--id-out FILE'") from e


def prepare(tee: Tee, uvm: Any, policy: bytes, vcpus: int, opts: IdentityOptions | None = None) -> LaunchIdentity:
    """The launch's expected identity; see the module docstring. `uvm` is a UvmArtifacts."""
    opts = opts or IdentityOptions()
    host_data = hashlib.sha256(policy).digest()
    initrd = getattr(uvm, "initrd", None)
    firmware = getattr(uvm, "firmware", None)
    snp = None
    if tee == Tee.sev_snp:
        snp = snp_launch(host_data=host_data, firmware=firmware, sev=host_sev_info())
        measurement: bytes | None = launch_digest(snp_request(
            firmware=snp.firmware, vcpus=vcpus, cpu_model=snp.cpu_model, guest_features=snp.guest_features,
            kernel=Path(uvm.kernel), initrd=initrd, cmdline=str(uvm.cmdline)))
        guest_policy = snp.policy
    else:
        guest_policy = SNP_POLICY_DEFAULT
        if firmware is None:
            log.warning("the UVM has no AmdSev OVMF, so no expected launch measurement: emulated reports carry "
                        "zeros ('make firmware-snp' builds it)")
            measurement = None
        else:
            measurement = reference_measurement(firmware=Path(firmware), kernel=Path(uvm.kernel), initrd=initrd,
                                                cmdline=str(uvm.cmdline), vcpus=vcpus)
    material = _id_material(opts, measurement, guest_policy)
    if snp is not None and material is not None:
        snp = dataclasses.replace(snp, id_block=material.block.to_bytes(), id_auth=material.auth.to_bytes(),
                                  author_key_enabled=material.author_key_enabled)
    if opts.expect_measurement is not None and measurement is not None and opts.expect_measurement != measurement:
        log.warning("--expect-measurement %s differs from this launch's predicted measurement %s: the report "
                    "will decide", opts.expect_measurement.hex(), measurement.hex())
    return LaunchIdentity(tee, host_data, measurement, snp, material, opts.expect_measurement)


def write_emulated_psp(identity: LaunchIdentity, path: Path) -> None:
    """Emulation: the emulated PSP's launch material (after its SNP_LAUNCH_FINISH checks of an ID block)."""
    material = identity.id_material
    if material is not None:
        check_launch(material.block.to_bytes(), material.auth.to_bytes(), measurement=identity.measurement or b"",
                     policy=SNP_POLICY_DEFAULT, author_key_enabled=material.author_key_enabled)
    write_psp_material(path, host_data=identity.host_data, measurement=identity.measurement or bytes(48),
                       guest_policy=SNP_POLICY_DEFAULT, id_material=material)


def check_config(identity: LaunchIdentity, cfg: VmConfig) -> None:
    """Refuse a VmConfig whose own measurement is not the prediction (a launch-parameter drift)."""
    if cfg.snp is None or identity.measurement is None:
        return
    actual = launch_measurement(cfg)
    if actual != identity.measurement:
        raise StateError(f"the VM configuration measures {actual.hex()}, not the predicted "
                         f"{identity.measurement.hex()}: its launch parameters drifted from the prediction",
                         hint="this is a bug in parma-sandbox; please report it with 'up --debug' output")
