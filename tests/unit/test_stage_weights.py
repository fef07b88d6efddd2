"""The host-side weight staging script against the Hub emulator: HF cache layout, resume after a
cut connection, nothing downloaded twice, a new revision fetches only what changed."""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from pathlib import Path

import pytest

from gpufleet import hub
from gpufleet.facts.models import marker_path
from gpufleet.lab import hub_emulator as he
from gpufleet.lab import tinymodel

SCRIPT = Path(__file__).resolve().parents[2] / "gpufleet/hostscripts/stage_weights.py"
spec = importlib.util.spec_from_file_location("stage_weights", SCRIPT)
stage_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_weights)  # type: ignore[union-attr]
MODEL = he.REPO_GATED


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("GPUFLEET_STATE_DIR", str(tmp_path / "state"))
    server = he.make_hub_server("127.0.0.1", 0)
    server.start_background()
    monkeypatch.setenv("HF_ENDPOINT", he.base_url(server))
    yield server
    server.close()


def stats(server) -> dict:
    with urllib.request.urlopen(he.base_url(server) + "/_lab/stats") as r:
        return json.load(r)


def manifest(server, revision: str) -> dict:
    shape = hub.model_shape(MODEL, revision, he.GOOD_TOKEN, he.base_url(server))
    return {"model": MODEL, "commit": shape.commit, "revision": revision,
            "files": [{k: f[k] for k in ("path", "size", "sha256", "blob_id") if k in f}
                      for f in shape.files]}


def test_stage_resume_and_no_second_download(hub_server, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    m = manifest(hub_server, "main")
    size = sum(f["size"] for f in m["files"])
    before = stats(hub_server)["total_bytes"]
    # the first download of the weights is cut after 1 MB: the script resumes with Range
    req = urllib.request.Request(he.base_url(hub_server) + "/_lab/faults", method="POST",
                                 data=json.dumps({"cut_after_bytes": 1_000_000, "count": 1,
                                                  "path": "*.safetensors"}).encode())
    urllib.request.urlopen(req).close()
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(models)) == 0
    after = stats(hub_server)
    assert after["downloads"]["cut"] == 1
    assert after["total_bytes"] - before == size  # the cut 1 MB was not fetched again
    repo = models / "hub" / f"models--{MODEL.replace('/', '--')}"
    snap = repo / "snapshots" / tinymodel.COMMIT_MAIN
    assert (snap / "config.json").is_symlink() and (snap / "model.safetensors").is_file()
    assert (repo / "refs" / "main").read_text() == tinymodel.COMMIT_MAIN
    assert Path(marker_path(str(models), MODEL, tinymodel.COMMIT_MAIN)).is_file()
    # again: nothing to download
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(models)) == 0
    assert stats(hub_server)["total_bytes"] == after["total_bytes"]
    # another revision: only the file that differs travels
    n = manifest(hub_server, "next")  # (the controller reads config.json: not staging bytes)
    baseline = stats(hub_server)["total_bytes"]
    assert stage_weights.stage(n, he.base_url(hub_server), he.GOOD_TOKEN, str(models)) == 0
    moved = stats(hub_server)["total_bytes"] - baseline
    changed = {f["path"]: f["size"] for f in n["files"]}["generation_config.json"]
    assert moved == changed
    assert (repo / "snapshots" / tinymodel.COMMIT_NEXT / "model.safetensors").resolve() == \
        (snap / "model.safetensors").resolve()


def test_gated_without_token_fails_clearly(hub_server, tmp_path, capsys):
    m = manifest(hub_server, "main")
    assert stage_weights.stage(m, he.base_url(hub_server), None, str(tmp_path)) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_not_enough_disk_space(hub_server, tmp_path, capsys, monkeypatch):
    m = manifest(hub_server, "main")
    monkeypatch.setattr(stage_weights.shutil, "disk_usage",
                        lambda p: type("Usage", (), {"free": 1000})())
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(tmp_path)) == 1
    assert "not enough disk space" in capsys.readouterr().err
