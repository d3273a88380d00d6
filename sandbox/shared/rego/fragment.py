"""Policy fragments: the Rego module inside a signed envelope, and whether a policy accepts it.

A fragment module (confcom's customer_rego_fragment template) is `package <namespace>` with `svn`,
`framework_version` (or `framework_svn`), and any of `fragments`, `containers`,
`external_processes`. `check_load` decides a load as ACI's framework decides `load_fragment` (both
of its calls), given the verified issuer, feed and header SVN of the envelope
(sandbox/guest/fragments.py verifies those): some import of the policy (or of an already loaded
fragment) names the issuer and the feed, the SVN is at least its minimum_svn, and the header SVN (if
any) equals the module's. Each refusal has its own reason; the caller keeps its policy as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sandbox.shared.errors import InputError, PolicyDenied
from sandbox.shared.rego import framework as fw
from sandbox.shared.rego.data import DataReader
from sandbox.shared.rego.syntax import Module, parse_modules

if TYPE_CHECKING:
    from sandbox.shared.jsonstrict import JsonObject

HINT = "see docs/aci.md ('Fragments')"


class FragmentRefused(PolicyDenied):
    """A fragment that the policy does not accept, with the reason."""


@dataclass(frozen=True)
class RegoFragment:
    namespace: str
    svn: str | int | None
    framework_version: str
    containers: tuple[JsonObject, ...]
    fragments: tuple[JsonObject, ...]
    external_processes: tuple[JsonObject, ...]
    warnings: tuple[str, ...] = ()

    def contributions(self, includes: Sequence[str]) -> dict[str, tuple[JsonObject, ...]]:
        """What the fragment adds for an import's `includes` (framework extract_fragment_includes)."""
        return {name: getattr(self, name) for name in ("containers", "fragments", "external_processes")
                if name in includes}


def read_fragment(module: Module, source: str = "fragment.rego") -> RegoFragment:
    ns = module.package
    if not fw.NAMESPACE.fullmatch(ns) or ns in fw.RESERVED_NAMESPACES:
        raise InputError(f"{source}:{module.line}: package {ns!r} cannot be a fragment's namespace",
                         hint="a fragment is 'package <name>' with a name other than framework, api, policy, metadata")
    stmts = {s.name: s for s in module.statements if s.kind == "assign"}
    if any(s.kind == "default" for s in module.statements):
        raise InputError(f"{source}: a fragment with rule logic ('default') cannot be imported", hint=HINT)
    version_stmt = stmts.get("framework_version") or stmts.get("framework_svn")
    version = fw.parse_semver(version_stmt.value) if version_stmt else None
    if version_stmt is None or version is None:
        raise InputError(f"{source}: the fragment has no framework_version (\"0.2.3\" as confcom writes it)",
                         hint="without one, ACI's framework reads none of its containers")
    svn = stmts["svn"].value if "svn" in stmts else None
    if svn is not None and not isinstance(svn, str | int) or isinstance(svn, bool):
        raise InputError(f"{source}: svn must be a number or a string, got {svn!r}")
    reader = DataReader(source)
    v = min(version, fw.FRAMEWORK_VERSION)
    newer = version > fw.FRAMEWORK_VERSION
    out: dict[str, list[JsonObject]] = {"containers": [], "fragments": [], "external_processes": []}
    readers: dict[str, Callable[[Any, str], JsonObject | None]] = {
        "containers": lambda r, p: reader.container(r, p, v, as_written=version == fw.FRAMEWORK_VERSION),
        "fragments": reader.fragment_import,
        "external_processes": reader.external_process}
    for name, read in readers.items():
        if name in stmts:
            raw = reader.objects(stmts[name].value, name) or []
            out[name] = [x for i, r in enumerate(raw) if (x := read(r, f"{name}[{i}]")) is not None and not newer]
    reader.raise_if_problems(HINT)
    return RegoFragment(ns, svn, version_stmt.value, tuple(out["containers"]), tuple(out["fragments"]),
                        tuple(out["external_processes"]), tuple(reader.warnings))


def read_fragment_text(text: str, source: str = "fragment.rego") -> RegoFragment:
    modules = parse_modules(text, source)
    if len(modules) != 1:
        raise InputError(f"{source}: a fragment is one module, this has {len(modules)}")
    return read_fragment(modules[0], source)


def _number(svn: Any) -> int | None:
    """OPA's to_number for an SVN: an integer, or a string holding one."""
    if isinstance(svn, int) and not isinstance(svn, bool):
        return svn
    if isinstance(svn, str):
        try:
            return int(svn.strip(), 10)
        except ValueError:
            return None
    return None


def svn_ok(svn: Any, minimum: Any) -> bool:
    """framework.rego svn_ok: numbers compared as numbers, or (deprecated) both semantic versions."""
    a, b = fw.parse_semver(svn), fw.parse_semver(minimum)
    if a is not None and b is not None:
        return a >= b
    x, y = _number(svn), _number(minimum)
    return x is not None and y is not None and x >= y


@dataclass(frozen=True)
class AcceptedFragment:
    """A loaded fragment: the import it satisfied and what it contributes."""

    issuer: str
    feed: str
    fragment: RegoFragment
    import_: JsonObject

    def contributions(self) -> dict[str, tuple[JsonObject, ...]]:
        return self.fragment.contributions(self.import_["includes"])


def check_load(imports: Sequence[JsonObject], *, issuer: str, feed: str, header_svn: int | None,
               fragment: RegoFragment) -> AcceptedFragment:
    """The import that accepts this fragment, or FragmentRefused saying why none does.

    `imports` are the candidate fragment imports: the policy's, then those of fragments already loaded
    that included "fragments"."""
    by_issuer = [f for f in imports if f["issuer"] == issuer]
    if not by_issuer:
        named = sorted({f["issuer"] for f in imports}) or ["none"]
        raise FragmentRefused(f"issuer {issuer} is not one the policy accepts fragments from "
                              f"(it names: {', '.join(named)})", hint=HINT)
    candidates = [f for f in by_issuer if f["feed"] == feed]
    if not candidates:
        feeds = ", ".join(sorted({f["feed"] for f in by_issuer}))
        raise FragmentRefused(f"feed {feed!r} is not one the policy accepts from {issuer} (it names: {feeds})",
                              hint=HINT)
    reasons = []
    for imp in candidates:
        minimum = imp["minimum_svn"]
        if header_svn is not None and not svn_ok(header_svn, minimum):
            reasons.append(f"the envelope's SVN {header_svn} is below the minimum_svn {minimum}")
        elif fragment.svn is not None and header_svn is not None and _number(fragment.svn) != header_svn:
            reasons.append(f"the fragment's svn {fragment.svn!r} differs from the envelope's SVN {header_svn}")
        elif fragment.svn is None and header_svn is None:
            reasons.append("neither the fragment nor its envelope declares an SVN")
        elif not svn_ok(fragment.svn if fragment.svn is not None else header_svn, minimum):
            reasons.append(f"its SVN {fragment.svn if fragment.svn is not None else header_svn} is below the "
                           f"minimum_svn {minimum}")
        else:
            return AcceptedFragment(issuer, feed, fragment, imp)
    raise FragmentRefused(f"fragment {fragment.namespace} from {issuer} ({feed}) is refused: {'; '.join(reasons)}",
                          hint=HINT)
