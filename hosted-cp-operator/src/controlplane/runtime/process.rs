//! The `process` runtime: each component a supervised child process of the operator.
//!
//! Layout under the data dir: `tenants/<ns>.<name>/` is every component's working
//! directory (the files of [`crate::controlplane::render`] are written there with mode 0600),
//! `logs/<component>.log` collects its output, `run/<component>.pid` records
//! `<pid> <start time>` of the running child, and `ports.json` keeps the tenant's ports
//! across operator restarts so its endpoint never moves.
//!
//! Every child runs under a [`super::supervisor`] in its own process group. On start
//! the runtime kills every process a previous operator left behind — but only when
//! `/proc/<pid>/stat` still shows the recorded start time, so a recycled pid is never hit —
//! and the controller's next reconcile starts fresh children. Nothing is orphaned and
//! nothing foreign is killed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::supervisor::{Supervisor, reap_pidfiles, supervise};
use crate::controlplane::component::{ComponentSpec, EnvValue};
use crate::controlplane::render::Ports;
use crate::error::Error;
use crate::fs::write_atomic;

/// Secret name → (key → contents): everything components may reference.
pub type SecretData = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// Finds the binary for a component at a version.
pub type BinaryResolver = Arc<dyn Fn(&ComponentSpec) -> Result<PathBuf, Error> + Send + Sync>;

/// The binary cache resolver: the pinned binary for the component's Kubernetes version.
pub fn cache_resolver() -> BinaryResolver {
    Arc::new(|c: &ComponentSpec| {
        let pins = tether_upstream::Pins::default();
        let version = pins.version_for(c.program.upstream(), &c.version)?;
        Ok(tether_upstream::Cache::from_env().lookup(c.program.upstream(), &version)?)
    })
}

/// Runs tenants' components as local processes.
pub struct ProcessRuntime {
    root: PathBuf,
    advertise: Option<String>,
    resolve: BinaryResolver,
    tenants: Mutex<HashMap<String, Running>>,
    port_lock: Mutex<()>,
}

struct Running {
    hash: String,
    components: Vec<Supervisor>,
}

impl ProcessRuntime {
    /// A runtime keeping its state under `root/tenants`; kills what a previous operator
    /// left running there.
    pub fn new(root: &Path, resolve: BinaryResolver) -> Result<ProcessRuntime, Error> {
        let tenants = root.join("tenants");
        fs::create_dir_all(&tenants).map_err(Error::io("create", &tenants))?;
        if let Ok(entries) = fs::read_dir(&tenants) {
            for e in entries.flatten() {
                reap_pidfiles(&e.path().join("run"));
            }
        }
        Ok(ProcessRuntime {
            root: root.to_path_buf(),
            advertise: None,
            resolve,
            tenants: Mutex::new(HashMap::new()),
            port_lock: Mutex::new(()),
        })
    }

    /// Tenants without `spec.controlPlane.service.address` are published on `address` (the
    /// management plane's address on the node network) instead of loopback.
    pub fn with_advertise_address(mut self, address: Option<String>) -> ProcessRuntime {
        self.advertise = address;
        self
    }

    /// The address tenants are published on by default, if one was set.
    pub fn advertise_address(&self) -> Option<&str> {
        self.advertise.as_deref()
    }

    /// The directory of tenant `key` (`<ns>.<name>`).
    pub fn tenant_dir(&self, key: &str) -> PathBuf {
        self.root.join("tenants").join(key)
    }

    /// The tenant's ports, allocated on first use and then stable. Allocation skips every
    /// port another tenant holds and every port something on this machine listens on.
    pub fn ports(&self, key: &str) -> Result<Ports, Error> {
        let _guard = self.port_lock.lock().unwrap_or_else(|e| e.into_inner());
        let dir = self.tenant_dir(key);
        let file = dir.join("ports.json");
        if let Ok(b) = fs::read(&file)
            && let Ok(p) = serde_json::from_slice::<Ports>(&b)
        {
            return Ok(p);
        }
        let mut taken = std::collections::HashSet::new();
        if let Ok(entries) = fs::read_dir(self.root.join("tenants")) {
            for e in entries.flatten() {
                if let Ok(b) = fs::read(e.path().join("ports.json"))
                    && let Ok(p) = serde_json::from_slice::<Ports>(&b)
                {
                    taken.extend(port_list(&p));
                }
            }
        }
        let mut next = || crate::ports::free_port(&mut taken);
        let ports = Ports {
            api: next()?,
            konnectivity_agent: next()?,
            konnectivity_admin: next()?,
            konnectivity_health: next()?,
            controller_manager: next()?,
            scheduler: next()?,
            kine: next()?,
        };
        fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        write_atomic(&file, &serde_json::to_vec(&ports).expect("ports serialise"))?;
        Ok(ports)
    }

    /// Makes tenant `key` run exactly `components` with `secrets`' files. Unchanged input is a
    /// no-op; changed input stops the old set and starts the new one in order (the API
    /// server, and kine before it, first).
    pub fn apply(
        &self,
        key: &str,
        components: &[ComponentSpec],
        secrets: &SecretData,
    ) -> Result<(), Error> {
        let dir = self.tenant_dir(key);
        let mut hasher = Sha256::new();
        hasher.update(format!("{components:?}"));
        for c in components {
            for f in &c.files {
                hasher.update(&f.path);
                hasher.update(lookup(secrets, &f.secret, &f.key)?);
            }
            // Secret-backed environment (kine's DSN) is part of what runs, too: a changed
            // value must restart the component, not leave it on the old one.
            for (k, v) in &c.env {
                if let EnvValue::Secret { secret, key } = v {
                    hasher.update(k);
                    hasher.update(lookup(secrets, secret, key)?);
                }
            }
        }
        let hash = hex::encode(hasher.finalize());
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = tenants.get(key)
            && r.hash == hash
            && r.components.iter().all(|s| !s.is_finished())
        {
            return Ok(());
        }
        if let Some(old) = tenants.remove(key) {
            drop(stop_all(old));
        }
        for sub in ["logs", "run", "konnectivity"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(Error::io("create", &d))?;
        }
        let mut started = Vec::new();
        for c in components {
            for f in &c.files {
                let path = dir.join(&f.path);
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
                }
                write_atomic(&path, lookup(secrets, &f.secret, &f.key)?)?;
            }
            let mut env = BTreeMap::new();
            for (k, v) in &c.env {
                let value = match v {
                    EnvValue::Literal(s) => s.clone(),
                    EnvValue::Secret { secret, key } => {
                        String::from_utf8_lossy(lookup(secrets, secret, key)?).into_owned()
                    }
                };
                env.insert(k.clone(), value);
            }
            let binary = (self.resolve)(c)?;
            started.push(supervise(
                c.program.name(),
                binary,
                c.args.clone(),
                env,
                &dir,
            ));
        }
        tenants.insert(
            key.to_string(),
            Running {
                hash,
                components: started,
            },
        );
        Ok(())
    }

    /// Stops the tenant's processes and removes its directory.
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        let old = self
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(old) = old {
            drop(stop_all(old));
        }
        let dir = self.tenant_dir(key);
        reap_pidfiles(&dir.join("run"));
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &dir)(e)),
        }
    }

    /// Current pid of each running component of tenant `key` (for tests and RSS figures).
    pub fn pids(&self, key: &str) -> BTreeMap<String, u32> {
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants
            .get(key)
            .map(|r| {
                r.components
                    .iter()
                    .filter_map(|s| Some((s.name().to_string(), s.pid()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops every tenant (operator shutdown) and waits until their processes are gone;
    /// the pidfiles go with them.
    pub async fn shutdown(&self) {
        let all: Vec<Running> = self
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        let stopping: Vec<_> = all.into_iter().flat_map(stop_all).collect();
        for task in stopping {
            let _ = task.await;
        }
    }
}

fn port_list(p: &Ports) -> [u16; 7] {
    [
        p.api,
        p.konnectivity_agent,
        p.konnectivity_admin,
        p.konnectivity_health,
        p.controller_manager,
        p.scheduler,
        p.kine,
    ]
}

fn lookup<'a>(secrets: &'a SecretData, secret: &str, key: &str) -> Result<&'a [u8], Error> {
    secrets
        .get(secret)
        .and_then(|s| s.get(key))
        .map(|v| v.as_slice())
        .ok_or_else(|| Error::Invalid(format!("Secret {secret} has no key {key}")))
}

/// Stops a tenant's components, the API server last so the others do not spin on it;
/// the handles to await their end.
fn stop_all(r: Running) -> Vec<tokio::task::JoinHandle<()>> {
    r.components.into_iter().rev().map(|s| s.stop()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn changed_secret_environment_restarts_the_component() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(
            dir.path(),
            Arc::new(|_: &ComponentSpec| Ok(PathBuf::from("/bin/sleep"))),
        )
        .unwrap();
        let component = ComponentSpec {
            program: crate::controlplane::component::Program::Kine,
            version: "v1.36.3".into(),
            args: vec!["30".into()],
            files: vec![],
            env: BTreeMap::from([(
                "DSN".to_string(),
                EnvValue::Secret {
                    secret: "t-datastore".into(),
                    key: "dsn".into(),
                },
            )]),
            ports: vec![],
            probe: crate::controlplane::component::Probe {
                scheme: "http",
                port: "etcd",
                path: "/",
            },
        };
        let secrets = |dsn: &str| -> SecretData {
            BTreeMap::from([(
                "t-datastore".to_string(),
                BTreeMap::from([("dsn".to_string(), dsn.as_bytes().to_vec())]),
            )])
        };
        async fn pid(rt: &ProcessRuntime) -> u32 {
            for _ in 0..100 {
                if let Some(p) = rt.pids("ns.t").get("kine") {
                    return *p;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("kine never started");
        }
        let comps = std::slice::from_ref(&component);
        rt.apply("ns.t", comps, &secrets("postgres://a")).unwrap();
        let first = pid(&rt).await;
        rt.apply("ns.t", comps, &secrets("postgres://a")).unwrap();
        assert_eq!(pid(&rt).await, first, "unchanged input restarted kine");
        rt.apply("ns.t", comps, &secrets("postgres://b")).unwrap();
        assert_ne!(pid(&rt).await, first, "a new DSN left kine on the old one");
        rt.delete("ns.t").unwrap();
    }
}
