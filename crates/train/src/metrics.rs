//! Evaluation metrics (accuracy, macro F1). The numbers reported with each logged step and each
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
}
