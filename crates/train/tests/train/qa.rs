//! Extractive question answering: jobs that learn to point at the answer in a context, long
//! contexts read in overlapping windows, and exports that transformers' question-answering
//! example (`python/check_qa.py`: `AutoModelForQuestionAnswering`, the tokenizer's windows,
//! `postprocess_qa_predictions`, SQuAD's scoring) reads window for window and answer for answer
//! as tuna does.

use serde_json::{json, Value};
use tuna_core::data::{Answer, Example};
use tuna_core::spec::Task;
use tuna_train::data::{featurize_with, split_validation, Target};
use tuna_train::metrics::{squad_normalize, squad_scores};
use tuna_train::model::TaskHead;
use tuna_train::tokenizer::Tok;
use tuna_train::trainer::qa_predictions;

use crate::support::{cpu_options, fixture, forward_one, lock, run_check};
use crate::tasks::{final_dir, metric};
use crate::train_loop::{run, spec};

/// "where does NAME live ?" over a context that says "NAME lives in CITY ." among filler
/// sentences (some contexts long enough to need several windows); every sixth question asks
/// for something the context does not say (SQuAD v2's unanswerable questions).
fn qa_data(n: usize) -> Vec<(u64, Example)> {
    let names = ["john", "mary", "peter", "anna"];
    let cities = ["paris", "london", "berlin", "rome", "madrid"];
    let filler = [
        "the cat sat on the mat .",
        "a dog ran in the park .",
        "it was a sunny day .",
    ];
    (0..n)
        .map(|i| {
            let name = names[i % 4];
            let city = cities[(i * 3 / 2) % 5];
            let mut parts: Vec<String> = (0..(i % 4) * 2)
                .map(|k| filler[(i + k) % 3].to_string())
                .collect();
            let at = parts.len() / 2;
            parts.insert(at, format!("{name} lives in {city} ."));
            let context = parts.join(" ");
            let (question, answers) = if i % 6 == 5 {
                (format!("where does {name} work ?"), vec![])
            } else {
                let start = context.find(&format!("in {city} .")).unwrap() + 3;
                let start = context[..start].chars().count();
                (
                    format!("where does {name} live ?"),
                    vec![Answer {
                        text: city.into(),
                        start,
                    }],
                )
            };
            (
                i as u64 + 1,
                Example::Answered {
                    question,
                    context,
                    answers,
                },
            )
        })
        .collect()
}

fn squad_row(e: &Example) -> Value {
    let Example::Answered {
        question,
        context,
        answers,
    } = e
    else {
        panic!("{e:?}")
    };
    json!({"question": question, "context": context, "answers": {
        "text": answers.iter().map(|a| &a.text).collect::<Vec<_>>(),
        "answer_start": answers.iter().map(|a| a.start).collect::<Vec<_>>()}})
}

/// Trains `model` on the questions (evaluating after every step) until SQuAD's F1 clearly
/// improves, then has transformers' example read the validation questions from the export:
/// the same windows, the same answers, the same exact match and F1 as tuna's last evaluation.
fn learns_and_transformers_agrees(model: &str, class: &str) {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let data = qa_data(60);
    let (max_len, stride) = (32usize, 8usize);
    let s = spec(
        json!({"task": "question_answering", "n_epochs": 12, "batch_size": 8,
        "learning_rate": 3e-3, "log_interval": 1, "validation_split": 0.25, "eval_interval": 1,
        "max_seq_length": max_len, "doc_stride": stride}),
    );
    let r = run(&fixture(model), &s, &data, dir.path(), None, None);
    let (first, last) = (&r.evals[0], r.evals.last().unwrap());
    let (f0, f1) = (metric(first, "valid_f1"), metric(last, "valid_f1"));
    eprintln!("{model}: valid SQuAD F1 {f0} -> {f1}");
    assert!(
        f1 > 0.7 && f1 > f0 + 0.3,
        "{model}: valid SQuAD F1 {f0} -> {f1}"
    );
    assert!(metric(last, "valid_exact_match") > 0.6, "{last}");

    let fin = final_dir(&r.outcome);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], json!([class]));

    let (_, valid) = split_validation(&data, 0.25, 3);
    let tuna = tuna_train::load_model(fin, &cpu_options(TaskHead::QuestionAnswering)).unwrap();
    let tok = Tok::load(fin, false).unwrap();
    let (feats, _) = featurize_with(
        &tok,
        Task::QuestionAnswering,
        &valid,
        max_len,
        stride,
        None,
        "v",
    )
    .unwrap();
    assert!(
        feats.len() > valid.len(),
        "some contexts need more than one window"
    );
    // tuna's logits of every window: the start logits, then the end logits.
    let rows: Vec<Vec<f32>> = feats
        .iter()
        .map(|f| {
            let logits = forward_one(tuna.as_ref(), f);
            Vec::try_from(logits.get(0).transpose(0, 1).reshape([-1])).unwrap()
        })
        .collect();
    let outputs: Vec<(Vec<f32>, &Target)> = rows
        .into_iter()
        .zip(feats.iter().map(|f| &f.target))
        .collect();
    let ours = qa_predictions(&outputs, true);
    let rows: Vec<Value> = valid.iter().map(|(_, e)| squad_row(e)).collect();
    let theirs = run_check(
        "check_qa.py",
        fin,
        &json!({"dir": fin, "max_length": max_len, "doc_stride": stride, "with_negative": true, "rows": rows}),
    );
    // The same windows, record by record.
    let mut k = 0;
    for (i, windows) in theirs["input_ids"].as_array().unwrap().iter().enumerate() {
        for w in windows.as_array().unwrap() {
            assert_eq!(w, &json!(feats[k].input_ids), "record {i}");
            k += 1;
        }
    }
    assert_eq!(k, feats.len());
    let preds: Vec<&str> = ours.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(theirs["predictions"], json!(preds));
    for key in ["exact_match", "f1"] {
        let (reported, want) = (metric(last, &format!("valid_{key}")), metric(&theirs, key));
        assert!(
            (reported - want).abs() < 1e-9,
            "{key}: tuna {reported}, transformers' example {want}"
        );
    }
}

#[test]
fn bert_learns_to_answer_and_transformers_example_agrees() {
    learns_and_transformers_agrees("bert", "BertForQuestionAnswering");
}

#[test]
fn roberta_learns_to_answer_and_transformers_example_agrees() {
    learns_and_transformers_agrees("roberta", "RobertaForQuestionAnswering");
}

/// SQuAD's normalisation and scores on the cases its script is known for.
#[test]
fn squad_scores_follow_the_official_script() {
    assert_eq!(
        squad_normalize("The  Eiffel-Tower, in PARIS!"),
        "eiffeltower in paris"
    );
    assert_eq!(squad_normalize("an apple a day"), "apple day");
    assert_eq!(squad_normalize("theory"), "theory");
    let golds = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(squad_scores("the Paris", &golds(&["Paris"])), (1.0, 1.0));
    let (em, f1) = squad_scores("in paris france", &golds(&["paris", "rome"]));
    assert_eq!(em, 0.0);
    assert!((f1 - 0.5).abs() < 1e-12, "{f1}");
    // An unanswerable question: only the empty answer scores.
    assert_eq!(squad_scores("", &[]), (1.0, 1.0));
    assert_eq!(squad_scores("paris", &[]), (0.0, 0.0));
}
