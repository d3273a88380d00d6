"""Container images: acquisition (registry, OCI layout, docker-archive) and layer conversion."""

DEFAULT_PLATFORM = "linux/amd64"        # what `image pull` and `up` pick from a multi-platform image
