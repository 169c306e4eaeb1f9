//! The client commands (`tuna files|jobs|models|download`) against a real `tuna serve` on a
//! fresh database: output, `--json`, and exit codes (0 ok, 1 API error, 2 usage, 3 job ended
//! failed/cancelled for `jobs watch`). Jobs stay queued here (no worker runs in these tests).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tuna_db::testing::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_tuna");

fn fixture(name: &str) -> String {
    format!("{}/../../.fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A `tuna serve` process on its own database and data directory.
struct Server {
    child: Child,
    base: String,
    data: tempfile::TempDir,
    db: TestDb,
}

/// What a command printed and how it exited.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> Out {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tuna ARGS` with the environment a user of server `base` would have.
fn run_tuna(base: &str, data: &Path, db_url: &str, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(data)
        .env("TUNA_URL", base)
        .env("TUNA_DATA_DIR", data)
        .env("DATABASE_URL", db_url)
        .env_remove("TUNA_API_KEY")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Server {
    /// A server without a worker: jobs stay queued.
    async fn start() -> Server {
        Server::start_with(&["--no-worker"]).await
    }

    /// A server with `serve_args` (e.g. its in-process worker on the CPU).
    async fn start_with(serve_args: &[&str]) -> Server {
        let db = TestDb::new().await.unwrap();
        let data = tempfile::tempdir().unwrap();
        let registered = run_tuna(
            "",
            data.path(),
            &db.url,
            &["models", "register", "gpt2", &fixture("gpt2")],
            &[],
        )
        .ok();
        assert!(registered.stdout.contains("registered base model gpt2"));
        let mut child = Command::new(BIN)
            .args(["serve", "--port", "0"])
            .args(serve_args)
            .arg("--data-dir")
            .arg(data.path())
            .env("DATABASE_URL", &db.url)
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("tuna listening on ")
            .unwrap_or_else(|| panic!("no address line: {line:?}"))
            .to_string();
        Server {
            child,
            base,
            data,
            db,
        }
    }

    fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Runs `tuna ARGS` against this server (URL and key from the environment and data dir).
    fn tuna(&self, args: &[&str]) -> Out {
        self.tuna_env(args, &[])
    }

    fn tuna_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        run_tuna(&self.base, self.data.path(), &self.db.url, args, env)
    }

    /// Runs `tuna ARGS`, killing it (and failing) after `limit`.
    fn tuna_limited(&self, args: &[&str], limit: Duration) -> Out {
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(self.data.path())
            .env("TUNA_URL", &self.base)
            .env("TUNA_DATA_DIR", self.data.path())
            .env_remove("TUNA_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "tuna {args:?} ran over {limit:?}; stdout: {} stderr: {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Polls `jobs show` until the job has `status`.
    fn wait_status(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.tuna(&["jobs", "show", id, "--json"]).ok().json();
            if job["status"] == status {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached {status}: {job}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Ten prompt/completion records.
fn write_training_file(dir: &Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    let lines: Vec<String> = (0..10)
        .map(|i| {
            serde_json::json!({"prompt": format!("Say {i}:"), "completion": format!(" {i}")})
                .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// Uploads the ten-record training file; returns its id and local path.
fn upload_training_file(s: &Server) -> (String, PathBuf) {
    let train = write_training_file(s.data_dir());
    let file = s
        .tuna(&["files", "upload", train.to_str().unwrap(), "--json"])
        .ok()
        .json();
    (file["id"].as_str().unwrap().to_string(), train)
}

/// `tuna jobs create` on the tiny GPT-2 from `file_id` with `extra` flags: the job object.
fn create_job(s: &Server, file_id: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "jobs",
        "create",
        "--model",
        "gpt2",
        "--training-file",
        file_id,
        "--json",
    ];
    args.extend_from_slice(extra);
    s.tuna(&args).ok().json()
}

/// [`create_job`], then waits until the job is queued; its id.
fn queued_job(s: &Server, file_id: &str, extra: &[&str]) -> String {
    let job = create_job(s, file_id, extra);
    let id = job["id"].as_str().unwrap().to_string();
    s.wait_status(&id, "queued");
    id
}

#[tokio::test]
async fn models_list_and_show() {
    let s = Server::start().await;
    let list = s.tuna(&["models", "list"]).ok();
    let first = list.stdout.lines().next().unwrap();
    assert!(
        first.starts_with("ID") && first.contains("KIND"),
        "{list:?}"
    );
    assert!(list.stdout.contains("gpt2"), "{list:?}");
    let json = s.tuna(&["models", "list", "--json"]).ok().json();
    assert_eq!(json["data"][0]["id"], "gpt2");
    let show = s.tuna(&["models", "show", "gpt2"]).ok();
    assert!(show.stdout.contains("model_type:"), "{show:?}");
    let missing = s.tuna(&["models", "show", "nope"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing.stderr.contains("The model 'nope' does not exist"),
        "{missing:?}"
    );
}

#[tokio::test]
async fn files_upload_list_show_content_and_delete() {
    let s = Server::start().await;
    let train = write_training_file(s.data_dir());
    let train = train.to_str().unwrap();

    // Upload, human and --json.
    let up = s.tuna(&["files", "upload", train]).ok();
    assert!(
        up.stdout.contains("status:") && up.stdout.contains("processed"),
        "{up:?}"
    );
    assert!(
        up.stdout.contains("examples:") && up.stdout.contains("10"),
        "{up:?}"
    );
    let file = s.tuna(&["files", "upload", train, "--json"]).ok().json();
    let id = file["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("file-"));
    assert_eq!(file["purpose"], "fine-tune");
    assert_eq!(file["filename"], "train.jsonl");

    let list = s.tuna(&["files", "list"]).ok();
    assert!(
        list.stdout.contains(&id) && list.stdout.contains("train.jsonl"),
        "{list:?}"
    );
    assert_eq!(list.stdout.lines().count(), 3, "{list:?}");
    let json = s
        .tuna(&["files", "--json", "list", "--limit", "1"])
        .ok()
        .json();
    assert_eq!(json["data"].as_array().unwrap().len(), 1);
    assert_eq!(json["has_more"], true);
    let shown = s.tuna(&["files", "show", &id]).ok();
    assert!(shown.stdout.contains(&id), "{shown:?}");

    let content = s.tuna(&["files", "content", &id]).ok();
    assert_eq!(content.stdout, std::fs::read_to_string(train).unwrap());
    let copy = s.data_dir().join("copy.jsonl");
    s.tuna(&["files", "content", &id, "--out", copy.to_str().unwrap()])
        .ok();
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(train).unwrap());

    let deleted = s.tuna(&["files", "delete", &id]).ok();
    assert_eq!(deleted.stdout.trim(), format!("deleted {id}"));
    let gone = s.tuna(&["files", "show", &id]);
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.contains("No file found"), "{gone:?}");
}

#[tokio::test]
async fn a_rejected_upload_exits_1_and_a_missing_local_file_2() {
    let s = Server::start().await;
    // A file the server rejects: exit 1 with the API's message.
    let bad = s.data_dir().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"x\"\nnot json\n").unwrap();
    let rejected = s.tuna(&["files", "upload", bad.to_str().unwrap()]);
    assert_eq!(rejected.code, 1, "{rejected:?}");
    assert!(
        rejected.stderr.contains("Invalid file format"),
        "{rejected:?}"
    );
    assert!(rejected.stderr.contains("HTTP 400"), "{rejected:?}");
    // A local file that does not exist: usage error.
    let nofile = s.tuna(&["files", "upload", "/nonexistent/x.jsonl"]);
    assert_eq!(nofile.code, 2, "{nofile:?}");
}

#[tokio::test]
async fn keys_urls_and_flags() {
    let s = Server::start().await;
    // Keys: --api-key wins over the admin key file; a wrong one is an API error (401).
    let wrong = s.tuna(&["files", "list", "--api-key", "tuna-sk-wrong"]);
    assert_eq!(wrong.code, 1);
    assert!(wrong.stderr.contains("Incorrect API key"), "{wrong:?}");
    let wrong_env = s.tuna_env(&["models", "list"], &[("TUNA_API_KEY", "tuna-sk-wrong")]);
    assert_eq!(wrong_env.code, 1, "{wrong_env:?}");
    let no_key = s.tuna_env(&["files", "list"], &[("TUNA_DATA_DIR", "/nonexistent")]);
    assert_eq!(no_key.code, 1);
    assert!(
        no_key.stderr.contains("didn't provide an API key"),
        "{no_key:?}"
    );
    // No server there.
    let down = s.tuna(&["files", "list", "--url", "http://127.0.0.1:9"]);
    assert_eq!(down.code, 1);
    assert!(
        down.stderr.contains("cannot reach the tuna server"),
        "{down:?}"
    );
    let bad_url = s.tuna(&["files", "list", "--url", "ftp://x"]);
    assert_eq!(bad_url.code, 2, "{bad_url:?}");
    // Unknown flags: clap's usage error.
    assert_eq!(s.tuna(&["files", "list", "--bogus"]).code, 2);
}

#[tokio::test]
async fn jobs_create_from_flags_and_show() {
    let s = Server::start().await;
    let (file_id, _) = upload_training_file(&s);
    let job = create_job(
        &s,
        &file_id,
        &[
            "--task",
            "causal_lm",
            "--epochs",
            "2",
            "--batch-size",
            "2",
            "--learning-rate",
            "0.0005",
            "--lora-r",
            "4",
            "--suffix",
            "cli",
            "--seed",
            "7",
            "--metadata",
            "team=nlp",
            "--set",
            "warmup_ratio=0.1",
        ],
    );
    let id = job["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ftjob-"), "{job}");
    assert_eq!(job["seed"], 7);
    assert_eq!(job["hyperparameters"]["n_epochs"], 2);
    assert_eq!(job["hyperparameters"]["batch_size"], 2);
    assert_eq!(job["method"]["supervised"]["hyperparameters"]["lora_r"], 4);
    assert_eq!(job["metadata"]["team"], "nlp");
    assert_eq!(job["user_provided_suffix"], "cli");
    s.wait_status(&id, "queued");

    let shown = s.tuna(&["jobs", "show", &id]).ok();
    for want in [
        "status:",
        "queued",
        "model:",
        "gpt2",
        "seed:",
        "7",
        "n_epochs=2",
        "team=nlp",
    ] {
        assert!(shown.stdout.contains(want), "{want}: {shown:?}");
    }
}

#[tokio::test]
async fn jobs_create_from_a_job_file_uploads_its_local_training_file() {
    let s = Server::start().await;
    let (file_id, train) = upload_training_file(&s);
    // The training file given as a local path (uploaded first); flags override the file.
    let job_file = s.data_dir().join("job.yaml");
    std::fs::write(
        &job_file,
        format!(
            "model: gpt2\ntraining_file: {}\nsuffix: from-file\nmethod:\n  type: supervised\n  supervised:\n    hyperparameters:\n      n_epochs: 3\n",
            train.display()
        ),
    )
    .unwrap();
    let created = s
        .tuna(&[
            "jobs",
            "create",
            "-f",
            job_file.to_str().unwrap(),
            "--seed",
            "11",
        ])
        .ok();
    assert!(created.stderr.contains("uploaded"), "{created:?}");
    let id = created
        .stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(created.stdout.starts_with("created ftjob-"), "{created:?}");
    let job = s.wait_status(&id, "queued");
    assert_eq!(job["seed"], 11);
    assert_eq!(job["hyperparameters"]["n_epochs"], 3);
    assert_eq!(job["user_provided_suffix"], "from-file");
    assert_ne!(job["training_file"], file_id.as_str());

    // --dry-run prints the body without sending it.
    let dry = s
        .tuna(&[
            "jobs",
            "create",
            "--model",
            "m",
            "--dataset-url",
            "s3://b/k",
            "--dry-run",
        ])
        .ok()
        .json();
    assert_eq!(
        dry,
        serde_json::json!({"model": "m", "dataset_url": "s3://b/k"})
    );
}

#[tokio::test]
async fn jobs_list_pages_and_filters() {
    let s = Server::start().await;
    let (file_id, _) = upload_training_file(&s);
    let id = queued_job(&s, &file_id, &["--metadata", "team=nlp"]);
    let id2 = queued_job(&s, &file_id, &[]);
    let list = s.tuna(&["jobs", "list"]).ok();
    assert!(
        list.stdout.contains(&id) && list.stdout.contains(&id2),
        "{list:?}"
    );
    assert!(list.stdout.lines().next().unwrap().starts_with("ID"));
    let page = s
        .tuna(&["jobs", "list", "--limit", "1", "--json"])
        .ok()
        .json();
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["has_more"], true);
    let all = s.tuna(&["jobs", "list", "--all", "--json"]).ok().json();
    assert_eq!(all["data"].as_array().unwrap().len(), 2);
    let nlp = s
        .tuna(&["jobs", "list", "--metadata", "team=nlp", "--json"])
        .ok()
        .json();
    assert_eq!(nlp["data"].as_array().unwrap().len(), 1);
    assert_eq!(nlp["data"][0]["id"], id.as_str());
}

#[tokio::test]
async fn pause_resume_events_checkpoints_and_no_download_of_a_queued_job() {
    let s = Server::start().await;
    let (file_id, _) = upload_training_file(&s);
    let id = queued_job(&s, &file_id, &[]);
    let paused = s.tuna(&["jobs", "pause", &id]).ok();
    assert_eq!(paused.stdout.trim(), format!("{id}: paused"));
    let again = s.tuna(&["jobs", "pause", &id]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("HTTP 409"), "{again:?}");
    let resumed = s.tuna(&["jobs", "resume", &id, "--json"]).ok().json();
    assert_eq!(resumed["status"], "queued");

    // Events, oldest first.
    let events = s.tuna(&["jobs", "events", &id]).ok();
    let lines: Vec<&str> = events.stdout.lines().collect();
    assert!(lines[0].contains("Created fine-tuning job"), "{events:?}");
    assert!(lines.last().unwrap().contains("Job resumed"), "{events:?}");
    assert!(events.stdout.contains("Job paused"), "{events:?}");
    let last_two = s
        .tuna(&["jobs", "events", &id, "--limit", "2", "--json"])
        .ok()
        .json();
    assert_eq!(last_two["data"].as_array().unwrap().len(), 2);
    assert!(last_two["data"][0]["message"]
        .as_str()
        .unwrap()
        .contains("resumed"));

    let ckpts = s.tuna(&["jobs", "checkpoints", &id]).ok();
    assert!(ckpts.stdout.starts_with("STEP"), "{ckpts:?}");
    assert_eq!(ckpts.stdout.lines().count(), 1);
    let ckpts = s.tuna(&["jobs", "checkpoints", &id, "--json"]).ok().json();
    assert_eq!(ckpts["data"], serde_json::json!([]));

    // A queued job has nothing to download yet.
    let dl = s.tuna(&[
        "download",
        &id,
        "--out",
        s.data_dir().join("dl").to_str().unwrap(),
    ]);
    assert_eq!(dl.code, 1, "{dl:?}");
    assert!(dl.stderr.contains("has no final model"), "{dl:?}");
    let dl = s.tuna(&["download", &id, "--checkpoint", "5"]);
    assert_eq!(dl.code, 1, "{dl:?}");
    assert!(dl.stderr.contains("no checkpoint '5'"), "{dl:?}");
}

#[tokio::test]
async fn watch_exits_3_when_the_job_is_cancelled_meanwhile() {
    let s = Server::start().await;
    let (file_id, _) = upload_training_file(&s);
    // Streamed, then polled.
    for extra in [&[][..], &["--poll"][..]] {
        let jid = queued_job(&s, &file_id, &[]);
        let mut args = vec!["jobs", "watch", jid.as_str()];
        args.extend_from_slice(extra);
        let out = std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(1500));
                s.tuna(&["jobs", "cancel", &jid]).ok();
            });
            s.tuna_limited(&args, Duration::from_secs(60))
        });
        let (stdout, stderr) = (&out.stdout, &out.stderr);
        assert_eq!(out.code, 3, "{extra:?} {out:?}");
        assert!(stdout.contains("Created fine-tuning job"), "{stdout}");
        assert!(stdout.contains("Job cancelled"), "{stdout}");
        assert!(stdout.contains(&format!("job {jid} cancelled")), "{stdout}");
        assert!(stderr.contains("was cancelled"), "{stderr}");
    }
}

#[tokio::test]
async fn watch_of_an_ended_job_returns_at_once_and_json_is_ndjson() {
    let s = Server::start().await;
    let (file_id, _) = upload_training_file(&s);
    let id = queued_job(&s, &file_id, &[]);
    s.tuna(&["jobs", "cancel", &id]).ok();
    let watched = s.tuna_limited(&["jobs", "watch", &id, "--json"], Duration::from_secs(60));
    assert_eq!(watched.code, 3, "{watched:?}");
    let docs: Vec<Value> = watched
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(docs.last().unwrap()["status"], "cancelled");
    assert!(docs
        .iter()
        .any(|d| d["object"] == "fine_tuning.job.event" && d["message"] == "Job cancelled"));
}

#[tokio::test]
async fn watch_of_a_failed_job_exits_3_with_its_error() {
    let s = Server::start().await;
    let (file_id, _) = upload_training_file(&s);
    // Validation fails: prompt/completion data cannot train a classifier. The job has no
    // model to download.
    let failing = create_job(&s, &file_id, &["--task", "sequence_classification"]);
    let fid = failing["id"].as_str().unwrap().to_string();
    let failed = s.tuna_limited(&["jobs", "watch", &fid], Duration::from_secs(60));
    assert_eq!(failed.code, 3, "{failed:?}");
    assert!(
        failed.stdout.contains(&format!("job {fid} failed")),
        "{failed:?}"
    );
    assert!(
        failed.stderr.contains(&format!("job {fid} failed: ")),
        "{failed:?}"
    );
    let shown = s.tuna(&["jobs", "show", &fid]).ok();
    assert!(shown.stdout.contains("error:"), "{shown:?}");
    let dl = s.tuna(&["download", &fid]);
    assert_eq!(dl.code, 1, "{dl:?}");
    assert!(dl.stderr.contains("it will have none"), "{dl:?}");
}

#[tokio::test]
async fn jobs_errors_exit_1_from_the_api_and_2_for_usage() {
    let s = Server::start().await;
    let (file_id, _) = upload_training_file(&s);
    let unknown = s.tuna(&["jobs", "show", "ftjob-nope"]);
    assert_eq!(unknown.code, 1);
    assert!(
        unknown.stderr.contains("No fine-tuning job found"),
        "{unknown:?}"
    );
    assert_eq!(s.tuna(&["jobs", "watch", "ftjob-nope"]).code, 1);
    let rejected = s.tuna(&[
        "jobs",
        "create",
        "--model",
        "gpt2",
        "--training-file",
        &file_id,
        "--set",
        "bogus=1",
    ]);
    assert_eq!(rejected.code, 1);
    assert!(
        rejected
            .stderr
            .contains("unrecognised request argument supplied: bogus"),
        "{rejected:?}"
    );
    let no_data = s.tuna(&["jobs", "create", "--model", "gpt2"]);
    assert_eq!(no_data.code, 2, "{no_data:?}");
    assert!(no_data.stderr.contains("needs training data"));
    let bad_set = s.tuna(&[
        "jobs",
        "create",
        "--model",
        "gpt2",
        "--training-file",
        "f",
        "--set",
        "x",
    ]);
    assert_eq!(bad_set.code, 2);
    let missing_file = s.tuna(&["jobs", "create", "-f", "/nonexistent.yaml"]);
    assert_eq!(missing_file.code, 2);
    assert_eq!(s.tuna(&["jobs", "show"]).code, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_download_a_tiny_job() {
    let trainer = tuna_worker::default_trainer_bin();
    assert!(
        trainer.is_file(),
        "{} is missing: build it with `cargo build -p tuna-train`",
        trainer.display()
    );
    let s = Server::start_with(&["--worker-device", "cpu"]).await;
    let train = s.data_dir().join("train.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| serde_json::json!({"prompt": format!("Count {i}:"), "completion": format!(" {} {}", i + 1, i + 2)}).to_string())
        .collect();
    std::fs::write(&train, lines.join("\n") + "\n").unwrap();
    let created = s
        .tuna(&[
            "jobs",
            "create",
            "--model",
            "gpt2",
            "--training-file",
            train.to_str().unwrap(),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--suffix",
            "tiny",
            "--set",
            "checkpoint_interval=4",
            "--set",
            "log_interval=1",
            "--set",
            "max_seq_length=32",
            "--json",
        ])
        .ok()
        .json();
    let id = created["id"].as_str().unwrap().to_string();

    // Follows the job to the end: events, then the outcome and the final metrics.
    let watched = s.tuna_limited(&["jobs", "watch", &id], Duration::from_secs(300));
    assert_eq!(watched.code, 0, "{watched:#?}");
    let out = &watched.stdout;
    assert!(out.contains("Step 1/8"), "{out}");
    assert!(out.contains("Checkpoint saved at step 4"), "{out}");
    assert!(out.contains(&format!("job {id} succeeded")), "{out}");
    assert!(out.contains("fine-tuned model: ft:gpt2:"), "{out}");
    assert!(
        out.contains("final metrics: ") && out.contains("train_loss="),
        "{out}"
    );
    let job = s.tuna(&["jobs", "show", &id, "--json"]).ok().json();
    assert_eq!(job["status"], "succeeded");
    let model = job["fine_tuned_model"].as_str().unwrap().to_string();
    let models = s.tuna(&["models", "list"]).ok();
    assert!(models.stdout.contains(&model), "{models:?}");

    let ckpts = s.tuna(&["jobs", "checkpoints", &id, "--json"]).ok().json();
    let steps: Vec<i64> = ckpts["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step_number"].as_i64().unwrap())
        .collect();
    assert!(steps.contains(&4), "{ckpts}");

    // Download the final model; every file matches the listing's sha256.
    let dir = s.data_dir().join("model");
    let dl = s
        .tuna(&["download", &id, "--out", dir.to_str().unwrap(), "--json"])
        .ok()
        .json();
    let files = dl["data"].as_array().unwrap().clone();
    assert!(files.iter().any(|f| f["path"] == "config.json"), "{dl}");
    let sha = |p: &Path| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
    };
    for f in &files {
        let p = dir.join(f["path"].as_str().unwrap());
        assert_eq!(sha(&p), f["sha256"].as_str().unwrap(), "{}", p.display());
    }
    // Resume: the biggest file cut in half and left as `.part` is completed with a range
    // request; the others are skipped.
    let big = files
        .iter()
        .max_by_key(|f| f["bytes"].as_u64().unwrap())
        .unwrap();
    let big_path = dir.join(big["path"].as_str().unwrap());
    let bytes = std::fs::read(&big_path).unwrap();
    let part = PathBuf::from(format!("{}.part", big_path.display()));
    std::fs::remove_file(&big_path).unwrap();
    std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    let again = s
        .tuna(&["download", &id, "--out", dir.to_str().unwrap()])
        .ok();
    let skipped = files.len() - 1;
    assert!(
        again.stdout.contains(&format!("{skipped} already present")),
        "{again:?}"
    );
    assert_eq!(std::fs::read(&big_path).unwrap(), bytes);
    assert!(!part.exists());
    // A corrupt partial file fails the sha256 check (exit 1) and is removed; the next run
    // fetches the file whole.
    std::fs::remove_file(&big_path).unwrap();
    std::fs::write(&part, vec![b'x'; bytes.len() / 2]).unwrap();
    let bad = s.tuna(&["download", &id, "--out", dir.to_str().unwrap()]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("sha256 mismatch"), "{bad:?}");
    assert!(!part.exists());
    s.tuna(&["download", &id, "--out", dir.to_str().unwrap()])
        .ok();
    assert_eq!(std::fs::read(&big_path).unwrap(), bytes);

    // A checkpoint, by step, into the default directory name.
    let ck = s
        .tuna(&["download", &id, "--checkpoint", "4", "--json"])
        .ok()
        .json();
    assert_eq!(ck["directory"], format!("{id}-step-4"));
    assert!(!ck["data"].as_array().unwrap().is_empty());
    assert!(s
        .data_dir()
        .join(format!("{id}-step-4/config.json"))
        .is_file());
}
