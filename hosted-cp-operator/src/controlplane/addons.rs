//! The tenant add-ons kubeadm installs, rendered as manifests (pure): kube-proxy (a
//! DaemonSet that reaches the API at the tenant's external endpoint, since nodes are not
//! next to the control plane) and CoreDNS (a Deployment behind the `kube-dns` Service at
//! the spec's DNS service IP). An add-on absent from `spec.addons` renders nothing.
//!
//! Image versions: kube-proxy follows the tenant's Kubernetes version; CoreDNS is the pinned
//! CoreDNS ([`coredns_image`]) — the one `tether-image containers` builds into the artifact
//! store, since nodes pull `registry.k8s.io` names from there.
//!
//! kube-proxy leaves `nf_conntrack_max` alone (`conntrack.maxPerCore: 0`): the sysctl is
//! writable only from the initial network namespace, so setting it fails on nodes that are
//! containers, and the kernel sizes it from memory already.

use serde_json::{Value, json};
use tether_api::TenantControlPlaneSpec;
use tether_api::tenant_control_plane::Cidr;

/// CoreDNS image used unless `spec.addons.coreDNS.image` overrides it.
pub fn coredns_image() -> String {
    format!(
        "registry.k8s.io/coredns/coredns:{}",
        tether_upstream::Pins::default().coredns
    )
}

/// The CoreDNS Service IP: `dnsServiceIP`, else the tenth address of the service range.
pub fn dns_ip(spec: &TenantControlPlaneSpec) -> Option<String> {
    spec.network_profile.dns_service_ip.clone().or_else(|| {
        Cidr::parse(&spec.network_profile.service_cidr)
            .ok()?
            .nth(10)
            .map(|ip| ip.to_string())
    })
}

/// Every add-on object for the tenant.
pub fn objects(spec: &TenantControlPlaneSpec, version: &str, endpoint: &str) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(kp) = &spec.addons.kube_proxy {
        let image = kp
            .image
            .clone()
            .unwrap_or_else(|| format!("registry.k8s.io/kube-proxy:{version}"));
        out.extend(kube_proxy(spec, &image, endpoint));
    }
    if let Some(dns) = &spec.addons.core_dns {
        let image = dns.image.clone().unwrap_or_else(coredns_image);
        out.extend(coredns(spec, &image));
    }
    out
}

fn kube_proxy(spec: &TenantControlPlaneSpec, image: &str, endpoint: &str) -> Vec<Value> {
    let config = format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: {}\nmode: iptables\nclientConnection:\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\nconntrack:\n  maxPerCore: 0\n",
        spec.network_profile.pod_cidr
    );
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: default\n  cluster:\n    certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt\n    server: {endpoint}\ncontexts:\n- name: default\n  context: {{cluster: default, namespace: default, user: default}}\ncurrent-context: default\nusers:\n- name: default\n  user:\n    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token\n"
    );
    let labels = json!({"k8s-app": "kube-proxy"});
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kube-proxy", "namespace": "kube-system"}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "kubeadm:node-proxier"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node-proxier"},
            "subjects": [{"kind": "ServiceAccount", "name": "kube-proxy", "namespace": "kube-system"}],
        }),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kube-proxy", "namespace": "kube-system", "labels": {"app": "kube-proxy"}},
            "data": {"config.conf": config, "kubeconfig.conf": kubeconfig},
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "kube-proxy", "namespace": "kube-system", "labels": labels},
            "spec": {
                "selector": {"matchLabels": labels},
                "updateStrategy": {"type": "RollingUpdate"},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "priorityClassName": "system-node-critical",
                        "serviceAccountName": "kube-proxy",
                        "hostNetwork": true,
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{
                            "name": "kube-proxy",
                            "image": image,
                            "command": ["/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=$(NODE_NAME)"],
                            "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                            "securityContext": {"privileged": true},
                            "volumeMounts": [
                                {"name": "kube-proxy", "mountPath": "/var/lib/kube-proxy"},
                                {"name": "xtables-lock", "mountPath": "/run/xtables.lock"},
                                {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": true},
                            ],
                        }],
                        "volumes": [
                            {"name": "kube-proxy", "configMap": {"name": "kube-proxy"}},
                            {"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
                            {"name": "lib-modules", "hostPath": {"path": "/lib/modules"}},
                        ],
                    },
                },
            },
        }),
    ]
}

fn coredns(spec: &TenantControlPlaneSpec, image: &str) -> Vec<Value> {
    let domain = &spec.network_profile.cluster_domain;
    let corefile = format!(
        ".:53 {{\n    errors\n    health {{\n       lameduck 5s\n    }}\n    ready\n    kubernetes {domain} in-addr.arpa ip6.arpa {{\n       pods insecure\n       fallthrough in-addr.arpa ip6.arpa\n       ttl 30\n    }}\n    prometheus :9153\n    forward . /etc/resolv.conf {{\n       max_concurrent 1000\n    }}\n    cache 30\n    loop\n    reload\n    loadbalance\n}}\n"
    );
    let labels = json!({"k8s-app": "kube-dns"});
    let mut service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
        "spec": {"selector": labels, "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
        ]},
    });
    if let Some(ip) = dns_ip(spec) {
        service["spec"]["clusterIP"] = json!(ip);
    }
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        }),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"}, "data": {"Corefile": corefile}}),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "priorityClassName": "system-cluster-critical",
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
                        "containers": [{
                            "name": "coredns",
                            "image": image,
                            "args": ["-conf", "/etc/coredns/Corefile"],
                            "ports": [
                                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": 9153, "protocol": "TCP"},
                            ],
                            "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}, "readOnlyRootFilesystem": true},
                            "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "initialDelaySeconds": 60},
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}},
                            "resources": {"requests": {"cpu": "100m", "memory": "70Mi"}, "limits": {"memory": "170Mi"}},
                            "volumeMounts": [{"name": "config-volume", "mountPath": "/etc/coredns", "readOnly": true}],
                        }],
                        "volumes": [{"name": "config-volume", "configMap": {"name": "coredns", "items": [{"key": "Corefile", "path": "Corefile"}]}}],
                    },
                },
            },
        }),
        service,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_api::tenant_control_plane::{AddonSpec, KubernetesSpec};

    fn spec() -> TenantControlPlaneSpec {
        TenantControlPlaneSpec {
            kubernetes: KubernetesSpec {
                version: "v1.36.3".into(),
            },
            ..Default::default()
        }
    }

    fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
        objs.iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    #[test]
    fn addons_follow_the_spec() {
        type Edit = fn(&mut TenantControlPlaneSpec);
        // (case, edit, kube-proxy image, coredns image, dns ip)
        type Case<'a> = (&'a str, Edit, Option<&'a str>, Option<&'a str>, &'a str);
        let coredns = coredns_image();
        assert_eq!(coredns, "registry.k8s.io/coredns/coredns:v1.14.7");
        let table: &[Case] = &[
            (
                "defaults",
                |_| {},
                Some("registry.k8s.io/kube-proxy:v1.36.3"),
                Some(coredns.as_str()),
                "10.96.0.10",
            ),
            (
                "no kube-proxy",
                |s| s.addons.kube_proxy = None,
                None,
                Some(coredns.as_str()),
                "10.96.0.10",
            ),
            (
                "no coredns",
                |s| s.addons.core_dns = None,
                Some("registry.k8s.io/kube-proxy:v1.36.3"),
                None,
                "",
            ),
            (
                "image override",
                |s| {
                    s.addons.core_dns = Some(AddonSpec {
                        image: Some("my/dns:1".into()),
                    })
                },
                Some("registry.k8s.io/kube-proxy:v1.36.3"),
                Some("my/dns:1"),
                "10.96.0.10",
            ),
            (
                "dns ip",
                |s| s.network_profile.dns_service_ip = Some("10.96.0.53".into()),
                Some("registry.k8s.io/kube-proxy:v1.36.3"),
                Some(coredns.as_str()),
                "10.96.0.53",
            ),
        ];
        for (name, edit, kp, dns, ip) in table {
            let mut s = spec();
            edit(&mut s);
            let objs = objects(&s, "v1.36.3", "https://192.0.2.1:6443");
            let ds = find(&objs, "DaemonSet", "kube-proxy");
            assert_eq!(
                ds.map(|d| d["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap()),
                *kp,
                "{name}"
            );
            let dep = find(&objs, "Deployment", "coredns");
            assert_eq!(
                dep.map(|d| d["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap()),
                *dns,
                "{name}"
            );
            if dns.is_some() {
                assert_eq!(
                    find(&objs, "Service", "kube-dns").unwrap()["spec"]["clusterIP"],
                    *ip,
                    "{name}"
                );
            }
            if kp.is_some() {
                let cm = find(&objs, "ConfigMap", "kube-proxy").unwrap();
                assert!(
                    cm["data"]["kubeconfig.conf"]
                        .as_str()
                        .unwrap()
                        .contains("server: https://192.0.2.1:6443")
                );
                let config: serde_yaml::Value =
                    serde_yaml::from_str(cm["data"]["config.conf"].as_str().unwrap()).unwrap();
                assert_eq!(config["clusterCIDR"].as_str(), Some("10.244.0.0/16"));
                assert_eq!(config["conntrack"]["maxPerCore"].as_u64(), Some(0));
            }
        }
    }
}
