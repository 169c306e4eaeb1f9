//! The sequence-level tasks beside single-label classification: regression, multi-label
//! classification and sentence pairs. Each trains a tiny encoder through `trainer::train` until
//! its metric clearly improves, and its export runs in transformers as users will run it
//! (`python/check_tasks.py`: the tokenizer, `AutoModelForSequenceClassification` and the
//! text-classification pipeline) with tuna's tokens, logits and `problem_type`.

use std::path::Path;

use serde_json::{json, Value};
use tch::Kind;
use tuna_core::data::{Example, Label};
use tuna_core::spec::Task;
use tuna_train::data::{featurize, LabelMap};
use tuna_train::model::{ProblemType, TaskHead};
use tuna_train::tokenizer::Tok;
use tuna_train::trainer::{task_head, TrainOutcome};

use crate::support::{cpu_options, fixture, forward_one, lock, run_check};
use crate::train_loop::{run, spec};

/// A cheap deterministic pick (a multiplicative hash of `i` and `salt`), so the tests need no
/// random crate.
fn pick(i: usize, salt: usize, n: usize) -> usize {
    (i.wrapping_mul(2_654_435_761).wrapping_add(salt * 40_503) >> 7) % n
}

fn labeled(line: usize, text: String, pair: Option<String>, label: Label) -> (u64, Example) {
    (
        line as u64,
        Example::Labeled {
            text,
            text_pair: pair,
            label,
        },
    )
}

/// Sentence pairs whose target is in the second text only: a filler first text, then `k` of 0..=3
/// "good" words among "bad" ones; the label is `k / 2` (regression).
fn pair_regression_data() -> Vec<(u64, Example)> {
    let filler = ["alpha", "beta gamma", "delta", "gamma alpha"];
    (0..48)
        .map(|i| {
            let k = i % 4;
            let words: Vec<&str> = (0..3).map(|j| if j < k { "good" } else { "bad" }).collect();
            let mut words = words;
            words.rotate_left(pick(i, 1, 3));
            labeled(
                i + 2,
                filler[pick(i, 2, 4)].to_string(),
                Some(words.join(" ")),
                Label::Name(format!("{}", k as f64 / 2.0)),
            )
        })
        .collect()
}

/// Texts with words of three groups; each group present is a label.
fn multi_label_data() -> Vec<(u64, Example)> {
    let groups = [
        ("animal", ["cat", "dog"]),
        ("color", ["red", "blue"]),
        ("motion", ["run", "jump"]),
    ];
    (0..48)
        .map(|i| {
            let present = (i % 7) + 1; // a non-empty subset of the three groups, bit by bit
            let mut words = Vec::new();
            let mut labels = Vec::new();
            for (g, (name, ws)) in groups.iter().enumerate() {
                if present & (1 << g) != 0 {
                    words.push(ws[pick(i, g, 2)]);
                    labels.push(Label::Name(name.to_string()));
                }
            }
            if i % 8 == 7 {
                // Some records with no label at all.
                words = vec!["the", "a"];
                labels.clear();
            }
            (
                i as u64 + 2,
                Example::MultiLabeled {
                    text: words.join(" "),
                    text_pair: None,
                    labels,
                },
            )
        })
        .collect()
}

/// Pairs whose class is in the second text only ("yes ..." / "no ...").
fn pair_classification_data() -> Vec<(u64, Example)> {
    let filler = ["alpha beta", "gamma", "delta alpha", "beta"];
    let tails = ["one", "two", "three"];
    (0..40)
        .map(|i| {
            let (word, label) = if i % 2 == 0 {
                ("yes", "match")
            } else {
                ("no", "other")
            };
            labeled(
                i + 2,
                filler[pick(i, 3, 4)].to_string(),
                Some(format!("{word} {}", tails[pick(i, 4, 3)])),
                Label::Name(label.into()),
            )
        })
        .collect()
}

pub(crate) fn final_dir(outcome: &TrainOutcome) -> &Path {
    match outcome {
        TrainOutcome::Done { final_dir, .. } => final_dir,
        other => panic!("the run did not finish: {other:?}"),
    }
}

pub(crate) fn metric(eval: &Value, key: &str) -> f64 {
    eval[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {eval}"))
}

/// What transformers makes of `rows` with the model in `dir` (`python/check_tasks.py`).
fn transformers_view(dir: &Path, rows: &[(u64, Example)], max_length: usize) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|(_, e)| match e {
            Example::Labeled {
                text, text_pair, ..
            }
            | Example::MultiLabeled {
                text, text_pair, ..
            } => json!({"text": text, "text_pair": text_pair}),
            other => panic!("not a sequence-level record: {other:?}"),
        })
        .collect();
    run_check(
        "check_tasks.py",
        dir,
        &json!({"dir": dir, "max_length": max_length, "rows": rows}),
    )
}

/// Reloads the trained model in tuna, tokenises `rows` as training did and checks, row by row,
/// that transformers' tokens (ids and types), logits (1e-4) and pipeline scores agree with
/// tuna's. Returns transformers' view.
fn assert_transformers_agrees(
    dir: &Path,
    task: Task,
    labels: Option<&LabelMap>,
    rows: &[(u64, Example)],
    max_length: usize,
) -> Value {
    let head = task_head(task, labels);
    let model = tuna_train::load_model(dir, &cpu_options(head.clone())).unwrap();
    let tok = Tok::load(dir, false).unwrap();
    let (feats, _) = featurize(&tok, task, rows, max_length, labels, "test").unwrap();
    let theirs = transformers_view(dir, rows, max_length);
    let TaskHead::SequenceClassification {
        id2label,
        problem_type,
    } = &head
    else {
        panic!("{head:?}")
    };
    assert_eq!(theirs["problem_type"], json!(problem_type.as_str()));
    assert_eq!(theirs["num_labels"], json!(id2label.len()));
    for (i, f) in feats.iter().enumerate() {
        assert_eq!(theirs["input_ids"][i], json!(f.input_ids), "row {i}");
        if model.uses_token_type_ids() {
            assert_eq!(
                theirs["token_type_ids"][i],
                json!(f.token_type_ids),
                "row {i}"
            );
        }
        let logits = forward_one(model.as_ref(), f);
        let ours: Vec<f64> = Vec::try_from(logits.view([-1]).to_kind(Kind::Double)).unwrap();
        let their: Vec<f64> = theirs["logits"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(ours.len(), their.len());
        for (a, b) in ours.iter().zip(&their) {
            assert!(
                (a - b).abs() < 1e-4,
                "row {i}: logits {ours:?} vs {their:?}"
            );
        }
        // The pipeline reads the logits as problem_type says.
        let expected: Vec<f64> = match problem_type {
            ProblemType::Regression => ours.clone(),
            ProblemType::MultiLabel => ours.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect(),
            ProblemType::SingleLabel => {
                let m = ours.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = ours.iter().map(|x| (x - m).exp()).sum();
                ours.iter().map(|x| (x - m).exp() / z).collect()
            }
        };
        for (l, name) in id2label.iter().enumerate() {
            let score = theirs["pipeline"][i][name].as_f64().unwrap();
            assert!(
                (score - expected[l]).abs() < 1e-4,
                "row {i} label {name}: pipeline {score} vs {}",
                expected[l]
            );
        }
    }
    theirs
}

#[test]
fn regression_on_sentence_pairs_learns_and_exports_a_regression_head() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let data = pair_regression_data();
    let s = spec(
        json!({"task": "sequence_regression", "n_epochs": 12, "batch_size": 8,
        "learning_rate": 1e-3, "log_interval": 1, "validation_split": 0.25}),
    );
    let r = run(&fixture("roberta"), &s, &data, dir.path(), None, None);
    let (first, last) = (&r.evals[0], r.evals.last().unwrap());
    let (rmse0, rmse1) = (metric(first, "valid_rmse"), metric(last, "valid_rmse"));
    assert!(rmse1 < rmse0 * 0.5, "valid RMSE {rmse0} -> {rmse1}");
    assert!(metric(last, "valid_pearson") > 0.9, "{last}");
    assert!(metric(last, "valid_spearman") > 0.8, "{last}");
    assert!(last.get("valid_accuracy").is_none(), "{last}");
    let fin = final_dir(&r.outcome);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["problem_type"], "regression");
    assert_eq!(cfg["id2label"], json!({"0": "LABEL_0"}));
    let theirs = assert_transformers_agrees(fin, Task::SequenceRegression, None, &data[..8], 32);
    // RoBERTa lays a pair out as `<s> a </s></s> b </s>`.
    let ids = theirs["input_ids"][0].as_array().unwrap();
    let sep = |v: &Value| v == &json!(2);
    assert_eq!(ids.iter().filter(|v| sep(v)).count(), 3, "{ids:?}");
}

#[test]
fn multi_label_classification_learns_and_exports_a_multi_label_head() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let data = multi_label_data();
    let s = spec(
        json!({"task": "multi_label_classification", "n_epochs": 20, "batch_size": 8,
        "learning_rate": 2e-3, "log_interval": 1, "validation_split": 0.25}),
    );
    let r = run(&fixture("distilbert"), &s, &data, dir.path(), None, None);
    let (first, last) = (&r.evals[0], r.evals.last().unwrap());
    let (f0, f1) = (
        metric(first, "valid_micro_f1"),
        metric(last, "valid_micro_f1"),
    );
    assert!(f1 > 0.85 && f1 > f0 + 0.2, "valid micro F1 {f0} -> {f1}");
    assert!(metric(last, "valid_macro_f1") > 0.85, "{last}");
    assert!(metric(last, "valid_subset_accuracy") > 0.5, "{last}");
    assert!(
        metric(last, "valid_loss") < metric(first, "valid_loss"),
        "{first} {last}"
    );
    let fin = final_dir(&r.outcome);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["problem_type"], "multi_label_classification");
    assert_eq!(
        cfg["id2label"],
        json!({"0": "animal", "1": "color", "2": "motion"})
    );
    let labels = LabelMap::from_examples(&data);
    assert_transformers_agrees(
        fin,
        Task::MultiLabelClassification,
        Some(&labels),
        &data[..8],
        32,
    );
}

#[test]
fn sentence_pair_classification_reads_the_second_text() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let data = pair_classification_data();
    let s = spec(
        json!({"task": "sequence_classification", "n_epochs": 10, "batch_size": 8,
        "learning_rate": 2e-3, "log_interval": 1, "validation_split": 0.25}),
    );
    let r = run(&fixture("bert"), &s, &data, dir.path(), None, None);
    let last = r.evals.last().unwrap();
    assert!(metric(last, "valid_accuracy") >= 0.9, "{:?}", r.evals);
    let fin = final_dir(&r.outcome);
    let labels = LabelMap::from_examples(&data);
    let theirs = assert_transformers_agrees(
        fin,
        Task::SequenceClassification,
        Some(&labels),
        &data[..6],
        32,
    );
    // BERT marks the second text with token type 1.
    let types = theirs["token_type_ids"][0].as_array().unwrap();
    assert!(
        types.contains(&json!(0)) && types.contains(&json!(1)),
        "{types:?}"
    );
    // Truncation cuts the longer text first, as transformers' `longest_first`.
    let long = vec![labeled(
        2,
        "alpha beta gamma delta ".repeat(6),
        Some("yes one".into()),
        Label::Name("match".into()),
    )];
    let tok = Tok::load(fin, false).unwrap();
    let (f, stats) = featurize(
        &tok,
        Task::SequenceClassification,
        &long,
        12,
        Some(&labels),
        "t",
    )
    .unwrap();
    assert_eq!((f[0].input_ids.len(), stats.truncated), (12, 1));
    let theirs = transformers_view(fin, &long, 12);
    assert_eq!(theirs["input_ids"][0], json!(f[0].input_ids));
    assert_eq!(theirs["token_type_ids"][0], json!(f[0].token_type_ids));
}

#[test]
fn bad_records_of_the_new_tasks_name_their_line() {
    let tok = Tok::load(&fixture("bert"), false).unwrap();
    let reg = vec![
        labeled(2, "a".into(), None, Label::Int(1)),
        labeled(3, "b".into(), None, Label::Name("high".into())),
    ];
    let e = featurize(
        &tok,
        Task::SequenceRegression,
        &reg,
        16,
        None,
        "training file",
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("training file line 3: label `high` is not a number"),
        "{e}"
    );
    let multi = multi_label_data();
    let labels = LabelMap::from_examples(&multi);
    let unseen = vec![(
        9,
        Example::MultiLabeled {
            text: "x".into(),
            text_pair: None,
            labels: vec![Label::Name("animal".into()), Label::Name("plant".into())],
        },
    )];
    let e = featurize(
        &tok,
        Task::MultiLabelClassification,
        &unseen,
        16,
        Some(&labels),
        "validation file",
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("validation file line 9: label `plant` does not occur in the training data"),
        "{e}"
    );
    let e = featurize(
        &tok,
        Task::SequenceClassification,
        &multi,
        16,
        Some(&labels),
        "training file",
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("line 2: a `text_labels` record cannot train a sequence_classification job"),
        "{e}"
    );
}

#[test]
fn lora_multi_label_job_merges_into_a_multi_label_model() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let data = multi_label_data();
    let s = spec(
        json!({"task": "multi_label_classification", "n_epochs": 4, "batch_size": 8,
        "learning_rate": 5e-3, "log_interval": 1, "validation_split": 0.25, "lora_r": 4,
        "lora_alpha": 8, "lora_dropout": 0.0, "merge_lora": true}),
    );
    let r = run(&fixture("bert"), &s, &data, dir.path(), None, None);
    let (first, last) = (&r.evals[0], r.evals.last().unwrap());
    assert!(
        metric(last, "valid_loss") < metric(first, "valid_loss"),
        "{first} -> {last}"
    );
    let fin = final_dir(&r.outcome);
    let adapter: Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["task_type"], "SEQ_CLS");
    let merged = fin.join("merged");
    let labels = LabelMap::from_examples(&data);
    assert_transformers_agrees(
        &merged,
        Task::MultiLabelClassification,
        Some(&labels),
        &data[..4],
        32,
    );
}
