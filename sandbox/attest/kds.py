"""AMD Key Distribution Service client: VCEKs and CA chains, with an on-disk cache.

URLs (AMD 57230 "VCEK Certificate and KDS Interface Specification"; snp.md §2.3):
  {base}/vcek/v1/{Milan|Genoa}/{hwid 128 hex}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..
  {base}/vcek/v1/Turin/{hwid 16 hex}?fmcSPL=..&blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..
  {base}/vcek/v1/{P}/cert_chain  (PEM: ASK, ARK)    {base}/vlek/v1/{P}/cert_chain  (PEM: ASVK, ARK)
VLEKs themselves need cloud-provider credentials at KDS; they reach verifiers inside the evidence.

Cache and offline bundles share one layout, so a cache directory can be copied to an offline host:
  <dir>/<Product>/vcek_cert_chain.pem, <dir>/<Product>/vlek_cert_chain.pem,
  <dir>/<Product>/vcek/<hwid>/<bl>-<tee>-<snp>-<ucode>[-<fmc>].der
KDS throttles repeated requests: 429 and 5xx are retried with exponential backoff (honouring
Retry-After), and everything fetched is cached by content key, so a VCEK is fetched once per TCB.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests
from cryptography import x509

from sandbox.attest.amd_certs import load_certificates, role_of, to_der, to_pem
from sandbox.attest.roots import CertRole, pin_of
from sandbox.fsutil import atomic_write
from sandbox.log import log
from sandbox.paths import cache_dir
from sandbox.shared.errors import InputError, NetworkError, NotFoundError
from sandbox.shared.snp.product import Product, layout_of
from sandbox.shared.snp.tcb import TcbVersion

DEFAULT_BASE_URL = "https://kdsintf.amd.com"
BASE_URL_ENV = "PARMA_SANDBOX_KDS_URL"


def hwid_of(product: Product, chip_id: bytes) -> str:
    if not any(chip_id):
        raise InputError("CHIP_ID is masked (all zero): KDS cannot look up this chip's VCEK",
                         hint="get the VCEK from the host's certificate table instead")
    return (chip_id[:8] if product == Product.TURIN else chip_id).hex()


def _tcb_query(product: Product, tcb: TcbVersion) -> list[tuple[str, int]]:
    spls = tcb.relayout(layout_of(product)).spls()
    order = ("fmc", "bl", "tee", "snp", "ucode") if product == Product.TURIN else ("bl", "tee", "snp", "ucode")
    return [(f"{name}SPL", spls[name]) for name in order]


@dataclass
class KdsClient:
    base_url: str | None = None
    cache: Path | None = None  # default <cache>/kds
    offline_dir: Path | None = None  # offline mode: read this bundle only, never the network
    retries: int = 4
    backoff: float = 1.0
    timeout: float = 30.0
    sleep: Callable[[float], None] = time.sleep
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.base_url = (self.base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        if self.cache is None:
            self.cache = cache_dir() / "kds"

    # URLs --------------------------------------------------------------------------------------
    def vcek_url(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> str:
        query = "&".join(f"{k}={v}" for k, v in _tcb_query(product, tcb))
        return f"{self.base_url}/vcek/v1/{product.value}/{hwid_of(product, chip_id)}?{query}"

    def cert_chain_url(self, product: Product, signer: CertRole = CertRole.VCEK) -> str:
        kind = "vlek" if signer == CertRole.VLEK else "vcek"
        return f"{self.base_url}/{kind}/v1/{product.value}/cert_chain"

    # Paths inside a cache or bundle ------------------------------------------------------------
    @staticmethod
    def _vcek_rel(product: Product, chip_id: bytes, tcb: TcbVersion) -> Path:
        key = "-".join(str(v) for _, v in _tcb_query(product, tcb))
        return Path(product.value) / "vcek" / hwid_of(product, chip_id) / f"{key}.der"

    @staticmethod
    def _chain_rel(product: Product, signer: CertRole) -> Path:
        return Path(product.value) / f"{'vlek' if signer == CertRole.VLEK else 'vcek'}_cert_chain.pem"

    def _stores(self) -> list[Path]:
        return [self.offline_dir] if self.offline_dir else [self.cache]  # type: ignore[list-item]

    def _read_stored(self, rel: Path) -> bytes | None:
        for store in self._stores():
            path = store / rel
            if path.is_file():
                return path.read_bytes()
        return None

    # Network -----------------------------------------------------------------------------------
    def _get(self, url: str, what: str) -> bytes:
        if self.offline_dir is not None:
            raise NotFoundError(f"{what} is not in the offline bundle {self.offline_dir}",
                                hint="add it to the bundle (layout: see docs/attestation.md) or drop --offline")
        last = ""
        for attempt in range(self.retries + 1):
            try:
                response = self.session.get(url, timeout=self.timeout)
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {e}"
                status = None
            else:
                status = response.status_code
                if status == 200:
                    return response.content
                if status == 404:
                    raise NotFoundError(f"AMD KDS has no {what} ({url} -> 404)",
                                        hint="check the product and that the TCB values are ones AMD released")
                last = f"HTTP {status}"
                if status != 429 and status < 500:
                    raise NetworkError(f"AMD KDS refused the request for {what}: HTTP {status} ({url})")
            if attempt == self.retries:
                break
            delay = self.backoff * 2**attempt
            if status == 429 and (after := response.headers.get("Retry-After", "")).isdigit():
                delay = max(delay, min(float(after), 60.0))
            log.info("KDS %s for %s; retrying in %.1fs", last, what, delay)
            self.sleep(delay)
        raise NetworkError(f"AMD KDS did not deliver the {what} after {self.retries + 1} attempts ({last})",
                           hint=f"KDS throttles repeated requests; retry later, or point {BASE_URL_ENV} "
                                "at a mirror")

    # Public operations -------------------------------------------------------------------------
    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion, *, fetch: bool = True) -> x509.Certificate | None:
        """The VCEK for a chip at a TCB: from the cache/bundle, else (when `fetch`) from KDS."""
        rel = self._vcek_rel(product, chip_id, tcb)
        data = self._read_stored(rel)
        if data is None:
            if not fetch:
                return None
            data = self._get(self.vcek_url(product, chip_id, tcb), f"VCEK for {product.value} chip "
                             f"{hwid_of(product, chip_id)[:16]}... at {tcb}")
            certs = load_certificates(data, source=f"KDS VCEK ({product.value})")
            if len(certs) != 1 or role_of(certs[0]) != CertRole.VCEK:
                raise NetworkError("AMD KDS answered the VCEK request with something that is not a VCEK")
            atomic_write(self.cache / rel, to_der(certs[0]))  # type: ignore[operator]
            return certs[0]
        return load_certificates(data, source=str(rel))[0]

    def cert_chain(self, product: Product, signer: CertRole = CertRole.VCEK, *,
                   fetch: bool = True) -> list[x509.Certificate] | None:
        """[ASK or ASVK, ARK] for a product."""
        rel = self._chain_rel(product, signer)
        data = self._read_stored(rel)
        if data is None:
            if not fetch:
                return None
            data = self._get(self.cert_chain_url(product, signer), f"{product.value} {signer.value} CA chain")
            certs = load_certificates(data, source=f"KDS cert_chain ({product.value})")
            want = {CertRole.ARK, CertRole.ASVK if signer == CertRole.VLEK else CertRole.ASK}
            pins = {pin_of(to_der(c)) for c in certs}
            if {(p.product, p.role) for p in pins if p} != {(product, role) for role in want} or len(certs) != 2:
                raise NetworkError(f"the cert_chain served for {product.value} is not AMD's pinned "
                                   f"{' and '.join(sorted(want))}; refusing it",
                                   hint=f"check {BASE_URL_ENV} / the KDS mirror")
            atomic_write(self.cache / rel, b"".join(to_pem(c) for c in certs))  # type: ignore[operator]
            return certs
        return load_certificates(data, source=str(rel))
