//! Claims about the RDP accountant, checked against reference values computed with Google's
//! dp_accounting / the legacy TF-Privacy-Opacus RDP code (tests/reference/accounting.json, copied
//! from the project's shared reference set; `about` in the file says how each column was made).

use dptrain::accounting::{calibrate_noise_multiplier, DpEvent, RdpAccountant};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/accounting.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn rdp_matches_opacus_style_reference_to_1e_6_relative() {
    let acc = RdpAccountant::default();
    let mut checked = 0;
    for c in cases() {
        let Some(want) = c["eps_rdp_opacus_style"].as_f64() else { continue };
        let (q, s, k, d) = (
            c["q"].as_f64().unwrap(),
            c["sigma"].as_f64().unwrap(),
            c["steps"].as_u64().unwrap(),
            c["delta"].as_f64().unwrap(),
        );
        let got = acc.epsilon(&DpEvent::dp_sgd(q, s, k), d).unwrap();
        assert!(
            (got.epsilon - want).abs() <= 1e-6 * want.abs(),
            "q={q} σ={s} steps={k} δ={d}: got {} (order {}), want {want} (order {})",
            got.epsilon,
            got.optimal_order,
            c["rdp_opacus_opt_order"]
        );
        checked += 1;
    }
    assert!(checked > 50, "only {checked} reference cases checked");
}

#[test]
fn rdp_epsilon_grows_with_steps_and_sampling_rate_and_falls_with_noise() {
    let acc = RdpAccountant::default();
    let eps = |q, s, k| acc.epsilon(&DpEvent::dp_sgd(q, s, k), 1e-5).unwrap().epsilon;
    assert!(eps(0.01, 1.0, 100) < eps(0.01, 1.0, 1000));
    assert!(eps(0.01, 1.0, 100) < eps(0.02, 1.0, 100));
    assert!(eps(0.01, 1.0, 100) > eps(0.01, 1.5, 100));
    assert_eq!(eps(0.0, 1.0, 100), 0.0);
}

#[test]
fn self_composition_equals_repeated_composition() {
    let acc = RdpAccountant::default();
    let step = DpEvent::dp_sgd_step(0.02, 0.9);
    let a = acc.epsilon(&DpEvent::dp_sgd(0.02, 0.9, 7), 1e-6).unwrap().epsilon;
    let b = acc.epsilon(&DpEvent::Composed { events: vec![step; 7] }, 1e-6).unwrap().epsilon;
    assert!((a - b).abs() < 1e-12 * a);
    let mut ledger = dptrain::accounting::event::Ledger::default();
    for _ in 0..7 {
        ledger.record_step(0.02, 0.9);
    }
    assert_eq!(ledger.entries.len(), 1, "identical steps merge into one ledger entry");
    let c = acc.epsilon(&ledger.as_event(), 1e-6).unwrap().epsilon;
    assert!((a - c).abs() < 1e-12 * a);
}

#[test]
fn calibrated_sigma_never_overshoots_the_target() {
    let acc = RdpAccountant::default();
    for &(target, q, k) in &[(3.0, 0.05, 19u64), (1.0, 0.01, 1000), (8.0, 0.2, 50), (0.5, 0.001, 10_000)] {
        let (sigma, eps) =
            calibrate_noise_multiplier(target, 1e-6, |s| Ok(acc.epsilon(&DpEvent::dp_sgd(q, s, k), 1e-5)?.epsilon))
                .unwrap();
        assert!(eps <= target, "ε({sigma}) = {eps} > {target}");
        // and it is tight: a slightly smaller σ exceeds the target.
        let below = acc.epsilon(&DpEvent::dp_sgd(q, sigma * (1.0 - 1e-4), k), 1e-5).unwrap().epsilon;
        assert!(below > target, "σ = {sigma} is not the smallest: {below} ≤ {target}");
    }
}

#[test]
fn rdp_calibration_matches_reference_sigma() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/calibration.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let tol = v["rel_tol"].as_f64().unwrap();
    for r in v["rows"].as_array().unwrap() {
        let (target, d, q, k) = (
            r["target_eps"].as_f64().unwrap(),
            r["delta"].as_f64().unwrap(),
            r["q"].as_f64().unwrap(),
            r["steps"].as_u64().unwrap(),
        );
        let want = r["rdp_opacus_style"]["sigma"].as_f64().unwrap();
        let (sigma, eps) =
            dptrain::accounting::calibrate(dptrain::accounting::AccountantKind::Rdp, target, d, q, k, tol).unwrap();
        assert!(eps <= target);
        assert!(
            (sigma / want - 1.0).abs() <= 2.0 * tol,
            "target {target} q={q} steps={k}: σ = {sigma}, reference {want}"
        );
    }
}

/// Claim: private selection's RDP bound (Papernot & Steinke, Theorem 2, truncated negative
/// binomial runs) equals Google's dp_accounting: the TNB parameter γ for a mean, the RDP vector and
/// ε on the integer orders 2..63 (where both compute the subsampled Gaussian's RDP exactly), and on
/// dptrain's default grid ε at or below dp_accounting's, whose fractional orders are looser
/// (tests/reference/repeat_and_select.json, made by the script beside it).
#[test]
fn repeat_and_select_matches_dp_accounting() {
    use dptrain::accounting::selection::tnb_gamma;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/repeat_and_select.json"))
        .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let orders: Vec<f64> = v["orders"].as_array().unwrap().iter().map(|o| o.as_f64().unwrap()).collect();
    assert_eq!(orders, (2..64).map(|o| o as f64).collect::<Vec<_>>());
    let acc = RdpAccountant { orders };
    let default = RdpAccountant::default();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 36);
    let mut vectors = 0;
    for c in cases {
        let f = |k: &str| c[k].as_f64().unwrap();
        let (mean, shape) = (f("mean"), f("shape"));
        let gamma = tnb_gamma(shape, mean).unwrap();
        assert!((gamma - f("gamma")).abs() <= 1e-9 * f("gamma"), "γ: {gamma} vs {}", f("gamma"));
        let inner = DpEvent::dp_sgd(f("q"), f("sigma"), c["steps"].as_u64().unwrap());
        let event = DpEvent::RepeatAndSelect { event: Box::new(inner.clone()), mean, shape };
        let single = acc.epsilon(&inner, f("delta")).unwrap().epsilon;
        assert!(
            (single - f("epsilon_single_run")).abs() <= 1e-9 * single,
            "single run ε {single} vs {}",
            f("epsilon_single_run")
        );
        let got = acc.epsilon(&event, f("delta")).unwrap().epsilon;
        assert!(
            (got - f("epsilon")).abs() <= 1e-9 * f("epsilon"),
            "mean {mean} η {shape}: ε {got} vs {}",
            f("epsilon")
        );
        assert!(got > single, "selection costs more than one run");
        let on_default = default.epsilon(&event, f("delta")).unwrap().epsilon;
        let theirs = f("epsilon_default_grid");
        assert!(
            on_default <= theirs * (1.0 + 1e-12) && on_default >= theirs * 0.9,
            "default grid: {on_default} vs {theirs}"
        );
        if let Some(want) = c["rdp"].as_array() {
            for (g, w) in acc.rdp(&event).unwrap().iter().zip(want) {
                let w = w.as_f64().unwrap();
                assert!((g - w).abs() <= 1e-9 * w.abs().max(1e-12), "rdp {g} vs {w}");
            }
            vectors += 1;
        }
    }
    assert_eq!(vectors, 4);
}
