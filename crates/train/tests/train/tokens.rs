//! Token classification (NER and tagging): the head on every family transformers has a
//! `*ForTokenClassification` class for, exported so that transformers and PEFT load it with the
//! same logits; jobs that learn tags on pre-split words, whose exports transformers' tokenizer
//! and `AutoModelForTokenClassification` read word for word as tuna does
//! (`python/check_tokens.py`), with seqeval's entity scores equal to tuna's evaluation.

use std::path::Path;

use serde_json::{json, Value};
use tch::{Kind, Tensor};
use tuna_core::data::{Example, Label};
use tuna_core::spec::Task;
use tuna_train::data::{featurize, split_validation, LabelMap};
use tuna_train::metrics::entity_scores;
use tuna_train::model::TaskHead;
use tuna_train::tokenizer::Tok;
use tuna_train::trainer::task_head;

use crate::export::{assert_exports_match, Export};
use crate::support::{cpu_options, fixture, forward_one, lock, python, run_check};
use crate::tasks::{final_dir, metric};
use crate::train_loop::{run, spec};

fn tags3() -> TaskHead {
    TaskHead::TokenClassification {
        id2label: vec!["B-PER".into(), "I-PER".into(), "O".into()],
    }
}

#[test]
fn token_classification_exports_load_in_transformers_and_peft_with_equal_logits() {
    let head = tags3;
    assert_exports_match(&[
        Export::new("bert_tok", "bert", head(), &["classifier", "layer.0"]).first(2),
        Export::new("bert_tok_lora", "bert", head(), &["lora_B", "classifier"])
            .lora(&["query", "value"])
            .first(2),
        Export::new("roberta_tok", "roberta", head(), &["classifier"]).first(0),
        Export::new("xlmr_tok_merged", "xlm-roberta", head(), &["lora_B"])
            .lora(&["query", "dense"])
            .merged()
            .first(0),
        Export::new("distilbert_tok", "distilbert", head(), &["classifier"]).first(2),
        Export::new("deberta_tok", "deberta-v3", head(), &["classifier"]).first(1),
        Export::new("deberta_odd_tok_lora", "deberta-odd", head(), &["lora_B"])
            .lora(&["query_proj", "value_proj"])
            .first(1),
        Export::new(
            "modernbert_tok",
            "modernbert",
            head(),
            &["classifier", "head"],
        )
        .first(1),
        Export::new(
            "modernbert_odd_tok",
            "modernbert-odd",
            head(),
            &["classifier"],
        )
        .first(1),
        Export::new("gpt2_tok", "gpt2", head(), &["classifier"]),
        Export::new("llama_tok_lora", "llama", head(), &["lora_B", "score"])
            .lora(&["q_proj", "v_proj"])
            .first(1),
        Export::new("qwen3_tok", "qwen3", head(), &["score"]).first(1),
        Export::new("mistral_tok", "mistral", head(), &["score"]).first(1),
        Export::new("gemma2_tok", "gemma2", head(), &["score"]).first(1),
        Export::new("phi3_tok_merged", "phi3", head(), &["lora_B"])
            .lora(&["qkv_proj"])
            .merged()
            .first(1),
    ]);
}

/// Sentences of a few fillers, person names (a first name, sometimes a surname) and places,
/// tagged in IOB2: names `B-PER I-PER`, places `B-LOC`.
fn ner_data(n: usize) -> Vec<(u64, Example)> {
    let first = ["john", "mary", "peter", "anna"];
    let last = ["smith", "jones", "brown"];
    let places = ["paris", "london", "berlin", "rome"];
    let verbs = [
        ["went", "to"],
        ["flew", "to"],
        ["lives", "in"],
        ["works", "in"],
    ];
    (0..n)
        .map(|i| {
            let mut tokens = vec![first[i % 4].to_string()];
            let mut tags = vec!["B-PER"];
            if i % 3 != 0 {
                tokens.push(last[(i / 3) % 3].to_string());
                tags.push("I-PER");
            }
            let v = verbs[(i / 2) % 4];
            tokens.extend(v.iter().map(|w| w.to_string()));
            tags.extend(["O", "O"]);
            tokens.push(places[(i * 7 / 3) % 4].to_string());
            tags.push("B-LOC");
            if i % 5 == 0 {
                tokens.extend(["and", "stayed"].map(String::from));
                tags.extend(["O", "O"]);
            }
            (
                i as u64 + 1,
                Example::Tagged {
                    tokens,
                    tags: tags.into_iter().map(|t| Label::Name(t.into())).collect(),
                },
            )
        })
        .collect()
}

/// What transformers makes of `rows` with the model in `dir` (`python/check_tokens.py`).
fn transformers_view(dir: &Path, rows: &[(u64, Example)], max_length: usize) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|(_, e)| match e {
            Example::Tagged { tokens, tags } => json!({"tokens": tokens, "tags": tags}),
            other => panic!("not a tagged record: {other:?}"),
        })
        .collect();
    run_check(
        "check_tokens.py",
        dir,
        &json!({"dir": dir, "max_length": max_length, "rows": rows}),
    )
}

/// Trains `model` on the NER sentences (evaluating after every step), checks that the entity
/// F1 clearly improves from the first step, then has
/// transformers read the validation rows: the same tokens, logits within 1e-4, the same tag
/// per word as tuna predicts, and seqeval's scores of them equal to tuna's last evaluation.
fn learns_and_transformers_agrees(model: &str, class: &str, max_length: usize) {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let data = ner_data(48);
    let s = spec(
        json!({"task": "token_classification", "n_epochs": 10, "batch_size": 8,
        "learning_rate": 3e-3, "log_interval": 1, "validation_split": 0.25, "eval_interval": 1,
        "max_seq_length": max_length}),
    );
    let r = run(&fixture(model), &s, &data, dir.path(), None, None);
    let (first, last) = (&r.evals[0], r.evals.last().unwrap());
    let (f0, f1) = (metric(first, "valid_f1"), metric(last, "valid_f1"));
    eprintln!("{model}: valid entity F1 {f0} -> {f1}");
    assert!(
        f1 > 0.8 && f1 > f0 + 0.3,
        "{model}: valid entity F1 {f0} -> {f1}"
    );
    assert!(metric(last, "valid_accuracy") > 0.9, "{last}");
    assert!(metric(last, "valid_loss") < metric(first, "valid_loss"));

    let fin = final_dir(&r.outcome);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], json!([class]));
    assert_eq!(
        cfg["id2label"],
        json!({"0": "B-LOC", "1": "B-PER", "2": "I-PER", "3": "O"})
    );
    assert!(cfg.get("problem_type").is_none_or(Value::is_null), "{cfg}");

    // The validation rows, as the trainer split them (seed 3).
    let (_, valid) = split_validation(&data, 0.25, 3);
    let labels = LabelMap::from_examples(&data);
    let head = task_head(Task::TokenClassification, Some(&labels));
    let tuna = tuna_train::load_model(fin, &cpu_options(head)).unwrap();
    let tok = Tok::load(fin, tuna.info().is_decoder).unwrap();
    let (feats, _) = featurize(
        &tok,
        Task::TokenClassification,
        &valid,
        max_length,
        Some(&labels),
        "valid",
    )
    .unwrap();
    let theirs = transformers_view(fin, &valid, max_length);
    let names = labels.id2label();
    let (mut truth, mut pred) = (Vec::new(), Vec::new());
    for (i, f) in feats.iter().enumerate() {
        assert_eq!(theirs["input_ids"][i], json!(f.input_ids), "row {i}");
        let logits = forward_one(tuna.as_ref(), f);
        let want = Tensor::from_slice(
            &theirs["logits"][i]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
                .collect::<Vec<f64>>(),
        )
        .view([f.input_ids.len() as i64, names.len() as i64]);
        let diff =
            f64::try_from((logits.get(0).to_kind(Kind::Double) - &want).abs().max()).unwrap();
        assert!(diff < 1e-4, "row {i}: logits differ by {diff}");
        // tuna's tag per word: the argmax at each position its labels score.
        let best: Vec<i64> = Vec::try_from(logits.get(0).argmax(-1, false)).unwrap();
        let (t, p): (Vec<String>, Vec<String>) = f
            .labels
            .iter()
            .zip(&best)
            .filter(|(l, _)| **l != -100)
            .map(|(l, b)| (names[*l as usize].clone(), names[*b as usize].clone()))
            .unzip();
        assert_eq!(theirs["pred"][i], json!(p), "row {i}");
        assert_eq!(theirs["truth"][i], json!(t), "row {i}");
        truth.push(t);
        pred.push(p);
    }
    // The scores tuna reported are seqeval's on these predictions.
    let e = entity_scores(&truth, &pred);
    for (key, ours) in [
        ("precision", e.precision),
        ("recall", e.recall),
        ("f1", e.f1),
    ] {
        let seqeval = metric(&theirs, key);
        assert!((ours - seqeval).abs() < 1e-9, "{key}: {ours} vs {seqeval}");
        let reported = metric(last, &format!("valid_{key}"));
        assert!(
            (reported - seqeval).abs() < 1e-9,
            "{key}: {reported} vs {seqeval}"
        );
    }
    let acc = metric(last, "valid_accuracy");
    assert!(
        (acc - metric(&theirs, "accuracy")).abs() < 1e-9,
        "{acc} {theirs}"
    );
}

#[test]
fn bert_learns_named_entities_and_transformers_reads_them_alike() {
    learns_and_transformers_agrees("bert", "BertForTokenClassification", 64);
}

/// Byte-level BPE, and a cut: with 8 tokens only the first words are scored, in both.
#[test]
fn roberta_learns_named_entities_with_words_cut_at_max_length() {
    learns_and_transformers_agrees("roberta", "RobertaForTokenClassification", 8);
}

/// Tag sequences with the cases IOB2 data ends up with (`I-` after `O`, a type change inside a
/// chunk, `E-`/`S-` tags, a sentence of `O` only): tuna's entity scores equal seqeval's.
#[test]
fn entity_scores_equal_seqeval() {
    let tags = [
        "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-PER", "I-ORG",
    ];
    let mut truth: Vec<Vec<&str>> = Vec::new();
    let mut pred: Vec<Vec<&str>> = Vec::new();
    for s in 0..40usize {
        let n = 1 + s % 7;
        let pick = |salt: usize, j: usize| {
            tags[((s * 31 + j * 17 + salt * 7).wrapping_mul(2_654_435_761) >> 9) % tags.len()]
        };
        truth.push((0..n).map(|j| pick(1, j)).collect());
        // Predictions: mostly the truth, some tags swapped.
        pred.push(
            (0..n)
                .map(|j| {
                    if (s + j) % 3 == 0 {
                        pick(2, j)
                    } else {
                        pick(1, j)
                    }
                })
                .collect(),
        );
    }
    truth.push(vec!["O", "O"]);
    pred.push(vec!["O", "B-PER"]);
    let code = "import json,sys\nfrom seqeval.metrics import precision_score as p, recall_score as r, f1_score as f\nt,q=json.load(sys.stdin)\nprint(json.dumps([p(t,q,zero_division=0),r(t,q,zero_division=0),f(t,q,zero_division=0)]))";
    let mut child = std::process::Command::new(python())
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(json!([truth, pred]).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let want: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    let e = entity_scores(&truth, &pred);
    let got = [e.precision, e.recall, e.f1];
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-12, "tuna {got:?} vs seqeval {want:?}");
    }
    assert!(want[2] > 0.1 && want[2] < 0.95, "a mixed case: {want:?}");
}

/// A validation tag the training data never had fails with its line; so does a record of
/// another shape.
#[test]
fn unseen_tags_and_other_shapes_fail_with_their_line() {
    let tok = Tok::load(&fixture("bert"), false).unwrap();
    let train = ner_data(4);
    let labels = LabelMap::from_examples(&train);
    let bad = vec![(
        9,
        Example::Tagged {
            tokens: vec!["john".into()],
            tags: vec![Label::Name("B-ORG".into())],
        },
    )];
    let e = featurize(
        &tok,
        Task::TokenClassification,
        &bad,
        32,
        Some(&labels),
        "v.jsonl",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("v.jsonl line 9") && e.contains("`B-ORG`"), "{e}");
    let text = vec![(
        4,
        Example::Text {
            text: "plain".into(),
        },
    )];
    let e = featurize(
        &tok,
        Task::TokenClassification,
        &text,
        32,
        Some(&labels),
        "t.jsonl",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("t.jsonl line 4"), "{e}");
}

/// The extractive question-answering head (the start and end logits of every position) on the
/// encoders and GPT-2: exports load in transformers' `AutoModelForQuestionAnswering` and PEFT
/// with the same logits. (The task itself, its data and its evaluation, is still to come.)
#[test]
fn question_answering_heads_export_with_transformers_logits() {
    let qa = || TaskHead::QuestionAnswering;
    assert_exports_match(&[
        Export::new("bert_qa", "bert", qa(), &["qa_outputs", "layer.1"]).first(2),
        Export::new("bert_qa_lora", "bert", qa(), &["lora_B", "qa_outputs"])
            .lora(&["query", "value"])
            .first(2),
        Export::new("roberta_qa", "roberta", qa(), &["qa_outputs"]).first(0),
        Export::new("xlmr_qa", "xlm-roberta", qa(), &["qa_outputs"]).first(0),
        Export::new("distilbert_qa", "distilbert-odd", qa(), &["qa_outputs"]).first(2),
        Export::new("deberta_qa", "deberta-v3", qa(), &["qa_outputs"]).first(1),
        Export::new("modernbert_qa", "modernbert", qa(), &["classifier", "head"]).first(1),
        Export::new("gpt2_qa_merged", "gpt2", qa(), &["lora_B"])
            .lora(&["c_attn"])
            .merged(),
    ]);
}
