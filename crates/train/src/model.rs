//! The contract between the model code (`models/`, `layers.rs`, `lora.rs`, `loader.rs`) and the
//! training code (`trainer.rs`, `data.rs`, `optim.rs`, `checkpoint.rs`). Everything the trainer
//! knows about a network goes through [`Model`].

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::Result;

/// What the network is trained for. Decides the head and the shape of `forward`'s output.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskHead {
    /// Next-token prediction: `forward` returns logits `[batch, seq, vocab]`.
    CausalLm,
    /// Sequence classification: `forward` returns logits `[batch, num_labels]`. Encoders read the
    /// first token (or the mean of the real tokens) through their family's head, as transformers'
    /// `*ForSequenceClassification` does (BERT: `classifier` on top of `bert.pooler`; RoBERTa:
    /// `classifier.dense` and `classifier.out_proj`; ...); decoders read the hidden state of the
    /// last non-padding token (`score`). `id2label[i]` names label `i`. Regression and
    /// multi-label classification are this head too, as in transformers, told apart by
    /// `problem_type` (regression has one output).
    SequenceClassification {
        id2label: Vec<String>,
        problem_type: ProblemType,
    },
    /// Token classification: `forward` returns logits `[batch, seq, num_labels]`, a linear
    /// layer on every position's last hidden state (after dropout), as transformers'
    /// `*ForTokenClassification` computes them (`classifier` on encoders and GPT-2, after
    /// ModernBERT's prediction head; `score` on the Llama-style decoders).
    TokenClassification { id2label: Vec<String> },
    /// Extractive question answering: `forward` returns `[batch, seq, 2]`, each position's
    /// start and end logits, from transformers' `*ForQuestionAnswering` head (`qa_outputs` on
    /// every position; ModernBERT's prediction head and `classifier`).
    QuestionAnswering,
}

impl TaskHead {
    /// A head read at every position (token classification, question answering).
    pub fn is_per_token(&self) -> bool {
        matches!(
            self,
            TaskHead::TokenClassification { .. } | TaskHead::QuestionAnswering
        )
    }

    /// The number of outputs of a head over the hidden states (None: the LM head); question
    /// answering's two are the start and end logits, `num_labels` 2 in config.json.
    pub fn num_outputs(&self) -> Option<i64> {
        match self {
            TaskHead::QuestionAnswering => Some(2),
            other => other.id2label().map(|l| l.len() as i64),
        }
    }

    /// The labels of a classification head (None: the LM head).
    pub fn id2label(&self) -> Option<&[String]> {
        match self {
            TaskHead::CausalLm | TaskHead::QuestionAnswering => None,
            TaskHead::SequenceClassification { id2label, .. }
            | TaskHead::TokenClassification { id2label } => Some(id2label),
        }
    }
}

/// transformers' `problem_type` of a `*ForSequenceClassification` head: which loss it trains
/// with and how its logits read (softmax, the number itself, a sigmoid per label).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProblemType {
    #[default]
    SingleLabel,
    Regression,
    MultiLabel,
}

impl ProblemType {
    /// The name config.json stores.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemType::SingleLabel => "single_label_classification",
            ProblemType::Regression => "regression",
            ProblemType::MultiLabel => "multi_label_classification",
        }
    }
}

/// LoRA settings (PEFT semantics: `scaling = alpha / r`, A initialised Kaiming-uniform, B zeros).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraOptions {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names as PEFT matches them: a target `q_proj` matches every module whose name ends
    /// with `.q_proj` (or equals it). `all-linear` means every linear layer but the output head.
    pub target_modules: Vec<String>,
}

/// Which base parameters stay fixed during a full fine-tune (ignored under LoRA, where every
/// base parameter is frozen).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FreezeOptions {
    pub embeddings: bool,
    /// Freeze transformer layers `0..first_n_layers`.
    pub first_n_layers: usize,
    /// Freeze parameters whose HF name matches any of these glob patterns (`*` wildcard).
    pub patterns: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Kind of the frozen/base weights (Float on CPU; BFloat16 possible on CUDA). Trainable
    /// parameters are always kept in Float (fp32 master weights).
    pub base_kind: Kind,
    pub task: TaskHead,
    pub lora: Option<LoraOptions>,
    pub freeze: FreezeOptions,
    /// Seed for the freshly initialised parameters (classification head, LoRA A).
    pub init_seed: i64,
    /// QLoRA: under LoRA, the frozen linear layers of the base stored in NF4 ([`crate::quant`])
    /// and dequantised in each forward.
    pub quantization: Option<Nf4Options>,
}

/// How NF4 stores the base ([`crate::quant::Nf4Weight`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nf4Options {
    /// Quantise the block absmaxes again (the QLoRA paper's double quantisation).
    pub double_quant: bool,
}

/// Architecture facts, read from config.json, that the trainer and the API need.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// config.json's `model_type` ("gpt2", "llama", "gemma3_text", "bert", "xlm-roberta", ...).
    pub model_type: String,
    /// [`tuna_core::hf_config::ArchFacts::family`] ("gpt2", "llama", "gemma", ...).
    pub family: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub max_positions: i64,
    pub is_decoder: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
}

/// Input of one forward pass. `input_ids` and `attention_mask` are `[batch, seq]` Int64 on the
/// model's device; `attention_mask` is 1 for real tokens and 0 for padding (padding on the right).
pub struct Batch<'a> {
    pub input_ids: &'a Tensor,
    pub attention_mask: &'a Tensor,
    /// Read by models whose [`Model::uses_token_type_ids`] says so (BERT); zeros when None.
    pub token_type_ids: Option<&'a Tensor>,
    /// Decoders only: several examples per row (see [`crate::data::collate_packed`]); the
    /// attention is causal within each example and positions restart per example.
    pub packed: Option<&'a crate::data::PackedLayout>,
}

/// The keys and values a causal LM has computed for the tokens so far (incremental decoding),
/// per layer `[b, kv_heads, T, head_dim]` each (GPT-2: `[b, heads, T, head_dim]`).
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the rows `rows` (a batch's unfinished sequences), in that order.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.f_index_select(0, rows)?;
            *v = v.f_index_select(0, rows)?;
        }
        Ok(())
    }
}

/// Appends `k` and `v` (`[b, h, t, d]`) to a layer's cache and returns the whole of both.
pub fn extend_kv(
    slot: &mut Option<(Tensor, Tensor)>,
    k: Tensor,
    v: Tensor,
) -> Result<(Tensor, Tensor)> {
    let (k, v) = match slot.take() {
        Some((pk, pv)) => (Tensor::f_cat(&[pk, k], 2)?, Tensor::f_cat(&[pv, v], 2)?),
        None => (k, v),
    };
    *slot = Some((k.shallow_clone(), v.shallow_clone()));
    Ok((k, v))
}

pub trait Model {
    fn info(&self) -> &ModelInfo;
    fn device(&self) -> Device;
    /// Whether `forward` reads [`Batch::token_type_ids`] (BERT's segment embeddings), so the
    /// trainer collates them.
    fn uses_token_type_ids(&self) -> bool {
        false
    }
    /// Logits as described by [`TaskHead`]. `train` turns dropout on.
    fn forward(&self, batch: &Batch<'_>, train: bool) -> Result<Tensor>;
    /// Incremental decoding (causal LMs): the next-token logits `[b, vocab]` after `batch`'s
    /// tokens, which follow those already in `cache` (`batch.attention_mask` covers both, left
    /// padded); their keys and values are appended to `cache`. No dropout, no graph.
    fn forward_step(&self, _batch: &Batch<'_>, _cache: &mut KvCache) -> Result<Tensor> {
        Err(crate::Error::Config(
            "this model has no incremental decoding".into(),
        ))
    }
    /// Loads a PEFT LoRA adapter folder into the model's LoRA weights (see
    /// `Core::load_adapter`).
    fn load_adapter(&self, _dir: &Path) -> Result<()> {
        Err(crate::Error::Config(
            "this model cannot load adapters".into(),
        ))
    }
    /// LongRoPE (Phi-3): the original context length past which the rotary frequencies switch
    /// to their long set. A cache made within it is computed again when a sequence grows past
    /// it, as transformers' Phi-3 `prepare_inputs_for_generation` does.
    fn rope_switch_length(&self) -> Option<i64> {
        None
    }
    /// Forward and backward of one batch with activation checkpointing: only each layer's
    /// input is kept through the forward, and each layer runs again in the backward.
    /// `backward` gets the logits, computes the loss and calls its backward.
    fn forward_backward_checkpointed(
        &self,
        batch: &Batch<'_>,
        train: bool,
        backward: &mut dyn FnMut(&Tensor) -> Result<()>,
    ) -> Result<()>;
    /// Encoders: `last_hidden_state [batch, seq, hidden]` in eval mode, as transformers' base
    /// model (`RobertaModel`, `DebertaV2Model`, ...) returns it; an error for decoders.
    fn last_hidden_state(&self, batch: &Batch<'_>) -> Result<Tensor>;
    /// Every parameter that receives gradients, by its Hugging Face (or PEFT) name, in a stable
    /// order. Biases and norm weights are recognised by name for the no-weight-decay group.
    fn trainable_parameters(&self) -> Vec<(String, Tensor)>;
    /// Every parameter, trainable or not, by Hugging Face name (LoRA tensors by PEFT name).
    fn all_parameters(&self) -> BTreeMap<String, Tensor>;
    /// Writes a checkpoint that transformers (full) or PEFT (adapter) loads unchanged:
    /// `config.json` + `model.safetensors` for full fine-tunes and for `merge_lora`;
    /// `adapter_config.json` + `adapter_model.safetensors` for LoRA. Tokenizer files are the
    /// caller's business.
    fn save_pretrained(&self, dir: &Path, merge_lora: bool) -> Result<()>;
    /// Overwrites the trainable parameters with tensors of the same names (resume).
    fn load_trainable(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()>;
    /// Load report for the user: heads initialised afresh, checkpoint tensors left unused.
    fn load_notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// QLoRA: the parameters stored in NF4 and the bytes they take (codes and scales).
    fn nf4_storage(&self) -> (u64, u64) {
        (0, 0)
    }
}
