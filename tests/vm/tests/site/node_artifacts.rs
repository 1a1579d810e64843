//! The node artifacts in the store, fetched the way a node will: by digest, with the agent's
//! downloader (`tether_agent::node::download`), from the registry `standalone` runs — and
//! what it does with an interrupted transfer, a damaged partial, a stale partial of
//! another version, a wrong or over-long blob, an unknown digest and a repeat.

use std::path::Path;

use sha2::Digest;
use tether_agent::node::download::{self, Outcome, Want, part_path};
use tether_image::node_artifacts::{self, NodeArtifact};
use tether_upstream::{Cache, Component, Pins};
use tether_vm_tests::site::site;

fn sha256_file(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_artifacts_are_fetched_by_digest_resumed_and_checked() {
    let site = site();
    let store = tether_testkit::published::artifact_store(&site.kubeconfig).unwrap();
    let pushed: Vec<NodeArtifact> = {
        let (store, work) = (store.clone(), site.dir.join("containers"));
        tokio::task::spawn_blocking(move || {
            node_artifacts::push_all(&store, &Pins::default(), &work)
        })
        .await
        .unwrap()
        .expect("push the node artifacts")
    };
    let again = {
        let (store, work) = (store.clone(), site.dir.join("containers"));
        tokio::task::spawn_blocking(move || {
            node_artifacts::push_all(&store, &Pins::default(), &work)
        })
        .await
        .unwrap()
        .unwrap()
    };
    assert_eq!(
        pushed, again,
        "pushing the same binaries gives the same digests"
    );
    let components: Vec<Component> = pushed.iter().map(|a| a.component).collect();
    assert_eq!(components, node_artifacts::COMPONENTS);

    let client = download::client().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = pushed
        .iter()
        .find(|a| a.component == Component::Kubelet)
        .unwrap();
    let runc = pushed
        .iter()
        .find(|a| a.component == Component::Runc)
        .unwrap();
    let url = |a: &NodeArtifact| format!("http://{store}{}", a.blob_path());
    let want = |a: &NodeArtifact| (url(a), a.blob.trim_start_matches("sha256:").to_string());

    // Every artifact is the cached binary, byte for byte.
    for a in &pushed {
        let (u, sha) = want(a);
        let dest = dir.path().join(a.component.name());
        let w = Want {
            url: &u,
            sha256: &sha,
            size: a.size,
        };
        let got = download::fetch(&client, &w, &dest).await.unwrap();
        assert_eq!(
            got,
            Outcome::Downloaded {
                fetched: a.size,
                resumed_from: 0
            }
        );
        let cached = Cache::from_env().pinned(a.component).unwrap();
        assert_eq!(sha256_file(&dest), sha256_file(&cached), "{}", a.reference);
        // A second fetch finds it in place and downloads nothing.
        let again = download::fetch(&client, &w, &dest).await.unwrap();
        assert_eq!(again, Outcome::AlreadyPresent);
    }

    // Interrupted: a third of the kubelet left in `.part` → the rest is fetched with a
    // Range request.
    let (ku, ksha) = want(kubelet);
    let kw = Want {
        url: &ku,
        sha256: &ksha,
        size: kubelet.size,
    };
    let dest = dir.path().join("resumed-kubelet");
    let whole = std::fs::read(dir.path().join("kubelet")).unwrap();
    let third = whole.len() / 3;
    std::fs::write(part_path(&dest, &ksha), &whole[..third]).unwrap();
    let got = download::fetch(&client, &kw, &dest).await.unwrap();
    assert_eq!(
        got,
        Outcome::Downloaded {
            fetched: kubelet.size - third as u64,
            resumed_from: third as u64
        }
    );
    assert_eq!(sha256_file(&dest), ksha);
    assert!(!part_path(&dest, &ksha).exists());

    // A damaged partial (a flipped byte in what was kept) fails the digest; it is dropped
    // and the blob fetched once more from zero — what is installed is checked.
    let dest = dir.path().join("damaged-kubelet");
    let mut bad = whole[..third].to_vec();
    bad[100] ^= 0xff;
    std::fs::write(part_path(&dest, &ksha), &bad).unwrap();
    let got = download::fetch(&client, &kw, &dest).await.unwrap();
    assert_eq!(
        got,
        Outcome::Downloaded {
            fetched: kubelet.size,
            resumed_from: 0
        }
    );
    assert_eq!(sha256_file(&dest), ksha);
    // A partial of an older version (another digest) is removed, not resumed.
    let dest = dir.path().join("upgraded-kubelet");
    let old = part_path(&dest, &"e".repeat(64));
    std::fs::write(&old, &whole[..third]).unwrap();
    download::fetch(&client, &kw, &dest).await.unwrap();
    assert!(!old.exists());
    assert_eq!(sha256_file(&dest), ksha);

    // The wrong blob for the digest asked for (runc's bytes where the kubelet's digest is
    // expected) → refused.
    let (ru, _) = want(runc);
    let dest = dir.path().join("wrong-blob");
    let err = download::fetch(
        &client,
        &Want {
            url: &ru,
            sha256: &ksha,
            size: runc.size,
        },
        &dest,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, tether_agent::Error::DigestMismatch { .. }),
        "{err}"
    );
    assert!(!dest.exists() && !part_path(&dest, &ksha).exists());

    // More bytes than the desired config says → refused before they are all read.
    let dest = dir.path().join("too-long");
    let err = download::fetch(
        &client,
        &Want {
            url: &ku,
            sha256: &ksha,
            size: kubelet.size - 1,
        },
        &dest,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("more than the expected"), "{err}");
    assert!(!dest.exists() && !part_path(&dest, &ksha).exists());

    // An unknown digest → the store's 404, nothing written.
    let missing = format!(
        "http://{store}/v2/tether/node/kubelet/blobs/sha256:{}",
        "0".repeat(64)
    );
    let dest = dir.path().join("missing");
    let zeros = "0".repeat(64);
    let err = download::fetch(
        &client,
        &Want {
            url: &missing,
            sha256: &zeros,
            size: 10,
        },
        &dest,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("HTTP 404"), "{err}");
    assert!(!dest.exists() && !part_path(&dest, &zeros).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_image_is_in_the_store_by_its_manifest_digests_and_a_tampered_one_is_refused() {
    let site = site();
    let store = tether_testkit::published::artifact_store(&site.kubeconfig).unwrap();
    let public = tether_image::keys::read_public_key(&site.image.key).unwrap();
    let work = site.dir.join("containers");
    let pushed = {
        let (dir, store, work) = (site.image.dir.clone(), store.clone(), work.clone());
        tokio::task::spawn_blocking(move || {
            tether_image::boot_artifacts::push(&dir, &public, &store, &work)
        })
        .await
        .unwrap()
        .expect("push the image")
    };
    assert_eq!(
        pushed.reference,
        format!(
            "tether/boot/{}:{}",
            tether_image::boot::object_name(&site.image.manifest.version),
            site.image.manifest.version
        )
    );
    // Every artifact's blob is addressed by the sha256 the signed manifest carries; fetch
    // the rootfs by it.
    let repo = pushed.reference.split(':').next().unwrap();
    let mut expected: Vec<&str> = site
        .image
        .manifest
        .artifacts
        .keys()
        .map(String::as_str)
        .filter(|f| tether_image::boot::role(f).is_some())
        .collect();
    expected.push("manifest.sig");
    let files: Vec<&str> = pushed.files.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        files, expected,
        "every artifact with a role, then the signature"
    );
    for (file, want) in &site.image.manifest.artifacts {
        if let Some((_, digest)) = pushed.files.iter().find(|(f, _)| f == file) {
            assert_eq!(*digest, format!("sha256:{}", want.sha256), "{file}");
        }
    }
    let rootfs = &site.image.manifest.artifacts["rootfs.squashfs"];
    let url = format!("http://{store}/v2/{repo}/blobs/sha256:{}", rootfs.sha256);
    let dest = tempfile::tempdir().unwrap();
    let got = download::fetch(
        &download::client().unwrap(),
        &Want {
            url: &url,
            sha256: &rootfs.sha256,
            size: rootfs.size,
        },
        &dest.path().join("rootfs.squashfs"),
    )
    .await
    .unwrap();
    assert!(matches!(got, Outcome::Downloaded { .. }), "{got:?}");

    // A copy of the image with one flipped byte in its initramfs is refused before
    // anything is sent.
    let tampered = site.dir.join("tampered-image");
    std::fs::create_dir_all(&tampered).unwrap();
    for e in std::fs::read_dir(&site.image.dir).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), tampered.join(e.file_name())).unwrap();
        }
    }
    let initramfs = tampered.join("initramfs");
    let mut bytes = std::fs::read(&initramfs).unwrap();
    bytes[1000] ^= 0x01;
    std::fs::write(&initramfs, bytes).unwrap();
    let public = tether_image::keys::read_public_key(&site.image.key).unwrap();
    let err = tether_image::boot_artifacts::push(&tampered, &public, &store, &work).unwrap_err();
    assert!(
        err.to_string().contains("initramfs"),
        "refused, naming the file: {err}"
    );
}
