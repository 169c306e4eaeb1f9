//! The client commands: `tuna files|jobs|download|models …` talk to a tuna server over HTTP.
//!
//! - Server: `--url` / `TUNA_URL` (default `http://127.0.0.1:8000`; a trailing `/v1` is
//!   accepted, as for the `openai` SDK).
//! - Key: `--api-key` / `TUNA_API_KEY`, else the contents of `<data-dir>/admin_key` (written by
//!   `tuna serve`; `--data-dir` / `TUNA_DATA_DIR`, default `.tuna`).
//! - Output: human tables, or the API's JSON with `--json`.
//! - Exit codes ([`Failure::code`]): 0 ok, 1 API/HTTP error (the API's message is printed),
//!   2 usage (bad flags, unreadable job or input file), 3 `jobs watch` saw the job end
//!   failed or cancelled.
//!
//! Modules: `http` (requests and API errors), `files`, `jobs` (create, list, control, events,
//! checkpoints), `watch` (live progress), `download` (resumable, sha256-checked artifacts),
//! `models`, `output` (tables and times).

mod download;
mod files;
mod http;
mod jobs;
mod models;
mod output;
mod watch;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

pub use download::DownloadArgs;
pub use files::FilesCommand;
pub use jobs::JobsCommand;
pub use models::ModelsCommand;

/// Where the server is, how to authenticate and how to print (accepted before or after the
/// subcommand, e.g. `tuna jobs --json list` or `tuna jobs list --json`).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection and output")]
pub struct ClientOpts {
    /// Base URL of the tuna server.
    #[arg(
        long,
        env = "TUNA_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    pub url: String,
    /// API key. Default: the contents of `<data-dir>/admin_key`, if that file exists.
    #[arg(long, env = "TUNA_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// tuna's state directory, where `tuna serve` writes `admin_key`.
    #[arg(long, env = "TUNA_DATA_DIR", default_value = ".tuna", global = true)]
    pub data_dir: PathBuf,
    /// Print the API's JSON instead of tables (one JSON document; NDJSON for `jobs watch`).
    #[arg(long, global = true)]
    pub json: bool,
}

/// The client subcommands, flattened into `tuna`'s top level.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Upload, list, show, fetch and delete files (`/v1/files`).
    Files {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: FilesCommand,
    },
    /// Create, list, control and follow fine-tuning jobs (`/v1/fine_tuning/jobs`).
    Jobs {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Download a job's fine-tuned model (or one checkpoint): resumable, sha256-checked.
    Download(DownloadArgs),
    /// Models: list and show through the API; `register` works on the database directly.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

/// Why a client command failed, and so its exit code.
#[derive(Debug)]
pub enum Failure {
    /// The server answered an error, could not be reached, or a transfer failed: exit 1.
    Api(String),
    /// Bad arguments or unreadable local input: exit 2.
    Usage(String),
    /// `jobs watch`: the job ended `failed` or `cancelled`: exit 3.
    JobEnded(String),
}

impl Failure {
    /// The process exit code for this failure.
    pub fn code(&self) -> u8 {
        match self {
            Failure::Api(_) => 1,
            Failure::Usage(_) => 2,
            Failure::JobEnded(_) => 3,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Api(m) | Failure::Usage(m) | Failure::JobEnded(m) => f.write_str(m),
        }
    }
}

/// The result of a client command.
pub type Result<T> = std::result::Result<T, Failure>;

/// Runs a client command and turns its outcome into the exit code (errors are printed to
/// stderr as `tuna: error: …`).
pub async fn run(command: ClientCommand) -> ExitCode {
    let result = match command {
        ClientCommand::Files { opts, command } => files::run(&opts, command).await,
        ClientCommand::Jobs { opts, command } => jobs::run(&opts, command).await,
        ClientCommand::Download(args) => download::run(args).await,
        ClientCommand::Models { command } => models::run(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::JobEnded(message)) => {
            eprintln!("tuna: {message}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("tuna: error: {e}");
            ExitCode::from(e.code())
        }
    }
}
