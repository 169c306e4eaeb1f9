//! Domain types of tuna, shared by the API, the queue, the worker and the trainer. No IO.
//!
//! - `ids`: prefixed random ids (`ftjob-…`, `file-…`, …).
//! - `status`: the job state machine.
//! - `spec`: the fine-tuning job request, its validation and the resolved [`spec::JobSpec`].
//! - `data`: dataset formats (JSONL chat / prompt-completion / text / text+label, CSV, TSV),
//!   parsed and checked line by line with line numbers and rule names.
//! - `hf_config`: Hugging Face `config.json` parsing (serde, one file per family; old and new key
//!   forms) and model facts.
//! - `memory`: will a job fit? Its peak memory estimated from config.json and the knobs.
//! - `protocol`: the worker ↔ `tuna-trainer` process boundary (stdout events, stdin control).

pub mod data;
pub mod hf_config;
pub mod ids;
pub mod memory;
pub mod protocol;
pub mod spec;
pub mod status;
