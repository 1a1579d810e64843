//! Runs each cargo-fuzz (libFuzzer) target — `dhcp` (proxy and full DHCP with a lease book,
//! through the same `dhcp::handle` the server runs), `tftp`, and `http` (request heads
//! through the server's router) — for a bounded time, 40 s each by default
//! (`TETHER_FUZZ_SECS` to change), starting from seeds of real requests, and fails on any
//! crash. This is an ordinary test so that `cargo xtask test` (and with it CI) fuzzes on
//! every run.
//!
//! Toolchain: cargo-fuzz needs nightly flags. With a rustup nightly we use
//! `rustup run nightly cargo`;
//! without one, `RUSTC_BOOTSTRAP=1` lets the stable compiler accept them. A missing
//! cargo-fuzz is installed with `cargo install`.

use std::path::{Path, PathBuf};
use std::process::Command;

use dhcproto::v4::MessageType;
use tether_boot::Mac;
use tether_pxe::dhcp;
use tether_pxe::tftp;

fn cargo() -> Command {
    Command::new(env!("CARGO"))
}

fn has_cargo_fuzz() -> bool {
    cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("nightly"))
        })
}

fn seeds(dir: &Path, target: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let mac = Mac([0x52, 0x54, 0, 1, 2, 3]);
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    if target == "dhcp" {
        type Seed<'a> = (&'a [u8], Option<u16>, Option<&'a [u8]>);
        let cases: [Seed; 5] = [
            (b"PXEClient:Arch:00000:UNDI:002001", Some(0), None),
            (b"PXEClient:Arch:00007:UNDI:003016", Some(7), None),
            (b"HTTPClient:Arch:00016:UNDI:003001", Some(16), None),
            (b"PXEClient:Arch:00000:UNDI:002001", Some(0), Some(b"iPXE")),
            (b"android-dhcp-13", None, None),
        ];
        for (class, arch, uc) in cases {
            for kind in [MessageType::Discover, MessageType::Request] {
                let m = dhcp::client_request(mac, kind, Some(class), arch, uc);
                inputs.push(dhcp::encode(&m).unwrap());
            }
        }
    } else if target == "http" {
        // The fuzz app's kernel and rootfs (pxe/fuzz/fuzz_targets/http.rs).
        let sha = |b: &[u8]| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(b))
        };
        let (k, r) = (sha(&[7u8; 3000]), sha(&[1u8; 5001]));
        inputs.push(
            format!("GET /artifacts/sha256/{k} HTTP/1.1\r\nRange: bytes=10-99\r\n\r\n")
                .into_bytes(),
        );
        inputs.push(
            format!("GET /artifacts/sha256/{r}/cpio/rootfs.img HTTP/1.1\r\n\r\n").into_bytes(),
        );
        // Once found by the fuzzer: an artifact whose entry name ends in `.ipxe` is not a
        // script (the target's oracle took it for one).
        inputs.push(
            format!("GET /artifacts/sha256/{r}/cpio/x/{k}.ipxe HTTP/1.1\r\n\r\n").into_bytes(),
        );
        for head in [
            "GET /boot/52-54-00-00-00-01.ipxe HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /boot/52-54-00-00-00-02.ipxe HTTP/1.1\r\n\r\n",
            "GET /boot/52-54-00-00-00-01/beacon HTTP/1.0\r\n\r\n",
            "HEAD /ipxe.efi HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n\r\n",
            "GET /artifacts/sha256/0000000000000000000000000000000000000000000000000000000000000000 HTTP/1.1\r\nRange: bytes=0-9\r\nIf-None-Match: *\r\n\r\n",
            "GET /artifacts/sha256/0000000000000000000000000000000000000000000000000000000000000000/cpio/rootfs.img HTTP/1.1\r\n\r\n",
        ] {
            inputs.push(head.as_bytes().to_vec());
        }
    } else {
        inputs.push(tftp::rrq_packet("undionly.kpxe", &[]));
        let mut with_acks = tftp::rrq_packet(
            "undionly.kpxe",
            &[("blksize", "512"), ("tsize", "0"), ("windowsize", "4")],
        );
        with_acks.resize(512, 0);
        with_acks.extend_from_slice(&[0, 0, 0, 1, 0, 4, 0, 3, 0, 8, 0, 9]);
        inputs.push(with_acks);
        inputs.push(tftp::rrq_packet("../etc/passwd", &[]));
    }
    for (i, input) in inputs.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), input).unwrap();
    }
}

#[test]
fn fuzz_dhcp_tftp_and_http_handlers() {
    let secs: u64 = std::env::var("TETHER_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    if !has_cargo_fuzz() {
        let st = cargo()
            .args(["install", "--locked", "cargo-fuzz"])
            .status()
            .expect("run cargo install cargo-fuzz");
        assert!(st.success(), "cargo install cargo-fuzz failed");
    }
    let fuzz_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let nightly = has_nightly();
    // Keep fuzz builds (sanitizer flags) apart from the workspace's target dir.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("fuzz");
    let work = tempfile::tempdir().unwrap();
    for target in ["dhcp", "tftp", "http"] {
        let corpus = work.path().join(target);
        seeds(&corpus, target);
        // `CARGO` is the toolchain's own cargo, which knows no `+toolchain`: go through rustup.
        let mut cmd = if nightly {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo"]);
            c
        } else {
            let mut c = cargo();
            c.env("RUSTC_BOOTSTRAP", "1");
            c
        };
        cmd.env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC");
        cmd.current_dir(&fuzz_dir)
            .env("CARGO_TARGET_DIR", &target_dir)
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={secs}"),
                "-print_final_stats=1",
            ]);
        let out = cmd.output().expect("run cargo fuzz");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "fuzz target {target} failed:\n{}",
            stderr
                .chars()
                .rev()
                .take(6000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        );
        let runs = stderr
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(|n| n.trim().parse::<u64>().unwrap_or(0))
            .unwrap_or(0);
        eprintln!("fuzz {target}: {runs} executions in {secs} s");
        assert!(runs > 0, "fuzz target {target} executed nothing:\n{stderr}");
    }
}
