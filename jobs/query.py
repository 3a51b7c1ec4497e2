"""``cdam query DEST "SQL"``: DuckDB SQL over a run's tables, printed or written to CSV/Parquet."""

from __future__ import annotations

import argparse
import sys
from jobs.command import add_run_command

EPILOG = """\
tables:
  metadata   one row per explained image (schemas/README.md lists the columns)
  errors     one row per sample that could not be explained: shard, key, reason
  targets    one row per (image, target slot): key, row, shard, label, pred, slot, class, name,
             pos_sum, neg_sum, argmax

examples:
  cdam query out "SELECT pred, count(*) AS n FROM metadata GROUP BY pred ORDER BY n DESC"
  cdam query out "SELECT key, pos_sum FROM targets WHERE name = 'zebra' ORDER BY pos_sum DESC LIMIT 20"
  cdam query s3://bucket/cdam/val "SELECT * FROM errors" --csv errors.csv
"""


HELP = "run DuckDB SQL over a run's metadata"
DESCRIPTION = "Run DuckDB SQL over the Parquet tables of a run (only shards with a completion marker are read)."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_run_command(commands, "query", HELP, DESCRIPTION, EPILOG)
    parser.add_argument("sql", metavar="SQL", help="a DuckDB query over the tables metadata, errors and targets")
    written = parser.add_mutually_exclusive_group()
    written.add_argument("--csv", metavar="FILE", help="write the result to a CSV file instead of printing it")
    written.add_argument("--parquet", metavar="FILE", help="write the result to a Parquet file instead of printing it")
    parser.add_argument("--max-rows", type=int, default=40, help="rows printed at most (default: 40)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import duckdb
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from cdam_worker.reading import RunError, open_run

    run_ = open_run(args.output)
    for note in run_.skipped:
        print(f"note: {note}", file=sys.stderr)
    try:
        result = run_.sql().sql(args.sql)
    except duckdb.Error as error:
        raise RunError(f"SQL: {' '.join(str(error).split())}") from None
    if result is None:
        return 0
    table = result.to_arrow_table()
    if args.csv:
        pacsv.write_csv(table, args.csv)
        print(f"{table.num_rows} rows written to {args.csv}", file=sys.stderr)
    elif args.parquet:
        pq.write_table(table, args.parquet)
        print(f"{table.num_rows} rows written to {args.parquet}", file=sys.stderr)
    else:
        result.show(max_rows=args.max_rows, max_width=200)
    return 0
