//! Prefixed random ids in OpenAI's style: `ftjob-`, `file-`, `ftevent-`, `ftckpt-`, `org-`, `key-`.

use rand::distributions::Alphanumeric;
use rand::Rng;

pub const JOB: &str = "ftjob-";
pub const FILE: &str = "file-";
pub const EVENT: &str = "ftevent-";
pub const CHECKPOINT: &str = "ftckpt-";
pub const ORG: &str = "org-";
pub const API_KEY: &str = "key-";
pub const WORKER: &str = "worker-";

/// A new id: `prefix` followed by 24 random alphanumeric characters.
pub fn new_id(prefix: &str) -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

/// A new API key secret (`tuna-sk-` + 40 random characters).
pub fn new_secret() -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("tuna-sk-{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_differ() {
        let a = new_id(JOB);
        let b = new_id(JOB);
        assert!(a.starts_with("ftjob-") && a.len() == 30);
        assert_ne!(a, b);
    }
}
