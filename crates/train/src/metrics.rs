//! Evaluation metrics: accuracy and macro F1 (classification), RMSE with Pearson and Spearman
//! correlation (regression), micro / macro F1 and subset accuracy (multi-label), each as
//! scikit-learn / SciPy compute it; entity scores as seqeval computes them (token
//! classification); answers read from span logits and scored as SQuAD does (question
//! answering). The numbers reported with each logged step and each
//! evaluation are protocol types (`tuna_core::protocol`), re-exported here.

use std::collections::BTreeMap;

pub use tuna_core::protocol::{EvalMetrics, StepMetrics};

/// Macro-averaged F1 over `num_classes` classes from (predicted, true) pairs. A class that is
/// neither predicted nor present counts as F1 = 0 only if it appears in the data or the
/// predictions (scikit-learn's behaviour for labels present); absent classes are skipped.
pub fn macro_f1(pairs: &[(i64, i64)], num_classes: usize) -> f64 {
    let mut tp = vec![0u64; num_classes];
    let mut fp = vec![0u64; num_classes];
    let mut fneg = vec![0u64; num_classes];
    for &(p, t) in pairs {
        let (p, t) = (p as usize, t as usize);
        if p >= num_classes || t >= num_classes {
            continue;
        }
        if p == t {
            tp[p] += 1;
        } else {
            fp[p] += 1;
            fneg[t] += 1;
        }
    }
    let mut sum = 0.0;
    let mut n = 0usize;
    for c in 0..num_classes {
        if tp[c] + fp[c] + fneg[c] == 0 {
            continue;
        }
        let denom = 2 * tp[c] + fp[c] + fneg[c];
        sum += 2.0 * tp[c] as f64 / denom as f64;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Index of the largest value (the first on ties; 0 for an empty row).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// Regression metrics of predictions against targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Regression {
    /// Root mean squared error.
    pub rmse: f64,
    /// None where it is undefined (fewer than two points, or a constant series).
    pub pearson: Option<f64>,
    /// Pearson correlation of the ranks (ties get their average rank, as `scipy.stats.spearmanr`).
    pub spearman: Option<f64>,
}

pub fn regression(pred: &[f64], truth: &[f64]) -> Regression {
    let n = pred.len().min(truth.len());
    let mse = pred
        .iter()
        .zip(truth)
        .map(|(p, t)| (p - t) * (p - t))
        .sum::<f64>()
        / n.max(1) as f64;
    Regression {
        rmse: mse.sqrt(),
        pearson: pearson(&pred[..n], &truth[..n]),
        spearman: pearson(&ranks(&pred[..n]), &ranks(&truth[..n])),
    }
}

fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 2 {
        return None;
    }
    let mx = x.iter().sum::<f64>() / n as f64;
    let my = y.iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    let r = sxy / (sxx * syy).sqrt();
    r.is_finite().then_some(r)
}

/// 1-based ranks, ties sharing their average rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|a, b| v[*a].total_cmp(&v[*b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in &order[i..=j] {
            out[*k] = avg;
        }
        i = j + 1;
    }
    out
}

/// Multi-label metrics over `num_labels` labels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiLabel {
    /// F1 of all (example, label) decisions pooled.
    pub micro: f64,
    /// The mean of each label's F1 over all labels; a label neither true nor predicted in the
    /// data scores 0 (scikit-learn's `f1_score(average="macro")` on indicator matrices).
    pub macro_: f64,
    /// Share of examples whose whole label set is predicted exactly (scikit-learn's
    /// `accuracy_score` on indicator matrices).
    pub subset_accuracy: f64,
}

pub fn multi_label_f1(pred: &[Vec<bool>], truth: &[Vec<bool>], num_labels: usize) -> MultiLabel {
    let mut tp = vec![0u64; num_labels];
    let mut fp = vec![0u64; num_labels];
    let mut fneg = vec![0u64; num_labels];
    let mut exact = 0usize;
    for (p, t) in pred.iter().zip(truth) {
        if p == t {
            exact += 1;
        }
        for l in 0..num_labels.min(p.len()).min(t.len()) {
            match (p[l], t[l]) {
                (true, true) => tp[l] += 1,
                (true, false) => fp[l] += 1,
                (false, true) => fneg[l] += 1,
                (false, false) => {}
            }
        }
    }
    let f1 = |tp: u64, fp: u64, fneg: u64| {
        let denom = 2 * tp + fp + fneg;
        if denom == 0 {
            0.0
        } else {
            2.0 * tp as f64 / denom as f64
        }
    };
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    MultiLabel {
        micro: f1(sum(&tp), sum(&fp), sum(&fneg)),
        macro_: (0..num_labels)
            .map(|l| f1(tp[l], fp[l], fneg[l]))
            .sum::<f64>()
            / num_labels.max(1) as f64,
        subset_accuracy: exact as f64 / pred.len().max(1) as f64,
    }
}

/// Entity-level scores of token classification (seqeval's default mode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entities {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// The entities of `sentences` of tags as seqeval's `get_entities` reads them (its default,
/// conlleval-compatible mode, not `mode="strict"`): the sentences joined with an `O` between
/// them; a tag's first character is its prefix (`B`, `I`, `E`, `S`, `O`) and what follows the
/// first `-` its type; a chunk starts at `B`/`S`, at an `I`/`E` after `O`, `E` or `S`, or
/// where the type changes, and ends where the next one starts or at `O`. Returns `(type,
/// first, last)` positions in the joined sequence. Written here because no Rust crate
/// reproduces seqeval, and the numbers must be the ones users compare with.
pub fn entities<S: AsRef<str>>(sentences: &[Vec<S>]) -> Vec<(String, usize, usize)> {
    let mut seq: Vec<&str> = Vec::new();
    for s in sentences {
        seq.extend(s.iter().map(AsRef::as_ref));
        seq.push("O");
    }
    seq.push("O");
    let split = |chunk: &str| -> (char, String) {
        let mut chars = chunk.chars();
        let tag = chars.next().unwrap_or('O');
        let rest = chars.as_str();
        let ty = match rest.split_once('-') {
            Some((_, t)) => t,
            None => rest,
        };
        (tag, if ty.is_empty() { "_".into() } else { ty.into() })
    };
    let end_of_chunk = |prev: char, tag: char, prev_type: &str, ty: &str| {
        matches!(prev, 'E' | 'S')
            || (matches!(prev, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
            || (prev != 'O' && prev != '.' && prev_type != ty)
    };
    let start_of_chunk = |prev: char, tag: char, prev_type: &str, ty: &str| {
        matches!(tag, 'B' | 'S')
            || (matches!(prev, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
            || (tag != 'O' && tag != '.' && prev_type != ty)
    };
    let (mut prev_tag, mut prev_type) = ('O', String::new());
    let mut begin = 0usize;
    let mut out = Vec::new();
    for (i, chunk) in seq.iter().enumerate() {
        let (tag, ty) = split(chunk);
        if end_of_chunk(prev_tag, tag, &prev_type, &ty) {
            out.push((prev_type.clone(), begin, i.saturating_sub(1)));
        }
        if start_of_chunk(prev_tag, tag, &prev_type, &ty) {
            begin = i;
        }
        prev_tag = tag;
        prev_type = ty;
    }
    out
}

/// seqeval's micro-averaged `precision_score`, `recall_score` and `f1_score` (0 where a
/// denominator is 0) of predicted against true tag sequences.
pub fn entity_scores<S: AsRef<str>>(truth: &[Vec<S>], pred: &[Vec<S>]) -> Entities {
    let t: std::collections::BTreeSet<_> = entities(truth).into_iter().collect();
    let p: std::collections::BTreeSet<_> = entities(pred).into_iter().collect();
    let correct = t.intersection(&p).count() as f64;
    let ratio = |a: f64, b: usize| if b == 0 { 0.0 } else { a / b as f64 };
    let f1 = ratio(2.0 * correct, t.len() + p.len());
    Entities {
        precision: ratio(correct, p.len()),
        recall: ratio(correct, t.len()),
        f1,
    }
}

/// Question answering: the start and end logits of one window and the context characters its
/// tokens cover (None outside the context), as [`qa_answer`] reads them.
pub struct QaLogits<'a> {
    pub start: &'a [f32],
    pub end: &'a [f32],
    pub offsets: &'a [Option<(usize, usize)>],
}

/// How many start and end positions [`qa_answer`] pairs, and the longest answer in tokens
/// (transformers' question-answering examples: `n_best_size` 20, `max_answer_length` 30).
pub const QA_N_BEST: usize = 20;
pub const QA_MAX_ANSWER_TOKENS: usize = 30;

/// A record's predicted answer from the logits of its windows, as transformers' examples
/// (`utils_qa.postprocess_qa_predictions`) read them: each window's 20 highest start and end
/// positions paired where both lie in the context, the end not before the start and at most
/// 30 tokens on; the best sum of logits wins. `with_negative` (SQuAD v2 data, where questions
/// may have no answer): the empty answer when the lowest `[CLS]` score of the windows beats
/// it. No candidate at all gives "empty", as there. Written here to be that function exactly
/// (its order of candidates and its ties included), which no crate provides.
pub fn qa_answer(windows: &[QaLogits<'_>], context: &[char], with_negative: bool) -> String {
    let top = |v: &[f32]| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|a, b| v[*b].total_cmp(&v[*a]));
        idx.truncate(QA_N_BEST);
        idx
    };
    // (score, character span); the null answer is the span (0, 0).
    let mut cands: Vec<(f32, (usize, usize))> = Vec::new();
    let mut null: Option<f32> = None;
    for w in windows {
        let score = w.start[0] + w.end[0];
        if null.is_none_or(|n| n > score) {
            null = Some(score);
        }
        let ends = top(w.end);
        for s in top(w.start) {
            for &e in &ends {
                let (Some(Some(a)), Some(Some(b))) = (w.offsets.get(s), w.offsets.get(e)) else {
                    continue;
                };
                if e < s || e - s + 1 > QA_MAX_ANSWER_TOKENS {
                    continue;
                }
                cands.push((w.start[s] + w.end[e], (a.0, b.1)));
            }
        }
    }
    let null_score = null.unwrap_or(0.0);
    if with_negative {
        cands.push((null_score, (0, 0)));
    }
    // A stable sort, as Python's `sorted`: equal scores keep their order.
    cands.sort_by(|a, b| b.0.total_cmp(&a.0));
    cands.truncate(QA_N_BEST);
    let text = |(a, b): (usize, usize)| -> String {
        context
            .get(a..b.min(context.len()))
            .unwrap_or_default()
            .iter()
            .collect()
    };
    let mut texts: Vec<(f32, String)> = cands.iter().map(|(sc, sp)| (*sc, text(*sp))).collect();
    if texts.is_empty() || (texts.len() == 1 && texts[0].1.is_empty()) {
        texts.insert(0, (0.0, "empty".into()));
    }
    if !with_negative {
        return texts.swap_remove(0).1;
    }
    let (score, best) = texts
        .into_iter()
        .find(|(_, t)| !t.is_empty())
        .unwrap_or((0.0, "empty".into()));
    if null_score - score > 0.0 {
        String::new()
    } else {
        best
    }
}

/// SQuAD's answer normalisation (its official evaluation script): lower case, punctuation
/// removed, the articles a/an/the removed as words, whitespace collapsed.
pub fn squad_normalize(s: &str) -> String {
    // string.punctuation
    const PUNCT: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
    let lower: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !PUNCT.contains(*c))
        .collect();
    // `\b(a|an|the)\b` over Python's word characters (letters, digits, `_`).
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if matches!(run.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in lower.chars() {
        if word(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// SQuAD's exact match and token F1 of `pred` against the best of `golds` (an unanswerable
/// question's gold is the empty answer), as SQuAD v2's script scores them.
pub fn squad_scores(pred: &str, golds: &[String]) -> (f64, f64) {
    // Golds that normalise to nothing do not count; none left: the empty answer.
    let mut golds: Vec<&str> = golds
        .iter()
        .map(String::as_str)
        .filter(|g| !squad_normalize(g).is_empty())
        .collect();
    if golds.is_empty() {
        golds.push("");
    }
    let p = squad_normalize(pred);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let mut best = (0.0f64, 0.0f64);
    for g in golds {
        let g = squad_normalize(g);
        let em = f64::from(u8::from(g == p));
        let gt: Vec<&str> = g.split_whitespace().collect();
        let f1 = if gt.is_empty() || pt.is_empty() {
            f64::from(u8::from(gt == pt))
        } else {
            let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
            for t in &gt {
                *counts.entry(t).or_default() += 1;
            }
            let mut same = 0i64;
            for t in &pt {
                if let Some(c) = counts.get_mut(t).filter(|c| **c > 0) {
                    *c -= 1;
                    same += 1;
                }
            }
            if same == 0 {
                0.0
            } else {
                let (pr, rc) = (same as f64 / pt.len() as f64, same as f64 / gt.len() as f64);
                2.0 * pr * rc / (pr + rc)
            }
        };
        best = (best.0.max(em), best.1.max(f1));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_matches_sklearn() {
        // sklearn.metrics.f1_score([0,0,1,1,2], [0,1,1,1,0], average="macro") over labels present
        // = mean(F1_0=0.5, F1_1=0.8, F1_2=0) = 0.4333...
        let pairs = [(0, 0), (1, 0), (1, 1), (1, 1), (0, 2)];
        assert!((macro_f1(&pairs, 3) - 0.433_333_333_333_333_3).abs() < 1e-12);
        assert_eq!(macro_f1(&[(1, 1), (0, 0)], 2), 1.0);
    }

    #[test]
    fn regression_matches_scipy() {
        // numpy / scipy: sqrt(mean_squared_error(y, x)), pearsonr(x, y), spearmanr(x, y)
        let y = [1.0, 2.0, 2.0, 4.5, 3.0];
        let x = [1.2, 1.9, 2.5, 4.0, 2.0];
        let r = regression(&x, &y);
        assert!((r.rmse - 0.556_776_436_283_002_2).abs() < 1e-12);
        assert!((r.pearson.unwrap() - 0.902_168_532_451_357_3).abs() < 1e-12);
        assert!((r.spearman.unwrap() - 0.820_782_681_668_123_3).abs() < 1e-12);
        assert_eq!(regression(&[1.0, 1.0], &[0.0, 2.0]).pearson, None);
    }

    #[test]
    fn multi_label_f1_matches_sklearn() {
        // sklearn f1_score(t, p, average="micro" / "macro"), accuracy_score(t, p)
        let b = |rows: &[[u8; 3]]| -> Vec<Vec<bool>> {
            rows.iter()
                .map(|r| r.iter().map(|v| *v == 1).collect())
                .collect()
        };
        let t = b(&[[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]);
        let p = b(&[[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]]);
        let m = multi_label_f1(&p, &t, 3);
        assert!((m.micro - 0.666_666_666_666_666_6).abs() < 1e-12);
        assert!((m.macro_ - 0.555_555_555_555_555_5).abs() < 1e-12);
        assert!((m.subset_accuracy - 0.25).abs() < 1e-12);
        // labels 1 and 2 neither true nor predicted: F1 0 each.
        let m = multi_label_f1(&b(&[[1, 0, 0], [0, 0, 0]]), &b(&[[1, 0, 0], [1, 0, 0]]), 3);
        assert!((m.macro_ - 0.222_222_222_222_222_2).abs() < 1e-12);
    }

    #[test]
    fn entities_read_as_seqeval_reads_them() {
        // seqeval.metrics.sequence_labeling.get_entities on the same lists.
        let seqs = vec![
            vec!["B-PER", "I-PER", "O", "B-LOC"],
            vec!["I-ORG", "I-ORG", "B-ORG", "I-LOC", "O", "S-MISC", "E-MISC"],
        ];
        let got = entities(&seqs);
        let want = [
            ("PER", 0, 1),
            ("LOC", 3, 3),
            ("ORG", 5, 6),
            ("ORG", 7, 7),
            ("LOC", 8, 8),
            ("MISC", 10, 10),
            ("MISC", 11, 11),
        ];
        let got: Vec<(&str, usize, usize)> =
            got.iter().map(|(t, a, b)| (t.as_str(), *a, *b)).collect();
        assert_eq!(got, want);
        let truth = vec![vec!["B-PER", "I-PER", "O", "B-LOC"]];
        let pred = vec![vec!["B-PER", "I-PER", "O", "O"]];
        let e = entity_scores(&truth, &pred);
        assert_eq!((e.precision, e.recall), (1.0, 0.5));
        assert!((e.f1 - 2.0 / 3.0).abs() < 1e-12);
        let none: Vec<Vec<&str>> = vec![vec!["O"]];
        assert_eq!(entity_scores(&none, &none).f1, 0.0);
    }
}
