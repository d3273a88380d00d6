"""The data objects of policy and fragment modules, checked and completed as ACI's framework does.

`containers`, `external_processes` and `fragments` written for an older framework version keep the
fields of that version; apply_defaults() gives the view the framework evaluates, with its defaults (framework.rego `check_container`, `check_external_process`, `check_fragment`):
no_new_privileges false before 0.2.0, any user with umask 0022 before 0.2.1, capabilities null
(the runtime's defaults) before 0.2.2, no seccomp profile before 0.2.3, and SIGKILL/SIGTERM added to
the init signals before 0.4.1. An object that lacks a field its version needs is dropped, as the
framework drops it (its comprehension yields nothing for it); each drop is reported as a warning.
`"command": null` is kept: the framework's command check never matches it.

Types are checked strictly (a wrong type is an error naming the JSON path), because the guest
must not guess at what a host-supplied policy means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sandbox.shared.errors import InputError
from sandbox.shared.rego import framework as fw

if TYPE_CHECKING:
    from collections.abc import Callable

    from sandbox.shared.jsonstrict import JsonObject

T = TypeVar("T")


class PolicyDataError(InputError):
    """Policy data of the wrong shape, with the JSON path of every problem."""


@dataclass
class DataReader:
    """Collects problems (errors) and warnings with JSON paths while reading module data."""

    source: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def raise_if_problems(self, hint: str) -> None:
        if self.problems:
            shown = "; ".join(self.problems[:8]) + (f" (and {len(self.problems) - 8} more)"
                                                    if len(self.problems) > 8 else "")
            raise PolicyDataError(f"{self.source}: {shown}", hint=hint)

    # -- typed values ------------------------------------------------------------------------------

    def string(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str):
            self.problem(path, f"expected a string, got {_show(value)}")
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.problem(path, f"expected true or false, got {_show(value)}")
            return None
        return value

    def strings(self, value: Any, path: str) -> list[str] | None:
        if not isinstance(value, list):
            self.problem(path, f"expected an array of strings, got {_show(value)}")
            return None
        bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
        for i in bad:
            self.problem(f"{path}[{i}]", f"expected a string, got {_show(value[i])}")
        return None if bad else list(value)

    def objects(self, value: Any, path: str) -> list[JsonObject] | None:
        if not isinstance(value, list):
            self.problem(path, f"expected an array of objects, got {_show(value)}")
            return None
        bad = [i for i, v in enumerate(value) if not isinstance(v, dict)]
        for i in bad:
            self.problem(f"{path}[{i}]", f"expected an object, got {_show(value[i])}")
        return None if bad else value

    def signals(self, value: Any, path: str) -> list[int] | None:
        if not isinstance(value, list):
            self.problem(path, f"expected an array of signal numbers, got {_show(value)}")
            return None
        bad = [i for i, v in enumerate(value) if isinstance(v, bool) or not isinstance(v, int)]
        for i in bad:
            self.problem(f"{path}[{i}]", f"expected a signal number, got {_show(value[i])}")
        return None if bad else list(value)

    # -- objects -----------------------------------------------------------------------------------

    def env_rule(self, raw: Any, path: str) -> dict[str, object] | None:
        if not isinstance(raw, dict):
            self.problem(path, f"expected an object, got {_show(raw)}")
            return None
        rule: dict[str, object]
        if "pattern" in raw or "strategy" in raw:
            rule = {"pattern": self.string(raw.get("pattern"), f"{path}.pattern"),
                    "strategy": self.strategy(raw.get("strategy"), f"{path}.strategy")}
            known = {"pattern", "strategy", "required"}
        else:   # framework 0.5.0's second form: name and value matched separately
            rule = {k: self.string(raw.get(k), f"{path}.{k}") for k in ("name", "value")}
            rule |= {k: self.strategy(raw.get(k), f"{path}.{k}") for k in ("name_strategy", "value_strategy")}
            known = {"name", "name_strategy", "value", "value_strategy", "required"}
        # `not rule.required` holds for a missing field: such a rule is optional.
        required = raw.get("required", False)
        rule["required"] = self.boolean(required, f"{path}.required")
        self._unknown(raw, known, path)
        return None if None in rule.values() else rule

    def strategy(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str) or value not in ("string", "re2"):
            self.problem(path, f"expected 'string' or 're2', got {_show(value)}")
            return None
        return value

    def mount(self, raw: Any, path: str) -> dict[str, object] | None:
        if not isinstance(raw, dict):
            self.problem(path, f"expected an object, got {_show(raw)}")
            return None
        out: dict[str, object] = {k: self.string(raw.get(k), f"{path}.{k}")
                                  for k in ("destination", "source", "type")}
        out["options"] = self.strings(raw.get("options"), f"{path}.options")
        self._unknown(raw, set(out), path)
        return None if None in out.values() else out

    def exec_process(self, raw: Any, path: str) -> dict[str, object] | None:
        if not isinstance(raw, dict):
            self.problem(path, f"expected an object, got {_show(raw)}")
            return None
        command = self.command(raw.get("command"), f"{path}.command")
        signals = self.signals(raw.get("signals", []), f"{path}.signals")
        self._unknown(raw, {"command", "signals"}, path)
        if command is _BAD or signals is None:
            return None
        return {"command": command, "signals": signals}

    def command(self, value: Any, path: str) -> Any:
        if value is None:
            return None    # never matches an argv (framework command_ok)
        out = self.strings(value, path)
        return _BAD if out is None else out

    def idname(self, raw: Any, path: str) -> dict[str, object] | None:
        if not isinstance(raw, dict):
            self.problem(path, f"expected an object, got {_show(raw)}")
            return None
        out: dict[str, object] = {"pattern": self.string(raw.get("pattern"), f"{path}.pattern")}
        strategy = raw.get("strategy")
        if strategy not in ("any", "id", "name", "re2"):
            self.problem(f"{path}.strategy", f"expected one of any, id, name, re2; got {_show(strategy)}")
            return None
        out["strategy"] = strategy
        return None if None in out.values() else out

    def user(self, raw: Any, path: str) -> dict[str, object] | None:
        if not isinstance(raw, dict):
            self.problem(path, f"expected an object, got {_show(raw)}")
            return None
        user = self.idname(raw.get("user_idname"), f"{path}.user_idname")
        objects = self.objects(raw.get("group_idnames"), f"{path}.group_idnames")
        groups = None if objects is None else [self.idname(g, f"{path}.group_idnames[{i}]")
                                               for i, g in enumerate(objects)]
        umask = self.string(raw.get("umask"), f"{path}.umask")
        if user is None or groups is None or None in groups or umask is None:
            return None
        return {"user_idname": user, "group_idnames": groups, "umask": umask}

    def capabilities(self, raw: Any, path: str) -> Any:
        if raw is None:
            return None    # the runtime's default sets, computed when a container is created
        if not isinstance(raw, dict):
            self.problem(path, f"expected an object or null, got {_show(raw)}")
            return _BAD
        sets = {k: self.strings(raw.get(k), f"{path}.{k}")
                for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
        self._unknown(raw, set(sets), path)
        return _BAD if None in sets.values() else sets

    def _unknown(self, raw: JsonObject, known: set[str], path: str) -> None:
        for key in sorted(set(raw) - known):
            self.warn(f"{path}.{key}", "unknown field, ignored (the framework does not read it)")

    def _items(self, raw: list[Any], path: str, read: Callable[[Any, str], T]) -> list[T]:
        out = [read(item, f"{path}[{i}]") for i, item in enumerate(raw)]
        return out

    # -- top-level collections ---------------------------------------------------------------------

    def container(self, raw: Any, path: str, version: fw.Version, *,
                  as_written: bool = False) -> JsonObject | None:
        """A container with the fields of its framework version, checked (apply_defaults() completes it);
        None, with a warning, when the framework drops it.

        `as_written`: the data's framework_version is the framework's own, so the framework evaluates the
        object as written (no check_container): one lacking fields still matches overlays by its layers;
        without `signals` or `exec_processes` it is read as having none; without any other field it is
        never created (kept with a null command, which matches no argv)."""
        if not isinstance(raw, dict):
            self.problem(path, f"expected an object, got {_show(raw)}")
            return None
        needed = list(fw.CONTAINER_BASE_FIELDS)
        needed += [k for k, since in fw.CONTAINER_VERSIONED_FIELDS.items() if version >= since]
        missing = [k for k in needed if k not in raw]
        if missing and as_written and "layers" not in missing:
            inert = [k for k in missing if k not in ("signals", "exec_processes")]
            if inert:
                self.warn(path, f"lacks {', '.join(missing)}: ACI's framework (which reads data of its own version "
                                "as written) matches its layers but never creates it")
            else:
                self.warn(path, f"lacks {', '.join(missing)}: ACI's framework reads them as empty")
            raw = {**_INERT_CONTAINER, **raw, **({"command": None} if inert else {})}
            missing = []
        if missing:
            self.warn(path, f"lacks {', '.join(missing)}, which framework {fw.version_text(version)} needs: "
                            "ACI ignores this container (its layers may still be mounted)")
            return None
        before = len(self.problems)
        out: JsonObject = {}
        for key in ("name", "id"):
            if key in raw:
                out[key] = self.string(raw[key], f"{path}.{key}")
        out["command"] = self.command(raw["command"], f"{path}.command")
        rules = self.objects(raw["env_rules"], f"{path}.env_rules")
        out["env_rules"] = None if rules is None else self._items(rules, f"{path}.env_rules", self.env_rule)
        out["layers"] = self.strings(raw["layers"], f"{path}.layers")
        mounts = self.objects(raw["mounts"], f"{path}.mounts")
        out["mounts"] = None if mounts is None else self._items(mounts, f"{path}.mounts", self.mount)
        out["allow_elevated"] = self.boolean(raw["allow_elevated"], f"{path}.allow_elevated")
        out["working_dir"] = self.string(raw["working_dir"], f"{path}.working_dir")
        execs = self.objects(raw["exec_processes"], f"{path}.exec_processes")
        out["exec_processes"] = None if execs is None else self._items(execs, f"{path}.exec_processes",
                                                                      self.exec_process)
        out["signals"] = self.signals(raw["signals"], f"{path}.signals")
        out["allow_stdio_access"] = self.boolean(raw["allow_stdio_access"], f"{path}.allow_stdio_access")
        if version >= (0, 2, 0):
            out["no_new_privileges"] = self.boolean(raw["no_new_privileges"], f"{path}.no_new_privileges")
        if version >= (0, 2, 1):
            out["user"] = self.user(raw["user"], f"{path}.user")
        if version >= (0, 2, 2):
            out["capabilities"] = self.capabilities(raw["capabilities"], f"{path}.capabilities")
        if version >= (0, 2, 3):
            out["seccomp_profile_sha256"] = self.string(raw["seccomp_profile_sha256"],
                                                        f"{path}.seccomp_profile_sha256")
        known = {"name", "id", *fw.CONTAINER_BASE_FIELDS, *fw.CONTAINER_VERSIONED_FIELDS}
        self._unknown(raw, known, path)
        for key, since in fw.CONTAINER_VERSIONED_FIELDS.items():
            if key in raw and version < since:
                self.warn(f"{path}.{key}", f"ignored: framework {fw.version_text(version)} predates it "
                                           f"({fw.version_text(since)}), so the framework's default applies")
        if len(self.problems) != before or _BAD in out.values():
            return None
        return out

    def external_process(self, raw: Any, path: str) -> JsonObject | None:
        if not isinstance(raw, dict):
            self.problem(path, f"expected an object, got {_show(raw)}")
            return None
        missing = [k for k in fw.EXTERNAL_PROCESS_FIELDS if k not in raw]
        if missing:
            self.warn(path, f"lacks {', '.join(missing)}: ACI ignores this external process")
            return None
        before = len(self.problems)
        rules = self.objects(raw["env_rules"], f"{path}.env_rules")
        out = {"command": self.command(raw["command"], f"{path}.command"),
               "env_rules": None if rules is None else self._items(rules, f"{path}.env_rules", self.env_rule),
               "working_dir": self.string(raw["working_dir"], f"{path}.working_dir"),
               "allow_stdio_access": self.boolean(raw["allow_stdio_access"], f"{path}.allow_stdio_access")}
        self._unknown(raw, set(fw.EXTERNAL_PROCESS_FIELDS), path)
        if len(self.problems) != before or _BAD in out.values():
            return None
        return out

    def fragment_import(self, raw: Any, path: str) -> JsonObject | None:
        """An entry of `fragments` (check_fragment)."""
        if not isinstance(raw, dict):
            self.problem(path, f"expected an object, got {_show(raw)}")
            return None
        missing = [k for k in fw.FRAGMENT_FIELDS if k not in raw]
        if missing:
            self.warn(path, f"lacks {', '.join(missing)}: ACI ignores this fragment import")
            return None
        before = len(self.problems)
        out: JsonObject = {"issuer": self.string(raw["issuer"], f"{path}.issuer"),
                               "feed": self.string(raw["feed"], f"{path}.feed")}
        svn = raw["minimum_svn"]
        if not (isinstance(svn, str) or (isinstance(svn, int) and not isinstance(svn, bool))):
            self.problem(f"{path}.minimum_svn", f"expected an SVN (a number or a string), got {_show(svn)}")
        out["minimum_svn"] = svn
        includes = self.strings(raw["includes"], f"{path}.includes")
        for i, inc in enumerate(includes or ()):
            if inc not in fw.FRAGMENT_INCLUDES:
                self.warn(f"{path}.includes[{i}]", f"{inc!r} is not something a fragment can contribute; ignored")
        out["includes"] = includes
        receipts = raw.get("required_receipts", [])
        out["required_receipts"] = self.strings(receipts, f"{path}.required_receipts")
        params = raw.get("parameters", {})
        if not isinstance(params, dict):
            self.problem(f"{path}.parameters", f"expected an object, got {_show(params)}")
        elif params:
            self.problem(f"{path}.parameters", "fragment parameters (framework 0.5.0) are not supported by "
                                               "parma-sandbox")
        self._unknown(raw, {*fw.FRAGMENT_FIELDS, "required_receipts", "parameters"}, path)
        if out["required_receipts"]:
            self.problem(f"{path}.required_receipts", "transparency receipts (framework 0.5.0) are not supported "
                                                      "by parma-sandbox")
        if len(self.problems) != before:
            return None
        return out


# What stands in for the fields a container of the framework's own version lacks (see container()).
_INERT_CONTAINER: JsonObject = {
    "command": None, "env_rules": [], "mounts": [], "allow_elevated": False, "working_dir": "/", "exec_processes": [],
    "signals": [], "allow_stdio_access": False, "no_new_privileges": False, "user": fw.ANY_USER, "capabilities": None,
    "seccomp_profile_sha256": ""}


class _Bad:
    def __repr__(self) -> str:
        return "<bad>"


_BAD: Any = _Bad()


def apply_defaults(container: JsonObject, version: fw.Version) -> JsonObject:
    """The container as the framework evaluates it: check_container's defaults for what `version` predates."""
    out = dict(container)
    if version < fw.SIGNALS_APPENDED_UNTIL:
        out["signals"] = [*container["signals"], *fw.APPENDED_SIGNALS]
    out.setdefault("no_new_privileges", False)
    out.setdefault("user", _copy(fw.ANY_USER))
    out.setdefault("capabilities", None)
    out.setdefault("seccomp_profile_sha256", "")
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
