"""Container images: acquisition (registry, OCI layout, docker-archive) and layer conversion."""
