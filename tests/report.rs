//! Claims about the report a user hands to an auditor: `privacy_report.md` states exactly the
//! numbers of the certificate in the adapter file and of the ledger; per-group held-out metrics
//! equal evaluating each group alone; a non-private reference sits beside them, labelled, and a
//! mismatched one is refused; the SVG plots are valid XML carrying the plotted series.

mod common;

use common::dptrain;
use dptrain::accounting::event::{DpEvent, Ledger};
use dptrain::model::{EvalResult, ExampleScore};
use dptrain::train::eval::{per_group, NO_GROUP};
use std::collections::HashMap;
use std::path::Path;

/// A seeded 6-step DP run of the tiny model.
const REPORT_RUN: &str = "expected-batch-size = 8\nmax-physical-batch = 3\nsteps = 6\nlearning-rate = 0.05\nseed = 7";

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `| key | value |` rows of a markdown file.
fn md_rows(md: &str) -> HashMap<String, String> {
    md.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.strip_prefix("| ")?.strip_suffix(" |")?.split(" | ").collect();
            (cells.len() == 2).then(|| (cells[0].to_string(), cells[1].to_string()))
        })
        .collect()
}

fn certificate(run: &Path) -> serde_json::Value {
    let bytes = std::fs::read(run.join("release/adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&meta.metadata().as_ref().unwrap()["dptrain_certificate"]).unwrap()
}

#[test]
fn markdown_report_states_exactly_the_numbers_of_the_certificate_and_the_ledger() {
    let f = common::TinyRunDir::new("report", "numbers");
    let (ok, log) = dptrain(&["--config", &f.config("run", 5.0, REPORT_RUN)]);
    assert!(ok, "{log}");
    let run = f.out("run");
    let cert = certificate(&run);
    let md = std::fs::read_to_string(run.join("release/privacy_report.md")).unwrap();
    let rows = md_rows(&md);
    let get = |k: &str| rows.get(k).unwrap_or_else(|| panic!("no row `{k}` in:\n{md}")).clone();
    let f64_of = |k: &str| get(k).parse::<f64>().unwrap_or_else(|e| panic!("`{k}`: {e}"));
    let eps = cert["epsilon"].as_f64().unwrap();
    assert_eq!(f64_of("ε (certified, pld accountant; upper bound)"), eps);
    assert_eq!(f64_of("ε by PLD (upper bound)"), cert["epsilon_cross_check"]["pld"].as_f64().unwrap());
    let rdp = cert["epsilon_cross_check"]["rdp"].as_f64().unwrap();
    assert!(get("ε by RDP (upper bound)").starts_with(&format!("{rdp} (optimal order")));
    assert_eq!(f64_of("δ"), cert["delta"].as_f64().unwrap());
    assert_eq!(f64_of("noise multiplier σ"), cert["noise_multiplier"].as_f64().unwrap());
    assert_eq!(f64_of("clipping norm C"), cert["clip_norm"].as_f64().unwrap());
    assert_eq!(f64_of("sampling rate q"), cert["sample_rate"].as_f64().unwrap());
    assert_eq!(get("steps taken"), cert["steps"].to_string());
    assert_eq!(get("training records N"), cert["dataset_size"].to_string());
    assert_eq!(get("training data commitment"), cert["commitments"]["train"].as_str().unwrap());
    assert_eq!(get("held-out data commitment"), cert["commitments"]["test"].as_str().unwrap());
    assert_eq!(get("config commitment"), cert["commitments"]["config"].as_str().unwrap());
    assert!(md.contains(&format!("**{}.**", cert["guarantee"].as_str().unwrap())), "{md}");
    // The ledger as stated, and ε recomputed from the certificate's ledger.
    let ledger: Ledger = serde_json::from_value(cert["ledger"].clone()).unwrap();
    let DpEvent::SelfComposed { event, count } = &ledger.entries[0] else { panic!("{ledger:?}") };
    let DpEvent::PoissonSampled { q, event } = event.as_ref() else { panic!("{ledger:?}") };
    let DpEvent::Gaussian { sigma } = event.as_ref() else { panic!("{ledger:?}") };
    assert_eq!(ledger.entries.len(), 1);
    assert_eq!(
        get("1"),
        format!("{count} × Poisson-subsampled (q = {q}) Gaussian mechanism (σ = {sigma})"),
        "ledger row"
    );
    let recomputed =
        dptrain::accounting::epsilon(dptrain::accounting::AccountantKind::Pld, &ledger.as_event(), 1e-3).unwrap();
    assert_eq!(recomputed, eps);
    // The adapter named is the adapter in the folder; the JSON says the same.
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(run.join("release/adapter_model.safetensors")).unwrap());
    let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert!(md.contains(&format!("sha256 `{hash}`")), "{md}");
    let report = json(&run.join("release/privacy_report.json"));
    assert_eq!(report["epsilon"].as_f64().unwrap(), eps);
    assert_eq!(report["adapter_sha256"].as_str().unwrap(), hash);
    // What is not protected (the tuning statement quoted as given), and the plots it links, which
    // exist in the release; the loss and clip plots (private data, no noise) only in private/.
    assert!(md.contains("## What the guarantee does not cover"), "{md}");
    assert!(md.contains("the config states privacy.hyperparameters-tuned-on-private-data = false"), "{md}");
    assert!(md.contains("](plots/epsilon.svg)") && run.join("release/plots/epsilon.svg").is_file());
    for plot in ["plots/loss.svg", "plots/clip_fraction.svg"] {
        assert!(!md.contains(&format!("]({plot})")), "{plot} linked from the release report");
        assert!(!run.join("release").join(plot).exists(), "{plot} released");
        assert!(run.join("private").join(plot).is_file(), "{plot} missing from private/");
    }
    assert!(!run.join("release/plots/groups.svg").exists(), "no groups, no group plot");
    // The ε curve ends at the certified ε and never decreases.
    let curve = report["epsilon_curve"].as_array().unwrap();
    assert_eq!(curve.last().unwrap()["step"], cert["steps"]);
    assert_eq!(curve.last().unwrap()["pld"].as_f64().unwrap(), eps);
    let pld: Vec<f64> = curve.iter().map(|p| p["pld"].as_f64().unwrap()).collect();
    assert!(pld.windows(2).all(|w| w[0] <= w[1]), "{pld:?}");
}

/// Rewrites the held-out file with groups: "big" (7), "small & <odd>" (3), two without a group.
fn add_groups(f: &common::TinyRunDir) -> Vec<(String, Vec<String>)> {
    let path = f.out("test.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut by: Vec<(String, Vec<String>)> =
        vec![("big".into(), vec![]), ("small & <odd>".into(), vec![]), (NO_GROUP.into(), vec![])];
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let g = match i {
            0..=6 => 0,
            7..=9 => 1,
            _ => 2,
        };
        if g < 2 {
            v["group"] = serde_json::json!(by[g].0);
        }
        by[g].1.push(v.to_string());
        out.push(v.to_string());
    }
    std::fs::write(&path, out.join("\n") + "\n").unwrap();
    by
}

#[test]
fn per_group_metrics_equal_each_group_evaluated_alone_beside_the_labelled_reference() {
    let f = common::TinyRunDir::new("report", "groups");
    let groups = add_groups(&f);
    let cfg = f.config("run", 5.0, REPORT_RUN);
    let reference = f.out("ref").display().to_string();
    let (ok, log) = dptrain(&["--config", &cfg, "--non-private", "--out", &reference]);
    assert!(ok, "{log}");
    let (ok, log) = dptrain(&["--config", &cfg, "--reference", &reference]);
    assert!(ok, "{log}");
    assert!(log.contains("non-private reference (NO privacy"), "{log}");
    let run = f.out("run");
    let report = json(&run.join("release/privacy_report.json"));
    let reported = report["metrics"]["test_groups"].as_array().unwrap().clone();
    let mut names: Vec<&str> = groups.iter().map(|g| g.0.as_str()).collect();
    names.sort();
    assert_eq!(reported.iter().map(|g| g["group"].as_str().unwrap()).collect::<Vec<_>>(), names);
    // Each group evaluated alone with `dptrain eval` gives the reported number.
    let mut weighted = 0.0;
    for (name, lines) in &groups {
        let file = f.out("one-group.jsonl");
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let (ok, log) = dptrain(&[
            "eval",
            "--model",
            &f.out("model").display().to_string(),
            "--adapter",
            &run.display().to_string(),
            "--data",
            &file.display().to_string(),
            "--max-seq-len",
            "12",
            "--json",
        ]);
        assert!(ok, "{log}");
        let alone = serde_json::from_str::<serde_json::Value>(&log).unwrap()["metric"]["accuracy"].as_f64().unwrap();
        let g = reported.iter().find(|g| g["group"] == name.as_str()).unwrap();
        assert_eq!(g["size"].as_u64().unwrap() as usize, lines.len(), "{name}");
        assert_eq!(g["metric"]["accuracy"].as_f64().unwrap(), alone, "{name}");
        weighted += alone * lines.len() as f64;
    }
    let overall = report["metrics"]["test_accuracy"].as_f64().unwrap();
    assert!((weighted / 12.0 - overall).abs() < 1e-12, "{weighted} / 12 vs {overall}");
    // The reference's numbers are its own report's, group by group, in the private part only
    // (a non-private model of the same data is not covered by ε).
    let theirs = json(&f.out("ref/release/privacy_report.json"));
    assert_eq!(theirs["private"], false);
    let private = json(&run.join("private/run.json"));
    assert_eq!(private["non_private_reference"]["test_metric"], theirs["metrics"]["test"]);
    assert_eq!(private["non_private_reference"]["test_groups"], theirs["metrics"]["test_groups"]);
    assert!(report["non_private_reference"].is_null());
    let md = std::fs::read_to_string(run.join("release/privacy_report.md")).unwrap();
    assert!(!md.contains("non-private reference"), "{md}");
    // User text in a table cell is escaped, never HTML.
    assert!(md.contains("| small &amp; &lt;odd&gt; | 3 | accuracy "), "{md}");
    let ref_md = std::fs::read_to_string(f.out("ref/release/privacy_report.md")).unwrap();
    assert!(ref_md.contains("**NO PRIVACY GUARANTEE.**"), "{ref_md}");
    assert!(!f.out("ref/release/plots/epsilon.svg").exists(), "a non-private run has no ε to plot");
    // The group plot: one bar per group and series, the names as text (escaped, valid XML); the
    // reference's bars only in the private copy.
    for (part, with_reference) in [("release", false), ("private", true)] {
        let svg = std::fs::read_to_string(run.join(part).join("plots/groups.svg")).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        for (name, lines) in &groups {
            let label = format!("{name} (n = {})", lines.len());
            assert!(texts.iter().any(|t| t.contains(&label)), "`{label}` not in {texts:?}");
        }
        assert_eq!(texts.iter().any(|t| t.contains("non-private reference")), with_reference, "{part}: {texts:?}");
    }

    // A DP run is not a reference, and a reference on other held-out data is refused.
    let (ok, log) = dptrain(&[
        "--config",
        &cfg,
        "--out",
        &f.out("run2").display().to_string(),
        "--reference",
        &run.display().to_string(),
    ]);
    assert!(!ok && log.contains("is not a non-private run"), "{log}");
    let test = f.out("test.jsonl");
    let text = std::fs::read_to_string(&test).unwrap();
    std::fs::write(&test, text.replacen("big", "large", 1)).unwrap();
    let (ok, log) =
        dptrain(&["--config", &cfg, "--out", &f.out("run3").display().to_string(), "--reference", &reference]);
    assert!(!ok && log.contains("held-out data differs"), "{log}");
    assert!(!f.out("run3/release/adapter_model.safetensors").exists());
}

/// The points of each `<polyline>` with this stroke colour and more than two points.
fn polylines(doc: &roxmltree::Document, stroke: &str) -> Vec<Vec<(f64, f64)>> {
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(stroke))
        .map(|n| {
            n.attribute("points")
                .unwrap()
                .split_whitespace()
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect::<Vec<(f64, f64)>>()
        })
        .filter(|p| p.len() > 2)
        .collect()
}

#[test]
fn svg_plots_are_valid_xml_with_one_line_per_series_and_a_point_per_value() {
    let f = common::TinyRunDir::new("report", "svg");
    let (ok, log) = dptrain(&["--config", &f.config("run", 5.0, REPORT_RUN)]);
    assert!(ok, "{log}");
    let run = f.out("run");
    let report = json(&run.join("release/privacy_report.json"));
    let curve = report["epsilon_curve"].as_array().unwrap();
    let steps = report["steps"].as_u64().unwrap() as usize;
    let read = |part: &str, name: &str| std::fs::read_to_string(run.join(part).join("plots").join(name)).unwrap();

    let svg = read("release", "epsilon.svg");
    let doc = roxmltree::Document::parse(&svg).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
    for legend in ["PLD", "RDP", "target ε = 5"] {
        assert!(texts.iter().any(|t| t.trim() == legend), "legend `{legend}` not in {texts:?}");
    }
    let pld = polylines(&doc, "#1F77B4");
    let rdp = polylines(&doc, "#D62728");
    assert_eq!((pld.len(), rdp.len()), (1, 1), "one PLD and one RDP line");
    // The curve's points and ε = 0 at step 0.
    assert_eq!(pld[0].len(), curve.len() + 1);
    assert_eq!(rdp[0].len(), curve.len() + 1);
    // x increases with the step; ε never decreases, so the SVG y (downwards) never increases;
    // RDP is above PLD (a looser bound) at the end: smaller y.
    assert!(pld[0].windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 >= w[1].1), "{:?}", pld[0]);
    assert!(rdp[0].last().unwrap().1 <= pld[0].last().unwrap().1);

    for (name, n) in [("loss.svg", steps), ("clip_fraction.svg", steps)] {
        let svg = read("private", name);
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{name}: {e}"));
        let lines = polylines(&doc, "#1F77B4");
        assert_eq!(lines.len(), 1, "{name}");
        assert_eq!(lines[0].len(), n, "{name}: one point per step");
    }
}

#[test]
fn group_metrics_aggregate_each_groups_own_records() {
    let scores = [
        ExampleScore::Correct(true),
        ExampleScore::Correct(false),
        ExampleScore::Correct(true),
        ExampleScore::Correct(true),
        ExampleScore::Correct(false),
    ];
    let g = |s: &str| Some(s.to_string());
    let groups = [g("b"), g("a"), None, g("b"), g("b")];
    let out = per_group(&scores, &groups);
    let got: Vec<(&str, usize, EvalResult)> = out.iter().map(|x| (x.group.as_str(), x.size, x.metric)).collect();
    assert_eq!(
        got,
        [
            (NO_GROUP, 1, EvalResult::Accuracy(1.0)),
            ("a", 1, EvalResult::Accuracy(0.0)),
            ("b", 3, EvalResult::Accuracy(2.0 / 3.0))
        ]
    );
    assert!(per_group(&scores, &[None, None, None, None, None]).is_empty());
    // Perplexity per group pools the tokens: exp(Σ NLL / Σ tokens), not a mean of perplexities.
    let nll = [ExampleScore::Nll { sum: 2.0, tokens: 1 }, ExampleScore::Nll { sum: 3.0, tokens: 4 }];
    let out = per_group(&nll, &[g("x"), g("x")]);
    assert_eq!(out[0].metric, EvalResult::Perplexity { perplexity: 1f64.exp(), mean_nll: 1.0, tokens: 5 });
}

#[test]
fn ledger_prefix_keeps_exactly_the_first_steps() {
    let mut l = Ledger::default();
    for _ in 0..5 {
        l.record_step(0.1, 1.0);
    }
    for _ in 0..3 {
        l.record_step(0.2, 1.5);
    }
    for k in 0..=9u64 {
        let p = l.prefix(k);
        let mut want = Ledger::default();
        for i in 0..k.min(8) {
            if i < 5 {
                want.record_step(0.1, 1.0)
            } else {
                want.record_step(0.2, 1.5)
            }
        }
        assert_eq!(p, want, "k = {k}");
    }
}
