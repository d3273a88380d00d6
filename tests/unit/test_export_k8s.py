"""`parma-sandbox export k8s`: a group as a Pod/Deployment with runtimeClassName parma and the policy."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from sandbox.group.spec import validate_group
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.k8s.manifest import Kind, manifests, with_registry_images
from sandbox.policy.gen import generate_policy
from sandbox.shared.errors import InputError
from tests.clirun import run_cli
from tests.imagefixtures import oci_image

IMAGE = "registry.example/app@sha256:" + "1" * 64
GROUP = {
    "name": "web", "resources": {"vcpus": 2, "memoryMiB": 768},
    "containers": [
        {"name": "app", "image": IMAGE, "command": ["/bin/httpd", "-f"], "args": ["-p", "8080"],
         "env": [{"name": "MODE", "value": "on"}, {"name": "TOKEN", "secureValue": "s3cret"}],
         "workingDir": "/srv", "ports": [{"port": 8080}], "user": "65534:65534",
         "execProcesses": [{"command": ["/bin/cat", "/etc/hostname"]}], "capabilities": {"drop": ["NET_RAW"]}},
        {"name": "side", "image": IMAGE, "privileged": True},
    ],
}


def _policy(spec) -> bytes:
    layer = LayerInfo("sha256:" + "2" * 64, "application/vnd.oci.image.layer.v1.tar", 10, "3" * 64, Path("/x"))
    image = ResolvedImage(IMAGE, "sha256:" + "4" * 64, ImageConfig(cmd=("sh",), env=("PATH=/bin",)), (layer,))
    return generate_policy(spec, {c.name: image for c in spec.init_containers + spec.containers},
                           volume_hashes={v.name: "5" * 64 for v in spec.volumes if v.source is not None})


def test_pod_carries_runtime_class_policy_and_the_group() -> None:
    spec = validate_group(GROUP)
    policy = _policy(spec)
    secret, pod = manifests(spec, policy)
    assert pod["kind"] == "Pod" and pod["spec"]["runtimeClassName"] == "parma"
    ann = pod["metadata"]["annotations"]
    assert base64.b64decode(ann["io.parma.policy"]) == policy
    assert ann["io.parma.policy-sha256"] == hashlib.sha256(policy).hexdigest()
    assert (ann["io.parma.vcpus"], ann["io.parma.memory-mib"]) == ("2", "768")
    assert pod["spec"]["enableServiceLinks"] is False
    app, side = pod["spec"]["containers"]
    assert app["command"] == ["/bin/httpd", "-f"] and app["args"] == ["-p", "8080"]
    assert app["workingDir"] == "/srv" and app["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert app["env"][0] == {"name": "MODE", "value": "on"}
    assert app["env"][1]["valueFrom"]["secretKeyRef"] == {"name": "web-secure-env", "key": "TOKEN"}
    assert app["securityContext"] == {"runAsUser": 65534, "runAsGroup": 65534,
                                      "capabilities": {"drop": ["NET_RAW"]}}
    assert side == {"name": "side", "image": IMAGE, "securityContext": {"privileged": True}}
    assert secret["kind"] == "Secret" and base64.b64decode(secret["data"]["TOKEN"]) == b"s3cret"
    assert "s3cret" not in json.dumps(pod)


def test_deployment_template_carries_the_annotations() -> None:
    spec = validate_group({**GROUP, "containers": [GROUP["containers"][1]]})
    (deploy,) = manifests(spec, _policy(spec), kind=Kind.deployment, namespace="conf", replicas=3)
    assert deploy["apiVersion"] == "apps/v1" and deploy["metadata"]["namespace"] == "conf"
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["selector"]["matchLabels"] == deploy["spec"]["template"]["metadata"]["labels"]
    assert "io.parma.policy" in deploy["spec"]["template"]["metadata"]["annotations"]
    assert deploy["spec"]["template"]["spec"]["runtimeClassName"] == "parma"


@pytest.mark.parametrize(("change", "message"), [
    ({"image": "oci:/tmp/img:latest"}, "exists only on this machine"),
    ({"user": "nobody"}, "runs containers only as numeric ids"),
])
def test_what_a_pod_cannot_run_is_refused(change: dict, message: str) -> None:
    spec = validate_group({"name": "g", "containers": [{**GROUP["containers"][1], **change}]})
    with pytest.raises(InputError, match=message):
        manifests(spec, b"{}")


def _www(tmp_path: Path) -> Path:
    www = tmp_path / "www"
    (www / "sub").mkdir(parents=True)
    www.chmod(0o755)
    (www / "sub").chmod(0o755)
    (www / "index.html").write_text("<h1>hi</h1>\n")
    (www / "index.html").chmod(0o644)
    (www / "sub" / "logo.bin").write_bytes(b"\x89PNG\xff\x00")
    (www / "sub" / "logo.bin").chmod(0o600)
    return www


def _vol_group(tmp_path: Path, **extra: object) -> dict:
    return {"name": "site", "ports": [{"port": 8080, "hostPort": 18080}],
            "volumes": [{"name": "www", "files": {"path": str(_www(tmp_path))}}, {"name": "cache", "emptyDir": {}},
                        {"name": "fast", "tmpfs": {"sizeMiB": 16}}],
            "containers": [{"name": "web", "image": IMAGE, "ports": [{"port": 8080}],
                            "mounts": [{"name": "www", "mountPath": "/www"},
                                       {"name": "cache", "mountPath": "/cache"},
                                       {"name": "fast", "mountPath": "/fast", "readOnly": True}]},
                           {"name": "probe", "image": IMAGE, "ports": [{"port": 9090, "protocol": "UDP"}]}],
            **extra}


def test_files_volume_is_a_configmap_with_each_files_path_and_mode(tmp_path: Path) -> None:
    spec = validate_group(_vol_group(tmp_path))
    cm, pod = manifests(spec, _policy(spec), namespace="conf")
    assert cm["kind"] == "ConfigMap" and cm["metadata"] == {"name": "site-www", "namespace": "conf"}
    assert cm["data"] == {"index.html": "<h1>hi</h1>\n"}
    assert {k: base64.b64decode(v) for k, v in cm["binaryData"].items()} == {"sub.logo.bin": b"\x89PNG\xff\x00"}
    www, cache, fast = pod["spec"]["volumes"]
    assert www == {"name": "www", "configMap": {"name": "site-www", "items": [
        {"key": "index.html", "path": "index.html", "mode": 0o644},
        {"key": "sub.logo.bin", "path": "sub/logo.bin", "mode": 0o600}]}}
    assert cache == {"name": "cache", "emptyDir": {}}
    assert fast == {"name": "fast", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}
    web = pod["spec"]["containers"][0]
    assert web["volumeMounts"] == [{"name": "www", "mountPath": "/www", "readOnly": True},     # files: always ro
                                   {"name": "cache", "mountPath": "/cache", "readOnly": False},
                                   {"name": "fast", "mountPath": "/fast", "readOnly": True}]


def test_ports_host_ports_and_the_ports_annotation(tmp_path: Path) -> None:
    spec = validate_group(_vol_group(tmp_path))
    *_, pod = manifests(spec, _policy(spec))
    web, probe = pod["spec"]["containers"]
    # kubelet's CNI portmap takes the node's hostIP:hostPort to the pod IP, as `up` takes 127.0.0.1:18080 to the group
    assert web["ports"] == [{"containerPort": 8080, "protocol": "TCP", "hostPort": 18080, "hostIP": "127.0.0.1"}]
    assert probe["ports"] == [{"containerPort": 9090, "protocol": "UDP"}]
    assert pod["metadata"]["annotations"]["io.parma.ports"] == "8080/tcp,9090/udp"
    everywhere = validate_group(_vol_group(tmp_path / "b", ports=[{"port": 8080, "hostPort": 80, "hostAddress": "0.0.0.0"}]))
    *_, pod = manifests(everywhere, _policy(everywhere))
    assert pod["spec"]["containers"][0]["ports"][0] == {"containerPort": 8080, "protocol": "TCP", "hostPort": 80}
    alone = validate_group({"name": "g", "ports": [{"port": 80, "hostPort": 8080}], "containers": [{"name": "a", "image": IMAGE}]})
    with pytest.raises(InputError, match="which no container lists") as e:
        manifests(alone, b"{}")
    assert '{"port": 80}' in (e.value.hint or "")


@pytest.mark.parametrize(("change", "message"), [
    (lambda www: (www / "link").symlink_to("index.html"), "is a symlink, which a ConfigMap cannot hold"),
    (lambda www: (www / "sub").chmod(0o700), "has mode 0700; kubelet makes"),
    (lambda www: (www / "empty").mkdir(), "is empty"),
    (lambda www: (www / "big").write_bytes(b"x" * (1 << 20)), "a ConfigMap holds at most"),
])
def test_files_a_configmap_cannot_reproduce_are_refused(tmp_path: Path, change, message: str) -> None:
    raw = _vol_group(tmp_path)
    change(tmp_path / "www")
    with pytest.raises(InputError, match=message):
        manifests(validate_group(raw), b"{}")


def test_secret_volumes_are_refused(tmp_path: Path) -> None:
    raw = {"name": "g", "volumes": [{"name": "s", "secret": {"k": "dg=="}}],
           "containers": [{"name": "a", "image": IMAGE, "mounts": [{"name": "s", "mountPath": "/s"}]}]}
    with pytest.raises(InputError, match="secret volume 's' is not given to pods yet"):
        manifests(validate_group(raw), b"{}")


def test_restart_policy_and_init_containers_reach_the_pod() -> None:
    spec = validate_group({**GROUP, "restartPolicy": "OnFailure", "containers": [GROUP["containers"][1]]})
    (pod,) = manifests(spec, _policy(spec))
    assert pod["spec"]["restartPolicy"] == "OnFailure"
    with pytest.raises(InputError, match="always restart") as e:
        manifests(spec, _policy(spec), kind=Kind.deployment)
    assert "--kind pod" in (e.value.hint or "")
    always = validate_group({**GROUP, "containers": [GROUP["containers"][1]]})
    (deploy,) = manifests(always, _policy(always), kind=Kind.deployment)
    assert "restartPolicy" not in deploy["spec"]["template"]["spec"]     # the API's default, Always
    init = validate_group({**GROUP, "initContainers": [{"name": "seed", "image": IMAGE, "command": ["/seed"]}]})
    policy = _policy(init)
    (_, pod) = manifests(init, policy)
    assert pod["spec"]["initContainers"] == [{"name": "seed", "image": IMAGE, "command": ["/seed"]}]
    assert [c["name"] for c in json.loads(policy)["containers"]] == ["seed", "app", "side"]   # the policy lists it


def test_yaml_reads_back_as_the_same_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = validate_group(GROUP)
    policy = _policy(spec)
    (tmp_path / "policy.json").write_bytes(policy)
    (tmp_path / "group.json").write_text(json.dumps(GROUP))
    code, stdout, stderr = run_cli(["export", "k8s", str(tmp_path / "group.json"), "--policy",
                                    str(tmp_path / "policy.json")], capsys)
    assert code == 0, stderr
    assert list(yaml.safe_load_all(stdout)) == manifests(spec, policy)


def test_cli_with_a_policy_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = validate_group(GROUP)
    policy = _policy(spec)
    (tmp_path / "policy.json").write_bytes(policy)
    (tmp_path / "group.json").write_text(json.dumps(GROUP))
    out = tmp_path / "pod.yaml"
    code, stdout, stderr = run_cli(["export", "k8s", str(tmp_path / "group.json"), "--policy",
                                    str(tmp_path / "policy.json"), "-o", str(out)], capsys)
    assert code == 0, stderr
    assert hashlib.sha256(policy).hexdigest() in stdout
    assert "kubectl exec may run only: app: /bin/cat /etc/hostname" in stderr
    text = out.read_text()
    assert "runtimeClassName: parma" in text and base64.b64encode(policy).decode() in text


def test_cli_refuses_a_policy_for_other_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = validate_group({**GROUP, "containers": [{**GROUP["containers"][1], "image": "registry.example/x:1"}]})
    layer = LayerInfo("sha256:" + "2" * 64, "application/vnd.oci.image.layer.v1.tar", 10, "3" * 64, Path("/x"))
    image = ResolvedImage("x", "sha256:" + "4" * 64, ImageConfig(cmd=("sh",)), (layer,))
    (tmp_path / "policy.json").write_bytes(generate_policy(other, {"side": image}))
    (tmp_path / "group.json").write_text(json.dumps(GROUP))
    code, _, stderr = run_cli(["export", "k8s", str(tmp_path / "group.json"), "--policy",
                               str(tmp_path / "policy.json")], capsys)
    assert code == 2 and "the policy lists no container with image" in stderr


def test_registry_names_local_images_and_pins_the_policy_to_them(
        isolated_dirs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built = oci_image(isolated_dirs / "images" / "app", tag="v1")
    group = {"name": "g", "containers": [
        {"name": "app", "image": "oci:images/app:v1", "command": ["/bin/tool"]},
        {"name": "tool", "image": "oci:images/app:v1", "command": ["/bin/tool", "x"]}]}
    (isolated_dirs / "group.json").write_text(json.dumps(group))
    code, _, stderr = run_cli(["export", "k8s", str(isolated_dirs / "group.json")], capsys)
    assert code == 2 and "exists only on this machine" in stderr and "--registry" in stderr

    code, stdout, stderr = run_cli(["export", "k8s", str(isolated_dirs / "group.json"),
                                    "--registry", "registry.example/team/"], capsys)
    assert code == 0, stderr
    pod = list(yaml.safe_load_all(stdout))[-1]
    pinned = f"registry.example/team/app@{built.manifest_digest}"
    assert [c["image"] for c in pod["spec"]["containers"]] == [pinned, pinned]
    policy = json.loads(base64.b64decode(pod["metadata"]["annotations"]["io.parma.policy"]))
    # the shim matches a pod's containers with the policy's ids: they are the manifest's references
    assert [c["id"] for c in policy["containers"]] == [pinned, pinned]
    assert all(len(c["layers"]) == 3 for c in policy["containers"])


def test_registry_pins_registry_images_by_digest() -> None:
    spec = validate_group(GROUP)
    layer = LayerInfo("sha256:" + "2" * 64, "application/vnd.oci.image.layer.v1.tar", 10, "3" * 64, Path("/x"))
    image = ResolvedImage("registry.example/app:1.2", "sha256:" + "4" * 64, ImageConfig(), (layer,))
    pinned = with_registry_images(spec, {"app": image, "side": image}, "unused.example/x")
    assert {c.image for c in pinned.containers} == {"registry.example/app@sha256:" + "4" * 64}


def test_with_registry_what_a_pod_cannot_run_is_refused_before_any_image_is_read(
        isolated_dirs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    group = {"name": "g", "containers": [{"name": "app", "image": "oci:images/absent:v1", "user": "nobody"}]}
    (isolated_dirs / "group.json").write_text(json.dumps(group))
    code, _, stderr = run_cli(["export", "k8s", str(isolated_dirs / "group.json"),
                               "--registry", "registry.example/team"], capsys)
    assert code == 2 and "runs containers only as numeric ids" in stderr   # not "is not a directory"
