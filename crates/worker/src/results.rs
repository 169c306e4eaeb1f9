//! The results CSV of a job (`fine-tune-results` file): one row per logged step with columns
//! `step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`. Evaluations fill the
//! validation columns of their step (classification jobs report their validation accuracy in
//! `valid_mean_token_accuracy`).

use std::collections::BTreeMap;

use tuna_core::protocol::{EvalMetrics, StepMetrics};

#[derive(Debug, Clone, Default, PartialEq)]
struct Row {
    train_loss: Option<f64>,
    train_accuracy: Option<f64>,
    valid_loss: Option<f64>,
    valid_accuracy: Option<f64>,
}

/// Accumulates step metrics and evaluations.
#[derive(Debug, Clone, Default)]
pub struct Results {
    rows: BTreeMap<i64, Row>,
}

impl Results {
    /// A `metrics` event.
    pub fn add_metrics(&mut self, m: &StepMetrics) {
        let row = self.rows.entry(m.step as i64).or_default();
        row.train_loss = Some(m.train_loss);
        row.train_accuracy = m.accuracy().or(row.train_accuracy);
    }

    /// An `eval` event.
    pub fn add_eval(&mut self, step: u64, m: &EvalMetrics) {
        let row = self.rows.entry(step as i64).or_default();
        row.valid_loss = Some(m.valid_loss);
        row.valid_accuracy = m.accuracy().or(row.valid_accuracy);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The CSV text.
    pub fn to_csv(&self) -> Vec<u8> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record([
            "step",
            "train_loss",
            "train_accuracy",
            "valid_loss",
            "valid_mean_token_accuracy",
        ]);
        let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
        for (step, r) in &self.rows {
            let _ = w.write_record([
                step.to_string(),
                f(r.train_loss),
                f(r.train_accuracy),
                f(r.valid_loss),
                f(r.valid_accuracy),
            ]);
        }
        w.into_inner().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, train_loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            train_loss,
            ..Default::default()
        }
    }

    #[test]
    fn rows_merge_by_step() {
        let mut r = Results::default();
        r.add_metrics(&StepMetrics {
            train_mean_token_accuracy: Some(0.25),
            ..step(1, 2.5)
        });
        r.add_metrics(&StepMetrics {
            train_accuracy: Some(0.5),
            ..step(2, 2.0)
        });
        r.add_eval(
            2,
            &EvalMetrics {
                valid_loss: 2.25,
                valid_accuracy: Some(0.75),
                ..Default::default()
            },
        );
        let text = String::from_utf8(r.to_csv()).unwrap();
        assert_eq!(
            text,
            "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,2.5,0.25,,\n2,2,0.5,2.25,0.75\n"
        );
    }
}
