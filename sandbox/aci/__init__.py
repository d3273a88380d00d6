"""Interoperability with Azure Container Instances (confidential containers): the ccePolicy Rego
format, export to ARM templates, and tar2ext4-identical layer images (docs/aci.md). ARM templates
as group input are read by sandbox.group.arm, beside the group loader."""
