//! The Python zae-limiter 0.17.0 from PyPI, for the interop tests: installed on first use
//! into a cached virtual environment (`~/.cache/zae-limiter/python-0.17.0`, or
//! `$ZAE_PYTHON_VENV`), then driven one command at a time through `driver.py`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// The release whose table contract this crate follows.
pub const PACKAGE: &str = "zae-limiter==0.17.0";

fn venv_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ZAE_PYTHON_VENV") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache/zae-limiter/python-0.17.0")
}

fn installed(dir: &Path) -> bool {
    Command::new(dir.join("bin/python"))
        .args([
            "-c",
            "import importlib.metadata as m; assert m.version('zae-limiter') == '0.17.0'",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the package into a fresh environment beside `dir`, then moves it into place,
/// so a failed or concurrent install never leaves a half-made environment behind.
fn install(dir: &Path) {
    let staging = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.parent().unwrap()).unwrap();
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&staging)
        .status()
        .expect("python3 is needed for the interop tests");
    assert!(ok.success(), "python3 -m venv failed");
    let ok = Command::new(staging.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", PACKAGE])
        .status()
        .expect("pip");
    assert!(ok.success(), "pip install {PACKAGE} failed");
    if std::fs::rename(&staging, dir).is_err() {
        // Another process installed it meanwhile.
        let _ = std::fs::remove_dir_all(&staging);
    }
    assert!(
        installed(dir),
        "{PACKAGE} is not usable in {}",
        dir.display()
    );
}

/// The environment's interpreter, installing the package on first use.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let dir = venv_dir();
        if !installed(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
            install(&dir);
        }
        dir.join("bin/python")
    })
}

/// Runs one driver command (see `driver.py`) and returns its JSON answer.
pub async fn run(command: Value) -> Value {
    tokio::task::spawn_blocking(move || {
        let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/driver.py");
        // The command goes on stdin: a batch of stream records outgrows an argument.
        let mut child = Command::new(python())
            .arg(driver)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run the Python driver");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("the driver's stdin");
            stdin
                .write_all(command.to_string().as_bytes())
                .expect("send the driver its command");
        }
        let out = child
            .wait_with_output()
            .expect("wait for the Python driver");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "the Python driver answered {text:?} ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    })
    .await
    .unwrap()
}
