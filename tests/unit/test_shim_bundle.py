"""The shim's inputs: Go-style flags, the bundle's OCI spec and annotations, the node config, names."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from sandbox.shared.errors import InputError
from sandbox.shim.bundle import NodeConfig, load_node_config, read_bundle
from sandbox.shim.main import UsageError, parse_flags, socket_address
from sandbox.shim.sandbox import guest_container_id, sandbox_name


def test_flags_as_containerd_passes_them() -> None:
    f = parse_flags(["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock", "-publish-binary",
                     "/usr/bin/containerd", "-id", "abc", "-debug", "start"])
    assert (f.namespace, f.address, f.id, f.debug, f.action) == ("k8s.io", "/run/containerd/containerd.sock",
                                                                 "abc", True, "start")
    f = parse_flags(["--namespace=default", "-id", "x", "-bundle", "/b", "delete"])
    assert (f.namespace, f.bundle, f.action) == ("default", "/b", "delete")
    assert parse_flags(["-namespace", "n", "-socket-fd", "3"]).action == ""
    with pytest.raises(UsageError, match="not defined"):
        parse_flags(["-bogus", "start"])
    with pytest.raises(UsageError, match="needs an argument"):
        parse_flags(["-id"])
    with pytest.raises(UsageError, match="unexpected"):
        parse_flags(["start", "extra"])


def test_socket_address_is_per_containerd_namespace_and_sandbox() -> None:
    node = NodeConfig(socket_dir="/run/containerd/s")
    a = socket_address(node, "/run/containerd/containerd.sock", "k8s.io", "pod1")
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod1").hexdigest()[:32]
    assert a == f"unix:///run/containerd/s/{digest}"
    assert a != socket_address(node, "/run/containerd/containerd.sock", "default", "pod1")
    assert len(a.removeprefix("unix://")) < 107


def _bundle(tmp_path: Path, annotations: dict[str, str], **process: object) -> Path:
    spec = {"ociVersion": "1.0.2", "process": {"args": ["/bin/sh", "-c", "echo hi"], "env": ["PATH=/bin", "A=1"],
                                               "cwd": "/work", "user": {"uid": 65534, "gid": 65534}, **process},
            "annotations": annotations}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return tmp_path


def test_bundle_of_a_plain_ctr_container(tmp_path: Path) -> None:
    policy = b'{"x":1}'
    oci = read_bundle(_bundle(tmp_path, {"io.parma.policy": base64.b64encode(policy).decode(),
                                         "io.parma.image": "oci:/img:latest"}))
    assert not oci.is_pod_sandbox and oci.sandbox_id("ctr1") == "ctr1"
    assert oci.policy() == policy and oci.image() == "oci:/img:latest"
    c = oci.group_container("main", oci.image())
    assert c.command == ("/bin/sh", "-c", "echo hi") and c.args == ()   # no image CMD is appended
    assert [(e.name, e.value) for e in c.env] == [("PATH", "/bin"), ("A", "1")]
    assert (c.working_dir, c.user) == ("/work", "65534:65534")


def test_bundle_of_cri_containers(tmp_path: Path) -> None:
    sandbox = read_bundle(_bundle(tmp_path, {"io.kubernetes.cri.container-type": "sandbox",
                                             "io.kubernetes.cri.sandbox-id": "pod1", "io.parma.vcpus": "2"}))
    assert sandbox.is_pod_sandbox and sandbox.sandbox_id("pod1") == "pod1"
    assert sandbox.uvm_size(NodeConfig(memory_mib=384)) == (2, 384)
    app = read_bundle(_bundle(tmp_path, {"io.kubernetes.cri.container-type": "container",
                                         "io.kubernetes.cri.sandbox-id": "pod1",
                                         "io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36"}))
    assert not app.is_pod_sandbox and app.sandbox_id("c9") == "pod1"
    assert app.image() == "docker.io/library/busybox:1.36" and app.policy() is None


def test_bad_annotations_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not valid base64"):
        read_bundle(_bundle(tmp_path, {"io.parma.policy": "%%%"})).policy()
    good = base64.b64encode(b"{}").decode()
    with pytest.raises(InputError, match="hashes to 44136fa3"):
        read_bundle(_bundle(tmp_path, {"io.parma.policy": good, "io.parma.policy-sha256": "00" * 32})).policy()
    ok = read_bundle(_bundle(tmp_path, {"io.parma.policy": good,
                                        "io.parma.policy-sha256": hashlib.sha256(b"{}").hexdigest()}))
    assert ok.policy() == b"{}"
    with pytest.raises(InputError, match="io.parma.memory-mib"):
        read_bundle(_bundle(tmp_path, {"io.parma.memory-mib": "lots"})).uvm_size(NodeConfig())
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(InputError, match="not a JSON object"):
        read_bundle(tmp_path)


def test_node_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARMA_SANDBOX_SHIM_CONFIG", raising=False)
    assert load_node_config(None) == NodeConfig() or Path("/etc/parma-sandbox/shim.toml").exists()
    cfg = tmp_path / "shim.toml"
    cfg.write_text('allow_generated_policy = true\ntee = "emulated"\nmemory_mib = 256\n')
    node = load_node_config(str(cfg))
    assert node.allow_generated_policy and node.tee == "emulated" and node.memory_mib == 256
    assert node.path == str(cfg) and node.vcpus == 1
    monkeypatch.setenv("PARMA_SANDBOX_SHIM_CONFIG", str(cfg))
    assert load_node_config(None).memory_mib == 256
    cfg.write_text("memory_mib = '256'\n")
    with pytest.raises(InputError, match="memory_mib must be a int"):
        load_node_config(str(cfg))
    cfg.write_text("colour = 1\n")
    with pytest.raises(InputError, match="unknown key"):
        load_node_config(str(cfg))
    cfg.write_text('tee = "tdx"\n')
    with pytest.raises(InputError, match="tee must be one of"):
        load_node_config(str(cfg))
    with pytest.raises(InputError, match="does not exist"):
        load_node_config(str(tmp_path / "absent.toml"))


def test_names_fit_the_state_store_and_the_agent() -> None:
    name = sandbox_name("k8s.io", "f" * 64)
    assert len(name) <= 63 and name.startswith("ctrd-") and name == sandbox_name("k8s.io", "f" * 64)
    assert name != sandbox_name("default", "f" * 64)
    assert sandbox_name("default", "My_Test.1").startswith("ctrd-my-test-1-")
    assert guest_container_id("abc-1") == "abc-1"
    assert guest_container_id("a" * 64) == "a" * 64
    upper = guest_container_id("MyContainer")
    assert upper.startswith("c-") and upper == upper.lower()
    assert guest_container_id("x" * 70) != guest_container_id("x" * 71)


def test_cri_hostname_is_left_out_unless_the_policy_expects_it(tmp_path: Path) -> None:
    from sandbox.shared.policy.model import EnvRule, Strategy
    from sandbox.shim.sandbox import cri_env_to_drop

    class _C:
        def __init__(self, name: str, patterns: list[str]) -> None:
            self.name = name
            self.env_rules = tuple(EnvRule(p, Strategy.string) for p in patterns)

    class _P:
        containers = (_C("app", ["PATH=/bin"]), _C("named", ["HOSTNAME=web-0"]))

    assert cri_env_to_drop(None, "app") == frozenset()
    assert cri_env_to_drop(_P(), "app") == {"HOSTNAME"}          # type: ignore[arg-type]
    assert cri_env_to_drop(_P(), "named") == frozenset()          # type: ignore[arg-type]
    oci = read_bundle(_bundle(tmp_path, {}, env=["PATH=/bin", "HOSTNAME=pod-1"]))
    c = oci.group_container("app", "img", drop_env=frozenset({"HOSTNAME"}))
    assert [(e.name, e.value) for e in c.env] == [("PATH", "/bin")]
