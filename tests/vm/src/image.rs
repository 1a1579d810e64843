//! The example image, built once per test binary and shared by its tests: a real
//! `tether_image::build::build` of `image-builder/examples/default.toml` with a fresh signing
//! key and the agent built from this checkout. The builder's own caches (downloaded `.deb`s,
//! the mmdebstrap tree, the kernel) make every build after the first one of a machine quick.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use tether_boot::manifest::Manifest;
use tether_image::build::{BuildOptions, build};
use tether_image::keys;

/// The repository's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds `bin` of `package` into the calling test's own target directory (so a test run
/// never reads a stale binary from elsewhere) and returns its path.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    build_binary(package, bin, false)
}

/// [`workspace_binary`], optimised when `release` (into `target/release`).
fn build_binary(package: &str, bin: &str, release: bool) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    // target/<profile>/deps/<test> → target/<profile>
    let test_profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .to_path_buf();
    let target_dir = test_profile_dir.parent().expect("target dir").to_path_buf();
    let profile_dir = if release {
        target_dir.join("release")
    } else {
        test_profile_dir
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args(["build", "-q", "-p", package, "--bin", bin, "--target-dir"])
        .arg(&target_dir)
        .args(release.then_some("--release"))
        .status()
        .unwrap_or_else(|e| panic!("run cargo build -p {package}: {e}"));
    assert!(status.success(), "cargo build -p {package}");
    let path = profile_dir.join(bin);
    assert!(
        path.is_file(),
        "{} missing after cargo build",
        path.display()
    );
    path
}

/// Set to `1` to put an optimised tether-agent in the image: benchmarks compare it with
/// upstream's optimised Go binaries (`cargo xtask bench tunnel` sets it).
pub const RELEASE_AGENT_ENV: &str = "TETHER_TEST_RELEASE_AGENT";

/// The tether-agent binary (optimised with [`RELEASE_AGENT_ENV`]).
pub fn agent_binary() -> PathBuf {
    let release = std::env::var(RELEASE_AGENT_ENV).is_ok_and(|v| v == "1");
    build_binary("tether-agent", "tether-agent", release)
}

/// A built image.
pub struct Built {
    /// The image directory (`vmlinuz`, `vmlinux`, `initramfs`, `rootfs.squashfs`,
    /// `manifest.json`, …).
    pub dir: PathBuf,
    /// The public half of the key it was signed with.
    pub key: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// This run's scratch directory (images are ~300 MB each). Scratch directories of earlier
/// runs whose process is gone are removed first: a test run has no global teardown.
pub fn scratch() -> PathBuf {
    static CLEANED: OnceLock<()> = OnceLock::new();
    CLEANED.get_or_init(|| {
        for e in fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("tether-image-test-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    });
    let dir = std::env::temp_dir().join(format!("tether-image-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Build options for the example spec.
pub fn options(out: &Path, key: &Path, agent: &Path, fresh: bool) -> BuildOptions {
    BuildOptions {
        spec: workspace().join("image-builder/examples/default.toml"),
        out: out.to_path_buf(),
        agent: Some(agent.to_path_buf()),
        key: Some(key.to_path_buf()),
        fresh,
        format: None,
    }
}

/// One build of the example spec per test binary, shared by its tests.
pub fn image() -> &'static Built {
    static IMAGE: OnceLock<Built> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    IMAGE.get_or_init(|| {
        let dir = scratch();
        let keys = dir.join("keys");
        if !keys.join("signing.key").exists() {
            keys::keygen(&keys).unwrap();
        }
        let out = dir.join("image");
        let report = build(&options(
            &out,
            &keys.join("signing.key"),
            &agent_binary(),
            false,
        ))
        .expect("build the example image");
        Built {
            dir: out,
            key: keys.join("signing.pub"),
            manifest: report.manifest.unwrap(),
        }
    })
}
