"""`icd serve` with the offline defaults (SmolLM2 student, ConSE embedder, a person as teacher), driven
with curl exactly as the README shows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from icdistill.data.stream import load_dataset
from service_helpers import KEY, wait_until

pytestmark = pytest.mark.slow


def curl(*args: str) -> dict:
    r = subprocess.run(
        ["curl", "-sS", "--fail-with-body", *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_offline_default_service_with_curl_and_a_person(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ds = load_dataset("fashion-mnist", split="test")
    images = []
    for i in range(3):
        q = ds.item(i)
        path = tmp_path / f"{i}.png"
        q.image.save(path)
        images.append((path, q))
    env = {**os.environ, "ICD_API_KEY": KEY}
    cmd = [
        sys.executable,
        "-m",
        "icdistill",
        "serve",
        "--port",
        str(port),
        "--pool",
        str(tmp_path / "pool.sqlite"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=240)
        auth = ["-H", f"Authorization: Bearer {KEY}"]
        options = json.dumps(list(images[0][1].options))
        path, q = images[0]
        first = curl(
            *auth,
            "-F",
            f"image=@{path}",
            "-F",
            f"prompt={q.prompt}",
            "-F",
            f"options={options}",
            url + "/v1/predict",
        )
        assert (
            first["state"] == "pending_human" and first["answer"] in q.options
        )  # warm-up: the pool is empty
        labelled = curl(
            *auth, "-H", "Content-Type: application/json", "-d", json.dumps({"label": q.label}),
            url + f"/v1/queries/{first['query_id']}/label",
        )  # fmt: skip
        assert labelled["state"] == "annotated" and labelled["teacher_answer"] == q.label
        # the same image again: its labelled demo is retrieved and the student now copies it
        again = curl(
            *auth,
            "-F",
            f"image=@{path}",
            "-F",
            f"prompt={q.prompt}",
            "-F",
            f"options={options}",
            url + "/v1/predict",
        )
        stats = curl(*auth, url + "/v1/stats")
        assert stats["pool_size"] == 1 and stats["queries"] == 2
        assert again["demo_ids"] == [1]
        # with its own labelled demo in the prompt the student leans towards the person's label
        assert again["option_probs"][q.label] > first["option_probs"][q.label]
        bad = subprocess.run(
            ["curl", "-sS", *auth, "-F", "image=@/etc/hostname", "-F", "prompt=x", url + "/v1/predict"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert json.loads(bad.stdout)["error"]["code"] == "bad_image"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
