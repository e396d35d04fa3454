//! Real backends for tests, started and stopped with the project's
//! `tests/backends/<name>.sh start|stop DIR` scripts.

use anyhow::{Result, ensure};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running backend, stopped when dropped.
pub struct Backend {
    name: String,
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

/// The `export VAR=value` lines a script printed.
fn exports(text: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn unquote(v: &str) -> String {
    v.trim().trim_matches('"').to_owned()
}

impl Backend {
    /// Starts backend `name` (nfs, juicefs, ceph) in a fresh directory.
    pub fn start(name: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("rcsi-{name}-"))
            .tempdir()?;
        let mut b = Self {
            name: name.to_owned(),
            dir,
            env: HashMap::new(),
        };
        b.run("start")?;
        Ok(b)
    }

    /// The script of this backend.
    pub fn script(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("backends/{}.sh", self.name))
    }

    /// Runs `script ACTION DIR` (start, restart, ...) and takes up its exports.
    pub fn run(&mut self, action: &str) -> Result<()> {
        let out = Command::new(self.script())
            .arg(action)
            .arg(self.dir.path())
            .output()?;
        ensure!(
            out.status.success(),
            "tests/backends/{}.sh {action} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        self.env.extend(exports(&out.stdout));
        Ok(())
    }

    /// An exported variable ("" when not exported).
    pub fn var(&self, k: &str) -> String {
        self.env.get(k).cloned().unwrap_or_default()
    }

    /// The StorageClass parameters in the file named by variable `var`.
    pub fn params(&self, var: &str) -> HashMap<String, String> {
        params_file(Path::new(&self.var(var)))
    }

    /// The secrets in the file named by variable `var`.
    pub fn secrets(&self, var: &str) -> HashMap<String, HashMap<String, String>> {
        secrets_file(Path::new(&self.var(var)))
    }
}

/// A StorageClass parameters file (`key: value` lines); empty when unreadable.
pub fn params_file(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), unquote(v)))
        .collect()
}

/// A secrets file as CSI test tools read it: `Kind:` lines (e.g.
/// `NodePublishVolumeSecret:`), each followed by indented `key: value` lines.
pub fn secrets_file(path: &Path) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut kind = String::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if !line.starts_with(' ') {
            kind = line.trim_end_matches(':').trim().to_owned();
        } else if let Some((k, v)) = line.trim().split_once(':') {
            out.entry(kind.clone())
                .or_default()
                .insert(k.trim().to_owned(), unquote(v));
        }
    }
    out
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = Command::new(self.script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}
