"""A backfill submitted with `ray job submit` to a two-node cluster on 127.0.0.1 (cluster/local.sh, token auth)."""

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.sample import sample_image_paths, sample_pairs, sample_texts

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCAL = ROOT / "cluster" / "local.sh"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_base_port() -> int:
    """A base port whose whole block (see cluster/local.sh) is free on this machine."""
    for base in range(23000, 29000, 97):
        block = [base, base + 1, base + 2, *range(base + 10, base + 26), base + 20000, base + 20200]
        if all(_free(p) for p in block):
            return base
    pytest.fail("no free port block for the local cluster")


@pytest.mark.cluster
def test_a_backfill_submitted_to_a_two_node_cluster_embeds_the_sample(tmp_path):
    port = free_base_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "PATH": f"{BIN}:{env.get('PATH', '')}",
        "VLM_EMBED_CLUSTER_DIR": f"/tmp/vc{os.getpid()}",
        "VLM_EMBED_CLUSTER_PORT": str(port),
        "VLM_EMBED_CLUSTER_CPUS": "2",
    }
    job = yaml.safe_load((ROOT / "pipelines" / "sample_data" / "backfill.yaml").read_text())
    job["table"]["uri"] = str(tmp_path / "lancedb")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    try:
        up = subprocess.run([str(LOCAL), "up", "1"], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stderr
        client = dict(env)
        for line in up.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            client[key] = value
        assert client["RAY_AUTH_MODE"] == "token"
        with pytest.raises(urllib.error.HTTPError) as refused:  # the job API wants the token
            urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/api/version", timeout=10)
        assert refused.value.code == 401
        status = subprocess.run([str(LOCAL), "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.stdout.count(" node_") == 2, status.stdout

        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--"]
            + ["python", "-m", "pipelines.backfill", "--config", str(tmp_path / "job.yaml")],
            cwd=ROOT,
            env=client,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
        expected = len(sample_texts()) + len(sample_pairs()) + len(sample_image_paths())
        assert f"backfill: read {expected} = embedded {expected} + skipped 0" in submit.stdout
    finally:
        down = subprocess.run([str(LOCAL), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr

    import lancedb

    table = lancedb.connect(str(tmp_path / "lancedb")).open_table("vectors")
    ids = set(table.search().select(["id"]).limit(None).to_arrow()["id"].to_pylist())
    assert {row["id"] for row in sample_texts() + sample_pairs()} <= ids and "red_circle.png" in ids
    assert len(ids) == table.count_rows() == expected
