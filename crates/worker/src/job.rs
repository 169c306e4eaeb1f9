//! Running one claimed job: prepare its inputs, run the trainer child, turn its events into job
//! events, progress, checkpoints and artifacts, and end the job through the fenced queue calls.
//!
//! While the job runs a heartbeat task renews the lease every `heartbeat_every` (carrying the
//! progress) and reports cancel/pause requests; the worker also acts at once on control
//! notifications. A lost lease (the heartbeat is refused, or cannot get through for longer than
//! the lease) kills the child at once and nothing more is written.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tuna_core::hf_config::HfConfig;
use tuna_core::memory;
use tuna_core::protocol::StepMetrics;
use tuna_core::spec::{Device, JobSpec};
use tuna_db::queue::{
    self, Claimed, Completion, Control, EventKind, JobError, Lease, Level, Listener, QueueError,
    Wake,
};
use tuna_db::rows::JobRow;

use crate::child::{describe_exit, ControlLine, TrainerCommand, TrainerEvent, TrainerProcess};
use crate::inputs::{self, LocalDataset};
use crate::results::Results;
use crate::{JobMemory, Outcome, WorkerConfig, WorkerError};

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The lease is gone: stop, write nothing.
#[derive(Debug)]
struct LeaseLost;

#[derive(Debug, Clone, Default)]
struct ProgressState {
    value: Option<Value>,
    /// The trainer's estimate of the time left, and when it was made (the database turns it
    /// into `estimated_finish` with its own clock).
    eta: Option<(Duration, Instant)>,
}

impl ProgressState {
    /// Time left now: the estimate less what has passed since it was made.
    fn remaining(&self) -> Option<Duration> {
        self.eta.map(|(left, at)| left.saturating_sub(at.elapsed()))
    }
}

/// Why the worker asked the trainer to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Cancel,
    Pause,
    /// The worker shuts down: checkpoint (like a pause), then give the job back.
    Shutdown,
}

struct Ctx<'a> {
    pool: &'a PgPool,
    cfg: &'a WorkerConfig,
    lease: Lease,
    job: JobRow,
    progress: Arc<Mutex<ProgressState>>,
    lost: CancellationToken,
    /// What the job may use on this worker's device.
    memory: Option<JobMemory>,
}

impl Ctx<'_> {
    /// A fenced event; a database hiccup is logged and skipped, a lost lease stops the job.
    async fn event(
        &self,
        level: Level,
        message: &str,
        data: Option<&Value>,
        kind: EventKind,
    ) -> Result<(), LeaseLost> {
        if self.lost.is_cancelled() {
            return Err(LeaseLost);
        }
        match queue::append_event(self.pool, &self.lease, level, message, data, kind).await {
            Ok(()) => Ok(()),
            Err(QueueError::LeaseLost { .. }) => {
                self.lost.cancel();
                Err(LeaseLost)
            }
            Err(e) => {
                tracing::warn!(job_id = %self.lease.job_id, error = %e, "could not write a job event");
                Ok(())
            }
        }
    }

    async fn phase(&self, phase: &str, message: &str) -> Result<(), LeaseLost> {
        self.event(
            Level::Info,
            message,
            Some(&json!({"phase": phase})),
            EventKind::Message,
        )
        .await
    }

    fn job_prefix(&self) -> String {
        format!("jobs/{}", self.job.job_id)
    }
}

fn lost_or<T>(r: Result<T, QueueError>, lost: &CancellationToken) -> Result<T, WorkerError> {
    match r {
        Err(QueueError::LeaseLost { job_id }) => {
            lost.cancel();
            Err(WorkerError::LeaseLost(job_id))
        }
        Err(e) => Err(WorkerError::Queue(e)),
        Ok(v) => Ok(v),
    }
}

/// The name of the model a job produces: `ft:<base>:<organization>[:<suffix>]:<job id tail>`.
pub fn fine_tuned_model_name(job: &JobRow) -> String {
    let tail = job
        .job_id
        .strip_prefix(tuna_core::ids::JOB)
        .unwrap_or(&job.job_id);
    let tail: String = tail.chars().take(8).collect();
    match job.suffix.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => format!("ft:{}:{}:{s}:{tail}", job.model, job.organization_id),
        None => format!("ft:{}:{}:{tail}", job.model, job.organization_id),
    }
}

/// Runs a claimed job to its end. `listener` (when given) delivers control notifications.
pub(crate) async fn run_job(
    pool: &PgPool,
    cfg: &WorkerConfig,
    worker_device: &str,
    memory: Option<JobMemory>,
    claimed: Claimed,
    listener: Option<&mut Listener>,
    shutdown: &CancellationToken,
) -> Result<Outcome, WorkerError> {
    let Claimed { job, lease } = claimed;
    let job_id = job.job_id.clone();
    let work = cfg.data_dir.join("work").join(format!(
        "{}-{}",
        job.job_id,
        &lease.token.simple().to_string()[..8]
    ));
    let progress = Arc::new(Mutex::new(ProgressState::default()));
    let lost = CancellationToken::new();
    let (ctl_tx, ctl_rx) = watch::channel(Control::Continue);
    let hb_stop = CancellationToken::new();
    // Aborted when this future is dropped (a worker stopped mid-job must stop renewing).
    let mut hb = AbortOnDrop(tokio::spawn(heartbeat_loop(
        pool.clone(),
        lease.clone(),
        cfg.lease_ttl,
        cfg.heartbeat_every,
        progress.clone(),
        ctl_tx,
        lost.clone(),
        hb_stop.clone(),
    )));
    let ctx = Ctx {
        pool,
        cfg,
        lease,
        job,
        progress,
        lost: lost.clone(),
        memory,
    };
    let result = execute(&ctx, &work, worker_device, ctl_rx, listener, shutdown).await;
    hb_stop.cancel();
    let _ = (&mut hb.0).await;
    if !cfg.keep_work_dirs {
        let _ = tokio::fs::remove_dir_all(&work).await;
    }
    match result {
        Err(WorkerError::LeaseLost(_)) => {
            tracing::warn!(%job_id, "lease lost; the job was stopped");
            Ok(Outcome::LeaseLost { job_id })
        }
        other => other,
    }
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    pool: PgPool,
    lease: Lease,
    ttl: Duration,
    every: Duration,
    progress: Arc<Mutex<ProgressState>>,
    tx: watch::Sender<Control>,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let snap = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let r = tokio::time::timeout(
            every.max(Duration::from_secs(5)),
            queue::heartbeat(&pool, &lease, ttl, snap.value.as_ref(), snap.remaining()),
        )
        .await;
        match r {
            Ok(Ok(c)) => {
                last_ok = Instant::now();
                if c != Control::Continue {
                    tx.send_replace(c);
                }
            }
            Ok(Err(QueueError::LeaseLost { .. })) => {
                lost.cancel();
                return;
            }
            other => {
                let msg = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                tracing::warn!(job_id = %lease.job_id, error = %msg, "heartbeat failed");
                // Stop before the lease can expire: the rescuer may hand the job to another
                // worker after that.
                if last_ok.elapsed() + every >= ttl {
                    tracing::error!(job_id = %lease.job_id, "cannot renew the lease; stopping the job");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// What preparing the inputs produced.
struct Prepared {
    model: inputs::ResolvedModel,
    train: LocalDataset,
    valid: Option<LocalDataset>,
    resume: Option<PathBuf>,
    spec_path: PathBuf,
}

async fn prepare(
    ctx: &Ctx<'_>,
    spec: &JobSpec,
    work: &Path,
) -> Result<Result<Prepared, JobError>, LeaseLost> {
    let data_dir = work.join("data");
    if let Err(e) = tokio::fs::create_dir_all(&data_dir).await {
        return Ok(Err(JobError::new(
            "internal",
            format!("cannot create {}: {e}", data_dir.display()),
        )));
    }
    let cfg = ctx.cfg;
    let org = &ctx.job.organization_id;
    ctx.phase(
        "downloading",
        "Downloading the base model and the training data",
    )
    .await?;
    let model = match inputs::resolve_model(
        ctx.pool,
        &cfg.store,
        org,
        &spec.model,
        &cfg.data_dir.join("model-cache"),
    )
    .await
    {
        Ok(m) => m,
        Err(e) => return Ok(Err(e)),
    };
    let fetch = |file: Option<String>,
                 url: Option<String>,
                 file_param: &'static str,
                 url_param: &'static str,
                 stem: &'static str| {
        let data_dir = data_dir.clone();
        async move {
            match (file, url) {
                (Some(id), _) => Some(
                    inputs::fetch_uploaded(
                        ctx.pool, &cfg.store, org, &id, file_param, &data_dir, stem,
                    )
                    .await
                    .map(|d| (d, file_param)),
                ),
                (None, Some(u)) => Some(
                    inputs::fetch_url(&u, url_param, &data_dir, stem, &cfg.fetch, &cfg.s3)
                        .await
                        .map(|d| (d, url_param)),
                ),
                (None, None) => None,
            }
        }
    };
    let train = match fetch(
        spec.training_file.clone(),
        spec.dataset_url.clone(),
        "training_file",
        "dataset_url",
        "train",
    )
    .await
    {
        Some(Ok(t)) => t,
        Some(Err(e)) => return Ok(Err(e)),
        None => {
            return Ok(Err(JobError {
                code: "invalid_file".into(),
                message: "the job has no training data".into(),
                param: Some("training_file".into()),
            }))
        }
    };
    let valid = match fetch(
        spec.validation_file.clone(),
        spec.validation_dataset_url.clone(),
        "validation_file",
        "validation_dataset_url",
        "valid",
    )
    .await
    {
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => return Ok(Err(e)),
        None => None,
    };

    ctx.phase("validating", "Validating the training data")
        .await?;
    let report = match inputs::validate_dataset(&train.0, train.1, "training data").await {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    if let Some((v, param)) = &valid {
        if let Err(e) = inputs::validate_dataset(v, param, "validation data").await {
            return Ok(Err(e));
        }
    }
    let msg = format!(
        "Training data: {} examples ({} bytes)",
        report.examples, train.0.bytes
    );
    ctx.event(
        Level::Info,
        &msg,
        Some(&json!({"examples": report.examples, "bytes": train.0.bytes})),
        EventKind::Message,
    )
    .await?;

    let resume = match (&ctx.job.checkpoint_uri, ctx.job.checkpoint_step) {
        (Some(uri), Some(step)) => {
            let dir = work.join("resume");
            match cfg.store.download_prefix(uri, &dir).await {
                Ok(_) => {
                    ctx.phase(
                        "downloading",
                        &format!("Downloaded the checkpoint of step {step} to resume from"),
                    )
                    .await?;
                    Some(dir)
                }
                Err(e) => {
                    let msg = format!("The checkpoint of step {step} could not be downloaded ({e}); training restarts from the beginning");
                    ctx.event(Level::Warn, &msg, None, EventKind::Message)
                        .await?;
                    None
                }
            }
        }
        _ => None,
    };
    let spec_path = work.join("spec.json");
    if let Err(e) = write_spec(&spec_path, spec).await {
        return Ok(Err(e));
    }
    Ok(Ok(Prepared {
        model,
        train: train.0,
        valid: valid.map(|v| v.0),
        resume,
        spec_path,
    }))
}

/// A checkpoint to upload and record.
struct CkptJob {
    step: i64,
    path: PathBuf,
    metrics: Value,
}

/// What a checkpoint upload needs, owned (uploads run in a task of their own: an upload holding
/// the job row's lock must never wait on the event loop).
#[derive(Clone)]
struct Uploader {
    pool: PgPool,
    store: tuna_store::Store,
    lease: Lease,
    lost: CancellationToken,
    job_prefix: String,
    model_name: String,
}

impl Uploader {
    async fn upload(&self, c: &CkptJob) -> Result<(), WorkerError> {
        let lost = || WorkerError::LeaseLost(self.lease.job_id.clone());
        let prefix = format!("{}/checkpoints/step-{}", self.job_prefix, c.step);
        self.store
            .upload_dir(&c.path, &prefix)
            .await
            .map_err(|e| WorkerError::Store(e.to_string()))?;
        if self.lost.is_cancelled() {
            return Err(lost());
        }
        let row = lost_or(
            queue::record_checkpoint(
                &self.pool,
                &self.lease,
                c.step,
                &c.metrics,
                &prefix,
                &self.model_name,
            )
            .await,
            &self.lost,
        )?;
        let msg = format!(
            "Checkpoint saved at step {} ({})",
            c.step, row.fine_tuned_model_checkpoint
        );
        let data =
            json!({"step": c.step, "checkpoint_id": row.checkpoint_id, "metrics": c.metrics});
        match queue::append_event(
            &self.pool,
            &self.lease,
            Level::Info,
            &msg,
            Some(&data),
            EventKind::Message,
        )
        .await
        {
            Err(QueueError::LeaseLost { .. }) => {
                self.lost.cancel();
                Err(lost())
            }
            Err(e) => {
                tracing::warn!(job_id = %self.lease.job_id, error = %e, "could not write a job event");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Uploads checkpoints in order until the channel closes or one fails; returns the last
    /// uploaded step.
    async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<CkptJob>,
    ) -> (Option<i64>, Result<(), WorkerError>) {
        let mut last = None;
        while let Some(c) = rx.recv().await {
            if let Err(e) = self.upload(&c).await {
                return (last, Err(e));
            }
            last = Some(c.step);
        }
        (last, Ok(()))
    }
}

fn update_progress(ctx: &Ctx<'_>, m: &StepMetrics) {
    let (step, total) = (m.step, m.total_steps);
    let eta = Some(m.eta_seconds).filter(|e| e.is_finite() && *e >= 0.0);
    let mut p = ctx.progress.lock().unwrap_or_else(|p| p.into_inner());
    let percent = (total > 0).then(|| ((step as f64 / total as f64) * 1000.0).round() / 10.0);
    p.value = Some(json!({
        "step": step, "total_steps": total, "percent": percent,
        "seconds_remaining": eta.map(|e| e.round() as i64),
        "epoch": m.epoch,
        "train_loss": m.train_loss,
    }));
    p.eta = eta.map(|e| (Duration::from_secs_f64(e.min(1e9)), Instant::now()));
}

/// `name=value` with four decimals, for event messages.
fn fmt_num(k: &str, v: Option<f64>) -> Option<String> {
    v.map(|v| format!("{k}={v:.4}"))
}

/// Runs a claimed job: inputs, the trainer child, and the job's end.
async fn execute(
    ctx: &Ctx<'_>,
    work: &Path,
    worker_device: &str,
    ctl_rx: watch::Receiver<Control>,
    listener: Option<&mut Listener>,
    shutdown: &CancellationToken,
) -> Result<Outcome, WorkerError> {
    let spec: JobSpec = match ctx.job.spec.get() {
        Ok(s) => s.clone(),
        Err(e) => {
            let err = JobError::new(
                "internal",
                format!("the job's stored spec cannot be read: {e}"),
            );
            return finish_failed(ctx, &err).await;
        }
    };
    let prepared = match prepare_unless_stopped(ctx, &spec, work, &ctl_rx, shutdown).await? {
        Ok(p) => p,
        Err(outcome) => return Ok(outcome),
    };
    let spec = match memory_check(ctx, &spec, &prepared).await? {
        Ok(fitted) => fitted,
        Err(err) => return finish_failed(ctx, &err).await,
    };
    let model_name = fine_tuned_model_name(&ctx.job);
    let proc = spawn_trainer(ctx, &spec, &prepared, work, worker_device).await?;
    let uploader = Uploader {
        pool: ctx.pool.clone(),
        store: ctx.cfg.store.clone(),
        lease: ctx.lease.clone(),
        lost: ctx.lost.clone(),
        job_prefix: ctx.job_prefix(),
        model_name: model_name.clone(),
    };
    let mut run = RunLoop::start(ctx, proc, uploader.clone());
    run.drive(ctl_rx, listener, shutdown).await;
    let ended = run.finish().await?;
    conclude(ctx, ended, &uploader, &model_name, &prepared).await
}

/// Prepares the inputs, abandoned at once on a lost lease, cancel, pause or shutdown (then the
/// job's outcome comes back as `Err`).
async fn prepare_unless_stopped(
    ctx: &Ctx<'_>,
    spec: &JobSpec,
    work: &Path,
    ctl_rx: &watch::Receiver<Control>,
    shutdown: &CancellationToken,
) -> Result<Result<Prepared, Outcome>, WorkerError> {
    let lost_err = || WorkerError::LeaseLost(ctx.job.job_id.clone());
    let mut rx = ctl_rx.clone();
    let prepared = tokio::select! {
        r = prepare(ctx, spec, work) => match r {
            Ok(r) => r,
            Err(LeaseLost) => return Err(lost_err()),
        },
        _ = ctx.lost.cancelled() => return Err(lost_err()),
        c = async {
            let got = rx.wait_for(|c| *c != Control::Continue).await.map(|v| *v).ok();
            match got {
                Some(c) => c,
                None => std::future::pending().await,
            }
        } => {
            let outcome = if c == Control::Cancel { finish_cancelled(ctx).await } else { finish_paused(ctx).await };
            return outcome.map(Err);
        }
        _ = shutdown.cancelled() => return finish_released(ctx).await.map(Err),
    };
    match prepared {
        Ok(p) => Ok(Ok(p)),
        Err(e) => finish_failed(ctx, &e).await.map(Err),
    }
}

/// The job's estimated peak memory against what this worker's device has
/// (`tuna_core::memory`). `Ok`: the spec to train with: the job's own, or, under
/// `gradient_checkpointing` / `batch_size` `"auto"`, one with checkpointing on and smaller
/// micro-batches (more gradient accumulation) that fits (written over the prepared spec.json,
/// with an event saying so). `Err`: an `insufficient_memory`
/// error naming what the job needs, what the device has and what would fit. A model whose
/// config.json cannot be read is left to the trainer.
async fn memory_check(
    ctx: &Ctx<'_>,
    spec: &JobSpec,
    prepared: &Prepared,
) -> Result<Result<JobSpec, JobError>, WorkerError> {
    let Some(memory) = ctx.memory.as_ref() else {
        return Ok(Ok(spec.clone()));
    };
    let Some(hf) = read_config(&prepared.model.dir).await else {
        return Ok(Ok(spec.clone()));
    };
    let fitted = match memory::fit(&hf, spec, memory.accelerator, memory.bytes) {
        Ok(fitted) => fitted,
        Err(e) => {
            return Ok(Err(JobError {
                code: "insufficient_memory".into(),
                message: memory::does_not_fit(&hf, spec, &e, memory.bytes, &memory.device),
                param: Some("batch_size".into()),
            }));
        }
    };
    let mut changes = Vec::new();
    if fitted.gradient_checkpointing != spec.gradient_checkpointing {
        changes.push("gradient_checkpointing auto: on".to_string());
    }
    let (before, after) = (memory::micro_batch(spec), memory::micro_batch(&fitted));
    if fitted.gradient_accumulation_steps != spec.gradient_accumulation_steps {
        changes.push(format!(
            "batch_size auto: micro-batches of {after} instead of {before} (gradient_accumulation_steps {}, the same batch of {})",
            fitted.gradient_accumulation_steps, fitted.batch_size,
        ));
    }
    if !changes.is_empty() {
        if let Err(e) = write_spec(&prepared.spec_path, &fitted).await {
            return Ok(Err(e));
        }
        let e = memory::estimate(&hf, &fitted, memory.accelerator);
        let msg = format!(
            "{} to fit the {}: about {} of {}",
            changes.join("; "),
            memory.device,
            memory::gib(e.total_bytes),
            memory::gib(memory.bytes),
        );
        let data = json!({"gradient_accumulation_steps": fitted.gradient_accumulation_steps,
                          "micro_batch": after,
                          "gradient_checkpointing": fitted.gradient_checkpointing == Some(true),
                          "memory_estimate": e});
        ctx.event(Level::Info, &msg, Some(&data), EventKind::Message)
            .await
            .map_err(|_| WorkerError::LeaseLost(ctx.job.job_id.clone()))?;
    }
    Ok(Ok(fitted))
}

/// The spec the trainer reads (`tuna-trainer run --spec`).
async fn write_spec(path: &Path, spec: &JobSpec) -> Result<(), JobError> {
    let text = serde_json::to_vec_pretty(spec).unwrap_or_default();
    tokio::fs::write(path, text)
        .await
        .map_err(|e| JobError::new("internal", format!("cannot write {}: {e}", path.display())))
}

async fn read_config(dir: &Path) -> Option<HfConfig> {
    let text = tokio::fs::read_to_string(dir.join("config.json"))
        .await
        .ok()?;
    HfConfig::parse(&text).ok()
}

/// Starts `tuna-trainer run` for the prepared job. A trainer that cannot start is a broken
/// worker, not a broken job: the job is given back.
async fn spawn_trainer(
    ctx: &Ctx<'_>,
    spec: &JobSpec,
    prepared: &Prepared,
    work: &Path,
    worker_device: &str,
) -> Result<TrainerProcess, WorkerError> {
    let device = match spec.device {
        Device::Auto => Some(worker_device),
        _ => None,
    };
    let cmd = TrainerCommand::run(
        &ctx.cfg.trainer_bin,
        &prepared.model.dir,
        &prepared.spec_path,
        &prepared.train.path,
        prepared.valid.as_ref().map(|v| v.path.as_path()),
        &work.join("output"),
        prepared.resume.as_deref(),
        device,
        ctx.cfg.trainer_threads,
    );
    let proc = match TrainerProcess::spawn(&cmd) {
        Ok(p) => p,
        Err(e) => {
            let _ = queue::release(ctx.pool, &ctx.lease).await;
            return Err(WorkerError::Trainer(format!(
                "cannot start {}: {e}",
                ctx.cfg.trainer_bin.display()
            )));
        }
    };
    if let Some(step) = ctx
        .job
        .checkpoint_step
        .filter(|_| prepared.resume.is_some())
    {
        ctx.phase(
            "training",
            &format!("Training resumes from checkpoint step {step}"),
        )
        .await
        .map_err(|_| WorkerError::LeaseLost(ctx.job.job_id.clone()))?;
    }
    Ok(proc)
}

/// What the checkpoint-upload task ends with: the last step it uploaded, and whether it failed.
type UploadsDone = (Option<i64>, Result<(), WorkerError>);

/// The event loop over a running trainer: its output, lease loss, control requests (heartbeat
/// and notifications), shutdown, the stall and kill deadlines, and the checkpoint uploads,
/// which run beside it so control stays responsive. One method per source.
struct RunLoop<'c, 'a> {
    ctx: &'c Ctx<'a>,
    proc: TrainerProcess,
    results: Results,
    /// The terminal event the trainer printed, if any.
    terminal: Option<TrainerEvent>,
    /// Why the worker asked the trainer to stop, if it did.
    request: Option<Request>,
    kill_at: Option<Instant>,
    killed: bool,
    /// The heartbeat's control channel is still open.
    hb_open: bool,
    up_tx: Option<mpsc::UnboundedSender<CkptJob>>,
    uploads: AbortOnDrop<UploadsDone>,
    uploads_done: Option<UploadsDone>,
    eof: bool,
    last_output: Instant,
    stalled: bool,
}

/// How the trainer's run ended, once the process has exited.
struct Ended {
    status: std::io::Result<std::process::ExitStatus>,
    stderr_tail: Vec<String>,
    terminal: Option<TrainerEvent>,
    request: Option<Request>,
    stalled: bool,
    results: Results,
    last_uploaded: Option<i64>,
}

impl<'c, 'a> RunLoop<'c, 'a> {
    fn start(ctx: &'c Ctx<'a>, proc: TrainerProcess, uploader: Uploader) -> Self {
        let (up_tx, up_rx) = mpsc::unbounded_channel::<CkptJob>();
        RunLoop {
            ctx,
            proc,
            results: Results::default(),
            terminal: None,
            request: None,
            kill_at: None,
            killed: false,
            hb_open: true,
            up_tx: Some(up_tx),
            uploads: AbortOnDrop(tokio::spawn(uploader.run(up_rx))),
            uploads_done: None,
            eof: false,
            last_output: Instant::now(),
            stalled: false,
        }
    }

    /// Runs until the trainer's stdout ends.
    async fn drive(
        &mut self,
        mut ctl_rx: watch::Receiver<Control>,
        mut listener: Option<&mut Listener>,
        shutdown: &CancellationToken,
    ) {
        while !self.eof {
            let stall_timeout = self.ctx.cfg.stall_timeout;
            let last_output = self.last_output;
            let stall_sleep = async {
                match stall_timeout {
                    Some(t) => tokio::time::sleep_until(last_output + t).await,
                    None => std::future::pending().await,
                }
            };
            let kill_at = self.kill_at;
            let kill_sleep = async {
                match kill_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let notified = async {
                match listener.as_deref_mut() {
                    Some(l) => l.next(Duration::from_secs(3600)).await,
                    None => std::future::pending().await,
                }
            };
            let asking = self.request.is_none();
            let new_request = tokio::select! {
                line = self.proc.next_line() => { self.on_line(line).await; None }
                _ = self.ctx.lost.cancelled(), if !self.killed => { self.on_lease_lost(); None }
                r = ctl_rx.changed(), if self.hb_open && asking => match r {
                    Err(_) => { self.hb_open = false; None }
                    Ok(()) => match *ctl_rx.borrow_and_update() {
                        Control::Cancel => Some(Request::Cancel),
                        Control::Pause => Some(Request::Pause),
                        Control::Continue => None,
                    },
                },
                w = notified, if asking => self.on_notification(w),
                _ = shutdown.cancelled(), if asking => Some(Request::Shutdown),
                _ = stall_sleep, if !self.killed && asking => { self.on_stall(); None }
                _ = kill_sleep, if kill_at.is_some() => { self.on_kill_deadline(); None }
                done = &mut self.uploads.0, if self.uploads_done.is_none() => { self.on_uploads_done(done); None }
            };
            if let Some(r) = new_request {
                self.ask_to_stop(r).await;
            }
        }
    }

    /// A line of the trainer's stdout (`None`: it ended).
    async fn on_line(&mut self, line: Option<String>) {
        let Some(line) = line else {
            self.eof = true;
            return;
        };
        self.last_output = Instant::now();
        if self.ctx.lost.is_cancelled() {
            return;
        }
        let ev = match TrainerEvent::parse(&line) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::debug!(job_id = %self.ctx.job.job_id, "trainer printed a line that is no event ({e}): {line}");
                return;
            }
        };
        let r = handle_event(self.ctx, &ev, &mut self.results, self.up_tx.as_ref()).await;
        if r.is_err() {
            self.proc.close_stdin();
            self.proc.kill();
            return;
        }
        if ev.is_terminal() {
            self.terminal = Some(ev);
        }
    }

    fn on_lease_lost(&mut self) {
        self.proc.close_stdin();
        self.proc.kill();
        self.killed = true;
    }

    /// A control notification: a request for this job, if it is one.
    fn on_notification(&self, w: Wake) -> Option<Request> {
        match w {
            Wake::Control(m) if m.job_id == self.ctx.job.job_id => Some(match m.action {
                queue::ControlAction::Cancel => Request::Cancel,
                queue::ControlAction::Pause => Request::Pause,
            }),
            _ => None,
        }
    }

    fn on_stall(&mut self) {
        tracing::warn!(job_id = %self.ctx.job.job_id, "the trainer printed nothing for the stall timeout; killing it");
        self.proc.close_stdin();
        self.proc.kill();
        self.killed = true;
        self.stalled = true;
    }

    fn on_kill_deadline(&mut self) {
        tracing::warn!(job_id = %self.ctx.job.job_id, "the trainer did not stop in time; killing it");
        self.proc.kill();
        self.kill_at = None;
        self.killed = true;
    }

    fn on_uploads_done(&mut self, done: Result<UploadsDone, tokio::task::JoinError>) {
        let done = done.unwrap_or_else(|e| {
            (
                None,
                Err(WorkerError::Trainer(format!("checkpoint upload task: {e}"))),
            )
        });
        let failed = done.1.is_err();
        self.uploads_done = Some(done);
        if failed {
            // The lease is lost or the store failed: stop training.
            self.proc.close_stdin();
            self.proc.kill();
            self.killed = true;
        }
    }

    /// Sends the trainer its control line and sets the deadline after which it is killed.
    async fn ask_to_stop(&mut self, r: Request) {
        self.request = Some(r);
        let (line, grace) = match r {
            Request::Cancel => (ControlLine::Cancel, self.ctx.cfg.cancel_grace),
            Request::Pause | Request::Shutdown => (ControlLine::Pause, self.ctx.cfg.pause_grace),
        };
        tracing::info!(job_id = %self.ctx.job.job_id, ?r, "asking the trainer to stop");
        self.proc.send(line).await;
        self.kill_at = Some(Instant::now() + grace);
    }

    /// Waits for the trainer's exit and the last checkpoint upload. A lost lease, or a lease
    /// lost during an upload, is an error; a failed upload fails the job.
    async fn finish(mut self) -> Result<Result<Ended, Outcome>, WorkerError> {
        let status = self.proc.wait().await;
        drop(self.up_tx.take());
        let (last_uploaded, upload_result) = match self.uploads_done.take() {
            Some(d) => d,
            None => (&mut self.uploads.0).await.unwrap_or_else(|e| {
                (
                    None,
                    Err(WorkerError::Trainer(format!("checkpoint upload task: {e}"))),
                )
            }),
        };
        let ctx = self.ctx;
        if ctx.lost.is_cancelled() {
            return Err(WorkerError::LeaseLost(ctx.job.job_id.clone()));
        }
        if let Err(e) = upload_result {
            if let WorkerError::LeaseLost(_) = e {
                return Err(e);
            }
            let err = JobError::new(
                "artifact_store_error",
                format!("saving a checkpoint to the artifact store failed: {e}"),
            );
            return finish_failed(ctx, &err).await.map(Err);
        }
        Ok(Ok(Ended {
            status,
            stderr_tail: self.proc.stderr_tail(),
            terminal: self.terminal,
            request: self.request,
            stalled: self.stalled,
            results: self.results,
            last_uploaded,
        }))
    }
}

/// Ends the job from how the trainer's run ended.
async fn conclude(
    ctx: &Ctx<'_>,
    ended: Result<Ended, Outcome>,
    uploader: &Uploader,
    model_name: &str,
    prepared: &Prepared,
) -> Result<Outcome, WorkerError> {
    let ended = match ended {
        Ok(e) => e,
        Err(outcome) => return Ok(outcome),
    };
    let lost_err = || WorkerError::LeaseLost(ctx.job.job_id.clone());
    match ended.terminal {
        Some(TrainerEvent::Done {
            trained_tokens,
            final_dir,
            metrics,
            ..
        }) => {
            finish_succeeded(
                ctx,
                model_name,
                prepared,
                &final_dir,
                trained_tokens,
                &metrics,
                &ended.results,
            )
            .await
        }
        Some(TrainerEvent::Paused { checkpoint, step }) => {
            if ended.last_uploaded != Some(step as i64) {
                let c = CkptJob {
                    step: step as i64,
                    path: checkpoint,
                    metrics: json!({}),
                };
                if let Err(e) = uploader.upload(&c).await {
                    if let WorkerError::LeaseLost(_) = e {
                        return Err(e);
                    }
                    let msg = format!("The pause checkpoint could not be saved ({e}); the job keeps its previous checkpoint");
                    ctx.event(Level::Warn, &msg, None, EventKind::Message)
                        .await
                        .map_err(|_| lost_err())?;
                }
            }
            if ended.request == Some(Request::Shutdown) {
                finish_released(ctx).await
            } else {
                finish_paused(ctx).await
            }
        }
        Some(TrainerEvent::Cancelled { .. }) => finish_cancelled(ctx).await,
        Some(TrainerEvent::Error {
            code,
            message,
            param,
        }) => {
            finish_failed(
                ctx,
                &JobError {
                    code: code.as_str().to_string(),
                    message,
                    param,
                },
            )
            .await
        }
        _ => conclude_without_verdict(ctx, &ended).await,
    }
}

/// The trainer ended without a terminal event: stopped on request, stalled, or crashed.
async fn conclude_without_verdict(ctx: &Ctx<'_>, ended: &Ended) -> Result<Outcome, WorkerError> {
    match ended.request {
        Some(Request::Cancel) => finish_cancelled(ctx).await,
        Some(Request::Pause) => {
            let msg =
                "The trainer did not stop in time; the job is paused at its last saved checkpoint";
            ctx.event(Level::Warn, msg, None, EventKind::Message)
                .await
                .map_err(|_| WorkerError::LeaseLost(ctx.job.job_id.clone()))?;
            finish_paused(ctx).await
        }
        Some(Request::Shutdown) => finish_released(ctx).await,
        None if ended.stalled => {
            let secs = ctx.cfg.stall_timeout.unwrap_or_default().as_secs();
            let message = format!(
                "The training process printed nothing for {secs} s (no step, evaluation, checkpoint or phase event) and was stopped as hung. If steps or evaluations of this job legitimately take longer, raise the worker's --stall-timeout-secs."
            );
            finish_failed(ctx, &JobError::new("trainer_stalled", message)).await
        }
        None => {
            let how = match &ended.status {
                Ok(s) => describe_exit(s),
                Err(e) => format!("its status is unknown: {e}"),
            };
            let tail = &ended.stderr_tail[ended.stderr_tail.len().saturating_sub(5)..];
            let mut message =
                format!("The training process crashed ({how}) without reporting an error.");
            if !tail.is_empty() {
                message.push_str(&format!(" Its last output: {}", tail.join(" | ")));
            }
            finish_failed(ctx, &JobError::new("trainer_crashed", message)).await
        }
    }
}

/// A trainer event's fields without its `event` tag: the `data` of the job event it becomes.
fn event_data(ev: &TrainerEvent) -> Value {
    let mut v = serde_json::to_value(ev).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.shift_remove("event");
    }
    v
}

/// Turns a non-terminal trainer event into job events, progress and checkpoint uploads.
async fn handle_event(
    ctx: &Ctx<'_>,
    ev: &TrainerEvent,
    results: &mut Results,
    uploads: Option<&mpsc::UnboundedSender<CkptJob>>,
) -> Result<(), LeaseLost> {
    match ev {
        TrainerEvent::Phase { phase, message } => {
            let label = phase.label();
            let msg = if message.is_empty() {
                label.to_string()
            } else {
                format!("{label}: {message}")
            };
            ctx.phase(phase.as_str(), &msg).await
        }
        TrainerEvent::Data(d) => {
            let mut msg = format!("Data tokenized: {} training examples", d.train.examples);
            if let Some(v) = &d.valid {
                msg.push_str(&format!(", {} validation examples", v.examples));
            }
            msg.push_str(&format!("; {} training steps", d.total_steps));
            ctx.event(Level::Info, &msg, Some(&event_data(ev)), EventKind::Message)
                .await
        }
        TrainerEvent::Metrics(m) => {
            results.add_metrics(m);
            update_progress(ctx, m);
            let mut msg = format!("Step {}/{}", m.step, m.total_steps);
            let parts: Vec<String> = [
                fmt_num("train_loss", Some(m.train_loss)),
                fmt_num("train_mean_token_accuracy", m.train_mean_token_accuracy),
                fmt_num("train_accuracy", m.train_accuracy),
                fmt_num("train_rewards/accuracies", m.train_rewards_accuracies),
                fmt_num("train_rewards/margins", m.train_rewards_margins),
            ]
            .into_iter()
            .flatten()
            .collect();
            msg.push_str(": ");
            msg.push_str(&parts.join(", "));
            ctx.event(Level::Info, &msg, Some(&event_data(ev)), EventKind::Metrics)
                .await
        }
        TrainerEvent::Eval { step, metrics: m } => {
            results.add_eval(*step, m);
            let parts: Vec<String> = [
                fmt_num("valid_loss", Some(m.valid_loss)),
                fmt_num("valid_mean_token_accuracy", m.valid_mean_token_accuracy),
                fmt_num("valid_accuracy", m.valid_accuracy),
                fmt_num("valid_macro_f1", m.valid_macro_f1),
                fmt_num("valid_micro_f1", m.valid_micro_f1),
                fmt_num("valid_rmse", m.valid_rmse),
                fmt_num("valid_pearson", m.valid_pearson),
                fmt_num("valid_spearman", m.valid_spearman),
                fmt_num("valid_precision", m.valid_precision),
                fmt_num("valid_recall", m.valid_recall),
                fmt_num("valid_f1", m.valid_f1),
                fmt_num("valid_exact_match", m.valid_exact_match),
                fmt_num("valid_rewards/chosen", m.valid_rewards_chosen),
                fmt_num("valid_rewards/rejected", m.valid_rewards_rejected),
                fmt_num("valid_rewards/accuracies", m.valid_rewards_accuracies),
                fmt_num("valid_rewards/margins", m.valid_rewards_margins),
            ]
            .into_iter()
            .flatten()
            .collect();
            let msg = format!("Step {step}: {}", parts.join(", "));
            ctx.event(Level::Info, &msg, Some(&event_data(ev)), EventKind::Metrics)
                .await
        }
        TrainerEvent::Checkpoint {
            step,
            path,
            metrics,
        } => {
            if let Some(tx) = uploads {
                let _ = tx.send(CkptJob {
                    step: *step as i64,
                    path: path.clone(),
                    metrics: Value::Object(metrics.clone()),
                });
            }
            Ok(())
        }
        TrainerEvent::Samples { step, samples } => {
            ctx.event(
                Level::Info,
                &samples_message(*step, samples),
                Some(&event_data(ev)),
                EventKind::Message,
            )
            .await
        }
        TrainerEvent::Warning { message } => {
            ctx.event(Level::Warn, message, None, EventKind::Message)
                .await
        }
        // Terminal events are handled after the child exits.
        TrainerEvent::Done { .. }
        | TrainerEvent::Paused { .. }
        | TrainerEvent::Cancelled { .. }
        | TrainerEvent::Error { .. } => Ok(()),
    }
}

/// The text of a samples event: each prompt, what the model wrote and the reference, quoted
/// and shortened to a line each.
fn samples_message(step: u64, samples: &[tuna_core::protocol::Sample]) -> String {
    fn short(s: &str) -> String {
        let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut cut: String = one_line.chars().take(120).collect();
        if cut.len() < one_line.len() {
            cut.push('…');
        }
        format!("{cut:?}")
    }
    let mut msg = format!("Step {step}: samples");
    for (i, s) in samples.iter().enumerate() {
        msg.push_str(&format!(
            "\n{}. {} → {} (reference: {})",
            i + 1,
            short(&s.prompt),
            short(&s.completion),
            short(&s.reference)
        ));
    }
    msg
}

async fn finish_failed(ctx: &Ctx<'_>, err: &JobError) -> Result<Outcome, WorkerError> {
    let row = lost_or(queue::fail(ctx.pool, &ctx.lease, err).await, &ctx.lost)?;
    Ok(Outcome::Finished {
        job_id: row.job_id,
        status: row.status,
    })
}

async fn finish_cancelled(ctx: &Ctx<'_>) -> Result<Outcome, WorkerError> {
    let row = lost_or(
        queue::finish_cancelled(ctx.pool, &ctx.lease).await,
        &ctx.lost,
    )?;
    Ok(Outcome::Finished {
        job_id: row.job_id,
        status: row.status,
    })
}

/// Writes the latest progress (the heartbeat task may not have carried it yet).
async fn flush_progress(ctx: &Ctx<'_>) -> Result<(), WorkerError> {
    let snap = ctx
        .progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if snap.value.is_none() {
        return Ok(());
    }
    lost_or(
        queue::heartbeat(
            ctx.pool,
            &ctx.lease,
            ctx.cfg.lease_ttl,
            snap.value.as_ref(),
            snap.remaining(),
        )
        .await,
        &ctx.lost,
    )
    .map(|_| ())
}

async fn finish_paused(ctx: &Ctx<'_>) -> Result<Outcome, WorkerError> {
    flush_progress(ctx).await?;
    let row = lost_or(queue::release_paused(ctx.pool, &ctx.lease).await, &ctx.lost)?;
    Ok(Outcome::Finished {
        job_id: row.job_id,
        status: row.status,
    })
}

async fn finish_released(ctx: &Ctx<'_>) -> Result<Outcome, WorkerError> {
    flush_progress(ctx).await?;
    let row = lost_or(queue::release(ctx.pool, &ctx.lease).await, &ctx.lost)?;
    Ok(Outcome::Released {
        job_id: row.job_id,
        status: row.status,
    })
}

async fn finish_succeeded(
    ctx: &Ctx<'_>,
    model_name: &str,
    prepared: &Prepared,
    final_dir: &Path,
    trained_tokens: u64,
    metrics: &Map<String, Value>,
    results: &Results,
) -> Result<Outcome, WorkerError> {
    let lost_err = || WorkerError::LeaseLost(ctx.lease.job_id.clone());
    flush_progress(ctx).await?;
    ctx.phase("uploading", "Uploading the fine-tuned model")
        .await
        .map_err(|_| lost_err())?;
    let prefix = format!("{}/final", ctx.job_prefix());
    let uploaded = match ctx.cfg.store.upload_dir(final_dir, &prefix).await {
        Ok(u) => u,
        Err(e) => {
            let err = JobError::new(
                "artifact_store_error",
                format!("uploading the fine-tuned model failed: {e}"),
            );
            return finish_failed(ctx, &err).await;
        }
    };
    let bytes: u64 = uploaded.iter().map(|o| o.size).sum();
    let msg = format!(
        "Uploaded the fine-tuned model ({} files, {bytes} bytes)",
        uploaded.len()
    );
    ctx.event(
        Level::Info,
        &msg,
        Some(&json!({"prefix": prefix, "metrics": metrics})),
        EventKind::Message,
    )
    .await
    .map_err(|_| lost_err())?;

    // The results file.
    let file_id = tuna_core::ids::new_id(tuna_core::ids::FILE);
    let key = format!("files/{file_id}");
    let csv = results.to_csv();
    let info = ctx
        .cfg
        .store
        .put_bytes(&key, csv)
        .await
        .map_err(|e| WorkerError::Store(e.to_string()))?;
    let done = Completion {
        fine_tuned_model: model_name.to_string(),
        trained_tokens: Some(trained_tokens as i64),
        result_files: vec![file_id.clone()],
        results_file: Some(queue::ResultsFile {
            file_id: file_id.clone(),
            filename: "step_metrics.csv".into(),
            bytes: info.size as i64,
            rows: results_rows(results),
            storage_key: key.clone(),
            sha256: info.sha256.clone(),
        }),
        model_location: Some(prefix),
        architecture: Some(prepared.model.architecture.clone()),
    };
    match queue::complete(ctx.pool, &ctx.lease, &done).await {
        Ok(row) => Ok(Outcome::Finished {
            job_id: row.job_id,
            status: row.status,
        }),
        Err(e) => {
            // Not ours any more (no row was written): take the stored bytes back.
            let _ = ctx.cfg.store.delete(&key).await;
            lost_or(Err(e), &ctx.lost)
        }
    }
}

fn results_rows(r: &Results) -> i64 {
    let csv = r.to_csv();
    (csv.iter().filter(|b| **b == b'\n').count() as i64 - 1).max(0)
}
