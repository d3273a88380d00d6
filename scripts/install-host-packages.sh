#!/usr/bin/env bash
# Install the Debian packages parma-sandbox needs, only when something is missing.
# Idempotent: a second run with everything present does no apt work at all.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# Packages from bookworm itself.
BASE_PACKAGES=(
    ovmf                       # UEFI firmware for emulated boots
    cpio kmod                  # absent on a fresh machine; used by kernel builds
    cryptsetup-bin             # veritysetup: the reference for our dm-verity code
    e2fsprogs                  # e2fsck/debugfs: check the ext4 images we write
    mmdebstrap                 # builds the UVM rootfs
    skopeo docker-registry     # tools tests: a real OCI registry and a pusher
    pkg-config gcc make        # libvirt-python builds from source (against the backports libvirt-dev)
    bison flex libelf-dev dwarves bc libssl-dev xz-utils  # kernel build
    lz4                        # the UVM kernel is LZ4-compressed (fastest to decompress under TCG)
    nasm acpica-tools uuid-dev g++ patch  # edk2 build: the AmdSev OVMF for SEV-SNP
    busybox-static             # trivial-init baseline in the boot benchmark
    python3-venv python3-dev    # the project venv (Debian python needs these)
    python3-cryptography       # tools tests: the agent's crypto against the UVM's exact library version
    curl zstd ca-certificates
    containerd                 # containerd + ctr: the vm tests of containerd-shim-parma-v2
)
# QEMU must come from bookworm-backports: SNP needs >= 9.1, and 7.2 crashes 6.12 guests under TCG.
BACKPORTS_PACKAGES=(qemu-system-x86 qemu-utils)
# libvirt too: <launchSecurity type='sev-snp'> needs >= 10.5 (bookworm has 9.0, backports 11.x). Every
# libvirt binary package is named with /bookworm-backports so that apt takes exactly these from
# backports (they depend on each other's exact version) and nothing else (-t would also pull systemd).
# virtlogd (libvirt-daemon-log) is needed; virtlockd is not (the default lock manager needs none).
LIBVIRT_PACKAGES=(
    libvirt-daemon-system libvirt-daemon-system-systemd libvirt-daemon libvirt-daemon-common
    libvirt-daemon-driver-qemu libvirt-daemon-log libvirt-daemon-config-network libvirt-daemon-config-nwfilter
    libvirt-daemon-driver-network libvirt-daemon-driver-nwfilter libvirt-daemon-driver-nodedev
    libvirt-daemon-driver-secret libvirt-daemon-driver-storage
    libvirt-clients            # virsh, virt-xml-validate (the tests validate domain XML with it)
    libvirt-dev libvirt0 libvirt-common  # libvirt-python (PyPI) builds against these
)
LIBVIRT_MIN=10.5

missing=()
for p in "${BASE_PACKAGES[@]}" "${BACKPORTS_PACKAGES[@]}" "${LIBVIRT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
qemu_ok=0
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    major=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
    [ "${major:-0}" -ge 9 ] && qemu_ok=1
fi
libvirt_ok=0
libvirt_version=$(dpkg-query -W -f='${Version}' libvirt-daemon 2>/dev/null || true)
if [ -n "$libvirt_version" ] && dpkg --compare-versions "$libvirt_version" ge "$LIBVIRT_MIN"; then
    libvirt_ok=1
fi
if [ ${#missing[@]} -eq 0 ] && [ $qemu_ok -eq 1 ] && [ $libvirt_ok -eq 1 ]; then
    exit 0
fi

echo "installing host packages: ${missing[*]:-qemu and libvirt from backports}" >&2
export DEBIAN_FRONTEND=noninteractive
bp=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$bp" ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    $SUDO tee "$bp" >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${BASE_PACKAGES[@]}"
$SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports "${BACKPORTS_PACKAGES[@]}"
$SUDO apt-get install -y -q --no-install-recommends "${LIBVIRT_PACKAGES[@]/%//bookworm-backports}"
if [ "$(id -u)" -eq 0 ] && pgrep -x libvirtd >/dev/null 2>&1; then
    echo "note: a running libvirtd still runs the previous libvirt; restart it (virtlogd -d; libvirtd -d)" >&2
fi
