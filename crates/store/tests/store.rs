//! The artifact store against a local directory and a real S3-protocol server (moto).

use std::path::Path;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tuna_store::testing::Moto;
use tuna_store::{fetch_s3_url, Store, StoreError};

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn make_tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = vec![
        ("config.json".into(), b"{\"a\": 1}".to_vec()),
        ("sub/tokenizer.json".into(), b"tok".repeat(1000)),
        // Above the single-put limit: exercises the multipart upload.
        (
            "model.safetensors".into(),
            (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect(),
        ),
    ];
    for (rel, data) in &files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    files
}

async fn exercise(store: &Store) {
    let src = tempfile::tempdir().unwrap();
    let files = make_tree(src.path());
    let uploaded = store
        .upload_dir(src.path(), "jobs/j1/final/")
        .await
        .unwrap();
    assert_eq!(uploaded.len(), 3);

    // A sibling with a common string prefix must not be listed.
    store.put_bytes("jobs/j10/x", &b"other"[..]).await.unwrap();
    store
        .put_bytes("jobs/j1/loose.txt", &b"no manifest"[..])
        .await
        .unwrap();

    let listed = store.list("jobs/j1").await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "jobs/j1/final/config.json",
            "jobs/j1/final/model.safetensors",
            "jobs/j1/final/sub/tokenizer.json",
            "jobs/j1/loose.txt"
        ]
    );
    for o in &listed {
        let want: Vec<u8> = match o.key.as_str() {
            "jobs/j1/loose.txt" => b"no manifest".to_vec(),
            k => files
                .iter()
                .find(|(r, _)| k.ends_with(r.as_str()))
                .unwrap()
                .1
                .clone(),
        };
        assert_eq!(o.size, want.len() as u64, "{}", o.key);
        assert_eq!(o.sha256, sha(&want), "{}", o.key);
    }

    // Ranges and streams.
    let big = &files[2].1;
    let r = store
        .get_range("jobs/j1/final/model.safetensors", 1000..1010)
        .await
        .unwrap();
    assert_eq!(&r[..], &big[1000..1010]);
    let (size, mut stream) = store
        .get_stream("jobs/j1/final/model.safetensors")
        .await
        .unwrap();
    assert_eq!(size, big.len() as u64);
    let mut got = Vec::new();
    while let Some(c) = stream.next().await {
        got.extend_from_slice(&c.unwrap());
    }
    assert!(got == *big);

    // Download the prefix back, verified against the manifest.
    let dst = tempfile::tempdir().unwrap();
    let down = store
        .download_prefix("jobs/j1/final", dst.path())
        .await
        .unwrap();
    assert_eq!(down.len(), 3);
    for (rel, data) in &files {
        assert!(
            std::fs::read(dst.path().join(rel)).unwrap() == *data,
            "{rel}"
        );
    }
    assert!(!dst.path().join(tuna_store::MANIFEST).exists());

    // Names cannot escape.
    for bad in ["../escape", "jobs/../../etc/passwd", "/abs", "a//b"] {
        assert!(
            matches!(
                store.put_bytes(bad, &b"x"[..]).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "{bad}"
        );
        assert!(
            matches!(
                store.get_bytes(bad).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "{bad}"
        );
    }
    assert!(store
        .get_bytes("jobs/j1/nope")
        .await
        .unwrap_err()
        .is_not_found());
    assert!(store
        .download_prefix("jobs/none", dst.path())
        .await
        .unwrap_err()
        .is_not_found());

    assert_eq!(store.delete_prefix("jobs/j1").await.unwrap(), 5);
    assert!(store.list("jobs/j1").await.unwrap().is_empty());
    assert_eq!(store.list("jobs/j10").await.unwrap().len(), 1);
}

#[tokio::test]
async fn local_directory_store() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::local(root.path().join("store")).unwrap();
    exercise(&store).await;
    // Nothing was written outside the root.
    let outside: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, vec![std::ffi::OsString::from("store")]);
}

#[tokio::test]
async fn s3_store_on_moto() {
    let moto = Moto::start().expect("moto_server");
    moto.create_bucket("artifacts").unwrap();
    let store = Store::s3("artifacts", "tuna", &moto.settings()).unwrap();
    exercise(&store).await;

    // s3:// dataset URLs, with the size cap.
    let data = Store::s3("artifacts", "", &moto.settings()).unwrap();
    data.put_bytes("datasets/train.jsonl", &b"{\"text\": \"hi\"}\n"[..])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("train.jsonl");
    let n = fetch_s3_url(
        "s3://artifacts/datasets/train.jsonl",
        &moto.settings(),
        &dest,
        1000,
    )
    .await
    .unwrap();
    assert_eq!(n, 15);
    assert_eq!(std::fs::read(&dest).unwrap(), b"{\"text\": \"hi\"}\n");
    let err = fetch_s3_url(
        "s3://artifacts/datasets/train.jsonl",
        &moto.settings(),
        &dest,
        10,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    let err = fetch_s3_url(
        "s3://artifacts/datasets/missing.jsonl",
        &moto.settings(),
        &dest,
        1000,
    )
    .await
    .unwrap_err();
    assert!(err.is_not_found(), "{err}");
}
