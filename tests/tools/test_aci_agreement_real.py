"""Agreement with ACI's framework on real policy modules, fragments, and ACI's own request sequence.

Runs only when PARMA_SANDBOX_ACI_EVAL names the evaluator of tests/tools/test_aci_agreement.py, which
also takes `{"rego": TEXT}` (load a Rego policy module as it is) and `{"fragment": {"issuer", "feed",
"header_svn", "rego"}}` (hcsshim's LoadFragment) lines (docs/aci.md, 'Agreement'). Real policies:
modules written here in confcom's layout, the output of `export aci`, and every `*.rego` under
PARMA_SANDBOX_ACI_CORPUS (a local corpus of real ccePolicies, never in the repository).

- Real policies: the Rego text goes to ACI's framework unchanged and to our engine through `policy
  import` (fragment imports, null commands, the second env-rule form, rules the module answers itself
  and the layers of ignored containers included). Both replay the same generated traces, which cover
  every enforcement point: fragment loads (issuers and feeds the policy names or not, SVNs above and
  below the minimum) and what loaded fragments add included; decisions must agree.
- Fragments: `check_load` must accept and refuse exactly the loads hcsshim's LoadFragment does.
- export aci: ACI's guest request sequence for the group (pause container, layers at ACI's SCSI
  mount targets, overlays, creates with ACI's injected env and mount sources, the listed execs) is
  allowed, and the usual attacks are denied.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_aci_agreement import EVAL, Evaluator, Generator, complete_input, default_caps, difference, ours

from sandbox.aci.decision import parse_decision, replay
from sandbox.aci.export import aci_policy
from sandbox.aci.rego import import_rego, rego_module
from sandbox.group import validate_group
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.shared.errors import InputError
from sandbox.shared.policy import PolicyEngine
from sandbox.shared.rego.fragment import FragmentRefused, check_load, read_fragment_text
from sandbox.shared.rego.policy import read_policy_text
from sandbox.shared.rego.syntax import Module, parse_modules

pytestmark = pytest.mark.skipif(
    not EVAL or not os.access(EVAL, os.X_OK),
    reason="set PARMA_SANDBOX_ACI_EVAL to an evaluator wrapping hcsshim's Rego enforcer (see docs/policy.md)")

CORPUS = os.environ.get("PARMA_SANDBOX_ACI_CORPUS")
ISSUER = "did:x509:0:sha256:I__iuL25oXEVFdTP_aBLx_eT1RPHbCQ_ECBQfYZpt9s::eku:1.3.6.1.4.1.311.76.59.1.3"
ACI_ENV = ["HOSTNAME=SandboxHost-638", "Fabric_NodeIPOrFQDN=10.92.0.21", "TEMP=/tmp", "IDENTITY_HEADER=abc",
           "azurecontainerinstance_restarted_by=user", "TERM=xterm"]


@pytest.fixture
def evaluator():
    ev = Evaluator()
    yield ev
    ev.close()


NO_COMMAND = ["/policy-says-null"]     # what a request asks for where the policy's command is null


class RealGenerator(Generator):
    """Traces for real policies: values for any env rule, sandbox:// mounts as requests name them, null
    commands (never matched), layers of ignored containers, and fragment loads."""

    def env_value(self, rule: dict) -> str | None:
        pattern = rule.get("pattern")
        if pattern is None:
            if rule.get("name_strategy") == "string":
                return f"{rule['name']}=" + ("v" if rule["value_strategy"] == "re2" else rule["value"])
            return None
        if rule["strategy"] == "string":
            return pattern
        known = {"(?i)(FABRIC)_.+=.+": "Fabric_Id=7", "((?i)FABRIC)_.+=.+": "FABRIC_Id=7", "T(E)?MP=.+": "TMP=/t"}
        if pattern in known:
            return known[pattern]
        m = re.fullmatch(r"\^?([A-Za-z_][A-Za-z0-9_]*)=(\.[*+]|\(\?s:\.\*\))\$?", pattern)
        return f"{m.group(1)}=v" if m else None

    def env_for(self, c: dict, noise: float) -> list[str]:
        r = self.r
        env = [v for rule in c["env_rules"] if (rule["required"] or r.random() < 0.6)
               and (v := self.env_value(rule)) is not None]
        if r.random() < noise:
            env += r.sample(["LD_PRELOAD=/x.so", "MODE=dev", "HOSTNAME=", "PATH=/evil"], r.randint(1, 2))
        r.shuffle(env)
        return env

    def create(self, doc: dict, cid: str, c: dict, valid: bool) -> dict:
        req = super().create(doc, cid, c, valid)
        for m in c["mounts"]:
            if m["source"].startswith("sandbox://") and self.r.random() < 0.8:
                source = "/run/parma/sandbox" + re.sub(r"\.[+*]$", f"c{self.r.randint(0, 9)}", m["source"][10:])
                req["mounts"].append({**m, "source": source})
        return req

    def fragment_load(self, doc: dict, namespace: str) -> dict:
        """A load_fragment request: mostly for an import the policy names, with the SVN on either side of
        its minimum; the fragment adds one container (and maybe a nested import)."""
        r = self.r
        imports = doc.get("fragments") or [{"issuer": "did:x509:0:sha256:NONE::eku:1", "feed": "none",
                                            "minimum_svn": "1", "includes": ["containers"]}]
        imp = r.choice(imports)
        issuer = imp["issuer"] if r.random() < 0.85 else "did:x509:0:sha256:OTHER::eku:1.2.3"
        feed = imp["feed"] if r.random() < 0.85 else "example.com/other"
        try:
            minimum = int(str(imp["minimum_svn"]))
        except ValueError:
            minimum = 1
        svn = r.choice([minimum, minimum, minimum + 3, max(0, minimum - 1)])
        version = r.choice(["0.2.3", "0.5.0", "0.1.0"])
        container = self.container(0, [[self.hexhash() for _ in range(r.randint(1, 2))]],
                                   tuple(int(x) for x in version.split(".")))
        lines = [f"package {namespace}", "", f'svn := "{svn}"' if r.random() < 0.8 else f"svn := {svn}",
                 f'framework_version := "{version}"', "", f"containers := {json.dumps([container])}"]
        if r.random() < 0.3:
            lines.append("fragments := " + json.dumps([{"issuer": "did:x509:0:sha256:NEST::eku:1", "feed": "nested",
                                                        "minimum_svn": "1", "includes": ["containers"]}]))
        inp = {"issuer": issuer, "feed": feed, "rego": "\n".join(lines) + "\n"}
        if r.random() < 0.3:
            inp["header_svn"] = r.choice([svn, svn + 1])
        self.fragment_containers.append(container)
        return {"ep": "load_fragment", "input": inp}

    def real_trace(self, doc: dict, length: int) -> list[dict]:
        """Generator.trace over the policy's containers, those of the fragments it loads and, where a
        command is null, a request no command matches; plus layers of ignored containers and loads."""
        self.fragment_containers: list[dict] = []
        view = dict(doc)
        view["containers"] = [self._requestable(c) for c in doc["containers"]]
        view["external_processes"] = [{**e, "command": e["command"] or NO_COMMAND} for e in doc["external_processes"]]
        out = []
        for i, part in enumerate((length * 2 // 3, length - length * 2 // 3)):
            out.append(self.fragment_load(doc, f"frag{i}"))
            view["containers"] = view["containers"] + [self._requestable(c) for c in self.fragment_containers[-1:]]
            out += self.trace(view, part)
        for h in doc.get("ignored_container_layers", [])[:3]:
            out.append({"ep": "mount_device", "input": {"target": f"/run/parma/layers/i{len(out)}", "device_hash": h}})
        return out

    @staticmethod
    def _requestable(c: dict) -> dict:
        return {**c, "command": c["command"] or NO_COMMAND,
                "exec_processes": [{**p, "command": p["command"] or NO_COMMAND} for p in c["exec_processes"]]}


def synthetic_image(ref: str, layers: list[str], **config) -> ResolvedImage:
    return ResolvedImage(ref, "sha256:" + "d" * 64, ImageConfig(**config),
                         tuple(LayerInfo("sha256:" + "0" * 64, "m", 1, h, Path("/x")) for h in layers))


EXPORT_GROUP = {
    "name": "shop", "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "creds", "secret": {"k": "aGk="}}],
    "containers": [
        {"name": "web", "image": "example.com/web:1", "env": [{"name": "MODE", "value": "prod"}],
         "mounts": [{"name": "cache", "mountPath": "/cache"}, {"name": "creds", "mountPath": "/creds"}],
         "execProcesses": [{"command": ["/bin/health", "--quick"]}], "signals": ["SIGTERM"]},
        {"name": "worker", "image": "example.com/worker:2", "user": "1000:1000", "args": ["--queue", "a"]},
    ]}
EXPORT_IMAGES = {"web": synthetic_image("example.com/web:1", ["a1" * 32, "a2" * 32], entrypoint=("/srv/web",),
                                        env=("PATH=/usr/bin:/bin",), working_dir="/srv"),
                 "worker": synthetic_image("example.com/worker:2", ["b1" * 32], entrypoint=("/work",))}


def exported_rego() -> str:
    return aci_policy(validate_group(EXPORT_GROUP), EXPORT_IMAGES)


def policy_texts() -> list[tuple[str, str]]:
    out = [("export aci", exported_rego())]
    if CORPUS:
        out += [(str(p), p.read_text(errors="replace")) for p in sorted(Path(CORPUS).glob("*.rego"))]
    return out


def policy_modules(counts: Counter[str]) -> Iterator[tuple[str, str, Module]]:
    """(source, module text, parsed module) of every module of policy_texts() in the Rego subset."""
    for source, text in policy_texts():
        try:
            modules = parse_modules(text, source)
        except InputError:
            counts["modules outside the Rego subset"] += 1
            continue
        for m in modules:
            yield source, text[m.start:m.end], m


def ask(evaluator: Evaluator, req: dict) -> dict:
    """The evaluator's answer to a request of a trace (a fragment load is its own kind of line)."""
    if req["ep"] == "load_fragment":
        return {"rolled_back": False, **evaluator.ask({"fragment": {"header_svn": None, **req["input"]}})}
    return evaluator.ask(req)


def test_real_policies_agree(evaluator: Evaluator) -> None:
    gen = RealGenerator(int(os.environ.get("PARMA_SANDBOX_ACI_SEED", "17")))
    counts: Counter[str] = Counter()
    differences = []
    for source, module, _ in policy_modules(counts):
        counts["modules"] += 1
        try:
            policy = import_rego(module, source=source)
        except InputError:
            counts["modules parma-sandbox refuses"] += 1
            continue
        if not evaluator.ask({"rego": module})["ok"]:
            counts["modules ACI's framework refuses"] += 1
            continue
        counts["modules compared"] += 1
        engine = PolicyEngine.from_bytes(module.encode())
        assert engine.policy == policy
        for req in gen.real_trace(policy.to_document(), 40):
            if req["ep"] != "load_fragment":
                req = {**req, "input": complete_input(engine, req["ep"], req["input"])}
            a = ours(engine, req)
            why = difference(req["ep"], a, ask(evaluator, req))
            counts["requests"] += 1
            counts["allowed"] += a["allowed"]
            counts[f"{req['ep']}"] += 1
            counts[f"{req['ep']} allowed"] += a["allowed"]
            if why:
                differences.append(f"{source}: {req['ep']}: {why}\n  request: {json.dumps(req)[:300]}")
    counts["disagreements"] = len(differences)
    print(json.dumps(dict(sorted(counts.items())), indent=1))
    assert counts["modules compared"] > 0 and counts["allowed"] > 0
    from sandbox.shared.policy import EnforcementPoint
    from sandbox.shared.rego.framework import ENFORCEMENT_POINTS
    aci_points = [ep.value for ep in EnforcementPoint if ep.value in ENFORCEMENT_POINTS]
    if CORPUS:     # the exported policy alone lists no external process, fragment or flag to allow
        assert all(counts[f"{ep} allowed"] for ep in aci_points), "every ACI point is decided both ways"
    assert not differences, f"{len(differences)} disagreement(s):\n" + "\n".join(differences[:10])


def test_containers_of_the_frameworks_own_version_lacking_fields_agree(evaluator: Evaluator) -> None:
    """Data of framework_version 0.5.0 is evaluated as written: a container lacking a field still matches
    overlays; without signals or exec_processes it is created, without anything else it never is."""
    gen = RealGenerator(int(os.environ.get("PARMA_SANDBOX_ACI_SEED", "17")) + 1)
    fields = ["signals", "exec_processes", "user", "capabilities", "seccomp_profile_sha256", "env_rules",
              "no_new_privileges", "mounts", "working_dir", "allow_elevated", "allow_stdio_access", "command"]
    counts: Counter[str] = Counter()
    differences = []
    for i in range(24):
        doc = gen.policy()
        doc["framework_version"] = "0.5.0"
        doc["containers"] = [gen.container(j, [c["layers"] for c in doc["containers"]], (0, 5, 0))
                             for j in range(len(doc["containers"]))]
        full = [dict(c) for c in doc["containers"]]
        for c in doc["containers"]:
            for key in gen.r.sample(fields, gen.r.randint(0, 2)):
                c.pop(key, None)
        module = rego_module(doc)
        if not evaluator.ask({"rego": module})["ok"]:
            counts["modules ACI's framework refuses"] += 1
            continue
        engine = PolicyEngine.from_bytes(module.encode())
        counts["modules"] += 1
        for req in gen.trace({**doc, "containers": full}, 40):
            req = {**req, "input": complete_input(engine, req["ep"], req["input"])}
            a = ours(engine, req)
            why = difference(req["ep"], a, evaluator.ask(req))
            counts["requests"] += 1
            counts[f"{req['ep']} allowed"] += a["allowed"]
            if why:
                differences.append(f"policy {i}: {req['ep']}: {why}\n  request: {json.dumps(req)[:300]}")
    counts["disagreements"] = len(differences)
    print(json.dumps(dict(sorted(counts.items())), indent=1))
    assert counts["mount_overlay allowed"] and counts["create_container allowed"]
    assert not differences, f"{len(differences)} disagreement(s):\n" + "\n".join(differences[:10])


FRAGMENT_LAYER = "fa" * 32


def fragment_module(namespace: str, svn: str | None) -> str:
    c = {"allow_elevated": False, "allow_stdio_access": True, "capabilities": None, "command": ["/side"],
         "env_rules": [], "exec_processes": [], "layers": [FRAGMENT_LAYER], "mounts": [], "no_new_privileges": False,
         "seccomp_profile_sha256": "", "signals": [], "working_dir": "/",
         "user": {"group_idnames": [{"pattern": "", "strategy": "any"}], "umask": "0022",
                  "user_idname": {"pattern": "", "strategy": "any"}}}
    head = f"package {namespace}\n\n" + (f"svn := {svn}\n" if svn is not None else "")
    return head + f'framework_version := "0.2.3"\n\ncontainers := {json.dumps([c])}\n'


def test_fragment_loads_agree(evaluator: Evaluator) -> None:
    r = random.Random(5)
    imports = [{"issuer": ISSUER, "feed": "mcr.microsoft.com/aci/aci-cc-infra-fragment", "minimum_svn": "4",
                "includes": ["containers", "fragments"]},
               {"issuer": "did:x509:0:sha256:AAAA::eku:1.2.3", "feed": "example.com/side", "minimum_svn": "2",
                "includes": ["containers"]}]
    base = exported_rego()
    policy_text = re.sub(r"fragments := \[.*?\n\]", "fragments := " + json.dumps(imports), base, flags=re.S)
    counts: Counter[str] = Counter()
    mismatches = []
    for i in range(60):
        imp = r.choice(imports)
        issuer = imp["issuer"] if r.random() < 0.8 else "did:x509:0:sha256:BBBB::eku:9.9"
        feed = imp["feed"] if r.random() < 0.8 else "example.com/other"
        svn = r.choice([None, '"1"', '"2"', '"4"', "5", '"10"'])
        header = r.choice([None, None, 1, 2, 4, 5, 10])
        text = fragment_module(f"frag{i}", svn)
        assert evaluator.ask({"rego": policy_text})["ok"]
        theirs = evaluator.ask({"fragment": {"issuer": issuer, "feed": feed, "header_svn": header, "rego": text}})
        try:
            check_load([{**x, "required_receipts": []} for x in read_policy_text(policy_text).fragments],
                       issuer=issuer, feed=feed, header_svn=header, fragment=read_fragment_text(text))
            mine = True
        except FragmentRefused:
            mine = False
        counts["loads"] += 1
        counts["accepted"] += theirs["allowed"]
        if mine != theirs["allowed"]:
            mismatches.append(f"issuer={issuer} feed={feed} svn={svn} header={header}: ours {mine}, "
                              f"ACI {theirs['allowed']} {theirs.get('error', '')[:200]}")
        if theirs["allowed"]:
            # what the fragment adds is then allowed: its container's layer mounts
            mounted = evaluator.ask({"ep": "mount_device", "input": {"target": "/run/mounts/scsi/m9",
                                                                     "device_hash": FRAGMENT_LAYER}})
            counts["fragment layer mountable"] += mounted["allowed"]
    counts["disagreements"] = len(mismatches)
    print(json.dumps(dict(counts), indent=1))
    assert counts["accepted"] > 0 and counts["fragment layer mountable"] == counts["accepted"]
    assert not mismatches, "\n".join(mismatches[:10])


CID = ["%064x" % (0xC0FFEE + i) for i in range(4)]


def aci_sequence() -> tuple[list[dict], list[tuple[str, dict]]]:
    """ACI's guest requests for the exported group, then attacks that must be denied."""
    sandbox = "/run/parma/sandbox"
    pause_layer = "16b514057a06ad665f92c02863aca074fd5976c755d26bff16365299169e8415"
    ok: list[dict] = []
    n = 0

    def layers(hashes: list[str]) -> list[str]:
        nonlocal n
        paths = []
        for h in hashes:
            target = f"/run/mounts/scsi/m{n}"
            n += 1
            ok.append({"ep": "mount_device", "input": {"target": target, "device_hash": h}})
            paths.insert(0, target)
        return paths

    def create(cid: str, argv: list[str], env: list[str], mounts: list[dict], workdir: str, user: dict) -> None:
        ok.append({"ep": "create_container", "input": {
            "container_id": cid, "argv": argv, "env": env, "working_dir": workdir, "mounts": mounts, "user": user,
            "groups": [user], "umask": "0022", "privileged": False, "no_new_privileges": False,
            "capabilities": default_caps(False), "seccomp_profile_sha256": ""}})

    resolv = {"destination": "/etc/resolv.conf", "source": f"{sandbox}/tmp/atlas/resolvconf/abc",
              "type": "bind", "options": ["rbind", "rshared", "rw"]}
    root = {"id": "0", "name": "root"}
    for cid, hashes, argv, env, mounts, workdir, user in [
        (CID[0], [pause_layer], ["/pause"], ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                             "TERM=xterm"], [], "/", root),
        (CID[1], ["a1" * 32, "a2" * 32], ["/srv/web"], ["PATH=/usr/bin:/bin", "MODE=prod", *ACI_ENV],
         [{"destination": "/cache", "source": f"{sandbox}/tmp/atlas/emptydir/cache", "type": "bind",
           "options": ["rbind", "rshared", "rw"]},
          {"destination": "/creds", "source": f"{sandbox}/tmp/atlas/secretsVolume/creds", "type": "bind",
           "options": ["rbind", "rshared", "ro"]}, resolv], "/srv", root),
        (CID[2], ["b1" * 32], ["/work", "--queue", "a"], ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                                           "/sbin:/bin", *ACI_ENV], [resolv], "/",
         {"id": "1000", "name": "app"}),
    ]:
        paths = layers(hashes)
        ok.append({"ep": "mount_overlay", "input": {"container_id": cid, "layer_paths": paths,
                                                    "target": f"/run/gcs/c/{cid}/rootfs"}})
        create(cid, argv, env, mounts, workdir, user)
    identity = {"user": root, "groups": [root], "umask": "0022", "capabilities": default_caps(False),
                "no_new_privileges": False}
    ok.append({"ep": "exec_in_container", "input": {"container_id": CID[1], "argv": ["/bin/health", "--quick"],
                                                    "env": ["PATH=/usr/bin:/bin"], "working_dir": "/srv", **identity}})
    ok.append({"ep": "signal_container_process", "input": {"container_id": CID[1], "signal": 15, "is_init": True,
                                                           "argv": ["/srv/web"]}})
    attacks = [
        ("unlisted exec", {"ep": "exec_in_container", "input": {"container_id": CID[1], "argv": ["/bin/sh"],
                                                                "env": ["PATH=/usr/bin:/bin"], "working_dir": "/srv",
                                                                **identity}}),
        ("tampered layer", {"ep": "mount_device", "input": {"target": "/run/mounts/scsi/m40", "device_hash": "ee" * 32}}),
        ("layer at a host-chosen path", {"ep": "mount_device", "input": {"target": "/etc", "device_hash": "a1" * 32}}),
        ("layers reordered", {"ep": "mount_overlay", "input": {
            "container_id": CID[3], "layer_paths": ["/run/mounts/scsi/m1", "/run/mounts/scsi/m2"],
            "target": f"/run/gcs/c/{CID[3]}/rootfs"}}),
        ("unencrypted scratch", {"ep": "scratch_mount", "input": {"target": "/run/gcs/c/x/scratch", "encrypted": False}}),
        ("dump stacks", {"ep": "dump_stacks", "input": {}}),
        ("signal not listed", {"ep": "signal_container_process", "input": {"container_id": CID[1], "signal": 2,
                                                                           "is_init": True, "argv": ["/srv/web"]}}),
    ]
    return ok, attacks


def test_exported_policy_accepts_acis_request_sequence_and_denies_attacks(evaluator: Evaluator) -> None:
    assert evaluator.ask({"rego": exported_rego()})["ok"]
    ok, attacks = aci_sequence()
    for req in ok:
        answer = evaluator.ask(req)
        assert answer["allowed"], f"{req['ep']} denied: {answer.get('error', '')[:600]}"
    explained = Counter()
    for name, req in attacks:
        answer = evaluator.ask(req)
        assert not answer["allowed"], f"attack allowed: {name}"
        # ACI's denial carries a policyDecision blob; `policy explain` decodes it
        decision = parse_decision(answer["error"])
        assert decision.rule == req["ep"] and decision.decision == "deny", name
        for error in decision.errors or ("(no reason: a policy flag)",):
            explained[error] += 1
    print(json.dumps(dict(explained)))
    # another command is denied; an injected LD_PRELOAD is dropped (the policy allows env dropping, as
    # confcom's do), so the container starts without it
    assert evaluator.ask({"rego": exported_rego()})["ok"]
    for req in ok:
        if req["ep"] == "create_container" and req["input"]["argv"] == ["/srv/web"]:
            assert not evaluator.ask({"ep": req["ep"], "input": {**req["input"], "argv": ["/bin/sh"]}})["allowed"]
            answer = evaluator.ask({"ep": req["ep"], "input": {**req["input"],
                                                               "env": [*req["input"]["env"], "LD_PRELOAD=/x.so"]}})
            assert answer["allowed"] and "LD_PRELOAD=/x.so" not in answer["env_list"]
            continue
        assert evaluator.ask(req)["allowed"]
    print(json.dumps({"sequence": len(ok), "attacks denied": len(attacks) + 1, "env dropped": 1}))


def test_policy_explain_gives_the_local_engines_text_for_acis_denials(evaluator: Evaluator) -> None:
    """ACI's policyDecision blobs of real denials, replayed by `policy explain --policy`: where the
    request can be replayed alone, the text is exactly the local engine's for the same request."""
    rego = exported_rego()
    assert evaluator.ask({"rego": rego})["ok"]
    ok, attacks = aci_sequence()
    for req in ok:
        assert evaluator.ask(req)["allowed"]
    create = next(r for r in ok if r["ep"] == "create_container" and r["input"]["argv"] == ["/srv/web"])
    denials = [req for _, req in attacks] + [{"ep": "create_container", "input": {
        **create["input"], "container_id": CID[3], "argv": ["/bin/sh"]}}]
    counts: Counter[str] = Counter()
    for req in denials:
        answer = evaluator.ask(req)
        assert not answer["allowed"]
        decision = parse_decision(answer["error"])
        replayed = replay(decision, rego.encode())
        if not replayed.decisions:
            counts["not replayable alone"] += 1
            continue
        counts["replayed"] += 1
        assert all(text != "allowed here" for text in replayed.decisions), (req, replayed)
        if decision.rule in ("mount_device", "scratch_mount", "dump_stacks"):
            engine = PolicyEngine.from_bytes(rego.encode())
            local = json.dumps(req["input"]).replace("/run/mounts/scsi/", "/run/parma/layers/").replace(
                "/run/gcs/c/", "/run/parma/containers/")
            inp = json.loads(local)
            assert replayed.decisions == (engine.enforce_json(req["ep"], inp).reason,)
        else:
            assert any("argv ['/bin/sh'] does not match command ['/srv/web']" in t for t in replayed.decisions)
    print(json.dumps(dict(counts)))
    assert counts["replayed"] >= 4


def test_reader_keeps_exactly_the_containers_acis_framework_evaluates(evaluator: Evaluator) -> None:
    """For every module the reader accepts (no engine needed): a container's layer stack mounts as an
    overlay on ACI exactly when the reader kept some container with that stack (version defaults,
    dropped objects, newer framework versions)."""
    counts: Counter[str] = Counter()
    differences = []
    for source, module, m in policy_modules(counts):
        try:
            policy = read_policy_text(module, source)
        except InputError:
            continue
        if not evaluator.ask({"rego": module})["ok"]:
            counts["modules ACI's framework refuses"] += 1
            continue
        counts["modules"] += 1
        kept = {tuple(c["layers"]) for c in policy.containers}
        raw = m.assignments().get("containers")
        stacks = [tuple(c["layers"]) for c in (raw.value if raw and isinstance(raw.value, list) else [])
                  if isinstance(c, dict) and isinstance(c.get("layers"), list)
                  and all(isinstance(h, str) for h in c["layers"])]
        n = 0
        for i, stack in enumerate(stacks):
            paths = []
            for h in stack:
                evaluator.ask({"ep": "mount_device", "input": {"target": f"/run/mounts/scsi/m{n}",
                                                               "device_hash": h}})
                paths.insert(0, f"/run/mounts/scsi/m{n}")
                n += 1
            cid = "%064x" % (i + 1)
            answer = evaluator.ask({"ep": "mount_overlay", "input": {
                "container_id": cid, "layer_paths": paths, "target": f"/run/gcs/c/{cid}/rootfs"}})
            counts["containers"] += 1
            if answer["allowed"] != (stack in kept):
                differences.append(f"{source}: containers[{i}]: ACI {answer['allowed']}, reader kept "
                                   f"{stack in kept}")
    counts["disagreements"] = len(differences)
    print(json.dumps(dict(counts), indent=1))
    assert counts["containers"] > 0
    assert not differences, "\n".join(differences[:10])
