"""A Postgres driver (psycopg 3) against lambdaflow's Postgres endpoint, for
the pg tests: reads a JSON plan on stdin, prints one JSON result per step.

Plan: {"dsn": "...", "steps": [{"sql": "...", "params": [...],
        "prepare": true|false, "simple": true|false}]}
A parameter {"timestamp": "2014-11-01 19:35:00"} is sent as a datetime.
Each result: {"columns": [...], "rows": [[...], ...]} or
             {"error": {"sqlstate": ..., "message": ..., "detail": ..., "hint": ...}}

A connection failure prints {"connect_error": {...}} and nothing else.
"""

import datetime
import decimal
import json
import sys

import psycopg


def plain(v):
    if isinstance(v, (datetime.datetime, datetime.date)):
        return v.isoformat(sep=" ")
    if isinstance(v, decimal.Decimal):
        return float(v)
    return v


def param(v):
    if isinstance(v, dict) and "timestamp" in v:
        return datetime.datetime.fromisoformat(v["timestamp"])
    return v


def error(e):
    d = getattr(e, "diag", None)
    return {
        "sqlstate": getattr(e, "sqlstate", None),
        "message": d.message_primary if d else str(e),
        "detail": d.message_detail if d else None,
        "hint": d.message_hint if d else None,
        "text": str(e),
    }


def main():
    plan = json.load(sys.stdin)
    try:
        conn = psycopg.connect(plan["dsn"], autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        print(json.dumps({"connect_error": error(e)}))
        return
    with conn:
        for step in plan["steps"]:
            cur = psycopg.ClientCursor(conn) if step.get("simple") else conn.cursor()
            try:
                params = step.get("params")
                if params is not None:
                    params = [param(v) for v in params]
                cur.execute(step["sql"], params, prepare=step.get("prepare"))
                cols = [c.name for c in cur.description] if cur.description else []
                rows = [[plain(v) for v in r] for r in cur.fetchall()] if cols else []
                print(json.dumps({"columns": cols, "rows": rows}), flush=True)
            except psycopg.Error as e:
                print(json.dumps({"error": error(e)}), flush=True)


main()
