"""The SEV-SNP launch checked against the real tools' own parsers and schemas (no SNP hardware needed).

- QEMU's option parser: every SEV-SNP argv the project generates, and the golden SEV-SNP argv files, is
  started with -S; on a host without SEV-SNP it must fail only at the SNP/KVM step, never while parsing
  options or objects.
  A deliberately wrong property shows the oracle does catch parse errors.
- QEMU's object model: every property the argv sets on an -object exists on that QOM type
  (qom-list-properties), and the sev-snp-guest ones are listed by `-object sev-snp-guest,help`.
- QEMU's CPU models: the CPUID(1).EAX that sev-snp-measure puts into every VMSA for a model is the
  family/model/stepping QEMU gives that model (query-cpu-model-expansion), and libvirt's CPU map
  knows the model with the same signature.
- libvirt's schemas: the golden domain XML (emulated and SEV-SNP, with and without an ID block) and
  the domain-capabilities sample validate with the installed libvirt's virt-xml-validate.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from sevsnpmeasure import vcpu_types

from sandbox.hostcheck import Accel, Tee
from sandbox.uvm.measure import MANIFEST_CPU_TYPES
from sandbox.vmm.config import Disk, FwCfgFile, VmConfig
from sandbox.vmm.qemu import build_argv
from sandbox.vmm.snp import SNP_CPU_MODEL, SnpLaunch

QEMU = shutil.which("qemu-system-x86_64")
GOLDEN = Path(__file__).parents[1] / "unit" / "golden"
DATA = Path(__file__).parents[1] / "data"
# How QEMU fails once every option is parsed, at the accelerator / SEV step, on a host without SEV-SNP.
SNP_STAGE_ERRORS = ("vm-type SEV-SNP not supported by KVM", "Could not access KVM kernel module",
                    "failed to initialize kvm", "sev_common_kvm_init", "SEV: Failed to open", "cbitpos check failed")
LIBVIRT_CPU_MAP = Path("/usr/share/libvirt/cpu_map")

needs_qemu = pytest.mark.skipif(QEMU is None, reason="QEMU is not installed")


def _snp_config(tmp: Path, *, vcpus: int = 1, initrd: bool = False, with_id: bool = False) -> VmConfig:
    from sandbox.attest.id_keys import load_private_key, make_id_material

    fw = tmp / "OVMF.amdsev.fd"
    fw.write_bytes(bytes(4 << 20))
    kernel = tmp / "bzImage"
    kernel.write_bytes(b"k" * 4096)
    disk = tmp / "rootfs.img"
    disk.write_bytes(bytes(1 << 20))
    rd = tmp / "initrd.img" if initrd else None
    if rd:
        rd.write_bytes(b"r" * 512)
    snp = SnpLaunch(host_data=bytes(range(32)), firmware=fw, cbitpos=51, reduced_phys_bits=1)
    if with_id:
        keys = DATA / "snp-id"
        m = make_id_material(measurement=bytes(48), policy=snp.policy, id_key=load_private_key(keys / "id_key.pem"),
                             author_key=load_private_key(keys / "author_key.pem"))
        snp = dataclasses.replace(snp, id_block=m.block.to_bytes(), id_auth=m.auth.to_bytes(), author_key_enabled=True)
    return VmConfig(name="oracle", tee=Tee.sev_snp, accel=Accel.kvm, vcpus=vcpus, memory_mib=256, kernel=kernel,
                    cmdline="console=ttyS0 root=/dev/dm-0 dm-mod.create=\"a,,,ro,0 8 verity 1 x\"", initrd=rd,
                    disks=(Disk(disk, "parma-root"),), agent_sockets=(tmp / "a0.sock", tmp / "a1.sock"),
                    console_log=tmp / "console.log", qmp_socket=tmp / "qmp.sock", pidfile=tmp / "qemu.pid",
                    snp=snp, fw_cfg=(FwCfgFile("opt/parma/kbs", kernel),))


def _run_paused(argv: list[str], timeout: float = 20) -> tuple[int | None, str]:
    """Start QEMU with -S; (exit code, stderr), or (None, '') if it is still running (SNP host: all parsed)."""
    proc = subprocess.Popen([argv[0], "-S", *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err.decode(errors="replace").strip()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, ""


def _objects(argv: list[str]) -> list[tuple[str, dict[str, str]]]:
    out = []
    for i, arg in enumerate(argv):
        if arg == "-object":
            kind, *props = argv[i + 1].replace(",,", "\0").split(",")
            out.append((kind, dict(p.replace("\0", ",").split("=", 1) for p in props)))
    return out


def _qmp(commands: list[dict], *extra: str) -> list[dict]:
    assert QEMU is not None
    stdin = "".join(json.dumps(c) + "\n" for c in [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}])
    proc = subprocess.run([QEMU, "-machine", "none", "-display", "none", "-nodefaults", "-qmp", "stdio", *extra],
                          input=stdin.encode(), capture_output=True, timeout=30, check=False)
    replies = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    return [r["return"] for r in replies if "return" in r][1:1 + len(commands)]


@needs_qemu
@pytest.mark.parametrize(("vcpus", "initrd", "with_id"), [(1, False, False), (4, True, False), (2, False, True)])
def test_snp_argv_fails_only_at_the_snp_step(tmp_path: Path, vcpus: int, initrd: bool, with_id: bool) -> None:
    argv = build_argv(_snp_config(tmp_path, vcpus=vcpus, initrd=initrd, with_id=with_id), QEMU or "")
    code, err = _run_paused(argv)
    if code is None:
        return  # an SEV-SNP host: QEMU parsed everything and created the paused guest
    assert code != 0
    assert any(m in err for m in SNP_STAGE_ERRORS), f"QEMU refused the argv before the SNP step: {err}"


@needs_qemu
@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN.glob("qemu-sev-snp*.argv")))
def test_golden_snp_argv_fails_only_at_the_snp_step(tmp_path: Path, name: str) -> None:
    """The golden files themselves (tests/unit/test_vmm_render.py pins build_argv to them), their host paths
    moved under tmp_path and filled with stand-in files: QEMU parses every option and object."""
    golden_roots = ("/root/.cache/parma-sandbox", "/run/user/0/parma-sandbox/hello")
    argv = [QEMU or ""]
    for arg in (GOLDEN / name).read_text().splitlines()[1:]:
        for i, root in enumerate(golden_roots):
            arg = arg.replace(root, str(tmp_path / f"root{i}"))
        argv.append(arg)
    assert len(argv) > 20 and any(a.startswith("sev-snp-guest,") for a in argv)
    for path in {Path(v) for a in argv for v in a.replace("=", ",").split(",") if v.startswith(str(tmp_path))}:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".fd", ".img") or path.name == "bzImage":
            path.write_bytes(bytes(4 << 20) if path.suffix == ".fd" else b"k" * 4096 if path.name == "bzImage"
                             else bytes(1 << 20))
    code, err = _run_paused(argv)
    if code is None:
        return  # an SEV-SNP host: QEMU parsed everything and created the paused guest
    assert code != 0
    assert any(m in err for m in SNP_STAGE_ERRORS), f"QEMU refused the golden argv before the SNP step: {err}"


@needs_qemu
def test_the_oracle_catches_option_errors(tmp_path: Path) -> None:
    argv = build_argv(_snp_config(tmp_path, with_id=True), QEMU or "")
    at = next(i for i, a in enumerate(argv) if a.startswith("sev-snp-guest,"))
    for broken, message in ((argv[at] + ",no-such-property=1", "Invalid parameter 'no-such-property'"),
                            (argv[at].replace("id-block=", "id-block=AAAA"), "not equal to 96"),
                            (argv[at].replace("host-data=", "host-data=AAAA"), "not equal to 32")):
        code, err = _run_paused([*argv[:at], broken, *argv[at + 1:]])
        assert code not in (0, None) and message in err, err
        assert not any(m in err for m in SNP_STAGE_ERRORS)


@needs_qemu
def test_every_object_property_exists_in_qemu(tmp_path: Path) -> None:
    objects = _objects(build_argv(_snp_config(tmp_path, with_id=True), QEMU or ""))
    kinds = sorted({k for k, _ in objects})
    assert kinds == ["memory-backend-memfd", "sev-snp-guest"]
    listed = _qmp([{"execute": "qom-list-properties", "arguments": {"typename": k}} for k in kinds])
    for (kind, props), names in zip(sorted(objects), listed, strict=True):
        assert set(props) - {"id"} <= {p["name"] for p in names}, kind
    assert QEMU is not None
    helptext = subprocess.run([QEMU, "-object", "sev-snp-guest,help"], capture_output=True, text=True,
                              timeout=30, check=False).stdout
    own = {line.split("=", 1)[0].strip() for line in helptext.splitlines()[1:] if "=" in line}
    snp_props = dict(objects)["sev-snp-guest"]
    # cbitpos and reduced-phys-bits are inherited from sev-common (help lists a type's own properties).
    assert set(snp_props) - {"id", "cbitpos", "reduced-phys-bits"} <= own
    assert {"id-block", "id-auth", "author-key-enabled", "host-data", "policy", "kernel-hashes"} <= set(snp_props)


@needs_qemu
@pytest.mark.parametrize("model", sorted({SNP_CPU_MODEL, *MANIFEST_CPU_TYPES}))
def test_cpu_model_signature_agrees_with_qemu_and_libvirt(model: str) -> None:
    (expansion,) = _qmp([{"execute": "query-cpu-model-expansion",
                          "arguments": {"type": "full", "model": {"name": model}}}], "-accel", "tcg")
    props = expansion["model"]["props"]
    family, cpu_model, stepping = props["family"], props["model"], props["stepping"]
    assert vcpu_types.cpu_sig(family, cpu_model, stepping) == vcpu_types.CPU_SIGS[model]
    cpu_map = LIBVIRT_CPU_MAP / f"x86_{model}.xml"
    if not LIBVIRT_CPU_MAP.is_dir():
        pytest.skip("libvirt is not installed")
    assert cpu_map.is_file(), f"libvirt does not know the CPU model {model} (libvirt >= 10.5 needed)"
    sig = ET.parse(cpu_map).getroot().find("model/signature")
    assert sig is not None and (int(sig.get("family", -1)), int(sig.get("model", -1))) == (family, cpu_model)


needs_validate = pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="libvirt-clients missing")


def _validate(path: Path, kind: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virt-xml-validate", str(path), kind], capture_output=True, text=True, timeout=60,
                          check=False)


@needs_validate
@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN.glob("libvirt-*.xml")))
def test_golden_domain_xml_validates(name: str) -> None:
    result = _validate(GOLDEN / name, "domain")
    assert result.returncode == 0, result.stderr + result.stdout


@needs_validate
def test_the_schema_check_refuses_what_libvirt_would(tmp_path: Path) -> None:
    xml = (GOLDEN / "libvirt-sev-snp-id.xml").read_text()
    for bad in (xml.replace("<cbitpos>51</cbitpos>", "<cbitpos>51</cbitpos><bogus/>"),
                xml.replace('type="sev-snp"', 'type="sev-snp-typo"')):
        (tmp_path / "bad.xml").write_text(bad)
        assert _validate(tmp_path / "bad.xml", "domain").returncode != 0


@needs_validate
def test_domain_capabilities_sample_validates() -> None:
    result = _validate(DATA / "libvirt" / "domcaps-sev-snp.xml", "domaincaps")
    assert result.returncode == 0, result.stderr + result.stdout
