"""DuckDB side of `lambdaflow bench batch`: the same GROUP BY over the same
Parquet files of the master dataset, best of three runs.

usage: python3 bench/duckdb_groupby.py '<glob of parquet files>' <threads>
prints one JSON line: events, best_s, median_s, groups, version
"""
import json
import sys
import time

import duckdb

glob, threads = sys.argv[1], int(sys.argv[2])
con = duckdb.connect()
con.execute(f"SET threads={threads}")
src = f"read_parquet('{glob}')"
sql = (
    f"SELECT zipcode, ProductName, count(*) AS n, sum(price) AS revenue "
    f"FROM {src} GROUP BY zipcode, ProductName"
)
times = []
groups = 0
for _ in range(3):
    t = time.perf_counter()
    groups = len(con.execute(sql).fetchall())
    times.append(time.perf_counter() - t)
events = con.execute(f"SELECT count(*) FROM {src}").fetchone()[0]
times.sort()
print(json.dumps({
    "events": events,
    "best_s": times[0],
    "median_s": times[1],
    "groups": groups,
    "version": duckdb.__version__,
}))
