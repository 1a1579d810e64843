//! Writing OCI image layouts (image-spec `image-layout.md`): content-addressed blobs under
//! `blobs/sha256/`, an `index.json` naming one manifest, and `oci-layout`. The node
//! artifacts (`crane push`ed from a layout) and the pause image baked into the node image
//! (imported into containerd from a layout tarball) are both written here. Nothing carries
//! a timestamp: the same inputs give the same digests.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tether_upstream::{Cache, Component, Pins};

use crate::build::run;
use crate::{Error, Result};

/// The OCI image manifest media type.
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A content descriptor: media type, digest, size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// What the content is.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

impl Descriptor {
    /// The descriptor as JSON, with `extra` fields (annotations, artifactType) merged in.
    pub fn to_json(&self, extra: Value) -> Value {
        let mut v = json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        });
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
            m.extend(e);
        }
        v
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `sha256:<hex>` of the file at `path`.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).map_err(Error::io("open", path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(Error::io("read", path))?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Pushes the layout in `dir` to `target` (`host:port/repository:tag`, plain HTTP) with the
/// pinned crane.
pub fn push(dir: &Path, target: &str, pins: &Pins) -> Result<()> {
    let crane = Cache::from_env().lookup(
        Component::Crane,
        &pins.version_for(Component::Crane, pins.kubernetes)?,
    )?;
    run(std::process::Command::new(crane)
        .args(["push", "--insecure"])
        .arg(dir)
        .arg(target))?;
    Ok(())
}

/// A registry tag for `version` (one rule for every program: [`tether_api::artifacts::tag`]).
pub use tether_api::artifacts::tag;

/// A directory of its own under `work` for one layout (removed when dropped): pushes of
/// the same content may run side by side.
pub fn scratch(work: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    fs::create_dir_all(work).map_err(Error::io("create", work))?;
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir_in(work)
        .map_err(Error::io("create a directory in", work))
}

/// An OCI image layout being written in a directory.
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Starts a layout in `dir`, replacing whatever was there.
    pub fn create(dir: &Path) -> Result<Layout> {
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(Error::io("remove", dir))?;
        }
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(Error::io("create", &blobs))?;
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds `data` as a blob.
    pub fn add_bytes(&self, media_type: &str, data: &[u8]) -> Result<Descriptor> {
        let d = Descriptor {
            media_type: media_type.to_string(),
            digest: sha256_digest(data),
            size: data.len() as u64,
        };
        let path = self.blob_path(&d.digest);
        fs::write(&path, data).map_err(Error::io("write", &path))?;
        Ok(d)
    }

    /// Adds the file at `path` as a blob (hard-linked when it can be).
    pub fn add_file(&self, media_type: &str, path: &Path) -> Result<Descriptor> {
        let d = Descriptor {
            media_type: media_type.to_string(),
            digest: file_digest(path)?,
            size: fs::metadata(path).map_err(Error::io("stat", path))?.len(),
        };
        let to = self.blob_path(&d.digest);
        if !to.exists() && fs::hard_link(path, &to).is_err() {
            fs::copy(path, &to).map_err(Error::io("copy", path))?;
        }
        Ok(d)
    }

    /// Adds `manifest` and writes `index.json` naming it (with `extra` fields on its entry)
    /// and `oci-layout`; returns the manifest's descriptor.
    pub fn finish(self, manifest: &Value, extra: Value) -> Result<Descriptor> {
        let bytes = serde_json::to_vec(manifest).expect("serialise");
        let m = self.add_bytes(MANIFEST, &bytes)?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [m.to_json(extra)],
        });
        let file = self.dir.join("index.json");
        fs::write(&file, serde_json::to_vec(&index).expect("serialise"))
            .map_err(Error::io("write", &file))?;
        let file = self.dir.join("oci-layout");
        fs::write(&file, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(Error::io("write", &file))?;
        Ok(m)
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_content_addressed_and_indexed() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("bin");
        fs::write(&file, b"ELF pretend").unwrap();
        let dir = t.path().join("layout");
        let l = Layout::create(&dir).unwrap();
        let a = l.add_file("application/octet-stream", &file).unwrap();
        let b = l
            .add_bytes("application/vnd.oci.empty.v1+json", b"{}")
            .unwrap();
        assert_eq!(a.digest, sha256_digest(b"ELF pretend"));
        assert_eq!(a.size, 11);
        // The well-known digest of `{}` (image-spec, "Guidance for an Empty Descriptor").
        assert_eq!(
            b.digest,
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        let manifest = json!({"schemaVersion": 2, "layers": [a.to_json(json!({}))]});
        let m = l
            .finish(&manifest, json!({"annotations": {"k": "v"}}))
            .unwrap();
        let index: Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], m.digest.as_str());
        assert_eq!(index["manifests"][0]["annotations"]["k"], "v");
        for d in [&a, &b, &m] {
            let f = dir.join("blobs/sha256").join(&d.digest[7..]);
            assert_eq!(sha256_digest(&fs::read(&f).unwrap()), d.digest);
        }
        assert!(dir.join("oci-layout").is_file());
    }

    #[test]
    fn tags_are_valid() {
        for (version, want) in [
            ("v1.36.3", "v1.36.3"),
            ("2026.11.1+fix", "2026.11.1_fix"),
            ("-x", "_-x"),
            ("", "_"),
        ] {
            assert_eq!(tag(version), want, "{version}");
        }
    }

    #[test]
    fn descriptor_merges_extra_fields() {
        let d = Descriptor {
            media_type: "m".into(),
            digest: "sha256:x".into(),
            size: 3,
        };
        let v = d.to_json(json!({"artifactType": "t"}));
        assert_eq!(v["artifactType"], "t");
        assert_eq!(v["size"], 3);
    }
}
