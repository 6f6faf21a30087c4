"""Reference values for the one-run audit bound (Steinke, Nasr, Jagielski, "Privacy Auditing with
One (1) Training Run", NeurIPS 2023, Theorem 5.2 / their appendix code), computed independently
of dptrain with scipy's binomial distribution (tests/audit_bound.rs compares):

  q = e^ε / (1 + e^ε)                      (accuracy of ε-DP randomized response)
  β = P[Binomial(r, q) ≥ v]
  α = max over i = 1..v of P[v − i ≤ Binomial(r, q) < v] / i
  p-value(ε, δ) = min(1, β + 2 m δ α)

and the ε lower bound at confidence 1 − p: the largest ε with p-value(ε, δ) < p (bisection on
[0, 100] to 1e-9, scipy in double precision).

Run: .cache/pyenv/bin/python tests/reference/audit_bound.py > tests/reference/audit_bound.json
"""
import json
import math

import scipy
from scipy import stats


def p_value(m, r, v, eps, delta):
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, acc = 0.0, 0.0
    for i in range(1, v + 1):
        acc += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, acc / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def eps_lower_bound(m, r, v, delta, p):
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 100.0
    if p_value(m, r, v, hi, delta) < p:
        return hi
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


cases = []
for (m, r, v, delta, p) in [
    (1000, 100, 100, 0.0, 0.05),
    (1000, 100, 90, 0.0, 0.05),
    (1000, 100, 90, 1e-5, 0.05),
    (1000, 500, 400, 1e-5, 0.05),
    (1000, 1000, 600, 1e-5, 0.05),
    (1000, 1000, 520, 1e-5, 0.05),
    (1000, 50, 30, 1e-5, 0.05),
    (10000, 2000, 1500, 1e-5, 0.01),
    (10000, 200, 200, 1e-6, 0.05),
    (200, 20, 20, 1e-3, 0.05),
]:
    cases.append({
        "m": m, "r": r, "v": v, "delta": delta, "p": p,
        "p_value_at": {str(e): p_value(m, r, v, e, delta) for e in (0.0, 0.5, 1.0, 2.0, 4.0)},
        "eps_lower_bound": eps_lower_bound(m, r, v, delta, p),
    })
print(json.dumps({"about": f"scipy {scipy.__version__}: see tests/reference/audit_bound.py", "cases": cases}, indent=1))
