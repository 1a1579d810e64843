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
use crate::x509::{self, LeafSpec};

/// The key prefix of tenant `ns/name` (the API server's `--etcd-prefix`).
pub fn etcd_prefix(ns: &str, name: &str) -> String {
    format!("/tether/{ns}/{name}")
}

/// The etcd key prefix a tenant's role is granted, its keys are deleted by and counted
/// under: with the trailing `/`, so tenant `a`'s grant never covers tenant `ab`'s keys.
pub fn prefix_key(prefix: &str) -> String {
    format!("{}/", prefix.trim_end_matches('/'))
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
        let from = prefix_key(prefix);
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
        self.run(&["del", "--prefix", &prefix_key(prefix)])?;
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
        let out = self.run(&["get", "--prefix", "--keys-only", &prefix_key(prefix)])?;
        Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
    }
}

/// Writes the admin credentials etcdctl needs into `dir` (mode 0600).
pub fn write_creds(dir: &Path, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    crate::fs::write_atomic(&dir.join("ca.crt"), ca)?;
    crate::fs::write_atomic(&dir.join("root.crt"), cert)?;
    crate::fs::write_atomic(&dir.join("root.key"), key)
}

/// A client certificate for etcd user `user`, signed by the datastore's CA.
pub fn tenant_client_cert(
    ca_cert: &[u8],
    ca_key: &[u8],
    user: &str,
) -> Result<(String, String), Error> {
    x509::issue_with(
        ca_cert,
        ca_key,
        &LeafSpec::client(user, &[]),
        OffsetDateTime::now_utc(),
    )
}

/// Whether a stored tenant password has the shape the operator generates (at least 16
/// lowercase alphanumerics), so it is safe in SQL and in a DSN without escaping.
pub fn is_generated_password(p: &[u8]) -> bool {
    p.len() >= 16
        && p.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// A standard SQL string literal (quotes doubled): a password read back from a Secret
/// anyone with write access to the tenant's namespace could edit must stay a literal.
fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `sql` with the literal after every `PASSWORD` replaced by `'***'`, for error messages.
pub fn redact_sql(sql: &str) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(i) = rest.to_ascii_uppercase().find("PASSWORD '") {
        let start = i + "PASSWORD '".len();
        out.push_str(&rest[..start]);
        out.push_str("***'");
        rest = match rest[start..].find('\'') {
            Some(end) => &rest[start + end + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
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
    /// Runs one statement. The SQL goes in on stdin, never in the arguments (which every
    /// local user can read in `/proc/<pid>/cmdline`), and errors quote it with passwords
    /// redacted (errors end up in logs).
    fn psql(&self, db: &str, sql: &str) -> Result<String, Error> {
        use std::io::Write;
        let (host, port) = self
            .endpoint
            .rsplit_once(':')
            .unwrap_or((&self.endpoint, "5432"));
        let failed = |detail: String| Error::Command {
            command: format!("psql {}", redact_sql(sql)),
            detail,
        };
        let mut child = Command::new("psql")
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", host, "-p", port, "-U", &self.user, "-d", db])
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(Error::io("run psql", "psql"))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let fed = stdin.write_all(format!("{sql};\n").as_bytes());
        drop(stdin);
        let out = child
            .wait_with_output()
            .map_err(Error::io("run psql", "psql"))?;
        if let Err(e) = fed {
            return Err(failed(format!("feed the statement: {e}")));
        }
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
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
                &format!(
                    "CREATE ROLE {name} LOGIN PASSWORD {}",
                    sql_literal(password)
                ),
            )?;
        } else {
            self.psql(
                "postgres",
                &format!("ALTER ROLE {name} PASSWORD {}", sql_literal(password)),
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
    fn only_generated_passwords_are_reused() {
        assert!(is_generated_password(b"abcdefghij0123456789abcdefghij01"));
        assert!(!is_generated_password(b"short"));
        assert!(!is_generated_password(b"abcdefghij0123456789'; drop x --"));
        assert!(!is_generated_password(b"abcdefghij0123456789@host/db?x=y"));
    }

    #[test]
    fn literals_stay_literals() {
        assert_eq!(sql_literal("abc"), "'abc'");
        assert_eq!(
            sql_literal("x'; DROP DATABASE y; --"),
            "'x''; DROP DATABASE y; --'"
        );
    }

    #[test]
    fn redacts_passwords() {
        let table = [
            (
                "CREATE ROLE r LOGIN PASSWORD 's3cret'",
                "CREATE ROLE r LOGIN PASSWORD '***'",
            ),
            (
                "alter role r password 'a' ; x password 'b'",
                "alter role r password '***' ; x password '***'",
            ),
            ("DROP ROLE IF EXISTS r", "DROP ROLE IF EXISTS r"),
            ("PASSWORD 'unterminated", "PASSWORD '***'"),
        ];
        for (sql, want) in table {
            assert_eq!(redact_sql(sql), want, "{sql}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(etcd_prefix("ns", "a"), "/tether/ns/a");
        // Tenant `a`'s range must not contain tenant `ab`'s keys (etcd prefix semantics).
        let a = prefix_key(&etcd_prefix("ns", "a"));
        let ab = prefix_key(&etcd_prefix("ns", "ab"));
        assert_eq!(a, "/tether/ns/a/");
        assert!(!ab.starts_with(&a) && !a.starts_with(&ab));
        assert!(!"/tether/ns/ab/registry/x".starts_with(&a));
        assert_eq!(etcd_user("ns", "a.b"), "tether.ns.a.b");
        let a = pg_name("a-b", "c");
        let b = pg_name("a", "b-c");
        assert_ne!(a, b, "substitution must not merge tenants");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert!(pg_name("n", &"x".repeat(250)).len() <= 63);
    }
}
