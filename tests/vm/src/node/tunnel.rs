//! What the API server does to a node through the konnectivity tunnel, as a user does it
//! with kubectl: `logs`, `exec` with stdin, `port-forward` (a 100 MB file, checksummed),
//! `attach`, and the API server's proxy to a pod (how it reaches webhooks and aggregated
//! APIs). Also the upstream Go `konnectivity-agent`, run in a node's namespace as the
//! reference the same checks must pass with.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tether_testkit::NetNs;
use tether_testkit::process::Process;
use tether_upstream::{Component, Pins};

use super::Tenant;
use crate::site::Site;

/// Bytes the port-forward check moves.
pub const BIG_MIB: usize = 100;

/// Deploys pod `name` on node `node`: container `web` logs a line, writes a
/// [`BIG_MIB`] MiB random file and its sha256, and serves them over HTTP on 8080; container
/// `console` echoes what is attached to its stdin. Returns once the pod is ready.
pub fn deploy_tools(site: &Site, tenant: &Tenant, name: &str, node: &str) {
    let file = site.dir.join(format!("{name}.pod.yaml"));
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\n\
             spec:\n  nodeName: {node}\n  containers:\n\
             \x20 - name: web\n    image: {image}\n\
             \x20   command: [sh, -c, 'echo \"tunnel log line of {name}\"; mkdir -p /www && \
             dd if=/dev/urandom of=/www/big bs=1048576 count={BIG_MIB} 2>/dev/null && \
             sha256sum /www/big | cut -d\" \" -f1 > /www/big.sha256 && echo small > /www/small && \
             exec httpd -f -p 8080 -h /www']\n\
             \x20   readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}\n\
             \x20 - name: console\n    image: {image}\n    stdin: true\n    stdinOnce: true\n\
             \x20   command: [sh, -c, 'while read l; do echo \"attached: $l\"; done']\n",
            image = tether_image::containers::ContainerImage::TestShell.reference(&Pins::default())
        ),
    )
    .unwrap();
    apply_and_wait(tenant, &file, name);
}

/// Applies `file` to the tenant and waits until pod `pod` is ready (its description on
/// timeout).
fn apply_and_wait(tenant: &Tenant, file: &Path, pod: &str) {
    tenant
        .kubectl(&["apply", "-f", &file.display().to_string()])
        .unwrap();
    tenant
        .kubectl(&[
            "wait",
            &format!("pod/{pod}"),
            "--for=condition=Ready",
            "--timeout=180s",
        ])
        .unwrap_or_else(|e| {
            panic!(
                "pod {pod} not ready: {e}\n{}",
                tenant
                    .kubectl(&["describe", "pod", pod])
                    .unwrap_or_default()
            )
        });
}

/// kubectl against `tenant` with `stdin` fed and closed, killed after `timeout`; stdout, or
/// the error with stderr.
pub fn kubectl_stdin(
    tenant: &Tenant,
    args: &[&str],
    stdin: &str,
    timeout: Duration,
) -> Result<String, String> {
    let mut child = Command::new(tether_testkit::binaries::binary(Component::Kubectl).unwrap())
        .arg("--kubeconfig")
        .arg(&tenant.admin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "kubectl {args:?} still running after {timeout:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// What one run of the checks measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Port-forward throughput of the big file, MB/s (10^6 bytes).
    pub forward_mb_s: f64,
}

/// `kubectl logs`, `exec -i`, `port-forward`, `attach -i` and the pod proxy against pod
/// `pod` (made by [`deploy_tools`]); each must work. Panics naming the one that failed.
pub fn check_all(tenant: &Tenant, pod: &str) -> Measured {
    let t = Duration::from_secs(60);
    let logs = tenant.kubectl(&["logs", pod, "-c", "web"]).unwrap();
    assert!(
        logs.contains(&format!("tunnel log line of {pod}")),
        "kubectl logs {pod}: {logs}"
    );
    let exec = kubectl_stdin(
        tenant,
        &[
            "exec",
            "-i",
            pod,
            "-c",
            "web",
            "--",
            "sh",
            "-c",
            "read x; echo \"got $x\"; cat /www/big.sha256",
        ],
        "hello through the tunnel\n",
        t,
    )
    .unwrap();
    let mut lines = exec.lines();
    assert_eq!(
        lines.next(),
        Some("got hello through the tunnel"),
        "exec -i: {exec}"
    );
    let want = lines.next().unwrap_or_default().trim().to_string();
    assert_eq!(want.len(), 64, "the pod's sha256: {exec}");
    let (sha, bytes, secs) = port_forward_get(tenant, pod, "/big");
    assert_eq!(bytes, BIG_MIB * 1024 * 1024, "port-forward moved all bytes");
    assert_eq!(sha, want, "port-forwarded bytes match the pod's checksum");
    let attach =
        kubectl_stdin(tenant, &["attach", "-i", pod, "-c", "console"], "ping\n", t).unwrap();
    assert!(attach.contains("attached: ping"), "attach -i: {attach}");
    let proxied = tenant
        .kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/default/pods/{pod}:8080/proxy/small"),
        ])
        .unwrap();
    assert_eq!(proxied.trim(), "small", "the API server's proxy to the pod");
    Measured {
        forward_mb_s: bytes as f64 / 1e6 / secs,
    }
}

/// `kubectl port-forward pod/<pod> :8080`, then an HTTP GET of `path` through it: (sha256
/// hex of the body, body bytes, seconds the body took).
pub fn port_forward_get(tenant: &Tenant, pod: &str, path: &str) -> (String, usize, f64) {
    let (mut child, port) = port_forward(tenant, pod);
    let got = http_get(port, path);
    let _ = child.kill();
    let _ = child.wait();
    got.unwrap_or_else(|e| panic!("GET {path} through port-forward to {pod}: {e}"))
}

/// A running `kubectl port-forward pod/<pod> :8080` and its local port.
pub fn port_forward(tenant: &Tenant, pod: &str) -> (std::process::Child, u16) {
    let mut child = Command::new(tether_testkit::binaries::binary(Component::Kubectl).unwrap())
        .arg("--kubeconfig")
        .arg(&tenant.admin)
        .args(["port-forward", &format!("pod/{pod}"), ":8080"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // "Forwarding from 127.0.0.1:PORT -> 8080"
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let port = line
        .split_once("127.0.0.1:")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("kubectl port-forward said {line:?}"));
    // Keep the pipe open (kubectl writes a line per connection).
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (child, port)
}

/// HTTP/1.0 GET of `path` on loopback `port`: (sha256 hex of the body, its bytes, seconds).
pub fn http_get(port: u16, path: &str) -> Result<(String, usize, f64), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut head = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut hasher = Sha256::new();
    let mut body = 0usize;
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if body == 0 && !head.ends_with(b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = head.split_off(i + 4);
                hasher.update(&rest);
                body += rest.len();
            }
        } else {
            hasher.update(&buf[..n]);
            body += n;
        }
    }
    let status =
        String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or(&[])).into_owned();
    if !status.contains(" 200") {
        return Err(format!("status {status:?}"));
    }
    Ok((
        hex::encode(hasher.finalize()),
        body,
        started.elapsed().as_secs_f64(),
    ))
}

/// Whether TCP `addr` accepts a connection within 3 s.
pub fn reachable(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3)).is_ok()
}

/// Makes the node in `netns` unreachable from outside (`on`), or reachable again: new
/// inbound TCP connections on its segment link are dropped; what the node opens itself
/// still flows.
pub fn firewall_inbound(netns: &NetNs, on: bool) {
    let rule = "INPUT -i eth0 -p tcp -m conntrack --ctstate NEW -j DROP";
    let mut args = vec![if on { "-I" } else { "-D" }];
    args.extend(rule.split(' '));
    netns.exec("iptables", &args).expect("firewall the node");
}

/// The tenant's konnectivity agent endpoint (`host:port`).
pub fn konnectivity_endpoint(site: &Site, tenant: &Tenant) -> String {
    site.kubectl(&[
        "get",
        &format!("tcp/{}", tenant.name),
        "-o",
        "jsonpath={.status.konnectivityEndpoint}",
    ])
    .unwrap()
    .trim()
    .to_string()
}

/// The upstream Go `konnectivity-agent` running in a node's namespace with a token of the
/// tenant's `konnectivity-agent` ServiceAccount, announcing the node's name and IP.
pub struct GoAgent {
    process: Process,
}

impl GoAgent {
    /// Starts it for node `node` (IP `ip`) of `tenant` inside `netns`; files under `dir`.
    pub fn start(site: &Site, tenant: &Tenant, netns: &NetNs, node: &str, ip: &str) -> GoAgent {
        let dir: PathBuf = site.dir.join(format!("go-agent-{node}"));
        std::fs::create_dir_all(&dir).unwrap();
        let token = tenant
            .kubectl(&[
                "create",
                "token",
                "konnectivity-agent",
                "-n",
                "kube-system",
                "--audience",
                "system:konnectivity-server",
                "--duration",
                "1h",
            ])
            .unwrap();
        std::fs::write(dir.join("token"), token.trim()).unwrap();
        std::fs::write(dir.join("ca.crt"), tenant_ca(site, tenant)).unwrap();
        let endpoint = konnectivity_endpoint(site, tenant);
        let (host, port) = endpoint.rsplit_once(':').unwrap();
        let mut cmd =
            netns.command(tether_testkit::binaries::binary(Component::KonnectivityAgent).unwrap());
        cmd.arg(format!("--proxy-server-host={host}"))
            .arg(format!("--proxy-server-port={port}"))
            .arg(format!("--ca-cert={}", dir.join("ca.crt").display()))
            .arg(format!(
                "--service-account-token-path={}",
                dir.join("token").display()
            ))
            .arg(format!("--agent-id={node}"))
            .arg(format!("--agent-identifiers=host={node}&ipv4={ip}"))
            .args(["--health-server-port=18093", "--admin-server-port=18094"]);
        let process = Process::spawn("konnectivity-agent", cmd, &dir.join("agent.log"))
            .expect("start the Go konnectivity-agent");
        GoAgent { process }
    }

    /// Its log's last lines.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops it.
    pub fn stop(mut self) {
        self.process.stop(Duration::from_secs(5));
    }
}

/// The tenant's CA certificate (PEM), from its PKI Secret.
pub fn tenant_ca(site: &Site, tenant: &Tenant) -> String {
    use base64::Engine;
    let b64 = site
        .kubectl(&[
            "get",
            "secret",
            &format!("{}-pki", tenant.name),
            "-o",
            r"jsonpath={.data.ca\.crt}",
        ])
        .unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .unwrap(),
    )
    .unwrap()
}

/// The pidfile of the tenant's konnectivity-server under the site's process runtime.
pub fn konnectivity_pidfile(site: &Site, tenant: &Tenant) -> PathBuf {
    find(
        &site.dir.join("standalone"),
        &format!("default.{}/run/konnectivity-server.pid", tenant.name),
        4,
    )
    .unwrap_or_else(|| panic!("no konnectivity-server pidfile of {}", tenant.name))
}

fn find(dir: &Path, suffix: &str, depth: u32) -> Option<PathBuf> {
    let candidate = dir.join(suffix);
    if candidate.exists() {
        return Some(candidate);
    }
    if depth == 0 {
        return None;
    }
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find(&e.path(), suffix, depth - 1))
}

/// Latencies of `total` GETs of `/small` on pod `pod` through the tenant API server's pod
/// proxy (each one a dial through the tunnel), `concurrency` at a time: (p50, p99) in ms.
pub async fn proxy_latency(
    client: &kube::Client,
    pod: &str,
    concurrency: usize,
    total: usize,
) -> (f64, f64) {
    let path = format!("/api/v1/namespaces/default/pods/{pod}:8080/proxy/small");
    let per = total.div_ceil(concurrency);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = client.clone();
            let path = path.clone();
            tokio::spawn(async move {
                let mut ms = Vec::with_capacity(per);
                for _ in 0..per {
                    let req = http::Request::get(&path).body(Vec::new()).unwrap();
                    let started = Instant::now();
                    let body =
                        tokio::time::timeout(Duration::from_secs(30), client.request_text(req))
                            .await
                            .expect("a proxied request within 30 s")
                            .expect("a proxied request");
                    ms.push(started.elapsed().as_secs_f64() * 1000.0);
                    assert_eq!(body.trim(), "small");
                }
                ms
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    (at(0.50), at(0.99))
}

/// Resident set of process `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The pid (as the host sees it) of the process named `comm` in network namespace `netns`.
pub fn pid_in(netns: &NetNs, comm: &str) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata(netns.path()).ok()?.ino();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let inode = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?.ino();
        (name.trim() == comm && inode == ns).then_some(pid)
    })
}

/// An admission webhook served by a pod on node `node` (the test webhook image: socat's TLS
/// in front of a bash handler that denies objects named `deny-*`), behind Service `hook`,
/// registered for ConfigMaps created in namespace `hooked`. The API server calls it at the
/// Service's ClusterIP, through the tunnel. Returns once the pod is ready.
pub fn deploy_webhook(site: &Site, tenant: &Tenant, node: &str) {
    use base64::Engine;
    use tether_operator::x509;
    let now = time::OffsetDateTime::now_utc();
    let (ca, ca_key) = x509::new_ca("tether test webhook CA", now).unwrap();
    let dns = ["hook.default.svc".to_string()];
    let (crt, key) = x509::issue_with(
        ca.as_bytes(),
        ca_key.as_bytes(),
        &x509::LeafSpec::server("hook", &dns, &[]),
        now,
    )
    .unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let image = tether_image::containers::ContainerImage::TestWebhook.reference(&Pins::default());
    let file = site.dir.join("hook.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: hook-tls, namespace: default}}\n\
             data: {{tls.crt: {crt}, tls.key: {key}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: hook, namespace: default, labels: {{app: hook}}}}\n\
             spec:\n  nodeName: {node}\n  volumes: [{{name: tls, secret: {{secretName: hook-tls}}}}]\n\
             \x20 containers:\n  - name: hook\n    image: {image}\n\
             \x20   command: [socat, 'OPENSSL-LISTEN:8443,fork,reuseaddr,cert=/tls/tls.crt,key=/tls/tls.key,verify=0', 'EXEC:/hook.sh']\n\
             \x20   volumeMounts: [{{name: tls, mountPath: /tls}}]\n\
             \x20   readinessProbe: {{tcpSocket: {{port: 8443}}, periodSeconds: 1}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: hook, namespace: default}}\n\
             spec: {{selector: {{app: hook}}, ports: [{{port: 443, targetPort: 8443}}]}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {{name: hooked, labels: {{tether.dev/test: hooked}}}}\n---\n\
             apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\n\
             metadata: {{name: hook}}\nwebhooks:\n- name: hook.tether.dev\n\
             \x20 clientConfig: {{service: {{namespace: default, name: hook, path: /validate, port: 443}}, caBundle: {ca}}}\n\
             \x20 rules: [{{operations: [CREATE], apiGroups: [\"\"], apiVersions: [v1], resources: [configmaps]}}]\n\
             \x20 namespaceSelector: {{matchLabels: {{tether.dev/test: hooked}}}}\n\
             \x20 failurePolicy: Fail\n  sideEffects: None\n  admissionReviewVersions: [v1]\n  timeoutSeconds: 10\n",
            crt = b64(&crt),
            key = b64(&key),
            ca = b64(&ca),
        ),
    )
    .unwrap();
    apply_and_wait(tenant, &file, "hook");
}

/// The webhook of [`deploy_webhook`] decides: a ConfigMap named `deny-*` in `hooked` is
/// refused with its message, another is created, and the pod logged both calls.
pub fn check_webhook(tenant: &Tenant) {
    // The API server picks up a new webhook configuration within a moment: until it
    // does, a deny-* ConfigMap is created, and is deleted again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let refusal = loop {
        match tenant.kubectl(&["create", "configmap", "deny-me", "-n", "hooked"]) {
            Err(e) if e.contains("denied by the tether test webhook") => break e,
            Err(e) => assert!(Instant::now() < deadline, "the webhook did not decide: {e}"),
            Ok(_) => {
                assert!(Instant::now() < deadline, "the webhook was never called");
                tenant
                    .kubectl(&["delete", "configmap", "deny-me", "-n", "hooked"])
                    .unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    tenant
        .kubectl(&["create", "configmap", "allow-me", "-n", "hooked"])
        .unwrap_or_else(|e| panic!("the webhook should allow allow-me: {e}"));
    let log = tenant.kubectl(&["logs", "hook"]).unwrap();
    assert!(
        log.contains("allowed=false") && log.contains("allowed=true"),
        "the webhook pod logged both calls: {log}"
    );
    eprintln!("tunnel: webhook through the tunnel: {}", refusal.trim());
}
