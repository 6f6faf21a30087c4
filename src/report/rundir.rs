//! The run folder: what may be published, kept apart from what must stay with the data owner.
//!
//! ```text
//! <output.dir>/
//!   release/   what ε covers, plus only what the report's not-protected list names:
//!              adapter_model.safetensors (with the certificate), adapter_config.json,
//!              privacy_report.json, privacy_report.md, plots/epsilon.svg, plots/groups.svg
//!   private/   owner-only (0700): run.json (seed, commitment key, plain file hashes, config,
//!              timings, the --reference run's metrics), metrics.jsonl (per-step losses, realised
//!              batch sizes, clip fractions, timings), plots/loss.svg, plots/clip_fraction.svg,
//!              checkpoints/ (noise key, sampler state, parameters), the lock file
//! ```
//!
//! `release/` can be handed to anyone as a whole; `private/` never leaves the data owner.
//! Opening a run folder takes an advisory lock (`flock`) held for the whole run, so two runs never
//! write into one folder, checks that both parts are writable before any data or model is loaded,
//! and removes the temporary files of interrupted writes.

use super::ReportError;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const RELEASE: &str = "release";
pub const PRIVATE: &str = "private";
/// The private run record (seed, commitment key, hashes, timings).
pub const RUN_RECORD: &str = "run.json";
pub const METRICS: &str = "metrics.jsonl";
/// The checkpoint folder inside the private part.
pub const CHECKPOINTS: &str = "checkpoints";
const LOCK: &str = "lock";

/// Files of the release part, each with whether ε covers it (else the report's not-protected
/// list names it).
pub const RELEASE_FILES: [(&str, bool); 6] = [
    ("adapter_model.safetensors", true),
    ("adapter_config.json", true),
    ("privacy_report.json", false),
    ("privacy_report.md", false),
    ("plots/epsilon.svg", true),
    ("plots/groups.svg", false),
];

/// An open, locked run folder.
pub struct RunDir {
    pub root: PathBuf,
    pub release: PathBuf,
    pub private: PathBuf,
    /// Held for the life of the run (the lock goes with the descriptor).
    _lock: std::fs::File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io { path: path.into(), source }
}

/// Creates `dir` (and parents) if needed; an existing non-folder is an error naming it.
fn ensure_dir(dir: &Path, what: &str) -> Result<(), ReportError> {
    if dir.exists() && !dir.is_dir() {
        return Err(ReportError::Unusable { path: dir.into(), message: format!("{what} is a file, not a folder") });
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| ReportError::Unusable { path: dir.into(), message: format!("cannot create the {what}: {e}") })
}

/// Creates and removes a probe file: a read-only mount or a folder without write permission fails
/// here, before any work.
fn check_writable(dir: &Path) -> Result<(), ReportError> {
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    let r = std::fs::OpenOptions::new().write(true).create_new(true).open(&probe).and_then(|mut f| f.write_all(b"x"));
    let _ = std::fs::remove_file(&probe);
    r.map_err(|e| ReportError::Unusable { path: dir.into(), message: format!("not writable: {e}") })
}

#[cfg(unix)]
fn set_owner_only(dir: &Path) -> Result<(), ReportError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

#[cfg(not(unix))]
fn set_owner_only(_dir: &Path) -> Result<(), ReportError> {
    Ok(())
}

/// Takes the exclusive advisory lock on `file`, or says which process holds it.
#[cfg(unix)]
fn lock(path: &Path) -> Result<std::fs::File, ReportError> {
    use std::io::{Read, Seek};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        let holder = holder.trim();
        return Err(ReportError::Locked {
            path: path.parent().and_then(Path::parent).unwrap_or(path).into(),
            holder: if holder.is_empty() { format!("another process ({err})") } else { format!("process {holder}") },
        });
    }
    f.set_len(0).map_err(io(path))?;
    f.rewind().map_err(io(path))?;
    write!(f, "{}", std::process::id()).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(f)
}

#[cfg(not(unix))]
fn lock(path: &Path) -> Result<std::fs::File, ReportError> {
    std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).map_err(io(path))
}

/// A temporary name of an interrupted write: `.NAME.tmp-PID` (files), `.tmp-step-*` /
/// `.old-step-*` (checkpoint folders), `.write-probe-*`.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
        && (name.contains(".tmp-")
            || name.starts_with(".tmp-")
            || name.starts_with(".old-")
            || name.starts_with(".write-probe-"))
}

/// Removes temporary files and folders directly inside `dir` (not recursive).
fn remove_temporaries(dir: &Path) -> Result<usize, ReportError> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut n = 0;
    for e in entries {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_temporary(&name) {
            let p = e.path();
            let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            r.map_err(io(&p))?;
            n += 1;
        }
    }
    Ok(n)
}

impl RunDir {
    /// Opens the run folder `root` for a run: creates it and its two parts (the private one
    /// owner-only), takes the lock, checks both parts are writable and removes the temporaries of
    /// interrupted writes. Nothing of an earlier run is removed here.
    pub fn open(root: &Path) -> Result<RunDir, ReportError> {
        ensure_dir(root, "output folder")?;
        let release = root.join(RELEASE);
        let private = root.join(PRIVATE);
        ensure_dir(&private, "private part of the output folder")?;
        set_owner_only(&private)?;
        check_writable(&private)?;
        let lock = lock(&private.join(LOCK))?;
        ensure_dir(&release, "release part of the output folder")?;
        check_writable(&release)?;
        let dir = RunDir { root: root.into(), release, private, _lock: lock };
        for d in [
            dir.release.clone(),
            dir.release.join("plots"),
            dir.private.clone(),
            dir.private.join("plots"),
            dir.checkpoints(),
        ] {
            remove_temporaries(&d)?;
        }
        Ok(dir)
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.private.join(CHECKPOINTS)
    }

    /// Whether the folder holds the outputs of a finished run.
    pub fn holds_outputs(&self) -> bool {
        holds_outputs(&self.root)
    }

    /// Removes an earlier run's outputs and private files (not the lock), for `--overwrite`:
    /// called only once the new run's config, model and data have been validated. With
    /// `keep_checkpoints` (resuming from this folder) its checkpoints stay.
    pub fn clear_previous(&self, keep_checkpoints: bool) -> Result<(), ReportError> {
        for part in [&self.release, &self.private] {
            for e in std::fs::read_dir(part).map_err(io(part))? {
                let e = e.map_err(io(part))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if part == &self.private && (name == LOCK || (keep_checkpoints && name == "checkpoints")) {
                    continue;
                }
                let p = e.path();
                let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                r.map_err(io(&p))?;
            }
        }
        Ok(())
    }

    /// Removes the checkpoints (after a finished run whose config does not keep them).
    pub fn remove_checkpoints(&self) -> Result<(), ReportError> {
        let c = self.checkpoints();
        if c.exists() {
            std::fs::remove_dir_all(&c).map_err(io(&c))?;
        }
        Ok(())
    }
}

/// Whether `root` holds a finished run's outputs (any release file or the private run record).
pub fn holds_outputs(root: &Path) -> bool {
    RELEASE_FILES.iter().any(|(f, _)| root.join(RELEASE).join(f).exists())
        || root.join(PRIVATE).join(RUN_RECORD).exists()
}

/// The release folder `path` means: `path/release` when `path` is a run folder, else `path`.
pub fn release_of(path: &Path) -> PathBuf {
    if path.join(RELEASE).is_dir() {
        path.join(RELEASE)
    } else {
        path.into()
    }
}

/// The private part beside a release folder, if there is one.
pub fn private_beside(release: &Path) -> Option<PathBuf> {
    let p = release.parent()?.join(PRIVATE);
    (release.file_name()? == RELEASE && p.join(RUN_RECORD).is_file()).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dptrain-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn private_part_is_owner_only_and_a_second_open_is_refused_naming_the_holder() {
        let d = tmp("lock");
        let a = RunDir::open(&d).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&a.private).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
        let e = RunDir::open(&d).err().expect("second open must fail").to_string();
        assert!(e.contains("in use") && e.contains(&std::process::id().to_string()), "{e}");
        drop(a);
        RunDir::open(&d).expect("the lock goes with the first run");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_output_path_that_is_a_file_is_refused_before_anything_is_written() {
        let d = tmp("file");
        std::fs::write(&d, b"not a folder").unwrap();
        let e = RunDir::open(&d).err().unwrap().to_string();
        assert!(e.contains("is a file"), "{e}");
        assert_eq!(std::fs::read(&d).unwrap(), b"not a folder");
        let _ = std::fs::remove_file(&d);
    }

    #[test]
    fn temporaries_of_interrupted_writes_are_removed_and_nothing_else() {
        let d = tmp("temps");
        drop(RunDir::open(&d).unwrap());
        let keep = d.join("release/adapter_model.safetensors");
        std::fs::write(&keep, b"a").unwrap();
        let t1 = d.join("release/.adapter_model.safetensors.tmp-123");
        std::fs::write(&t1, b"partial").unwrap();
        let ck = d.join("private/checkpoints");
        std::fs::create_dir_all(ck.join(".tmp-step-00000004-99")).unwrap();
        std::fs::create_dir_all(ck.join(".old-step-00000002-99")).unwrap();
        std::fs::create_dir_all(ck.join("step-00000002")).unwrap();
        let r = RunDir::open(&d).unwrap();
        assert!(
            !t1.exists() && !ck.join(".tmp-step-00000004-99").exists() && !ck.join(".old-step-00000002-99").exists()
        );
        assert!(keep.exists() && ck.join("step-00000002").exists());
        assert!(r.holds_outputs());
        r.clear_previous(false).unwrap();
        assert!(!keep.exists() && !ck.exists() && !r.holds_outputs());
        let _ = std::fs::remove_dir_all(&d);
    }
}
