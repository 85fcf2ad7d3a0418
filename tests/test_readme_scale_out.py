"""The README's scale-out commands ("Large and shared pools") run as written, with the offline default
models, on a local Ray instance and a real PostgreSQL database: only the database URL and the stream's
length are swapped (and the line for a remote cluster, which needs one, is left out)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("psycopg")
ROOT = Path(__file__).resolve().parents[1]
README_URL = "postgresql://icd@db.example/icd"


def scale_out_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Large and shared pools", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if re.match(r"(PGPASSWORD=\.\.\. )?icd (run|merge) ", ln)]


def test_the_readme_names_the_one_command_first_then_the_manual_recipe():
    cmds = scale_out_commands()
    assert cmds[0].startswith("PGPASSWORD=... icd run --ray --workers")
    assert any("--shard 1/2" in c for c in cmds) and cmds[-1].startswith("icd merge")
    assert [c for c in cmds if "head.example" in c]  # the cluster form is shown


@pytest.mark.slow
def test_the_readme_scale_out_commands_run_as_written(tmp_path, url):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    ran = []
    for cmd in scale_out_commands():
        if "head.example" in cmd:  # a remote cluster: not on this machine
            continue
        line = cmd.replace(README_URL, url).replace("--n 1000", "--n 10")
        proc = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        ran.append(line)
    assert len(ran) == 5
    for folder, shards in (("big", 2), ("hosts", 2)):
        summary = json.loads((tmp_path / "runs" / folder / "summary.json").read_text())
        assert summary["n_queries"] == 10 and summary["shards"]["complete"] is True
        assert len(summary["shards"]["merged"]) == shards
        assert (tmp_path / "runs" / folder / "per_label.csv").exists()
    # --max-calls 50 held across every worker of both runs (one ledger: the pool's)
    import psycopg

    with psycopg.connect(url) as db:
        (calls,) = db.execute("SELECT calls FROM icd_ledger").fetchone()
    assert calls <= 50
