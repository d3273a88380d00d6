"""`export aci` checked as ACI's guest checks it, on real groups: examples/hello and confcom's samples.

Runs only when PARMA_SANDBOX_ACI_EVAL names the evaluator of tests/tools/test_aci_agreement.py (hcsshim's
framework.rego and api.rego on its vendored OPA; it takes a `{"rego": TEXT}` line to load a module).

ACI's request sequence is derived from the exported ARM template and the images, not from the exported
policy: what ACI's guest is asked to do for that template (docs/aci.md, 'Export to ACI'): the pause
container, each container's layers at ACI's SCSI targets (/run/mounts/scsi/m<N>), its overlay, its
create with the template's command (else the image's ENTRYPOINT and CMD), the image's env overridden by
the template's plus what ACI injects, the template's volume mounts at ACI's sources and resolv.conf,
its user from securityContext; then the group's exec processes and signals. Init containers come first.
The sequence must be allowed, then the usual attacks must be denied (and an injected variable dropped).

- examples/hello: its busybox image (built from Debian packages, `make example-images`), layers hashed
  as ACI hashes them, exported as `export aci --registry` does.
- confcom's samples: every `<sample>/arm_template.json` with its `policy.rego` (written by `az confcom
  acipolicygen`) under PARMA_SANDBOX_CONFCOM_SAMPLES (a local copy of confcom's `samples/aci`, never in
  the repository). Their images are on mcr.microsoft.com, out of reach here, so each is replaced by an
  image with the layers, env, command and working directory confcom recorded. The same sequence must be
  allowed by confcom's own policy too: both policies accept what ACI will ask.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_aci_agreement import EVAL, Evaluator, default_caps, evaluator  # noqa: F401 - a fixture
from test_aci_agreement_real import ACI_ENV

from sandbox.aci.decision import parse_decision
from sandbox.aci.export import ACI_ENV_RULES, PAUSE_LAYER, aci_template
from sandbox.group import load_group
from sandbox.group.spec import GroupSpec, LayerFormat
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.shared.errors import InputError
from sandbox.shared.rego.policy import read_policy
from sandbox.shared.rego.syntax import parse_modules

pytestmark = pytest.mark.skipif(
    not EVAL or not os.access(EVAL, os.X_OK),
    reason="set PARMA_SANDBOX_ACI_EVAL to an evaluator wrapping hcsshim's Rego enforcer (see docs/policy.md)")

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello" / "group.json"
BUSYBOX_LAYOUT = REPO / "build" / "images" / "busybox"
SAMPLES = os.environ.get("PARMA_SANDBOX_CONFCOM_SAMPLES")
SANDBOX = "/run/parma/sandbox"          # the evaluator maps it onto ACI's sandbox mounts directory
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VOLUME_DIRS = {"emptyDir": "emptydir", "secret": "secretsVolume", "azureFile": "azureFileVolume",
               "gitRepo": "gitRepoVolume"}
ROOT = {"id": "0", "name": "root"}
NO_COMMAND = ("/usr/bin/app",)


def _cid(n: int) -> str:
    return "%064x" % (0xACE0 + n)


class AciGuest:
    """The requests ACI's guest makes for one container group of an ARM template."""

    def __init__(self, template: dict[str, Any], images: dict[str, ResolvedImage], spec: GroupSpec) -> None:
        self.props = template["resources"][0]["properties"]
        self.images = images
        self.spec = spec
        self.mounts_done = 0
        self.requests: list[dict[str, Any]] = []
        self.created: dict[str, dict[str, Any]] = {}     # container name -> its create input
        self.unstartable: list[str] = []                  # containers with no command at all

    def _layers(self, hashes: list[str]) -> list[str]:
        paths = []
        for h in hashes:
            target = f"/run/mounts/scsi/m{self.mounts_done}"
            self.mounts_done += 1
            self.requests.append({"ep": "mount_device", "input": {"target": target, "device_hash": h}})
            paths.insert(0, target)
        return paths

    def _create(self, cid: str, hashes: list[str], inp: dict[str, Any]) -> None:
        paths = self._layers(hashes)
        self.requests.append({"ep": "mount_overlay", "input": {"container_id": cid, "layer_paths": paths,
                                                               "target": f"/run/gcs/c/{cid}/rootfs"}})
        self.requests.append({"ep": "create_container", "input": {"container_id": cid, **inp}})

    def _env(self, image: ResolvedImage, props: dict[str, Any]) -> list[str]:
        values: dict[str, str] = {}
        for item in image.config.env or (DEFAULT_PATH,):
            name, _, value = item.partition("=")
            values[name] = value
        for var in props.get("environmentVariables", []):
            # a secure value is a deployment parameter: ACI passes whatever the deployer gave
            values[var["name"]] = var["value"] if "value" in var else "deployer-secret"
        return [f"{k}={v}" for k, v in values.items()] + ACI_ENV

    def _user(self, props: dict[str, Any]) -> tuple[dict[str, str], list[dict[str, str]]]:
        sc = props.get("securityContext", {})
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        user = ROOT if uid is None else {"id": str(uid), "name": f"user{uid}"}
        group = user if gid is None else {"id": str(gid), "name": f"group{gid}"}
        return user, [group]

    def _mounts(self, props: dict[str, Any]) -> list[dict[str, Any]]:
        kinds = {v["name"]: next(k for k in VOLUME_DIRS if k in v) for v in self.props.get("volumes", [])}
        out = []
        for m in props.get("volumeMounts", []):
            kind = kinds[m["name"]]
            ro = m.get("readOnly", False) or kind == "secret"
            out.append({"destination": m["mountPath"], "source": f"{SANDBOX}/tmp/atlas/{VOLUME_DIRS[kind]}/{m['name']}",
                        "type": "bind", "options": ["rbind", "rshared", "ro" if ro else "rw"]})
        out.append({"destination": "/etc/resolv.conf", "source": f"{SANDBOX}/tmp/atlas/resolvconf/x1",
                    "type": "bind", "options": ["rbind", "rshared", "rw"]})
        return out

    def run_group(self) -> list[dict[str, Any]]:
        self._create(_cid(0), [PAUSE_LAYER], {
            "argv": ["/pause"], "env": [DEFAULT_PATH, "TERM=xterm"], "working_dir": "/", "mounts": [], "user": ROOT,
            "groups": [ROOT], "umask": "0022", "privileged": False, "no_new_privileges": False,
            "capabilities": default_caps(False), "seccomp_profile_sha256": ""})
        entries = self.props.get("initContainers", []) + self.props["containers"]
        for n, entry in enumerate(entries, start=1):
            props, image = entry["properties"], self.images[entry["name"]]
            argv = props.get("command") or list(image.config.entrypoint + image.config.cmd)
            if not argv:    # neither the template nor the image names a command: ACI cannot start it
                self.unstartable.append(entry["name"])
                continue
            user, groups = self._user(props)
            privileged = props.get("securityContext", {}).get("privileged", False)
            caps = default_caps(privileged)
            changes = props.get("securityContext", {}).get("capabilities") or {}
            if changes and not privileged:   # the unprivileged set, adjusted as the template asks
                names = set(caps["bounding"])
                names |= {"CAP_" + c.removeprefix("CAP_") for c in changes.get("add", [])}
                names -= {"CAP_" + c.removeprefix("CAP_") for c in changes.get("drop", [])}
                caps = {k: sorted(names) if k in ("bounding", "effective", "permitted") else []
                        for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
            inp = {"argv": argv, "env": self._env(image, props), "working_dir": image.config.working_dir or "/",
                   "mounts": self._mounts(props), "user": user, "groups": groups, "umask": "0022",
                   "privileged": privileged, "no_new_privileges": False, "capabilities": caps,
                   "seccomp_profile_sha256": ""}
            self._create(_cid(n), [layer.root_hash for layer in image.layers], inp)
            self.created[entry["name"]] = {"container_id": _cid(n), **inp}
        for c in self.spec.containers:
            if c.name not in self.created:
                continue
            created = self.created[c.name]
            identity = {k: created[k] for k in ("user", "groups", "umask", "capabilities", "no_new_privileges")}
            for p in c.exec_processes:
                self.requests.append({"ep": "exec_in_container", "input": {
                    "container_id": created["container_id"], "argv": list(p.command), "env": [DEFAULT_PATH],
                    "working_dir": created["working_dir"], **identity}})
            for sig in dict.fromkeys(c.signals):
                self.requests.append({"ep": "signal_container_process", "input": {
                    "container_id": created["container_id"], "signal": int(sig), "is_init": True,
                    "argv": created["argv"]}})
        return self.requests

    def attacks(self) -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
        """(name, setup requests, the attack): each made after the whole sequence, against its first container.
        A create attack gets its own container id with the victim's layers as its overlay, so that only the
        attacked property differs from an allowed create."""
        name, created = next(iter(self.created.items()))
        cid = created["container_id"]
        identity = {k: created[k] for k in ("user", "groups", "umask", "capabilities", "no_new_privileges")}
        layer = self.images[name].layers[0].root_hash
        overlay = next(r["input"] for r in self.requests if r["ep"] == "mount_overlay" and r["input"]["container_id"] == cid)

        def create(n: int, **changes: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            setup = [{"ep": "mount_overlay", "input": {**overlay, "container_id": _cid(n),
                                                       "target": f"/run/gcs/c/{_cid(n)}/rootfs"}}]
            return setup, {"ep": "create_container", "input": {**created, "container_id": _cid(n), **changes}}

        return [
            ("unlisted exec", [], {"ep": "exec_in_container", "input": {
                "container_id": cid, "argv": ["/bin/sh", "-c", "cat /proc/self/environ"], "env": [DEFAULT_PATH],
                "working_dir": created["working_dir"], **identity}}),
            ("tampered layer", [], {"ep": "mount_device", "input": {"target": "/run/mounts/scsi/m90",
                                                                    "device_hash": "ee" * 32}}),
            ("layer at a host-chosen path", [], {"ep": "mount_device", "input": {"target": "/etc",
                                                                                 "device_hash": layer}}),
            ("another command", *create(40, argv=["/bin/sh", "-c", "nc -l -p 4444 -e /bin/sh"])),
            ("a host directory mounted in", *create(41, mounts=[*created["mounts"], {
                "destination": "/host", "source": "/", "type": "bind", "options": ["rbind", "rw"]}])),
            ("privileged", *create(42, privileged=True, capabilities=default_caps(True))),
            ("unencrypted scratch", [], {"ep": "scratch_mount", "input": {"target": "/run/gcs/c/x/scratch",
                                                                          "encrypted": False}}),
            ("stack dump", [], {"ep": "dump_stacks", "input": {}}),
        ]


def replay(ev: Evaluator, rego: str, requests: list[dict[str, Any]], label: str) -> None:
    """Load `rego` and replay ACI's requests: every one must be allowed."""
    assert ev.ask({"rego": rego})["ok"], label
    for req in requests:
        answer = ev.ask(req)
        assert answer["allowed"], f"{label}: {req['ep']} denied: {answer.get('error', '')[:800]}"


def check(ev: Evaluator, rego: str, guest: AciGuest, label: str) -> dict[str, Any]:
    """Load `rego`, replay the sequence (all allowed), then each attack (all denied) on a fresh load."""
    assert ev.ask({"rego": rego})["ok"], label
    verdicts: dict[str, Any] = {"allowed": Counter(), "denied": {}}
    for req in guest.requests:
        answer = ev.ask(req)
        assert answer["allowed"], f"{label}: {req['ep']} denied: {answer.get('error', '')[:800]}"
        verdicts["allowed"][req["ep"]] += 1
        if req["ep"] == "create_container":
            env = req["input"]["env"]
            assert sorted(answer["env_list"]) == sorted(env), f"{label}: ACI dropped variables it needs"
    for name, setup, req in guest.attacks():
        replay(ev, rego, guest.requests + setup, f"{label}, before the attack {name!r}")
        answer = ev.ask(req)
        assert not answer["allowed"], f"{label}: attack allowed: {name}"
        decision = parse_decision(answer["error"])     # ACI's denial, as `policy explain` reads it
        assert decision.rule == req["ep"] and decision.decision == "deny", name
        verdicts["denied"][name] = "; ".join(decision.errors) or "(a policy flag)"
    # an injected LD_PRELOAD is dropped (the policy allows env dropping, as confcom's do)
    assert ev.ask({"rego": rego})["ok"]
    for req in guest.requests:
        if req["ep"] == "create_container" and req["input"]["container_id"] == _cid(1):
            answer = ev.ask({"ep": req["ep"], "input": {**req["input"],
                                                               "env": [*req["input"]["env"], "LD_PRELOAD=/x.so"]}})
            assert answer["allowed"] and "LD_PRELOAD=/x.so" not in answer["env_list"], label
            verdicts["LD_PRELOAD"] = "dropped"
            break
        ev.ask(req)
    verdicts["allowed"] = dict(verdicts["allowed"])
    return verdicts


def test_hello_exported_for_aci_passes_acis_framework(evaluator: Evaluator,  # noqa: F811 - the fixture
                                                        tmp_path: Path) -> None:
    from sandbox.policy.sources import resolve_group_images

    if not (BUSYBOX_LAYOUT / "index.json").exists():
        if shutil.which("make") is None:
            pytest.skip("the example image is not built (make example-images)")
        subprocess.run(["make", "-C", str(REPO), "example-images"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
    spec = dataclasses.replace(load_group(HELLO), layer_format=LayerFormat.aci)
    images = resolve_group_images(spec)
    result = aci_template(spec, images, "myregistry.azurecr.io/hello")
    guest = AciGuest(result.template, images, spec)
    guest.run_group()
    verdicts = check(evaluator, result.rego, guest, "examples/hello")
    assert verdicts["allowed"]["create_container"] == 3 and verdicts["allowed"]["exec_in_container"] == 1
    print(json.dumps({"examples/hello": verdicts, "host_data": result.host_data}, indent=1))


def _sample_images(spec: GroupSpec, confcom: dict[str, dict], no_command: tuple[str, ...] = ()) -> dict[str, ResolvedImage]:
    """Images carrying what confcom recorded for each container (its images are out of reach here); an
    image confcom found no command in gets `no_command`."""
    images = {}
    aci = set(ACI_ENV_RULES)
    for c in spec.init_containers + spec.containers:
        cc = confcom[c.name]
        template_env = {v.name for v in c.env}
        env = tuple(r["pattern"] for r in cc["env_rules"] if r["strategy"] == "string" and r["pattern"] not in aci
                    and r["pattern"].partition("=")[0] not in template_env)
        entrypoint = tuple(cc["command"] or no_command) if c.command is None else ()
        images[c.name] = ResolvedImage(cc.get("id", "example.com/x:1"), "sha256:" + "0" * 64,
                                       ImageConfig(entrypoint=entrypoint, env=env, working_dir=cc["working_dir"]),
                                       tuple(LayerInfo("sha256:" + "1" * 64, "x", 1, h, Path("/x"))
                                             for h in cc["layers"]))
    return images


def _comparable(key: str, value: Any) -> Any:
    """A field as the framework compares it: env rules and capability sets are sets."""
    if key == "env_rules" and value is not None:
        return sorted(json.dumps(r, sort_keys=True) for r in value)
    if key == "capabilities" and value:
        return {k: sorted(v) for k, v in value.items()}
    return value


def raw_writable_share(template: dict[str, Any]) -> bool:
    """The template mounts an azureFile share writable (the share is a read-only `files` volume here)."""
    return any("azureFile" in v and not v["azureFile"].get("readOnly", False)
               for r in template.get("resources", []) for v in (r.get("properties") or {}).get("volumes") or [])


@pytest.mark.skipif(not SAMPLES, reason="set PARMA_SANDBOX_CONFCOM_SAMPLES to a copy of confcom's samples/aci")
def test_confcom_samples_exported_for_aci_pass_acis_framework(evaluator: Evaluator,  # noqa: F811 - the fixture
                                                              tmp_path: Path) -> None:
    assert SAMPLES is not None
    counts: Counter[str] = Counter()
    report: dict[str, Any] = {}
    (tmp_path / "share").mkdir()
    for sample in sorted(p for p in Path(SAMPLES).iterdir() if (p / "arm_template.json").is_file()
                         and (p / "policy.rego").is_file()):
        template = tmp_path / "azuredeploy.json"
        shutil.copy(sample / "arm_template.json", template)
        params = tmp_path / "azuredeploy.parameters.json"
        params.unlink(missing_ok=True)
        if (sample / "parameters.json").is_file():
            shutil.copy(sample / "parameters.json", params)
        raw = json.loads(template.read_text())
        shares = {v["name"]: tmp_path / "share" for r in raw.get("resources", []) if isinstance(r, dict)
                  for v in (r.get("properties") or {}).get("volumes") or [] if "azureFile" in v or "gitRepo" in v}
        text = (sample / "policy.rego").read_text()
        modules = parse_modules(text, str(sample))
        for index, module in enumerate(modules):
            label = f"{sample.name}[{index}]" if len(modules) > 1 else sample.name
            try:
                spec = load_group(template, template_group=str(index) if len(modules) > 1 else None,
                                  volume_paths=shares)
            except InputError as e:     # e.g. placeholder secrets that are not base64: ACI refuses them too
                counts["samples the group reader refuses"] += 1
                report[label] = f"not a group: {e.message[:100]}"
                continue
            theirs = text[module.start:module.end]
            confcom = {c["name"]: c for c in read_policy(module).containers}
            # Field by field, the differences docs/aci.md explains and no other ('Compared with confcom').
            ours_doc = read_policy(parse_modules(aci_template(spec, _sample_images(spec, confcom)).rego)[0])
            theirs_doc = read_policy(module)
            assert (ours_doc.api_version, ours_doc.framework_version, ours_doc.flags) == \
                (theirs_doc.api_version, theirs_doc.framework_version, theirs_doc.flags), label
            assert [{**f, "minimum_svn": "*"} for f in ours_doc.fragments] == \
                [{**f, "minimum_svn": "*"} for f in theirs_doc.fragments], label
            assert {f["minimum_svn"] for f in ours_doc.fragments} == {"4"}
            mine = {c["name"]: c for c in ours_doc.containers}
            assert set(mine) == set(confcom), label
            for name, theirs_c in confcom.items():
                for key in sorted(set(mine[name]) | set(theirs_c)):
                    a, b = _comparable(key, mine[name].get(key)), _comparable(key, theirs_c.get(key))
                    if a == b:
                        continue
                    if key == "id" and str(a).split("@")[0] == str(b).split("@")[0]:
                        counts["fields differing: id (the digest as resolved)"] += 1
                    elif key == "mounts" and [dict(m, options=m["options"][:2]) for m in a] == \
                            [dict(m, options=m["options"][:2]) for m in b] and raw_writable_share(raw):
                        counts["fields differing: mounts (a writable azureFile share is ro here)"] += 1
                    else:
                        pytest.fail(f"{label}: container {name}: {key}: ours {a!r}, confcom's {b!r}")
            # ACI's request sequence. confcom's `"command": null` (an image that names no command) cannot
            # start on ACI; here such an image gets one, so that the rest of the container is checked.
            images = _sample_images(spec, confcom, NO_COMMAND)
            result = aci_template(spec, images)
            guest = AciGuest(result.template, images, spec)
            guest.run_group()
            ours = check(evaluator, result.rego, guest, f"{label} (export aci)")
            # confcom's policy: the same requests, less the creates of containers it pins no command for
            nameless = {guest.created[n]["container_id"] for n, c in confcom.items() if c["command"] is None
                        and n in guest.created}
            same = [r for r in guest.requests if not (r["ep"] == "create_container"
                                                      and r["input"]["container_id"] in nameless)]
            replay(evaluator, theirs, same, f"{label} (confcom's policy.rego)")
            counts["groups"] += 1
            counts["requests allowed by ours"] += len(guest.requests)
            counts["requests allowed by confcom's too"] += len(same)
            counts["attacks denied"] += len(ours["denied"])
            report[label] = {"allowed": ours["allowed"], "attacks denied": len(ours["denied"]),
                             "confcom's policy allows": len(same),
                             **({"command null in confcom's": len(nameless)} if nameless else {})}
    print(json.dumps({"counts": dict(counts), "samples": report}, indent=1))
    assert counts["groups"] >= 10
