//! `DataStore`: a backend that keeps tenant control planes' state — a shared etcd (each
//! tenant its own key prefix and its own etcd user/role limited to it) or PostgreSQL through
//! kine (each tenant its own database and role).
//!
//! Cluster-scoped, as in Kamaji: one datastore serves tenants of every namespace, and its
//! credentials live in Secrets of the operator's namespace.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tenant_control_plane::Condition;

/// A datastore tenants can be placed on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "tether.dev",
        version = "v1alpha1",
        kind = "DataStore",
        shortname = "ds",
        status = "DataStoreStatus",
        printcolumn = r#"{"name":"Driver","type":"string","jsonPath":".spec.driver"}"#,
        printcolumn = r#"{"name":"Tenants","type":"integer","jsonPath":".status.tenantCount"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
        validation = kube::core::Rule::new("self.spec.driver != 'postgres' || has(self.spec.basicAuth)").message("the postgres driver needs spec.basicAuth (an admin role that can create databases and roles)"),
        validation = kube::core::Rule::new("self.spec.driver != 'etcd' || has(self.spec.tlsConfig)").message("the etcd driver needs spec.tlsConfig: tenants authenticate to etcd with client certificates")
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DataStoreSpec {
    /// Which backend.
    pub driver: Driver,
    /// `host:port` of each member (etcd) or of the server (postgres).
    #[schemars(length(min = 1))]
    pub endpoints: Vec<String>,
    /// TLS to the backend. For etcd the CA key is needed too: the operator signs each
    /// tenant's client certificate, whose common name is the tenant's etcd user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_config: Option<TlsConfig>,
    /// User name and password of an administrator (postgres: a role with CREATEDB and
    /// CREATEROLE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
}

/// Supported backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// etcd v3 with auth enabled.
    #[default]
    Etcd,
    /// PostgreSQL, reached by the API server through kine.
    Postgres,
}

/// One key of one Secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Namespace; unset means the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Key inside the Secret's data.
    pub key: String,
}

/// TLS material for talking to the backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsConfig {
    /// The backend's CA certificate (PEM) and, for etcd, its private key.
    pub certificate_authority: CertKeyRef,
    /// The operator's administrative client certificate (etcd: common name `root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<CertKeyRef>,
}

/// A certificate and (optionally) its key, each in a Secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertKeyRef {
    /// PEM certificate.
    pub certificate: SecretKeyRef,
    /// PEM private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<SecretKeyRef>,
}

/// An administrator's user name and password.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BasicAuth {
    /// User name.
    pub username: SecretKeyRef,
    /// Password.
    pub password: SecretKeyRef,
}

/// What the operator last observed of a datastore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataStoreStatus {
    /// `namespace/name` of every tenant placed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
    /// `usedBy.len()`, for the printer column.
    #[serde(default)]
    pub tenant_count: u32,
    /// `Ready` and friends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Checks that need no cluster access: endpoints are `host:port`, and each driver has the
/// credentials it needs.
pub fn validate(spec: &DataStoreSpec) -> Vec<String> {
    let mut out = Vec::new();
    if spec.endpoints.is_empty() {
        out.push("spec.endpoints: at least one endpoint is required".to_string());
    }
    for e in &spec.endpoints {
        let ok = e.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            out.push(format!(
                "spec.endpoints: {e:?} is not host:port (no scheme, e.g. 10.0.0.5:2379)"
            ));
        }
    }
    match spec.driver {
        Driver::Etcd => match &spec.tls_config {
            None => out.push(
                "spec.tlsConfig: the etcd driver needs TLS (tenants authenticate with client certificates)"
                    .to_string(),
            ),
            Some(tls) => {
                if tls.certificate_authority.private_key.is_none() {
                    out.push("spec.tlsConfig.certificateAuthority.privateKey: the etcd driver signs tenant client certificates and needs the CA key".to_string());
                }
                match &tls.client_certificate {
                    Some(c) if c.private_key.is_some() => {}
                    _ => out.push("spec.tlsConfig.clientCertificate: the etcd driver needs an administrative client certificate and key (common name root)".to_string()),
                }
            }
        },
        Driver::Postgres => {
            if spec.basic_auth.is_none() {
                out.push("spec.basicAuth: the postgres driver needs an administrator role".to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> SecretKeyRef {
        SecretKeyRef {
            name: "s".into(),
            namespace: None,
            key: k.into(),
        }
    }

    fn etcd() -> DataStoreSpec {
        DataStoreSpec {
            driver: Driver::Etcd,
            endpoints: vec!["127.0.0.1:2379".into()],
            tls_config: Some(TlsConfig {
                certificate_authority: CertKeyRef {
                    certificate: key("ca.crt"),
                    private_key: Some(key("ca.key")),
                },
                client_certificate: Some(CertKeyRef {
                    certificate: key("tls.crt"),
                    private_key: Some(key("tls.key")),
                }),
            }),
            basic_auth: None,
        }
    }

    fn postgres() -> DataStoreSpec {
        DataStoreSpec {
            driver: Driver::Postgres,
            endpoints: vec!["db.example:5432".into()],
            tls_config: None,
            basic_auth: Some(BasicAuth {
                username: key("user"),
                password: key("pw"),
            }),
        }
    }

    #[test]
    fn valid_specs() {
        assert_eq!(validate(&etcd()), Vec::<String>::new());
        assert_eq!(validate(&postgres()), Vec::<String>::new());
    }

    #[test]
    fn invalid_specs() {
        type Edit = fn(&mut DataStoreSpec);
        type Base = fn() -> DataStoreSpec;
        let table: &[(&str, Base, Edit, &str)] = &[
            (
                "no endpoints",
                etcd,
                |s| s.endpoints.clear(),
                "at least one",
            ),
            (
                "scheme",
                etcd,
                |s| s.endpoints = vec!["https://a:2379".into()],
                "not host:port",
            ),
            (
                "no port",
                etcd,
                |s| s.endpoints = vec!["a".into()],
                "not host:port",
            ),
            (
                "port 0",
                etcd,
                |s| s.endpoints = vec!["a:0".into()],
                "not host:port",
            ),
            (
                "etcd without tls",
                etcd,
                |s| s.tls_config = None,
                "needs TLS",
            ),
            (
                "etcd without ca key",
                etcd,
                |s| {
                    s.tls_config
                        .as_mut()
                        .unwrap()
                        .certificate_authority
                        .private_key = None
                },
                "needs the CA key",
            ),
            (
                "etcd without client cert",
                etcd,
                |s| s.tls_config.as_mut().unwrap().client_certificate = None,
                "administrative client certificate",
            ),
            (
                "postgres without auth",
                postgres,
                |s| s.basic_auth = None,
                "administrator role",
            ),
        ];
        for (name, base, edit, needle) in table {
            let mut s = base();
            edit(&mut s);
            let errs = validate(&s);
            assert!(errs.iter().any(|e| e.contains(needle)), "{name}: {errs:?}");
        }
    }

    #[test]
    fn driver_is_lowercase_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&Driver::Postgres).unwrap(),
            "\"postgres\""
        );
    }
}
