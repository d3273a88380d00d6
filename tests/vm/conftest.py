"""The vm tier boots the project's UVM. On a clean machine the first test that needs it builds it (kernel,
rootfs, firmware: about 10 minutes on 2 cores), once per session; later sessions reuse the cache."""

from __future__ import annotations

import pytest

from sandbox.progress import ProgressMode, Reporter, set_reporter
from sandbox.uvm.build import UvmArtifacts, ensure_uvm


@pytest.fixture(scope="session")
def uvm() -> UvmArtifacts:
    set_reporter(Reporter(ProgressMode.plain))  # a first build is long: show its steps in the test log
    return ensure_uvm()
