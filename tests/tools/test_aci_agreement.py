"""Agreement with ACI's own Rego framework on randomised policies and traces.

Runs only when PARMA_SANDBOX_ACI_EVAL names an evaluator: a program that wraps hcsshim's Rego
enforcer (securitypolicy.CreateSecurityPolicyEnforcer("rego", ...), i.e. framework.rego + api.rego on
hcsshim's vendored OPA). It cannot ship with the project (docs/policy.md, "Agreement with ACI" says how
to build one locally). Protocol, JSON lines on stdin/stdout, one answer per line:

- `{"policy": <policy document>}` -> `{"ok": true}`: load a new policy, emitted as a Rego module with one
  `data` assignment per field (except `volumes`) and every rule delegating to `data.framework`;
- `{"ep", "input", "action"}` (our request, every optional input filled in) -> `{"allowed",
  "rolled_back", "env_list", "caps_list", "allow_stdio_access"}`: the request through the matching
  Enforce* call inside WithMetadataRollback (action "fail" returns an error after an allowed decision).
  Layer targets /run/parma/layers/<name> are mapped one-to-one onto /run/mounts/scsi/m<N> (ACI's fixed
  mountPathRegex) and /run/parma/sandbox onto ACI's sandbox mounts dir.

Decisions must agree on every request: allowed or not, rollback, and when allowed the env_list,
caps_list (as sets) and allow_stdio_access results.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sandbox.shared.policy import PolicyEngine, canonical_bytes
from sandbox.shared.policy.defaults import PRIVILEGED_CAPABILITIES, UNPRIVILEGED_CAPABILITIES
from sandbox.shared.policy.inputs import enforcement_point, parse_input

EVAL = os.environ.get("PARMA_SANDBOX_ACI_EVAL")
pytestmark = pytest.mark.skipif(
    not EVAL or not os.access(EVAL, os.X_OK),
    reason="set PARMA_SANDBOX_ACI_EVAL to an evaluator wrapping hcsshim's Rego enforcer (see docs/policy.md)")

VERSIONS = ["0.1.0", "0.2.0", "0.2.1", "0.2.2", "0.2.3", "0.3.0", "0.4.0", "0.4.1", "0.5.0"]
STRING_RULES = ["PATH=/bin", "A=1", "B=2", "MODE=prod", "EMPTY=", "GREETING=hello world"]
# re2 rules with an example value each. None has a top-level alternation: there ACI anchors only the
# first and last alternative (docs/policy.md), which test_known_anchoring_difference covers.
RE2_RULES = {"LOG=(debug|info)": ["LOG=debug", "LOG=info"], "HOSTNAME=.+": ["HOSTNAME=web"],
             "X_[0-9]+=.*": ["X_12=", "X_3=a b"], "(?i)fabric_.+=.+": ["FABRIC_ID=7"],
             "TOKEN=(?s:.*)": ["TOKEN=s3cr3t\nline2", "TOKEN="], "N=[0-9]{1,3}": ["N=42"], "C=.*": ["C=", "C=1"],
             "^D=[a-z]+$": ["D=abc"], "^E=x": ["E=x"], "F=y$": ["F=y"], "[^=]+=(?s:.*)": ["ANY=thing"]}
ENV_NOISE = ["MODE=dev", "LOG=trace", "HOSTNAME=", "X_=1", "N=4242", "C=1\nD=2", "D=abc\n", "E=xy", "F=zy",
             "LD_PRELOAD=/x.so", "A=1;X=2", "X=B=1", "LOG=info\n", "PATH=/bin"]
# Bind sources outside /run/parma/volumes: there a bind needs the volume pinned by `volumes`, which ACI has
# not (test_known_unpinned_volume_difference).
SOURCES = ["/srv/host/data", "/srv/host/www", "sandbox:///volumes/cache-[0-9]+"]
REQUEST_SOURCES = ["/srv/host/data", "/run/parma/sandbox/volumes/cache-7",
                   "/run/parma/sandbox/volumes/cache-7/../../etc", "/etc", "proc", "sysfs"]
OPTIONS = [["rbind", "rprivate", "rw"], ["rbind", "rprivate", "ro"], ["nosuid", "noexec", "nodev"],
           ["nosuid", "noexec", "nodev", "rw"], ["nosuid", "noexec", "nodev", "ro"]]
SIGNALS = [1, 2, 9, 10, 15]
USERS = [("0", "root"), ("33", "www"), ("1000", "web"), ("65534", "nobody")]


def default_caps(privileged: bool) -> dict[str, list[str]]:
    base = list(PRIVILEGED_CAPABILITIES if privileged else UNPRIVILEGED_CAPABILITIES)
    return {"bounding": base, "effective": base, "inheritable": base if privileged else [], "permitted": base,
            "ambient": []}


class Generator:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def hexhash(self) -> str:
        return f"{self.r.getrandbits(256):064x}"

    def env_rules(self) -> list[dict]:
        r = self.r
        rules = [{"pattern": p, "strategy": "string", "required": r.random() < 0.4}
                 for p in r.sample(STRING_RULES, r.randint(1, 4))]
        rules += [{"pattern": p, "strategy": "re2", "required": r.random() < 0.2}
                  for p in r.sample(sorted(RE2_RULES), r.randint(0, 4))]
        r.shuffle(rules)
        return rules

    def idname(self) -> dict:
        r = self.r
        strategy = r.choice(["any", "any", "id", "name", "re2"])
        uid, name = r.choice(USERS)
        pattern = {"any": "", "id": uid, "name": name, "re2": r.choice(["w(ww|eb)", ".*o.*", "n[a-z]+"])}[strategy]
        return {"pattern": pattern, "strategy": strategy}

    def container(self, i: int, layer_pool: list[list[str]], version: tuple[int, ...]) -> dict:
        r = self.r
        elevated = r.random() < 0.25
        c = {"name": f"c{i}", "layers": r.choice(layer_pool),
             "command": r.choice([["/app"], ["/app", "-v"], ["/bin/sh", "-c", "run"]]),
             "env_rules": self.env_rules(), "working_dir": r.choice(["/", "/srv"]),
             "mounts": [{"destination": r.choice(["/data", "/www", "/cache"]), "source": r.choice(SOURCES),
                         "type": "bind", "options": r.choice(OPTIONS[:2])} for _ in range(r.randint(0, 3))],
             "exec_processes": [{"command": r.choice([["/bin/ls"], ["/bin/cat", "/x"], ["/bin/sh"]]),
                                 "signals": r.sample(SIGNALS, r.randint(0, 2))} for _ in range(r.randint(0, 2))],
             "signals": r.sample(SIGNALS, r.randint(0, 2)), "allow_elevated": elevated,
             "allow_stdio_access": r.random() < 0.7}
        if version >= (0, 2, 0):
            c["no_new_privileges"] = r.random() < 0.2
        if version >= (0, 2, 1):
            c["user"] = {"user_idname": self.idname(), "group_idnames": [self.idname() for _ in range(r.randint(1, 2))],
                         "umask": r.choice(["0022", "0022", "0077"])}
        if version >= (0, 2, 2):
            if r.random() < 0.2:
                c["capabilities"] = None
            elif r.random() < 0.7:
                c["capabilities"] = default_caps(elevated)
            else:
                sub = r.sample(PRIVILEGED_CAPABILITIES, r.randint(0, 6))
                c["capabilities"] = {"bounding": sub, "effective": sub, "permitted": sub, "ambient": [],
                                     "inheritable": r.sample(PRIVILEGED_CAPABILITIES, r.randint(0, 2))}
        if version >= (0, 2, 3):
            c["seccomp_profile_sha256"] = "" if r.random() < 0.9 else "ab" * 32
        return c

    def policy(self) -> dict:
        r = self.r
        text = r.choice(VERSIONS)
        version = tuple(int(x) for x in text.split("."))
        pool = [[self.hexhash() for _ in range(r.randint(1, 3))] for _ in range(r.randint(1, 4))]
        doc = {"api_version": "0.12.0", "framework_version": text,
               "containers": [self.container(i, pool, version) for i in range(r.randint(1, 5))],
               "external_processes": [{"command": r.choice([["/bin/ls"], ["/usr/bin/uptime"]]),
                                       "env_rules": self.env_rules(), "working_dir": r.choice(["/", "/tmp"]),
                                       "allow_stdio_access": r.random() < 0.5} for _ in range(r.randint(0, 2))]}
        for flag in ("allow_properties_access", "allow_dump_stacks", "allow_runtime_logging",
                     "allow_environment_variable_dropping", "allow_unencrypted_scratch"):
            doc[flag] = r.random() < 0.5
        doc["allow_capability_dropping"] = version >= (0, 2, 2) and r.random() < 0.5
        return doc

    # -- requests -------------------------------------------------------------------------------------------

    def user_for(self, c: dict, valid: bool) -> tuple[dict, list[dict]]:
        r = self.r
        if not valid or not c.get("user"):
            uid, name = r.choice(USERS)
            return {"id": uid, "name": name}, [{"id": g, "name": n} for g, n in r.sample(USERS, r.randint(0, 2))]

        def pick(idn: dict) -> dict:
            s, p = idn["strategy"], idn["pattern"]
            fits = [(u, n) for u, n in USERS if s == "any" or (s == "id" and u == p) or (s == "name" and n == p)
                    or (s == "re2" and re.fullmatch(p, n))]
            uid, name = r.choice(fits or USERS)
            return {"id": uid, "name": name}

        user = c["user"]
        return pick(user["user_idname"]), [pick(r.choice(user["group_idnames"])) for _ in range(r.randint(0, 2))]

    def env_for(self, c: dict, noise: float) -> list[str]:
        r = self.r
        env = [rule["pattern"] if rule["strategy"] == "string" else r.choice(RE2_RULES[rule["pattern"]])
               for rule in c["env_rules"] if rule["required"] or r.random() < 0.5]
        if r.random() < noise:
            env += r.sample(ENV_NOISE, r.randint(1, 3))
        r.shuffle(env)
        return env

    def caps_for(self, c: dict, privileged: bool, mutate: float) -> dict:
        r = self.r
        caps = {k: list(v) for k, v in (c.get("capabilities") or default_caps(privileged)).items()}
        if r.random() < mutate:
            name = r.choice(sorted(caps))
            caps[name] = caps[name][1:] if caps[name] and r.random() < 0.5 else caps[name] + [
                r.choice(PRIVILEGED_CAPABILITIES)]
        return caps

    def create(self, doc: dict, cid: str, c: dict, valid: bool) -> dict:
        r = self.r
        privileged = c["allow_elevated"] and r.random() < 0.5 if valid else r.random() < 0.2
        user, groups = self.user_for(c, valid or r.random() < 0.7)
        mounts = [dict(m) for m in c["mounts"] if not m["source"].startswith("sandbox") and r.random() < 0.7]
        if not valid and r.random() < 0.5:
            mounts.append({"destination": r.choice(["/data", "/cache", "/proc", "/sys"]),
                           "source": r.choice(REQUEST_SOURCES), "type": r.choice(["bind", "proc", "sysfs"]),
                           "options": r.choice(OPTIONS)})
        umask = (c.get("user") or {}).get("umask", "0022")
        noise = 0.7 if doc["allow_environment_variable_dropping"] or not valid else 0.0
        mutate = 0.7 if doc["allow_capability_dropping"] or not valid else 0.0
        return {"container_id": cid, "argv": c["command"] if valid or r.random() < 0.8 else ["/other"],
                "env": self.env_for(c, noise), "working_dir": c["working_dir"] if valid or r.random() < 0.9 else "/x",
                "mounts": mounts, "user": user, "groups": groups,
                "umask": umask if valid or r.random() < 0.9 else "0077",
                "capabilities": self.caps_for(c, privileged, mutate), "privileged": privileged,
                "no_new_privileges": c.get("no_new_privileges", False) or (not valid and r.random() < 0.3),
                "seccomp_profile_sha256": c.get("seccomp_profile_sha256", "") if valid or r.random() < 0.9
                else "cd" * 32}

    def trace(self, doc: dict, length: int) -> list[dict]:
        r = self.r
        out: list[dict] = []
        overlays: list[tuple[str, dict, str]] = []
        created: list[tuple[str, dict, dict]] = []
        mounted: list[str] = []
        hashes = sorted({h for c in doc["containers"] for h in c["layers"]})
        while len(out) < length:
            kind, c = r.random(), r.choice(doc["containers"])
            if kind < 0.15:
                target = r.choice([f"/run/parma/layers/l{r.randint(0, 6)}", "/etc", "/run/parma/layers/../x"])
                out.append({"ep": "mount_device", "input": {"target": target, "device_hash": r.choice(
                    hashes + [self.hexhash()])}})
                mounted.append(target)
            elif kind < 0.25:
                base = r.randint(0, 60)
                paths = []
                for i, h in enumerate(c["layers"]):
                    paths.insert(0, f"/run/parma/layers/p{base + i}")
                    out.append({"ep": "mount_device", "input": {"target": paths[0], "device_hash": h}})
                    mounted.append(paths[0])
                if len(paths) > 1 and r.random() < 0.2:
                    r.shuffle(paths) if r.random() < 0.5 else paths.pop()
                cid = f"id{r.randint(0, 8)}"
                target = f"/run/parma/containers/{cid}/rootfs"
                out.append({"ep": "mount_overlay", "input": {"container_id": cid, "layer_paths": paths,
                                                             "target": target}})
                overlays.append((cid, c, target))
            elif kind < 0.45 and overlays:
                cid, c0, _ = r.choice(overlays)
                valid = r.random() < 0.5
                req = self.create(doc, cid, c0 if valid or r.random() < 0.8 else c, valid)
                out.append({"ep": "create_container", "input": req})
                created.append((cid, c0, req))
            elif kind < 0.6 and created:
                cid, cc, made = r.choice(created)
                procs = cc["exec_processes"]
                valid = r.random() < 0.6
                argv = r.choice(procs)["command"] if procs and (valid or r.random() < 0.7) else ["/bin/bash"]
                inp = {"container_id": cid, "argv": argv,
                       "env": [e for e in made["env"] if r.random() < 0.9] if valid else self.env_for(cc, 0.5),
                       "working_dir": cc["working_dir"] if valid or r.random() < 0.9 else "/tmp"}
                if not valid or r.random() < 0.5:   # otherwise inherit the container's identity
                    user, groups = self.user_for(cc, valid)
                    inp.update(user=user, groups=groups, umask=made["umask"],
                               capabilities=self.caps_for(cc, made["privileged"], 0.0 if valid else 0.3),
                               no_new_privileges=made["no_new_privileges"])
                out.append({"ep": "exec_in_container", "input": inp})
            elif kind < 0.7 and created:
                cid, cc, _ = r.choice(created)
                is_init = r.random() < 0.5
                procs = cc["exec_processes"]
                argv = r.choice(procs)["command"] if procs and not is_init and r.random() < 0.8 else ["/bin/ls"]
                out.append({"ep": "signal_container_process", "input": {
                    "container_id": cid, "signal": r.choice(SIGNALS), "is_init": is_init, "argv": argv}})
            elif kind < 0.75 and created:
                out.append({"ep": "shutdown_container", "input": {"container_id": r.choice(created)[0]}})
            elif kind < 0.82:
                ext = doc["external_processes"]
                p = r.choice(ext) if ext else None
                out.append({"ep": "exec_external", "input": {
                    "argv": p["command"] if p and r.random() < 0.8 else ["/bin/sh"],
                    "env": self.env_for(p, 0.5) if p else [], "working_dir": r.choice(["/", "/tmp"])}})
            elif kind < 0.87:
                ep = r.choice(["scratch_mount", "scratch_mount", "scratch_unmount"])
                inp = {"target": r.choice(["/s/1", "/s/2"])}
                if ep == "scratch_mount":
                    inp["encrypted"] = r.random() < 0.5
                out.append({"ep": ep, "input": inp})
            elif kind < 0.92 and (mounted or overlays):
                if mounted and (not overlays or r.random() < 0.7):
                    out.append({"ep": "unmount_device", "input": {"target": r.choice(mounted)}})
                else:
                    out.append({"ep": "unmount_overlay", "input": {"target": r.choice(overlays)[2]}})
            else:
                out.append({"ep": r.choice(["get_properties", "dump_stacks", "runtime_logging"]), "input": {}})
            if r.random() < 0.08:
                out[-1]["action"] = "fail"
        return out[:length]


def complete_input(engine: PolicyEngine, ep: str, inp: dict) -> dict:
    """Our request with every default filled in, in JSON form, as the evaluator needs it. An exec
    inherits the identity the container was created with, which the engine recorded."""
    out: dict[str, Any] = parse_input(enforcement_point(ep), inp).to_json()   # inherited fields left out
    if ep == "shutdown_container":
        out.pop("timeout")   # the shutdown request's own field, not a policy input
    if ep == "exec_in_container":
        recorded = engine.snapshot()["processes"].get(out["container_id"]) or {
            "user": {"id": "0", "name": "root"}, "groups": [], "umask": "0022", "capabilities": None,
            "no_new_privileges": False}
        out = {**recorded, **out}
    if ep in ("create_container", "exec_in_container") and out.get("capabilities") is None:
        out["capabilities"] = default_caps(bool(out.get("privileged")))
    return out


class _ActionFailed(Exception):
    pass


def ours(engine: PolicyEngine, req: dict) -> dict:
    seen = []

    def fail(decision):
        seen.append(decision)
        raise _ActionFailed

    try:
        d = engine.enforce_json(req["ep"], req["input"], fail if req.get("action") == "fail" else None)
        rolled_back = False
    except _ActionFailed:
        d, rolled_back = seen[0], True
    results = dict(d.results)
    if d.allowed and req["ep"] in ("create_container", "exec_in_container", "exec_external"):
        # No env_list or caps_list in the results means: as the request asked (hcsshim getEnvsToKeep, getCapsToKeep).
        results.setdefault("env_list", list(req["input"].get("env", [])))
        if req["ep"] != "exec_external":
            results.setdefault("caps_list", req["input"].get("capabilities") or {})
    return {"allowed": d.allowed, "rolled_back": rolled_back, "results": results, "reason": d.reason}


def difference(ep: str, a: dict, b: dict) -> str | None:
    if a["allowed"] != b["allowed"]:
        return f"allowed: ours {a['allowed']}, ACI {b['allowed']} ({a['reason'] or b.get('error', '')[:200]})"
    if not a["allowed"]:
        return None
    if a["rolled_back"] != b["rolled_back"]:
        return "rollback differs"
    if a["rolled_back"]:
        return None
    res = a["results"]
    if ep in ("create_container", "exec_in_container", "exec_external"):
        if set(res["env_list"]) != set(b.get("env_list") or []):
            return f"env_list: ours {sorted(res['env_list'])}, ACI {sorted(b.get('env_list') or [])}"
        if res["allow_stdio_access"] != b.get("allow_stdio_access"):
            return "allow_stdio_access differs"
    if ep in ("create_container", "exec_in_container"):
        theirs = b.get("caps_list") or {}
        for name, caps in res["caps_list"].items():
            if set(caps) != set(theirs.get(name) or []):
                return f"caps_list.{name} differs"
    return None


class Evaluator:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([EVAL], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)

    def ask(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        assert "fatal" not in answer, answer
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def evaluator():
    ev = Evaluator()
    yield ev
    ev.close()


def test_random_policies_and_traces_agree(evaluator: Evaluator) -> None:
    seed = int(os.environ.get("PARMA_SANDBOX_ACI_SEED", "11"))
    n_policies = int(os.environ.get("PARMA_SANDBOX_ACI_POLICIES", "40"))
    gen = Generator(seed)
    counts: Counter[str] = Counter()
    differences = []
    for _ in range(n_policies):
        doc = gen.policy()
        raw = canonical_bytes(doc)
        engine = PolicyEngine.from_bytes(raw)
        evaluator.ask({"policy": json.loads(raw)})
        shut_down: set[str] = set()      # ids shut down in this trace
        diverged: set[str] = set()       # ids created again after that: a deliberate difference (docs/policy.md)
        for req in gen.trace(doc, 60):
            req = {**req, "input": complete_input(engine, req["ep"], req["input"])}
            cid = req["input"].get("container_id")
            a = ours(engine, req)
            b = evaluator.ask(req)
            if cid in diverged or (req["ep"] == "create_container" and cid in shut_down):
                if a["allowed"]:
                    diverged.add(cid)
                counts["skipped: a re-created id"] += 1
                continue
            if req["ep"] == "shutdown_container" and a["allowed"] and not a["rolled_back"]:
                shut_down.add(cid)
            why = difference(req["ep"], a, b)
            counts[req["ep"]] += 1
            counts[f"{req['ep']} allowed"] += a["allowed"]
            if why:
                differences.append(f"{req['ep']}: {why}\n  request: {json.dumps(req)[:400]}")
    print(json.dumps(dict(sorted(counts.items())), indent=1))
    assert not differences, f"{len(differences)} disagreement(s):\n" + "\n".join(differences[:10])
    assert counts["create_container allowed"] > 0 and counts["exec_in_container allowed"] > 0


def test_known_recreate_difference(evaluator: Evaluator) -> None:
    """The framework never creates an id twice (ACI restarts under a new id); we create a shut-down id again
    after a fresh overlay (a restart under the same id), checked like the first create (on purpose)."""
    gen = Generator(5)
    doc = gen.policy()
    while not doc["containers"]:
        doc = gen.policy()
    c = doc["containers"][0]
    engine = PolicyEngine.from_bytes(canonical_bytes(doc))
    evaluator.ask({"policy": json.loads(canonical_bytes(doc))})
    paths = [f"/run/parma/layers/r{i}" for i in reversed(range(len(c["layers"])))]
    trace = [{"ep": "mount_device", "input": {"target": f"/run/parma/layers/r{i}", "device_hash": h}}
             for i, h in enumerate(c["layers"])]
    overlay = {"ep": "mount_overlay", "input": {"container_id": "again", "layer_paths": paths,
                                                "target": "/run/parma/containers/again/rootfs"}}
    create = {"ep": "create_container", "input": gen.create(doc, "again", c, True)}
    trace += [overlay, create, {"ep": "shutdown_container", "input": {"container_id": "again"}},
              {"ep": "unmount_overlay", "input": {"target": "/run/parma/containers/again/rootfs"}}, overlay]
    for req in trace:
        req = {**req, "input": complete_input(engine, req["ep"], req["input"])}
        assert ours(engine, req)["allowed"] and evaluator.ask(req)["allowed"], req
    req = {**create, "input": complete_input(engine, "create_container", create["input"])}
    assert evaluator.ask(req)["allowed"] is False
    assert ours(engine, req)["allowed"] is True


def test_known_anchoring_difference(evaluator: Evaluator) -> None:
    """ACI anchors `A=1|B=1` as `^A=1|B=1$`, which keeps `A=1;X=2`; we match patterns whole (on purpose)."""
    doc = {"api_version": "0.12.0", "framework_version": "0.5.0", "containers": [], "external_processes": [
        {"command": ["/bin/ls"], "env_rules": [{"pattern": "A=1|B=1", "strategy": "re2", "required": False}],
         "working_dir": "/", "allow_stdio_access": True}], "allow_environment_variable_dropping": False}
    engine = PolicyEngine.from_bytes(canonical_bytes(doc))
    evaluator.ask({"policy": doc})
    req = {"ep": "exec_external", "input": {"argv": ["/bin/ls"], "env": ["A=1;X=2"], "working_dir": "/"}}
    assert evaluator.ask(req)["allowed"] is True
    assert ours(engine, req)["allowed"] is False
    req["input"]["env"] = ["B=1"]
    assert evaluator.ask(req)["allowed"] is True and ours(engine, req)["allowed"] is True


def test_known_unpinned_volume_difference(evaluator: Evaluator) -> None:
    """A bind of /run/parma/volumes/<name> needs that volume pinned in `volumes` (an extension ACI has not):
    otherwise the host could fill the directory itself. ACI matches the source literally (on purpose)."""
    mount = {"destination": "/cache", "source": "/run/parma/volumes/www", "type": "bind",
             "options": ["rbind", "rprivate", "rw"]}
    container = {"id": "app", "name": "app", "layers": ["1" * 64], "command": ["/bin/sh"], "env_rules": [],
                 "working_dir": "/", "mounts": [mount], "exec_processes": [], "signals": [], "allow_elevated": False,
                 "allow_stdio_access": True, "no_new_privileges": False, "seccomp_profile_sha256": "",
                 "user": {"user_idname": {"pattern": "", "strategy": "any"},
                          "group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022"},
                 "capabilities": None}
    doc = {"api_version": "0.12.0", "framework_version": "0.5.0", "containers": [container],
           "external_processes": [], "allow_unencrypted_scratch": True}
    engine = PolicyEngine.from_bytes(canonical_bytes(doc))
    evaluator.ask({"policy": doc})
    trace = [{"ep": "mount_device", "input": {"target": "/run/parma/layers/l0", "device_hash": "1" * 64}},
             {"ep": "mount_overlay", "input": {"container_id": "c1", "layer_paths": ["/run/parma/layers/l0"],
                                               "target": "/run/parma/containers/c1/rootfs"}},
             {"ep": "create_container", "input": {"container_id": "c1", "argv": ["/bin/sh"], "env": [],
                                                  "working_dir": "/", "mounts": [mount]}}]
    for req in trace:
        req = {**req, "input": complete_input(engine, req["ep"], req["input"])}
        theirs, mine = evaluator.ask(req), ours(engine, req)
        if req["ep"] != "create_container":
            assert theirs["allowed"] and mine["allowed"], (theirs, mine)
    assert theirs["allowed"] is True
    assert mine["allowed"] is False and "does not pin" in mine["reason"]


def test_evaluator_path_is_outside_the_repository() -> None:
    """The evaluator is built from fetched code that must never be committed."""
    repo = Path(__file__).resolve().parents[2]
    assert repo not in Path(EVAL).resolve().parents
