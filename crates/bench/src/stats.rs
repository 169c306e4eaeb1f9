//! Latency summaries (exact percentiles over every sample) and CPU accounting from `/proc`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

/// Summary of a set of latency samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    /// Summarises `samples` (sorted in place). Percentiles are nearest-rank.
    pub fn of(samples: &mut [Duration]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let rank = |p: f64| {
            let i = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            samples[i.clamp(1, samples.len()) - 1]
        };
        let total: f64 = samples.iter().map(|d| d.as_secs_f64()).sum();
        Summary {
            count: samples.len(),
            mean_ms: total * 1e3 / samples.len() as f64,
            p50_ms: ms(rank(50.0)),
            p90_ms: ms(rank(90.0)),
            p99_ms: ms(rank(99.0)),
            max_ms: ms(samples[samples.len() - 1]),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "n={} mean={:.2}ms p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
            self.count, self.mean_ms, self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        )
    }
}

/// Linux's user-space clock tick (`USER_HZ`), fixed at 100 on every architecture Linux runs.
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// CPU seconds (user + system) used so far by a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / CLOCK_TICKS_PER_S)
}

fn parent_pid(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The processes whose CPU time a phase reports: this bench, the tuna server, PostgreSQL (the
/// postmaster named by `<pg_dir>/postmaster.pid` and all its children).
#[derive(Debug, Clone, Default)]
pub struct CpuWatch {
    pub server_pid: Option<u32>,
    pub postmaster_pid: Option<u32>,
}

/// CPU seconds used by each watched party over a phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    pub bench_s: f64,
    pub server_s: Option<f64>,
    pub postgres_s: Option<f64>,
}

/// A reading taken at the start of a phase.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    bench: f64,
    server: Option<f64>,
    postgres: Option<f64>,
}

impl CpuWatch {
    /// Reads the postmaster's pid from a PostgreSQL data directory.
    pub fn postmaster_of(pg_dir: &Path) -> Option<u32> {
        let text = std::fs::read_to_string(pg_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    fn postgres_total(&self) -> Option<f64> {
        let pm = self.postmaster_pid?;
        let mut total = cpu_seconds(pm)?;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if parent_pid(pid) == Some(pm) {
                total += cpu_seconds(pid).unwrap_or(0.0);
            }
        }
        Some(total)
    }

    pub fn mark(&self) -> CpuMark {
        CpuMark {
            bench: cpu_seconds(std::process::id()).unwrap_or(0.0),
            server: self.server_pid.and_then(cpu_seconds),
            postgres: self.postgres_total(),
        }
    }

    /// CPU used since `start`. Backends that exited during the phase are not counted (the
    /// pools keep their connections, so this is rare).
    pub fn since(&self, start: &CpuMark) -> CpuUse {
        let now = self.mark();
        let diff = |a: Option<f64>, b: Option<f64>| Some((a? - b?).max(0.0));
        CpuUse {
            bench_s: (now.bench - start.bench).max(0.0),
            server_s: diff(now.server, start.server),
            postgres_s: diff(now.postgres, start.postgres),
        }
    }
}

impl fmt::Display for CpuUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}s"));
        write!(
            f,
            "cpu: bench={:.2}s server={} postgres={}",
            self.bench_s,
            opt(self.server_s),
            opt(self.postgres_s)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = Summary::of(&mut samples);
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p90_ms, 90.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(Summary::of(&mut []).count, 0);
        let mut one = vec![Duration::from_millis(7)];
        assert_eq!(Summary::of(&mut one).p99_ms, 7.0);
    }

    #[test]
    fn reads_own_cpu_time() {
        assert!(cpu_seconds(std::process::id()).is_some());
        assert!(cpu_seconds(u32::MAX).is_none());
    }
}
