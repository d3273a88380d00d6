"""Kubernetes: the manifests `parma-sandbox export k8s` writes for the containerd shim (docs/kubernetes.md)."""
