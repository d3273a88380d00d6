"""The SEV-SNP launch on a real SNP host (`make test-snp`; skips elsewhere). The runbook: docs/snp-lab.md.

These are the checks that could not run without hardware: the host's C-bit values from CPUID, QEMU and
libvirt agree; the generated argv gets past SNP_LAUNCH_START on a real PSP; `up --tee sev-snp`
passes its post-launch self-check against AMD's roots, the predicted measurement and HOST_DATA;
an ID block is accepted by the PSP and shows in reports; a wrong expectation stops the sandbox.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox.hostcheck import Accel, Tee
from sandbox.launch import measured
from sandbox.vmm.config import Disk, VmConfig
from sandbox.vmm.qemu import build_argv
from sandbox.vmm.snp import host_sev_info, parse_domcaps_sev, query_qemu_sev_capabilities

REPO = Path(__file__).resolve().parents[2]
KEYS = REPO / "tests" / "data" / "snp-id"
BUSYBOX_LAYOUT = REPO / "build" / "images" / "busybox"
pytestmark = pytest.mark.skipif(not Path("/dev/sev").exists(), reason="needs an SEV-SNP host (/dev/sev)")


def test_host_sev_parameters_agree_between_cpuid_qemu_and_libvirt() -> None:
    info = host_sev_info()
    assert 32 <= info.cbitpos <= 63 and 0 < info.reduced_phys_bits <= 63, info
    qemu = query_qemu_sev_capabilities("qemu-system-x86_64")
    assert (qemu.cbitpos, qemu.reduced_phys_bits) == (info.cbitpos, info.reduced_phys_bits)
    virsh = subprocess.run(["virsh", "-c", "qemu:///system", "domcapabilities", "--virttype", "kvm", "--machine",
                            "q35"], capture_output=True, text=True, timeout=60, check=False)
    if virsh.returncode == 0:
        caps, snp = parse_domcaps_sev(virsh.stdout)
        assert snp, "libvirt's domain capabilities do not offer sev-snp"
        assert caps is not None and (caps.cbitpos, caps.reduced_phys_bits) == (info.cbitpos, info.reduced_phys_bits)


def test_generated_argv_gets_past_snp_launch_start(tmp_path: Path) -> None:
    """QEMU with -S creates the SNP guest (SNP_LAUNCH_START) and waits; on a non-SNP host it exits."""
    from sandbox.uvm.build import ensure_uvm

    uvm = ensure_uvm()
    identity = measured.prepare(Tee.sev_snp, uvm, b'{"snp": "test"}', 1)
    cfg = VmConfig(name="snp-argv", tee=Tee.sev_snp, accel=Accel.kvm, vcpus=1, memory_mib=512, kernel=uvm.kernel,
                   cmdline=uvm.cmdline, disks=(Disk(uvm.rootfs, "parma-root"),),
                   agent_sockets=(tmp_path / "a.sock",), console_log=tmp_path / "console.log",
                   qmp_socket=tmp_path / "qmp.sock", snp=identity.snp, network=False)
    measured.check_config(identity, cfg)
    argv = build_argv(cfg)
    proc = subprocess.Popen([argv[0], "-S", *argv[1:]], stderr=subprocess.PIPE)
    try:
        time.sleep(5)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
        proc.communicate()


@dataclass
class Cli:
    env: dict[str, str]
    group: Path

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandbox", *args], env=self.env, cwd=REPO, text=True,
                              capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    env = {**os.environ, "PARMA_SANDBOX_RUNTIME": str(tmp_path_factory.mktemp("run")),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not (BUSYBOX_LAYOUT / "index.json").exists():
        subprocess.run(["make", "-C", str(REPO), "example-images"], check=True, timeout=600)
    group = json.loads((REPO / "examples" / "minimal" / "group.json").read_text())
    group["containers"][0]["image"] = f"oci:{BUSYBOX_LAYOUT}:latest"
    path = tmp_path_factory.mktemp("group") / "group.json"
    path.write_text(json.dumps(group))
    run = Cli(env, path)
    yield run
    run("down", "--all", timeout=120)


@pytest.mark.parametrize("backend", ["qemu", "libvirt"])
def test_up_passes_the_self_check_and_attest_verify(cli: Cli, backend: str, tmp_path: Path) -> None:
    name = f"snp-{backend}"
    r = cli("up", "-d", "--debug", "--tee", "sev-snp", "--backend", backend, "--name", name, "--id-key",
            str(KEYS / "id_key.pem"), "--author-key", str(KEYS / "author_key.pem"), str(cli.group))
    try:
        assert r.returncode == 0, r.stderr
        info = json.loads(cli("inspect", name, "--format", "json").stdout)
        assert info["tee"] == "sev-snp" and info["selfcheck"]["verified"] and not info["selfcheck"]["emulated"]
        assert info["selfcheck"]["backend"] in ("configfs-tsm", "sev-guest")
        nonce = secrets.token_hex(32)
        ev = tmp_path / "ev.json"
        assert cli("attest", "report", name, "--nonce", nonce, "-o", str(ev)).returncode == 0
        policy = Path(info["state_dir"]) / "policy.json"
        v = cli("attest", "verify", str(ev), "--nonce", nonce, "--policy", str(policy), "--fetch",
                "--measurement", info["expected_measurement"], "--id-key-digest", str(KEYS / "id_key.pem"),
                "--author-key-digest", str(KEYS / "author_key.pem"))
        assert v.returncode == 0, v.stderr + v.stdout
    finally:
        cli("down", name, timeout=120)


def test_a_wrong_expected_measurement_stops_the_sandbox(cli: Cli) -> None:
    r = cli("up", "-d", "--tee", "sev-snp", "--name", "snp-wrong", "--expect-measurement", "cd" * 48, str(cli.group))
    assert r.returncode == 1 and "report.measurement" in r.stderr, r.stderr
    assert json.loads(cli("ps", "--format", "json").stdout) == []
