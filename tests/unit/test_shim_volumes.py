"""The shim's bind mounts -> policy volumes mapping, kubelet's configMap directories, and pod networking."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from sandbox.group.spec import GroupPort, VolumeKind, VolumeMount, validate_group
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.k8s.manifest import manifests
from sandbox.layers.volumes import write_directory_tar
from sandbox.policy.gen import generate_policy
from sandbox.shared.errors import InputError
from sandbox.shim.bundle import read_bundle
from sandbox.shim.sandbox import port_forwards
from sandbox.shim.volumes import (
    check_bind_sources,
    kubelet_volume_dir,
    launch_volumes,
    pod_volumes,
    volume_binds,
    volume_view,
)

IMAGE = "registry.example/app@sha256:" + "1" * 64
HTTPD = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
# What containerd's default spec gives every container (not volumes: the guest makes its own).
DEFAULT_MOUNTS = [
    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
]


def _site(tmp_path: Path) -> Path:
    www = tmp_path / "site" / "www"
    (www / "img").mkdir(parents=True)
    for d in (www, www / "img"):
        d.chmod(0o755)
    (www / "index.html").write_text("<h1>hello</h1>\n")
    (www / "index.html").chmod(0o644)
    (www / "img" / "a.bin").write_bytes(bytes(range(256)))
    (www / "img" / "a.bin").chmod(0o600)
    return www


def _group(tmp_path: Path) -> dict:
    return {"name": "site", "volumes": [{"name": "www", "files": {"path": str(_site(tmp_path))}},
                                        {"name": "cache", "emptyDir": {}}],
            "containers": [{"name": "web", "image": IMAGE, "command": HTTPD, "ports": [{"port": 8080}],
                            "mounts": [{"name": "www", "mountPath": "/www"}, {"name": "cache", "mountPath": "/cache"}]},
                           {"name": "side", "image": IMAGE, "command": ["/bin/sleep", "1d"],
                            "mounts": [{"name": "cache", "mountPath": "/www"}]}]}


def _policy(tmp_path: Path):
    from sandbox.shared.policy.model import parse_policy

    spec = validate_group(_group(tmp_path))
    layer = LayerInfo("sha256:" + "2" * 64, "application/vnd.oci.image.layer.v1.tar", 10, "3" * 64, Path("/x"))
    image = ResolvedImage(IMAGE, "sha256:" + "4" * 64, ImageConfig(cmd=("sh",), env=("PATH=/bin",)), (layer,))
    raw = generate_policy(spec, {c.name: image for c in spec.containers}, volume_hashes={"www": "5" * 64})
    return spec, raw, parse_policy(raw, "policy")


def _bundle(tmp_path: Path, mounts: list[dict], *, args: list[str] = HTTPD, annotations: dict | None = None,
            namespaces: list[dict] | None = None) -> Path:
    b = tmp_path / f"bundle-{len(list(tmp_path.glob('bundle-*')))}"
    b.mkdir()
    spec = {"process": {"args": args, "env": [], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": DEFAULT_MOUNTS + mounts, "annotations": annotations or {},
            "linux": {"namespaces": namespaces or [{"type": "pid"}, {"type": "network"}]}}
    (b / "config.json").write_text(json.dumps(spec))
    return b


def _bind(source: str, destination: str, *options: str) -> dict:
    return {"destination": destination, "type": "bind", "source": source, "options": ["rbind", *options]}


def test_bundle_mounts_netns_and_ports(tmp_path: Path) -> None:
    oci = read_bundle(_bundle(tmp_path, [_bind("/srv/www", "/www", "ro")], annotations={"io.parma.ports": "8080, 53/UDP,8080/tcp"},
                              namespaces=[{"type": "network", "path": "/var/run/netns/pod1"}]))
    assert oci.netns == "/var/run/netns/pod1"
    assert oci.ports() == ((8080, "tcp"), (53, "udp"))
    www = oci.mounts[-1]
    assert (www.destination, www.source, www.is_bind, www.read_only) == ("/www", "/srv/www", True, True)
    assert not oci.mounts[0].is_bind
    plain = read_bundle(_bundle(tmp_path, []))
    assert plain.netns is None and plain.ports() == ()       # a network namespace without a path: none to join
    with pytest.raises(InputError, match="io.parma.ports"):
        read_bundle(_bundle(tmp_path, [], annotations={"io.parma.ports": "http"})).ports()


def test_binds_map_to_the_policy_volumes_by_destination(tmp_path: Path) -> None:
    _, _, policy = _policy(tmp_path)
    cri = [_bind("/etc/h", "/etc/hosts"), _bind("/r", "/etc/resolv.conf"), _bind("/t", "/dev/termination-log")]
    oci = read_bundle(_bundle(tmp_path, [*cri, _bind("/srv/www", "/www", "ro"), _bind("/k/cache", "/cache")]))
    web = volume_binds(policy, oci, None)          # no CRI name: the policy container with this command
    assert [(b.volume, b.kind, b.source, b.destination) for b in web] == [
        ("www", VolumeKind.files, "/srv/www", "/www"), ("cache", VolumeKind.empty_dir, "/k/cache", "/cache")]
    assert [b.mount for b in web] == [VolumeMount("www", "/www", True), VolumeMount("cache", "/cache", False)]
    # The same destination is another volume in another container: the CRI name decides.
    side = read_bundle(_bundle(tmp_path, [_bind("/k/cache", "/www")], args=["/bin/sleep", "1d"]))
    assert [b.volume for b in volume_binds(policy, side, "side")] == ["cache"]
    assert [b.volume for b in volume_binds(policy, side, None)] == ["cache"]     # by its command
    odd = read_bundle(_bundle(tmp_path, [_bind("/k/cache", "/www")], args=["/bin/true"]))
    with pytest.raises(InputError, match="bind different volumes"):
        volume_binds(policy, odd, None)


@pytest.mark.parametrize(("mount", "message"), [
    (_bind("/home/me", "/data"), "binds host directory /home/me at /data, where the policy binds no volume"),
    ({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": []}, "a tmpfs mount at /scratch"),
    (_bind("/var/run/secrets/kubernetes.io/serviceaccount", "/var/run/secrets/kubernetes.io/serviceaccount"),
     "where the policy binds no volume"),
])
def test_what_the_policy_does_not_describe_is_refused(tmp_path: Path, mount: dict, message: str) -> None:
    _, _, policy = _policy(tmp_path)
    oci = read_bundle(_bundle(tmp_path, [mount]))
    with pytest.raises(InputError, match=message):
        volume_binds(policy, oci, "web")
    with pytest.raises(InputError, match="generated policy describes no volumes"):
        volume_binds(None, read_bundle(_bundle(tmp_path, [_bind("/srv", "/www")])), None)


def _kubelet_configmap(pod_dir: Path, cm: dict, items: list[dict], *, tamper: bool = False) -> Path:
    """What kubelet's atomic writer makes of a configMap volume: the items in a timestamped directory,
    `..data` pointing at it, and a symlink per top-level name."""
    import base64

    content = {k: v.encode() for k, v in cm.get("data", {}).items()}
    content |= {k: base64.b64decode(v) for k, v in cm.get("binaryData", {}).items()}
    ts = pod_dir / "..2025_01_01_00_00_00.000000001"
    for item in items:
        path = ts / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_bytes(content[item["key"]] + (b"<script>evil()</script>" if tamper else b""))
        path.chmod(item["mode"])
    os.symlink(ts.name, pod_dir / "..data")
    for top in sorted({i["path"].split("/")[0] for i in items}):
        os.symlink(f"..data/{top}", pod_dir / top)
    return pod_dir


def _tar(d: Path) -> bytes:
    out = io.BytesIO()
    write_directory_tar(d, out)
    return out.getvalue()


def test_a_configmap_in_kubelets_layout_packages_as_the_groups_directory(tmp_path: Path) -> None:
    """export k8s -> ConfigMap -> kubelet's directory -> the shim's view: the same archive, so the same
    dm-verity root hash the policy pins; changed content gives another, which the guest denies."""
    spec, raw, policy = _policy(tmp_path)
    cm, *_ = manifests(spec, raw)
    items = next(v for v in manifests(spec, raw)[-1]["spec"]["volumes"] if v["name"] == "www")["configMap"]["items"]
    uid = "0b5c6f2e-1111-4222-8333-444455556666"
    kubelet = tmp_path / "kubelet"
    d = kubelet_volume_dir(str(kubelet), uid, "www")
    d.mkdir(parents=True)
    _kubelet_configmap(d, cm, items)
    view = volume_view(d, tmp_path / "staging" / "www")
    assert _tar(view) == _tar(_site(tmp_path / "again"))
    assert volume_view(_site(tmp_path / "plain"), tmp_path / "unused") == tmp_path / "plain" / "site" / "www"
    bad = tmp_path / "bad"
    bad.mkdir()
    _kubelet_configmap(bad, cm, items, tamper=True)
    assert _tar(volume_view(bad, tmp_path / "staging" / "bad")) != _tar(view)
    # A pod's volumes at its sandbox's launch: every volume the policy lists.
    vols = pod_volumes(policy, str(kubelet), uid, tmp_path / "stage2")
    assert [(v.name, v.kind) for v in vols] == [("www", VolumeKind.files), ("cache", VolumeKind.empty_dir)]
    assert _tar(vols[0].source) == _tar(view) and vols[1].source is None
    with pytest.raises(InputError, match="sandbox-uid"):
        pod_volumes(policy, str(kubelet), None, tmp_path / "stage3")
    with pytest.raises(InputError, match="kubelet's directory .* does not exist"):
        pod_volumes(policy, str(kubelet), "other-uid", tmp_path / "stage3")


def test_launch_volumes_and_later_binds(tmp_path: Path) -> None:
    _, _, policy = _policy(tmp_path)
    www = tmp_path / "site" / "www"
    oci = read_bundle(_bundle(tmp_path, [_bind(str(www), "/www", "ro"), _bind("/k/cache", "/cache")]))
    binds = volume_binds(policy, oci, "web")
    vols = launch_volumes(binds, tmp_path / "staging")
    assert [(v.name, v.kind, v.source) for v in vols] == [("www", VolumeKind.files, www), ("cache", VolumeKind.empty_dir, None)]
    check_bind_sources(binds, {"www": str(www)})
    with pytest.raises(InputError, match="whose device the sandbox was launched with"):
        check_bind_sources(binds, {"www": "/elsewhere"})


def test_ports_are_forwarded_only_inside_a_named_network_namespace() -> None:
    assert port_forwards(None, ((8080, "tcp"),)) == ()
    assert port_forwards("/var/run/netns/p", ((8080, "tcp"), (53, "udp"))) == (
        GroupPort(8080, 8080, "TCP", "0.0.0.0"), GroupPort(53, 53, "UDP", "0.0.0.0"))


def test_qemu_joins_the_network_namespace_by_nsenter(tmp_path: Path) -> None:
    from dataclasses import replace

    from sandbox.vmm.config import Accel, Tee, VmConfig
    from sandbox.vmm.qemu import build_argv

    cfg = VmConfig(name="n", tee=Tee.emulated, accel=Accel.tcg, vcpus=1, memory_mib=256, kernel=tmp_path / "k",
                   cmdline="", disks=(), agent_sockets=(), console_log=tmp_path / "c", qmp_socket=tmp_path / "q")
    plain = build_argv(cfg)
    assert plain[0] == "qemu-system-x86_64"
    assert build_argv(replace(cfg, netns=Path("/var/run/netns/p"))) == ["nsenter", "--net=/var/run/netns/p", "--", *plain]
