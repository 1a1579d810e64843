//! The binary as an operator meets it: start-up errors are clear and change nothing,
//! `--help` documents the real flags, SIGTERM shuts down cleanly, a long base URL is
//! answered in option 67, and a serving task that dies takes the process down.

use std::io::Read;
use std::net::{TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, MessageType, OptionCode};
use futures::FutureExt;
use tether_boot::Mac;
use tether_pxe::dhcp;
use tether_pxe::serve;
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
    assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?}");
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
    let token = dir.path().join("token");
    std::fs::write(&token, "not-a-token\n").unwrap();
    run(
        with(&["--config", cfg, "--token-file", token.to_str().unwrap()]),
        "must be <id>.<secret>",
    );
    run(
        with(&["--config", cfg, "--token-file", "/nonexistent/token"]),
        "/nonexistent/token",
    );
    let long = format!("http://127.0.0.1/{}", "a".repeat(240));
    run(
        vec![
            "serve",
            "--address",
            "127.0.0.1",
            "--config",
            cfg,
            "--http-base-url",
            &long,
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        "option 67 holds at most 255",
    );
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
        "--cluster",
        "--namespace",
        "--seen-secs",
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

/// Waits until something listens on TCP `port` of loopback.
fn wait_listening(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A 200-byte `--http-base-url`: the real binary answers an iPXE proxyDHCP REQUEST with the
/// whole script URL in option 67 (too long for the 128-byte `file` field, which stays empty)
/// — where dhcproto's encoder used to panic and take the DHCP task down.
#[test]
fn long_base_url_is_answered_in_option_67() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (http, tftp, dhcp_port, proxy) = (free_port(), free_port(), free_port(), free_port());
    let head = format!("http://127.0.0.1:{http}/");
    let base = format!("{head}{}", "b".repeat(200 - head.len()));
    assert_eq!(base.len(), 200);
    let mut child = Command::new(BIN)
        .args(["serve", "--address", "127.0.0.1", "--listen", "127.0.0.1"])
        .args([
            "--http-port",
            &http.to_string(),
            "--tftp-port",
            &tftp.to_string(),
        ])
        .args([
            "--dhcp-port",
            &dhcp_port.to_string(),
            "--proxy-port",
            &proxy.to_string(),
        ])
        .args(["--http-base-url", &base])
        .arg("--config")
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(http);
    let mac = Mac([0x52, 0x54, 0, 0x0b, 0x0a, 0x5e]);
    let req = dhcp::client_request(
        mac,
        MessageType::Request,
        Some(b"PXEClient:Arch:00000:UNDI:002001"),
        Some(0),
        Some(b"iPXE"),
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&dhcp::encode(&req).unwrap(), ("127.0.0.1", proxy))
        .unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = sock.recv_from(&mut buf).expect("a proxyDHCP ACK");
    assert!(n <= dhcp::MAX_MESSAGE, "{n} bytes");
    let ack = dhcp::parse(&buf[..n]).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    let url = format!("{base}/boot/52-54-00-0b-0a-5e.ipxe");
    assert!(
        matches!(
            ack.opts().get(OptionCode::BootfileName),
            Some(DhcpOption::BootfileName(f)) if f == url.as_bytes()
        ),
        "{:?}",
        ack.opts().get(OptionCode::BootfileName)
    );
    assert!(
        ack.fname().is_none_or(|f| f.iter().all(|b| *b == 0)),
        "the file field stays empty"
    );
    // And the process is still whole: the same request again is answered.
    sock.send_to(&dhcp::encode(&req).unwrap(), ("127.0.0.1", proxy))
        .unwrap();
    assert!(sock.recv_from(&mut buf).is_ok());
    assert!(child.try_wait().unwrap().is_none(), "still running");
    let _ = child.kill();
    let _ = child.wait();
}

/// A serving task that panics, fails or just returns ends the whole process with exit code
/// 1 and an error naming the task, at once — even with blocking work still running. The
/// test runs itself as a child process for each case, through the same exit path as `main`.
#[test]
fn a_dead_task_ends_the_process() {
    if let Ok(how) = std::env::var("TETHER_PXE_TEST_DEATH") {
        tether_telemetry::LogArgs {
            log_format: tether_telemetry::LogFormat::Human,
            log_level: "info".into(),
        }
        .init();
        let code = serve::exit_code(async move {
            let (tx, rx) = tokio::sync::watch::channel(false);
            let doomed: serve::Task = match how.as_str() {
                "panic" => ("tftp", async { panic!("boom in the tftp task") }.boxed()),
                "error" => (
                    "dhcp",
                    async { Err(tether_pxe::Error::DhcpEncode("socket went away".into())) }.boxed(),
                ),
                _ => ("http", async { Ok(()) }.boxed()),
            };
            let wedged: serve::Task = (
                "proxy-dhcp",
                async {
                    // Blocking work that never finishes (a TFTP transfer, say): the process
                    // must not wait for it.
                    let _ = tokio::task::spawn_blocking(|| {
                        std::thread::sleep(Duration::from_secs(3600))
                    })
                    .await;
                    Ok(())
                }
                .boxed(),
            );
            let idle: serve::Task = ("token-gc", futures::future::pending().boxed());
            let r = serve::supervise(vec![wedged, idle, doomed], rx).await;
            drop(tx);
            r
        });
        std::process::exit(code);
    }
    for (how, want) in [
        ("panic", "tftp task panicked: boom in the tftp task"),
        (
            "error",
            "dhcp task failed: cannot encode DHCP reply: socket went away",
        ),
        ("return", "http task ended while the server was running"),
    ] {
        let start = Instant::now();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_dead_task_ends_the_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TETHER_PXE_TEST_DEATH", how)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{how}:\n{err}");
        assert!(err.contains(want), "{how}: want {want:?} in:\n{err}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{how}: took {:?}",
            start.elapsed()
        );
    }
}
