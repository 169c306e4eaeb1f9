//! `tuna-trainer serve`: the inference process. It reads [`InferRequest`] lines, keeps the
//! models it has loaded in a least-recently-used list within a memory budget, and answers each
//! request with [`InferEvent`]s (deltas while a streaming request generates, then `done`, or
//! `error`). A request that fails, a missing model or a libtorch panic alike, answers an error
//! and the process reads the next request.
//!
//! A LoRA adapter is applied over its base ([`Model::load_adapter`]): the adapters of one base
//! share one loaded copy of it (one per LoRA rank and target list), and switching between them
//! copies only the adapters' weights.

use std::path::{Path, PathBuf};

use tch::{Device, Kind};
use tuna_core::hf_config::HfConfig;
use tuna_core::protocol::{CompleteRequest, InferChoice, InferEvent, InferPrompt};

use crate::generate::{complete_streaming, Prompt, Sampling};
use crate::model::{FreezeOptions, LoadOptions, LoraOptions, Model, TaskHead};
use crate::tokenizer::Tok;
use crate::{Error, Result};

/// Why a request failed, as its `error` event's `code` says.
enum Failure {
    /// No model (or adapter) folder where the request says.
    NotFound(String),
    /// The model alone is larger than the memory budget.
    Memory(String),
    /// A bad request (no prompt, not a causal LM, an empty prompt).
    Request(String),
    /// Loading or generating failed.
    Engine(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        match e {
            Error::Data(m) => Failure::Request(m),
            e => Failure::Engine(e),
        }
    }
}

/// A loaded model: which folder, with which LoRA layout, and the adapter its LoRA weights
/// hold now.
struct Loaded {
    dir: PathBuf,
    lora: Option<LoraOptions>,
    adapter: Option<PathBuf>,
    model: Box<dyn Model>,
    tok: Tok,
    bytes: u64,
}

/// The inference process's state: the device, the kind weights are kept in and the loaded
/// models, least recently used first.
pub struct Server {
    device: Device,
    kind: Kind,
    budget: u64,
    loaded: Vec<Loaded>,
}

impl Server {
    /// `budget`: bytes of model weights kept loaded at most.
    pub fn new(device: Device, kind: Kind, budget: u64) -> Server {
        Server {
            device,
            kind,
            budget,
            loaded: Vec::new(),
        }
    }

    /// The folders loaded now, least recently used first.
    pub fn loaded(&self) -> Vec<PathBuf> {
        self.loaded.iter().map(|l| l.dir.clone()).collect()
    }

    /// Runs one request, handing its events to `emit`.
    pub fn handle(&mut self, req: &CompleteRequest, emit: &mut dyn FnMut(InferEvent)) {
        let id = req.id.clone();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.complete(req, emit)));
        let failure = match outcome {
            Ok(Ok(choices)) => {
                emit(InferEvent::Done { id, choices });
                return;
            }
            Ok(Err(f)) => f,
            Err(p) => Failure::Engine(Error::Other(anyhow::anyhow!(
                "libtorch failed: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ))),
        };
        let (code, message) = match failure {
            Failure::NotFound(m) => ("model_not_found", m),
            Failure::Memory(m) => ("insufficient_memory", m),
            Failure::Request(m) => ("invalid_request", m),
            Failure::Engine(e) => ("inference_error", e.to_string()),
        };
        emit(InferEvent::Error {
            id: Some(id),
            code: code.into(),
            message,
        });
    }

    fn complete(
        &mut self,
        req: &CompleteRequest,
        emit: &mut dyn FnMut(InferEvent),
    ) -> std::result::Result<Vec<InferChoice>, Failure> {
        if req.prompts.is_empty() {
            return Err(Failure::Request("the request has no prompt".into()));
        }
        let i = self.model(&req.model_dir, req.adapter_dir.as_deref(), emit)?;
        let m = &self.loaded[i];
        let prompts: Vec<Prompt> = req
            .prompts
            .iter()
            .map(|p| match p {
                InferPrompt::Text(t) => Prompt::Text(t.clone()),
                InferPrompt::Chat(turns) => Prompt::Chat(
                    turns
                        .iter()
                        .map(|t| (t.role.clone(), t.content.clone()))
                        .collect(),
                ),
            })
            .collect();
        let s = Sampling {
            max_tokens: req.max_tokens as usize,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k as usize,
            seed: req.seed,
            stop_token_ids: Vec::new(),
        };
        let id = req.id.clone();
        let stream = req.stream;
        let mut on_text = |index: usize, text: &str| {
            if stream {
                emit(InferEvent::Delta {
                    id: id.clone(),
                    index,
                    text: text.to_string(),
                });
            }
        };
        let out = complete_streaming(
            m.model.as_ref(),
            &m.tok,
            &prompts,
            &req.stop,
            &s,
            &mut on_text,
        )?;
        Ok(out
            .into_iter()
            .map(|c| InferChoice {
                text: c.text,
                finish_reason: c.finish.as_str().into(),
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.completion_tokens,
            })
            .collect())
    }

    /// The index of the loaded model for `dir` (with `adapter`'s weights), loading it (and
    /// evicting the least recently used ones beyond the budget) when needed; it becomes the
    /// most recently used.
    fn model(
        &mut self,
        dir: &Path,
        adapter: Option<&Path>,
        emit: &mut dyn FnMut(InferEvent),
    ) -> std::result::Result<usize, Failure> {
        if !dir.join("config.json").is_file() {
            return Err(Failure::NotFound(format!("no model at {}", dir.display())));
        }
        let lora = match adapter {
            Some(a) => {
                if !a.join("adapter_config.json").is_file() {
                    return Err(Failure::NotFound(format!("no adapter at {}", a.display())));
                }
                Some(crate::models::adapter_options(a)?.0)
            }
            None => None,
        };
        let found = self
            .loaded
            .iter()
            .position(|l| l.dir == dir && l.lora == lora);
        let i = match found {
            Some(i) => i,
            None => {
                let need = self.estimate(dir)?;
                if need > self.budget {
                    return Err(Failure::Memory(format!(
                        "{} needs about {} MiB of weights; the inference budget is {} MiB",
                        dir.display(),
                        need >> 20,
                        self.budget >> 20
                    )));
                }
                while !self.loaded.is_empty()
                    && self.loaded.iter().map(|l| l.bytes).sum::<u64>() + need > self.budget
                {
                    let old = self.loaded.remove(0);
                    emit(InferEvent::Evicted { model_dir: old.dir });
                }
                let opts = LoadOptions {
                    device: self.device,
                    base_kind: self.kind,
                    task: TaskHead::CausalLm,
                    lora: lora.clone(),
                    freeze: FreezeOptions::default(),
                    init_seed: 0,
                    quantization: None,
                };
                let model = crate::load_model(dir, &opts)?;
                if !model.info().is_decoder {
                    return Err(Failure::Request(format!(
                        "{} is not a causal language model",
                        dir.display()
                    )));
                }
                let tok =
                    Tok::load(adapter.unwrap_or(dir), true).or_else(|_| Tok::load(dir, true))?;
                let bytes = model
                    .all_parameters()
                    .values()
                    .map(|t| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64)
                    .sum();
                emit(InferEvent::Loaded {
                    model_dir: dir.to_path_buf(),
                    bytes,
                });
                self.loaded.push(Loaded {
                    dir: dir.to_path_buf(),
                    lora,
                    adapter: None,
                    model,
                    tok,
                    bytes,
                });
                self.loaded.len() - 1
            }
        };
        let l = self.loaded.remove(i);
        self.loaded.push(l);
        let last = self.loaded.len() - 1;
        let l = &mut self.loaded[last];
        if let Some(a) = adapter {
            if l.adapter.as_deref() != Some(a) {
                l.model.load_adapter(a)?;
                l.adapter = Some(a.to_path_buf());
            }
        }
        Ok(last)
    }

    /// The bytes `dir`'s weights take in the kind they are kept in.
    fn estimate(&self, dir: &Path) -> Result<u64> {
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| Error::io(format!("reading {}/config.json", dir.display()), e))?;
        let hf = HfConfig::parse(&text).map_err(|e| Error::Config(e.to_string()))?;
        Ok(hf.num_parameters().max(0) as u64 * self.kind.elt_size_in_bytes() as u64)
    }
}
