"""SQL classification cost (targets: cached median <= 1 us, uncached 20-line query <= 300 us).

Rows:

* ``cached`` - ``classify()`` of a string already in the LRU cache (the hot path: a
  dict lookup). Timed around batches of calls, as one call is close to the clock's
  own ~50 ns cost.
* ``uncached`` - ``Classifier.analyze()`` with the cache disabled
  (``cache_size=0``): placeholder rewrite, parse, tree walk, verdict. Timed per call.
* ``pglast.parse_sql`` / ``parse_sql_json`` alone, on the same text, measured in the
  same run: the floor any parser-based classifier pays. ``parse_sql`` builds Python
  node objects; the classifier uses the JSON form, which is several times cheaper.

    .venv/bin/python benchmarks/classify.py [--iterations 3000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from pglast import parser as pg_parser

from replica_router import classify
from replica_router.classify import Classifier

# A realistic 20-line report query with psycopg placeholders, built-in functions,
# a subquery and a CTE: read, but every check has to look at it.
REPORT_QUERY = """\
WITH recent AS (
    SELECT o.id, o.customer_id, o.created_at
    FROM orders AS o
    WHERE o.created_at >= %(since)s AND o.status <> 'cancelled'
)
SELECT c.id, lower(c.email) AS email, c.name,
       count(DISTINCT r.id) AS orders,
       sum(li.quantity * li.unit_price) AS total,
       max(r.created_at) AS last_order,
       coalesce(avg(li.unit_price), 0) AS avg_price
FROM customers AS c
JOIN recent AS r ON r.customer_id = c.id
LEFT JOIN line_items AS li ON li.order_id = r.id
WHERE c.region = ANY(%(regions)s)
  AND NOT EXISTS (SELECT 1 FROM refunds AS f WHERE f.order_id = r.id)
  AND c.email LIKE '%%@example.com'
GROUP BY c.id, c.email, c.name
HAVING sum(li.quantity * li.unit_price) > %(minimum)s
ORDER BY total DESC, c.id
LIMIT 50"""

POINT_LOOKUP = "SELECT id, name, email FROM users WHERE id = %s"
WRITE_CTE = (
    "WITH moved AS (DELETE FROM queue WHERE id = $1 RETURNING *) "
    "INSERT INTO archive SELECT * FROM moved"
)


def per_call(call: Callable[[], object], iterations: int) -> list[float]:
    """Microseconds for each of ``iterations`` single calls."""
    for _ in range(min(iterations, 200)):
        call()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(iterations):
        start = clock()
        call()
        samples.append((clock() - start) / 1000)
    samples.sort()
    return samples


def batched(call: Callable[[], object], batches: int, batch: int) -> list[float]:
    """Per-call microseconds, one sample per batch of ``batch`` calls."""
    for _ in range(batch):
        call()
    clock = time.perf_counter_ns
    rng = range(batch)
    samples = []
    for _ in range(batches):
        start = clock()
        for _ in rng:
            call()
        samples.append((clock() - start) / batch / 1000)
    samples.sort()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()

    uncached = Classifier(cache_size=0)
    report_sql = REPORT_QUERY.replace("%(since)s", "$1").replace("%(regions)s", "$2")
    report_sql = report_sql.replace("%(minimum)s", "$3").replace("%%", "%")
    assert REPORT_QUERY.count("\n") + 1 == 20
    assert classify(REPORT_QUERY).value == "read"

    rows: list[tuple[str, list[float], float | None]] = [
        (
            "cached classify(), point lookup",
            batched(lambda: classify(POINT_LOOKUP), 2000, 1000),
            1.0,
        ),
        (
            "cached classify(), 20-line report",
            batched(lambda: classify(REPORT_QUERY), 2000, 1000),
            1.0,
        ),
        (
            "uncached, point lookup",
            per_call(lambda: uncached.analyze(POINT_LOOKUP), args.iterations),
            None,
        ),
        (
            "uncached, writable CTE",
            per_call(lambda: uncached.analyze(WRITE_CTE), args.iterations),
            None,
        ),
        (
            "uncached, 20-line report",
            per_call(lambda: uncached.analyze(REPORT_QUERY), args.iterations),
            300.0,
        ),
        (
            "reference: pglast.parse_sql, report",
            per_call(lambda: pg_parser.parse_sql(report_sql), args.iterations),
            None,
        ),
        (
            "reference: parse_sql_json, report",
            per_call(lambda: pg_parser.parse_sql_json(report_sql), args.iterations),
            None,
        ),
    ]

    print(f"{'measurement':<38} {'median us':>10} {'p99 us':>10} {'target':>8}")
    print("-" * 70)
    failed = []
    for label, samples, target in rows:
        median = statistics.median(samples)
        p99 = samples[int(len(samples) * 0.99) - 1]
        shown = f"<= {target:g}" if target is not None else ""
        print(f"{label:<38} {median:>10.3f} {p99:>10.3f} {shown:>8}")
        if target is not None and median > target:
            failed.append(label)
    print("-" * 70)
    print("all medians within target" if not failed else f"OVER TARGET: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
