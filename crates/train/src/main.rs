//! `tuna-trainer`: runs one fine-tuning job per process (the worker starts it as a child).
//!
//! ```text
//! tuna-trainer run --model-dir DIR --spec spec.json --train-file F [--valid-file V]
//!                  --output-dir OUT [--resume-from CKPT_DIR] [--device auto|cpu|cuda]
//! tuna-trainer info --model-dir DIR
//! tuna-trainer bench-generate --model-dir DIR --prompts PROMPTS.json --batch B
//!                    --new-tokens N [--rounds R] [--device cpu|cuda] [--precision ..] [--threads T]
//! tuna-trainer serve [--device auto|cpu|cuda] [--precision auto|fp32|bf16]
//!                    [--memory-budget-mib MIB] [--threads T]
//! tuna-trainer bench --model-dir DIR --data BATCHES.json [--device cpu|cuda] [--precision ..]
//!                    [--lora-r R] [--packing] [--warmup W] [--steps N] [--threads T]
//!                    [--peak-tflops P]
//! ```
//! `bench` times the trainer's optimiser step on pre-tokenised batches and prints one JSON line
//! (see `tuna_train::bench`; `scripts/bench-train.sh` runs it against transformers).
//! `spec.json` is a serialised `tuna_core::spec::JobSpec`; the data files are in any format of
//! `tuna_core::data` (chosen by file name: `.csv`, `.tsv`, else JSONL). `--device` overrides the
//! spec's device.
//!
//! # Protocol
//! The events printed on stdout, the control lines read on stdin and the exit statuses are the
//! types of `tuna_core::protocol` (the worker reads them with the same types). `info` prints one
//! line: the model's `ModelInfo` as JSON. `serve` is the inference process: it reads
//! `InferRequest` lines on stdin and prints `InferEvent` lines (`tuna_train::serve`). Logs go
//! to stderr.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::Value;
use tuna_core::data::{read_all, Example, Format};
use tuna_core::protocol::{
    ControlLine, TrainerErrorCode, TrainerEvent, EXIT_ABORTED, EXIT_JOB_ERROR, EXIT_OK,
};
use tuna_core::spec::{Device, JobSpec, Precision};
use tuna_train::trainer::{self, Control, TrainInputs, TrainOutcome};
use tuna_train::Error;

#[derive(Parser)]
#[command(
    name = "tuna-trainer",
    about = "Runs one tuna fine-tuning job (the worker's child process)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train: prints JSON events on stdout, reads pause/cancel on stdin.
    Run {
        #[arg(long)]
        model_dir: PathBuf,
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        train_file: PathBuf,
        #[arg(long)]
        valid_file: Option<PathBuf>,
        #[arg(long)]
        output_dir: PathBuf,
        #[arg(long)]
        resume_from: Option<PathBuf>,
        /// auto, cpu or cuda (default: the spec's device).
        #[arg(long)]
        device: Option<Device>,
        /// Intra-op CPU threads (default: libtorch's choice).
        #[arg(long)]
        threads: Option<i32>,
    },
    /// Times greedy generation on a prompts file; prints one JSON line.
    BenchGenerate {
        #[arg(long)]
        model_dir: PathBuf,
        /// Prompts file written by `python/bench_generate_peer.py prepare`.
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value = "cpu")]
        device: Device,
        #[arg(long, default_value = "auto")]
        precision: Precision,
        #[arg(long)]
        threads: Option<i32>,
    },
    /// The inference process: completion requests on stdin, events on stdout.
    Serve {
        /// auto (CUDA when available), cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: Device,
        /// auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16.
        #[arg(long, default_value = "auto")]
        precision: Precision,
        /// Model weights kept loaded at most; the least recently used go first.
        #[arg(long, default_value_t = 8192)]
        memory_budget_mib: u64,
        /// Intra-op CPU threads (default: libtorch's choice).
        #[arg(long)]
        threads: Option<i32>,
    },
    /// Prints the model's facts (ModelInfo) as JSON.
    Info {
        #[arg(long)]
        model_dir: PathBuf,
    },
    /// Times training steps on a pre-tokenised batch file; prints one JSON line.
    Bench {
        #[arg(long)]
        model_dir: PathBuf,
        /// Batch file written by `python/bench_train_peer.py prepare`.
        #[arg(long)]
        data: PathBuf,
        /// auto (CUDA when available), cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// auto (bf16 on CUDA), fp32 or bf16.
        #[arg(long, default_value = "auto")]
        precision: Precision,
        /// LoRA rank on every linear layer (default: full fine-tune).
        #[arg(long)]
        lora_r: Option<i64>,
        #[arg(long, default_value_t = 32.0)]
        lora_alpha: f64,
        /// Dropout on the adapters' input (PEFT's lora_dropout).
        #[arg(long, default_value_t = 0.0)]
        lora_dropout: f64,
        /// Causal LM: pack each step's examples into rows of the file's max_len; classification: group them by length.
        #[arg(long)]
        packing: bool,
        /// Activation checkpointing: each layer runs again in the backward.
        #[arg(long)]
        gradient_checkpointing: bool,
        /// QLoRA with --lora-r: `nf4` stores the base's layer linears in 4-bit NF4 (checkpointing on).
        #[arg(long, value_parser = ["none", "nf4"], default_value = "none")]
        quantization: String,
        /// With --quantization nf4: keep the block absmaxes in fp32 (no double quantisation).
        #[arg(long)]
        no_double_quantization: bool,
        /// AdamW's moments: fp32, or bf16 with stochastic rounding.
        #[arg(long, value_parser = ["fp32", "bf16"], default_value = "fp32")]
        optimizer_moments: String,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        #[arg(long, default_value_t = 1.0)]
        max_grad_norm: f64,
        #[arg(long, default_value_t = 0.0)]
        weight_decay: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Intra-op CPU threads (default: libtorch's choice).
        #[arg(long)]
        threads: Option<i32>,
        /// The device's peak TFLOP/s (for the MFU).
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// Name of the case, echoed in the output.
        #[arg(long, default_value = "")]
        case: String,
    },
}

/// Prints one line on stdout (an event, or `info`'s / `bench`'s JSON) and flushes it.
fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn emit(ev: &TrainerEvent) {
    print_line(&ev.to_line());
}

/// Prints an `error` event; returns the exit status that goes with it.
fn fail(code: TrainerErrorCode, message: String, param: Option<&str>) -> i32 {
    emit(&TrainerEvent::Error {
        code,
        message,
        param: param.map(str::to_string),
    });
    EXIT_JOB_ERROR
}

fn code_of(e: &Error) -> TrainerErrorCode {
    match e {
        Error::OutOfMemory { .. } => TrainerErrorCode::OutOfMemory,
        Error::NonFiniteLoss { .. } => TrainerErrorCode::NanLoss,
        Error::Data(_) => TrainerErrorCode::InvalidData,
        Error::Config(_) | Error::Weights(_) => TrainerErrorCode::InvalidModel,
        _ => TrainerErrorCode::Internal,
    }
}

/// A data file's examples, or the message of an `invalid_data` error.
fn read_examples(path: &std::path::Path, what: &str) -> Result<Vec<(u64, Example)>, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot open the {what} {}: {e}", path.display()))?;
    let format = Format::from_filename(&path.to_string_lossy());
    read_all(std::io::BufReader::new(file), format, 10)
        .map_err(|report| format!("the {what} is invalid: {}", report.summary()))
}

fn main() {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Info { model_dir } => info(&model_dir),
        Cmd::Serve {
            device,
            precision,
            memory_budget_mib,
            threads,
        } => serve(device, precision, memory_budget_mib, threads),
        Cmd::BenchGenerate {
            model_dir,
            prompts,
            batch,
            new_tokens,
            rounds,
            device,
            precision,
            threads,
        } => bench_generate(
            model_dir, prompts, batch, new_tokens, rounds, device, precision, threads,
        ),
        Cmd::Bench {
            model_dir,
            data,
            device,
            precision,
            lora_r,
            lora_alpha,
            lora_dropout,
            packing,
            gradient_checkpointing,
            quantization,
            no_double_quantization,
            optimizer_moments,
            warmup,
            steps,
            lr,
            max_grad_norm,
            weight_decay,
            seed,
            threads,
            peak_tflops,
            case,
        } => {
            if let Some(t) = threads {
                tch::set_num_threads(t);
            }
            let result = trainer::resolve_device(device).and_then(|device| {
                tuna_train::bench::run(&tuna_train::bench::BenchOptions {
                    model_dir,
                    data,
                    device,
                    precision,
                    lora_r,
                    lora_alpha,
                    lora_dropout,
                    packing,
                    gradient_checkpointing,
                    quantization: (quantization == "nf4").then_some(
                        tuna_train::model::Nf4Options {
                            double_quant: !no_double_quantization,
                        },
                    ),
                    bf16_moments: optimizer_moments == "bf16",
                    warmup,
                    steps,
                    learning_rate: lr,
                    max_grad_norm,
                    weight_decay,
                    seed,
                    peak_tflops,
                    case,
                })
            });
            match result {
                Ok(v) => {
                    print_line(&v.to_string());
                    EXIT_OK
                }
                Err(e) => fail(code_of(&e), e.to_string(), None),
            }
        }
        Cmd::Run {
            model_dir,
            spec,
            train_file,
            valid_file,
            output_dir,
            resume_from,
            device,
            threads,
        } => {
            if let Some(t) = threads {
                tch::set_num_threads(t);
            }
            run(
                model_dir,
                spec,
                train_file,
                valid_file,
                output_dir,
                resume_from,
                device,
            )
        }
    };
    std::process::exit(code);
}

#[allow(clippy::too_many_arguments)]
fn bench_generate(
    model_dir: PathBuf,
    prompts: PathBuf,
    batch: usize,
    new_tokens: usize,
    rounds: usize,
    device: Device,
    precision: Precision,
    threads: Option<i32>,
) -> i32 {
    if let Some(t) = threads {
        tch::set_num_threads(t);
    }
    let run = trainer::resolve_device(device).and_then(|device| {
        tuna_train::bench_generate::run(&tuna_train::bench_generate::GenerateBench {
            model_dir,
            prompts,
            batch,
            new_tokens,
            rounds,
            device,
            precision,
        })
    });
    match run {
        Ok(v) => {
            print_line(&v.to_string());
            EXIT_OK
        }
        Err(e) => {
            eprintln!("bench-generate failed: {e}");
            EXIT_JOB_ERROR
        }
    }
}

/// Reads inference requests until `shutdown` or the end of stdin.
fn serve(device: Device, precision: Precision, budget_mib: u64, threads: Option<i32>) -> i32 {
    use tuna_core::protocol::{InferEvent, InferRequest};
    if let Some(t) = threads {
        tch::set_num_threads(t);
    }
    let emit = |ev: &InferEvent| print_line(&serde_json::to_string(ev).unwrap_or_default());
    let dev = match trainer::resolve_device(device) {
        Ok(d) => d,
        Err(e) => {
            emit(&InferEvent::Error {
                id: None,
                code: "invalid_request".into(),
                message: e.to_string(),
            });
            return EXIT_JOB_ERROR;
        }
    };
    let mut server =
        tuna_train::serve::Server::new(dev, trainer::base_kind(dev, precision), budget_mib << 20);
    emit(&InferEvent::Ready {
        device: format!("{dev:?}").to_lowercase(),
    });
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<InferRequest>(&line) {
            Ok(InferRequest::Complete(req)) => server.handle(&req, &mut |ev| emit(&ev)),
            Ok(InferRequest::Shutdown) => break,
            Err(e) => emit(&InferEvent::Error {
                id: None,
                code: "invalid_request".into(),
                message: format!("not a request: {e}"),
            }),
        }
    }
    EXIT_OK
}

fn info(model_dir: &std::path::Path) -> i32 {
    let hf = match tuna_train::models::read_config(model_dir) {
        Ok(h) => h,
        Err(e) => return fail(TrainerErrorCode::InvalidModel, e.to_string(), None),
    };
    let task = if hf.is_decoder() {
        tuna_train::model::TaskHead::CausalLm
    } else {
        tuna_train::model::TaskHead::SequenceClassification {
            id2label: vec!["0".into(), "1".into()],
            problem_type: Default::default(),
        }
    };
    let opts = tuna_train::model::LoadOptions {
        device: tch::Device::Cpu,
        base_kind: tch::Kind::Float,
        task,
        lora: None,
        freeze: Default::default(),
        init_seed: 0,
        quantization: None,
    };
    match tuna_train::load_model(model_dir, &opts) {
        Ok(m) => {
            print_line(
                &serde_json::to_value(m.info())
                    .unwrap_or(Value::Null)
                    .to_string(),
            );
            EXIT_OK
        }
        Err(e) => fail(TrainerErrorCode::InvalidModel, e.to_string(), None),
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    model_dir: PathBuf,
    spec_path: PathBuf,
    train_file: PathBuf,
    valid_file: Option<PathBuf>,
    output_dir: PathBuf,
    resume_from: Option<PathBuf>,
    device: Option<Device>,
) -> i32 {
    let spec: JobSpec = match std::fs::read_to_string(&spec_path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            return fail(
                TrainerErrorCode::Internal,
                format!("cannot read the job spec {}: {e}", spec_path.display()),
                None,
            )
        }
    };
    let device = match trainer::resolve_device(device.unwrap_or(spec.device)) {
        Ok(d) => d,
        Err(e) => return fail(TrainerErrorCode::Internal, e.to_string(), Some("device")),
    };
    let train = match read_examples(&train_file, "training file") {
        Ok(t) => t,
        Err(m) => return fail(TrainerErrorCode::InvalidData, m, Some("training_file")),
    };
    let valid = match valid_file
        .as_deref()
        .map(|p| read_examples(p, "validation file"))
        .transpose()
    {
        Ok(v) => v,
        Err(m) => return fail(TrainerErrorCode::InvalidData, m, Some("validation_file")),
    };

    let control = Arc::new(Control::new());
    {
        let control = control.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                match line.parse::<ControlLine>() {
                    Ok(ControlLine::Pause) => control.pause(),
                    Ok(ControlLine::Cancel) => control.cancel(),
                    Err(e) => tracing::warn!("ignoring it: {e}"),
                }
            }
            // EOF: the worker is gone. Stop at once.
            control.abort();
        });
    }
    tracing::info!(?device, model_dir = %model_dir.display(), "starting");
    let mut callback = |ev: TrainerEvent| emit(&ev);
    let inputs = TrainInputs {
        model_dir: &model_dir,
        spec: &spec,
        train_examples: &train,
        valid_examples: valid.as_deref(),
        output_dir: &output_dir,
        resume_from: resume_from.as_deref(),
        device,
    };
    let result = trainer::train(&inputs, &mut callback, &control);
    if control.is_aborted() {
        return EXIT_ABORTED;
    }
    match result {
        Ok(TrainOutcome::Done {
            final_dir,
            trained_tokens,
            steps,
            metrics,
        }) => {
            emit(&TrainerEvent::Done {
                trained_tokens,
                steps,
                final_dir,
                metrics,
            });
            EXIT_OK
        }
        Ok(TrainOutcome::Paused { checkpoint, step }) => {
            emit(&TrainerEvent::Paused { checkpoint, step });
            EXIT_OK
        }
        Ok(TrainOutcome::Cancelled { step }) => {
            emit(&TrainerEvent::Cancelled { step });
            EXIT_OK
        }
        Err(e) => {
            let param = match &e {
                Error::OutOfMemory { .. } => Some("batch_size"),
                Error::NonFiniteLoss { .. } => Some("learning_rate"),
                _ => None,
            };
            fail(code_of(&e), e.to_string(), param)
        }
    }
}
