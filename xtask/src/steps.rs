//! Timed steps and the `test` command.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::deps;
use crate::error::Error;

/// Runs `f` as a named step, printing its start and wall time.
pub fn timed<T>(name: &str, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    println!("==> {name}");
    let start = Instant::now();
    let result = f();
    let took = start.elapsed();
    match &result {
        Ok(_) => println!("<== {name}: ok in {}", fmt_duration(took)),
        Err(_) => println!("<== {name}: FAILED after {}", fmt_duration(took)),
    }
    result
}

/// How often [`with_heartbeat`] says a step is still going.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Runs `f`, printing `    … {label} ({elapsed} so far)` every 30 s until it returns: a
/// cold Go build of kube-apiserver runs for minutes without a line of its own, and a
/// silent terminal looks hung.
pub fn with_heartbeat<T>(label: &str, f: impl FnOnce() -> T) -> T {
    let (done, ticks) = std::sync::mpsc::channel::<()>();
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                ticks.recv_timeout(HEARTBEAT)
            {
                // Not println!: a closed stdout (`| head`) must not panic the build's scope.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(
                    out,
                    "    … {label} ({} so far)",
                    fmt_duration(start.elapsed())
                );
            }
        });
        let out = f();
        drop(done);
        out
    })
}

/// `12.3s` or `4m05s`.
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// `cargo` for a nested build, without the package variables `cargo run` gave this
/// process: build scripts (ring's, through `cc`) track `CARGO_PKG_NAME` and
/// `CARGO_MANIFEST_DIR`, so a nested build that inherits `xtask`'s values rebuilt ring and
/// everything above it, and the next `cargo xtask` rebuilt them back (about 20 s each way).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_package_var) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// The variables cargo sets for the package it runs or tests.
fn is_package_var(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
        )
}

/// Runs a command in the workspace root with the cached binaries on PATH; fails on non-zero.
pub fn run(step: &str, program: &str, args: &[&str]) -> Result<(), Error> {
    let mut cmd = if program == "cargo" {
        cargo()
    } else {
        Command::new(program)
    };
    let status = cmd
        .args(args)
        .current_dir(workspace_root())
        .env("PATH", deps::path_with_cache()?)
        .status()
        .map_err(|e| Error::Step {
            step: step.into(),
            detail: format!("cannot run {program}: {e}"),
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Step {
            step: step.into(),
            detail: format!("`{program} {}` exited with {status}", args.join(" ")),
        })
    }
}

/// `cargo xtask test`: deps, fmt, clippy, every test.
pub fn test(extra: &[String]) -> Result<(), Error> {
    let total = Instant::now();
    timed("deps", || deps::run(true).map(|_| ()))?;
    timed("cargo fmt --check", || {
        run("fmt", "cargo", &["fmt", "--all", "--", "--check"])
    })?;
    timed("cargo clippy", || {
        run(
            "clippy",
            "cargo",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )
    })?;
    let mut args = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    timed("cargo test", || run("test", "cargo", &args))?;
    println!("all checks passed in {}", fmt_duration(total.elapsed()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_package_var;

    #[test]
    fn package_variables_are_dropped_and_cargo_settings_kept() {
        for (name, dropped) in [
            ("CARGO_PKG_NAME", true),
            ("CARGO_PKG_VERSION_MAJOR", true),
            ("CARGO_MANIFEST_DIR", true),
            ("CARGO_MANIFEST_PATH", true),
            ("CARGO_CRATE_NAME", true),
            ("CARGO_BIN_NAME", true),
            ("CARGO_PRIMARY_PACKAGE", true),
            ("CARGO", false),
            ("CARGO_HOME", false),
            ("CARGO_TARGET_DIR", false),
            ("CARGO_TERM_COLOR", false),
            ("CARGO_BUILD_JOBS", false),
        ] {
            assert_eq!(is_package_var(name), dropped, "{name}");
        }
    }
}
