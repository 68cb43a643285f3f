"""Make the sites' shared CKKS key file: ``python -m fedseg.secure.keygen FILE``.

Run once by whoever provisions the hospitals; copy ``FILE`` to every site with its other
secrets (never to the server) and name it in each SuperNode's node config::

    flower-supernode ... --node-config "data-path='/data/a' ckks-key-file='/secrets/ckks.ctx'"

The file holds a TenSEAL CKKS context with its secret key (see :mod:`fedseg.secure.ckks`); it is
written with owner-only permissions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedseg.errors import ConfigError
from fedseg.secure.ckks import POLY_DEGREES, CkksParams
from fedseg.secure.ckks_federation import write_key_file


def main(argv: list[str] | None = None) -> int:
    """Write a new key file. Exit codes: 0 written, 2 bad input (file exists, bad option)."""
    parser = argparse.ArgumentParser(prog="python -m fedseg.secure.keygen", description=__doc__)
    parser.add_argument("file", type=Path, help="where to write the key file")
    parser.add_argument("--poly-degree", type=int, default=4096, choices=POLY_DEGREES)
    parser.add_argument("--scale-bits", type=int, default=30)
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    if args.file.exists() and not args.force:
        print(f"error: {args.file} exists (use --force to replace it)", file=sys.stderr)
        return 2
    try:
        params = CkksParams(poly_degree=args.poly_degree, scale_bits=args.scale_bits)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_key_file(args.file, params)
    print(f"wrote {args.file} (CKKS N={params.poly_degree}; give it to every site, not the server)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
