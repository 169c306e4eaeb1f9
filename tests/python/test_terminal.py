"""`tuna jobs watch` in a real terminal (a pseudo-terminal of its own, 120 columns), following a
job that trains on the live server: the progress bar with step of total, loss, tokens per
second and time left, redrawn in place; and, through a pipe, the plain lines without a bar."""

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from conftest import BINARY
from test_dashboard import Api, lines

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(args, env, timeout=240, columns=120):
    """Runs a command with a pseudo-terminal as stdin, stdout and stderr; returns its exit
    code and everything it wrote to the terminal."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's last writer is gone
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"{args} still running after {timeout}s:\n{out.decode(errors='replace')[-3000:]}")
        return proc.wait(timeout=30), out.decode(errors="replace")
    finally:
        os.close(master)


@pytest.fixture
def training_job(worker_server):
    """A job with a few hundred logged steps, so that the bar is seen moving."""
    api = Api(worker_server)
    data = lines([{"prompt": f"Count {i}:", "completion": f" {i + 1} {i + 2} {i + 3}"} for i in range(120)])
    return api.create(training_file=api.upload(data, "watch.jsonl"), log_interval=1, suffix="watch",
                      hyperparameters={"batch_size": 2, "n_epochs": 3})


def test_jobs_watch_draws_a_live_progress_bar_in_a_terminal(worker_server, training_job):
    env = dict(os.environ, TUNA_URL=worker_server["base"], TUNA_API_KEY=worker_server["key"], TERM="xterm-256color")
    env.pop("DATABASE_URL", None)
    job_id = training_job["id"]
    code, screen = run_in_terminal([str(BINARY), "jobs", "watch", job_id], env)
    assert code == 0, screen[-3000:]
    plain = ANSI.sub("", screen)
    # The bar: `[=====>   ] step/total` then status, loss, tokens/s and time left.
    bars = re.findall(r"\[([=> ]{30})\] (\d+)/(\d+) running · loss (\d+\.\d{4}) · (\d+) tok/s · (\S+) left", plain)
    assert bars, plain[-3000:]
    steps = [int(b[1]) for b in bars]
    total = int(bars[-1][2])
    assert len(set(steps)) >= 3 and max(steps) <= total, steps
    assert any(0 < s < total for s in steps), steps
    # Drawn in place: the terminal gets cursor moves and line erases between the redraws.
    assert "\x1b[2K" in screen or "\r" in screen, repr(screen[:500])
    # The event lines are printed above the bar, and the outcome last.
    assert f"Step {total}/{total}" in plain
    assert re.search(rf"job {job_id} succeeded in \S+", plain), plain[-1500:]
    assert "final metrics: " in plain and "train_loss=" in plain


def test_jobs_watch_through_a_pipe_prints_lines_without_a_bar(worker_server):
    api = Api(worker_server)
    job = api.create(max_steps=4, log_interval=1, suffix="piped")
    env = dict(os.environ, TUNA_URL=worker_server["base"], TUNA_API_KEY=worker_server["key"])
    env.pop("DATABASE_URL", None)
    proc = subprocess.run([str(BINARY), "jobs", "watch", job["id"]], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "Step 4/4" in proc.stdout and f"job {job['id']} succeeded" in proc.stdout
    assert "[" not in proc.stderr and "tok/s" not in proc.stderr, proc.stderr
