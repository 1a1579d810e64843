//! The tenant's place in its DataStore and the Secret holding its credentials there: an
//! etcd user and role limited to the tenant's prefix (with a client certificate of that
//! user), or a PostgreSQL database and role (with the DSN kine reads). Clean-up gives the
//! space back: keys or database, user, role, Secret.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, ResourceExt};
use serde_json::json;
use tether_api::datastore::SecretKeyRef;
use tether_api::{DataStore, Driver};
use time::OffsetDateTime;

use crate::controlplane::bootstrap::BootstrapToken;
use crate::controlplane::controller::Context;
use crate::controlplane::datastore::{self, EtcdAdmin, PgAdmin};
use crate::controlplane::pipeline::{Flow, State, Step, Tenant, need};
use crate::controlplane::render::Storage;
use crate::error::Error;
use crate::kube::{Files, read_secret};
use crate::x509;

/// The tenant's DataStore, as the `datastore-lookup` step found it.
pub struct Chosen {
    /// Its name.
    pub name: String,
    /// How to administer it.
    pub admin: Admin,
}

/// A DataStore the operator can administer, with its credentials.
pub enum Admin {
    /// etcd, with the CA that signs tenants' client certificates.
    Etcd {
        /// etcdctl as root.
        admin: EtcdAdmin,
        /// The CA certificate (PEM).
        ca: Vec<u8>,
        /// The CA key (PEM).
        ca_key: Vec<u8>,
    },
    /// PostgreSQL as its admin role.
    Postgres(PgAdmin),
}

/// The administrator of `ds`, with credentials from the operator's namespace (or the one a
/// reference names).
pub async fn admin(ctx: &Context, ds: &DataStore) -> Result<Admin, Error> {
    let errs = tether_api::datastore::validate(&ds.spec);
    if !errs.is_empty() {
        return Err(Error::Invalid(errs.join("; ")));
    }
    let read = |r: &SecretKeyRef| read_key(ctx, r.clone());
    match ds.spec.driver {
        Driver::Etcd => {
            let tls = ds.spec.tls_config.as_ref().expect("validated");
            let authority = &tls.certificate_authority;
            let ca = read(&authority.certificate).await?;
            let ca_key = read(authority.private_key.as_ref().expect("validated")).await?;
            let client = tls.client_certificate.as_ref().expect("validated");
            let cert = read(&client.certificate).await?;
            let key = read(client.private_key.as_ref().expect("validated")).await?;
            let creds = ctx.data_dir.join("datastores").join(ds.name_any());
            datastore::write_creds(&creds, &ca, &cert, &key)?;
            let endpoints = ds.spec.endpoints.iter().map(|e| format!("https://{e}"));
            Ok(Admin::Etcd {
                admin: EtcdAdmin {
                    etcdctl: crate::binaries::etcdctl()?,
                    endpoints: endpoints.collect(),
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

/// The value of a DataStore credential reference.
async fn read_key(ctx: &Context, r: SecretKeyRef) -> Result<Vec<u8>, Error> {
    let ns = r.namespace.clone().unwrap_or_else(|| ctx.namespace.clone());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let files = read_secret(&api, &r.name).await?;
    files
        .get(&r.key)
        .cloned()
        .ok_or_else(|| Error::Invalid(format!("Secret {ns}/{} has no key {}", r.name, r.key)))
}

/// The carve-out and its Secret.
pub struct DataStoreCarveOut;

impl Step for DataStoreCarveOut {
    fn name(&self) -> &'static str {
        "datastore"
    }

    fn apply<'a>(&'a self, s: &'a mut State<'_>) -> BoxFuture<'a, Result<Flow, Error>> {
        Box::pin(carve_out(s))
    }

    fn cleanup<'a>(&'a self, t: &'a Tenant<'_>) -> Option<BoxFuture<'a, Result<(), Error>>> {
        Some(Box::pin(give_back(t)))
    }
}

async fn carve_out(s: &mut State<'_>) -> Result<Flow, Error> {
    let chosen = need(&s.datastore, "datastore-lookup")?;
    let t = &s.t;
    let existing = t.read_secret(&t.names().datastore).await?;
    let provisioned = s
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == "DataStoreReady" && c.status == "True");
    let (storage, files) = match &chosen.admin {
        Admin::Etcd { admin, ca, ca_key } => {
            carve_etcd(t, admin, (ca, ca_key), existing, provisioned).await?
        }
        Admin::Postgres(pg) => carve_postgres(t, pg, existing, provisioned).await?,
    };
    let name = chosen.name.clone();
    if s.status.data_store.is_none() {
        s.status.data_store = Some(name.clone());
    }
    if !provisioned {
        let tenant = format!("{}/{}", t.ns, t.name);
        update_used_by(t.ctx, &name, Some(tenant), None).await?;
    }
    s.storage = Some((storage, files));
    Ok(Flow::Next)
}

/// etcd: the tenant's user and role, and a client certificate of that user. User and role
/// are made once per datastore placement (and again whenever the credentials are
/// re-issued); steady-state reconciles spawn no etcdctl.
async fn carve_etcd(
    t: &Tenant<'_>,
    admin: &EtcdAdmin,
    (ca, ca_key): (&Vec<u8>, &Vec<u8>),
    mut files: Files,
    provisioned: bool,
) -> Result<(Storage, Files), Error> {
    let user = datastore::etcd_user(&t.ns, &t.name);
    let prefix = datastore::etcd_prefix(&t.ns, &t.name);
    let valid = files.get("ca.crt") == Some(ca)
        && files
            .get("client.crt")
            .is_some_and(|c| x509::cert_fresh_and_issued_by(c, ca, OffsetDateTime::now_utc()));
    if !(valid && provisioned) {
        tokio::task::block_in_place(|| admin.provision(&user, &prefix))?;
    }
    if !valid {
        let (c, k) = datastore::tenant_client_cert(ca, ca_key, &user)?;
        files = Files::from([
            ("ca.crt".to_string(), ca.clone()),
            ("client.crt".to_string(), c.into_bytes()),
            ("client.key".to_string(), k.into_bytes()),
        ]);
        t.apply_secret(&t.names().datastore, &files).await?;
    }
    let storage = Storage::Etcd {
        servers: admin.endpoints.clone(),
        prefix,
    };
    Ok((storage, files))
}

/// PostgreSQL: the tenant's database and role, and the DSN kine reads. A stored password is
/// reused only if it is what the operator generates (lowercase alphanumerics): it goes into
/// SQL and into the DSN's URL.
async fn carve_postgres(
    t: &Tenant<'_>,
    pg: &PgAdmin,
    mut files: Files,
    provisioned: bool,
) -> Result<(Storage, Files), Error> {
    let db = datastore::pg_name(&t.ns, &t.name);
    let password = match files.get("password") {
        Some(p) if datastore::is_generated_password(p) => String::from_utf8_lossy(p).into_owned(),
        _ => BootstrapToken::generate()?.secret + &BootstrapToken::generate()?.secret,
    };
    let dsn = match files.get("dsn") {
        Some(d) if provisioned => String::from_utf8_lossy(d).into_owned(),
        _ => tokio::task::block_in_place(|| pg.provision(&db, &password))?,
    };
    let names = t.names();
    if files.get("dsn").map(|d| d.as_slice()) != Some(dsn.as_bytes()) {
        files = Files::from([
            ("dsn".to_string(), dsn.into_bytes()),
            ("password".to_string(), password.into_bytes()),
        ]);
        t.apply_secret(&names.datastore, &files).await?;
    }
    let storage = Storage::Kine {
        dsn_secret: names.datastore,
    };
    Ok((storage, files))
}

/// Deletes the tenant's keys or database and its user and role, takes it off the
/// DataStore's `usedBy`, then deletes the Secret. A DataStore that is gone is skipped.
async fn give_back(t: &Tenant<'_>) -> Result<(), Error> {
    let name = t.datastore_name();
    let api: Api<DataStore> = Api::all(t.ctx.client.clone());
    match api
        .get_opt(&name)
        .await
        .map_err(Error::kube("get DataStore"))?
    {
        None => {
            tracing::warn!(tenant = %t.name, "DataStore {name} is gone; nothing to remove there")
        }
        Some(ds) => match admin(t.ctx, &ds).await? {
            Admin::Etcd { admin, .. } => tokio::task::block_in_place(|| {
                admin.deprovision(
                    &datastore::etcd_user(&t.ns, &t.name),
                    &datastore::etcd_prefix(&t.ns, &t.name),
                )
            })?,
            Admin::Postgres(pg) => {
                tokio::task::block_in_place(|| pg.deprovision(&datastore::pg_name(&t.ns, &t.name)))?
            }
        },
    }
    update_used_by(t.ctx, &name, None, Some(format!("{}/{}", t.ns, t.name))).await?;
    t.delete_secret(&t.names().datastore).await
}

/// Adds or removes a tenant in `DataStore.status.usedBy` (a merge patch of the whole list,
/// recomputed from the current object, so concurrent tenants converge on requeue).
async fn update_used_by(
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
