"""DuckDB side of `lambdaflow bench batch --shapes`: one query over the
Parquet files of the master dataset, in a fresh process, best of three runs.

usage: python3 bench/duckdb_query.py '<glob of parquet files>' <threads> '<SQL with {src}>'
The result is materialized as an Arrow table (as lambdaflow materializes
its states). Prints one JSON line: first_s (the first run: a fresh process, as a
`lambdaflow rebuild VIEW` child is), best_s, median_s, rows, version
"""
import json
import sys
import time

import duckdb

glob, threads, sql = sys.argv[1], int(sys.argv[2]), sys.argv[3]
con = duckdb.connect()
con.execute(f"SET threads={threads}")
sql = sql.replace("{src}", f"read_parquet('{glob}')")
times = []
rows = 0
for _ in range(3):
    t = time.perf_counter()
    # The result as Arrow: materialized, not turned into Python objects
    # (fetchall() of 1M rows costs DuckDB over a second more).
    rows = con.sql(sql).to_arrow_table().num_rows
    times.append(time.perf_counter() - t)
first = times[0]
times.sort()
print(json.dumps({
    "first_s": first,
    "best_s": times[0],
    "median_s": times[1],
    "rows": rows,
    "version": duckdb.__version__,
}))
