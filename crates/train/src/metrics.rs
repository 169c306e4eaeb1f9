//! Evaluation metrics (accuracy, macro F1) and the numbers reported with each logged step.

use serde::{Deserialize, Serialize};

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

/// Result of one evaluation pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub valid_loss: f64,
    /// Causal LM: share of target tokens predicted exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_mean_token_accuracy: Option<f64>,
    /// Classification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_macro_f1: Option<f64>,
    pub valid_examples: usize,
}

/// One logged optimiser step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    /// Fractional epoch (1.5 = half way through the second epoch).
    pub epoch: f64,
    /// Mean loss per target of the logged step.
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_mean_token_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f64>,
    pub learning_rate: f64,
    /// Before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens per second since the previous log.
    pub tokens_per_second: f64,
    pub examples_per_second: f64,
    pub elapsed_seconds: f64,
    pub eta_seconds: f64,
    /// Tokens (non-padding) seen so far.
    pub trained_tokens: u64,
    /// CUDA only; libtorch's allocator statistics are not reachable through tch, so None.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
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
