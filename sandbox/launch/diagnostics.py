"""`parma-sandbox --debug up`: keep everything needed to report a failed (or puzzling) launch.

With --debug, `up` copies into <runtime dir>/.debug/<name>-<UTC time>/ (the runtime dir is
$PARMA_SANDBOX_RUNTIME, else $XDG_RUNTIME_DIR/parma-sandbox, else /tmp/parma-sandbox-<uid>;
$PARMA_SANDBOX_DEBUG_DIR replaces <runtime dir>/.debug), whether the launch succeeded or not, and
says where on stderr:
  qemu.sh           the exact QEMU command (a replay script; QEMU backend)
  domain.xml        the domain XML libvirt was given (libvirt backend)
  console.log       the guest's serial console
  qemu.log          QEMU's own output (QEMU backend); libvirt-qemu.log, libvirt's log of the domain
  selfcheck.json    the post-launch report (evidence) and every verification check
  launch.json       the launch identity: predicted and expected measurement, HOST_DATA, SNP parameters
                    (CPU model, cbitpos, reduced-phys-bits, policy), the ID block
  record.json       the sandbox record; check.json, what `parma-sandbox check` found; error.txt, the error
A launch that fails before it has a sandbox record (resolving images, building the UVM, computing the
launch identity) keeps error.txt, check.json and reached.json (the steps it got through, with times).
The emulated PSP's material (psp.json) is not copied: it holds the emulated VCEK's private key.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from pathlib import Path

from sandbox.hostcheck import check_host
from sandbox.log import DEBUG, log
from sandbox.paths import runtime_dir
from sandbox.state import SandboxRecord
from sandbox.vmm.libvirt_probe import with_libvirt

FILES = ("qemu.sh", "domain.xml", "console.log", "qemu.log", "selfcheck.json")
LIBVIRT_LOG_DIR = Path("/var/log/libvirt/qemu")
DEBUG_DIR_ENV = "PARMA_SANDBOX_DEBUG_DIR"


def debug_dir(name: str) -> Path:
    """Where `up --debug` keeps a launch's files (a dot directory: `ps` never mistakes it for a sandbox)."""
    base = Path(os.environ.get(DEBUG_DIR_ENV) or runtime_dir() / ".debug")
    return base / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def keep_diagnostics(state_dir: Path, record: SandboxRecord, *, error: BaseException | None = None) -> Path | None:
    """Copy the launch's diagnostics out of `state_dir` (only under --debug); returns where."""
    if not DEBUG.get():
        return None
    target = debug_dir(record.name)
    try:
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in FILES:
            if (state_dir / name).is_file():
                shutil.copyfile(state_dir / name, target / name)
        domain = (record.vm or {}).get("domain")
        if domain and (LIBVIRT_LOG_DIR / f"{domain}.log").is_file():
            shutil.copyfile(LIBVIRT_LOG_DIR / f"{domain}.log", target / "libvirt-qemu.log")
        (target / "record.json").write_text(json.dumps(record.to_json(), indent=2, default=str) + "\n")
        (target / "launch.json").write_text(json.dumps(record.launch, indent=2) + "\n")
        (target / "check.json").write_text(json.dumps(with_libvirt(check_host()).to_json(), indent=2) + "\n")
        if error is not None:
            (target / "error.txt").write_text("".join(traceback.format_exception(error)))
    except OSError as e:
        log.warning("could not keep the debug files in %s: %s", target, e)
        return None
    log.info("debug files for %s kept in %s", record.name, target)
    return target


def keep_early_diagnostics(name: str, error: BaseException, reached: dict[str, float]) -> Path | None:
    """Under --debug, what is known about a launch that failed before it had a state directory: the
    error, the host check and the steps reached (`reached`: step -> seconds). Returns where."""
    if not DEBUG.get():
        return None
    target = debug_dir(name)
    try:
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        (target / "error.txt").write_text("".join(traceback.format_exception(error)))
        (target / "reached.json").write_text(json.dumps(reached, indent=2) + "\n")
        (target / "check.json").write_text(json.dumps(with_libvirt(check_host()).to_json(), indent=2) + "\n")
    except OSError as e:
        log.warning("could not keep the debug files in %s: %s", target, e)
        return None
    log.info("debug files for %s kept in %s", name, target)
    return target
