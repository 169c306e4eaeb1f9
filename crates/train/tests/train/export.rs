//! Checkpoints tuna writes load unchanged in transformers and PEFT and compute the same logits.
//!
//! tuna writes (a) full fine-tunes (weights perturbed so they differ from the base), (b) LoRA
//! adapters with non-zero B (causal LM and, with the head in `modules_to_save`, classification),
//! (c) classification checkpoints with `id2label`, (d) merged LoRA weights. Then
//! `python/check_export.py` (run with `.venv/bin/python`, `HF_HUB_OFFLINE=1`) loads each with
//! transformers / `PeftModel.from_pretrained` and the logits must match tuna's within 1e-4.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tuna_train::load_model;
use tuna_train::loader::read_safetensors;
use tuna_train::model::{Batch, LoadOptions, LoraOptions, Model, Nf4Options, TaskHead};

use crate::support::{cpu_options, fixture, lock, python, workspace};

pub(crate) fn opts(task: TaskHead, lora: Option<LoraOptions>) -> LoadOptions {
    LoadOptions {
        lora,
        init_seed: 7,
        quantization: None,
        ..cpu_options(task)
    }
}

fn lora(targets: &[&str]) -> Option<LoraOptions> {
    Some(LoraOptions {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    })
}

/// Adds noise to every trainable parameter whose name contains one of `which` (all when empty).
fn perturb(model: &dyn Model, which: &[&str]) {
    // Seeds and draws from libtorch's process-wide generator.
    let _lock = lock();
    tch::manual_seed(11);
    let _g = tch::no_grad_guard();
    let mut n = 0;
    for (name, mut t) in model.trainable_parameters() {
        if which.is_empty() || which.iter().any(|w| name.contains(w)) {
            let noise = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.2;
            let _ = t.f_add_(&noise.to_kind(t.kind())).unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "nothing perturbed");
}

/// Two rows, the second right-padded with `pad`; real tokens avoid ids < 5 (specials, pad).
fn inputs(vocab: i64, pad: i64, first: Option<i64>) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let mut ids = vec![vec![0i64; 10], vec![0i64; 10]];
    let mut mask = vec![vec![1i64; 10], vec![1i64; 10]];
    for (r, row) in ids.iter_mut().enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = 5 + ((r as i64 * 37 + i as i64 * 101 + 13) % (vocab - 5));
        }
        if let Some(f) = first {
            row[0] = f;
        }
    }
    for i in 6..10 {
        ids[1][i] = pad;
        mask[1][i] = 0;
    }
    (ids, mask)
}

/// One checkpoint tuna exports.
pub(crate) struct Export {
    name: &'static str,
    /// The fixture it starts from.
    base: &'static str,
    task: TaskHead,
    lora: Option<LoraOptions>,
    /// Save LoRA merged into full weights.
    merge: bool,
    /// Trainable parameters to perturb, by part of their name (all when empty).
    perturb: &'static [&'static str],
    /// The first token of every row (BOS, or BERT's [CLS]).
    first_token: Option<i64>,
    /// QLoRA: the base's layer linears in NF4.
    nf4: Option<Nf4Options>,
}

pub(crate) fn three_labels() -> TaskHead {
    TaskHead::SequenceClassification {
        id2label: vec!["negative".into(), "neutral".into(), "positive".into()],
        problem_type: Default::default(),
    }
}

pub(crate) fn two_labels() -> TaskHead {
    TaskHead::SequenceClassification {
        id2label: vec!["bad".into(), "good".into()],
        problem_type: Default::default(),
    }
}

impl Export {
    pub(crate) fn new(
        name: &'static str,
        base: &'static str,
        task: TaskHead,
        perturb: &'static [&'static str],
    ) -> Export {
        Export {
            name,
            base,
            task,
            lora: None,
            merge: false,
            perturb,
            first_token: None,
            nf4: None,
        }
    }

    /// QLoRA over the LoRA set: the base's layer linears stored in NF4.
    pub(crate) fn nf4(self, double_quant: bool) -> Export {
        Export {
            nf4: Some(Nf4Options { double_quant }),
            ..self
        }
    }

    pub(crate) fn lora(self, targets: &[&str]) -> Export {
        Export {
            lora: lora(targets),
            ..self
        }
    }

    pub(crate) fn merged(self) -> Export {
        Export {
            merge: true,
            ..self
        }
    }

    pub(crate) fn first(self, token: i64) -> Export {
        Export {
            first_token: Some(token),
            ..self
        }
    }
}

/// Every kind of checkpoint tuna writes.
fn exports() -> Vec<Export> {
    let causal = || TaskHead::CausalLm;
    vec![
        // (a) full fine-tunes: GPT-2 (Conv1D layout, tied head) and Llama (GQA, untied head).
        Export::new(
            "gpt2_full",
            "gpt2",
            causal(),
            &["c_attn", "wte", "mlp.c_proj"],
        ),
        Export::new("llama_full", "llama", causal(), &[]).first(1),
        // (b) LoRA adapters with non-zero B.
        Export::new("llama_lora", "llama", causal(), &["lora_B"])
            .lora(&["all-linear"])
            .first(1),
        Export::new("gpt2_lora", "gpt2", causal(), &["lora_B"]).lora(&["c_attn", "c_fc"]),
        Export::new(
            "qwen2_lora_cls",
            "qwen2",
            three_labels(),
            &["lora_B", "score"],
        )
        .lora(&["q_proj", "v_proj"]),
        Export::new(
            "bert_lora_cls",
            "bert",
            two_labels(),
            &["lora_B", "classifier"],
        )
        .lora(&["query", "value"])
        .first(2),
        // (c) classification checkpoints with id2label.
        Export::new(
            "llama_tied_cls",
            "llama-tied",
            three_labels(),
            &["score", "layers.1"],
        )
        .first(1),
        Export::new("gpt2_cls", "gpt2", two_labels(), &["score"]),
        Export::new("bert_cls", "bert", two_labels(), &["classifier", "pooler"]).first(2),
        // (d) LoRA merged into full weights.
        Export::new("mistral_merged", "mistral", causal(), &["lora_B"])
            .lora(&["q_proj", "down_proj"])
            .merged()
            .first(1),
        Export::new("gpt2_merged", "gpt2", causal(), &["lora_B"])
            .lora(&["c_attn", "c_proj"])
            .merged(),
    ]
}

/// An exported checkpoint with its inputs and tuna's logits for them.
pub(crate) struct Case {
    pub name: String,
    pub task: TaskHead,
    pub spec: Value,
    pub tuna: Tensor,
}

pub(crate) fn to_tensor(v: &[Vec<i64>]) -> Tensor {
    let flat: Vec<i64> = v.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([v.len() as i64, -1])
}

pub(crate) fn forward(model: &dyn Model, ids: &Tensor, mask: &Tensor) -> Tensor {
    tch::no_grad(|| {
        model.forward(
            &Batch {
                input_ids: ids,
                attention_mask: mask,
                token_type_ids: None,
                packed: None,
            },
            false,
        )
    })
    .unwrap()
}

/// Loads `e.base`, perturbs it, computes its logits and saves it under `tmp/<name>`.
pub(crate) fn export(tmp: &Path, e: &Export) -> Case {
    let base_dir = fixture(e.base);
    let model = load_model(
        &base_dir,
        &LoadOptions {
            quantization: e.nf4,
            ..opts(e.task.clone(), e.lora.clone())
        },
    )
    .unwrap();
    perturb(model.as_ref(), e.perturb);
    let info = model.info().clone();
    let pad = info
        .pad_token_id
        .or(info.eos_token_ids.first().copied())
        .unwrap_or(0);
    let (ids, mask) = inputs(info.vocab_size, pad, e.first_token);
    let tuna = forward(model.as_ref(), &to_tensor(&ids), &to_tensor(&mask));
    let out = tmp.join(e.name);
    model.save_pretrained(&out, e.merge).unwrap();
    let is_lora = e.lora.is_some() && !e.merge;
    let task_name = match e.task {
        TaskHead::CausalLm => "causal_lm",
        TaskHead::SequenceClassification { .. } => "sequence_classification",
        TaskHead::TokenClassification { .. } => "token_classification",
        TaskHead::QuestionAnswering => "question_answering",
    };
    let base_kwargs = match &e.task {
        TaskHead::SequenceClassification { id2label, .. } => {
            json!({"num_labels": id2label.len(), "pad_token_id": pad})
        }
        TaskHead::TokenClassification { id2label } => json!({"num_labels": id2label.len()}),
        TaskHead::QuestionAnswering => json!({"num_labels": 2}),
        TaskHead::CausalLm => json!({}),
    };
    let mut spec = json!({
        "name": e.name, "kind": if is_lora { "lora" } else { "full" }, "task": task_name,
        "dir": out, "base": base_dir, "base_kwargs": base_kwargs,
        "input_ids": ids, "attention_mask": mask,
    });
    if let (Some(q), true) = (e.nf4, is_lora) {
        // A QLoRA adapter loads over the unquantised base; check_export.py then rounds the
        // base's layer linears through bitsandbytes' NF4 to reproduce what tuna trained over.
        spec["nf4_base"] = json!({"double_quant": q.double_quant});
    }
    Case {
        name: e.name.to_string(),
        task: e.task.clone(),
        spec,
        tuna,
    }
}

/// Exports the cases named (all of them when `names` is empty) into `tmp`.
fn export_cases(tmp: &Path, names: &[&str]) -> Vec<Case> {
    let cases: Vec<Case> = exports()
        .iter()
        .filter(|e| names.is_empty() || names.contains(&e.name))
        .map(|e| export(tmp, e))
        .collect();
    if !names.is_empty() {
        assert_eq!(cases.len(), names.len(), "unknown case among {names:?}");
    }
    cases
}

/// What transformers / PEFT made of the exports (`python/check_export.py`): one JSON line per
/// case, and the logits by case name.
pub(crate) fn check_export(tmp: &Path, cases: &[Case]) -> (Vec<Value>, BTreeMap<String, Tensor>) {
    let specs: Vec<Value> = cases.iter().map(|c| c.spec.clone()).collect();
    let cases_path = tmp.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_string(&specs).unwrap()).unwrap();
    let out_path = tmp.join("out.safetensors");
    let out = std::process::Command::new(python())
        .arg(workspace().join("python/check_export.py"))
        .arg(&cases_path)
        .arg(&out_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "check_export.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (lines, read_safetensors(&out_path).unwrap())
}

pub(crate) fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn exports_load_in_transformers_and_peft_with_equal_logits() {
    assert_exports_match(&exports());
}

/// Exports each of `list`, has transformers / PEFT load it (`python/check_export.py`) and
/// asserts their logits equal tuna's within 1e-4; prints the differences.
pub(crate) fn assert_exports_match(list: &[Export]) {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<Case> = list.iter().map(|e| export(tmp.path(), e)).collect();
    let (_, theirs) = check_export(tmp.path(), &cases);
    assert_equal_logits(&cases, &theirs);
}

/// Every case's logits equal transformers'/PEFT's within 1e-4 (the report goes to stderr).
pub(crate) fn assert_equal_logits(cases: &[Case], theirs: &BTreeMap<String, Tensor>) {
    let mut report = Vec::new();
    let mut bad = false;
    for c in cases {
        let want = &theirs[&c.name];
        assert_eq!(c.tuna.size(), want.size(), "{}: shapes differ", c.name);
        let mut d = (&c.tuna - want).abs();
        if c.task.is_per_token() {
            // Padding positions are never scored; where a sliding window leaves a pad query no
            // real key (ModernBERT), its output is whatever the masked softmax gives.
            let mask: Vec<Vec<i64>> =
                serde_json::from_value(c.spec["attention_mask"].clone()).unwrap();
            d *= to_tensor(&mask).unsqueeze(-1).to_kind(Kind::Float);
        }
        let diff = f64::try_from(d.max()).unwrap();
        report.push(format!("{}: max diff {diff:.2e}", c.name));
        bad |= diff >= 1e-4;
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        !bad,
        "logits differ from transformers/PEFT:\n{}",
        report.join("\n")
    );
}

#[test]
fn transformers_reads_the_labels_of_classification_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = export_cases(tmp.path(), &["llama_tied_cls", "bert_cls"]);
    let (lines, _) = check_export(tmp.path(), &cases);
    let mut seen = Vec::new();
    for v in &lines {
        match v["name"].as_str().unwrap() {
            "llama_tied_cls" => {
                assert_eq!(
                    v["id2label"],
                    json!({"0": "negative", "1": "neutral", "2": "positive"})
                );
                assert_eq!(
                    v["architectures"],
                    json!(["LlamaForSequenceClassification"])
                );
            }
            "bert_cls" => assert_eq!(v["id2label"], json!({"0": "bad", "1": "good"})),
            _ => {}
        }
        seen.push(v["name"].as_str().unwrap().to_string());
    }
    for name in ["llama_tied_cls", "bert_cls"] {
        assert!(
            seen.iter().any(|s| s == name),
            "no line for {name}: {lines:?}"
        );
    }
}

#[test]
fn lora_adapter_has_peft_config_and_key_names() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    export_cases(t, &["qwen2_lora_cls"]);
    let adapter = read_json(&t.join("qwen2_lora_cls/adapter_config.json"));
    assert_eq!(adapter["peft_type"], "LORA");
    assert_eq!(adapter["task_type"], "SEQ_CLS");
    assert_eq!(adapter["modules_to_save"], json!(["score"]));
    let keys = read_safetensors(&t.join("qwen2_lora_cls/adapter_model.safetensors")).unwrap();
    assert!(
        keys.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{:?}",
        keys.keys()
    );
    assert!(keys.contains_key("base_model.model.score.weight"));
}

#[test]
fn classification_config_names_the_labels() {
    let tmp = tempfile::tempdir().unwrap();
    export_cases(tmp.path(), &["bert_cls"]);
    let cfg = read_json(&tmp.path().join("bert_cls/config.json"));
    assert_eq!(
        cfg["architectures"],
        json!(["BertForSequenceClassification"])
    );
    assert_eq!(cfg["id2label"], json!({"0": "bad", "1": "good"}));
    assert_eq!(cfg["label2id"], json!({"bad": 0, "good": 1}));
}

#[test]
fn gpt2_export_keeps_the_conv1d_layout() {
    let tmp = tempfile::tempdir().unwrap();
    export_cases(tmp.path(), &["gpt2_full"]);
    let full = read_safetensors(&tmp.path().join("gpt2_full/model.safetensors")).unwrap();
    assert_eq!(
        full["transformer.h.0.attn.c_attn.weight"].size(),
        vec![64, 192],
        "Conv1D layout [in, out]"
    );
}

/// tuna reloads its own exports (prefixed `bert.`/`model.` keys, trained heads kept).
#[test]
fn tuna_reloads_its_own_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for c in export_cases(t, &["bert_cls", "llama_tied_cls", "gpt2_full"]) {
        assert_tuna_reloads(t, &c);
    }
}

/// tuna loads the full checkpoint `c` exported under `t` with no head initialised afresh, and
/// computes the same logits.
pub(crate) fn assert_tuna_reloads(t: &Path, c: &Case) {
    let name = &c.name;
    let m = load_model(&t.join(name), &opts(c.task.clone(), None)).unwrap();
    assert!(
        !m.load_notes().iter().any(|n| n.contains("initialised")),
        "{name}: {:?}",
        m.load_notes()
    );
    let ids =
        to_tensor(&serde_json::from_value::<Vec<Vec<i64>>>(c.spec["input_ids"].clone()).unwrap());
    let mask = to_tensor(
        &serde_json::from_value::<Vec<Vec<i64>>>(c.spec["attention_mask"].clone()).unwrap(),
    );
    let again = forward(m.as_ref(), &ids, &mask);
    let diff = f64::try_from((&again - &c.tuna).abs().max()).unwrap();
    assert!(diff < 1e-5, "{name}: reloaded export differs by {diff}");
}
