"""What `up` asks the agent for, derived from the group spec and the images (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.group import validate_group
from sandbox.group.spec import TeeMode
from sandbox.hostcheck import Accel, CheckReport, Tee
from sandbox.images.model import ImageConfig, LayerInfo, ResolvedImage
from sandbox.launch.pipeline import choose_tee
from sandbox.launch.plan import build_plan
from sandbox.shared.errors import CheckFailed
from sandbox.shared.policy import defaults


def layer(n: int) -> LayerInfo:
    return LayerInfo(f"sha256:{n:064x}", "application/vnd.oci.image.layer.v1.tar", 10, f"{n:064x}",
                     Path(f"/cache/l{n}.img"))


def image(*layers: int, **config: object) -> ResolvedImage:
    return ResolvedImage("img", "sha256:" + "0" * 64, ImageConfig(**config), tuple(layer(n) for n in layers))


def group(tmp_path: Path) -> object:
    (tmp_path / "www").mkdir()
    raw = {
        "name": "hello",
        "volumes": [{"name": "www", "files": {"path": "www"}}, {"name": "scratch", "emptyDir": {}},
                    {"name": "cfg", "secret": {"token": "aGVsbG8="}}],
        "containers": [
            {"name": "web", "image": "busybox", "command": ["/bin/httpd", "-f"],
             "env": [{"name": "GREETING", "value": "hi"}, {"name": "PATH", "value": "/bin"}],
             "mounts": [{"name": "www", "mountPath": "/www"}, {"name": "scratch", "mountPath": "/s"}],
             "capabilities": {"drop": ["NET_RAW"], "add": ["SYS_TIME"]}},
            {"name": "probe", "image": "busybox", "args": ["sleep", "1"], "user": "65534:65534",
             "mounts": [{"name": "cfg", "mountPath": "/cfg"}], "execProcesses": [{"command": ["/bin/cat"]}]},
        ],
    }
    return validate_group(raw, base_dir=tmp_path)


def test_plan_dedupes_layers_orders_them_top_first_and_maps_volumes(tmp_path: Path) -> None:
    spec = group(tmp_path)
    web = image(1, 2, entrypoint=("/bin/sh",), cmd=("-c", "x"), env=("PATH=/usr/bin", "HOME=/root"))
    probe = image(1, 3, entrypoint=(), cmd=("/bin/true",), working_dir="/tmp", user="1:1")
    plan = build_plan(spec, {"web": web, "probe": probe}, {"www": ("ab" * 32, Path("/cache/www.img"))})
    assert [(d.serial, d.target) for d in plan.layers] == [
        ("L0", "/run/parma/layers/l0"), ("L1", "/run/parma/layers/l1"), ("L2", "/run/parma/layers/l2")]
    assert [(d.serial, d.target, d.root_hash) for d in plan.file_volumes] == [
        ("V0", "/run/parma/volumes/www", "ab" * 32)]
    assert [v.to_json() for v in plan.memory_volumes] == [
        {"name": "scratch", "kind": "emptyDir"}, {"name": "cfg", "kind": "secret", "items": {"token": "aGVsbG8="}}]
    w, p = plan.containers
    wc, pc = w.create.to_json(), p.create.to_json()   # the create_container payloads, as sent
    assert w.layer_targets == ("/run/parma/layers/l1", "/run/parma/layers/l0")
    assert p.layer_targets == ("/run/parma/layers/l2", "/run/parma/layers/l0")
    # command replaces ENTRYPOINT and drops the image CMD; group env overrides image env in place.
    assert wc["argv"] == ["/bin/httpd", "-f"]
    assert wc["env"] == ["PATH=/bin", "HOME=/root", "GREETING=hi"]
    assert wc["working_dir"] == "/" and wc["user"] == ""
    opts = list(defaults.VOLUME_BIND_OPTIONS)
    assert wc["mounts"] == [
        {"destination": "/www", "source": "/run/parma/volumes/www", "type": "bind", "options": opts + ["ro"]},
        {"destination": "/s", "source": "/run/parma/volumes/scratch", "type": "bind", "options": opts + ["rw"]}]
    caps = wc["capabilities"]
    assert "CAP_SYS_TIME" in caps["bounding"] and "CAP_NET_RAW" not in caps["bounding"]
    assert caps["ambient"] == [] and caps["inheritable"] == []
    # args replace CMD; the image has no PATH, so the default one is added.
    assert pc["argv"] == ["sleep", "1"]
    assert pc["env"][0].startswith("PATH=/usr/local/sbin")
    assert pc["working_dir"] == "/tmp" and pc["user"] == "65534:65534"
    assert pc["mounts"][0]["options"][-1] == "ro"
    assert p.exec_processes == (("/bin/cat",),)


def report(tee: Tee, accel: Accel) -> CheckReport:
    return CheckReport(items=(), tee=tee, accel=accel, reasons=("KVM unusable",) if accel == Accel.tcg else ())


def test_choose_tee() -> None:
    assert choose_tee(TeeMode.auto, report(Tee.emulated, Accel.tcg))[:2] == (Tee.emulated, Accel.tcg)
    assert "auto -> emulated with tcg (KVM unusable)" in choose_tee(TeeMode.auto, report(Tee.emulated, Accel.tcg))[2]
    assert choose_tee(TeeMode.auto, report(Tee.sev_snp, Accel.kvm))[:2] == (Tee.sev_snp, Accel.kvm)
    assert choose_tee(TeeMode.emulated, report(Tee.sev_snp, Accel.kvm))[:2] == (Tee.emulated, Accel.kvm)
    with pytest.raises(CheckFailed, match="SEV-SNP was requested"):
        choose_tee(TeeMode.sev_snp, report(Tee.emulated, Accel.tcg))




def test_resolved_images_beyond_256_disks_are_refused_with_the_numbers(tmp_path: Path, monkeypatch) -> None:
    """Registry images are counted once pulled: up and policy gen both resolve through resolve_images."""
    from sandbox.group.jsonio import ValidationError
    from sandbox.images import resolve
    from sandbox.policy.sources import resolve_group_images as resolve_images

    pulled = {"big:1": image(*range(1, 201)), "big:2": image(*range(150, 260))}
    monkeypatch.setattr(resolve, "resolve_image", lambda ref, **kw: pulled[ref])
    raw = {"name": "big", "containers": [{"name": "a", "image": "big:1"}],
           "initContainers": [{"name": "b", "image": "big:2"}]}
    with pytest.raises(ValidationError) as e:
        resolve_images(validate_group(raw, base_dir=tmp_path))
    assert e.value.problems == ["the group needs 259 layer and volume disks (259 distinct image layers, 0 files "
                                "volumes); at most 256 can be attached"]
    pulled["big:2"] = image(*range(150, 257))
    assert len(resolve_images(validate_group(raw, base_dir=tmp_path))) == 2      # 256 fit


def test_plan_carries_the_groups_names_dns_scratch_and_init_containers(tmp_path: Path) -> None:
    from sandbox.launch.pipeline import dns_override

    raw = {"name": "shop", "restartPolicy": "OnFailure", "resources": {"scratchGiB": 2},
           "dnsConfig": {"nameServers": ["192.0.2.53"], "searchDomains": "corp.example", "options": "ndots:2"},
           "initContainers": [{"name": "migrate", "image": "busybox", "command": ["/bin/true"]}],
           "containers": [{"name": "web", "image": "busybox", "command": ["/bin/httpd"]}]}
    spec = validate_group(raw, base_dir=tmp_path)
    plan = build_plan(spec, {"migrate": image(1), "web": image(1, 2)}, {})
    assert [c.name for c in plan.all_containers] == ["migrate", "web"] and plan.init_containers[0].init
    assert plan.layers[0].serial == "L0" and len(plan.layers) == 2        # init containers' layers too
    assert plan.scratch_gib == 2 and plan.containers[0].scratch.encrypted
    assert plan.restart_policy.value == "OnFailure"
    assert plan.network is not None and plan.network.to_json() == {
        "hostname": "shop", "names": ["migrate", "web"],
        "dns": {"nameservers": ["192.0.2.53"], "search": ["corp.example"], "options": ["ndots:2"]}}
    # up --dns-server: the relay in slirp's network, over TCP; the group's search domains and options stay.
    dns = dns_override(plan, ("127.0.0.1", 5353)).network.dns
    assert (dns.nameservers, dns.search, dns.options) == (("10.0.2.53",), ("corp.example",), ("ndots:2", "use-vc"))
    # No scratch disk: writable layers in memory, asked for as unencrypted.
    raw["resources"] = {"scratchGiB": 0}
    raw["policy"] = {"allowUnencryptedScratch": True}
    plan = build_plan(validate_group(raw, base_dir=tmp_path), {"migrate": image(1), "web": image(1, 2)}, {})
    assert plan.scratch_gib == 0 and not plan.containers[0].scratch.encrypted
