"""Reads lambdaflow's master dataset with the deltalake Python package (an
engine independent of lambdaflow's Rust reader) and prints one line per
event: `partition offset zipcode`. Usage: read_delta.py TABLE_URI ENDPOINT."""
import sys

from deltalake import DeltaTable, QueryBuilder

uri, endpoint = sys.argv[1], sys.argv[2]
options = {
    "AWS_ENDPOINT_URL": endpoint,
    "AWS_ALLOW_HTTP": "true",
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
}
table = DeltaTable(uri, storage_options=options)
print(f"version {table.version()}", file=sys.stderr)
reader = (
    QueryBuilder()
    .register("events", table)
    .execute('SELECT "_partition", "_offset", zipcode FROM events')
)
out = sys.stdout
for batch in reader:
    cols = [batch.column(i).to_pylist() for i in range(3)]
    for p, o, z in zip(*cols):
        out.write(f"{p} {o} {z}\n")
