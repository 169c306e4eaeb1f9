//! The job state machine. Every transition, and the `tuna_db::queue` call that makes it (the
//! only code that writes a job's status):
//!
//! ```text
//!          insert_job                 insert_checked_job (files already checked at upload)
//!              │                        │                │
//!              ▼                        ▼                ▼
//!      validating_files ──────────▶ queued           failed
//!        │   finish_validation ok     │  ▲ ▲
//!        │                     claim  │  │ └──────────── resume ───────────┐
//!        │                            ▼  │ fail (attempts left),         paused ◀── request_pause
//!        │                         running  release, rescue_expired       ▲        (a queued job)
//!        │                          │ │ │ └─────────────────────────────────┘
//!        │                          │ │ │   release_paused; fail, release or rescue_expired
//!        │                          │ │ │   while a pause is requested
//!        │                          │ │ └─▶ succeeded   complete
//!        │                          │ └───▶ failed      fail (no attempts left), rescue_expired
//!        │                          │                   (worker lost max_infra_retries times)
//!        ▼                          └─────▶ cancelled   finish_cancelled; fail, release or
//!      failed (finish_validation error)                 rescue_expired while a cancel is requested
//!
//!   request_cancel: validating_files, queued or paused -> cancelled at once; running -> a
//!   request the worker honours (finish_cancelled).
//!   request_pause: queued -> paused at once; running -> a request the worker honours with a
//!   checkpoint (release_paused).
//! ```
//!
//! `succeeded`, `failed` and `cancelled` are terminal ([`JobStatus::is_terminal`]): nothing
//! leaves them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::ValidatingFiles,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown job status '{s}'"))
    }
}

/// For rows: the `status` column is text, decoded into the enum where the row is read.
impl TryFrom<String> for JobStatus {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
    }
}
