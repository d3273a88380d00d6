"""The utility VM: kernel, firmware, dm-verity rootfs with the pinned agent, and the expected measurement."""
