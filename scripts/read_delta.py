"""Reads lambdaflow's master dataset with the deltalake Python package (an
engine independent of lambdaflow's Rust reader) and prints one line per
event: `partition offset zipcode [COLUMN]` (a null as `null`).
Usage: read_delta.py TABLE_URI [ENDPOINT [COLUMN]] (ENDPOINT "" for a local table)."""
import sys

from deltalake import DeltaTable, QueryBuilder

uri = sys.argv[1]
endpoint = sys.argv[2] if len(sys.argv) > 2 else ""
column = sys.argv[3] if len(sys.argv) > 3 else None
options = {}
if endpoint:
    options = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
table = DeltaTable(uri, storage_options=options)
print(f"version {table.version()}", file=sys.stderr)
columns = '"_partition", "_offset", zipcode' + (f', "{column}"' if column else "")
reader = QueryBuilder().register("events", table).execute(f"SELECT {columns} FROM events")
out = sys.stdout
for batch in reader:
    cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
    for row in zip(*cols):
        out.write(" ".join("null" if v is None else str(v) for v in row) + "\n")
