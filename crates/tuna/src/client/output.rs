//! Human output: aligned tables, `key: value` blocks, times and sizes; and `--json` printing.

use chrono::{TimeZone, Utc};
use serde_json::Value;
use tuna_core::status::JobStatus;

/// A job object's `status`, decoded (None when absent or unknown to this client).
pub fn job_status(job: &Value) -> Option<JobStatus> {
    job["status"].as_str()?.parse().ok()
}

/// Whether a job object shows a status after which the job never changes.
pub fn is_terminal(job: &Value) -> bool {
    job_status(job).is_some_and(JobStatus::is_terminal)
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A list envelope around `items` (for `--all`, which merges pages).
pub fn list_envelope(items: Vec<Value>) -> Value {
    serde_json::json!({"object": "list", "data": items, "has_more": false})
}

/// Prints rows under headers, columns padded to their widest cell (the last is not padded).
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                out.push_str(c);
                let pad = widths[i].saturating_sub(c.chars().count()) + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `key: value` lines with the keys aligned; long values are wrapped at spaces.
pub fn fields(pairs: &[(&str, String)]) {
    const WIDTH: usize = 100;
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in pairs {
        let mut lines: Vec<String> = Vec::new();
        let mut cur = String::new();
        for word in v.split(' ') {
            if !cur.is_empty() && w + 2 + cur.len() + 1 + word.len() > WIDTH {
                lines.push(std::mem::take(&mut cur));
            }
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
        lines.push(cur);
        let key = format!("{k}:");
        println!("{key:<w$}  {}", lines[0]);
        for line in &lines[1..] {
            println!("{:<w$}  {line}", "");
        }
    }
}

/// A Unix-seconds value as `YYYY-MM-DD HH:MM:SS` UTC, or `-`.
pub fn time(v: &Value) -> String {
    v.as_i64()
        .and_then(|t| Utc.timestamp_opt(t, 0).single())
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

/// A string field, a number, or `-` for null/missing.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A byte count in B, KiB, MiB or GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Seconds as `1h 02m`, `3m 07s` or `12s`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// A metric value: 4 significant decimals for floats, integers as they are.
pub fn metric(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => n
            .as_f64()
            .map(|f| format!("{f:.4}"))
            .unwrap_or_else(|| n.to_string()),
        other => text(other),
    }
}

/// Metrics worth showing in a summary: step, epoch, losses and each task's measures
/// (accuracies, F1, RMSE, correlations), not rates, timings or the learning rate of one step.
pub fn is_summary_metric(k: &str) -> bool {
    const MEASURES: [&str; 9] = [
        "accuracy",
        // DPO's rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins
        "rewards/",
        "exact_match",
        "f1",
        "precision",
        "recall",
        "rmse",
        "pearson",
        "spearman",
    ];
    matches!(k, "step" | "epoch")
        || ((k.starts_with("train_") || k.starts_with("valid_") || k.starts_with("full_valid_"))
            && (k.ends_with("loss") || MEASURES.iter().any(|m| k.contains(m))))
}

/// `k=v` pairs of the numeric summary entries ([`is_summary_metric`]) of a metrics object.
pub fn metrics_line(m: &Value) -> String {
    m.as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, v)| v.is_number() && is_summary_metric(k))
                .map(|(k, v)| format!("{k}={}", metric(v)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn summaries_show_every_task_s_measures() {
        for k in [
            "valid_loss",
            "valid_accuracy",
            "valid_macro_f1",
            "valid_micro_f1",
            "valid_rmse",
            "valid_pearson",
            "valid_spearman",
            "valid_subset_accuracy",
            "valid_precision",
            "valid_recall",
            "valid_f1",
            "valid_exact_match",
            "valid_rewards/margins",
            "train_rewards/accuracies",
            "train_mean_token_accuracy",
        ] {
            assert!(is_summary_metric(k), "{k}");
        }
        for k in [
            "learning_rate",
            "tokens_per_second",
            "valid_examples",
            "grad_norm",
        ] {
            assert!(!is_summary_metric(k), "{k}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(time(&json!(0)), "1970-01-01 00:00:00");
        assert_eq!(time(&Value::Null), "-");
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(duration(3725.0), "1h 02m");
        assert_eq!(duration(187.0), "3m 07s");
        assert_eq!(duration(9.4), "9s");
        assert_eq!(
            metrics_line(&json!({"step": 3, "train_loss": 1.23456, "x": "s", "eta_seconds": 1})),
            "step=3 train_loss=1.2346"
        );
    }
}
