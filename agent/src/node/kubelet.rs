//! The kubelet: its `KubeletConfiguration`, the bootstrap kubeconfig for TLS bootstrapping
//! and its unit. JSON, which the kubelet reads like YAML.

use serde_json::json;

use super::Layout;

/// What varies between nodes.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// Where things are.
    pub layout: &'a Layout,
    /// The tenant's cluster DNS service IP.
    pub cluster_dns: &'a str,
    /// The tenant's cluster domain.
    pub cluster_domain: &'a str,
    /// The node is a container on a cgroup v1 host (test nodes only): the kubelet must
    /// accept cgroup v1, and cadvisor, finding no device behind the container's root,
    /// reports image filesystem capacity 0 — so the filesystem eviction signals are off.
    pub container_node: bool,
    /// `providerID` (`tether://<machine>`).
    pub provider_id: Option<&'a str>,
    /// Taints to register with, `key=value:Effect`.
    pub taints: &'a [String],
}

/// A `key=value:Effect` taint as the KubeletConfiguration's `registerWithTaints` entry.
pub fn taint(s: &str) -> Option<serde_json::Value> {
    let (kv, effect) = s.rsplit_once(':')?;
    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
    (!key.is_empty() && !effect.is_empty())
        .then(|| json!({"key": key, "value": value, "effect": effect}))
}

/// The port the kubelet serves its API on: the only port of the node the tunnel dials.
pub const PORT: u16 = 10250;

/// Image pulls the kubelet runs at once (bounded: each one unpacks on the node's CPUs).
pub const MAX_PARALLEL_PULLS: u32 = 3;

/// `config.yaml` in the kubelet directory.
pub fn config(o: &Options) -> String {
    let ca = format!("{}/pki/ca.crt", o.layout.kubernetes_dir);
    let mut c = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": ca},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "systemd",
        "clusterDNS": [o.cluster_dns],
        "clusterDomain": o.cluster_domain,
        "port": PORT,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "rotateCertificates": true,
        "serverTLSBootstrap": true,
        "resolvConf": "/etc/resolv.conf",
        // Pulls in parallel: serialised, a 1 MB image waited 2m40s behind kube-proxy's
        // 46 MB one on a TCG node (EKS's AMI turns serial pulls off too).
        "serializeImagePulls": false,
        "maxParallelImagePulls": MAX_PARALLEL_PULLS,
    });
    if let Some(id) = o.provider_id {
        c["providerID"] = json!(id);
    }
    if !o.taints.is_empty() {
        c["registerWithTaints"] = o.taints.iter().filter_map(|t| taint(t)).collect();
    }
    if o.container_node {
        c["failCgroupV1"] = json!(false);
        c["evictionHard"] = json!({
            "memory.available": "100Mi",
            "nodefs.available": "0%",
            "nodefs.inodesFree": "0%",
            "imagefs.available": "0%",
            "imagefs.inodesFree": "0%",
        });
    }
    serde_json::to_string_pretty(&c).expect("serialise")
}

/// The bootstrap kubeconfig: the tenant's API and CA, and a bootstrap token.
pub fn bootstrap_kubeconfig(l: &Layout, server: &str, token: &str) -> String {
    let c = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tenant", "cluster": {
            "server": server,
            "certificate-authority": format!("{}/pki/ca.crt", l.kubernetes_dir),
        }}],
        "users": [{"name": "bootstrap", "user": {"token": token}}],
        "contexts": [{"name": "bootstrap", "context": {"cluster": "tenant", "user": "bootstrap"}}],
        "current-context": "bootstrap",
    });
    serde_json::to_string_pretty(&c).expect("serialise")
}

/// `kubelet.service`: Node name = Machine name, the node IP when chosen, the Node's labels.
pub fn unit(
    l: &Layout,
    node_name: &str,
    node_ip: Option<&str>,
    labels: &std::collections::BTreeMap<String, String>,
) -> String {
    let k = l.kubernetes_dir;
    let mut ip = node_ip
        .map(|ip| format!(" --node-ip={ip}"))
        .unwrap_or_default();
    if !labels.is_empty() {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        ip.push_str(&format!(" --node-labels={}", l.join(",")));
    }
    format!(
        "[Unit]\nDescription=kubelet (Tether)\nAfter=containerd.service\nRequires=containerd.service\n\n\
         [Service]\nExecStart={kubelet} --config={kd}/config.yaml \
         --bootstrap-kubeconfig={k}/bootstrap-kubelet.conf --kubeconfig={k}/kubelet.conf \
         --hostname-override={node_name}{ip}\nRestart=always\nRestartSec=2\n",
        kubelet = l.bin("kubelet"),
        kd = l.kubelet_dir,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_by_node_kind() {
        let layout = Layout::default();
        for container_node in [false, true] {
            let v: serde_json::Value = serde_json::from_str(&config(&Options {
                layout: &layout,
                cluster_dns: "10.96.0.10",
                cluster_domain: "cluster.local",
                container_node,
                provider_id: Some("tether://m1"),
                taints: &["gpu=:NoSchedule".to_string(), "bad".to_string()],
            }))
            .unwrap();
            assert_eq!(v["cgroupDriver"], "systemd");
            assert_eq!(v["clusterDNS"][0], "10.96.0.10");
            assert_eq!(v["serverTLSBootstrap"], true);
            assert_eq!(v["serializeImagePulls"], false);
            assert_eq!(v["maxParallelImagePulls"], MAX_PARALLEL_PULLS);
            assert_eq!(v["authentication"]["anonymous"]["enabled"], false);
            assert_eq!(
                v["authentication"]["x509"]["clientCAFile"],
                "/etc/kubernetes/pki/ca.crt"
            );
            assert_eq!(v.get("failCgroupV1").is_some(), container_node);
            assert_eq!(v["providerID"], "tether://m1");
            assert_eq!(
                v["registerWithTaints"],
                json!([{"key": "gpu", "value": "", "effect": "NoSchedule"}])
            );
            assert_eq!(v.get("evictionHard").is_some(), container_node);
        }
    }

    #[test]
    fn bootstrap_kubeconfig_and_unit() {
        let l = Layout::default();
        let v: serde_json::Value = serde_json::from_str(&bootstrap_kubeconfig(
            &l,
            "https://10.0.0.1:6443",
            "abcdef.0123456789abcdef",
        ))
        .unwrap();
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://10.0.0.1:6443"
        );
        assert_eq!(v["users"][0]["user"]["token"], "abcdef.0123456789abcdef");
        let labels = [("tether.dev/pool".to_string(), "w".to_string())].into();
        let u = unit(&l, "mac-525400000001", Some("10.0.0.7"), &labels);
        assert!(u.contains(
            "--hostname-override=mac-525400000001 --node-ip=10.0.0.7 --node-labels=tether.dev/pool=w\n"
        ));
        assert!(u.contains("ExecStart=/var/lib/tether/bin/kubelet "));
        assert!(!unit(&l, "n", None, &Default::default()).contains("--node-ip"));
    }
}
