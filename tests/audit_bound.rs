//! The one-run audit bound (`audit::p_value`, `audit::epsilon_lower_bound`) equals an
//! independent computation with scipy's binomial distribution (tests/reference/audit_bound.py):
//! p-values to 1e-9 absolute (and 1e-6 relative), ε lower bounds to 1e-6.

use dptrain::audit::{epsilon_lower_bound, p_value};

#[test]
fn the_one_run_bound_equals_scipys_computation_of_the_papers_formula() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/audit_bound.json");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut positive = 0;
    for c in cases {
        let u = |k: &str| c[k].as_u64().unwrap() as usize;
        let f = |k: &str| c[k].as_f64().unwrap();
        let (m, rr, v, delta, conf) = (u("m"), u("r"), u("v"), f("delta"), f("p"));
        for (eps, want) in c["p_value_at"].as_object().unwrap() {
            let got = p_value(m, rr, v, eps.parse().unwrap(), delta);
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-9 + 1e-6 * want,
                "m {m} r {rr} v {v} δ {delta} ε {eps}: p-value {got} vs scipy {want}"
            );
        }
        let got = epsilon_lower_bound(m, rr, v, delta, conf);
        let want = f("eps_lower_bound");
        assert!((got - want).abs() <= 1e-6, "m {m} r {rr} v {v} δ {delta}: ε ≥ {got} vs scipy {want}");
        positive += usize::from(want > 0.1);
    }
    // The cases include bounds that are positive and ones that are zero.
    assert!(positive >= 6 && positive < cases.len(), "{positive}");
}
