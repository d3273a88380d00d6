"""Which signed policy fragments `up` loads into the agent, and where it finds them (docs/aci.md).

A policy's fragment imports are permissions, not requirements: a fragment adds containers (and
external processes, further imports) to what the policy allows, and a run that loads none of them is
allowed strictly less. So `up` loads:

1. every fragment the user names (`--fragment`): a COSE_Sign1 file, or a registry reference (a
   standalone fragment pushed to that reference, or the fragments attached to the image there);
2. for each import of the policy no fragment is given for, what confcom puts in a registry: the
   standalone fragment at the import's feed, else fragments attached to the group's registry images
   whose issuer and feed match; a loaded fragment whose import includes `fragments` brings its own
   imports along;
3. except ACI's infrastructure fragment (feed `mcr.microsoft.com/aci/aci-cc-infra-fragment`, which
   every current confcom policy imports): it allows what ACI's own platform runs in the UVM, none of
   which runs here, so it is loaded only when named with `--fragment`.

The host checks each envelope's signature and issuer here only to report problems early and to match
imports; the agent verifies every envelope again and decides each load itself (load_fragment).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox.aci.fragment_oci import fetch_fragments
from sandbox.guest.fragments import verify_fragment
from sandbox.images.reference import Transport, parse_reference
from sandbox.log import log
from sandbox.shared.errors import CheckFailed, InputError, NetworkError, NotFoundError
from sandbox.shared.policy.model import Policy
from sandbox.shared.rego.fragment import read_fragment_text

INFRASTRUCTURE_FEED = "mcr.microsoft.com/aci/aci-cc-infra-fragment"
MAX_ROUNDS = 16     # nested imports: fragments that import fragments


@dataclass(frozen=True)
class FragmentSource:
    """A fragment envelope to load, with what the host read from it (the agent checks it again)."""

    origin: str          # the file, or the registry reference it came from
    envelope: bytes
    issuer: str
    feed: str
    namespace: str
    imports: tuple[dict, ...]   # the fragment's own imports (count only if its import includes "fragments")


@dataclass(frozen=True)
class FragmentPlan:
    load: tuple[FragmentSource, ...]
    notes: tuple[str, ...]      # imports no fragment is loaded for, and why


def _read(origin: str, envelope: bytes) -> FragmentSource:
    try:
        verified = verify_fragment(envelope)
        fragment = read_fragment_text(verified.payload.decode("utf-8"), f"{origin} (payload)")
    except (InputError, CheckFailed) as e:
        raise CheckFailed(f"fragment {origin}: {e.message}") from None
    except UnicodeDecodeError:
        raise CheckFailed(f"fragment {origin}: its payload is not UTF-8 Rego text") from None
    return FragmentSource(origin, envelope, verified.issuer, verified.feed, fragment.namespace, fragment.fragments)


def _from_registry(reference: str) -> list[FragmentSource]:
    return [_read(f"{reference} ({found.manifest_digest[:19]})", found.envelope) for found in fetch_fragments(reference)]


def _given(source: str, base_dir: Path) -> list[FragmentSource]:
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_file():
        try:
            return [_read(str(path), path.read_bytes())]
        except OSError as e:
            raise InputError(f"--fragment {source}: {e.strerror}") from None
    if source.startswith(("/", ".", "~")) or parse_reference(source).transport != Transport.registry:
        raise InputError(f"--fragment {source}: no such file", hint="give a .cose file or a registry reference")
    found = _from_registry(source)
    if not found:
        raise CheckFailed(f"--fragment {source}: no policy fragment there (neither a standalone fragment nor one "
                          "attached to the image)")
    return found


def _at_feed(feed: str) -> list[FragmentSource]:
    """The standalone fragment confcom's `fragment push` put at the feed, if the feed is a reference."""
    try:
        if parse_reference(feed).transport != Transport.registry:
            return []
    except InputError:
        return []
    try:
        return _from_registry(feed)
    except (NotFoundError, NetworkError, CheckFailed) as e:
        log.info("no standalone fragment at %s: %s", feed, e)
        return []


def _attached(images: Sequence[str]) -> list[FragmentSource]:
    out: list[FragmentSource] = []
    for image in images:
        try:
            out += _from_registry(image)
        except (NotFoundError, NetworkError, CheckFailed) as e:
            log.info("no fragments attached to %s: %s", image, e)
    return out


def plan_fragments(policy: Policy, given: Sequence[str], registry_images: Sequence[str], *, base_dir: Path,
                   fetch: bool = True) -> FragmentPlan:
    """The fragments to load, in order, and a note for each import of the policy left without one."""
    load: list[FragmentSource] = [f for source in given for f in _given(source, base_dir)]
    imports = [f.to_json() for f in policy.fragments]
    notes: list[str] = []
    attached: list[FragmentSource] | None = None
    done: set[tuple[str, str]] = set()
    for _ in range(MAX_ROUNDS):
        # Imports brought along by fragments loaded so far (when the import that takes them includes fragments).
        for f in list(load):
            for imp in imports:
                if (imp["issuer"], imp["feed"]) == (f.issuer, f.feed) and "fragments" in imp["includes"]:
                    imports += [i for i in f.imports if i not in imports]
        pending = [imp for imp in imports if (imp["issuer"], imp["feed"]) not in done
                   and not any((f.issuer, f.feed) == (imp["issuer"], imp["feed"]) for f in load)]
        if not pending:
            break
        added = False
        for imp in pending:
            key = (imp["issuer"], imp["feed"])
            done.add(key)
            if imp["feed"] == INFRASTRUCTURE_FEED:
                notes.append(f"ACI's infrastructure fragment ({INFRASTRUCTURE_FEED}) is not loaded: it allows what "
                             "ACI's platform runs in the UVM, none of which runs here (--fragment loads it)")
                continue
            if not fetch:
                notes.append(f"the fragment from {imp['issuer']} ({imp['feed']}) is not loaded (--drop-fragments)")
                continue
            found = [f for f in _at_feed(imp["feed"]) if (f.issuer, f.feed) == key]
            if not found:
                if attached is None:
                    attached = _attached(registry_images)
                found = [f for f in attached if (f.issuer, f.feed) == key]
            if found:
                load += found
                added = True
            else:
                notes.append(f"no fragment from {imp['issuer']} ({imp['feed']}) was found: what it would add is not "
                             "allowed (--fragment FILE|REFERENCE loads one)")
        if not added:
            break
    return FragmentPlan(tuple(load), tuple(notes))


__all__ = ["INFRASTRUCTURE_FEED", "FragmentPlan", "FragmentSource", "plan_fragments"]
