"""`policy diff`: what changed between two policies, by container and field.

Containers are paired by name (by position when unnamed). List fields that are sets in the
framework's eyes (env rules, mounts, exec processes, capabilities) are reported as items added and
removed; ordered ones (layers, command) as before -> after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sandbox.shared.policy.model import Policy

# Fields compared item by item (added/removed); everything else is compared as a whole value.
_SET_FIELDS = ("env_rules", "mounts", "exec_processes", "signals")


@dataclass(frozen=True)
class Change:
    where: str        # "policy", "container 'web'", "volume 'www'", "external_processes[0]"
    field: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.detail}"


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def _compare(where: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if key in _SET_FIELDS and isinstance(va, list) and isinstance(vb, list):
            removed = [x for x in va if x not in vb]
            added = [x for x in vb if x not in va]
            parts = [f"+ {_show(x)}" for x in added] + [f"- {_show(x)}" for x in removed]
            out.append(Change(where, key, "; ".join(parts) if parts else "same items, different order"))
        elif key == "capabilities" and isinstance(va, dict) and isinstance(vb, dict):
            for name in sorted(set(va) | set(vb)):
                sa, sb = va.get(name) or [], vb.get(name) or []
                if sa != sb:
                    added = [x for x in sb if x not in sa]
                    removed = [x for x in sa if x not in sb]
                    parts = [f"+ {x}" for x in added] + [f"- {x}" for x in removed]
                    out.append(Change(where, f"capabilities.{name}",
                                      "; ".join(parts) if parts else "same items, different order"))
        else:
            out.append(Change(where, key, f"{_show(va)} -> {_show(vb)}"))
    return out


def _keyed(items: list[dict[str, Any]], key: str, prefix: str) -> dict[str, dict[str, Any]]:
    out = {}
    for i, item in enumerate(items):
        name = item.get(key)
        out[f"{prefix} {name!r}" if name else f"{prefix}s[{i}]"] = item
    return out


def diff_policies(a: Policy, b: Policy) -> list[Change]:
    """Every semantic difference from `a` to `b` (empty when they mean the same)."""
    da, db = a.to_document(), b.to_document()
    top_a = {k: v for k, v in da.items() if k not in ("containers", "volumes", "external_processes")}
    top_b = {k: v for k, v in db.items() if k not in ("containers", "volumes", "external_processes")}
    changes = _compare("policy", top_a, top_b)
    for kind, key, items_a, items_b in (
        ("container", "name", da["containers"], db["containers"]),
        ("volume", "name", da.get("volumes", []), db.get("volumes", [])),
        ("external_process", None, da["external_processes"], db["external_processes"]),
    ):
        ka = _keyed(items_a, key, kind) if key else {f"{kind}es[{i}]": x for i, x in enumerate(items_a)}
        kb = _keyed(items_b, key, kind) if key else {f"{kind}es[{i}]": x for i, x in enumerate(items_b)}
        for where in sorted(ka.keys() - kb.keys()):
            changes.append(Change(where, "(whole)", "removed"))
        for where in sorted(kb.keys() - ka.keys()):
            changes.append(Change(where, "(whole)", "added"))
        for where in [w for w in ka if w in kb]:
            changes += _compare(where, ka[where], kb[where])
    return changes
