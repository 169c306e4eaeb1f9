"""README's first command, `scripts/demo.sh`, in a reduced form (fewer rows, fewer steps): it must
build, serve, register all-MiniLM-L6-v2, upload SST-2 rows, train through the real worker,
download the model and print the accuracy before and after fine-tuning."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^accuracy (before|after) fine-tuning: (\d+(?:\.\d+)?)% on (\d+) held-out rows$", re.M)


def test_demo_prints_accuracy_before_and_after():
    env = dict(os.environ)
    env.update(DEMO_TRAIN_ROWS="600", DEMO_EVAL_ROWS="200", DEMO_MAX_STEPS="20",
               DEMO_SKIP_SETUP="1", DEMO_SKIP_BUILD="1", HF_HUB_OFFLINE="1")
    env.pop("DATABASE_URL", None)
    env.pop("TUNA_URL", None)
    env.pop("TUNA_API_KEY", None)
    proc = subprocess.run([str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    found = {m.group(1): (float(m.group(2)), int(m.group(3))) for m in LINE.finditer(proc.stdout)}
    assert set(found) == {"before", "after"}, out[-6000:]
    for label, (acc, rows) in found.items():
        assert rows == 200, (label, rows)
        assert 0.0 <= acc <= 100.0, (label, acc)
    # The downloaded model is a transformers folder with a classification head.
    model = ROOT / ".tuna" / "demo" / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert "succeeded" in out
    # The data comes from the repository itself: a bare clone has no ../shared beside it.
    assert f"held-out rows of SST-2 from {ROOT / 'tests' / 'data' / 'sst2'}" in out, out[-6000:]
