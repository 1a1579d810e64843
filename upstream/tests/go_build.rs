//! The real build path: a pinned component built from its Go module with the machine's Go
//! into a fresh cache, reused when warm, rebuilt when its recorded hash no longer matches.
//! etcdctl is the smallest pinned binary; with Go's build cache warm this takes seconds.

use std::process::Command;

use tether_upstream::{Builder, Cache, Component, Error, Pins};

#[test]
fn builds_verifies_and_rebuilds_etcdctl() {
    let tmp = tempfile::tempdir().unwrap();
    let builder = Builder::new(Cache::at(tmp.path()));
    let version = Pins::default().etcd;

    let missing = builder
        .cache()
        .lookup(Component::Etcdctl, version)
        .unwrap_err();
    assert!(matches!(missing, Error::Missing { .. }));
    assert!(
        missing.to_string().contains("cargo xtask deps"),
        "{missing}"
    );

    let first = builder
        .ensure(Component::Etcdctl, version)
        .expect("go build etcdctl");
    assert!(first.built);
    let out = Command::new(&first.path).arg("version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "etcdctl version: {}",
            version.trim_start_matches('v')
        )),
        "{text}"
    );
    // The wrapper module records upstream's requirements with replaces turned into versions.
    let go_mod = std::fs::read_to_string(
        builder
            .cache()
            .go_work_dir(Component::Etcdctl.module(), version)
            .join("go.mod"),
    )
    .unwrap();
    assert!(go_mod.contains(&format!(
        "go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 {version}"
    )));

    let warm = builder.ensure(Component::Etcdctl, version).unwrap();
    assert!(!warm.built, "a verified cached binary is reused");
    assert_eq!(warm.path, first.path);

    // A corrupted binary is detected by its recorded sha256 and rebuilt.
    std::fs::write(&first.path, b"corrupt").unwrap();
    let repaired = builder.ensure(Component::Etcdctl, version).unwrap();
    assert!(repaired.built);
    assert!(builder.cache().verify(Component::Etcdctl, version).unwrap());
}

#[test]
fn unknown_version_is_a_clear_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let builder = Builder::new(Cache::at(tmp.path()));
    let err = builder
        .ensure(Component::Etcdctl, "v3.6.999")
        .expect_err("a version that does not exist");
    assert!(matches!(err, Error::Go { .. }), "{err}");
    assert!(
        builder
            .cache()
            .lookup(Component::Etcdctl, "v3.6.999")
            .is_err()
    );
    assert!(
        !builder
            .cache()
            .bin_dir(Component::Etcdctl, "v3.6.999")
            .exists()
    );
}
