"""ClickHouse (chDB, in process) beside `lambdaflow bench keys`: the same
events, with the same retries, and how many duplicates each counts.

The events: event i has the key of `key_of(i)` (10 % repeat a key sent up
to 1,000 events before: single records re-sent), sent in blocks of 1,000;
every 20th block (b % 20 == 7) is sent twice (a producer retrying a whole
request). lambdaflow's `bench keys` sends exactly these.

Two ClickHouse answers:
  insert deduplication  MergeTree with non_replicated_deduplication_window:
                        a block identical to one inserted before is dropped
  by key, at query time ReplacingMergeTree ORDER BY id, counted with FINAL

Usage: python3 scripts/bench_keys_chdb.py EVENTS
"""
import sys
import time

from chdb import session as chs

M = (1 << 64) - 1


def key_of(i):
    while True:
        h = (i * 0x9E3779B97F4A7C15) & M
        if i > 1000 and ((h >> 8) % 10) == 0:
            i = i - 1 - ((h >> 32) % 1000)
        else:
            return i


def line(i):
    k = key_of(i)
    return '{"id":"ev%d","ProductName":"product%d","price":%d}\n' % (k, k % 100, k % 50 + 1)


def blocks(n):
    for b in range((n + 999) // 1000):
        body = "".join(line(i) for i in range(b * 1000, min(n, (b + 1) * 1000)))
        yield body
        if b % 20 == 7:
            yield body  # the whole request again


def main():
    n = int(sys.argv[1])
    unique = sum(1 for i in range(n) if key_of(i) == i)
    sent = sum(b.count("\n") for b in blocks(n))
    s = chs.Session()
    s.query("CREATE DATABASE IF NOT EXISTS bench")
    s.query(
        "CREATE TABLE bench.dedup (id String, ProductName String, price Int64) "
        "ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 1000"
    )
    s.query(
        "CREATE TABLE bench.replacing (id String, ProductName String, price Int64) "
        "ENGINE = ReplacingMergeTree ORDER BY id"
    )
    for table in ["dedup", "replacing"]:
        t = time.time()
        for body in blocks(n):
            s.query(
                f"INSERT INTO bench.{table} SETTINGS insert_deduplicate = 1 FORMAT JSONEachRow\n" + body
            )
        took = time.time() - t
        final = " FINAL" if table == "replacing" else ""
        q = time.time()
        counted = int(str(s.query(f"SELECT count() FROM bench.{table}{final}", "CSV")).strip())
        qt = time.time() - q
        how = (
            "insert deduplication (identical blocks)"
            if table == "dedup"
            else "ReplacingMergeTree, counted with FINAL"
        )
        print(
            f"chDB {how}: {sent:,} records sent ({unique:,} unique keys) inserted in {took:.2f} s "
            f"({sent / took:,.0f} records/s); count(){final} = {counted:,} "
            f"({counted - unique:,} duplicates counted) in {qt * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
