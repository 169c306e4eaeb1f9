//! tuna-train's integration tests, one binary (libtorch is linked once), one module per area:
//!
//! - `parity`: logits and hidden states equal transformers' on the tiny fixtures; load errors;
//!   freezing, LoRA and gradients.
//! - `decoders`: Qwen3, Gemma 2 / 3, Phi-3 and OLMo 2: parity, facts, exports, training.
//! - `export`: checkpoints tuna writes load unchanged in transformers and PEFT.
//! - `encoders`: the encoders beyond BERT: parity, facts, training, exports.
//! - `packing`: packed rows and length groups give the unpacked losses and gradients.
//! - `unit`: AdamW against PyTorch, label masking with real tokenizers, bad data.
//! - `train_loop`: training runs: the loss goes down, resume repeats the uninterrupted run,
//!   accumulation, LoRA jobs, early stopping.
//! - `checkpointing`: activation checkpointing gives the ordinary backward's gradients.
//! - `quant`: NF4 quantisation equals bitsandbytes'; LoRA over an NF4 base is LoRA over the
//!   dequantised base.
//! - `tasks`: regression, multi-label classification and sentence pairs: they learn, and
//!   transformers' tokenizer, model and pipeline agree with tuna on the exports.
//! - `tokens`: token classification: exports on every family, NER jobs that learn, read word
//!   for word by transformers, with seqeval's entity scores.
//! - `qa`: extractive question answering: jobs that learn, long contexts in windows, answers
//!   and SQuAD scores equal to transformers' question-answering example's.
//! - `dpo`: preference tuning: DPO jobs that learn to prefer, resume, and refuse records of the
//!   other method.
//! - `generate`: KV-cache decoding: greedy output equal to transformers' `generate` on every
//!   causal-LM family, seeded sampling, stop tokens and sequences.
//! - `serve`: `tuna-trainer serve`, the inference process: requests in order, streaming, chat,
//!   errors, eviction past the memory budget.
//! - `cli`: the `tuna-trainer` binary as the worker runs it.
//! - `minilm`: the real all-MiniLM-L6-v2 fine-tuned on SST-2 (the slow one).
//!
//! `support` holds the set-up they share: fixtures, the venv's Python, the lock around
//! libtorch's process-wide random generator.

mod checkpointing;
mod cli;
mod decoders;
mod dpo;
mod encoders;
mod export;
mod generate;
mod minilm;
mod packing;
mod parity;
mod planner;
mod qa;
mod quant;
mod serve;
mod support;
mod tasks;
mod tokens;
mod train_loop;
mod unit;
