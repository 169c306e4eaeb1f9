//! `tuna serve` as a process: prints its address, writes the admin key (0600) once, serves, and
//! exits cleanly on SIGTERM. `tuna keys create` and `tuna models register` work on the same
//! database.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use tuna_db::testing::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_tuna");

fn fixture(name: &str) -> String {
    format!("{}/../../.fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn serve_creates_the_admin_key_and_shuts_down_on_sigterm() {
    let db = TestDb::new().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let registered = run(&[
        "models",
        "register",
        "gpt2",
        &fixture("gpt2"),
        "--data-dir",
        &data,
    ]);
    assert!(
        registered.contains("registered base model gpt2"),
        "{registered}"
    );

    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0", "--data-dir", &data])
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("tuna listening on ")
        .expect("address line")
        .to_string();
    let key_file = dir.path().join("admin_key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(key.starts_with("tuna-sk-"));

    let client = reqwest::Client::new();
    let models: serde_json::Value = client
        .get(format!("{base}/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "gpt2");
    let other = run(&["keys", "create", "--org", "acme", "--data-dir", &data]);
    let other_key = other.trim();
    let files_status = || async {
        client
            .get(format!("{base}/v1/files"))
            .bearer_auth(other_key)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(files_status().await, 200);
    let listed = run(&["keys", "list", "--data-dir", &data]);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    // Revoking the second key: the server refuses it once its 5 s cache entry is gone.
    let id = listed
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.get(1).is_some_and(|org| *org != "org-default"))
        .map(|cols| cols[0])
        .expect("the acme key is listed")
        .to_string();
    run(&["keys", "revoke", &id, "--data-dir", &data]);
    let out = Command::new(BIN)
        .args(["keys", "revoke", &id, "--data-dir", &data])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(!out.status.success(), "revoking twice fails");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no live API key"));
    assert!(run(&["keys", "list", "--data-dir", &data])
        .lines()
        .any(|l| l.starts_with(&id) && l.contains(" true ")));
    tokio::time::sleep(std::time::Duration::from_millis(5200)).await;
    assert_eq!(files_status().await, 401);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    // A second start keeps the existing admin key.
    let before = std::fs::read_to_string(&key_file).unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--open-access",
            "--host",
            "0.0.0.0",
            "--data-dir",
            &data,
        ])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), before);
}
