//! Carving one tenant out of a shared datastore, and giving its space back.
//!
//! etcd: the tenant's keys live under [`etcd_prefix`]; the operator creates an etcd user
//! and a role of the same name with readwrite on exactly that prefix, and signs a client
//! certificate whose common name is that user (etcd maps the certificate CN to the user
//! when auth is on). The API server presents that certificate, so even a tenant that
//! stole its own credentials reads nothing but its own keys. Administrative calls use
//! `etcdctl` from the binary cache with the DataStore's root client certificate.
//!
//! PostgreSQL (through kine): a database and a login role per tenant, owner of only that
//! database, with CONNECT revoked from PUBLIC; administrative calls use `psql`.

use std::path::{Path, PathBuf};
use std::process::Command;

use time::OffsetDateTime;

use crate::error::Error;
use crate::pki::{self, LeafSpec};

/// The key prefix of tenant `ns/name` (the API server's `--etcd-prefix`).
pub fn etcd_prefix(ns: &str, name: &str) -> String {
    format!("/tether/{ns}/{name}")
}

/// The etcd user and role name of tenant `ns/name`. Namespaces hold no dots, so the first
/// dot after `tether.` splits it unambiguously.
pub fn etcd_user(ns: &str, name: &str) -> String {
    format!("tether.{ns}.{name}")
}

/// PostgreSQL database and role name of tenant `ns/name` (identifier-safe; a hash suffix
/// keeps distinct tenants distinct after the character substitution and truncation).
pub fn pg_name(ns: &str, name: &str) -> String {
    use sha2::Digest;
    let clean: String = format!("{ns}_{name}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(40)
        .collect();
    let h = hex::encode(sha2::Sha256::digest(format!("{ns}/{name}")));
    format!("tether_{clean}_{}", &h[..8])
}

/// An etcd with auth enabled that the operator administers as `root`.
pub struct EtcdAdmin {
    /// etcdctl binary.
    pub etcdctl: PathBuf,
    /// `https://host:port` endpoints.
    pub endpoints: Vec<String>,
    /// Directory holding `ca.crt`, `root.crt`, `root.key` for etcdctl.
    pub creds: PathBuf,
}

impl EtcdAdmin {
    fn run(&self, args: &[&str]) -> Result<String, Error> {
        let out = Command::new(&self.etcdctl)
            .arg(format!("--endpoints={}", self.endpoints.join(",")))
            .arg(format!("--cacert={}", self.creds.join("ca.crt").display()))
            .arg(format!("--cert={}", self.creds.join("root.crt").display()))
            .arg(format!("--key={}", self.creds.join("root.key").display()))
            .arg("--dial-timeout=5s")
            .arg("--command-timeout=10s")
            .args(args)
            .output()
            .map_err(Error::io("run etcdctl", &self.etcdctl))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Command {
                command: format!("etcdctl {}", args.join(" ")),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Runs `args`, treating "already exists"/"not found" as success (idempotence).
    fn run_tolerant(&self, args: &[&str], tolerated: &str) -> Result<(), Error> {
        match self.run(args) {
            Ok(_) => Ok(()),
            Err(Error::Command { detail, .. }) if detail.contains(tolerated) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates the tenant's user and role (idempotent).
    pub fn provision(&self, user: &str, prefix: &str) -> Result<(), Error> {
        self.run_tolerant(&["user", "add", user, "--no-password"], "already exists")?;
        self.run_tolerant(&["role", "add", user], "already exists")?;
        let from = format!("{prefix}/");
        self.run(&[
            "role",
            "grant-permission",
            user,
            "--prefix=true",
            "readwrite",
            &from,
        ])?;
        self.run_tolerant(&["user", "grant-role", user, user], "already")?;
        Ok(())
    }

    /// Deletes the tenant's keys, user and role (idempotent).
    pub fn deprovision(&self, user: &str, prefix: &str) -> Result<(), Error> {
        self.run(&["del", "--prefix", &format!("{prefix}/")])?;
        self.run_tolerant(&["user", "delete", user], "not found")?;
        self.run_tolerant(&["role", "delete", user], "not found")?;
        Ok(())
    }

    /// Creates `root` (certificate CN `root`) with the root role and enables auth;
    /// idempotent, retried until etcd answers or `timeout` passes.
    pub async fn enable_auth(&self, timeout: std::time::Duration) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let r = self
                .run_tolerant(&["user", "add", "root", "--no-password"], "already exists")
                .and_then(|_| self.run_tolerant(&["user", "grant-role", "root", "root"], "already"))
                .and_then(|_| self.run(&["auth", "enable"]).map(|_| ()));
            match r {
                Ok(()) => return Ok(()),
                Err(e) if std::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    }

    /// Number of keys under `prefix/`.
    pub fn count(&self, prefix: &str) -> Result<usize, Error> {
        let out = self.run(&["get", "--prefix", "--keys-only", &format!("{prefix}/")])?;
        Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
    }
}

/// Writes the admin credentials etcdctl needs into `dir` (mode 0600).
pub fn write_creds(dir: &Path, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    crate::runtime::process::write_atomic(&dir.join("ca.crt"), ca)?;
    crate::runtime::process::write_atomic(&dir.join("root.crt"), cert)?;
    crate::runtime::process::write_atomic(&dir.join("root.key"), key)
}

/// A client certificate for etcd user `user`, signed by the datastore's CA.
pub fn tenant_client_cert(
    ca_cert: &[u8],
    ca_key: &[u8],
    user: &str,
) -> Result<(String, String), Error> {
    pki::issue_with(
        std::str::from_utf8(ca_cert).unwrap_or_default(),
        std::str::from_utf8(ca_key).unwrap_or_default(),
        &LeafSpec {
            cn: user,
            orgs: &[],
            dns: &[],
            ips: &[],
            server: false,
            client: true,
        },
        OffsetDateTime::now_utc(),
    )
}

/// A PostgreSQL server the operator administers.
pub struct PgAdmin {
    /// `host:port`.
    pub endpoint: String,
    /// Admin role.
    pub user: String,
    /// Admin password.
    pub password: String,
}

impl PgAdmin {
    fn psql(&self, db: &str, sql: &str) -> Result<String, Error> {
        let (host, port) = self
            .endpoint
            .rsplit_once(':')
            .unwrap_or((&self.endpoint, "5432"));
        let out = Command::new("psql")
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h", host, "-p", port, "-U", &self.user, "-d", db, "-c", sql,
            ])
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .map_err(Error::io("run psql", "psql"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(Error::Command {
                command: format!("psql {sql}"),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Creates role and database `name` (idempotent); returns the DSN kine uses.
    pub fn provision(&self, name: &str, password: &str) -> Result<String, Error> {
        let exists = self.psql(
            "postgres",
            &format!("SELECT 1 FROM pg_roles WHERE rolname = '{name}'"),
        )?;
        if exists.is_empty() {
            self.psql(
                "postgres",
                &format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'"),
            )?;
        } else {
            self.psql(
                "postgres",
                &format!("ALTER ROLE {name} PASSWORD '{password}'"),
            )?;
        }
        let db = self.psql(
            "postgres",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
        )?;
        if db.is_empty() {
            self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {name}"))?;
        }
        self.psql(
            "postgres",
            &format!("REVOKE ALL ON DATABASE {name} FROM PUBLIC"),
        )?;
        Ok(format!(
            "postgres://{name}:{password}@{}/{name}?sslmode=disable",
            self.endpoint
        ))
    }

    /// Drops database and role `name` (idempotent).
    pub fn deprovision(&self, name: &str) -> Result<(), Error> {
        self.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )?;
        self.psql("postgres", &format!("DROP ROLE IF EXISTS {name}"))?;
        Ok(())
    }

    /// Whether database `name` exists.
    pub fn exists(&self, name: &str) -> Result<bool, Error> {
        Ok(!self
            .psql(
                "postgres",
                &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
            )?
            .is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(etcd_prefix("ns", "a"), "/tether/ns/a");
        assert_eq!(etcd_user("ns", "a.b"), "tether.ns.a.b");
        let a = pg_name("a-b", "c");
        let b = pg_name("a", "b-c");
        assert_ne!(a, b, "substitution must not merge tenants");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert!(pg_name("n", &"x".repeat(250)).len() <= 63);
    }
}
