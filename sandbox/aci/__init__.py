"""Interoperability with Azure Container Instances (confidential containers): the ccePolicy Rego
format, ACI ARM templates as group input, and tar2ext4-identical layer images (docs/aci.md)."""
