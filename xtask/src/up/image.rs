//! The node image `up` serves: `image-builder/examples/default.toml` (or `disk.toml` for
//! `--cloud-init`, which adds `disk.raw`), built by the `tether-image` CLI with the agent
//! of this checkout and a signing key kept in the up directory. A stamp of the inputs
//! (spec, its units, the public key, the two binaries' size and mtime) skips the build when
//! nothing changed; it is removed before a build and written after one that succeeded.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tether_vm_tests::image::Built;

use crate::error::Error;
use crate::steps::{run as run_step, workspace_root};

/// The stamp file inside the image directory.
const STAMP: &str = ".up-inputs";

/// Builds the image unless the stamp says it is current; the built image.
pub fn ensure(root: &Path, disk: bool) -> Result<Built, Error> {
    let ws = workspace_root();
    let bins = super::workdir::target_dir().join("debug");
    let (spec, out) = if disk {
        ("disk.toml", root.join("image-disk"))
    } else {
        ("default.toml", root.join("image"))
    };
    let spec = ws.join("image-builder/examples").join(spec);
    let keys = root.join("keys");
    let agent = bins.join("tether-agent");
    let builder = bins.join("tether-image");
    let units = tether_image::spec::Spec::load(&spec)
        .map_err(|e| step_err(format!("{}: {e}", spec.display())))?
        .units;
    let public_key = keys.join("signing.pub");
    let stamp = inputs_stamp(&spec, units.as_deref(), &public_key, &[&agent, &builder])?;
    let current = fs::read_to_string(out.join(STAMP)).is_ok_and(|s| s == stamp)
        && out.join("manifest.json").is_file();
    if current {
        println!("    unchanged since the last build: {}", out.display());
    } else {
        let _ = fs::remove_file(out.join(STAMP));
        if !keys.join("signing.key").exists() {
            run_step(
                "image keygen",
                &builder.to_string_lossy(),
                &["keygen", &keys.to_string_lossy()],
            )?;
        }
        run_step(
            "image build",
            &builder.to_string_lossy(),
            &[
                "build",
                &spec.to_string_lossy(),
                "--out",
                &out.to_string_lossy(),
                "--agent",
                &agent.to_string_lossy(),
                "--key",
                &keys.join("signing.key").to_string_lossy(),
            ],
        )?;
        // The key may have been made just now: stamp what was built with.
        let stamp = inputs_stamp(&spec, units.as_deref(), &public_key, &[&agent, &builder])?;
        fs::write(out.join(STAMP), &stamp).map_err(|e| step_err(format!("write stamp: {e}")))?;
    }
    let manifest = fs::read(out.join("manifest.json"))
        .map_err(|e| step_err(format!("read {}/manifest.json: {e}", out.display())))?;
    let manifest = serde_json::from_slice(&manifest)
        .map_err(|e| step_err(format!("{}/manifest.json: {e}", out.display())))?;
    Ok(Built {
        dir: out,
        key: public_key,
        manifest,
    })
}

fn step_err(detail: String) -> Error {
    Error::Step {
        step: "node image".into(),
        detail,
    }
}

/// sha256 over the spec, every file of its units directory, the public key (absent: none),
/// and each binary's path, size and modification time (cargo rewrites a binary only when it
/// rebuilt it).
fn inputs_stamp(
    spec: &Path,
    units: Option<&Path>,
    public_key: &Path,
    binaries: &[&Path],
) -> Result<String, Error> {
    let mut h = Sha256::new();
    let read = |p: &Path| fs::read(p).map_err(|e| step_err(format!("read {}: {e}", p.display())));
    h.update(read(spec)?);
    h.update(fs::read(public_key).unwrap_or_default());
    let mut files: Vec<PathBuf> = match units {
        Some(u) => fs::read_dir(u)
            .map_err(|e| step_err(format!("read {}: {e}", u.display())))?
            .flatten()
            .map(|e| e.path())
            .collect(),
        None => Vec::new(),
    };
    files.sort();
    for f in files {
        h.update(f.to_string_lossy().as_bytes());
        h.update(read(&f)?);
    }
    for b in binaries {
        let m = fs::metadata(b).map_err(|e| step_err(format!("{}: {e}", b.display())))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        h.update(format!(
            "{} {} {}\n",
            b.display(),
            m.len(),
            mtime.as_nanos()
        ));
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_changes_with_each_input_and_only_then() {
        let t = tempfile::tempdir().unwrap();
        let spec = t.path().join("spec.toml");
        let units = t.path().join("units");
        let bin = t.path().join("bin");
        fs::create_dir_all(&units).unwrap();
        fs::write(&spec, "version = \"1\"\n").unwrap();
        fs::write(units.join("a.service"), "[Unit]\n").unwrap();
        fs::write(&bin, "v1").unwrap();
        let key = t.path().join("signing.pub");
        let stamp = || inputs_stamp(&spec, Some(&units), &key, &[&bin]).unwrap();
        let first = stamp();
        assert_eq!(first, stamp(), "same inputs, same stamp");
        fs::write(&spec, "version = \"2\"\n").unwrap();
        let second = stamp();
        assert_ne!(first, second, "spec");
        fs::write(units.join("b.service"), "[Unit]\n").unwrap();
        let third = stamp();
        assert_ne!(second, third, "a unit added");
        fs::write(&bin, "v2 longer").unwrap();
        let fourth = stamp();
        assert_ne!(third, fourth, "binary rebuilt");
        fs::write(&key, "a new key").unwrap();
        assert_ne!(fourth, stamp(), "key made");
        let missing = t.path().join("missing");
        assert!(inputs_stamp(&spec, Some(&units), &key, &[&missing]).is_err());
    }
}
