//! Claims about `dptrain` on a tiny Llama folder written by the test: DP-LoRA language modelling
//! on `{"text"}` and `{"prompt", "completion"}` records writes a CAUSAL_LM adapter in the PEFT
//! layout with held-out perplexity before and after; `dptrain eval` of base + adapter gives the
//! perplexity the run reported; bad language-modelling input is a clear error; and the black-box
//! audit's secret-completion canaries catch a non-private run and not a DP one.

mod common;

use std::path::PathBuf;

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("dptrain-llama-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        common::write_tiny_llama_dir(&dir.join("model"), 11);
        let words = common::tiny_words();
        let sentence = |i: usize, n: usize| -> String {
            (0..n).map(|j| words[(i * 5 + j * 3) % words.len()].as_str()).collect::<Vec<_>>().join(" ")
        };
        let text: Vec<String> =
            (0..60).map(|i| serde_json::json!({"text": sentence(i, 4 + i % 9)}).to_string()).collect();
        std::fs::write(dir.join("train.jsonl"), text[..48].join("\n") + "\n").unwrap();
        std::fs::write(dir.join("test.jsonl"), text[48..].join("\n") + "\n").unwrap();
        let pc: Vec<String> = (0..60)
            .map(|i| {
                serde_json::json!({"prompt": sentence(i, 3), "completion": sentence(i + 1, 2 + i % 4)}).to_string()
            })
            .collect();
        std::fs::write(dir.join("pc-train.jsonl"), pc[..48].join("\n") + "\n").unwrap();
        std::fs::write(dir.join("pc-test.jsonl"), pc[48..].join("\n") + "\n").unwrap();
        Fixture { dir }
    }

    fn config(&self, train: &str, test: &str, out: &str, extra_lora: &str) -> PathBuf {
        let d = self.dir.display();
        let text = format!(
            "[model]\npath = \"{d}/model\"\nmax-seq-len = 10\n\n[data]\ntrain = \"{d}/{train}\"\ntest = \"{d}/{test}\"\n\n\
             [lora]\nrank = 2\nalpha = 4\n{extra_lora}\n\n[privacy]\ntarget-epsilon = 8.0\ndelta = 1e-3\nclip-norm = 1.0\nhyperparameters-tuned-on-private-data = false\n\n\
             [training]\nexpected-batch-size = 8\nmax-physical-batch = 3\nsteps = 4\nlearning-rate = 0.01\nseed = 7\n\n\
             [output]\ndir = \"{d}/{out}\"\n"
        );
        let path = self.dir.join(format!("{out}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

use common::dptrain;

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn llama_dp_lora_writes_a_causal_lm_adapter_and_eval_reproduces_its_perplexity() {
    let f = Fixture::new("lm");
    let cfg = f.config("train.jsonl", "test.jsonl", "run", "target-modules = [\"q_proj\", \"down_proj\"]");
    let (ok, log) = dptrain(&["--config", cfg.to_str().unwrap()]);
    assert!(ok, "{log}");
    assert!(log.contains("test perplexity") && log.contains("base model"), "{log}");
    let out = f.dir.join("run");
    let adapter_cfg = json(out.join("release/adapter_config.json"));
    assert_eq!(adapter_cfg["task_type"], "CAUSAL_LM");
    assert_eq!(adapter_cfg["modules_to_save"], serde_json::Value::Null);
    // Full module names: PEFT wraps exactly the trained modules (a short name matches as a suffix).
    assert_eq!(
        adapter_cfg["target_modules"],
        serde_json::json!([
            "model.layers.0.mlp.down_proj",
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.mlp.down_proj",
            "model.layers.1.self_attn.q_proj"
        ])
    );
    let bytes = std::fs::read(out.join("release/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want = Vec::new();
    for l in 0..2 {
        for m in ["mlp.down_proj", "self_attn.q_proj"] {
            for ab in ["A", "B"] {
                want.push(format!("base_model.model.model.layers.{l}.{m}.lora_{ab}.weight"));
            }
        }
    }
    want.sort();
    assert_eq!(names, want);
    let report = json(out.join("release/privacy_report.json"));
    let eps = report["epsilon"].as_f64().unwrap();
    assert!(eps > 0.0 && eps <= 8.0);
    let after = report["metrics"]["test_perplexity"]["perplexity"].as_f64().unwrap();
    let before = report["metrics"]["base_test_perplexity"]["perplexity"].as_f64().unwrap();
    assert!(after.is_finite() && before.is_finite() && after != before, "{before} → {after}");
    assert!(report["metrics"]["test_accuracy"].is_null());
    // eval of base + adapter on the same file gives the reported perplexity; the base gives `before`.
    let d = f.dir.display().to_string();
    let args = |adapter: bool| {
        let mut a = vec!["eval".to_string(), "--model".into(), format!("{d}/model"), "--data".into()];
        a.extend([format!("{d}/test.jsonl"), "--max-seq-len".into(), "10".into(), "--json".into()]);
        a.extend(["--max-new-tokens".into(), "3".into(), "--samples".into(), "2".into()]);
        if adapter {
            a.extend(["--adapter".into(), format!("{d}/run")]);
        }
        a
    };
    for (adapter, want) in [(true, after), (false, before)] {
        let a = args(adapter);
        let (ok, log) = dptrain(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{log}");
        let r: serde_json::Value = serde_json::from_str(&log).unwrap();
        let got = r["metric"]["perplexity"]["perplexity"].as_f64().unwrap();
        assert!((got / want - 1.0).abs() < 1e-6, "adapter {adapter}: eval {got} vs run {want}");
        assert_eq!(r["samples"].as_array().unwrap().len(), 2);
    }
}

#[test]
fn prompt_completion_records_train_and_report_completion_token_counts() {
    let f = Fixture::new("pc");
    let cfg = f.config("pc-train.jsonl", "pc-test.jsonl", "run", "");
    let (ok, log) = dptrain(&["--config", cfg.to_str().unwrap()]);
    assert!(ok, "{log}");
    let report = json(f.dir.join("run/release/privacy_report.json"));
    // Held-out targets = completion tokens + one end-of-sequence token per record, truncated to 10.
    let words = |s: &str| s.split_whitespace().count();
    let mut want = 0;
    for line in std::fs::read_to_string(f.dir.join("pc-test.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (p, c) = (words(v["prompt"].as_str().unwrap()), words(v["completion"].as_str().unwrap()) + 1);
        want += (p + c).min(10) - p;
    }
    assert_eq!(report["metrics"]["test_perplexity"]["tokens"].as_u64().unwrap() as usize, want);
    assert_eq!(
        json(f.dir.join("run/release/adapter_config.json"))["target_modules"],
        serde_json::json!([
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ])
    );
}

#[test]
fn bad_language_modelling_input_is_a_clear_error() {
    let f = Fixture::new("bad");
    let d = &f.dir;
    let cases: [(&str, &str, &str); 5] = [
        ("label.jsonl", "{\"text\": \"w4 w5 w6\", \"label\": \"a\"}\n", "label.jsonl:1: field `label`"),
        (
            "mixed.jsonl",
            "{\"text\": \"w4 w5\"}\n{\"prompt\": \"w4\", \"completion\": \"w5\"}\n",
            "mixed.jsonl:2: mixes record formats",
        ),
        ("short.jsonl", "{\"text\": \"w4 w5\"}\n{\"text\": \"w7\"}\n", "short.jsonl:2: 1 token(s)"),
        ("noc.jsonl", "{\"prompt\": \"w4 w5\"}\n", "noc.jsonl:1: missing field `completion`"),
        (
            "longprompt.jsonl",
            "{\"prompt\": \"w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14\", \"completion\": \"w5\"}\n",
            "longprompt.jsonl:1: the prompt has 11 tokens",
        ),
    ];
    for (name, content, want) in cases {
        std::fs::write(d.join(name), content).unwrap();
        let cfg = f.config(name, "test.jsonl", &format!("out-{name}"), "");
        let (ok, log) = dptrain(&["--config", cfg.to_str().unwrap()]);
        assert!(!ok && log.contains(want), "{name}: {log}");
        assert!(!d.join(format!("out-{name}")).join("release/adapter_model.safetensors").exists());
    }
    let cfg = f.config("train.jsonl", "test.jsonl", "bert-target", "target-modules = [\"query\"]");
    let (ok, log) = dptrain(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok && log.contains("`query` matches no linear layer of a Llama-family model"), "{log}");
}

#[test]
fn the_black_box_audit_of_a_language_model_scores_secret_completions_and_stays_below_the_certificate() {
    let f = Fixture::new("audit");
    let cfg = f.config(
        "pc-train.jsonl",
        "pc-test.jsonl",
        "run",
        "target-modules = [\"q_proj\", \"v_proj\", \"gate_proj\", \"down_proj\"]",
    );
    common::replace_in(&cfg, "delta = 1e-3", "delta = 1e-6");
    common::replace_in(&cfg, "rank = 2\nalpha = 4", "rank = 8\nalpha = 16");
    common::replace_in(
        &cfg,
        "steps = 4\nlearning-rate = 0.01",
        "epochs = 60\nlearning-rate = 0.01\noptimizer = \"adamw\"",
    );
    let cfg_s = cfg.display().to_string();
    let out = f.dir.join("bb");
    let out_s = out.display().to_string();
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["audit", "--config", &cfg_s, "--mode", "black-box", "--canaries", "200", "--json"];
        args.extend(extra);
        let (ok, text) = dptrain(&args);
        assert!(ok, "{text}");
        serde_json::from_str(text.lines().find(|l| l.starts_with("{\"")).unwrap()).unwrap()
    };
    let dp = run(&["--out", &out_s]);
    let (certified, bound) = (dp["certified_epsilon"].as_f64().unwrap(), dp["epsilon_lower_bound"].as_f64().unwrap());
    assert!((certified - 8.0).abs() < 0.01 && bound <= certified, "{dp}");
    // The canaries follow the training file's prompt/completion format.
    let list = std::fs::read_to_string(out.join("private/canaries.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(list.lines().next().unwrap()).unwrap();
    assert!(first["record"]["prompt"].is_string() && first["record"]["completion"].is_string(), "{first}");
    let np = run(&["--non-private"]);
    // Without noise the LoRA memorises the secret completions it trained on (3.0 measured).
    assert!(np["epsilon_lower_bound"].as_f64().unwrap() > 2.0, "{np}");
}
