"""Layer conversion: OCI layer tarballs into read-only ext4 images with a dm-verity tree."""
