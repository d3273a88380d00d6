"""The key broker's store: secrets with their release policies, the broker's signing key, the audit log.

Layout (the directory is 0700; every file that holds key material is 0600):

  <store>/broker-key.pem           the broker's P-384 signing key (PKCS#8 PEM); its SPKI's SHA-256 is
                                   the pin that policies list in `key_brokers`
  <store>/secrets/<name>.json      one secret: value and release policy together, so a reader never sees
                                   a value with another secret's policy (written whole, then renamed)
  <store>/audit.log                append-only JSON lines, hash-chained (sandbox/kbs/audit.py)

`kbs serve` reads a secret file on every request, so `secret put` and `secret rm` take effect at once.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.fsutil import atomic_write, file_lock
from sandbox.shared.errors import InputError, NotFoundError, StateError
from sandbox.shared.kbs_protocol import MAX_SECRET_SIZE, check_secret_name, key_pin
from sandbox.shared.snp.product import Product, layout_of
from sandbox.shared.snp.tcb import parse_tcb_spec

STORE_ENV = "PARMA_SANDBOX_KBS_STORE"
SECRET_FORMAT = "parma-sandbox/kbs-secret/v2"
# v1 (before release policies had any_uvm) is still read: such a secret keeps working when it names
# measurements (and, for hardware evidence, a minimum TCB); otherwise the broker refuses it and says
# how to re-store it. Secrets are always written as v2.
READABLE_FORMATS = {"parma-sandbox/kbs-secret/v1": 1, SECRET_FORMAT: 2}
HOST_DATA_HEX = re.compile(r"[0-9a-f]{64}")
MEASUREMENT_HEX = re.compile(r"[0-9a-f]{96}")


def default_store() -> Path:
    """$PARMA_SANDBOX_KBS_STORE, else $XDG_DATA_HOME/parma-sandbox/kbs (~/.local/share/...)."""
    if env := os.environ.get(STORE_ENV):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "parma-sandbox" / "kbs"


def _hex_list(values: Iterable[str], pattern: re.Pattern[str], what: str, size: int) -> tuple[str, ...]:
    out = []
    for v in values:
        text = str(v).strip().lower().removeprefix("0x")
        if not pattern.fullmatch(text):
            raise InputError(f"{what}: {str(v)[:140]!r} is not {size} bytes of hex ({2 * size} hex digits)")
        if text not in out:
            out.append(text)
    return tuple(out)


def check_host_data(values: Iterable[str]) -> tuple[str, ...]:
    """Execution policy hashes (HOST_DATA) as a release policy stores them: lowercase hex, no repeats."""
    return _hex_list(values, HOST_DATA_HEX, "host_data", 32)


@dataclass(frozen=True)
class ReleasePolicy:
    """When a secret may be released: evidence for one of `host_data` (the execution policy) from a UVM
    with one of `measurement` (its reference values), at least `min_tcb`, never a debug guest, VMPL 0.

    A policy that would release on HOST_DATA alone exists only when the owner said so (`any_uvm`) or
    was stored by an older parma-sandbox; `binding_problem()` names what is missing, `secret put`
    refuses it and the broker refuses to release under it."""

    host_data: tuple[str, ...]               # allowed HOST_DATA values (policy hashes), hex; at least one
    measurement: tuple[str, ...] = ()        # allowed launch measurements, hex; empty only with any_uvm
    min_tcb: str | None = None               # minimum REPORTED_TCB, as `attest verify --min-tcb` takes it
    allow_emulated: bool = False             # accept evidence signed by this installation's emulated PSP
    any_uvm: bool = False                    # the owner accepts any UVM with this HOST_DATA (--any-uvm)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host_data", check_host_data(self.host_data))
        object.__setattr__(self, "measurement", _hex_list(self.measurement, MEASUREMENT_HEX, "measurement", 48))
        if not self.host_data:
            raise InputError("a release policy needs at least one host_data (execution policy hash)",
                             hint="pass --policy FILE or --policy-hash HEX")
        if self.any_uvm and self.measurement:
            raise InputError("--any-uvm contradicts --measurement: a secret is bound to measurements or to any UVM")
        if self.min_tcb is not None:
            # Turin's layout knows every component name (fmc too); the verifier re-reads it per product.
            parse_tcb_spec(self.min_tcb, layout_of(Product.TURIN))

    def uvm_problem(self) -> str | None:
        """Why a release under this policy would trust any UVM with the right HOST_DATA, or None."""
        if self.measurement or self.any_uvm:
            return None
        return ("it is bound to HOST_DATA alone, so any UVM with that HOST_DATA (a kernel and rootfs of the "
                "host's choosing) would get it")

    def hardware_problem(self) -> str | None:
        """Why hardware (non-emulated) evidence may not have this secret, or None."""
        if self.min_tcb is None:
            return "it has no minimum TCB, so firmware with known flaws would be trusted with it"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"host_data": list(self.host_data), "measurement": list(self.measurement),
                "min_tcb": self.min_tcb, "allow_emulated": self.allow_emulated, "allow_debug": False,
                "any_uvm": self.any_uvm}

    @classmethod
    def from_dict(cls, d: Any, *, source: str, version: int = 2) -> ReleasePolicy:
        keys = {"host_data", "measurement", "min_tcb", "allow_emulated", "allow_debug"} | (
            {"any_uvm"} if version >= 2 else set())
        if not isinstance(d, dict) or set(d) != keys:
            raise StateError(f"{source}: release_policy must have exactly the keys {sorted(keys)}")
        any_uvm = d.get("any_uvm", False)
        if d["allow_debug"] is not False or not isinstance(d["allow_emulated"], bool) or not isinstance(any_uvm, bool):
            raise StateError(f"{source}: invalid release_policy flags")
        if not isinstance(d["host_data"], list) or not isinstance(d["measurement"], list):
            raise StateError(f"{source}: host_data and measurement must be lists")
        try:
            return cls(tuple(d["host_data"]), tuple(d["measurement"]), d["min_tcb"], d["allow_emulated"], any_uvm)
        except InputError as e:
            raise StateError(f"{source}: {e}") from None


@dataclass(frozen=True)
class SecretRecord:
    name: str
    value: bytes = field(repr=False)
    policy: ReleasePolicy
    created: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.value).hexdigest()

    def to_bytes(self) -> bytes:
        doc = {"format": SECRET_FORMAT, "name": self.name, "created": self.created,
               "release_policy": self.policy.to_dict(), "size": len(self.value), "sha256": self.sha256,
               "value": base64.b64encode(self.value).decode()}
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes, *, source: str) -> SecretRecord:
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise StateError(f"{source}: not JSON ({e})") from None
        keys = {"format", "name", "created", "release_policy", "size", "sha256", "value"}
        fmt = doc.get("format") if isinstance(doc, dict) else None
        version = READABLE_FORMATS.get(fmt) if isinstance(fmt, str) else None    # a list here is unhashable
        if version is None or set(doc) != keys:
            raise StateError(f"{source}: not a {SECRET_FORMAT} document")
        try:
            value = base64.b64decode(doc["value"], validate=True)
        except (binascii.Error, ValueError, TypeError) as e:
            raise StateError(f"{source}: value is not base64 ({e})") from None
        record = cls(str(doc["name"]), value,
                     ReleasePolicy.from_dict(doc["release_policy"], source=source, version=version),
                     str(doc["created"]))
        if record.sha256 != doc["sha256"] or len(value) != doc["size"]:
            raise StateError(f"{source}: the value does not match its recorded size and SHA-256")
        return record


def new_secret(name: str, value: bytes, policy: ReleasePolicy) -> SecretRecord:
    check_secret_name(name)
    if not value:
        raise InputError(f"secret {name!r} is empty")
    if len(value) > MAX_SECRET_SIZE:
        raise InputError(f"secret {name!r} is {len(value)} bytes; the limit is {MAX_SECRET_SIZE}",
                         hint="store a key here and keep bulk data encrypted under it elsewhere")
    created = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return SecretRecord(name, value, policy, created)


class KbsStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.secrets_dir = self.root / "secrets"
        self.audit_path = self.root / "audit.log"
        self.key_path = self.root / "broker-key.pem"
        self._lock_path = self.root / ".lock"

    @classmethod
    def open(cls, root: Path | None = None, *, create: bool = True) -> KbsStore:
        store = cls(root or default_store())
        store._check_dir(create)
        return store

    def _check_dir(self, create: bool) -> None:
        if not self.root.exists():
            if not create:
                raise NotFoundError(f"no key broker store at {self.root}",
                                    hint="create one with 'parma-sandbox secret put' or 'kbs serve'")
            self.root.mkdir(parents=True, mode=0o700)
            os.chmod(self.root, 0o700)
        if not self.root.is_dir():
            raise InputError(f"key broker store {self.root} is not a directory")
        mode = stat.S_IMODE(self.root.stat().st_mode)
        if mode & 0o077:
            raise InputError(f"key broker store {self.root} is accessible by other users (mode {mode:04o})",
                             hint=f"chmod 700 {self.root}")
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)

    # -- the broker's identity -------------------------------------------------------------------

    def broker_key(self) -> ec.EllipticCurvePrivateKey:
        """The broker's signing key, created (0600, atomically) on first use."""
        if not self.key_path.exists():
            with file_lock(self._lock_path):
                if not self.key_path.exists():
                    new_key = ec.generate_private_key(ec.SECP384R1())
                    pem = new_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
                    atomic_write(self.key_path, pem, mode=0o600)
        try:
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise StateError(f"cannot load the broker key {self.key_path}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
            raise StateError(f"{self.key_path} is not a P-384 key")
        return key

    def broker_public_der(self) -> bytes:
        return self.broker_key().public_key().public_bytes(serialization.Encoding.DER,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    def broker_pin(self) -> str:
        return key_pin(self.broker_public_der())

    # -- secrets -----------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.secrets_dir / f"{check_secret_name(name)}.json"

    def put(self, record: SecretRecord, *, replace: bool = False) -> None:
        path = self._path(record.name)
        with file_lock(self._lock_path):
            if path.exists() and not replace:
                raise InputError(f"a secret named {record.name!r} already exists",
                                 hint="pass --replace to overwrite it, or 'secret rm' it first")
            atomic_write(path, record.to_bytes(), mode=0o600)

    def get(self, name: str) -> SecretRecord | None:
        path = self._path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from None
        record = SecretRecord.from_bytes(raw, source=str(path))
        if record.name != name:
            raise StateError(f"{path} holds secret {record.name!r}, not {name!r}")
        return record

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.secrets_dir.glob("*.json") if not p.name.startswith("."))

    def list(self) -> list[SecretRecord]:
        return [r for n in self.names() if (r := self.get(n)) is not None]

    def remove(self, name: str) -> None:
        path = self._path(name)
        with file_lock(self._lock_path):
            try:
                path.unlink()
            except FileNotFoundError:
                raise NotFoundError(f"no secret named {name!r} in {self.root}",
                                    hint="'parma-sandbox secret list' shows the stored secrets") from None
