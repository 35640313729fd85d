"""Another engine at work on lambdaflow's master dataset (Python deltalake):
  other_engine.py append-copy TABLE_URI PARTITION N [ENDPOINT]
      appends a copy of the first N events of PARTITION (same _partition and
      _offset) as a file of its own, as a user's job might;
  other_engine.py compact TABLE_URI [ENDPOINT]
      compacts the table's files and vacuums the old ones at once;
  other_engine.py count TABLE_URI [ENDPOINT]
      reads every row of the table (every file it names must be there).
Prints what it did on stderr, the table's file count on stdout."""
import sys

from deltalake import DeltaTable, QueryBuilder, write_deltalake

cmd, uri = sys.argv[1], sys.argv[2]
rest = sys.argv[3:]
endpoint = ""
if cmd == "append-copy":
    partition, n = int(rest[0]), int(rest[1])
    endpoint = rest[2] if len(rest) > 2 else ""
else:
    endpoint = rest[0] if rest else ""
options = {}
if endpoint:
    options = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
    }
table = DeltaTable(uri, storage_options=options)
if cmd == "append-copy":
    copy = QueryBuilder().register("events", table).execute(
        f'SELECT * FROM events WHERE "_partition" = {partition} ORDER BY "_offset" LIMIT {n}'
    ).read_all()
    write_deltalake(table, copy, mode="append", storage_options=options)
    print(f"appended {copy.num_rows} rows", file=sys.stderr)
elif cmd == "compact":
    metrics = table.optimize.compact()
    print(f"compacted: {metrics}", file=sys.stderr)
    removed = table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    print(f"vacuumed {len(removed)} files", file=sys.stderr)
elif cmd == "count":
    rows = QueryBuilder().register("events", table).execute("SELECT * FROM events").read_all()
    print(rows.num_rows)
    sys.exit(0)
else:
    sys.exit(f"unknown command {cmd}")
table = DeltaTable(uri, storage_options=options)
print(len(table.file_uris()))
