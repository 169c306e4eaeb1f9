//! The results CSV of a job (`fine-tune-results` file): one row per logged step with columns
//! `step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`. Evaluations fill the
//! validation columns of their step (classification jobs report their validation accuracy in
//! `valid_mean_token_accuracy`).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

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

fn num(m: &Map<String, Value>, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| m.get(*k).and_then(Value::as_f64))
}

impl Results {
    /// A `metrics` event's fields.
    pub fn add_metrics(&mut self, m: &Map<String, Value>) {
        let Some(step) = m.get("step").and_then(Value::as_i64) else {
            return;
        };
        let row = self.rows.entry(step).or_default();
        row.train_loss = num(m, &["train_loss"]).or(row.train_loss);
        row.train_accuracy =
            num(m, &["train_mean_token_accuracy", "train_accuracy"]).or(row.train_accuracy);
    }

    /// An `eval` event's fields.
    pub fn add_eval(&mut self, m: &Map<String, Value>) {
        let Some(step) = m.get("step").and_then(Value::as_i64) else {
            return;
        };
        let row = self.rows.entry(step).or_default();
        row.valid_loss = num(m, &["valid_loss"]).or(row.valid_loss);
        row.valid_accuracy =
            num(m, &["valid_mean_token_accuracy", "valid_accuracy"]).or(row.valid_accuracy);
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
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn rows_merge_by_step() {
        let mut r = Results::default();
        r.add_metrics(&obj(
            json!({"step": 1, "train_loss": 2.5, "train_mean_token_accuracy": 0.25}),
        ));
        r.add_metrics(&obj(
            json!({"step": 2, "train_loss": 2.0, "train_accuracy": 0.5}),
        ));
        r.add_eval(&obj(
            json!({"step": 2, "valid_loss": 2.25, "valid_accuracy": 0.75}),
        ));
        let text = String::from_utf8(r.to_csv()).unwrap();
        assert_eq!(
            text,
            "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,2.5,0.25,,\n2,2,0.5,2.25,0.75\n"
        );
    }
}
