"""experiments/nowin/rates.py: the Wilson interval and Fisher's exact test, against scipy's as an independent
statement of the same arithmetic."""

from __future__ import annotations

import pytest
from helpers import load_script

stats = pytest.importorskip("scipy.stats")

rates = load_script("experiments/nowin/rates.py")


@pytest.mark.parametrize("k,n", [(0, 5), (2, 5), (5, 5), (12, 15), (5, 10), (17, 25), (1, 1)])
def test_wilson_interval_equals_scipys(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert rates.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


@pytest.mark.parametrize("table", [(12, 15, 5, 10), (4, 5, 2, 5), (5, 5, 0, 5), (3, 9, 9, 9), (0, 3, 0, 4),
                                   (7, 20, 1, 3)])
def test_fisher_exact_equals_scipys(table):
    k1, n1, k2, n2 = table
    expected = stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue
    assert rates.fisher_exact(k1, n1, k2, n2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("text", ["3/0", "6/5", "-1/4", "3"])
def test_a_rate_that_is_not_k_of_n_is_refused(text):
    with pytest.raises((rates.argparse.ArgumentTypeError, ValueError)):
        rates.parse(text)


def test_the_printout_names_each_rate_the_pooled_rate_and_the_test(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["rates.py", "12/15", "5/10"])
    rates.main()
    assert capsys.readouterr().out.splitlines() == [
        "12/15 = 0.80, 95 % interval 0.55-0.93", "5/10 = 0.50, 95 % interval 0.24-0.76",
        "pooled 17/25 = 0.68, 95 % interval 0.48-0.83", "Fisher's exact test, two-sided: p = 0.19"]
