#!/bin/sh
# Build the Debian minbase layer of tests/data/aci-layer-hashes.json and store it in the cache, where
# tests/tools/test_aci_layer_hashes.py looks for it by its SHA-256. Needs mmdebstrap and the Debian
# mirror. The bytes are reproducible only while bookworm serves the same package versions; a different
# package set gives a different SHA-256, and the test then says so and skips.
set -eu
cache="${PARMA_SANDBOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/parma-sandbox}/aci-reference-layers"
mkdir -p "$cache"
tmp="$cache/.minbase.$$.tar"
trap 'rm -f "$tmp"' EXIT
SOURCE_DATE_EPOCH=1735689600 mmdebstrap --variant=minbase --mode=root bookworm "$tmp" http://deb.debian.org/debian
sum=$(sha256sum "$tmp" | cut -d' ' -f1)
mv "$tmp" "$cache/$sum.tar"
echo "$cache/$sum.tar"
