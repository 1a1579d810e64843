//! The TenantControlPlane controller: an ordered pipeline of owned resources.
//!
//! Like Kamaji's resource handlers, each step owns one kind of object and is idempotent:
//! validate → datastore lookup → version gate → PKI Secret → kubeconfig Secrets →
//! datastore carve-out + its Secret → config Secret → components (runtime) → `/readyz` →
//! tenant bootstrap → status. Every step's duration is recorded ([`Metrics`]) and logged.
//! Anything a step decides is computed by the pure modules (`pki`, `kubeconfig`, `render`,
//! `bootstrap`); this file only does the I/O in order.
//!
//! A finalizer makes deletion tear down in reverse: processes, datastore keys/database and
//! user, Secrets. Bad input (invalid spec, missing DataStore, refused version change)
//! becomes a condition with a human message and no objects are created or changed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Resource, ResourceExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::watcher;
use serde_json::json;
use tether_api::tenant_control_plane::{self as tcpmod, KubeVersion};
use tether_api::{Condition, DataStore, Driver, TenantControlPlane, TenantControlPlanePhase};
use time::OffsetDateTime;

use crate::controlplane::bootstrap::{self, BootstrapToken};
use crate::controlplane::datastore::{self, EtcdAdmin, PgAdmin};
use crate::controlplane::kubeconfig::{self, ADMIN};
use crate::controlplane::pki::{self, PkiInputs};
use crate::controlplane::render::{self, RenderInputs, Secrets, Storage};
use crate::controlplane::runtime::Runtime;
use crate::controlplane::runtime::process::SecretData;
use crate::error::Error;
use crate::kube::{
    self as k, Files, client_from_kubeconfig, condition, merge_conditions, patch_status,
    read_secret, wait_readyz,
};

/// The finalizer on every TenantControlPlane.
pub const FINALIZER: &str = "tether.dev/control-plane";
/// Label on every Secret of a tenant (value: tenant name).
pub const TENANT_LABEL: &str = "tether.dev/tenant";
/// The DataStore used when neither spec nor status names one.
pub const DEFAULT_DATASTORE: &str = "default";

/// Step durations, for `cargo xtask bench cp` and logs.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Step name → durations of the latest runs (at most [`Metrics::KEEP`]).
    pub steps: BTreeMap<&'static str, Vec<Duration>>,
    /// Latest full reconcile durations (at most [`Metrics::KEEP`]).
    pub reconciles: Vec<Duration>,
}

impl Metrics {
    /// Samples kept per series: every Ready tenant reconciles every 10 s, so unbounded
    /// series would grow without end (and `metrics.json`, rewritten every 2 s, with them).
    pub const KEEP: usize = 4096;

    /// Appends `d`, dropping the oldest quarter once [`Metrics::KEEP`] is reached.
    pub fn push(series: &mut Vec<Duration>, d: Duration) {
        if series.len() >= Self::KEEP {
            series.drain(..Self::KEEP / 4);
        }
        series.push(d);
    }
}

/// Shared state of the controller.
pub struct Context {
    /// Management cluster client.
    pub client: kube::Client,
    /// Where tenants run.
    pub runtime: Runtime,
    /// The operator's namespace (DataStore credentials live there).
    pub namespace: String,
    /// Operator data dir (etcdctl credentials).
    pub data_dir: PathBuf,
    /// Kubernetes versions the operator can run.
    pub known_versions: Vec<String>,
    /// Step timings.
    pub metrics: Mutex<Metrics>,
    /// Publishes Events on TenantControlPlanes (refusals, so `kubectl describe` says why).
    pub recorder: kube::runtime::events::Recorder,
}

impl Context {
    fn time(&self, step: &'static str, started: Instant) {
        let d = started.elapsed();
        tracing::debug!(step, ms = d.as_millis() as u64, "reconcile step");
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        Metrics::push(m.steps.entry(step).or_default(), d);
    }
}

/// Runs the controller until the stream ends (the process is stopped).
pub async fn run(ctx: Arc<Context>) {
    let api: Api<TenantControlPlane> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
}

fn error_policy(tcp: Arc<TenantControlPlane>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(tenant = %tcp.name_any(), "reconcile failed: {err}");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(tcp: Arc<TenantControlPlane>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = tcp.namespace().unwrap_or_else(|| "default".into());
    let api: Api<TenantControlPlane> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, tcp, |event| async {
        match event {
            Event::Apply(t) => apply(&t, &ctx).await,
            Event::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Invalid(format!("finalizer: {e}")));
    Metrics::push(
        &mut ctx
            .metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reconciles,
        started.elapsed(),
    );
    result
}

/// Records a refusal: phase NotReady, the condition, nothing else changed.
async fn refuse(
    ctx: &Context,
    api: &Api<TenantControlPlane>,
    tcp: &TenantControlPlane,
    c: Condition,
) -> Result<Action, Error> {
    tracing::warn!(tenant = %tcp.name_any(), reason = %c.reason, "{}", c.message);
    k::warn(&ctx.recorder, &tcp.object_ref(&()), &c.reason, &c.message).await;
    let mut status = tcp.status.clone().unwrap_or_default();
    status.conditions = merge_conditions(&status.conditions, vec![c]);
    if status.phase != TenantControlPlanePhase::Ready {
        status.phase = TenantControlPlanePhase::NotReady;
    }
    status.observed_generation = tcp.metadata.generation;
    patch_status(api, &tcp.name_any(), &status).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Applies the tenant's Secret `name`: labelled with the tenant, owned by it.
async fn apply_secret(
    api: &Api<Secret>,
    tcp: &TenantControlPlane,
    name: &str,
    data: &Files,
) -> Result<(), Error> {
    let labels = BTreeMap::from([(TENANT_LABEL.to_string(), tcp.name_any())]);
    k::apply_secret(api, name, labels, tcp.controller_owner_ref(&()), data).await
}

/// The datastore admin for `ds`, with credentials from the operator's namespace.
async fn datastore_admin(ctx: &Context, ds: &DataStore) -> Result<Admin, Error> {
    let errs = tether_api::datastore::validate(&ds.spec);
    if !errs.is_empty() {
        return Err(Error::Invalid(errs.join("; ")));
    }
    let read = |r: &tether_api::datastore::SecretKeyRef| {
        let ns = r.namespace.clone().unwrap_or_else(|| ctx.namespace.clone());
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let r = r.clone();
        async move {
            let files = read_secret(&api, &r.name).await?;
            files.get(&r.key).cloned().ok_or_else(|| {
                Error::Invalid(format!("Secret {ns}/{} has no key {}", r.name, r.key))
            })
        }
    };
    match ds.spec.driver {
        Driver::Etcd => {
            let tls = ds.spec.tls_config.as_ref().expect("validated");
            let ca = read(&tls.certificate_authority.certificate).await?;
            let ca_key = read(
                tls.certificate_authority
                    .private_key
                    .as_ref()
                    .expect("validated"),
            )
            .await?;
            let client = tls.client_certificate.as_ref().expect("validated");
            let cert = read(&client.certificate).await?;
            let key = read(client.private_key.as_ref().expect("validated")).await?;
            let creds = ctx.data_dir.join("datastores").join(ds.name_any());
            datastore::write_creds(&creds, &ca, &cert, &key)?;
            let etcdctl = crate::binaries::etcdctl()?;
            Ok(Admin::Etcd {
                admin: EtcdAdmin {
                    etcdctl,
                    endpoints: ds
                        .spec
                        .endpoints
                        .iter()
                        .map(|e| format!("https://{e}"))
                        .collect(),
                    creds,
                },
                ca,
                ca_key,
            })
        }
        Driver::Postgres => {
            let auth = ds.spec.basic_auth.as_ref().expect("validated");
            let user = String::from_utf8_lossy(&read(&auth.username).await?).into_owned();
            let password = String::from_utf8_lossy(&read(&auth.password).await?).into_owned();
            Ok(Admin::Postgres(PgAdmin {
                endpoint: ds.spec.endpoints[0].clone(),
                user,
                password,
            }))
        }
    }
}

enum Admin {
    Etcd {
        admin: EtcdAdmin,
        ca: Vec<u8>,
        ca_key: Vec<u8>,
    },
    Postgres(PgAdmin),
}

async fn apply(tcp: &TenantControlPlane, ctx: &Context) -> Result<Action, Error> {
    let ns = tcp.namespace().unwrap_or_else(|| "default".into());
    let name = tcp.name_any();
    let api: Api<TenantControlPlane> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = tcp.metadata.generation;
    let mut status = tcp.status.clone().unwrap_or_default();

    // 1. Validate: nothing is created for a spec that cannot work.
    let t = Instant::now();
    let known: Vec<&str> = ctx.known_versions.iter().map(String::as_str).collect();
    let problems = tcpmod::validate(&tcp.spec, &known);
    ctx.time("validate", t);
    if !problems.is_empty() {
        let msg = problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        return refuse(
            ctx,
            &api,
            tcp,
            condition("SpecValid", false, "InvalidSpec", msg, generation),
        )
        .await;
    }

    // 2. DataStore (fixed once chosen).
    let t = Instant::now();
    let ds_name = status
        .data_store
        .clone()
        .or_else(|| tcp.spec.data_store.clone())
        .unwrap_or_else(|| DEFAULT_DATASTORE.into());
    let ds_api: Api<DataStore> = Api::all(ctx.client.clone());
    let Some(ds) = ds_api
        .get_opt(&ds_name)
        .await
        .map_err(Error::kube(format!("get DataStore {ds_name}")))?
    else {
        return refuse(
            ctx,
            &api,
            tcp,
            condition(
                "DataStoreReady",
                false,
                "DataStoreNotFound",
                format!("DataStore {ds_name} does not exist"),
                generation,
            ),
        )
        .await;
    };
    // Its credentials too, before anything is created: an unusable DataStore is refused
    // like a missing one, with no partial objects.
    let admin = match datastore_admin(ctx, &ds).await {
        Ok(a) => a,
        Err(e) => {
            return refuse(
                ctx,
                &api,
                tcp,
                condition(
                    "DataStoreReady",
                    false,
                    "DataStoreUnusable",
                    e.to_string(),
                    generation,
                ),
            )
            .await;
        }
    };
    ctx.time("datastore-lookup", t);

    // 3. Version gate: refuse skips and downgrades, keep running what runs.
    let desired = KubeVersion::parse(&tcp.spec.kubernetes.version).map_err(Error::Invalid)?;
    let mut upgrade_refused = None;
    let run_version = match status.version.as_deref().map(KubeVersion::parse) {
        Some(Ok(current)) => match tcpmod::check_upgrade(&current, &desired) {
            Ok(()) => tcp.spec.kubernetes.version.clone(),
            Err(msg) => {
                upgrade_refused = Some(msg);
                current.to_string()
            }
        },
        _ => tcp.spec.kubernetes.version.clone(),
    };
    let upgrading = status.version.as_deref().is_some_and(|v| v != run_version);

    // 4. Ports and endpoint.
    let placement = ctx.runtime.placement(&ns, &name, &tcp.spec)?;
    let ports = placement.ports;
    let address = placement.host.clone();
    let endpoint = placement.endpoint.clone();
    let local = format!("https://127.0.0.1:{}", ports.api);
    let names = Secrets::for_tenant(&name);

    // 5. PKI.
    let t = Instant::now();
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
    ips.extend(render::service_ip(&tcp.spec));
    ips.extend(address.parse::<IpAddr>().ok());
    let mut dns = vec![
        name.clone(),
        format!("{name}.{ns}"),
        format!("{name}.{ns}.svc"),
        format!(
            "kubernetes.default.svc.{}",
            tcp.spec.network_profile.cluster_domain
        ),
    ];
    if address.parse::<IpAddr>().is_err() {
        dns.push(address.clone());
    }
    for san in &tcp.spec.network_profile.cert_sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(san.clone()),
        }
    }
    let inputs = PkiInputs {
        tenant: format!("{ns}/{name}"),
        dns_names: dns,
        ips,
    };
    let existing = read_secret(&secrets_api, &names.pki).await?;
    let annotations = tcp.metadata.annotations.clone().unwrap_or_default();
    let (rotation, rotation_status) = rotation_step(
        annotations.get(tcpmod::ROTATE_CA_ANNOTATION),
        annotations.get(tcpmod::ROTATE_CA_COMPLETE_ANNOTATION),
        status.ca_rotation.as_ref(),
    );
    let (pki_files, changed) =
        pki::ensure_rotating(&inputs, &existing, rotation, OffsetDateTime::now_utc())?;
    if changed {
        apply_secret(&secrets_api, tcp, &names.pki, &pki_files).await?;
    }
    let ca_hash = crate::x509::ca_hash(&pki_files["ca.crt"])?;
    ctx.time("pki", t);

    // 6. Kubeconfigs (admin in its own Secret: that one is handed to users).
    let t = Instant::now();
    let mut existing = read_secret(&secrets_api, &names.kubeconfigs).await?;
    let admin_secret = format!("{name}-admin-kubeconfig");
    existing.extend(read_secret(&secrets_api, &admin_secret).await?);
    let (kcs, changed) = kubeconfig::ensure(
        &name,
        &pki_files,
        &local,
        &endpoint,
        &existing,
        OffsetDateTime::now_utc(),
    )?;
    if changed {
        let admin: Files = kcs
            .iter()
            .filter(|(k, _)| k.as_str() == ADMIN)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let rest: Files = kcs
            .iter()
            .filter(|(k, _)| k.as_str() != ADMIN)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        apply_secret(&secrets_api, tcp, &names.kubeconfigs, &rest).await?;
        apply_secret(&secrets_api, tcp, &admin_secret, &admin).await?;
    }
    ctx.time("kubeconfigs", t);

    // 7. Datastore carve-out.
    let t = Instant::now();
    let mut ds_files = read_secret(&secrets_api, &names.datastore).await?;
    let provisioned = status
        .conditions
        .iter()
        .any(|c| c.type_ == "DataStoreReady" && c.status == "True");
    let storage = match &admin {
        Admin::Etcd { admin, ca, ca_key } => {
            let user = datastore::etcd_user(&ns, &name);
            let prefix = datastore::etcd_prefix(&ns, &name);
            let valid = ds_files.get("ca.crt") == Some(ca)
                && ds_files.get("client.crt").is_some_and(|c| {
                    crate::x509::cert_fresh_and_issued_by(c, ca, OffsetDateTime::now_utc())
                });
            // User and role are made once per datastore placement (and again whenever the
            // credentials are re-issued); steady-state reconciles spawn no etcdctl.
            if !(valid && provisioned) {
                tokio::task::block_in_place(|| admin.provision(&user, &prefix))?;
            }
            if !valid {
                let (c, k) = datastore::tenant_client_cert(ca, ca_key, &user)?;
                ds_files = Files::from([
                    ("ca.crt".to_string(), ca.clone()),
                    ("client.crt".to_string(), c.into_bytes()),
                    ("client.key".to_string(), k.into_bytes()),
                ]);
                apply_secret(&secrets_api, tcp, &names.datastore, &ds_files).await?;
            }
            Storage::Etcd {
                servers: admin.endpoints.clone(),
                prefix,
            }
        }
        Admin::Postgres(pg) => {
            let db = datastore::pg_name(&ns, &name);
            // A stored password is reused only if it is what the operator generates
            // (lowercase alphanumerics): it goes into SQL and into the DSN's URL.
            let password = match ds_files.get("password") {
                Some(p) if datastore::is_generated_password(p) => {
                    String::from_utf8_lossy(p).into_owned()
                }
                _ => BootstrapToken::generate()?.secret + &BootstrapToken::generate()?.secret,
            };
            let dsn = match ds_files.get("dsn") {
                Some(d) if provisioned => String::from_utf8_lossy(d).into_owned(),
                _ => tokio::task::block_in_place(|| pg.provision(&db, &password))?,
            };
            if ds_files.get("dsn").map(|d| d.as_slice()) != Some(dsn.as_bytes()) {
                ds_files = Files::from([
                    ("dsn".to_string(), dsn.into_bytes()),
                    ("password".to_string(), password.into_bytes()),
                ]);
                apply_secret(&secrets_api, tcp, &names.datastore, &ds_files).await?;
            }
            Storage::Kine {
                dsn_secret: names.datastore.clone(),
            }
        }
    };
    if status.data_store.is_none() {
        status.data_store = Some(ds_name.clone());
    }
    if !provisioned {
        update_datastore_status(ctx, &ds_name, Some(format!("{ns}/{name}")), None).await?;
    }
    ctx.time("datastore", t);

    // 8. Config files.
    let config = Files::from([(
        render::EGRESS_SELECTOR_KEY.to_string(),
        render::EGRESS_SELECTOR.as_bytes().to_vec(),
    )]);
    if read_secret(&secrets_api, &names.config).await? != config {
        apply_secret(&secrets_api, tcp, &names.config, &config).await?;
    }

    // 9. Components.
    let t = Instant::now();
    let components = render::render(&RenderInputs {
        spec: &tcp.spec,
        version: &run_version,
        storage,
        ports,
        bind_address: placement.bind_address.clone(),
        secrets: names.clone(),
        leader_elect: placement.leader_elect,
    });
    let data: SecretData = BTreeMap::from([
        (names.pki.clone(), pki_files.clone()),
        (names.kubeconfigs.clone(), kcs.clone()),
        (names.datastore.clone(), ds_files.clone()),
        (names.config.clone(), config),
    ]);
    if upgrading && status.phase != TenantControlPlanePhase::Upgrading {
        status.phase = TenantControlPlanePhase::Upgrading;
        patch_status(&api, &name, &status).await?;
    }
    let applied = ctx
        .runtime
        .apply(
            &ns,
            &name,
            &tcp.spec,
            &components,
            &data,
            tcp.controller_owner_ref(&()),
        )
        .await;
    if let Err(Error::Conflict(msg)) = applied {
        return refuse(
            ctx,
            &api,
            tcp,
            condition(
                "ControlPlaneAvailable",
                false,
                "NameConflict",
                msg,
                generation,
            ),
        )
        .await;
    }
    applied?;
    ctx.time("components", t);

    // 10. Wait for /readyz.
    let t = Instant::now();
    let admin_kc = String::from_utf8_lossy(&kcs[ADMIN]).into_owned();
    let tenant = client_from_kubeconfig(&admin_kc).await?;
    if let Err(e) = wait_readyz(&tenant, placement.readyz_wait).await {
        status.phase = TenantControlPlanePhase::NotReady;
        status.conditions = merge_conditions(
            &status.conditions,
            vec![condition(
                "ControlPlaneAvailable",
                false,
                "NotReady",
                e.to_string(),
                generation,
            )],
        );
        patch_status(&api, &name, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    ctx.time("readyz", t);

    // 11. Tenant bootstrap.
    let t = Instant::now();
    let token_secret = format!("{name}-bootstrap-token");
    let mut tok = read_secret(&secrets_api, &token_secret).await?;
    let token = match tok
        .get("token")
        .and_then(|t| BootstrapToken::parse(&String::from_utf8_lossy(t)))
    {
        Some(t) => t,
        None => {
            let t = BootstrapToken::generate()?;
            tok = Files::from([("token".to_string(), t.token().into_bytes())]);
            apply_secret(&secrets_api, tcp, &token_secret, &tok).await?;
            t
        }
    };
    let expiration = (OffsetDateTime::now_utc() + time::Duration::days(365))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    // The expiration is set once: re-applying it on every reconcile would churn the object.
    let mut objs = bootstrap::objects(&endpoint, &pki_files["client-ca.crt"], &token, &expiration);
    objs.extend(crate::controlplane::addons::objects(
        &tcp.spec,
        &run_version,
        &endpoint,
    ));
    if status.phase != TenantControlPlanePhase::Ready
        || status.observed_generation != generation
        || rotation != pki::Rotation::Keep
        || upgrading
        || status.endpoint.as_deref() != Some(&endpoint)
    {
        k::apply_objects(&tenant, &objs).await?;
    }
    ctx.time("bootstrap", t);

    // 12. Status.
    let mut conds = vec![
        condition("SpecValid", true, "Valid", "", generation),
        condition("CertificatesReady", true, "Issued", "", generation),
        condition(
            "DataStoreReady",
            true,
            "Provisioned",
            format!("on DataStore {ds_name}"),
            generation,
        ),
        condition("ControlPlaneAvailable", true, "ReadyzOk", "", generation),
        condition("TenantBootstrapped", true, "Applied", "", generation),
    ];
    conds.push(match &upgrade_refused {
        Some(msg) => condition(
            "VersionAccepted",
            false,
            "UpgradeRefused",
            msg.clone(),
            generation,
        ),
        None => condition("VersionAccepted", true, "Accepted", "", generation),
    });
    status.conditions = merge_conditions(&status.conditions, conds);
    status.phase = TenantControlPlanePhase::Ready;
    status.version = Some(run_version);
    status.endpoint = Some(endpoint);
    status.ca_hash = Some(ca_hash);
    status.kubeconfig_secret = Some(admin_secret);
    status.observed_generation = generation;
    if rotation_status.is_some() {
        status.ca_rotation = rotation_status;
    }
    patch_status(&api, &name, &status).await?;
    let renew =
        pki::renew_in(&pki_files, OffsetDateTime::now_utc()).unwrap_or(Duration::from_secs(3600));
    Ok(Action::requeue(renew.min(Duration::from_secs(10))))
}

async fn cleanup(tcp: &TenantControlPlane, ctx: &Context) -> Result<Action, Error> {
    let ns = tcp.namespace().unwrap_or_else(|| "default".into());
    let name = tcp.name_any();
    let api: Api<TenantControlPlane> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = tcp.status.clone().unwrap_or_default();
    if status.phase != TenantControlPlanePhase::Deleting {
        status.phase = TenantControlPlanePhase::Deleting;
        let _ = patch_status(&api, &name, &status).await;
    }
    let t = Instant::now();
    ctx.runtime
        .delete(&ns, &name, tcp.metadata.uid.as_deref())
        .await?;
    ctx.time("cleanup-components", t);

    let t = Instant::now();
    let ds_name = status
        .data_store
        .clone()
        .or_else(|| tcp.spec.data_store.clone())
        .unwrap_or_else(|| DEFAULT_DATASTORE.into());
    let ds_api: Api<DataStore> = Api::all(ctx.client.clone());
    match ds_api
        .get_opt(&ds_name)
        .await
        .map_err(Error::kube("get DataStore"))?
    {
        None => {
            tracing::warn!(tenant = %name, "DataStore {ds_name} is gone; nothing to remove there")
        }
        Some(ds) => match datastore_admin(ctx, &ds).await? {
            Admin::Etcd { admin, .. } => tokio::task::block_in_place(|| {
                admin.deprovision(
                    &datastore::etcd_user(&ns, &name),
                    &datastore::etcd_prefix(&ns, &name),
                )
            })?,
            Admin::Postgres(pg) => {
                tokio::task::block_in_place(|| pg.deprovision(&datastore::pg_name(&ns, &name)))?
            }
        },
    }
    update_datastore_status(ctx, &ds_name, None, Some(format!("{ns}/{name}"))).await?;
    ctx.time("cleanup-datastore", t);

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let lp = ListParams::default().labels(&format!("{TENANT_LABEL}={name}"));
    for s in secrets
        .list(&lp)
        .await
        .map_err(Error::kube("list tenant Secrets"))?
    {
        let n = s.name_any();
        match secrets.delete(&n, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(Error::kube(format!("delete Secret {n}"))(e)),
        }
    }
    Ok(Action::await_change())
}

/// Adds or removes a tenant in `DataStore.status.usedBy` (a merge patch of the whole list,
/// recomputed from the current object, so concurrent tenants converge on requeue).
async fn update_datastore_status(
    ctx: &Context,
    ds: &str,
    add: Option<String>,
    remove: Option<String>,
) -> Result<(), Error> {
    let api: Api<DataStore> = Api::all(ctx.client.clone());
    let Some(current) = api
        .get_opt(ds)
        .await
        .map_err(Error::kube(format!("get DataStore {ds}")))?
    else {
        return Ok(());
    };
    let mut used: Vec<String> = current.status.map(|s| s.used_by).unwrap_or_default();
    if let Some(a) = add
        && !used.contains(&a)
    {
        used.push(a);
    }
    if let Some(r) = remove {
        used.retain(|u| *u != r);
    }
    used.sort();
    // resourceVersion makes a concurrent update fail (and requeue) instead of losing an entry.
    let patch = json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "status": {"usedBy": used, "tenantCount": used.len()},
    });
    api.patch_status(ds, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(Error::kube(format!("update status of DataStore {ds}")))?;
    Ok(())
}

/// The rotation step for the annotations and the recorded progress, and the progress to
/// record once the step succeeded (`None`: nothing to record).
pub fn rotation_step(
    start: Option<&String>,
    complete: Option<&String>,
    recorded: Option<&tether_api::tenant_control_plane::CaRotationStatus>,
) -> (
    pki::Rotation,
    Option<tether_api::tenant_control_plane::CaRotationStatus>,
) {
    use tether_api::tenant_control_plane::CaRotationStatus;
    let Some(id) = start else {
        return (pki::Rotation::Keep, None);
    };
    let rec = |phase: &str| {
        Some(CaRotationStatus {
            id: id.clone(),
            phase: phase.into(),
        })
    };
    match recorded {
        Some(r) if &r.id == id && r.phase == "Completed" => (pki::Rotation::Keep, None),
        Some(r) if &r.id == id && complete == Some(id) => {
            (pki::Rotation::Complete, rec("Completed"))
        }
        Some(r) if &r.id == id => (pki::Rotation::Keep, None),
        // A new id (or none recorded yet) starts a rotation.
        _ => (pki::Rotation::Begin, rec("Trusting")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_api::tenant_control_plane::CaRotationStatus;

    #[test]
    fn metrics_stay_bounded() {
        let mut v = Vec::new();
        for i in 0..(Metrics::KEEP * 3) {
            Metrics::push(&mut v, Duration::from_millis(i as u64));
        }
        assert!(v.len() <= Metrics::KEEP);
        assert_eq!(
            v.last(),
            Some(&Duration::from_millis(Metrics::KEEP as u64 * 3 - 1))
        );
    }

    #[test]
    fn rotation_steps() {
        let s = |x: &str| Some(x.to_string());
        let rec = |id: &str, phase: &str| {
            Some(CaRotationStatus {
                id: id.into(),
                phase: phase.into(),
            })
        };
        type Case = (
            Option<String>,
            Option<String>,
            Option<CaRotationStatus>,
            pki::Rotation,
            Option<&'static str>,
        );
        let table: Vec<Case> = vec![
            (None, None, None, pki::Rotation::Keep, None),
            (s("r1"), None, None, pki::Rotation::Begin, Some("Trusting")),
            (
                s("r1"),
                None,
                rec("r1", "Trusting"),
                pki::Rotation::Keep,
                None,
            ),
            (
                s("r1"),
                s("r0"),
                rec("r1", "Trusting"),
                pki::Rotation::Keep,
                None,
            ),
            (
                s("r1"),
                s("r1"),
                rec("r1", "Trusting"),
                pki::Rotation::Complete,
                Some("Completed"),
            ),
            (
                s("r1"),
                s("r1"),
                rec("r1", "Completed"),
                pki::Rotation::Keep,
                None,
            ),
            (
                s("r2"),
                s("r1"),
                rec("r1", "Completed"),
                pki::Rotation::Begin,
                Some("Trusting"),
            ),
            // Completing before the rotation was recorded as begun is not possible.
            (
                s("r1"),
                s("r1"),
                None,
                pki::Rotation::Begin,
                Some("Trusting"),
            ),
        ];
        for (start, complete, recorded, want, want_phase) in table {
            let (r, st) = rotation_step(start.as_ref(), complete.as_ref(), recorded.as_ref());
            assert_eq!(r, want, "{start:?} {complete:?} {recorded:?}");
            assert_eq!(st.map(|x| x.phase).as_deref(), want_phase);
        }
    }
}
