"""Pure-Python cryptography for the shared zone (the guest has no `cryptography` package).

Only what attestation needs: NIST P-384 (ECDSA-SHA384, ECDH) and the DER encodings of its keys and
signatures. Host code that can use `cryptography` should; the tests check this code against it.
"""
