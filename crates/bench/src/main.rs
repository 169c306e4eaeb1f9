//! `tuna-bench`: benchmarks of tuna's control plane against a running server.
//!
//! `tuna-bench api --url http://127.0.0.1:PORT --api-key KEY --data-dir DIR` runs, in order:
//! 1. setup: uploads a small training file (or uses `--training-file`) and checks that a job
//!    for `--model` becomes claimable;
//! 2. create: `--concurrency` keep-alive HTTP/1.1 clients create jobs for `--duration` s;
//! 3. retrieve: the same clients retrieve the created jobs for `--duration` s;
//!    then, as a reference, they request `GET /healthz` (no key, no database) as long;
//! 4. drain: claims the backlog with `--drain-claimers` claim loops (claims/s);
//! 5. insert-to-claim: an idle claimer waiting on LISTEN claims `--claim-jobs` jobs queued one
//!    at a time by the bench (queue level), then `--http-claim-jobs` jobs created over HTTP
//!    (end to end).
//!
//! The database is `--database-url`, or the server's private cluster found in `<data-dir>/pg`.
//! Jobs the bench claims are left `running` under a one-hour lease: point it at a throw-away
//! server. Modules: `http` (client and load runner), `claim` (claimer and latency phases),
//! `stats` (percentiles, CPU accounting).

mod claim;
mod http;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::claim::{Claimer, DrainResult, LatencyResult};
use crate::http::{Api, LoadResult, Op};
use crate::stats::{CpuUse, CpuWatch};

#[derive(Debug, Parser)]
#[command(
    name = "tuna-bench",
    version,
    about = "Benchmarks of tuna's control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Job creations/s, retrievals/s and insert-to-claim latency against a running server.
    Api(ApiArgs),
}

#[derive(Debug, Args)]
struct ApiArgs {
    /// Base URL of the server (loopback).
    #[arg(long)]
    url: String,
    /// API key sent as Bearer token (empty: send none, for a server with `--open-access`).
    #[arg(long, env = "TUNA_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The server's PostgreSQL URL (default: its private cluster under `<data-dir>/pg`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The server's data directory (to find its private PostgreSQL).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The server's pid, to report its CPU time per phase.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Registered base model the created jobs use.
    #[arg(long, default_value = "gpt2")]
    model: String,
    /// A processed fine-tune file to use (default: upload one).
    #[arg(long)]
    training_file: Option<String>,
    /// Concurrent HTTP clients in the create and retrieve phases.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Measured seconds of each of the create and retrieve phases (1 to 120).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=120))]
    duration: u64,
    /// Unmeasured warm-up seconds before each load phase (0 to 30).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=30))]
    warmup: u64,
    /// Concurrent claim loops draining the backlog.
    #[arg(long, default_value_t = 4)]
    drain_claimers: usize,
    /// Jobs queued one at a time by the bench for the queue-level latency (0 to 10000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    claim_jobs: u64,
    /// Jobs created one at a time over HTTP for the end-to-end latency (0 to 10000).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    http_claim_jobs: u64,
    /// Pause between two jobs of a latency phase, in milliseconds.
    #[arg(long, default_value_t = 10)]
    claim_gap_ms: u64,
    /// The idle claimer's fallback poll interval in seconds (claims it triggers are reported).
    #[arg(long, default_value_t = 5)]
    poll_s: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Phase<T: Serialize> {
    #[serde(flatten)]
    result: T,
    cpu: CpuUse,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    create: Option<Phase<LoadResult>>,
    validation_backlog_s: Option<f64>,
    retrieve: Option<Phase<LoadResult>>,
    /// The same clients on `GET /healthz` (no key, no database): the ceiling of HTTP alone.
    healthz: Option<Phase<LoadResult>>,
    drain: Option<Phase<DrainResult>>,
    queue_latency: Option<Phase<LatencyResult>>,
    http_latency: Option<Phase<LatencyResult>>,
}

fn database_url(args: &ApiArgs) -> anyhow::Result<String> {
    if let Some(url) = args
        .database_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        return Ok(url.to_string());
    }
    let Some(dir) = &args.data_dir else {
        bail!("give --database-url (or DATABASE_URL) or the server's --data-dir");
    };
    let pg = dir.join("pg");
    let port = tuna_db::pg::running_port(&pg).with_context(|| {
        format!(
            "no running PostgreSQL in {} (is the server running with this --data-dir?)",
            pg.display()
        )
    })?;
    // The unix socket, as the server and its workers connect.
    Ok(tuna_db::pg::socket_url(&pg, port, tuna_db::pg::DATABASE))
}

fn print_load(name: &str, what: &str, p: &Phase<LoadResult>) {
    let r = &p.result;
    println!(
        "{name}: {:.0} {what}/s ({} ok in {:.1}s, {} clients) latency {}",
        r.ok_per_s, r.ok, r.duration_s, r.concurrency, r.latency
    );
    println!("  per second: {:?}", r.per_second);
    if !r.failures.is_empty() {
        println!(
            "  failures (status 0 = transport): {:?}; e.g. {}",
            r.failures,
            r.sample_failure.as_deref().unwrap_or("")
        );
    }
    println!("  {}", p.cpu);
}

/// Runs `fut` and measures the CPU every watched party used meanwhile.
async fn measured<T: Serialize>(
    watch: &CpuWatch,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Phase<T>> {
    let mark = watch.mark();
    let result = fut.await?;
    Ok(Phase {
        cpu: watch.since(&mark),
        result,
    })
}

/// What every phase of `tuna-bench api` uses.
struct ApiBench {
    args: ApiArgs,
    db: PgPool,
    claimer_db: PgPool,
    watch: CpuWatch,
    api: Api,
    /// The create body every phase sends.
    body: Arc<Value>,
}

async fn run_api(args: ApiArgs) -> anyhow::Result<()> {
    let bench = ApiBench::connect(args).await?;
    let mut report = Report::default();
    let probe = bench.api.probe_job(&bench.body).await?;
    println!(
        "setup: training_file={} model={} probe job {probe} is claimable",
        bench.body["training_file"].as_str().unwrap_or_default(),
        bench.args.model
    );
    bench.http_phases(&probe, &mut report).await?;
    bench.drain(&mut report).await?;
    bench.claim_latency(&mut report).await?;
    if let Some(path) = &bench.args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    bench.db.close().await;
    bench.claimer_db.close().await;
    Ok(())
}

impl ApiBench {
    /// Connects to the server's database and API and uploads the training file unless given.
    async fn connect(args: ApiArgs) -> anyhow::Result<ApiBench> {
        let url = database_url(&args)?;
        let db = tuna_db::connect_with_size(&url, (args.drain_claimers + 2) as u32)
            .await
            .context("connecting to the server's database")?;
        let claimer_db = tuna_db::connect_with_size(&url, 3).await?;
        let watch = CpuWatch {
            server_pid: args.server_pid,
            postmaster_pid: args
                .data_dir
                .as_ref()
                .and_then(|d| CpuWatch::postmaster_of(&d.join("pg"))),
        };
        let api = Api::new(&args.url, &args.api_key, args.concurrency.max(1) * 2)?;
        let file = match &args.training_file {
            Some(f) => f.clone(),
            None => api.upload_training_file().await?,
        };
        let body = Arc::new(json!({"model": args.model, "training_file": file}));
        Ok(ApiBench {
            args,
            db,
            claimer_db,
            watch,
            api,
            body,
        })
    }

    /// One HTTP load phase of the configured concurrency, warm-up and duration.
    async fn load(&self, op: Op) -> anyhow::Result<Phase<LoadResult>> {
        let (warmup, duration) = (
            Duration::from_secs(self.args.warmup),
            Duration::from_secs(self.args.duration),
        );
        measured(
            &self.watch,
            http::run_load(&self.api, op, self.args.concurrency, warmup, duration),
        )
        .await
    }

    /// Creates, then retrieves what was created (and the probe), then `GET /healthz` for
    /// reference.
    async fn http_phases(&self, probe: &str, report: &mut Report) -> anyhow::Result<()> {
        let create = self
            .load(Op::Create(serde_json::to_vec(&*self.body)?.into()))
            .await?;
        print_load("create", "jobs", &create);
        let mut paths: Vec<String> = create
            .result
            .created
            .iter()
            .map(|id| format!("/v1/fine_tuning/jobs/{id}"))
            .collect();
        paths.push(format!("/v1/fine_tuning/jobs/{probe}"));
        report.create = Some(create);

        let backlog = claim::wait_validated(&self.db, Duration::from_secs(600)).await?;
        println!(
            "validation backlog: the last created job left validating_files {:.2}s after the create phase",
            backlog.as_secs_f64()
        );
        report.validation_backlog_s = Some(backlog.as_secs_f64());

        let retrieve = self.load(Op::Retrieve(Arc::new(paths))).await?;
        print_load("retrieve", "jobs", &retrieve);
        report.retrieve = Some(retrieve);

        let health = self.load(Op::Health).await?;
        print_load("reference: GET /healthz", "requests", &health);
        report.healthz = Some(health);
        Ok(())
    }

    /// Claims every queued job with `drain_claimers` claim loops.
    async fn drain(&self, report: &mut Report) -> anyhow::Result<()> {
        let phase = measured(
            &self.watch,
            claim::drain(&self.db, self.args.drain_claimers),
        )
        .await?;
        println!(
            "drain: {} queued jobs claimed in {:.2}s by {} claim loops = {:.0} claims/s\n  {}",
            phase.result.claimed,
            phase.result.seconds,
            phase.result.claimers,
            phase.result.claims_per_s,
            phase.cpu
        );
        report.drain = Some(phase);
        Ok(())
    }

    /// Insert-to-claim latency with an idle claimer: at the queue level, then end to end from
    /// the HTTP create.
    async fn claim_latency(&self, report: &mut Report) -> anyhow::Result<()> {
        let args = &self.args;
        let gap = Duration::from_millis(args.claim_gap_ms);
        let mut claimer =
            Claimer::start(&self.claimer_db, Duration::from_secs(args.poll_s.max(1))).await?;
        if args.claim_jobs > 0 {
            let phase = measured(
                &self.watch,
                claim::queue_latency(&self.db, &mut claimer, args.claim_jobs as usize, gap),
            )
            .await?;
            if let Some(s) = &phase.result.notify_to_claim {
                println!(
                    "insert-to-claim (queue level, queued+NOTIFY -> claimed, {} ms gaps): {s}",
                    args.claim_gap_ms
                );
            }
            println!(
                "  claims not woken by NOTIFY: {}",
                phase.result.claims_not_by_notify
            );
            report.queue_latency = Some(phase);
        }
        if args.http_claim_jobs > 0 {
            let phase = measured(
                &self.watch,
                claim::http_latency(
                    &self.api,
                    &self.body,
                    &self.db,
                    &mut claimer,
                    args.http_claim_jobs as usize,
                    gap,
                ),
            )
            .await?;
            print_http_latency(&phase);
            report.http_latency = Some(phase);
        }
        claimer.stop().await
    }
}

fn print_http_latency(phase: &Phase<LatencyResult>) {
    let show = |label: &str, s: &Option<stats::Summary>| {
        if let Some(s) = s {
            println!("  {label}: {s}");
        }
    };
    println!("end to end (POST create -> claimed by the idle claimer):");
    show("request -> claimed", &phase.result.request_to_claim);
    show(
        "db: inserted -> queued (validation)",
        &phase.result.db_insert_to_queued,
    );
    show(
        "db: queued -> claim transaction",
        &phase.result.db_queued_to_claim,
    );
    println!(
        "  claims not woken by NOTIFY: {}",
        phase.result.claims_not_by_notify
    );
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Api(args) => run_api(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tuna-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
