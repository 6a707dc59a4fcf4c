"""``recscale schema DATA_FILE [-o schema.yaml]``: propose a schema for a data file.

The proposal (:func:`trainers.schema_infer.propose_schema`) is commented YAML for the
user to check and edit; it loads as written and works with ``recscale search --data
DATA_FILE --schema schema.yaml``. The format: docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_schema"]


def add_parser(sub: Any) -> None:
    """Register ``recscale schema`` on the CLI's subparsers."""
    p = sub.add_parser(
        "schema", help="propose a schema YAML for a CSV/parquet file (docs/data.md)",
        description="Propose a schema for DATA_FILE: column roles (label, categorical, "
                    "numeric, timestamp), distinct counts as comments, hashing for huge "
                    "vocabularies. Check and edit it, then pass it to --schema. The format "
                    "is documented in docs/data.md.")
    p.add_argument("data_file", help="a .csv, .csv.gz or .parquet file")
    p.add_argument("-o", "--output", default=None,
                   help="write the schema here (default: print it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    p.add_argument("--sample-rows", type=int, default=100_000,
                   help="rows read to infer column types (distinct counts use every row)")
    p.set_defaults(func=cmd_schema)


def cmd_schema(args: argparse.Namespace) -> int:
    from recscale.commands import CliError
    from trainers.data_sources import load_schema
    from trainers.schema_infer import propose_schema

    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to overwrite it")
    if args.sample_rows < 1:
        raise CliError(f"--sample-rows must be >= 1, got {args.sample_rows}")
    proposal = propose_schema(args.data_file, sample_rows=args.sample_rows)
    text = proposal.to_yaml()
    has_label = any(c.role == "label" for c in proposal.columns)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        load_schema(out)  # the proposal loads as written (a failure here is a bug)
    roles = {r: [c.name for c in proposal.columns if c.role == r]
             for r in ("label", "categorical", "numeric", "timestamp", "skip")}
    where = str(out) if out is not None else "the schema above"
    summary = (f"{where}: label {roles['label'][0] if has_label else '(none found)'}, "
               f"{len(roles['categorical'])} categorical, {len(roles['numeric'])} numeric"
               + (f", timestamp {roles['timestamp'][0]}" if roles["timestamp"] else "")
               + (f", {len(roles['skip'])} left out" if roles["skip"] else "")
               + (f", hashed: {', '.join(proposal.hash_buckets)}" if proposal.hash_buckets else ""))
    print(summary, file=sys.stderr)
    if not has_label:
        print("recscale: warning: no 0/1 label column found; write it into the schema's "
              "'label' key", file=sys.stderr)
    schema_arg = out if out is not None else "schema.yaml"
    print(f"check and edit it (docs/data.md), then: recscale search --data {args.data_file} "
          f"--schema {schema_arg} --budget-flops 1e12", file=sys.stderr)
    return 0
