//! tuna's training engine: loads Hugging Face checkpoints (GPT-2, the Llama family, Qwen3, Gemma
//! 2 and 3, Phi-3, OLMo 2; the encoders BERT, RoBERTa/XLM-R, DistilBERT, DeBERTa-v2/v3,
//! ModernBERT) into libtorch through tch, fine-tunes them (full, frozen layers or LoRA) for
//! causal-LM SFT or sequence classification, and writes checkpoints that transformers and PEFT
//! load unchanged.
//!
//! No database, no HTTP: the worker runs this crate's `tuna-trainer` binary in a child process.
//!
//! Layout:
//! - `model.rs`: the [`model::Model`] trait, the contract between model code and training code.
//! - model side: `loader.rs`, `layers.rs`, `lora.rs`, `freeze.rs`, `models/` (one architecture per
//!   file, the parameter builder and the export; config.json parsing is `tuna_core::hf_config`).
//! - training side: `tokenizer.rs`, `data.rs`, `optim.rs`, `schedule.rs`, `checkpoint.rs`, `trainer.rs`.
//! - `generate.rs`: text generation with a KV cache (greedy, seeded sampling, stop sequences).
//! - `serve.rs`: `tuna-trainer serve`, the inference process (requests on stdin, events on
//!   stdout, an LRU of loaded models within a memory budget).
//! - `bench.rs`: `tuna-trainer bench`, the training-speed benchmark against transformers;
//!   `bench_generate.rs`: `tuna-trainer bench-generate`, the generation-speed one.
//! - `memory.rs`: measured peak memory (metrics events, benchmarks).

pub mod bench;
pub mod bench_generate;
pub mod checkpoint;
pub mod data;
pub mod freeze;
pub mod generate;
pub mod layers;
pub mod loader;
pub mod lora;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod models;
pub mod optim;
pub mod quant;
pub mod schedule;
pub mod serve;
pub mod tokenizer;
pub mod trainer;

pub use models::load_model;

/// Errors of the training engine. Messages are meant for the user who submitted the job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("weights do not match the architecture: {0}")]
    Weights(String),
    #[error("data: {0}")]
    Data(String),
    #[error("out of memory on {device} with batch size {batch_size} and sequence length {seq_len}: lower the batch size or the maximum sequence length (or use gradient accumulation)")]
    OutOfMemory {
        device: String,
        batch_size: i64,
        seq_len: i64,
    },
    #[error("the loss became {value} at step {step}: lower the learning rate")]
    NonFiniteLoss { step: i64, value: f64 },
    #[error("cancelled")]
    Cancelled,
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
