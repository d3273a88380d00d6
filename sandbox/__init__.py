"""parma-sandbox: confidential container groups on QEMU/KVM, after Microsoft's Parma design.

Zones (enforced by tests/unit/test_import_boundaries.py):
  sandbox.shared  stdlib only; imported by host and guest (protocol, policy, SNP report format)
  sandbox.guest   stdlib + sandbox.shared; runs inside the UVM
  everything else host code
"""

__version__ = "0.1.0"
