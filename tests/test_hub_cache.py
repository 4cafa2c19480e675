"""Hub ids (models and datasets) where the Hub cannot be reached: the copy in the Hugging Face cache loads at once
(with a note), and an id that is not cached is refused in one line, without huggingface_hub's minute of retries.

The runs are subprocesses pointed (HF_ENDPOINT) at a local port nothing listens on, with HF_HUB_OFFLINE unset: the
Hub is unreachable on every machine, whatever its network."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


# a proxy set in the environment would answer for the local addresses below (a 502 is an answer)
NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HUB_CACHE=str(tmp_path / "hub"),
               TUNELAB_CACHE=str(tmp_path / "tunelab-cache"), **NO_PROXY)
    return env


def cache_snapshot(hub: Path, repo_id: str, files: str, kind: str = "models") -> Path:
    """The layout huggingface_hub downloads into: refs/main names a commit, snapshots/<commit>/ holds the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def train(tmp_path: Path, source: str, data: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"source": source}, "data": {"train": data, "max_length": 64},
        "training": {"max_steps": 2, "batch_size": 2, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs"), "name": "hub"}}))
    return subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg)], capture_output=True, text=True,
                          env=offline_env(tmp_path), timeout=300)


def assert_refused_in_one_line(out: subprocess.CompletedProcess, what: str, download: str) -> None:
    """Exit 2 and one line on stderr: `what` is not in the cache, and the command that downloads it."""
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {what} is not in the Hugging Face cache"), out.stderr
    assert f"`{download}`" in errors[0]


def test_a_hub_id_that_is_not_cached_is_refused_in_one_line(tmp_path, tiny_chat_data):
    out = train(tmp_path, "acme/not-cached", tiny_chat_data)
    assert_refused_in_one_line(out, "model 'acme/not-cached'", "hf download acme/not-cached")
    assert not (tmp_path / "runs").exists()


def test_under_hf_hub_offline_an_uncached_hub_id_is_refused_with_the_download_command(tmp_path, tiny_chat_data,
                                                                                       tiny_model):
    """HF_HUB_OFFLINE=1 skips the probe, not the cache check: the libraries' own "OfflineModeIsEnabled" error named
    no fix. A cached id still loads."""
    env = {**offline_env(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "tunelab", "data", "inspect", tiny_chat_data, "--model",
                          "acme/not-cached", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert_refused_in_one_line(out, "model 'acme/not-cached'", "hf download acme/not-cached")
    assert "HF_HUB_OFFLINE is set" in out.stderr
    cache_snapshot(tmp_path / "hub", "acme/tiny", tiny_model)
    out = subprocess.run([sys.executable, "-m", "tunelab", "data", "inspect", tiny_chat_data, "--model", "acme/tiny",
                          "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["format"] == "messages", out.stderr


def test_a_cached_hub_id_trains_from_the_cache_without_the_hub(tmp_path, tiny_model, tiny_chat_data):
    snapshot = cache_snapshot(tmp_path / "hub", "acme/tiny", tiny_model)
    out = train(tmp_path, "acme/tiny", tiny_chat_data)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("the Hub cannot be reached; acme/tiny loads from the Hugging Face cache") == 1, out.stderr
    assert str(snapshot) in out.stderr
    assert "Retrying" not in out.stderr  # no minute of huggingface_hub retries before the cache is used
    assert (tmp_path / "runs" / "hub" / "final" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "runs" / "hub" / "config.yaml").read_text())["model"]["source"] == "acme/tiny"


def inspect(tmp_path: Path, source: str, model: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", "data", "inspect", source, "--model", model, "--json"],
                          capture_output=True, text=True, env=offline_env(tmp_path), timeout=300)


def test_a_cached_hub_dataset_reads_from_the_cache_and_an_uncached_one_is_refused(tmp_path, tiny_model,
                                                                                  tiny_chat_data):
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(tiny_chat_data, files / "train.jsonl")
    cache_snapshot(tmp_path / "hub", "acme/chats", str(files), kind="datasets")
    out = inspect(tmp_path, "acme/chats", tiny_model)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["rows"]["valid"] == len(Path(tiny_chat_data).read_text().splitlines()), report
    assert report["format"] == "messages", report
    assert "acme/chats loads from the Hugging Face cache" in out.stderr and "Retrying" not in out.stderr
    out = inspect(tmp_path, f"hub:{files}", tiny_model)  # `hub:` before a local folder: read as it is
    assert out.returncode == 0 and json.loads(out.stdout)["rows"]["valid"] == report["rows"]["valid"], out.stderr

    out = inspect(tmp_path, "acme/never-downloaded", tiny_model)
    assert_refused_in_one_line(out, "dataset 'acme/never-downloaded'",
                               "hf download acme/never-downloaded --repo-type dataset")


def test_the_hub_probe_counts_any_answer_as_reachable_and_no_answer_as_not(monkeypatch):
    """What decides between the Hub and the cache: an endpoint that answers at all (here a local server's 404) is
    reachable; a port nothing listens on is not."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tunelab.models import hub_reachable

    for key, value in NO_PROXY.items():
        monkeypatch.setenv(key, value)

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert not hub_reachable(f"http://127.0.0.1:{closed_port()}")


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness is not installed")
def test_a_harness_task_on_a_hub_dataset_fails_at_once_when_the_hub_is_unreachable(tmp_path, tiny_model):
    """The harness loads its data itself: `datasets` is switched to its cache before the harness imports it, so an
    uncached hub dataset fails in one line instead of after half a minute of retries."""
    task = tmp_path / "hub_task.yaml"
    task.write_text(yaml.safe_dump({
        "task": "tunelab_hub_mc", "dataset_path": "acme/never-downloaded", "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    out = subprocess.run([sys.executable, "-m", "tunelab", "eval", "--model", tiny_model, "--task",
                          f"lm-eval:{task}"], capture_output=True, text=True, env=offline_env(tmp_path), timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[0] == "note: the Hub cannot be reached; the harness' datasets are read from the Hugging Face cache"
    assert len(lines) == 2 and lines[1].startswith("error: lm-eval task(s)") and "acme/never-downloaded" in lines[1], \
        out.stderr
