"""How many seeds a setting meets the bars on, as a rate with its 95 % interval, and whether two such rates differ.

    python experiments/nowin/rates.py 12/15 5/10

Prints each K/N with its Wilson score interval, the pooled rate, and for two rates the two-sided p-value of
Fisher's exact test (the probability, with the margins fixed, of a table at most as likely as the one seen).
"""

from __future__ import annotations

import argparse
import math

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of Fisher's exact test on the 2 x 2 table [[k1, n1 - k1], [k2, n2 - k2]]."""
    total, successes = n1 + n2, k1 + k2

    def probability(a: int) -> float:  # hypergeometric: a of the successes in the first row
        return math.comb(n1, a) * math.comb(n2, successes - a) / math.comb(total, successes)

    seen = probability(k1)
    lowest, highest = max(0, successes - n2), min(n1, successes)
    return min(1.0, sum(p for a in range(lowest, highest + 1) if (p := probability(a)) <= seen * (1 + 1e-9)))


def parse(text: str) -> tuple[int, int]:
    k, n = (int(part) for part in text.split("/"))
    if not 0 <= k <= n or n == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 0 <= K <= N and N > 0")
    return k, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rates", nargs="+", type=parse, help="K/N: seeds meeting the bars / seeds run")
    args = parser.parse_args()
    for k, n in args.rates:
        low, high = wilson(k, n)
        print(f"{k}/{n} = {k / n:.2f}, 95 % interval {low:.2f}-{high:.2f}")
    if len(args.rates) > 1:
        k, n = sum(r[0] for r in args.rates), sum(r[1] for r in args.rates)
        low, high = wilson(k, n)
        print(f"pooled {k}/{n} = {k / n:.2f}, 95 % interval {low:.2f}-{high:.2f}")
    if len(args.rates) == 2:
        (k1, n1), (k2, n2) = args.rates
        print(f"Fisher's exact test, two-sided: p = {fisher_exact(k1, n1, k2, n2):.2f}")


if __name__ == "__main__":
    main()
