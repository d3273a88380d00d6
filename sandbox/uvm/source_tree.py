"""Where the UVM recipes live in the source tree (kernel_configs/, firmware/, images/uvm/, sandbox/)."""

from __future__ import annotations

from pathlib import Path

import sandbox

SOURCE_ROOT = Path(sandbox.__file__).resolve().parent.parent
PACKAGE_DIR = SOURCE_ROOT / "sandbox"
KERNEL_CONFIGS = SOURCE_ROOT / "kernel_configs"
FIRMWARE_DIR = SOURCE_ROOT / "firmware"
UVM_IMAGE_DIR = SOURCE_ROOT / "images" / "uvm"
BUILD_DIR = SOURCE_ROOT / "build"
