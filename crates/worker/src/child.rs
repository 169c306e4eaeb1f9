//! The trainer child process: spawning `tuna-trainer run …` in its own process group, reading
//! its JSON-line events from stdout, keeping the tail of its stderr, sending `pause` / `cancel`
//! on stdin and killing it (the whole group, SIGKILL) when it does not stop in time.
//!
//! The protocol (events on stdout, control lines on stdin, exit statuses) is
//! `tuna_core::protocol`, which the trainer writes with the same types; a run that ends with no
//! terminal event is a crash.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How many stderr lines are kept for crash messages.
const STDERR_TAIL: usize = 30;

pub use tuna_core::protocol::{ControlLine, TrainerEvent};

/// What to run.
#[derive(Debug, Clone)]
pub struct TrainerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
}

impl TrainerCommand {
    /// `tuna-trainer run --model-dir … --spec … --train-file … [--valid-file …] --output-dir …
    /// [--resume-from …] [--device …] [--threads …]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        trainer: &Path,
        model_dir: &Path,
        spec: &Path,
        train: &Path,
        valid: Option<&Path>,
        output: &Path,
        resume_from: Option<&Path>,
        device: Option<&str>,
        threads: Option<u32>,
    ) -> TrainerCommand {
        let p = |p: &Path| p.display().to_string();
        let mut args = vec![
            "run".to_string(),
            "--model-dir".into(),
            p(model_dir),
            "--spec".into(),
            p(spec),
        ];
        args.extend(["--train-file".into(), p(train)]);
        if let Some(v) = valid {
            args.extend(["--valid-file".into(), p(v)]);
        }
        args.extend(["--output-dir".into(), p(output)]);
        if let Some(r) = resume_from {
            args.extend(["--resume-from".into(), p(r)]);
        }
        if let Some(d) = device {
            args.extend(["--device".into(), d.to_string()]);
        }
        if let Some(t) = threads {
            args.extend(["--threads".into(), t.to_string()]);
        }
        TrainerCommand {
            program: trainer.to_path_buf(),
            args,
            env: vec![],
            cwd: None,
        }
    }
}

/// A running trainer.
pub struct TrainerProcess {
    child: Child,
    pid: Option<u32>,
    stdin: Option<ChildStdin>,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_task: Option<tokio::task::JoinHandle<()>>,
}

impl TrainerProcess {
    /// Starts the command in a process group of its own, killed when this value is dropped.
    pub fn spawn(cmd: &TrainerCommand) -> std::io::Result<TrainerProcess> {
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        for (k, v) in &cmd.env {
            c.env(k, v);
        }
        if let Some(d) = &cmd.cwd {
            c.current_dir(d);
        }
        let mut child = c.spawn()?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let stderr_task = child.stderr.take().map(|s| {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(s).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(target: "tuna_trainer", "{line}");
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if t.len() == STDERR_TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            })
        });
        Ok(TrainerProcess {
            child,
            pid,
            stdin,
            stdout,
            stderr_tail,
            stderr_task,
        })
    }

    /// The next stdout line, `None` at EOF (the child exited or closed stdout).
    pub async fn next_line(&mut self) -> Option<String> {
        let lines = self.stdout.as_mut()?;
        match lines.next_line().await {
            Ok(Some(l)) => Some(l),
            _ => {
                self.stdout = None;
                None
            }
        }
    }

    /// Sends one control line. Errors are ignored: a child that closed stdin is exiting anyway.
    pub async fn send(&mut self, line: ControlLine) {
        if let Some(stdin) = self.stdin.as_mut() {
            let ok = stdin
                .write_all(format!("{}\n", line.as_str()).as_bytes())
                .await
                .is_ok()
                && stdin.flush().await.is_ok();
            if !ok {
                self.stdin = None;
            }
        }
    }

    /// Closes stdin: the trainer stops at once without a checkpoint.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// SIGKILL to the child's whole process group.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = self.child.start_kill();
    }

    /// Waits for the exit (after stdout reached EOF, this returns promptly).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await;
        self.stdin = None;
        if let Some(t) = self.stderr_task.take() {
            // The pipe closes with the process; don't wait long for stragglers.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), t).await;
        }
        status
    }

    /// The last stderr lines.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr_tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// A human description of an exit status ("exit status 134", "killed by signal SIGSEGV").
pub fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| sig.to_string());
        format!("killed by signal {name}")
    } else {
        match status.code() {
            Some(c) => format!("exit status {c}"),
            None => "unknown exit status".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn sh(script: &str) -> TrainerCommand {
        TrainerCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            cwd: None,
        }
    }

    #[tokio::test]
    async fn reads_lines_and_control_goes_to_stdin() {
        // Answers the control line it receives (`cancel`) with its event (`cancelled`).
        let mut p = TrainerProcess::spawn(&sh(
            r#"echo '{"event":"phase","phase":"training","message":"x"}'; read l; echo "{\"event\":\"${l}led\",\"step\":0}"; echo oops >&2; exit 0"#,
        ))
        .unwrap();
        assert!(matches!(
            TrainerEvent::parse(&p.next_line().await.unwrap()),
            Ok(TrainerEvent::Phase { .. })
        ));
        p.send(ControlLine::Cancel).await;
        assert_eq!(
            TrainerEvent::parse(&p.next_line().await.unwrap()).unwrap(),
            TrainerEvent::Cancelled { step: 0 }
        );
        assert!(p.next_line().await.is_none());
        let st = p.wait().await.unwrap();
        assert!(st.success());
        assert_eq!(p.stderr_tail(), vec!["oops".to_string()]);
    }

    #[tokio::test]
    async fn kill_reaches_the_whole_group_and_reports_the_signal() {
        // A grandchild holding stdout open must die too, or EOF would never come.
        let mut p = TrainerProcess::spawn(&sh("sleep 60 & sleep 60; wait")).unwrap();
        let t0 = Instant::now();
        p.kill();
        assert!(tokio::time::timeout(Duration::from_secs(5), p.next_line())
            .await
            .unwrap()
            .is_none());
        let st = p.wait().await.unwrap();
        assert_eq!(describe_exit(&st), "killed by signal SIGKILL");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn stdin_eof_is_seen_by_the_child() {
        let mut p = TrainerProcess::spawn(&sh("cat >/dev/null; exit 3")).unwrap();
        p.close_stdin();
        assert!(p.next_line().await.is_none());
        assert_eq!(p.wait().await.unwrap().code(), Some(3));
    }

    #[tokio::test]
    async fn crash_status_is_described() {
        let mut p = TrainerProcess::spawn(&sh("kill -SEGV $$")).unwrap();
        assert!(p.next_line().await.is_none());
        assert_eq!(
            describe_exit(&p.wait().await.unwrap()),
            "killed by signal SIGSEGV"
        );
    }
}
