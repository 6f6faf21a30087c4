#!/usr/bin/env python3
"""Reference values for private hyper-parameter selection (Papernot & Steinke, ICLR 2022),
computed with Google's dp_accounting (its RdpAccountant's RepeatAndSelectDpEvent, Theorem 2 of
the paper for the truncated negative binomial number of trials).

Two order grids: the integer orders 2..63, where dp_accounting's RDP of the subsampled Gaussian is
the exact binomial sum, as dptrain's is (so the selection formula itself is compared to many
digits: `epsilon`, `rdp`); and dptrain's default grid (`epsilon_default_grid`), where
dp_accounting's fractional-order series is slightly looser than dptrain's exact one (see
README.md), so dptrain must land at or below it.

Writes tests/reference/repeat_and_select.json. Run with a Python that has dp-accounting
(e.g. pip install dp-accounting into .cache/pyenv); never needed by the tests themselves.
"""
import json
import os

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

ORDERS = list(range(2, 64))
DEFAULT_GRID = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))


def case(q, sigma, steps, mean, shape, delta):
    inner = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    acc = rdp.RdpAccountant(orders=ORDERS)
    acc.compose(dp_event.RepeatAndSelectDpEvent(inner, mean, shape))
    single = rdp.RdpAccountant(orders=ORDERS)
    single.compose(inner)
    default = rdp.RdpAccountant(orders=DEFAULT_GRID)
    default.compose(dp_event.RepeatAndSelectDpEvent(inner, mean, shape))
    return {
        "epsilon_default_grid": default.get_epsilon(delta),
        "q": q, "sigma": sigma, "steps": steps, "mean": mean, "shape": shape, "delta": delta,
        "gamma": rdp._gamma_truncated_negative_binomial(shape, mean),
        "epsilon": acc.get_epsilon(delta),
        "epsilon_single_run": single.get_epsilon(delta),
        "rdp": list(acc._rdp),
    }


def main():
    cases = []
    for (q, sigma, steps) in [(0.05, 1.2, 120), (0.01, 0.9, 500), (0.2, 2.5, 40)]:
        for mean in [1.5, 3.0, 10.0]:
            for shape in [0.0, 0.5, 1.0, 2.0]:
                cases.append(case(q, sigma, steps, mean, shape, 1e-5))
    # The whole RDP vector is kept for a few cases only (the file stays small).
    for c in cases[4:]:
        del c["rdp"]
    out = {
        "about": "dp_accounting RdpAccountant(orders=2..63) on RepeatAndSelectDpEvent(dp_sgd(q, sigma, steps), mean, shape): "
                 "epsilon, epsilon_single_run (the inner event alone), rdp = the RDP vector at `orders`; epsilon_default_grid: the same on "
                 "dptrain's default order grid (dp_accounting's fractional orders are looser); gamma = the TNB parameter for the mean; "
                 "made by tests/reference/repeat_and_select.py",
        "dp_accounting_version": getattr(dp_accounting, "__version__", "unknown"),
        "orders": ORDERS,
        "cases": cases,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "repeat_and_select.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
