"""The converter's version: it keys the conversion cache (sandbox/images/store.py), which imports it
without loading the converter itself."""

# Bump whenever the bytes written for a given tar change.
CONVERTER_VERSION = "ext4-1"
