"""The scale-of-data benchmark runs end to end at a tiny size (numbers are not checked).

It fills through the consume path, resumes a fill instead of repeating it, and measures
every row of its table against a real ``run.py``.
"""

from __future__ import annotations

import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import scale_data  # noqa: E402


def test_the_scale_bench_fills_once_and_reports_every_measure(tmp_path):
    url = f"sqlite:///{tmp_path / 'scale.db'}"
    assert scale_data.fill(url, 120, log=lambda _: None) == {"users": 120, "usage_rows": 600}
    # A second fill to a larger size continues after the committed batches.
    result = scale_data.run(150, url, rounds=1, seconds=0.3, startups=1, log=lambda _: None)
    assert result["users"] == 150
    assert result["usage_rows"] == 150 * 3 + 100 * 3  # 3 periods; 2 types for 2 users in 3
    assert result["stats_tick"]["total_users"] == 150
    assert result["users_page"]["requests"] > 0
    assert {"utilization first page", "username search (prefix)"} <= set(
        result["users_page"]["by_request"]
    )
    assert result["consume_alone"]["consumes"] > 0
    assert result["consume_paged"]["pages"] > 0
    assert result["startup_s"] and result["db_bytes"] > 0
    text = scale_data.table(result)
    assert "users page p99" in text and "stats tick" in text and "start-up" in text
