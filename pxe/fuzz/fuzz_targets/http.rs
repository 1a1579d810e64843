//! Any bytes as an HTTP request head, and whatever parses through the router the server
//! runs ([`http::handle`]) against a TOML source with a kernel, an initramfs and a rootfs:
//! never a panic; only the statuses the server is meant to send; a script is iPXE and
//! carries nothing of the request but the parsed MAC (no `$` but our own `${platform}`).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tether_pxe::artifacts::Store;
use tether_pxe::http::{self, App};
use tether_pxe::metrics::Metrics;
use tether_pxe::recent::RecentMacs;
use tether_pxe::script::Enrollment;
use tether_pxe::source::config::ConfigSource;
use tether_pxe::tftp::Files;

fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tether-pxe-fuzz-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("k"), vec![7u8; 3000]).unwrap();
        std::fs::write(dir.join("i"), b"initramfs").unwrap();
        std::fs::write(dir.join("r"), vec![1u8; 5001]).unwrap();
        let cfg = dir.join("pxe.toml");
        std::fs::write(
            &cfg,
            format!(
                "default_image = \"d\"\n[images.d]\nversion = \"1\"\n\
                 cmdline = \"console=ttyS0 tether.root=file:/rootfs.img tether.rootfstype=squashfs \
                 tether.verity.roothash={} tether.verity.hashoffset=4096\"\n\
                 kernel = \"k\"\ninitrd = \"i\"\nrootfs = \"r\"\n\
                 [machines.\"52:54:00:00:00:02\"]\nname = \"known\"\n",
                "c".repeat(64)
            ),
        )
        .unwrap();
        let mut store = Store::default();
        let enroll = Enrollment::new(
            Some("https://10.0.0.1:9443".into()),
            Some(format!("sha256:{}", "ab".repeat(32)).parse().unwrap()),
            Some("abcdef.0123456789abcdef".parse().unwrap()),
        )
        .unwrap();
        let source = ConfigSource::load(&cfg, &mut store, enroll).unwrap();
        let recent = RecentMacs::new(16, Duration::from_secs(3600));
        recent.saw("52:54:00:00:00:01".parse().unwrap());
        let mut files = Files::default();
        files.insert("ipxe.efi", bytes::Bytes::from_static(b"MZ"));
        App {
            source: Arc::new(source),
            store,
            files,
            http_base: "http://10.0.0.1".into(),
            recent: Arc::new(recent),
            metrics: Arc::new(Metrics::default()),
            artifact_slots: Arc::new(tokio::sync::Semaphore::new(4)),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(Some((req, used, _close))) = http::parse_head(data) else {
        return;
    };
    assert!(used <= data.len());
    let resp = futures::executor::block_on(http::handle(app(), &req));
    let status = resp.status().as_u16();
    assert!(
        matches!(status, 200 | 206 | 304 | 400 | 404 | 405 | 416 | 422 | 503),
        "status {status}"
    );
    // Scripts are `/boot/<mac>.ipxe`; an artifact path may end in `.ipxe` too (the cpio
    // entry's name is the client's), and its body is the artifact's bytes.
    let path = req.uri().path();
    if status == 200 && path.starts_with("/boot/") && path.ends_with(".ipxe") {
        let body = std::str::from_utf8(resp.body()).expect("scripts are UTF-8");
        assert!(body.starts_with("#!ipxe\n"), "{body}");
        assert_eq!(
            body.matches('$').count(),
            body.matches("${platform}").count(),
            "{body}"
        );
    }
});
