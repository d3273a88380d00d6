"""The vm tier boots the project's UVM. On a clean machine the first test that needs it builds it (kernel,
rootfs, firmware: about 10 minutes on 2 cores), once per session; later sessions reuse the cache. A tree
without the UVM build (or the image resolver) skips with the name of the missing step instead of failing."""

from __future__ import annotations

import pytest

from sandbox.launch import deps
from sandbox.progress import ProgressMode, Reporter, set_reporter
from sandbox.shared.errors import NotImplementedStep
from sandbox.uvm.build import UvmArtifacts, ensure_uvm


def _missing(*loaders: object) -> str | None:
    for load in loaders:
        try:
            load()  # type: ignore[operator]
        except NotImplementedStep as e:
            return e.message
    return None


# Modules that pull images through the resolver (the others build their layers themselves).
NEEDS_IMAGES = {"test_hello", "test_attached", "test_attest", "test_aci_template"}


@pytest.fixture(autouse=True, scope="module")
def _needs_the_uvm(request: pytest.FixtureRequest) -> None:
    needs = [deps.ensure_uvm]
    if request.module.__name__.rpartition(".")[2] in NEEDS_IMAGES:
        needs.append(deps.resolve_image)
    if (why := _missing(*needs)) is not None:
        pytest.skip(why)


@pytest.fixture(scope="session")
def uvm() -> UvmArtifacts:
    set_reporter(Reporter(ProgressMode.plain))  # a first build is long: show its steps in the test log
    return ensure_uvm()
