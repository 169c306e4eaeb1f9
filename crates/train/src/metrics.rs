//! Evaluation metrics: accuracy and macro F1 (classification), RMSE with Pearson and Spearman
//! correlation (regression), micro / macro F1 and subset accuracy (multi-label), each as
//! scikit-learn / SciPy compute it. The numbers reported with each logged step and each
//! evaluation are protocol types (`tuna_core::protocol`), re-exported here.

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
