#!/bin/sh
# mmdebstrap customize hook for the UVM base. Runs outside the chroot; $1 is the new root.
set -eu
root="$1"
# Host-specific files mmdebstrap copies in (they would make the image depend on the build host).
rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
echo parma-uvm > "$root/etc/hostname"
# Byte-compile the Python stdlib again, deterministically: Debian's postinst writes timestamp-based
# .pyc files whose marshal output varies between runs. Unchecked-hash .pyc files are reproducible and
# let Python skip the source stat on the read-only root.
# -B: the compiling interpreter must not write timestamp .pyc files for the modules it imports itself
# (encodings, re, enum, collections...) before compileall reaches them; compileall would keep those, and
# as the rootfs clamps mtimes they would never match their source: recompiled from source at every boot.
# -f: compile every file whatever is there.
find "$root"/usr/lib/python3* -name __pycache__ -type d -prune -exec rm -rf {} +
for d in "$root"/usr/lib/python3.*; do
    chroot "$root" env PYTHONHASHSEED=0 python3 -E -B -m compileall -q -f -j1 \
        --invalidation-mode unchecked-hash "${d#"$root"}" /usr/lib/python3/dist-packages
done
