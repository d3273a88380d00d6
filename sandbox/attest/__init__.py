"""Host-side attestation: AMD certificates and KDS, the emulated test CA and PSP material, the verifier."""
