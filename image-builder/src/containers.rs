//! Container images for the artifact store, built here from pinned sources (no registry
//! outside is reachable; DESIGN.md "Artifacts and images without a registry"):
//!
//! | image | name nodes use | built from |
//! |---|---|---|
//! | pause | `registry.k8s.io/pause:<pins.pause>` | Kubernetes' `build/pause/linux/pause.c`, `gcc -static` |
//! | CoreDNS | `registry.k8s.io/coredns/coredns:<pins.coredns>` | the pinned `coredns` binary |
//! | kube-proxy | `registry.k8s.io/kube-proxy:<pins.kubernetes>` | the pinned binary on a Debian layer with iptables, conntrack and nft |
//! | test shell | `test.tether.dev/shell:1` | Debian's busybox-static: a shell, `httpd`, `wget` (not its `-T`: it crashes), `nslookup`, `nc`, `timeout` |
//!
//! Each layer is a tar made with GNU tar's reproducible flags; `crane` appends the layers to
//! an empty OCI image, sets the platform, entrypoint and user, and pushes to the store under
//! the name's path (the part after the registry host), so a node that mirrors the registry
//! to the store pulls it by its usual name.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tether_upstream::{Cache, Component, Pins, debian};

use serde_json::json;

use crate::build::run;
use crate::oci::{self, Descriptor, Layout};
use crate::{Error, Result};

/// One image of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerImage {
    /// The sandbox every pod starts with.
    Pause,
    /// The tenant's cluster DNS.
    Coredns,
    /// kube-proxy, with the userspace tools its proxier runs.
    KubeProxy,
    /// A shell and an HTTP server, for tests.
    TestShell,
    /// Tests' admission webhook: Debian's socat terminating TLS in front of a bash
    /// AdmissionReview handler (`test_webhook.sh`), at `/hook.sh`.
    TestWebhook,
}

/// The test image's registry: mirrored to the store like `registry.k8s.io`.
pub use tether_api::artifacts::TEST_REGISTRY;

/// Debian packages kube-proxy's layer carries (its iptables and nftables proxiers exec them).
const KUBE_PROXY_PACKAGES: &[&str] = &["iptables", "conntrack", "nftables"];

impl ContainerImage {
    /// Every image, in build order.
    pub const ALL: [ContainerImage; 5] = [
        ContainerImage::Pause,
        ContainerImage::Coredns,
        ContainerImage::KubeProxy,
        ContainerImage::TestShell,
        ContainerImage::TestWebhook,
    ];

    /// The full name nodes use.
    pub fn reference(self, pins: &Pins) -> String {
        match self {
            ContainerImage::Pause => format!("registry.k8s.io/pause:{}", pins.pause),
            ContainerImage::Coredns => {
                format!("registry.k8s.io/coredns/coredns:{}", pins.coredns)
            }
            ContainerImage::KubeProxy => {
                format!("registry.k8s.io/kube-proxy:{}", pins.kubernetes)
            }
            ContainerImage::TestShell => format!("{TEST_REGISTRY}/shell:1"),
            ContainerImage::TestWebhook => format!("{TEST_REGISTRY}/webhook:1"),
        }
    }

    /// The name inside the store: the reference without its registry host.
    pub fn path(self, pins: &Pins) -> String {
        let r = self.reference(pins);
        r.split_once('/').map(|(_, p)| p.to_string()).unwrap_or(r)
    }

    /// `(entrypoint, user)`.
    fn config(self) -> (&'static str, &'static str) {
        match self {
            ContainerImage::Pause => ("/pause", "65535:65535"),
            ContainerImage::Coredns => ("/coredns", "65532:65532"),
            ContainerImage::KubeProxy => ("/usr/local/bin/kube-proxy", "0:0"),
            ContainerImage::TestShell => ("/bin/sh", "0:0"),
            ContainerImage::TestWebhook => ("/bin/sh", "0:0"),
        }
    }
}

/// An image in the store.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The image.
    pub image: ContainerImage,
    /// The name nodes use.
    pub reference: String,
    /// `<store>/<path>@sha256:…`.
    pub pinned: String,
}

/// Builds every image and pushes it to the store at `store` (`host:port`, plain HTTP).
/// `work` holds the layers while building. Pushing an unchanged image again is cheap: the
/// registry already has its blobs.
pub fn push_all(store: &str, pins: &Pins, work: &Path) -> Result<Vec<Pushed>> {
    fs::create_dir_all(work).map_err(Error::io("create", work))?;
    ContainerImage::ALL
        .iter()
        .map(|i| push(*i, store, pins, work))
        .collect()
}

/// Builds and pushes one image (from the same OCI layout [`oci_archive`] writes, so the
/// store's copy and a baked-in copy have one digest).
pub fn push(image: ContainerImage, store: &str, pins: &Pins, work: &Path) -> Result<Pushed> {
    let scratch = oci::scratch(work, &format!("{image:?}").to_lowercase())?;
    let manifest = oci_layout(image, pins, scratch.path(), &scratch.path().join("layout"))?;
    oci::push(
        &scratch.path().join("layout"),
        &format!("{store}/{}", image.path(pins)),
        pins,
    )?;
    let name = image.path(pins);
    let repository = name.rsplit_once(':').map(|(r, _)| r).unwrap_or(&name);
    Ok(Pushed {
        image,
        reference: image.reference(pins),
        pinned: format!("{store}/{repository}@{}", manifest.digest),
    })
}

/// Builds `image` and writes it as an OCI image layout tarball at `out`, its index entry
/// named with the image's usual reference (`io.containerd.image.name`, for `ctr images
/// import`); `work` holds the layers. Reproducible: the same pins give the same bytes.
pub fn oci_archive(image: ContainerImage, pins: &Pins, work: &Path, out: &Path) -> Result<()> {
    let scratch = oci::scratch(work, &format!("{image:?}").to_lowercase())?;
    let layout = scratch.path().join("layout");
    oci_layout(image, pins, scratch.path(), &layout)?;
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
    }
    tar_tree(&layout, out)
}

/// Builds `image`'s layers in `build` and writes its OCI layout at `dir`: the layers
/// (zstd), the config (platform, entrypoint, user, diff IDs) and the index entry naming the
/// image. Returns the manifest's descriptor.
fn oci_layout(image: ContainerImage, pins: &Pins, build: &Path, dir: &Path) -> Result<Descriptor> {
    let layers = layers(image, pins, build)?;
    let layout = Layout::create(dir)?;
    let (mut descriptors, mut diff_ids) = (Vec::new(), Vec::new());
    for l in &layers {
        // zstd (level 3: fast to write, and fast to unpack on a TCG node); the diff ID is
        // the uncompressed tar's digest.
        diff_ids.push(oci::file_digest(l)?);
        let zst = l.with_extension("tar.zst");
        run(Command::new("zstd")
            .args(["-q", "-3", "-T1", "--no-progress", "-f", "-o"])
            .arg(&zst)
            .arg(l))?;
        descriptors.push(layout.add_file("application/vnd.oci.image.layer.v1.tar+zstd", &zst)?);
    }
    let (entrypoint, user) = image.config();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": [entrypoint], "User": user},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = layout.add_bytes(
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).expect("serialise"),
    )?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci::MANIFEST,
        "config": config.to_json(json!({})),
        "layers": descriptors.iter().map(|d| d.to_json(json!({}))).collect::<Vec<_>>(),
    });
    let reference = image.reference(pins);
    let tag = reference.rsplit(':').next().unwrap_or_default().to_string();
    layout.finish(
        &manifest,
        json!({"annotations": {
            "io.containerd.image.name": reference,
            "org.opencontainers.image.ref.name": tag,
        }}),
    )
}

/// The image's layer tarballs, bottom first.
fn layers(image: ContainerImage, pins: &Pins, work: &Path) -> Result<Vec<PathBuf>> {
    let dir = work.join(format!("{image:?}").to_lowercase());
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(Error::io("remove", &dir))?;
    }
    let root = dir.join("root");
    fs::create_dir_all(&root).map_err(Error::io("create", &root))?;
    let mut layers = Vec::new();
    match image {
        ContainerImage::Pause => {
            let source = pause_source(pins)?;
            run(Command::new("gcc")
                .args(["-static", "-O2", "-o"])
                .arg(root.join("pause"))
                .arg(&source))?;
        }
        ContainerImage::Coredns => {
            copy(&binary(Component::Coredns, pins)?, &root.join("coredns"))?;
        }
        ContainerImage::KubeProxy => {
            layers.push(debian_layer(KUBE_PROXY_PACKAGES)?);
            let bin = root.join("usr/local/bin");
            fs::create_dir_all(&bin).map_err(Error::io("create", &bin))?;
            copy(
                &binary(Component::KubeProxy, pins)?,
                &bin.join("kube-proxy"),
            )?;
        }
        ContainerImage::TestShell => {
            let bin = root.join("bin");
            fs::create_dir_all(&bin).map_err(Error::io("create", &bin))?;
            copy(Path::new("/bin/busybox"), &bin.join("busybox"))?;
            for applet in [
                "sh", "httpd", "wget", "nslookup", "nc", "timeout", "grep", "sleep", "cat", "ls",
                "ip",
            ] {
                std::os::unix::fs::symlink("busybox", bin.join(applet))
                    .map_err(Error::io("link", bin.join(applet)))?;
            }
        }
        ContainerImage::TestWebhook => {
            layers.push(debian_layer(&["socat"])?);
            let hook = root.join("hook.sh");
            fs::write(&hook, include_str!("test_webhook.sh")).map_err(Error::io("write", &hook))?;
            fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(Error::io("chmod", &hook))?;
        }
    }
    let tar = dir.join("layer.tar");
    tar_tree(&root, &tar)?;
    layers.push(tar);
    Ok(layers)
}

/// A reproducible tarball of `root`'s contents.
fn tar_tree(root: &Path, out: &Path) -> Result<()> {
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
        ])
        .arg(root)
        .arg("-cf")
        .arg(out)
        .arg("."))?;
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).map_err(Error::io("copy", from))?;
    Ok(())
}

/// The cached binary of `component` at `pins`.
fn binary(component: Component, pins: &Pins) -> Result<PathBuf> {
    let version = pins.version_for(component, pins.kubernetes)?;
    Ok(Cache::from_env().lookup(component, &version)?)
}

/// `pause.c` of the pinned Kubernetes release, from the Go module cache (downloaded if
/// absent; `cargo xtask deps` has normally fetched it to build the kubelet).
fn pause_source(pins: &Pins) -> Result<PathBuf> {
    let module = format!("k8s.io/kubernetes@{}", pins.kubernetes);
    let out = run(Command::new("go")
        .args(["mod", "download", "-json", &module])
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local"))?;
    let dir = serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v.get("Dir").and_then(|d| d.as_str()).map(PathBuf::from))
        .ok_or_else(|| Error::Command {
            command: format!("go mod download -json {module}"),
            detail: format!("no Dir in its output: {out}"),
        })?;
    Ok(dir.join("build/pause/linux/pause.c"))
}

/// A Debian layer (bookworm's `essential` set plus `packages`), cached by package list in
/// the image cache: mmdebstrap takes half a minute.
fn debian_layer(packages: &[&str]) -> Result<PathBuf> {
    let cache = Cache::from_env();
    let dir = cache.root().join("image/containers");
    fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
    let release = debian::host_release().map_err(Error::Upstream)?;
    let key = format!("{release}-essential-{}", packages.join("+"));
    let dest = dir.join(format!("{key}.tar"));
    let _lock = cache.lock("container-base").map_err(Error::Upstream)?;
    if dest.is_file() {
        return Ok(dest);
    }
    // mmdebstrap reads the deb822 format from a file named `*.sources`.
    let sources_dir = dir.join(format!(".sources-{}", std::process::id()));
    fs::create_dir_all(&sources_dir).map_err(Error::io("create", &sources_dir))?;
    let sources = sources_dir.join("debian.sources");
    fs::write(
        &sources,
        debian::host_sources(&release).map_err(Error::Upstream)?,
    )
    .map_err(Error::io("write", &sources))?;
    let partial = dir.join(format!(".{key}.partial-{}.tar", std::process::id()));
    let epoch = crate::build::source_date_epoch()?;
    let result = run(Command::new("mmdebstrap")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args(["--variant=essential", "--mode=root", "--quiet"])
        .arg(format!("--include={}", packages.join(",")))
        .args(
            ["doc", "man", "info", "locale"]
                .map(|d| format!("--dpkgopt=path-exclude=/usr/share/{d}/*")),
        )
        .arg(&release)
        .arg(&partial)
        .arg(&sources));
    let _ = fs::remove_dir_all(&sources_dir);
    if let Err(e) = result {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    fs::rename(&partial, &dest).map_err(Error::io("rename", &dest))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pins() {
        let pins = Pins::default();
        let cases = [
            (
                ContainerImage::Pause,
                "registry.k8s.io/pause:3.10.2",
                "pause:3.10.2",
            ),
            (
                ContainerImage::Coredns,
                "registry.k8s.io/coredns/coredns:v1.14.7",
                "coredns/coredns:v1.14.7",
            ),
            (
                ContainerImage::KubeProxy,
                "registry.k8s.io/kube-proxy:v1.36.3",
                "kube-proxy:v1.36.3",
            ),
            (
                ContainerImage::TestShell,
                "test.tether.dev/shell:1",
                "shell:1",
            ),
            (
                ContainerImage::TestWebhook,
                "test.tether.dev/webhook:1",
                "webhook:1",
            ),
        ];
        for (image, reference, path) in cases {
            assert_eq!(image.reference(&pins), reference);
            assert_eq!(image.path(&pins), path);
        }
    }
}
