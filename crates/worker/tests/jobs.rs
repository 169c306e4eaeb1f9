//! End-to-end: real Postgres (TestDb), the real `tuna-trainer` child, tiny gpt2/bert fixtures,
//! a local or S3 (moto) artifact store.

mod common;

use std::time::{Duration, Instant};

use common::{cls_data, gpt2_data, Env, ORG};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tuna_core::status::JobStatus;
use tuna_db::queue::{self, EventKind, Lease, Level};
use tuna_store::testing::Moto;
use tuna_store::Store;
use tuna_worker::{Outcome, Worker};

const LONG: Duration = Duration::from_secs(240);

async fn run_once(env: &Env, name: &str) -> Outcome {
    env.worker(name).try_run_one().await.expect("worker step")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_lm_job_succeeds_and_its_model_is_a_base_for_the_next_job() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(32)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "suffix": "first",
            "hyperparameters": {"n_epochs": 2, "batch_size": 8},
            "max_seq_length": 32, "checkpoint_interval": 4, "log_interval": 1, "validation_split": 0.25}))
        .await;
    let out = run_once(&env, "a").await;
    let job = env.job(&job_id).await;
    assert_eq!(
        out,
        Outcome::Finished {
            job_id: job_id.clone(),
            status: JobStatus::Succeeded
        },
        "{:?}",
        job.error
    );

    // Events: phases, metrics for every step, checkpoints, completion.
    let events = env.events(&job_id).await;
    let msgs: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    for phase in [
        "downloading",
        "validating",
        "loading_model",
        "training",
        "saving",
        "uploading",
    ] {
        assert!(
            events.iter().any(|e| e
                .data
                .as_ref()
                .and_then(|d| d.get("phase"))
                .and_then(|p| p.as_str())
                == Some(phase)),
            "no {phase} phase in {msgs:?}"
        );
    }
    let metrics: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "metrics" && e.data.as_ref().unwrap().get("train_loss").is_some())
        .collect();
    assert!(!metrics.is_empty());
    let d = metrics[0].data.as_ref().unwrap();
    for k in ["step", "train_loss", "learning_rate", "tokens_per_second"] {
        assert!(d.get(k).is_some(), "metrics data lacks {k}: {d}");
    }
    assert!(d.get("train_mean_token_accuracy").is_some(), "{d}");
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("Checkpoint saved at step 4")),
        "{msgs:?}"
    );
    assert!(msgs.contains(&"The job has successfully completed"));

    // The job row.
    let model = job.fine_tuned_model.clone().expect("fine_tuned_model");
    assert!(model.starts_with("ft:gpt2-tiny:org-test:first:"), "{model}");
    assert!(job.trained_tokens.unwrap() > 0);
    let progress = job.progress.clone().expect("progress");
    assert!(progress["total_steps"].as_i64().unwrap() > 0, "{progress}");
    assert!(progress["percent"].as_f64().unwrap() > 0.0, "{progress}");

    // Checkpoints recorded with metrics, stored under the job's prefix.
    let ckpts: Vec<(i64, serde_json::Value, String)> =
        sqlx::query_as("select step_number, metrics, artifact_prefix from checkpoints where job_id = $1 order by step_number")
            .bind(&job_id)
            .fetch_all(env.pool())
            .await
            .unwrap();
    assert!(!ckpts.is_empty());
    for (step, _metrics, prefix) in &ckpts {
        assert_eq!(prefix, &format!("jobs/{job_id}/checkpoints/step-{step}"));
        assert!(!env.store.list(prefix).await.unwrap().is_empty());
    }
    // The final model in the store and in the models table.
    let final_files = env
        .store
        .list(&format!("jobs/{job_id}/final"))
        .await
        .unwrap();
    let names: Vec<&str> = final_files
        .iter()
        .map(|o| o.key.rsplit('/').next().unwrap())
        .collect();
    assert!(
        names.contains(&"config.json") && names.contains(&"model.safetensors"),
        "{names:?}"
    );
    let (kind, org, loc): (String, Option<String>, String) =
        sqlx::query_as("select kind, organization_id, location from models where model_id = $1")
            .bind(&model)
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(
        (kind.as_str(), org.as_deref(), loc.as_str()),
        (
            "fine_tuned",
            Some(ORG),
            format!("jobs/{job_id}/final").as_str()
        )
    );

    // The results CSV.
    let rf = job.result_files.as_array().unwrap();
    assert_eq!(rf.len(), 1);
    let (purpose, key): (String, String) =
        sqlx::query_as("select purpose, storage_key from files where file_id = $1")
            .bind(rf[0].as_str().unwrap())
            .fetch_one(env.pool())
            .await
            .unwrap();
    assert_eq!(purpose, "fine-tune-results");
    let csv = String::from_utf8(env.store.get_bytes(&key).await.unwrap().to_vec()).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy")
    );
    assert!(lines.count() >= metrics.len().min(2), "{csv}");
    assert!(
        csv.lines()
            .skip(1)
            .any(|l| !l.split(',').nth(3).unwrap_or("").is_empty()),
        "no validation loss: {csv}"
    );

    // A later job trains on top of the fine-tuned model.
    let job2 = env
        .create_job(json!({"model": model, "training_file": file, "hyperparameters": {"n_epochs": 1, "batch_size": 8},
            "max_seq_length": 32, "max_steps": 2}))
        .await;
    let out = run_once(&env, "b").await;
    let j2 = env.job(&job2).await;
    assert_eq!(
        out,
        Outcome::Finished {
            job_id: job2.clone(),
            status: JobStatus::Succeeded
        },
        "{:?}",
        j2.error
    );
    assert!(j2
        .fine_tuned_model
        .unwrap()
        .starts_with(&format!("ft:{model}:")));
    assert_eq!(run_once(&env, "b").await, Outcome::Idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_job_on_bert_with_s3_dataset_and_artifacts_on_moto() {
    let moto = Moto::start().expect("moto_server");
    moto.create_bucket("tuna").unwrap();
    moto.create_bucket("datasets").unwrap();
    let store = Store::s3("tuna", "artifacts", &moto.settings()).unwrap();
    let env = Env::new(Some(store)).await;
    Store::s3("datasets", "", &moto.settings())
        .unwrap()
        .put_bytes("sst/train.jsonl", cls_data(32))
        .await
        .unwrap();
    let job_id = env
        .create_job(
            json!({"model": "bert-tiny", "dataset_url": "s3://datasets/sst/train.jsonl",
            "task": "sequence_classification", "hyperparameters": {"n_epochs": 2, "batch_size": 8},
            "max_seq_length": 32, "checkpoint_interval": 4, "log_interval": 1}),
        )
        .await;
    let mut cfg = env.config("s3");
    cfg.s3 = moto.settings();
    let out = tuna_worker::Worker::new(env.pool().clone(), cfg)
        .try_run_one()
        .await
        .unwrap();
    let job = env.job(&job_id).await;
    assert_eq!(
        out,
        Outcome::Finished {
            job_id: job_id.clone(),
            status: JobStatus::Succeeded
        },
        "{:?}",
        job.error
    );
    let metrics = env.metric_events(&job_id).await;
    assert!(
        metrics
            .iter()
            .any(|e| e.data.as_ref().unwrap().get("train_accuracy").is_some()),
        "no train_accuracy"
    );
    let ck: i64 = sqlx::query_scalar("select count(*) from checkpoints where job_id = $1")
        .bind(&job_id)
        .fetch_one(env.pool())
        .await
        .unwrap();
    assert!(ck >= 1);
    // Artifacts are in the S3 bucket, under the store's prefix.
    let raw = Store::s3("tuna", "", &moto.settings()).unwrap();
    let objs = raw
        .list(&format!("artifacts/jobs/{job_id}/final"))
        .await
        .unwrap();
    assert!(
        objs.iter()
            .any(|o| o.key.ends_with("/model.safetensors") && o.size > 0),
        "{objs:?}"
    );
    assert!(!raw
        .list(&format!("artifacts/jobs/{job_id}/checkpoints"))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_run_stops_within_10_seconds() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(256)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "hyperparameters": {"n_epochs": 50, "batch_size": 4},
            "max_seq_length": 32, "checkpoint_interval": 100000, "log_interval": 1}))
        .await;
    let token = CancellationToken::new();
    let worker = tokio::spawn(env.worker("c").run(token.clone()));
    env.wait_metrics(&job_id, 2, LONG).await;
    let t0 = Instant::now();
    queue::request_cancel(env.pool(), ORG, &job_id)
        .await
        .unwrap();
    let job = env
        .wait_job(&job_id, Duration::from_secs(10), |j| {
            j.status != JobStatus::Running
        })
        .await;
    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(job.lease_token.is_none() && job.finished_at.is_some());
    // The child is gone (no trainer left with this job's directory on its command line).
    assert!(trainer_pids(&job_id).is_empty());
    token.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_then_resume_continues_from_the_checkpoint() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(32)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "hyperparameters": {"n_epochs": 40, "batch_size": 4},
            "max_seq_length": 32, "checkpoint_interval": 100000, "log_interval": 1, "max_steps": 200}))
        .await;
    let token = CancellationToken::new();
    let worker = tokio::spawn(env.worker("p").run(token.clone()));
    env.wait_metrics(&job_id, 3, LONG).await;
    queue::request_pause(env.pool(), ORG, &job_id)
        .await
        .unwrap();
    let job = env
        .wait_job(&job_id, Duration::from_secs(60), |j| {
            j.status != JobStatus::Running
        })
        .await;
    assert_eq!(job.status, JobStatus::Paused, "{:?}", job.error);
    let step = job.checkpoint_step.expect("a pause checkpoint");
    assert!(step >= 3);
    let paused_metrics = env.metric_events(&job_id).await.len();

    queue::resume(env.pool(), ORG, &job_id).await.unwrap();
    let job = env
        .wait_job(&job_id, LONG, |j| {
            ["succeeded", "failed"].contains(&j.status.as_str())
        })
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
    let events = env.events(&job_id).await;
    assert!(events.iter().any(|e| e
        .message
        .contains(&format!("Training resumes from checkpoint step {step}"))));
    // After the resume, training steps continue after the checkpoint's step.
    let after: Vec<i64> = env.metric_events(&job_id).await[paused_metrics..]
        .iter()
        .filter_map(|e| {
            e.data
                .as_ref()
                .unwrap()
                .get("train_loss")
                .and(e.data.as_ref().unwrap()["step"].as_i64())
        })
        .collect();
    assert!(
        !after.is_empty() && after[0] > step,
        "steps after resume: {after:?} (checkpoint {step})"
    );
    assert_eq!(*after.last().unwrap(), 200);
    token.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_its_job_to_another_worker_which_resumes_from_the_checkpoint() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(32)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "hyperparameters": {"n_epochs": 40, "batch_size": 4},
            "max_seq_length": 32, "checkpoint_interval": 5, "log_interval": 1, "max_steps": 60}))
        .await;
    let mut cfg = env.config("dead");
    cfg.lease_ttl = Duration::from_secs(3);
    let dead = tokio::spawn(
        tuna_worker::Worker::new(env.pool().clone(), cfg).run(CancellationToken::new()),
    );
    let job = env
        .wait_job(&job_id, LONG, |j| j.checkpoint_step.is_some())
        .await;
    let old = Lease {
        job_id: job_id.clone(),
        token: job.lease_token.unwrap(),
        worker_id: job.lease_owner.clone().unwrap(),
    };
    // "SIGKILL" the worker: its future is dropped mid-job (the child is killed with it) and it
    // never writes again.
    dead.abort();
    let _ = dead.await;
    let t0 = Instant::now();
    while !trainer_pids(&job_id).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the trainer outlived its worker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ckpt = env.job(&job_id).await.checkpoint_step.unwrap();

    let token = CancellationToken::new();
    let second = tokio::spawn(env.worker("second").run(token.clone()));
    let job = env
        .wait_job(&job_id, LONG, |j| {
            ["succeeded", "failed"].contains(&j.status.as_str())
        })
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
    assert_eq!(job.infra_retries, 1);
    let msgs = assert_resumed_after_lost_worker(&env, &job_id, "worker-dead", ckpt, &old).await;
    assert!(
        msgs.iter()
            .any(|m| m.contains(&format!("resuming from checkpoint step {ckpt}"))),
        "{msgs:?}"
    );
    let late = queue::heartbeat(env.pool(), &old, Duration::from_secs(60), None, None).await;
    assert!(
        matches!(late, Err(queue::QueueError::LeaseLost { .. })),
        "{late:?}"
    );
    let late = queue::complete(env.pool(), &old, &Default::default()).await;
    assert!(
        matches!(late, Err(queue::QueueError::LeaseLost { .. })),
        "{late:?}"
    );
    token.cancel();
    second.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_with_a_bad_line_fails_with_its_line_number() {
    let env = Env::new(None).await;
    let mut data = gpt2_data(4);
    data.extend_from_slice(b"{\"prompt\": \"x\", \"completion\": \n");
    data.extend_from_slice(&gpt2_data(2));
    let file = env.upload("train.jsonl", &data).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file}))
        .await;
    let out = run_once(&env, "bad").await;
    assert_eq!(
        out,
        Outcome::Finished {
            job_id: job_id.clone(),
            status: JobStatus::Failed
        }
    );
    let err = env.job(&job_id).await.error.unwrap();
    assert_eq!(err["code"], "invalid_data");
    assert_eq!(err["param"], "training_file");
    assert!(err["message"].as_str().unwrap().contains("line 5"), "{err}");
}

/// The config of fixture `name`, as the memory planner reads it.
fn fixture_config(name: &str) -> tuna_core::hf_config::HfConfig {
    let path = common::workspace()
        .join(".fixtures")
        .join(name)
        .join("config.json");
    tuna_core::hf_config::HfConfig::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// One job run by a worker that lets a job use `limit` bytes (`--memory-limit-mb`).
async fn run_with_memory_limit(env: &Env, limit: u64) -> Outcome {
    let mut cfg = env.config("small");
    cfg.memory_limit = Some(limit);
    Worker::new(env.pool().clone(), cfg)
        .try_run_one()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_size_auto_trains_in_smaller_micro_batches_where_the_batch_does_not_fit() {
    use tuna_core::memory::{estimate_with, Accelerator};
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(16)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file,
                           "gradient_checkpointing": false,
                           "hyperparameters": {"n_epochs": 1, "batch_size": "auto"}}))
        .await;
    // Room for micro-batches of 2, not 3: the planner's own figures for this job (checkpointing
    // off, so that only the micro-batch can change).
    let job = env.job(&job_id).await;
    let spec = job.spec.get().unwrap();
    assert_eq!((spec.batch_size, spec.gradient_accumulation_steps), (8, 1));
    let hf = fixture_config("gpt2");
    let at = |m| estimate_with(&hf, spec, Accelerator::Cpu, m).total_bytes;
    let out = run_with_memory_limit(&env, (at(2) + at(3)) / 2).await;
    assert_eq!(
        out,
        Outcome::Finished {
            job_id: job_id.clone(),
            status: JobStatus::Succeeded
        }
    );
    let events = env.events(&job_id).await;
    let fitted = events
        .iter()
        .find(|e| e.message.starts_with("batch_size auto: "))
        .expect("an event saying how the batch was split");
    assert!(
        fitted.message.starts_with(
            "batch_size auto: micro-batches of 2 instead of 8 (gradient_accumulation_steps 4, the same batch of 8) to fit the CPU (limited by --memory-limit-mb)"
        ),
        "{}",
        fitted.message
    );
    assert_eq!(fitted.data.as_ref().unwrap()["micro_batch"], 2);
    // The same optimiser steps as one batch of 8 per step: 16 examples less the validation
    // split, one epoch.
    let total = env.job(&job_id).await.progress.unwrap()["total_steps"]
        .as_i64()
        .unwrap();
    assert_eq!(total, 2, "{total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradient_checkpointing_auto_turns_on_where_the_activations_do_not_fit() {
    use tuna_core::memory::{estimate, Accelerator};
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(16)).await;
    let job_id = env
        .create_job(json!({"model": "llama-tiny", "training_file": file,
                           "hyperparameters": {"n_epochs": 1, "batch_size": 8}}))
        .await;
    let job = env.job(&job_id).await;
    let spec = job.spec.get().unwrap();
    assert_eq!(spec.gradient_checkpointing, None);
    let hf = fixture_config("llama");
    let mut on = spec.clone();
    on.gradient_checkpointing = Some(true);
    let (with, without) = (
        estimate(&hf, &on, Accelerator::Cpu).total_bytes,
        estimate(&hf, spec, Accelerator::Cpu).total_bytes,
    );
    assert!(with < without, "{with} {without}");
    let out = run_with_memory_limit(&env, (with + without) / 2).await;
    assert_eq!(
        out,
        Outcome::Finished {
            job_id: job_id.clone(),
            status: JobStatus::Succeeded
        }
    );
    let events = env.events(&job_id).await;
    let fitted = events
        .iter()
        .find(|e| {
            e.message
                .starts_with("gradient_checkpointing auto: on to fit the CPU")
        })
        .unwrap_or_else(|| {
            panic!(
                "{:?}",
                events.iter().map(|e| &e.message).collect::<Vec<_>>()
            )
        });
    // The batch size was given: its micro-batches stay as they are.
    let data = fitted.data.as_ref().unwrap();
    assert_eq!(
        (
            data["gradient_checkpointing"].as_bool(),
            data["micro_batch"].as_u64()
        ),
        (Some(true), Some(8))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_too_big_for_the_device_fails_before_training_with_what_would_fit() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(8)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file}))
        .await;
    // Less than libtorch itself needs: no job fits, and none is started.
    let out = run_with_memory_limit(&env, 200 << 20).await;
    assert_eq!(
        out,
        Outcome::Finished {
            job_id: job_id.clone(),
            status: JobStatus::Failed
        }
    );
    let err = env.job(&job_id).await.error.unwrap();
    assert_eq!(err["code"], "insufficient_memory", "{err}");
    assert_eq!(err["param"], "batch_size");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.starts_with("The job needs about "), "{msg}");
    assert!(
        msg.contains("but the CPU (limited by --memory-limit-mb) has 0.2 GiB"),
        "{msg}"
    );
    assert!(
        msg.contains("use a smaller model or a device with more memory"),
        "{msg}"
    );
    // The trainer never started: no event of its phases.
    let events = env.events(&job_id).await;
    assert!(
        !events
            .iter()
            .any(|e| e.message.starts_with("Loading the base model")),
        "{events:?}"
    );
    assert!(events
        .iter()
        .any(|e| e.message.starts_with("The job needs about")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_dataset_url_fails_with_a_clear_error() {
    let env = Env::new(None).await;
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/train.jsonl");
    // By default a dataset URL may not reach the worker's own network.
    for (host_url, addr) in [
        (url.clone(), "127.0.0.1"),
        (
            "http://169.254.169.254/latest/meta-data".to_string(),
            "169.254.169.254",
        ),
        (format!("http://localhost:{port}/train.jsonl"), "localhost"),
    ] {
        let job_id = env
            .create_job(json!({"model": "gpt2-tiny", "dataset_url": host_url}))
            .await;
        run_once(&env, "url").await;
        let err = env.job(&job_id).await.error.unwrap();
        assert_eq!(err["code"], "dataset_download_failed", "{err}");
        let msg = err["message"].as_str().unwrap();
        assert!(
            msg.contains(addr)
                && msg.contains("non-public address")
                && msg.contains("--allow-private-urls"),
            "{msg}"
        );
    }
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "dataset_url": url}))
        .await;
    let mut cfg = env.config("url");
    cfg.fetch.allow_private_urls = true;
    let out = tuna_worker::Worker::new(env.pool().clone(), cfg)
        .try_run_one()
        .await
        .expect("worker step");
    assert_eq!(
        out,
        Outcome::Finished {
            job_id: job_id.clone(),
            status: JobStatus::Failed
        }
    );
    let err = env.job(&job_id).await.error.unwrap();
    assert_eq!(err["code"], "dataset_download_failed");
    assert_eq!(err["param"], "dataset_url");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains(&url) && msg.contains("cannot connect"),
        "{msg}"
    );

    // An unknown model names the parameter too.
    let file = env.upload("train.jsonl", &gpt2_data(4)).await;
    let job_id = env
        .create_job(json!({"model": "no-such-model", "training_file": file}))
        .await;
    run_once(&env, "url").await;
    let err = env.job(&job_id).await.error.unwrap();
    assert_eq!(
        (err["code"].as_str(), err["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );
}

/// A long job on a worker with `cfg`: once the trainer has logged its first step, sends it
/// `signal` and waits for the job to leave `running`. Returns the job, the training file (for a
/// next job) and the still running worker.
async fn signal_the_trainer_mid_job(
    env: &Env,
    cfg: tuna_worker::WorkerConfig,
    signal: nix::sys::signal::Signal,
) -> (
    tuna_db::rows::JobRow,
    String,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), tuna_worker::WorkerError>>,
) {
    let file = env.upload("train.jsonl", &gpt2_data(256)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "hyperparameters": {"n_epochs": 50, "batch_size": 4},
            "max_seq_length": 32, "checkpoint_interval": 100000, "log_interval": 1}))
        .await;
    let token = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(env.pool().clone(), cfg).run(token.clone()));
    env.wait_metrics(&job_id, 1, LONG).await;
    let pids = trainer_pids(&job_id);
    assert_eq!(pids.len(), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), signal).unwrap();
    let job = env
        .wait_job(&job_id, Duration::from_secs(30), |j| {
            j.status != JobStatus::Running
        })
        .await;
    (job, file, token, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_trainer_fails_its_job_and_the_worker_goes_on() {
    let env = Env::new(None).await;
    let (job, file, token, worker) =
        signal_the_trainer_mid_job(&env, env.config("crash"), nix::sys::signal::Signal::SIGABRT)
            .await;
    assert_eq!(job.status, JobStatus::Failed);
    let err = job.error.unwrap();
    assert_eq!(err["code"], "trainer_crashed");
    assert!(
        err["message"].as_str().unwrap().contains("SIGABRT"),
        "{err}"
    );

    // The same worker runs the next job.
    let next = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "hyperparameters": {"n_epochs": 1, "batch_size": 8},
            "max_seq_length": 32, "max_steps": 2}))
        .await;
    let job = env
        .wait_job(&next, LONG, |j| {
            ["succeeded", "failed"].contains(&j.status.as_str())
        })
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
    token.cancel();
    worker.await.unwrap().unwrap();
}

/// Pids of trainer processes whose command line mentions the job.
fn trainer_pids(job_id: &str) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("tuna-trainer") && cmd.contains(job_id) {
            // Zombies (already exited, not yet reaped) do not count.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            if !stat.contains(") Z ") {
                out.push(pid);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_without_notifications_is_seen_at_the_next_heartbeat() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(256)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "hyperparameters": {"n_epochs": 50, "batch_size": 4},
            "max_seq_length": 32, "checkpoint_interval": 100000, "log_interval": 1}))
        .await;
    // try_run_one has no LISTEN connection: only the heartbeat reports the request.
    let mut w = env.worker("hb");
    let run = tokio::spawn(async move { w.try_run_one().await });
    env.wait_metrics(&job_id, 2, LONG).await;
    let t0 = Instant::now();
    queue::request_cancel(env.pool(), ORG, &job_id)
        .await
        .unwrap();
    let out = run.await.unwrap().unwrap();
    assert_eq!(
        out,
        Outcome::Finished {
            job_id: job_id.clone(),
            status: JobStatus::Cancelled
        }
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_kills_the_trainer_and_stops_all_writes() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(256)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "hyperparameters": {"n_epochs": 50, "batch_size": 4},
            "max_seq_length": 32, "checkpoint_interval": 100000, "log_interval": 1}))
        .await;
    let mut w = env.worker("lose");
    let run = tokio::spawn(async move { w.try_run_one().await });
    env.wait_metrics(&job_id, 2, LONG).await;
    // Another worker took the job over (as after a rescue and a new claim): a new token.
    sqlx::query(
        "update jobs set lease_token = gen_random_uuid(), lease_owner = null where job_id = $1",
    )
    .bind(&job_id)
    .execute(env.pool())
    .await
    .unwrap();
    let t0 = Instant::now();
    let out = run.await.unwrap().unwrap();
    assert_eq!(
        out,
        Outcome::LeaseLost {
            job_id: job_id.clone()
        }
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(trainer_pids(&job_id).is_empty());
    let n = env.events(&job_id).await.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.events(&job_id).await.len(),
        n,
        "writes after the lease was lost"
    );
    assert_eq!(env.job(&job_id).await.status, JobStatus::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_checkpoints_and_releases_the_job() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(256)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "hyperparameters": {"n_epochs": 50, "batch_size": 4},
            "max_seq_length": 32, "checkpoint_interval": 100000, "log_interval": 1}))
        .await;
    let token = CancellationToken::new();
    let worker = tokio::spawn(env.worker("stop").run(token.clone()));
    env.wait_metrics(&job_id, 3, LONG).await;
    token.cancel();
    worker.await.unwrap().unwrap();
    let job = env.job(&job_id).await;
    assert_eq!(job.status, JobStatus::Queued);
    assert!(job.checkpoint_step.unwrap() >= 3);
    assert!(job.lease_token.is_none());
    assert!(env
        .events(&job_id)
        .await
        .iter()
        .any(|e| e.message.contains("released the job")));
    assert!(trainer_pids(&job_id).is_empty());
}

/// The `tuna` binary (`target/<profile>/tuna`, built by `cargo build -p tuna`).
fn tuna_bin() -> std::path::PathBuf {
    let p = common::trainer_bin().with_file_name("tuna");
    assert!(
        p.is_file(),
        "{} is missing: build it first with `cargo build -p tuna`",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_tuna_worker_process_loses_its_job_which_another_worker_resumes() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(32)).await;
    let job_id = env
        .create_job(json!({"model": "gpt2-tiny", "training_file": file, "hyperparameters": {"n_epochs": 40, "batch_size": 4},
            "max_seq_length": 32, "checkpoint_interval": 5, "log_interval": 1, "max_steps": 150}))
        .await;
    let data_dir = env.dir.path().join("proc");
    let mut proc = std::process::Command::new(tuna_bin())
        .arg("worker")
        .args(["--database-url", &env.db.url])
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--store")
        .arg(env.dir.path().join("store"))
        .arg("--trainer-bin")
        .arg(common::trainer_bin())
        .args([
            "--device",
            "cpu",
            "--worker-id",
            "worker-proc",
            "--lease-ttl-secs",
            "5",
        ])
        .args([
            "--heartbeat-secs",
            "1",
            "--poll-secs",
            "1",
            "--threads",
            "1",
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let job = env
        .wait_job(&job_id, LONG, |j| j.checkpoint_step.is_some())
        .await;
    assert_eq!(job.lease_owner.as_deref(), Some("worker-proc"));
    let old = Lease {
        job_id: job_id.clone(),
        token: job.lease_token.unwrap(),
        worker_id: "worker-proc".into(),
    };
    proc.kill().unwrap(); // SIGKILL
    proc.wait().unwrap();
    // Its trainer sees stdin close and stops at once.
    let t0 = Instant::now();
    while !trainer_pids(&job_id).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the trainer outlived its killed worker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ckpt = env.job(&job_id).await.checkpoint_step.unwrap();

    let token = CancellationToken::new();
    let second = tokio::spawn(env.worker("after-kill").run(token.clone()));
    let job = env
        .wait_job(&job_id, LONG, |j| {
            ["succeeded", "failed"].contains(&j.status.as_str())
        })
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
    assert_resumed_after_lost_worker(&env, &job_id, "worker-proc", ckpt, &old).await;
    token.cancel();
    second.await.unwrap().unwrap();
}

/// A job whose worker died: its events say the dead worker stopped renewing its lease and that
/// training resumed from checkpoint `ckpt`, and the dead lease's late writes are refused.
/// Returns the job's event messages.
async fn assert_resumed_after_lost_worker(
    env: &Env,
    job_id: &str,
    dead_worker: &str,
    ckpt: i64,
    old: &Lease,
) -> Vec<String> {
    let msgs: Vec<String> = env
        .events(job_id)
        .await
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains(&format!("{dead_worker} stopped renewing its lease"))),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains(&format!("Training resumes from checkpoint step {ckpt}"))),
        "{msgs:?}"
    );
    let late = queue::append_event(
        env.pool(),
        old,
        Level::Info,
        "late",
        None,
        EventKind::Message,
    )
    .await;
    assert!(
        matches!(late, Err(queue::QueueError::LeaseLost { .. })),
        "{late:?}"
    );
    msgs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_trainer_is_stopped_and_its_job_fails_as_stalled() {
    let env = Env::new(None).await;
    let mut cfg = env.config("stall");
    cfg.stall_timeout = Some(Duration::from_secs(3));
    // A stopped process neither prints nor exits: what a deadlocked trainer looks like.
    let (job, _, token, worker) =
        signal_the_trainer_mid_job(&env, cfg, nix::sys::signal::Signal::SIGSTOP).await;
    assert_eq!(job.status, JobStatus::Failed);
    let err = job.error.unwrap();
    assert_eq!(err["code"], "trainer_stalled", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("--stall-timeout-secs"),
        "{err}"
    );
    assert!(
        trainer_pids(&job.job_id).is_empty(),
        "the hung trainer was killed"
    );
    token.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_lora_model_is_a_base_for_the_next_job_an_adapter_alone_is_refused_clearly() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(16)).await;
    let lora = |merge: bool, suffix: &str| {
        json!({"model": "gpt2-tiny", "training_file": file, "suffix": suffix,
            "hyperparameters": {"n_epochs": 1, "batch_size": 8}, "max_seq_length": 32,
            "lora_r": 4, "lora_target_modules": ["c_attn"], "merge_lora": merge})
    };
    let mut models = Vec::new();
    for (merge, suffix) in [(true, "merged"), (false, "adapter")] {
        let id = env.create_job(lora(merge, suffix)).await;
        run_once(&env, "lora").await;
        let job = env.job(&id).await;
        assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
        models.push(job.fine_tuned_model.unwrap());
    }
    // Full fine-tuning starts from the merged weights.
    let next = env
        .create_job(json!({"model": models[0], "training_file": file,
            "hyperparameters": {"n_epochs": 1, "batch_size": 8}, "max_seq_length": 32}))
        .await;
    run_once(&env, "lora").await;
    let job = env.job(&next).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
    // An adapter alone cannot be a base: the error says what to do.
    let refused = env
        .create_job(json!({"model": models[1], "training_file": file, "max_seq_length": 32}))
        .await;
    run_once(&env, "lora").await;
    let err = env.job(&refused).await.error.unwrap();
    assert_eq!(
        (err["code"].as_str(), err["param"].as_str()),
        (Some("invalid_model"), Some("model")),
        "{err}"
    );
    assert!(
        err["message"].as_str().unwrap().contains("merge_lora"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qlora_job_runs_on_the_worker() {
    let env = Env::new(None).await;
    let file = env.upload("train.jsonl", &gpt2_data(16)).await;
    let id = env
        .create_job(json!({"model": "llama-tiny", "training_file": file,
            "hyperparameters": {"n_epochs": 1, "batch_size": 8}, "max_seq_length": 32,
            "quantization": "nf4", "lora_r": 4}))
        .await;
    let job = env.job(&id).await;
    let spec = job.spec.get().unwrap();
    assert_eq!(
        (
            spec.nf4().map(|q| q.double_quantization),
            spec.gradient_checkpointing
        ),
        (Some(true), Some(true))
    );
    run_once(&env, "qlora").await;
    let job = env.job(&id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
    assert!(job.fine_tuned_model.is_some());
}
