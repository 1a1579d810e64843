//! Acceptance: a tenant whose state lives in PostgreSQL through kine. The test runs its own
//! PostgreSQL (Debian's binaries, `initdb` + `pg_ctl` in a temp dir, as the `postgres` user
//! when run as root: PostgreSQL refuses to run as root).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Standalone, alive, kubectl};
use kube::api::{Api, DeleteParams};
use tether_api::TenantControlPlane;

/// A throw-away PostgreSQL server on loopback; stopped on drop.
struct Postgres {
    dir: PathBuf,
    port: u16,
    password: String,
    _tmp: tempfile::TempDir,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql is installed (Debian package postgresql)")
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("a PostgreSQL version")
        .join("bin")
        .join(name)
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn as_postgres(dir: &Path, program: &Path, args: &[&str]) -> std::process::Output {
    let root = is_root();
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).current_dir(dir).output().unwrap()
}

impl Postgres {
    fn start() -> Postgres {
        let tmp = tether_testkit::test_dir("tether-pg-").unwrap();
        let dir = tmp.path().to_path_buf();
        let password = "tether-admin-pw".to_string();
        std::fs::write(dir.join("pw"), &password).unwrap();
        if is_root() {
            let st = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&dir)
                .status()
                .unwrap();
            assert!(st.success(), "chown to postgres");
        }
        let data = dir.join("data");
        let out = as_postgres(
            &dir,
            &pg_bin("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "admin",
                "--auth=scram-sha-256",
                &format!("--pwfile={}", dir.join("pw").display()),
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = tether_testkit::ports::free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.display()
        );
        let out = as_postgres(
            &dir,
            &pg_bin("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                dir.join("pg.log").to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Postgres {
            dir,
            port,
            password,
            _tmp: tmp,
        }
    }

    fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-t",
                "-A",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "admin",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        as_postgres(
            &self.dir,
            &pg_bin("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_on_postgres_through_kine() {
    let pg = Postgres::start();
    let op = Standalone::start().await;
    let setup = op.dir.join("pg-datastore.yaml");
    std::fs::write(
        &setup,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: pg-admin, namespace: tether-system}}\nstringData: {{username: admin, password: {}}}\n---\napiVersion: tether.dev/v1alpha1\nkind: DataStore\nmetadata: {{name: pg}}\nspec:\n  driver: postgres\n  endpoints: [\"127.0.0.1:{}\"]\n  basicAuth:\n    username: {{name: pg-admin, key: username}}\n    password: {{name: pg-admin, key: password}}\n",
            pg.password, pg.port
        ),
    )
    .unwrap();
    op.kubectl(&["apply", "-f", setup.to_str().unwrap()])
        .unwrap();
    // The CRD refuses a postgres DataStore without credentials.
    let bad = op.dir.join("bad-ds.yaml");
    std::fs::write(&bad, "apiVersion: tether.dev/v1alpha1\nkind: DataStore\nmetadata: {name: nocreds}\nspec: {driver: postgres, endpoints: [\"127.0.0.1:1\"]}\n").unwrap();
    let err = op
        .kubectl(&["apply", "-f", bad.to_str().unwrap()])
        .unwrap_err();
    assert!(err.contains("needs spec.basicAuth"), "{err}");

    op.create("apiVersion: tether.dev/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: pgt, namespace: default}\nspec:\n  kubernetes: {version: v1.36.3}\n  dataStore: pg\n").await;
    let t = op
        .wait_ready("default", "pgt", Duration::from_secs(90))
        .await;
    assert_eq!(t.status.unwrap().data_store.as_deref(), Some("pg"));
    let admin = op.admin_kubeconfig("pgt");
    kubectl(&admin, &["create", "namespace", "in-postgres"]).unwrap();
    let db = tether_operator::controlplane::datastore::pg_name("default", "pgt");
    // The tenant's objects are rows in its own database, owned by its own role.
    assert_eq!(
        pg.psql(&format!(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{db}'"
        )),
        db
    );
    let dsn = String::from_utf8(op.secret("default", "pgt-datastore", "dsn")).unwrap();
    let rows = Command::new("psql")
        .args([
            "-X",
            "-t",
            "-A",
            &dsn.replace("?sslmode=disable", ""),
            "-c",
            "SELECT count(*) FROM kine WHERE name LIKE '%in-postgres%'",
        ])
        .output()
        .unwrap();
    assert!(
        rows.status.success(),
        "{}",
        String::from_utf8_lossy(&rows.stderr)
    );
    assert_ne!(String::from_utf8_lossy(&rows.stdout).trim(), "0");
    // Other roles (another tenant's, say) cannot connect to this tenant's database.
    pg.psql("CREATE ROLE intruder LOGIN PASSWORD 'intruder-pw'");
    let intruder = Command::new("psql")
        .args([
            "-X",
            "-t",
            "-A",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "intruder",
            "-d",
            &db,
            "-c",
            "SELECT 1",
        ])
        .env("PGPASSWORD", "intruder-pw")
        .output()
        .unwrap();
    assert!(!intruder.status.success());
    assert!(
        String::from_utf8_lossy(&intruder.stderr).contains("permission denied for database"),
        "{}",
        String::from_utf8_lossy(&intruder.stderr)
    );
    let kine_pid = op.pid("default.pgt", "kine").expect("kine runs");

    // Delete: processes, database, role and Secrets go.
    Api::<TenantControlPlane>::namespaced(op.client.clone(), "default")
        .delete("pgt", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql(&format!(
        "SELECT count(*) FROM pg_database WHERE datname = '{db}'"
    )) != "0"
    {
        assert!(
            Instant::now() < deadline,
            "database not dropped:\n{}",
            common::tail(&op.dir.join("operator.log"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while op.kubectl(&["get", "tcp", "pgt"]).is_ok() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{db}'"
        )),
        "0"
    );
    assert!(!alive(kine_pid));
    let secrets = op
        .kubectl(&[
            "get",
            "secrets",
            "-l",
            "tether.dev/tenant=pgt",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(secrets.trim().is_empty(), "{secrets}");
}
