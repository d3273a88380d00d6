"""An OCI Distribution v2 client: manifests and blobs, with token and basic authentication.

Source: the OCI distribution-spec (spec.md: "Pulling manifests", "Pulling blobs") and the Docker registry
token authentication flow (a 401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`, then a token
from the realm). Credentials come from the Docker client's config.json (`auths.<registry>.auth`).
Plain http is used only for localhost, 127.0.0.1, ::1 and registries listed in
$PARMA_SANDBOX_INSECURE_REGISTRIES (comma-separated host[:port]).
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests

from sandbox.images.manifest import ACCEPT
from sandbox.images.reference import DOCKER_HUB
from sandbox.log import log
from sandbox.shared.errors import NetworkError, NotFoundError

INSECURE_ENV = "PARMA_SANDBOX_INSECURE_REGISTRIES"
MAX_MANIFEST = 4 << 20
RETRY_STATUS = frozenset((408, 429, 500, 502, 503, 504))
RETRIES = 4
BACKOFF = 0.5                       # seconds before the first retry; doubles each time
_CHUNK = 1 << 20
_LOCAL_HOSTS = frozenset(("localhost", "127.0.0.1", "::1", "[::1]"))
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")


class TransferInterrupted(NetworkError):
    """A download that started and then broke off: worth retrying."""


def _host_only(host_port: str) -> str:
    if host_port.startswith("["):
        return host_port.split("]")[0] + "]"
    return host_port.rsplit(":", 1)[0] if host_port.count(":") == 1 else host_port


def insecure_allowed(host_port: str) -> bool:
    """Whether plain http may be used for this registry."""
    if _host_only(host_port) in _LOCAL_HOSTS:
        return True
    listed = {h.strip() for h in os.environ.get(INSECURE_ENV, "").split(",") if h.strip()}
    return host_port in listed or _host_only(host_port) in listed


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def load_credentials(domain: str, path: Path | None = None) -> Credentials | None:
    """Basic-auth credentials for `domain` from the Docker client config, if any."""
    path = path or docker_config_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    keys = _DOCKER_HUB_KEYS if domain == DOCKER_HUB else (domain, f"https://{domain}", f"http://{domain}")
    for key in auths:
        norm = key.rstrip("/")
        if key in keys or norm in keys or urlparse(norm if "://" in norm else f"//{norm}").netloc in keys:
            entry = auths[key]
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("auth"), str) and entry["auth"]:
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError:
                    log.warning("ignoring the malformed auth entry for %s in %s", key, path)
                    continue
                return Credentials(user, password)
            if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
                return Credentials(entry["username"], entry["password"])
    helpers = doc.get("credHelpers") or {}
    if doc.get("credsStore") or (isinstance(helpers, dict) and domain in helpers):
        log.warning("%s uses a Docker credential helper for %s; parma-sandbox reads only 'auths' entries",
                    path, domain)
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in _CHALLENGE_PARAM.findall(rest)}


class RegistryClient:
    """One registry; keeps a session, the chosen scheme and tokens per scope."""

    def __init__(self, domain: str, api_host: str, *, credentials: Credentials | None = None,
                 timeout: float = 30.0, retries: int | None = None, backoff: float | None = None) -> None:
        self.domain = domain
        self.host = api_host
        self.credentials = credentials if credentials is not None else load_credentials(domain)
        self.timeout = timeout
        self.retries = RETRIES if retries is None else retries
        self.backoff = BACKOFF if backoff is None else backoff
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "parma-sandbox"
        self.insecure = insecure_allowed(api_host)
        self.scheme = "https"
        self._scheme_checked = not self.insecure
        self._auth: dict[str, str] = {}          # scope -> Authorization header value

    # --- transport -----------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{path}"

    def _send(self, method: str, path: str, scope: str, headers: dict[str, str], stream: bool) -> requests.Response:
        h = dict(headers)
        if scope in self._auth:
            h["Authorization"] = self._auth[scope]
        if not self._scheme_checked:
            try:
                resp = self.session.request(method, self._url(path), headers=h, timeout=self.timeout, stream=stream)
                self._scheme_checked = True
                return resp
            except (requests.exceptions.SSLError, requests.exceptions.ConnectionError):
                log.debug("%s does not speak https; using http (allowed for this host)", self.host)
                self.scheme = "http"
                self._scheme_checked = True
        return self.session.request(method, self._url(path), headers=h, timeout=self.timeout, stream=stream)

    def request(self, method: str, path: str, scope: str, *, headers: dict[str, str] | None = None,
                stream: bool = False) -> requests.Response:
        """Send with retries (connection errors, 408/429/5xx, with backoff) and one authentication round."""
        authed = False
        attempt = 0
        while True:
            try:
                resp = self._send(method, path, scope, headers or {}, stream)
            except requests.exceptions.RequestException as e:
                if attempt < self.retries:
                    self._sleep(attempt, None)
                    attempt += 1
                    continue
                raise NetworkError(f"registry {self.domain} is unreachable ({type(e).__name__}: {e})",
                                   hint="check the registry address and your network, then retry") from None
            if resp.status_code == 401 and not authed and "WWW-Authenticate" in resp.headers:
                resp.close()
                self._authenticate(resp.headers["WWW-Authenticate"], scope)
                authed = True
                continue
            if resp.status_code in RETRY_STATUS and attempt < self.retries:
                retry_after = resp.headers.get("Retry-After")
                resp.close()
                self._sleep(attempt, retry_after)
                attempt += 1
                continue
            return resp

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2 ** attempt)
        if retry_after and retry_after.isdigit():
            delay = min(max(delay, float(retry_after)), 60.0)
        log.debug("retrying %s in %.1f s", self.host, delay)
        time.sleep(delay)

    def _authenticate(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise self._denied("requires a login")
            basic = base64.b64encode(f"{self.credentials.username}:{self.credentials.password}".encode()).decode()
            self._auth[scope] = f"Basic {basic}"
            return
        if scheme != "bearer" or "realm" not in params:
            raise NetworkError(f"registry {self.domain} asks for unsupported authentication {challenge!r}")
        realm = urlparse(params["realm"])
        if realm.scheme != "https" and not (realm.scheme == "http" and insecure_allowed(realm.netloc)):
            raise NetworkError(f"registry {self.domain} sends us to a token service over {realm.scheme}: "
                               f"{params['realm']}", hint="refusing to send credentials without TLS")
        query = {"service": params.get("service", self.domain), "scope": params.get("scope", scope)}
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        try:
            resp = self.session.get(params["realm"], params=query, auth=auth, timeout=self.timeout)
        except requests.exceptions.RequestException as e:
            raise NetworkError(f"token service {params['realm']} is unreachable ({type(e).__name__})") from None
        if resp.status_code in (401, 403):
            raise self._denied("refused our credentials" if auth else "requires a login")
        if resp.status_code != 200:
            raise NetworkError(f"token service {params['realm']} answered HTTP {resp.status_code}")
        try:
            doc = resp.json()
            token = doc.get("token") or doc.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise NetworkError(f"token service {params['realm']} returned no token")
        self._auth[scope] = f"Bearer {token}"

    def _denied(self, why: str) -> NetworkError:
        return NetworkError(f"registry {self.domain} {why}",
                            hint=f"log in with 'docker login {self.domain}' (parma-sandbox reads "
                                 f"{docker_config_path()}), or check the image name")

    def _check(self, resp: requests.Response, what: str) -> None:
        if resp.status_code == 200:
            return
        body = resp.text[:300]
        resp.close()
        if resp.status_code == 404:
            raise NotFoundError(f"{what} not found in registry {self.domain}",
                                hint="check the repository name and tag")
        if resp.status_code in (401, 403):
            raise self._denied(f"denied access to {what}")
        raise NetworkError(f"registry {self.domain} answered HTTP {resp.status_code} for {what}",
                           hint=body.strip() or None)

    # --- API ------------------------------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        """(raw bytes, content type) of a manifest or index."""
        what = f"manifest {repository}:{reference}" if ":" not in reference else f"manifest {repository}@{reference}"
        resp = self.request("GET", f"/v2/{repository}/manifests/{reference}", f"repository:{repository}:pull",
                            headers={"Accept": ACCEPT})
        self._check(resp, what)
        raw = resp.content
        if len(raw) > MAX_MANIFEST:
            raise NetworkError(f"{what} is larger than {MAX_MANIFEST} bytes")
        return raw, resp.headers.get("Content-Type", "")

    def blob_chunks(self, repository: str, digest: str) -> Iterator[bytes]:
        """Stream a blob (redirects to storage are followed; requests drops our Authorization on a new host)."""
        resp = self.request("GET", f"/v2/{repository}/blobs/{digest}", f"repository:{repository}:pull", stream=True)
        self._check(resp, f"blob {digest} of {repository}")
        try:
            yield from resp.iter_content(_CHUNK)
        except requests.exceptions.RequestException as e:
            raise TransferInterrupted(f"download of {digest} from {self.domain} broke off ({type(e).__name__})",
                                      hint="retry; completed blobs are kept") from None
        finally:
            resp.close()
