"""The event-key oracle in DuckDB, an engine lambdaflow shares nothing with.

    python duckdb_oracle.py EVENTS.ndjson QUERIES.json

EVENTS: one record per line as the stream holds it, duplicates included:
{"p", "o", "zipcode", "ProductName", "price", "ts_ms"}. QUERIES: a list of
{"sql", "marks"}; for each, prints the rows of `sql` over `events` = the
first occurrence of each key (zipcode) among the records below `marks`
(record `o` of partition `p` is below when o < marks[p]). The key's
occurrences share a partition (the producer keys by it), so its first
occurrence is its lowest offset there.

Prints one JSON list: per query, its rows (objects; timestamps as
YYYY-MM-DDTHH:MM:SS, `approx_distinct` columns left out: the two engines
estimate differently).
"""

import datetime
import json
import sys

import duckdb


def main():
    events, queries = sys.argv[1], json.load(open(sys.argv[2]))
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute(
        "CREATE TABLE sent AS SELECT p, o, zipcode, ProductName, price, "
        "make_timestamp(ts_ms * 1000) AS timestamp FROM read_json(?, format = 'newline_delimited', "
        "columns = {'p': 'INTEGER', 'o': 'UBIGINT', 'zipcode': 'BIGINT', "
        "'ProductName': 'VARCHAR', 'price': 'BIGINT', 'ts_ms': 'BIGINT'})",
        [events],
    )
    out = []
    for q in queries:
        marks = [int(m) for m in q["marks"]]
        con.execute(
            "CREATE OR REPLACE TEMP VIEW events AS "
            "SELECT zipcode, ProductName, price, timestamp FROM sent "
            f"WHERE o < list_extract({marks!r}::UBIGINT[], p + 1) "
            "QUALIFY row_number() OVER (PARTITION BY zipcode ORDER BY p, o) = 1"
        )
        sql = q["sql"]
        approx = "approx_distinct(" in sql
        sql = sql.replace("approx_distinct(", "approx_count_distinct(")
        cur = con.execute(sql)
        names = [d[0] for d in cur.description]
        rows = []
        for r in cur.fetchall():
            row = {}
            for name, v in zip(names, r):
                if approx and name == "zipcodes":
                    continue
                if isinstance(v, datetime.datetime):
                    v = v.strftime("%Y-%m-%dT%H:%M:%S")
                row[name] = v
            rows.append(row)
        out.append(rows)
    json.dump(out, sys.stdout)


main()
