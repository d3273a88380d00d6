"""AMD SEV-SNP structures (stdlib only), one module per structure.

Source: "SEV Secure Nested Paging Firmware ABI Specification" (AMD 56860), tables cited per module;
layout notes and real-report cross-checks in /work/shared/reference/snp.md. Everything is
little-endian. Host and guest both import this package.
"""
