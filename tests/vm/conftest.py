"""The vm tier boots the project's UVM. On a clean machine it is built before the first vm test (kernel,
rootfs, firmware: about 10 minutes on 2 cores), once per session; later sessions reuse the cache.

The build runs here, in-process and without a time limit, so that tests driving `parma-sandbox up` in a
subprocess with a timeout time the launch, not a first build."""

from __future__ import annotations

import pytest

from sandbox.progress import ProgressMode, Reporter, set_reporter
from sandbox.uvm.build import UvmArtifacts, ensure_uvm


@pytest.fixture(scope="session", autouse=True)
def uvm() -> UvmArtifacts:
    set_reporter(Reporter(ProgressMode.plain))  # a first build is long: show its steps in the test log
    return ensure_uvm()
