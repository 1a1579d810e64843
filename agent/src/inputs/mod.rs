//! Where the agent's first-contact inputs (machine API URL, CA pin, token) come from. First
//! found wins, in this order (issue 8, DESIGN.md "The life of a worker node"):
//!
//! 1. the kernel command line: `tether.api=`, `tether.ca=`, `tether.token=` (PXE boots,
//!    rendered by tether-pxe; all three or none);
//! 2. cloud-init NoCloud, read without cloud-init ([`nocloud`]): a `ds=nocloud;s=<uri>/`
//!    on the command line or in the SMBIOS serial number, the local seed directories
//!    `/var/lib/cloud/seed/nocloud{,-net}/`, or a volume labelled `cidata`/`CIDATA`;
//! 3. `/etc/tether/agent.toml`.
//!
//! Every path is read below a `root` (normally `/`), so tests can hand in a directory tree.

pub mod nocloud;

use std::path::{Path, PathBuf};

use tether_boot::BootParams;
use tether_boot::seed::{AGENT_TOML_PATH, Seed};

use crate::error::{Error, Result};

/// The resolved inputs.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// URL, pin and token.
    pub seed: Seed,
    /// Where they came from, for the log.
    pub origin: String,
    /// The parsed kernel command line (boot MAC, slot, …), whatever the seed's origin.
    pub boot: BootParams,
}

/// Reads `root`/`path` (absolute `path`).
pub(crate) fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// The kernel command line below `root`.
pub fn boot_params(root: &Path) -> Result<BootParams> {
    let path = under(root, "/proc/cmdline");
    let text = std::fs::read_to_string(&path).map_err(Error::io("read", &path))?;
    BootParams::parse(&text).map_err(|e| Error::BadInput {
        source_name: "kernel command line".into(),
        detail: e.to_string(),
    })
}

/// The seed on the command line, if all three words are there.
pub fn from_cmdline(boot: &BootParams) -> Result<Option<Seed>> {
    match (&boot.api, boot.ca, &boot.token) {
        (Some(api), Some(ca), Some(token)) => {
            Seed::new(api, ca, token.clone())
                .map(Some)
                .map_err(|e| Error::BadInput {
                    source_name: "kernel command line".into(),
                    detail: e.to_string(),
                })
        }
        (None, None, None) => Ok(None),
        _ => {
            tracing::warn!(
                "the kernel command line has only some of tether.api, tether.ca and tether.token; looking elsewhere"
            );
            Ok(None)
        }
    }
}

/// Resolves the inputs below `root`, trying each source in order. `allow_mounts` lets the
/// NoCloud reader mount a `cidata` volume (off in tests that run unprivileged paths).
pub async fn resolve(root: &Path, allow_mounts: bool) -> Result<Inputs> {
    let boot = boot_params(root)?;
    for w in boot.unknown_tether_words() {
        tracing::warn!(word = w, "unknown tether.* word on the kernel command line");
    }
    if let Some(seed) = from_cmdline(&boot)? {
        return Ok(Inputs {
            seed,
            origin: "kernel command line".into(),
            boot,
        });
    }
    let mut tried = vec!["kernel command line (no tether.api/ca/token)".to_string()];
    match nocloud::find(root, &boot, allow_mounts).await {
        Ok(Some((seed, origin))) => {
            return Ok(Inputs { seed, origin, boot });
        }
        Ok(None) => tried.push("NoCloud (no datasource found)".into()),
        // A NoCloud seed that exists but is not ours is worth saying, then the next source.
        Err(e) => {
            tracing::warn!("NoCloud: {e}");
            tried.push(format!("NoCloud ({e})"));
        }
    }
    let toml = under(root, AGENT_TOML_PATH);
    match std::fs::read_to_string(&toml) {
        Ok(text) => {
            let seed = Seed::from_agent_toml(&text).map_err(|e| Error::BadInput {
                source_name: toml.display().to_string(),
                detail: e.to_string(),
            })?;
            Ok(Inputs {
                seed,
                origin: AGENT_TOML_PATH.into(),
                boot,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tried.push(format!("{AGENT_TOML_PATH} (absent)"));
            Err(Error::NoInputs(format!("tried {}", tried.join("; "))))
        }
        Err(e) => Err(Error::io("read", &toml)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256:abababababababababababababababababababababababababababababababab";

    fn tree(cmdline: &str) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("proc")).unwrap();
        std::fs::write(t.path().join("proc/cmdline"), cmdline).unwrap();
        t
    }

    fn seed(token: &str) -> Seed {
        Seed::new(
            "https://10.0.0.1:9443",
            PIN.parse().unwrap(),
            token.parse().unwrap(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn first_source_wins() {
        let cmd = format!(
            "console=ttyS0 tether.api=https://10.0.0.1:9443 tether.ca={PIN} tether.token=aaaaaa.0123456789abcdef\n"
        );
        let t = tree(&cmd);
        let toml = t.path().join("etc/tether/agent.toml");
        std::fs::create_dir_all(toml.parent().unwrap()).unwrap();
        std::fs::write(&toml, seed("cccccc.0123456789abcdef").to_agent_toml()).unwrap();
        let seed_dir = t.path().join("var/lib/cloud/seed/nocloud");
        std::fs::create_dir_all(&seed_dir).unwrap();
        std::fs::write(
            seed_dir.join("user-data"),
            seed("bbbbbb.0123456789abcdef").to_user_data(),
        )
        .unwrap();
        std::fs::write(seed_dir.join("meta-data"), "instance-id: i-1\n").unwrap();

        let got = resolve(t.path(), false).await.unwrap();
        assert_eq!(got.origin, "kernel command line");
        assert_eq!(got.seed.token.id(), "aaaaaa");

        std::fs::write(t.path().join("proc/cmdline"), "console=ttyS0\n").unwrap();
        let got = resolve(t.path(), false).await.unwrap();
        assert!(got.origin.contains("seed/nocloud"), "{}", got.origin);
        assert_eq!(got.seed.token.id(), "bbbbbb");

        std::fs::remove_dir_all(&seed_dir).unwrap();
        let got = resolve(t.path(), false).await.unwrap();
        assert_eq!(got.origin, AGENT_TOML_PATH);
        assert_eq!(got.seed.token.id(), "cccccc");

        std::fs::remove_file(&toml).unwrap();
        let err = resolve(t.path(), false).await.unwrap_err().to_string();
        assert!(
            err.contains("no enrollment inputs") && err.contains("agent.toml (absent)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn bad_inputs_are_clear_errors() {
        let t = tree("tether.token=nope\n");
        let err = resolve(t.path(), false).await.unwrap_err().to_string();
        assert!(
            err.contains("kernel command line") && err.contains("token"),
            "{err}"
        );

        let t = tree("quiet\n");
        let toml = t.path().join("etc/tether/agent.toml");
        std::fs::create_dir_all(toml.parent().unwrap()).unwrap();
        std::fs::write(&toml, "api = 1\n").unwrap();
        let err = resolve(t.path(), false).await.unwrap_err().to_string();
        assert!(err.contains("agent.toml"), "{err}");
    }

    #[tokio::test]
    async fn a_partial_cmdline_falls_through() {
        let t = tree(&format!(
            "tether.api=https://10.0.0.1:9443 tether.ca={PIN}\n"
        ));
        let toml = t.path().join("etc/tether/agent.toml");
        std::fs::create_dir_all(toml.parent().unwrap()).unwrap();
        std::fs::write(&toml, seed("cccccc.0123456789abcdef").to_agent_toml()).unwrap();
        assert_eq!(
            resolve(t.path(), false).await.unwrap().origin,
            AGENT_TOML_PATH
        );
    }
}
