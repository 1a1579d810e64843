//! What makes a machine a Kubernetes node of its pool's tenant.
//!
//! - Pure renderers with table tests: [`containerd`], [`kubelet`], [`cni`] (the files each
//!   reads) and [`plan`] (every file of a join, where binaries go, what a change restarts);
//! - edges: [`download`] (resumable, verified downloads from the store; [`verified`] keeps
//!   a pass from hashing them again), [`install`] (the
//!   named steps from a desired join to a Ready Node), [`own_node`] (the Node as the kubelet
//!   sees it), [`routes`] (host-gw routes), [`wipe`] (everything of a tenant gone).

pub mod cni;
pub mod containerd;
pub mod download;
pub mod install;
pub mod kubelet;
pub mod own_node;
pub mod plan;
pub mod routes;
pub mod verified;
pub mod wipe;

/// Where the node runtime lives. The image's `/usr` and `/opt` are read-only, so binaries
/// go under `/var/lib/tether` (the `/var` overlay, on the state partition or a tmpfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// containerd, its shim, runc, ctr, kubelet.
    pub bin_dir: &'static str,
    /// CNI plugins.
    pub cni_bin_dir: &'static str,
    /// CNI network configurations.
    pub cni_conf_dir: &'static str,
    /// containerd's per-registry `hosts.toml` directories.
    pub certs_dir: &'static str,
    /// The tenant CA, bootstrap and kubelet kubeconfigs.
    pub kubernetes_dir: &'static str,
    /// The kubelet's state and `config.yaml`.
    pub kubelet_dir: &'static str,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            bin_dir: "/var/lib/tether/bin",
            cni_bin_dir: "/var/lib/tether/cni/bin",
            cni_conf_dir: "/etc/cni/net.d",
            certs_dir: "/etc/containerd/certs.d",
            kubernetes_dir: "/etc/kubernetes",
            kubelet_dir: "/var/lib/kubelet",
        }
    }
}

impl Layout {
    /// A binary in [`Layout::bin_dir`].
    pub fn bin(&self, name: &str) -> String {
        format!("{}/{name}", self.bin_dir)
    }
}

/// Runs `program` with `args` (the pinned `ctr`, iproute2's `ip`); its output, or an error
/// naming the command, its exit status and what it wrote to stderr.
pub(crate) async fn run(program: &std::path::Path, args: &[&str]) -> crate::error::Result<Vec<u8>> {
    let what = format!("{} {}", program.display(), args.join(" "));
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| crate::error::Error::Command {
            what: what.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(crate::error::Error::Command {
            what,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_give_their_output_or_say_how_they_failed() {
        let sh = std::path::Path::new("sh");
        assert_eq!(run(sh, &["-c", "echo hi"]).await.unwrap(), b"hi\n");
        let err = run(sh, &["-c", "echo no >&2; exit 3"]).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sh -c") && text.contains("no") && text.contains('3'),
            "{text}"
        );
        let missing = run(std::path::Path::new("/nonexistent/tool"), &[]).await;
        assert!(missing.is_err());
    }
}
