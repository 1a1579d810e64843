//! The binary as an operator meets it: start-up errors are clear and change nothing,
//! `--help` documents the real flags, SIGTERM shuts down cleanly.

use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_testkit::ports::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_tether-pxe");

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::write(dir.join("k"), b"kernel").unwrap();
    let p = dir.join("pxe.toml");
    std::fs::write(
        &p,
        "default_image = \"d\"\n[images.d]\nversion = \"1\"\nkernel = \"k\"\n",
    )
    .unwrap();
    p
}

fn fails_with(args: &[&str], want: &str) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{args:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(want), "{args:?}: want {want:?} in:\n{err}");
}

#[test]
fn startup_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let cfg = cfg.to_str().unwrap();
    let empty = dir.path().join("no-ipxe");
    std::fs::create_dir(&empty).unwrap();
    let common = [
        "serve",
        "--no-dhcp",
        "--address",
        "127.0.0.1",
        "--listen",
        "127.0.0.1",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        common.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>, want: &str| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, want);
    };
    run(
        with(&["--config", cfg, "--ipxe-dir", empty.to_str().unwrap()]),
        "boot file undionly.kpxe not found",
    );
    run(
        with(&["--config", "/nonexistent.toml"]),
        "/nonexistent.toml",
    );
    run(with(&["--config", cfg, "--ca-pin", "md5:abc"]), "CA pin");
    run(
        with(&["--config", cfg, "--api-url", "http://x/${y}"]),
        "--api-url",
    );
    run(with(&[]), "pass --config FILE or --namespace NS");
    let lease = dir.path().join("leases.json");
    std::fs::write(&lease, "{broken").unwrap();
    run(
        vec![
            "serve",
            "--interface",
            "lo",
            "--address",
            "127.0.0.1",
            "--full-dhcp",
            "--pool-start",
            "127.0.0.10",
            "--pool-end",
            "127.0.0.20",
            "--config",
            cfg,
            "--lease-file",
            lease.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        "does not parse",
    );
    assert_eq!(
        std::fs::read_to_string(&lease).unwrap(),
        "{broken",
        "book untouched"
    );
}

#[test]
fn help_documents_flags() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--interface",
        "--full-dhcp",
        "--pool-start",
        "--lease-file",
        "--config",
        "--namespace",
        "--artifacts-dir",
        "--api-url",
        "--ca-pin",
        "--token-file",
        "--max-downloads",
        "--max-tftp-transfers",
        "--tftp-port",
        "--http-port",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (http, tftp) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--no-dhcp",
            "--address",
            "127.0.0.1",
            "--listen",
            "127.0.0.1",
        ])
        .args([
            "--http-port",
            &http.to_string(),
            "--tftp-port",
            &tftp.to_string(),
        ])
        .arg("--config")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "exit {status}:\n{err}");
    assert!(
        err.contains("SIGTERM: shutting down") && err.contains("tether-pxe stopped"),
        "{err}"
    );
}
