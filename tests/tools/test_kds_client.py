"""The KDS client against a real HTTP server on 127.0.0.1 serving the public vector certificates
(never the real AMD KDS): URLs per product, retry with backoff on 429/5xx, cache, offline bundles,
and `attest fetch` feeding `attest verify`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from clirun import run_cli
from snpvectors import get_set, report_bytes, snp_dir

from sandbox.attest.amd_certs import load_certificate_file, role_of, to_der
from sandbox.attest.kds import KdsClient
from sandbox.attest.roots import CertRole
from sandbox.shared.errors import InputError, NetworkError, NotFoundError
from sandbox.shared.snp.product import Product, TcbLayout
from sandbox.shared.snp.report import parse_report
from sandbox.shared.snp.tcb import TcbVersion


class FakeKds:
    """path?query -> a queue of (status, body, headers); the last entry repeats."""

    def __init__(self) -> None:
        self.routes: dict[str, list[tuple[int, bytes, dict[str, str]]]] = {}
        self.requests: list[str] = []

    def route(self, path: str, *responses: tuple[int, bytes, dict[str, str]]) -> None:
        self.routes[path] = list(responses)


@contextlib.contextmanager
def serve(fake: FakeKds) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server API
            fake.requests.append(self.path)
            queue = fake.routes.get(self.path, [(404, b"not found", {})])
            status, body, headers = queue.pop(0) if len(queue) > 1 else queue[0]
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


GO_HWID = ("3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e53786184ca39e359669a2b76a"
           "1936776b564ea464cdce40c05f63c9b610c5068b006b5d")
GO_VCEK_PATH = f"/vcek/v1/Milan/{GO_HWID}?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68"


def test_urls_per_product() -> None:
    client = KdsClient(base_url="https://kds.example")
    report = parse_report(report_bytes(get_set("go-sev-guest/milan-v2-vcek")), product=Product.MILAN)
    # The URL go-sev-guest's own test fetches for attestation.bin.
    assert client.vcek_url(Product.MILAN, report.chip_id, report.reported_tcb) == "https://kds.example" + GO_VCEK_PATH
    turin_tcb = TcbVersion.from_u64(0x5200000004010101, TcbLayout.TURIN)
    chip = bytes.fromhex("6bb1229b7692b710") + bytes(56)
    assert client.vcek_url(Product.TURIN, chip, turin_tcb) == (
        "https://kds.example/vcek/v1/Turin/6bb1229b7692b710?fmcSPL=1&blSPL=1&teeSPL=1&snpSPL=4&ucodeSPL=82")
    assert client.cert_chain_url(Product.GENOA) == "https://kds.example/vcek/v1/Genoa/cert_chain"
    assert client.cert_chain_url(Product.TURIN, CertRole.VLEK) == "https://kds.example/vlek/v1/Turin/cert_chain"
    with pytest.raises(InputError, match="masked"):
        client.vcek_url(Product.MILAN, bytes(64), report.reported_tcb)


def test_retry_backoff_cache_and_offline(tmp_path: Path) -> None:
    vcek_der = (snp_dir() / "go-sev-guest/vcek.testcer").read_bytes()
    chain_pem = (snp_dir() / "go-sev-guest/ask_ark_milan.pem").read_bytes()
    fake = FakeKds()
    fake.route(GO_VCEK_PATH, (429, b"slow down", {"Retry-After": "3"}), (503, b"", {}), (200, vcek_der, {}))
    fake.route("/vcek/v1/Milan/cert_chain", (200, chain_pem, {}))
    sleeps: list[float] = []
    report = parse_report(report_bytes(get_set("go-sev-guest/milan-v2-vcek")), product=Product.MILAN)
    with serve(fake) as url:
        client = KdsClient(base_url=url, cache=tmp_path / "cache", sleep=sleeps.append, backoff=0.5)
        vcek = client.vcek(Product.MILAN, report.chip_id, report.reported_tcb)
        assert to_der(vcek) == vcek_der and sleeps == [3.0, 1.0]  # Retry-After honoured, then 0.5 * 2
        chain = client.cert_chain(Product.MILAN)
        assert {role_of(c) for c in chain} == {CertRole.ASK, CertRole.ARK}
        count = len(fake.requests)
        client.vcek(Product.MILAN, report.chip_id, report.reported_tcb)
        client.cert_chain(Product.MILAN)
        assert len(fake.requests) == count  # served from the cache
        # A mirror serving a chain that is not AMD's pinned one is refused and not cached.
        fake.route("/vcek/v1/Genoa/cert_chain", (200, chain_pem, {}))
        with pytest.raises(NetworkError, match="not AMD's pinned"):
            client.cert_chain(Product.GENOA)
        assert not (tmp_path / "cache" / "Genoa").exists()
        fake.route("/vcek/v1/Turin/cert_chain", (500, b"", {}))
        with pytest.raises(NetworkError, match="after 5 attempts"):
            client.cert_chain(Product.TURIN)
        with pytest.raises(NotFoundError, match="404"):
            client.cert_chain(Product.GENOA, CertRole.VLEK)
    # Offline: the cache directory works as a bundle; nothing else is ever fetched.
    offline = KdsClient(base_url="http://127.0.0.1:9", offline_dir=tmp_path / "cache")
    assert to_der(offline.vcek(Product.MILAN, report.chip_id, report.reported_tcb)) == vcek_der
    with pytest.raises(NotFoundError, match="offline bundle"):
        offline.cert_chain(Product.TURIN)



def test_fetch_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARMA_SANDBOX_CACHE", str(tmp_path / "cache"))
    fake = FakeKds()
    fake.route(GO_VCEK_PATH, (200, (snp_dir() / "go-sev-guest/vcek.testcer").read_bytes(), {}))
    fake.route("/vcek/v1/Milan/cert_chain", (200, (snp_dir() / "go-sev-guest/ask_ark_milan.pem").read_bytes(), {}))
    report = str(snp_dir() / "go-sev-guest/attestation.bin")
    with serve(fake) as url:
        monkeypatch.setenv("PARMA_SANDBOX_KDS_URL", url)
        code, _, err = run_cli(["attest", "fetch", "vcek", report, "--out", str(tmp_path / "certs")], capsys)
        assert code == 2 and "--product" in err  # a v2 report does not say Milan or Genoa
        for what in ("vcek", "ca"):
            code, out, err = run_cli(["attest", "fetch", what, report, "--product", "Milan",
                                      "--out", str(tmp_path / "certs")], capsys)
            assert code == 0, err
        assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["ark.pem", "ask.pem", "vcek.pem"]
        args = ["attest", "verify", report, "--at", "2025-06-01", "--allow-debug"]
        assert run_cli([*args, "--certs", str(tmp_path / "certs")], capsys)[0] == 0
        fake.requests.clear()
        # No certificates given: the KDS cache filled by `fetch` supplies them, without the network.
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        assert fake.requests == []
    assert load_certificate_file(tmp_path / "certs" / "vcek.pem")[0].issuer.rfc4514_string().startswith("CN=SEV-Milan")
