//! The `tuna` command.
//!
//! - `tuna serve`: the HTTP API and the web dashboard at `/` (`tuna-dashboard`; private
//!   PostgreSQL under `<data-dir>/pg` unless `DATABASE_URL` is set; an admin key is created on
//!   first start and written to `<data-dir>/admin_key`).
//! - `tuna worker`: a worker process on a shared database and artifact store (`worker_cmd.rs`).
//! - `tuna keys create|list`: API keys.
//! - `tuna models register <id> <dir>`: registers a Hugging Face checkpoint as a base model.
//! - `tuna files|jobs|download|models list|show …`: the client commands, over HTTP
//!   (`client/`).
//!
//! `main` only parses arguments, sets up logging and runs the chosen command (`serve.rs`,
//! `admin.rs`).

mod admin;
mod client;
mod db;
mod serve;
mod worker_cmd;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tuna",
    version,
    about = "Fine-tuning job server with an OpenAI-compatible API"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "TUNA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API and the web dashboard (and, unless --no-worker, one in-process worker).
    Serve(serve::ServeArgs),
    /// Run a worker: claim jobs from the shared queue and train them.
    Worker(worker_cmd::WorkerArgs),
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: admin::KeysCommand,
    },
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// The server answers many small requests on few cores; mimalloc costs less per allocation
/// than the system allocator there (BENCHMARKS.md, control plane).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs go to stderr through a background writer thread, so a request never waits for a
/// `write` of its log line. The thread buffers what is waiting and writes it at once, flushing
/// whenever it has caught up (one `write` per burst, not per line). Nothing is dropped: a full
/// queue makes logging wait. The guard flushes what is left when `main` returns.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Cli {
        log_format,
        command,
    } = Cli::parse();
    let _log_guard = init_logging(log_format);
    let result = match command {
        Command::Serve(args) => serve::run(args).await,
        Command::Worker(args) => worker_cmd::run(args).await,
        Command::Keys { command } => admin::keys(command).await,
        Command::Client(command) => return client::run(command).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tuna: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
