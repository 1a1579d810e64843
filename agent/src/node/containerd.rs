//! containerd 2.x (config version 3): the CRI plugin with systemd cgroups, runc from the
//! node's bin directory, the pause image pinned, CNI from the layout, and registry mirrors
//! through `certs.d/<registry>/hosts.toml` — so manifests keep their `registry.k8s.io/…`
//! names while nodes pull from the artifact store.

use super::Layout;

/// What varies between nodes.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// Where things are.
    pub layout: &'a Layout,
    /// The sandbox (pause) image, e.g. `registry.k8s.io/pause:3.10.2`.
    pub sandbox_image: &'a str,
    /// Keep containers' `oom_score_adj` at or above containerd's own: for nodes that are
    /// containers on hosts withholding `CAP_SYS_RESOURCE` (runc cannot lower it there).
    pub restrict_oom_score_adj: bool,
}

/// `/etc/containerd/config.toml`.
pub fn config(o: &Options) -> String {
    let l = o.layout;
    let doc = serde_json::json!({
        "version": 3,
        "root": "/var/lib/containerd",
        "state": "/run/containerd",
        "plugins": {
            "io.containerd.cri.v1.images": {
                "snapshotter": "overlayfs",
                "pinned_images": {"sandbox": o.sandbox_image},
                "registry": {"config_path": l.certs_dir},
            },
            "io.containerd.cri.v1.runtime": {
                "restrict_oom_score_adj": o.restrict_oom_score_adj,
                "cni": {"bin_dirs": [l.cni_bin_dir], "conf_dir": l.cni_conf_dir},
                "containerd": {"runtimes": {"runc": {
                    "runtime_type": "io.containerd.runc.v2",
                    "options": {"SystemdCgroup": true, "BinaryName": l.bin("runc")},
                }}},
            },
        },
    });
    toml::to_string(&doc).expect("a JSON object is valid TOML")
}

/// `certs.d/<registry>/hosts.toml`: pull and resolve through `mirror` (`host:port`, plain
/// HTTP), falling back to `upstream` (`https://<registry>`) where it is reachable.
pub fn hosts_toml(registry: &str, mirror: &str) -> String {
    format!(
        "server = \"https://{registry}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// `containerd.service`, as upstream ships it, from the layout's bin directory.
pub fn unit(l: &Layout) -> String {
    format!(
        "[Unit]\nDescription=containerd (Tether)\nAfter=network.target local-fs.target\n\n\
         [Service]\nEnvironment=PATH={bin}:/usr/sbin:/usr/bin:/sbin:/bin\n\
         ExecStartPre=-/sbin/modprobe overlay\nExecStart={containerd}\nType=notify\n\
         Delegate=yes\nKillMode=process\nRestart=always\nRestartSec=5\n\
         LimitNPROC=infinity\nLimitCORE=infinity\nTasksMax=infinity\nOOMScoreAdjust=-999\n",
        bin = l.bin_dir,
        containerd = l.bin("containerd"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_containerd_v3_with_systemd_cgroups_and_mirrors() {
        let layout = Layout::default();
        for restrict in [false, true] {
            let text = config(&Options {
                layout: &layout,
                sandbox_image: "registry.k8s.io/pause:3.10.2",
                restrict_oom_score_adj: restrict,
            });
            let v: toml::Value = toml::from_str(&text).unwrap();
            assert_eq!(v["version"].as_integer(), Some(3));
            let cri = &v["plugins"]["io.containerd.cri.v1.runtime"];
            let runc = &cri["containerd"]["runtimes"]["runc"];
            assert_eq!(runc["options"]["SystemdCgroup"].as_bool(), Some(true));
            assert_eq!(
                runc["options"]["BinaryName"].as_str(),
                Some("/var/lib/tether/bin/runc")
            );
            assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(restrict));
            assert_eq!(
                cri["cni"]["bin_dirs"][0].as_str(),
                Some("/var/lib/tether/cni/bin")
            );
            let images = &v["plugins"]["io.containerd.cri.v1.images"];
            assert_eq!(
                images["pinned_images"]["sandbox"].as_str(),
                Some("registry.k8s.io/pause:3.10.2")
            );
            assert_eq!(
                images["registry"]["config_path"].as_str(),
                Some("/etc/containerd/certs.d")
            );
        }
    }

    #[test]
    fn hosts_toml_mirrors_over_http() {
        let v: toml::Value =
            toml::from_str(&hosts_toml("registry.k8s.io", "10.0.0.1:5000")).unwrap();
        assert_eq!(v["server"].as_str(), Some("https://registry.k8s.io"));
        let caps = v["host"]["http://10.0.0.1:5000"]["capabilities"]
            .as_array()
            .unwrap();
        assert_eq!(caps.len(), 2);
    }
}
