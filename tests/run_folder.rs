//! Claims about the output folder under faults (issue 21): `--overwrite` removes nothing until the
//! new run's config, model and data are validated; an unusable output path fails before any data
//! or model is read; `--resume A --out B` does not replace another run in B without `--overwrite`;
//! two runs started into one folder cannot both write it (the second is refused naming the first).

mod common;

use common::dptrain;
use std::path::PathBuf;

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("dptrain-folder-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        common::write_tiny_model_dir(&dir.join("model"), 4);
        common::write_tiny_classification_data(&dir);
        Fixture { dir }
    }

    fn config(&self, name: &str, out: &str, steps: u64) -> String {
        let d = self.dir.display();
        let text = format!(
            "[model]\npath = \"{d}/model\"\nmax-seq-len = 12\n\n[data]\ntrain = \"{d}/train.jsonl\"\ntest = \"{d}/test.jsonl\"\n\n\
             [lora]\nrank = 2\nalpha = 4\n\n[privacy]\nnoise-multiplier = 1.0\ndelta = 1e-3\nclip-norm = 1.0\nhyperparameters-tuned-on-private-data = false\n\n\
             [training]\nexpected-batch-size = 8\nmax-physical-batch = 3\nsteps = {steps}\nlearning-rate = 0.05\ncheckpoint-every = 2\n\n\
             [output]\ndir = \"{out}\"\n"
        );
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn adapter(run: &std::path::Path) -> Option<Vec<u8>> {
    std::fs::read(run.join("release/adapter_model.safetensors")).ok()
}

#[test]
fn overwrite_keeps_an_interrupted_runs_checkpoints_when_the_new_run_cannot_start() {
    let f = Fixture::new("overwrite");
    let run = f.path("run");
    let cfg = f.config("good", run.to_str().unwrap(), 6);
    let (ok, _) = dptrain(&["--config", &cfg, "--stop-after-step", "2"]);
    assert!(!ok);
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(run.join("private/checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = listing();
    assert!(!before.is_empty());
    // --overwrite, but the model is missing: the checkpoints stay, and the run can continue.
    let bad = f.config("bad", run.to_str().unwrap(), 6);
    common::replace_in(&bad, "/model\"", "/no-such-model\"");
    let (ok, log) = dptrain(&["--config", &bad, "--overwrite"]);
    assert!(!ok && log.contains("no-such-model"), "{log}");
    assert_eq!(listing(), before);
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", run.to_str().unwrap()]);
    assert!(ok && log.contains("(step 2 of 6)"), "{log}");
}

#[test]
fn overwrite_with_a_bad_config_keeps_a_finished_run_intact() {
    let f = Fixture::new("keep");
    let run = f.path("run");
    let cfg = f.config("good", run.to_str().unwrap(), 4);
    assert!(dptrain(&["--config", &cfg]).0);
    let before = adapter(&run).unwrap();
    let record = std::fs::read(run.join("private/run.json")).unwrap();
    let bad = f.config("bad", run.to_str().unwrap(), 4);
    common::replace_in(&bad, "/model\"", "/no-such-model\"");
    let (ok, log) = dptrain(&["--config", &bad, "--overwrite"]);
    assert!(!ok && log.contains("no-such-model"), "{log}");
    assert_eq!(adapter(&run).unwrap(), before, "the finished run's adapter is untouched");
    assert_eq!(std::fs::read(run.join("private/run.json")).unwrap(), record);
    let (ok, log) = dptrain(&["verify", run.to_str().unwrap()]);
    assert!(ok, "{log}");
}

#[test]
fn an_output_path_that_is_a_file_fails_before_any_data_is_read() {
    let f = Fixture::new("file");
    let out = f.path("out-file");
    std::fs::write(&out, b"a file").unwrap();
    // The training file is missing too: the output folder is checked first.
    let cfg = f.config("c", out.to_str().unwrap(), 4);
    common::replace_in(&cfg, "train.jsonl", "missing.jsonl");
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(!ok && log.contains("is a file") && !log.contains("missing.jsonl"), "{log}");
    assert_eq!(std::fs::read(&out).unwrap(), b"a file");
    // A folder below a file cannot be created either.
    let cfg = f.config("d", out.join("sub").to_str().unwrap(), 4);
    let (ok, log) = dptrain(&["--config", &cfg]);
    assert!(!ok && log.contains("cannot create the output folder"), "{log}");
}

#[test]
fn resume_into_another_folder_holding_a_run_is_refused_without_overwrite() {
    let f = Fixture::new("resume-out");
    let a = f.path("a");
    let b = f.path("b");
    let cfg = f.config("c", a.to_str().unwrap(), 6);
    let (ok, _) = dptrain(&["--config", &cfg, "--stop-after-step", "2"]);
    assert!(!ok);
    assert!(dptrain(&["--config", &cfg, "--out", b.to_str().unwrap()]).0);
    let before = adapter(&b).unwrap();
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", a.to_str().unwrap(), "--out", b.to_str().unwrap()]);
    assert!(!ok && log.contains("already holds a run") && log.contains("--overwrite"), "{log}");
    assert_eq!(adapter(&b).unwrap(), before);
    // Into an empty folder it continues the run.
    let c = f.path("c");
    let (ok, log) = dptrain(&["--config", &cfg, "--resume", a.to_str().unwrap(), "--out", c.to_str().unwrap()]);
    assert!(ok && log.contains("resuming from"), "{log}");
    assert!(adapter(&c).is_some());
}

#[cfg(unix)]
#[test]
fn a_second_run_into_a_folder_in_use_is_refused_naming_the_first() {
    let f = Fixture::new("lock");
    let run = f.path("run");
    let cfg = f.config("long", run.to_str().unwrap(), 400);
    let mut child = common::spawn_quiet(&["--config", &cfg]);
    let lock = run.join("private/lock");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&lock).ok().as_deref() != Some(child.id().to_string().as_str()) {
        assert!(t0.elapsed().as_secs() < 60, "the first run never took the lock");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let short = f.config("short", run.to_str().unwrap(), 2);
    let (ok, log) = dptrain(&["--config", &short, "--overwrite"]);
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still_running, "the first run ended before the second started; the test proves nothing");
    assert!(!ok && log.contains("in use by process") && log.contains(&child.id().to_string()), "{log}");
    // Once the first run is gone, the folder is usable again.
    let (ok, log) = dptrain(&["--config", &short, "--overwrite"]);
    assert!(ok, "{log}");
}
