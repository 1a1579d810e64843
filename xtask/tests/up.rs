//! `cargo xtask up` as a user runs it, on this machine's real parts: a first run is killed
//! with SIGKILL once its VM is powered on (leaving qemu, tether-pxe, dnsmasq, the
//! management plane and the segment's namespace behind); a second run,
//! `up --workers 1 --exit`, cleans that up, boots one worker over PXE to a Ready node with
//! a running pod, tears down, and leaves nothing: no process naming its directory, no
//! namespace or link it made, no mount.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// The whole test's bound: two runs, one of them to Ready under TCG.
const TIMEOUT: Duration = Duration::from_secs(1500);

fn up_dir() -> PathBuf {
    // target/debug/xtask → target/tether-up-test: beside the user's own `up` directory.
    Path::new(env!("CARGO_BIN_EXE_xtask"))
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("tether-up-test")
}

fn up(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.arg("up")
        .args(args)
        .env("TETHER_UP_DIR", up_dir())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null());
    cmd
}

/// Network namespaces, host links and mounts: what a run must give back.
fn host_state() -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let stdout = |args: &[&str]| -> String {
        let out = Command::new("ip").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let namespaces = stdout(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    // `3: tsg123@if2: <…>`: the name, without its peer.
    let links = stdout(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
        .collect();
    let mounts = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    (namespaces, links, mounts)
}

/// Processes whose command line names `dir` (qemu's serial log, the operator's data
/// directory, dnsmasq's lease file, the tenants' certificates all live there).
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle)
                .then(|| format!("{}: {}", e.file_name().to_string_lossy(), cmd.trim()))
        })
        .collect()
}

#[test]
fn up_after_a_killed_up_joins_one_worker_and_leaves_nothing() {
    let started = Instant::now();
    let dir = up_dir();
    let before = host_state();

    // Run 1: killed with SIGKILL as soon as its worker is powered on.
    let mut first = up(&["--workers", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run cargo xtask up");
    let lines = lines_of(first.stdout.take().unwrap(), "up#1");
    let mut seen = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let powered_on = line.starts_with("==> workers:");
        seen.push(line);
        if powered_on {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.starts_with("==> workers:")),
        "the first run never powered its worker on:\n{}",
        seen.join("\n")
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // qemu was spawned a moment ago through `ip netns exec`: while that execs, its command
    // line can read empty, so look again for a bounded while.
    let looked = Instant::now();
    let orphans = loop {
        let found = processes_naming(&dir);
        if found.iter().any(|p| p.contains("qemu-system"))
            || looked.elapsed() > Duration::from_secs(10)
        {
            break found;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("after SIGKILL of up: {} processes left", orphans.len());
    assert!(
        orphans.iter().any(|p| p.contains("qemu-system")),
        "a killed `up` leaves its VM running (else this test proves nothing): {orphans:#?}"
    );

    // Run 2: cleans up, joins, tears down.
    let out = up(&["--workers", "1", "--exit"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(out, TIMEOUT.saturating_sub(started.elapsed()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "up --workers 1 --exit: {}",
        out.status
    );
    assert!(
        stdout.contains("cleaned up after an earlier run that did not finish: killed"),
        "the second run says it cleaned up"
    );
    let nodes: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("mac-5254007e0001 "))
        .collect();
    assert!(
        nodes
            .iter()
            .any(|l| l.split_whitespace().nth(1) == Some("Ready")),
        "`kubectl get nodes` shows the worker Ready: {nodes:?}"
    );
    assert!(
        stdout.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first().is_some_and(|n| n.starts_with("hello-"))
                && f.get(1) == Some(&"1/1")
                && f.get(2) == Some(&"Running")
        }),
        "`kubectl get pods` shows hello running"
    );
    assert!(stdout.contains("nothing left: no qemu"), "up's own check");

    // Nothing is left, by this test's own look.
    assert_eq!(processes_naming(&dir), Vec::<String>::new(), "processes");
    let after = host_state();
    let new = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
        b.difference(a).cloned().collect()
    };
    assert_eq!(new(&before.0, &after.0), Vec::<String>::new(), "namespaces");
    assert_eq!(new(&before.1, &after.1), Vec::<String>::new(), "links");
    assert_eq!(new(&before.2, &after.2), Vec::<String>::new(), "mounts");
    eprintln!("both runs in {:?}", started.elapsed());
}

/// Each line of `out`, echoed to stderr with `tag`, as it comes.
fn lines_of(out: impl std::io::Read + Send + 'static, tag: &'static str) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            eprintln!("{tag} | {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_with_timeout(mut child: std::process::Child, timeout: Duration) -> std::process::Output {
    let lines = lines_of(child.stdout.take().unwrap(), "up#2");
    let deadline = Instant::now() + timeout;
    let mut stdout = String::new();
    let status = loop {
        while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            stdout.push_str(&line);
            stdout.push('\n');
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            // SIGTERM: `up` tears down what it made, then exits; SIGKILL if it does not.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let grace = Instant::now() + Duration::from_secs(120);
            while child.try_wait().unwrap().is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(500));
            }
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!("up did not finish in {timeout:?} (stopped: {status})");
        }
    };
    // The rest of the output, up to the pipe's end.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    std::process::Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: Vec::new(),
    }
}
