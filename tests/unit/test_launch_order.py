"""`up`'s order around the launch self-check: the set-up overlaps it; secrets and containers wait for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.launch.pipeline import Timings, _setup_guest
from sandbox.launch.plan import ContainerPlan, DeviceMount, LaunchPlan
from sandbox.shared.errors import CheckFailed
from sandbox.shared.messages import (
    CreateContainerRequest,
    CreateVolumeRequest,
    MemoryVolumeKind,
)


@dataclass
class _Result:
    root_hash: str = "ab" * 32

    def to_json(self) -> dict[str, Any]:
        return {}


@dataclass
class FakeClient:
    log: list[str] = field(default_factory=list)

    def call(self, request: Any, *, timeout: float | None = None) -> _Result:
        self.log.append(request.op.value + (f":{request.kind.value}" if hasattr(request, "kind") else ""))
        return _Result()


def _plan(*, secret: bool) -> LaunchPlan:
    volumes = [CreateVolumeRequest("scratch", MemoryVolumeKind.tmpfs, size_mib=8)]
    if secret:
        volumes.append(CreateVolumeRequest("keys", MemoryVolumeKind.secret, items={"k": b"v"}))
    create = CreateContainerRequest("web", ("/bin/true",), ())
    return LaunchPlan(layers=(DeviceMount("ab" * 32, Path("/x"), "l0", "/run/parma/layers/l0"),), file_volumes=(),
                      memory_volumes=tuple(volumes),
                      containers=(ContainerPlan("web", ("/run/parma/layers/l0",), create, stdio=False),))


@pytest.mark.parametrize("secret", [False, True])
def test_secrets_and_containers_wait_for_the_self_check(secret: bool) -> None:
    client = FakeClient()

    def verified() -> None:
        client.log.append("VERIFIED")

    _setup_guest(client, b"{}", _plan(secret=secret), Timings(), verified=verified)  # type: ignore[arg-type]
    first_verified = client.log.index("VERIFIED")
    before = client.log[:first_verified]
    assert before[:3] == ["set_policy", "mount_device", "create_volume:tmpfs"]
    assert not any(op.endswith(":secret") or op in ("mount_scratch", "create_container", "start_container")
                   for op in before)
    # The set-up ends by waiting for the self-check; the containers start after it (_start_group).
    assert client.log[-1] == "VERIFIED"


def test_a_failed_self_check_starts_nothing() -> None:
    client = FakeClient()

    def verified() -> None:
        raise CheckFailed("launch self-check failed")

    with pytest.raises(CheckFailed):
        _setup_guest(client, b"{}", _plan(secret=True), Timings(), verified=verified)  # type: ignore[arg-type]
    assert client.log == ["set_policy", "mount_device", "create_volume:tmpfs"]
