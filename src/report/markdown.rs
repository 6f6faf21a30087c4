//! `privacy_report.md`: the report for a reader who knows DP but not this run, rendered from the
//! same JSON value that is written as `privacy_report.json`, so the two cannot disagree. Numbers
//! are printed exactly as in the JSON (shortest round-trip form), so an auditor (or a test) can
//! compare them with the certificate in the adapter file and with the ledger.

use serde_json::Value;
use std::fmt::Write;

/// An exact number as the JSON holds it; "—" for null or absent.
fn num(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

/// An ε that may be unavailable (`{"unavailable": reason}`).
fn eps(v: &Value) -> String {
    match v.get("unavailable") {
        Some(why) => format!("unavailable ({})", text(why)),
        None => num(v),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

/// A table cell: no pipes or newlines, and no HTML (a group named `<b>` stays text).
fn cell(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('|', "\\|").replace('\n', " ")
}

fn row(out: &mut String, key: &str, value: &str) {
    let _ = writeln!(out, "| {} | {} |", cell(key), cell(value));
}

/// "accuracy 0.95" or "perplexity 68.7 (mean NLL …, … tokens)" of a serialised `EvalResult`.
fn metric(v: &Value) -> String {
    if let Some(a) = v.get("accuracy") {
        return format!("accuracy {}", num(a));
    }
    if let Some(p) = v.get("perplexity") {
        return format!(
            "perplexity {} (mean NLL {}, {} tokens)",
            num(&p["perplexity"]),
            num(&p["mean_nll"]),
            num(&p["tokens"])
        );
    }
    "—".into()
}

/// One ledger entry in words.
fn event(v: &Value) -> String {
    match v.get("kind").and_then(Value::as_str) {
        Some("self_composed") => format!("{} × {}", num(&v["count"]), event(&v["event"])),
        Some("poisson_sampled") => format!("Poisson-subsampled (q = {}) {}", num(&v["q"]), event(&v["event"])),
        Some("gaussian") => format!("Gaussian mechanism (σ = {})", num(&v["sigma"])),
        Some("composed") => {
            let parts: Vec<String> = v["events"].as_array().into_iter().flatten().map(event).collect();
            format!("composition of [{}]", parts.join(", "))
        }
        Some("mixture") => {
            let parts: Vec<String> = v["events"].as_array().into_iter().flatten().map(event).collect();
            format!("one of [{}], drawn independently of the data", parts.join("; "))
        }
        Some("repeat_and_select") => format!(
            "the best of K runs (K truncated negative binomial, mean {}, shape η = {}) of {}",
            num(&v["mean"]),
            num(&v["shape"]),
            event(&v["event"])
        ),
        _ => v.to_string(),
    }
}

/// The "Data and model" table's common rows: the data files' sizes and commitments (a search's
/// validation file too), labels and base model.
fn data_and_model(o: &mut String, r: &Value) {
    let _ = writeln!(o, "## Data and model\n");
    let _ = writeln!(o, "| item | value |\n|---|---|");
    row(o, "training records N", &num(&r["dataset"]["size"]));
    row(o, "training data commitment", &text(&r["dataset"]["commitment"]));
    if r["validation_dataset"].is_object() {
        row(o, "validation records", &num(&r["validation_dataset"]["size"]));
        row(o, "validation data commitment", &text(&r["validation_dataset"]["commitment"]));
    }
    row(o, "held-out records", &num(&r["test_dataset"]["size"]));
    row(o, "held-out data commitment", &text(&r["test_dataset"]["commitment"]));
    row(o, "commitment scheme", &text(&r["certificate"]["commitments"]["scheme"]));
    if let Some(labels) = r["dataset"]["labels"].as_array().filter(|l| !l.is_empty()) {
        row(o, "labels", &labels.iter().map(text).collect::<Vec<_>>().join(", "));
    }
    row(o, "base model", &text(&r["base_model"]["path"]));
    row(o, "base model sha256 (config.json and weights)", &text(&r["base_model"]["sha256"]));
    if r["base_model"]["quantization"].is_string() {
        row(o, "base model quantization", &text(&r["base_model"]["quantization"]));
    }
}

/// The markdown report of a `privacy_report.json` value.
pub fn render(r: &Value) -> String {
    let mut o = String::new();
    let private = r["private"].as_bool().unwrap_or(false);
    let cert = &r["certificate"];
    let _ = writeln!(o, "# Privacy report\n");
    let _ = writeln!(o, "Written by {} for the adapter in this folder (`adapter_model.safetensors`, sha256 `{}`). The same content is in `privacy_report.json`; the certificate below is also stored in the adapter file's safetensors metadata (`dptrain_certificate`), and `dptrain verify <this folder>` recomputes ε from the ledger, re-derives every claim below from the certificate and checks the hashes.\n", text(&cert["engine"]), text(&r["adapter_sha256"]));
    let _ = writeln!(o, "This folder (`release/`) is meant to be published as a whole: it holds nothing outside ε's cover except what \"What the guarantee does not cover\" names. The run's `private/` folder (seed, keys, per-step metrics, checkpoints) must never be published.\n");

    let _ = writeln!(o, "## Guarantee\n");
    let seeded = r["seeded"].as_bool().unwrap_or(false);
    if private && seeded {
        let _ = writeln!(o, "**{}.**\n", text(&r["guarantee"]));
        let _ = writeln!(o, "**NO PRIVACY GUARANTEE.** The ε below is what the mechanism would give with secret randomness; this run's sampling and noise were derived from a configured seed, so anyone with the config can reproduce and remove the noise. `dptrain verify` fails on it.\n");
    } else if private {
        let _ = writeln!(o, "**{}.**\n", text(&r["guarantee"]));
        let _ = writeln!(o, "That is: for any two training sets that differ by adding or removing one record (one JSONL line), the distribution of everything this run released (the adapter, and this report's ε) changes by at most a factor e^ε, except with probability δ. ε is an upper bound from the accountant named below, computed from the ledger of every step actually taken.\n");
    } else {
        let _ = writeln!(o, "**NO PRIVACY GUARANTEE.** This is a non-private reference run (`--non-private`): no clipping, no noise. Its adapter must not be released as private; it exists to measure what privacy costs in utility.\n");
    }
    let _ = writeln!(o, "| quantity | value |\n|---|---|");
    let acc = text(&r["accountant"]);
    row(&mut o, &format!("ε (certified, {acc} accountant; upper bound)"), &num(&r["epsilon"]));
    row(&mut o, "ε by PLD (upper bound)", &eps(&r["epsilon_by_accountant"]["pld"]));
    row(
        &mut o,
        "ε by RDP (upper bound)",
        &format!("{} (optimal order {})", eps(&r["epsilon_by_accountant"]["rdp"]), num(&r["rdp_optimal_order"])),
    );
    row(&mut o, "target ε", &num(&r["target_epsilon"]));
    let n = r["dataset"]["size"].as_f64().unwrap_or(f64::NAN);
    row(&mut o, "δ", &num(&r["delta"]));
    row(
        &mut o,
        "δ compared with 1/N",
        &format!("δ · N = {} (1/N = {:.3e}; δ should be well below 1/N)", num(&r["delta_times_n"]), 1.0 / n),
    );
    o.push('\n');

    let _ = writeln!(o, "## Mechanism (DP-SGD)\n");
    let _ = writeln!(o, "| parameter | value |\n|---|---|");
    row(&mut o, "noise multiplier σ", &num(&r["noise_multiplier"]));
    row(&mut o, "clipping norm C", &num(&r["clip_norm"]));
    row(&mut o, "clipping", &text(&r["clipping"]));
    row(&mut o, "gradient arithmetic", &text(&cert["gradient_dtype"]));
    row(&mut o, "sampling rate q", &num(&r["sample_rate"]));
    row(&mut o, "expected batch size", &num(&r["expected_batch_size"]));
    row(&mut o, "steps taken", &num(&r["steps"]));
    row(&mut o, "steps planned", &num(&r["planned_steps"]));
    if r["linear_probe_steps"].as_u64().unwrap_or(0) > 0 {
        row(
            &mut o,
            "of which linear probe",
            &format!(
                "the first {} steps trained the head alone on the frozen model's pooled features (same q, C and σ)",
                num(&r["linear_probe_steps"])
            ),
        );
    }
    row(&mut o, "epochs (steps · q)", &num(&r["epochs"]));
    row(&mut o, "released parameters", &text(&r["released_parameters"]));
    row(&mut o, "stopped early", &text(&r["stopped_early"]));
    row(&mut o, "sampler", &text(&r["sampler"]));
    row(&mut o, "noise generator", &text(&r["noise_generator"]));
    row(
        &mut o,
        "seeded",
        if seeded {
            "YES: the noise was derived from a configured seed; anyone with the config can reproduce it. It certifies nothing."
        } else {
            "no: the noise key came from the operating system's entropy"
        },
    );
    row(&mut o, "accountant", &format!("{acc}: {}", text(&cert["accountant_detail"])));
    row(&mut o, "neighbouring relation", &text(&r["neighbouring_relation"]));
    o.push('\n');

    data_and_model(&mut o, r);
    row(&mut o, "task", &text(&r["task"]));
    row(
        &mut o,
        "LoRA target modules",
        &r["target_modules"].as_array().into_iter().flatten().map(text).collect::<Vec<_>>().join(", "),
    );
    row(&mut o, "config commitment", &text(&cert["commitments"]["config"]));
    o.push('\n');

    let _ = writeln!(o, "## Utility (held-out data)\n");
    let m = &r["metrics"];
    let reference = &r["non_private_reference"];
    let _ = writeln!(o, "| | held-out metric |\n|---|---|");
    row(&mut o, if private { "this run (DP)" } else { "this run (NOT private)" }, &metric(&m["test"]));
    if !m["base_test"].is_null() {
        row(&mut o, "base model, before training", &metric(&m["base_test"]));
    }
    if !reference.is_null() {
        row(
            &mut o,
            &format!("non-private reference, NO privacy (`{}`)", text(&reference["dir"])),
            &metric(&reference["test_metric"]),
        );
    }
    o.push('\n');
    if let Some(groups) = m["test_groups"].as_array().filter(|g| !g.is_empty()) {
        let _ = writeln!(
            o,
            "Per group (the `group` field of the held-out records). DP tends to cost small groups the most.\n"
        );
        let with_ref = !reference.is_null();
        let _ = writeln!(
            o,
            "| group | records | this run |{}\n|---|---|---|{}",
            if with_ref { " non-private reference |" } else { "" },
            if with_ref { "---|" } else { "" }
        );
        for g in groups {
            let mut line = format!("| {} | {} | {} |", cell(&text(&g["group"])), num(&g["size"]), metric(&g["metric"]));
            if with_ref {
                let rg = reference["test_groups"].as_array().into_iter().flatten().find(|x| x["group"] == g["group"]);
                let _ = write!(line, " {} |", rg.map(|x| metric(&x["metric"])).unwrap_or_else(|| "—".into()));
            }
            let _ = writeln!(o, "{line}");
        }
        o.push('\n');
    }

    if let Some(plots) = r["plots"].as_array().filter(|p| !p.is_empty()) {
        let _ = writeln!(o, "## Plots\n");
        for p in plots {
            let _ = writeln!(o, "![{}]({})\n", text(&p["title"]), text(&p["file"]));
        }
    }

    let _ = writeln!(o, "## What the guarantee does not cover\n");
    for item in r["not_protected"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "- {}", text(item));
    }
    o.push('\n');

    let _ = writeln!(o, "## Ledger\n");
    let _ = writeln!(
        o,
        "Every step taken, in order (consecutive identical steps merged). ε above is computed from exactly this.\n"
    );
    ledger_and_config(
        &mut o,
        r,
        "Kept in the run's private part (`private/run.json`): this run is seeded and its config holds the seed.",
    );
    o
}

/// The ledger table (one row per entry, in words), then the config (or why it is withheld).
fn ledger_and_config(o: &mut String, r: &Value, withheld: &str) {
    let _ = writeln!(o, "| # | event |\n|---|---|");
    for (i, e) in r["ledger"]["entries"].as_array().into_iter().flatten().enumerate() {
        let _ = writeln!(o, "| {} | {} |", i + 1, cell(&event(e)));
    }
    o.push('\n');
    if r["config"].is_string() {
        let _ = writeln!(o, "## Config\n\n```toml\n{}\n```", text(&r["config"]).trim_end());
    } else {
        let _ = writeln!(o, "## Config\n\n{withheld}");
    }
}

/// The markdown report of a private hyper-parameter search (`dptrain tune`'s
/// `privacy_report.json`).
pub fn render_search(r: &Value) -> String {
    let mut o = String::new();
    let cert = &r["certificate"];
    let sel = &r["selection"];
    let seeded = r["seeded"].as_bool().unwrap_or(false);
    let _ = writeln!(o, "# Privacy report: private hyper-parameter search\n");
    let _ = writeln!(o, "Written by {} for the adapter in this folder (`adapter_model.safetensors`, sha256 `{}`), the best of a private search. The same content is in `privacy_report.json`; the certificate is also stored in the adapter file's safetensors metadata (`dptrain_certificate`), and `dptrain verify <this folder>` recomputes ε from the ledger and checks every claim below against it.\n", text(&cert["engine"]), text(&r["adapter_sha256"]));
    let _ = writeln!(o, "## Guarantee\n");
    let _ = writeln!(o, "**{}.** Hyper-parameters {}.\n", text(&r["guarantee"]), text(&r["hyperparameters"]));
    if seeded {
        let _ = writeln!(o, "**NO PRIVACY GUARANTEE.** This search is seeded: its trials' sampling and noise can be reproduced from the config. `dptrain verify` fails on it.\n");
    } else {
        let _ = writeln!(o, "That is: for any two datasets (training and validation records together) that differ by adding or removing one record, the distribution of everything this search released (the selected adapter, its settings, its noisy validation score and this report's ε) changes by at most a factor e^ε, except with probability δ. The cost of every trial and of choosing among them is included.\n");
    }
    let _ = writeln!(o, "| quantity | value |\n|---|---|");
    row(&mut o, "ε (certified, RDP accountant; upper bound)", &num(&r["epsilon"]));
    row(&mut o, "ε by PLD", &eps(&r["epsilon_by_accountant"]["pld"]));
    row(&mut o, "target ε", &num(&r["target_epsilon"]));
    row(&mut o, "δ", &num(&r["delta"]));
    row(&mut o, "accountant", &text(&cert["accountant_detail"]));
    o.push('\n');
    let _ = writeln!(o, "## Search\n");
    let _ = writeln!(o, "{}.\n", text(&sel["method"]));
    let _ = writeln!(o, "| item | value |\n|---|---|");
    let d = &sel["trials_distribution"];
    row(
        &mut o,
        "number of trials K",
        &format!(
            "{} (shape η = {}, mean {}, γ = {}); the number actually run is {}",
            text(&d["kind"]),
            num(&d["shape"]),
            num(&d["mean"]),
            num(&d["gamma"]),
            text(&sel["number_of_trials"])
        ),
    );
    row(&mut o, "score", &text(&sel["score"]));
    row(&mut o, "score noise s (records)", &num(&sel["score_noise"]));
    row(&mut o, "validation records", &num(&sel["validation_size"]));
    for (k, v) in sel["search_space"].as_object().into_iter().flatten() {
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            row(&mut o, &format!("search space: {k}"), &v.to_string());
        }
    }
    row(&mut o, "each candidate's DP-SGD steps alone (RDP ε)", &num(&sel["per_candidate_epsilon_rdp"]));
    o.push('\n');
    let _ = writeln!(o, "| candidate | settings | q | steps | σ |\n|---|---|---|---|---|");
    for (i, c) in sel["candidates"].as_array().into_iter().flatten().enumerate() {
        let _ = writeln!(
            o,
            "| {i} | {} | {} | {} | {} |",
            cell(&c["settings"].to_string()),
            num(&c["sample_rate"]),
            num(&c["steps"]),
            num(&c["noise_multiplier"])
        );
    }
    o.push('\n');
    let _ = writeln!(o, "## Selected\n");
    let _ = writeln!(o, "| item | value |\n|---|---|");
    row(&mut o, "candidate", &num(&sel["selected"]["candidate"]));
    row(&mut o, "settings", &sel["selected"]["settings"].to_string());
    row(
        &mut o,
        "noisy validation score (correct predictions + noise)",
        &num(&sel["selected"]["noisy_validation_score"]),
    );
    row(&mut o, "noise multiplier σ", &num(&r["noise_multiplier"]));
    row(&mut o, "clipping norm C", &num(&r["clip_norm"]));
    row(&mut o, "clipping", &text(&r["clipping"]));
    row(&mut o, "sampling rate q", &num(&r["sample_rate"]));
    row(&mut o, "expected batch size", &num(&r["expected_batch_size"]));
    row(&mut o, "steps", &num(&r["steps"]));
    row(&mut o, "held-out metric (test file, not protected)", &metric(&r["metrics"]["test"]));
    o.push('\n');
    data_and_model(&mut o, r);
    o.push('\n');
    let _ = writeln!(o, "## What the guarantee does not cover\n");
    for item in r["not_protected"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "- {}", text(item));
    }
    o.push('\n');
    let _ = writeln!(o, "## Ledger\n\nε above is computed from exactly this.\n");
    ledger_and_config(
        &mut o,
        r,
        "Kept in the search's private part (`private/run.json`): it is seeded and its config holds the seed.",
    );
    o
}
