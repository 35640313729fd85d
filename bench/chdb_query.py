"""ClickHouse side of `lambdaflow bench batch --shapes`, through chDB (the
ClickHouse engine in process): one query over the Parquet files of the
master dataset, in a fresh process, three runs.

usage: python3 bench/chdb_query.py '<glob of parquet files>' <threads> '<SQL with {src}>'
prints one JSON line: first_s (the first run: a fresh process, as a
`lambdaflow rebuild VIEW` child is), best_s, median_s, rows, version,
import_s (loading the engine, before the first run)
"""
import json
import sys
import time

t0 = time.perf_counter()
import chdb  # noqa: E402
from chdb import session  # noqa: E402

glob, threads, sql = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = session.Session()
imported = time.perf_counter() - t0
sql = sql.replace("{src}", f"file('{glob}', Parquet)") + f" SETTINGS max_threads={threads}"
times = []
rows = 0
for _ in range(3):
    t = time.perf_counter()
    # The result as Arrow IPC bytes: materialized, as DuckDB's and
    # lambdaflow's are.
    out = s.query(sql, "Arrow")
    rows = out.rows_read() if hasattr(out, "rows_read") else 0
    times.append(time.perf_counter() - t)
first = times[0]
times.sort()
print(json.dumps({
    "first_s": first,
    "best_s": times[0],
    "median_s": times[1],
    "rows": rows,
    "version": chdb.__version__,
    "import_s": imported,
}))
