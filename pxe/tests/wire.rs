//! TFTP and HTTP over real loopback sockets: traversal and unknown files get protocol
//! errors, transfers with negotiated options deliver the exact bytes, artifacts honour
//! Range/ETag and the concurrency limit, scripts point at our artifact URLs.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tether_pxe::artifacts::Store;
use tether_pxe::metrics::Metrics;
use tether_pxe::source::config::ConfigSource;
use tether_pxe::tftp::{self, Files, Packet};
use tokio::sync::watch;

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

async fn start_tftp(files: Files) -> (std::net::SocketAddr, watch::Sender<bool>, Arc<Metrics>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    tokio::spawn(tftp::server::serve(
        sock,
        Arc::new(files),
        tftp::server::Limits {
            max_transfers: 4,
            max_duration: Duration::from_secs(30),
        },
        metrics.clone(),
        rx,
    ));
    (addr, tx, metrics)
}

/// A minimal windowed TFTP client; returns the file or the error packet's code.
fn tftp_get(
    server: std::net::SocketAddr,
    file: &str,
    opts: &[(&str, &str)],
) -> Result<Vec<u8>, u16> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.send_to(&tftp::rrq_packet(file, opts), server).unwrap();
    let blksize: usize = opts
        .iter()
        .find(|(k, _)| *k == "blksize")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(512);
    let mut out = Vec::new();
    let mut expect: u16 = 1;
    let mut buf = vec![0u8; 70000];
    loop {
        let (n, from) = s.recv_from(&mut buf).expect("reply within 5 s");
        match Packet::parse(&buf[..n]).unwrap() {
            Packet::Error { code, .. } => return Err(code),
            Packet::Oack(o) => {
                if let Some(t) = o.get("tsize") {
                    assert!(t.parse::<usize>().is_ok());
                }
                s.send_to(&tftp::ack_packet(0), from).unwrap();
            }
            Packet::Data { block, data } => {
                if block == expect {
                    out.extend_from_slice(&data);
                    expect = expect.wrapping_add(1);
                    // Ack every block (a valid windowed client may ack only the last; acking
                    // each exercises the partial-window path too).
                    s.send_to(&tftp::ack_packet(block), from).unwrap();
                    if data.len() < blksize {
                        return Ok(out);
                    }
                }
            }
            p => panic!("unexpected {p:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tftp_serves_registered_files_only() {
    let mut files = Files::default();
    let small = payload(1300);
    let big = payload(3 * 1024 * 1024 + 17);
    files.insert("undionly.kpxe", Bytes::from(small.clone()));
    files.insert("big.bin", Bytes::from(big.clone()));
    let (addr, stop, metrics) = start_tftp(files).await;
    let r = tokio::task::spawn_blocking(move || {
        let plain = tftp_get(addr, "undionly.kpxe", &[]);
        let opts = tftp_get(
            addr,
            "big.bin",
            &[("blksize", "1468"), ("tsize", "0"), ("windowsize", "8")],
        );
        let exact = tftp_get(addr, "undionly.kpxe", &[("blksize", "650")]); // 1300 = 2 × 650
        let bad: Vec<_> = [
            "../etc/passwd",
            "/etc/passwd",
            "/undionly.kpxe",
            "sub/../../etc/shadow",
            "..\\boot.ini",
            "missing.efi",
        ]
        .into_iter()
        .map(|f| (f, tftp_get(addr, f, &[])))
        .collect();
        (plain, opts, exact, bad)
    })
    .await
    .unwrap();
    assert_eq!(r.0.unwrap(), small);
    assert!(
        r.1.as_ref().unwrap() == &big,
        "3 MB windowed transfer intact"
    );
    assert_eq!(
        r.2.unwrap(),
        small,
        "exact multiple ends with an empty block"
    );
    for (f, res) in r.3 {
        let want = if f == "missing.efi" { 1 } else { 2 };
        assert_eq!(res, Err(want), "{f}");
    }
    // The server counts a transfer once it reads the final ACK, just after the client ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut text = metrics.render();
    while !text.contains("tether_pxe_tftp_requests_total{result=\"served\"} 3")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = metrics.render();
    }
    assert!(
        text.contains("tether_pxe_tftp_requests_total{result=\"served\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("tether_pxe_tftp_requests_total{result=\"refused\"} 6"),
        "{text}"
    );
    let _ = stop.send(true);
}

/// `cpio -t -v` of an archive: the real tool's reading of what we serve.
fn cpio_listing(archive: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("cpio")
        .args(["-t", "-v", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cpio is installed (cargo xtask deps)");
    child.stdin.take().unwrap().write_all(archive).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::write(dir.join(name), data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_scripts_and_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = payload(200_000);
    write(dir.path(), "vmlinuz", &kernel);
    write(dir.path(), "initrd", b"initrd-bytes");
    let rootfs = payload(10_001);
    write(dir.path(), "rootfs.squashfs", &rootfs);
    let cfg = dir.path().join("pxe.toml");
    std::fs::write(
        &cfg,
        format!(
            "default_image = \"d\"\n[images.d]\nversion = \"v1\"\n\
             cmdline = \"console=ttyS0 tether.root=file:/rootfs.img tether.rootfstype=squashfs \
             tether.verity.roothash={} tether.verity.hashoffset=8192\"\n\
             kernel = \"vmlinuz\"\ninitrd = \"initrd\"\nrootfs = \"rootfs.squashfs\"\n",
            "e".repeat(64)
        ),
    )
    .unwrap();
    let mut store = Store::default();
    let src = ConfigSource::load(&cfg, &mut store, common::site_enrollment()).unwrap();
    let hash = |f: &str| {
        tether_pxe::artifacts::hash_file(&dir.path().join(f))
            .unwrap()
            .0
    };
    let (ksha, rsha) = (hash("vmlinuz"), hash("rootfs.squashfs"));
    let mut files = Files::default();
    files.insert("ipxe.efi", Bytes::from_static(b"MZ-efi"));
    let (addr, stop, metrics, recent) =
        common::start_http(Arc::new(src), store.clone(), files.clone(), 8).await;
    let (addr0, stop0, _, _) = common::start_http(
        Arc::new(
            ConfigSource::load(&cfg, &mut Store::default(), common::site_enrollment()).unwrap(),
        ),
        store,
        files,
        0,
    )
    .await;
    // The DHCP side saw this MAC.
    recent.saw("52:54:00:00:00:01".parse().unwrap());
    let ksha2 = ksha.clone();
    let kernel2 = kernel.clone();
    tokio::task::spawn_blocking(move || {
        let ksha = ksha2;
        let kernel = kernel2;
        let art = format!("/artifacts/sha256/{ksha}");
        let r = common::get(addr, "GET", &art, &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, kernel);
        let etag = r.header("etag").unwrap().to_string();
        assert_eq!(etag, format!("\"sha256-{ksha}\""));
        assert_eq!(r.header("accept-ranges"), Some("bytes"));

        let r = common::get(addr, "GET", &art, &[("If-None-Match", &etag)]);
        assert_eq!(r.status, 304);
        assert!(r.body.is_empty());

        let r = common::get(addr, "GET", &art, &[("Range", "bytes=100-199")]);
        assert_eq!(r.status, 206);
        assert_eq!(r.body, &kernel[100..200]);
        assert_eq!(r.header("content-range"), Some("bytes 100-199/200000"));
        let r = common::get(addr, "GET", &art, &[("Range", "bytes=-10")]);
        assert_eq!(r.body, &kernel[kernel.len() - 10..]);
        let r = common::get(
            addr,
            "GET",
            &art,
            &[("Range", "bytes=100-199"), ("If-Range", "\"other\"")],
        );
        assert_eq!(r.status, 200, "stale If-Range gets the whole file");
        let r = common::get(addr, "GET", &art, &[("Range", "bytes=300000-")]);
        assert_eq!(r.status, 416);
        assert_eq!(r.header("content-range"), Some("bytes */200000"));
        let r = common::get(addr, "HEAD", &art, &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("200000"));

        for (path, want) in [
            ("/artifacts/sha256/../../../etc/passwd", 400),
            ("/artifacts/sha256/%2e%2e%2fetc%2fpasswd", 400),
            (&format!("/artifacts/sha256/{}", ksha.to_uppercase()), 400),
            (&format!("/artifacts/sha256/{}", "0".repeat(64)), 404),
            ("/boot/../../etc/passwd.ipxe", 400),
            ("/boot/52:54:00:00:00:01;shell.ipxe", 400),
            ("/boot/52-54-00-00-00-0g.ipxe", 400),
            ("/etc/passwd", 404),
            ("/undionly.kpxe", 404),
        ] {
            assert_eq!(common::get(addr, "GET", path, &[]).status, want, "{path}");
        }
        assert_eq!(common::get(addr, "POST", &art, &[]).status, 405);
        assert_eq!(common::get(addr, "GET", "/ipxe.efi", &[]).body, b"MZ-efi");

        // Concurrency limit: a server with no download slots refuses with Retry-After.
        let r = common::get(addr0, "GET", &art, &[]);
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("1"));

        let r = common::get(addr, "GET", "/boot/52-54-00-00-00-01.ipxe", &[]);
        assert_eq!(r.status, 200);
        let s = r.text();
        assert!(
            s.contains(&format!(
                "kernel --name kernel http://{addr}/artifacts/sha256/{ksha} "
            )),
            "{s}"
        );
        assert!(s.contains("tether.mac=52:54:00:00:00:01"), "{s}");
        assert!(
            s.contains("tether.token=abcdef.0123456789abcdef"),
            "the site-wide token: {s}"
        );
        // The rootfs: iPXE wraps it on BIOS, ours comes wrapped on UEFI.
        let wrapped = format!("/artifacts/sha256/{rsha}/cpio/rootfs.img");
        assert!(
            s.contains(&format!(
                "initrd --name rootfs http://{addr}/artifacts/sha256/{rsha} /rootfs.img mode=0400 || goto failed\n"
            )) && s.contains(&format!("initrd --name rootfs http://{addr}{wrapped} || goto failed\n")),
            "{s}"
        );
        let r = common::get(addr, "GET", &wrapped, &[("Range", "bytes=0-9")]);
        assert_eq!(r.status, 200, "no Range on the wrapped copy");
        assert_eq!(r.header("accept-ranges"), Some("none"));
        let mut want = tether_boot::initrd::entry_header("/rootfs.img", rootfs.len() as u64).unwrap();
        want.extend_from_slice(&rootfs);
        want.extend(tether_boot::initrd::entry_trailer(rootfs.len() as u64));
        assert_eq!(r.body, want);
        assert_eq!(r.header("content-length"), Some(want.len().to_string().as_str()));
        // What the kernel will unpack, as cpio itself reads it.
        let listing = cpio_listing(&r.body);
        assert!(
            listing.starts_with("-r--------") && listing.contains(" 10001 ") && listing.trim_end().ends_with(" rootfs.img"),
            "{listing}"
        );
        let r = common::get(addr, "HEAD", &wrapped, &[]);
        assert_eq!((r.status, r.body.len()), (200, 0));
        assert_eq!(r.header("content-length"), Some(want.len().to_string().as_str()));
        for (path, status) in [
            (format!("/artifacts/sha256/{rsha}/cpio/../etc/passwd"), 400),
            (format!("/artifacts/sha256/{rsha}/cpio/a%20b"), 400),
            (format!("/artifacts/sha256/{rsha}/cpio/"), 400),
            (format!("/artifacts/sha256/{rsha}/tar/rootfs.img"), 404),
            (format!("/artifacts/sha256/{}/cpio/rootfs.img", "0".repeat(64)), 404),
        ] {
            assert_eq!(common::get(addr, "GET", &path, &[]).status, status, "{path}");
        }
        // A MAC that never DHCP'd here and that the file does not list: nothing for it.
        let r = common::get(addr, "GET", "/boot/52-54-00-00-00-09.ipxe", &[]);
        assert_eq!(r.status, 404);
        assert!(r.text().contains("has not DHCP'd on this segment recently"), "{}", r.text());
        assert_eq!(
            common::get(addr, "GET", "/boot/52-54-00-00-00-09/beacon", &[]).status,
            200
        );
        assert!(
            s.contains(&format!(
                "imgfetch --name beacon http://{addr}/boot/52-54-00-00-00-01/beacon"
            )),
            "{s}"
        );
        assert_eq!(
            common::get(addr, "GET", "/boot/52-54-00-00-00-01/beacon", &[]).status,
            200
        );
        let m = common::get(addr, "GET", "/metrics", &[]).text();
        assert!(
            m.contains("tether_pxe_boots_total{mac=\"52:54:00:00:00:01\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("tether_pxe_boots_total{mac=\"other\"} 1"),
            "a MAC not seen on the segment gets no series of its own: {m}"
        );
        assert!(
            m.contains("tether_pxe_http_requests_total{route=\"artifact\",status=\"206\"}"),
            "{m}"
        );
    })
    .await
    .unwrap();
    let bytes_sent = metrics.http_bytes.get();
    assert!(bytes_sent >= 2 * kernel.len() as u64, "{bytes_sent}");
    let _ = stop.send(true);
    let _ = stop0.send(true);
}

/// The HTTP listener queues a whole fleet's burst of connections (a 500-machine boot storm
/// overflowed the standard 128 and got connections reset): `ss` reports its backlog.
#[tokio::test]
async fn http_listener_backlog_takes_a_boot_storm() {
    let l = tether_pxe::http::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = l.local_addr().unwrap().port();
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    // State Recv-Q Send-Q Local Peer: for a listener Send-Q is the backlog.
    let backlog: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("ss output: {text:?}"));
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        backlog,
        tether_pxe::http::HTTP_BACKLOG.min(somaxconn),
        "{text}"
    );
}
