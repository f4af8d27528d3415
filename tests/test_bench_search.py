"""scripts/bench.py's long-context search (issue 13 item 5): from the memory plan's starting point to the longest
length that fits, to 512 tokens, up or down, in few trials."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", Path(__file__).parent.parent / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_script"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("limit,start", [(37_000, 30_000), (37_000, 60_000), (10_900, 90_112), (90_000, 88_000)])
def test_search_finds_the_longest_fitting_length_from_the_plans_start(bench, limit, start):
    tried = []

    def fits(seq: int) -> bool:
        tried.append(seq)
        return seq <= limit

    assert bench._search(fits, start) == limit // 512 * 512
    assert len(tried) <= 14 and len(set(tried)) == len(tried)  # no length tried twice


def test_search_reports_zero_when_nothing_fits(bench):
    assert bench._search(lambda seq: False, 8192) == 0
