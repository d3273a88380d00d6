"""Regenerate tests/data/snp-id/kat.json: ID blocks made by sev-snp-measure (a public tool), run here.

    .venv/bin/python -m tests.gen_snp_id_kat

The keys in tests/data/snp-id/ are throwaway test keys generated for this purpose with
`openssl ecparam -name secp384r1 -genkey -noout`. sev-snp-measure's signatures are randomised, so
the known answers pin the deterministic parts byte for byte and the signatures are checked by
verification; tests/unit/test_snp_id_block.py reads the file.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from importlib.metadata import version
from pathlib import Path

from sevsnpmeasure import id_block

DATA = Path(__file__).parent / "data" / "snp-id"
# Launch digests to sign: SHA-384 of fixed strings, and the upstream test's own digest.
MEASUREMENTS = {
    "upstream": base64.b64decode("B28FLQi9p6cAqipgjFyqawDrrSl7bWioWkWx5mmlWLZ+G5HShKMB/mPE+gdQRn7t"),
    "sha384-parma": hashlib.sha384(b"parma-sandbox id block KAT").digest(),
}


def _field(text: str, name: str) -> str:
    for part in text.replace("\n", ",").split(","):
        key, _, value = part.partition("=") if "=" in part.split(":")[0] else part.partition(": ")
        if key.strip() == name:
            return value.strip()
    raise KeyError(name)


def main() -> None:
    cases = []
    for label, ld in MEASUREMENTS.items():
        out = id_block.snp_calc_id_block(ld, str(DATA / "id_key.pem"), str(DATA / "author_key.pem"))
        cases.append({"label": label, "measurement": ld.hex(),
                      "id_block": _field(out, "id-block"), "id_auth": _field(out, "id-auth"),
                      "id_key_digest_b64": _field(out, "id_key_hash"), "author_key_digest_b64": _field(out, "author_key")})
    doc = {
        "provenance": {
            "tool": f"sev-snp-measure {version('sev-snp-measure')} (PyPI), sevsnpmeasure.id_block.snp_calc_id_block",
            "command": "python -m tests.gen_snp_id_kat",
            "generated": dt.date.today().isoformat(),
            "keys": "tests/data/snp-id/id_key.pem, author_key.pem (throwaway P-384 test keys)",
            "tool_defaults": "policy 0x30000, FAMILY_ID/IMAGE_ID zero, VERSION 1, GUEST_SVN 0, AUTH_KEY_ALGO 1",
        },
        "cases": cases,
    }
    (DATA / "kat.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
