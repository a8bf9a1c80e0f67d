"""Push and pull through a local Hub (tests/hub_server.py) with the unmodified huggingface_hub client.

In-process tests point the client at the server by setting HF_ENDPOINT at call time (unet.hub
reads it then and passes ``endpoint=`` on) and by monkeypatching the few constants the client
reads at import (cache folder, token file, Xet). Subprocess tests set the environment before
the client is imported, as a user would. A server that echoes the Authorization header back in
its errors checks that no output of pull, push, evaluate or the app shows the token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, constants
from PIL import Image
from safetensors.torch import load_file

from unet import hub, serving
from unet.card import card_data, model_card_text
from unet.processing import Postprocessing
from unet.push import examples_frame, push_model
from unet.reader import read_image, read_mask
from unet.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]
ALICE, BOB = "hf_test_alice_0123456789", "hf_test_bob_0123456789"


@pytest.fixture
def server():
    with HubServer(tokens={ALICE: "alice", BOB: "bob"}) as running:
        yield running


@pytest.fixture
def hub_env(server, monkeypatch, tmp_path):
    """This process talks to ``server`` as alice, with an empty cache of its own."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", ALICE)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for name in ("MODEL_ID", "MODEL_REVISION", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return server


def fresh_cache(monkeypatch, tmp_path, name: str) -> Path:
    cache = tmp_path / name
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def subprocess_env(server_url: str, token: str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "MODEL_"))}
    env.update(
        HF_ENDPOINT=server_url,
        HF_TOKEN=token,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(ROOT),
    )
    return env


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A copy of the synthetic model that a test may change."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(scope="session")
def test_slices(trained_run, tiny_model_dir):
    return examples_frame([trained_run / "synthetic"], tiny_model_dir, "test")


# ---- push, then pull into a fresh cache ------------------------------------------------------------


def test_push_then_pull_gives_the_same_model(hub_env, tiny_model_dir, test_slices, monkeypatch, tmp_path):
    before = digest(tiny_model_dir)
    assert push_model(tiny_model_dir, "alice/unet-tiny", examples_from=test_slices) == 0
    assert digest(tiny_model_dir) == before  # nothing written into the model folder (no examples/ there)

    cache = fresh_cache(monkeypatch, tmp_path, "fresh_cache")
    pulled = hub.resolve_model_dir("alice/unet-tiny")
    assert pulled.is_relative_to(cache)
    for name in ("config.json", "preprocessor_config.json", "postprocessor_config.json", "metrics.json", "curves.png"):
        assert (pulled / name).read_bytes() == (tiny_model_dir / name).read_bytes()

    local, remote = load_file(tiny_model_dir / "model.safetensors"), load_file(pulled / "model.safetensors")
    assert local.keys() == remote.keys()
    assert all(torch.equal(local[k], remote[k]) for k in local)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    local_segmenter, remote_segmenter = (
        Segmenter.from_pretrained(tiny_model_dir),
        Segmenter.from_pretrained("alice/unet-tiny"),
    )
    with torch.no_grad():
        assert torch.equal(local_segmenter.network(x), remote_segmenter.network(x))
    assert remote_segmenter.preprocessing == local_segmenter.preprocessing
    assert remote_segmenter.postprocessing == local_segmenter.postprocessing

    # the card: Hub metadata that ModelCard parses, the repo id in its usage lines, the warning
    card = ModelCard.load(pulled / "README.md")
    metrics = json.loads((tiny_model_dir / "metrics.json").read_text())
    assert card.data.to_dict() == card_data(metrics).to_dict()
    assert card.data.license == "mit" and card.data.pipeline_tag == "image-segmentation"
    assert "alice/unet-tiny" in card.text and "not for clinical use" in card.text
    info = HfApi(endpoint=hub_env.url).model_info("alice/unet-tiny")
    assert info.pipeline_tag == "image-segmentation" and info.card_data.license == "mit"

    # the examples: test-split slices, lossless, in file order, with 0/255 masks
    examples = sorted((pulled / "examples").iterdir())
    images = [p for p in examples if not p.stem.endswith("_mask")]
    assert {p.stem.rsplit("_", 1)[1] for p in images} == {"tumor", "healthy"}
    for image_path in images:
        patient, n, kind = image_path.stem.rsplit("_", 2)
        row = test_slices[(test_slices["patient"] == patient) & (test_slices["slice"] == int(n))].iloc[0]
        assert np.array_equal(np.asarray(Image.open(image_path)), read_image(row.image_path))
        mask = np.asarray(Image.open(image_path.with_name(image_path.stem + "_mask.png")))
        assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask // 255, read_mask(row.mask_path))
        assert (kind == "tumor") == bool(row.has_tumor)


def test_repush_is_a_second_commit_and_branches_work(hub_env, model_copy, monkeypatch, tmp_path):
    api = HfApi(endpoint=hub_env.url)
    assert push_model(model_copy, "alice/unet-repush") == 0
    first = api.model_info("alice/unet-repush").sha

    metrics = json.loads((model_copy / "metrics.json").read_text())
    metrics["note"] = "retrained"
    (model_copy / "metrics.json").write_text(json.dumps(metrics))
    assert push_model(model_copy, "alice/unet-repush") == 0  # the repo exists: create_repo answers 409
    second = api.model_info("alice/unet-repush").sha
    assert second != first
    assert hub_env.state.requests.count("POST /api/repos/create") == 2
    assert len(hub_env.state.repos["alice/unet-repush"].commits) == 3  # the initial commit and two pushes

    (model_copy / "curves.png").unlink()  # a file gone from the folder goes from the repo too
    assert push_model(model_copy, "alice/unet-repush", revision="experiment") == 0
    assert "curves.png" not in api.list_repo_files("alice/unet-repush", revision="experiment")
    assert api.model_info("alice/unet-repush").sha == second  # main untouched
    fresh_cache(monkeypatch, tmp_path, "branch_cache")
    pulled = hub.resolve_model_dir("alice/unet-repush", revision="experiment")
    assert json.loads((pulled / "metrics.json").read_text())["note"] == "retrained"


def test_private_repo_needs_its_owners_token(hub_env, model_copy, monkeypatch):
    assert push_model(model_copy, "alice/unet-private", private=True) == 0
    assert hub_env.state.repos["alice/unet-private"].private
    monkeypatch.setenv("HF_TOKEN", BOB)
    with pytest.raises(FileNotFoundError, match="alice/unet-private not found.*HF_TOKEN"):
        hub.resolve_model_dir("alice/unet-private")


# ---- failed pushes: one clear line, nothing lost, no token ---------------------------------------


def test_wrong_token_fails_clearly_and_keeps_the_model(hub_env, model_copy, monkeypatch, caplog):
    wrong = "hf_wrong_secret_token_987654321"
    monkeypatch.setenv("HF_TOKEN", wrong)
    before = digest(model_copy)
    with caplog.at_level(logging.INFO):
        assert push_model(model_copy, "alice/unet-wrong-token") != 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "401" in errors[0] and "HF_TOKEN" in errors[0]
    assert f"retry with: python -m unet.push --model {model_copy} --repo-id alice/unet-wrong-token" in errors[0]
    assert wrong not in caplog.text
    assert digest(model_copy) == before
    assert "alice/unet-wrong-token" not in hub_env.state.repos


def test_cli_with_wrong_token_never_prints_it(server, model_copy, tmp_path):
    wrong = "hf_wrong_secret_token_987654321"
    result = subprocess.run(
        [sys.executable, "-m", "unet.push", "--model", str(model_copy), "--repo-id", "alice/cli"],
        cwd=ROOT,
        env=subprocess_env(server.url, wrong, tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "push to" in output and "failed: 401" in output and "retry with: python -m unet.push" in output
    assert wrong not in output


def test_a_model_that_would_not_load_is_never_pushed(hub_env, model_copy, caplog):
    assert push_model(model_copy, "alice/unet-good") == 0
    commits = dict(hub_env.state.repos["alice/unet-good"].commits)
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert push_model(model_copy, "alice/unet-good") == 2
    assert push_model(model_copy, "alice/unet-broken") == 2
    assert f"error: {weights} is not a readable safetensors file" in caplog.text and "nothing pushed" in caplog.text
    assert "alice/unet-broken" not in hub_env.state.repos
    assert hub_env.state.repos["alice/unet-good"].commits == commits  # the working model stays published
    assert push_model(model_copy.parent / "missing", "alice/unet-broken") == 2
    assert f"no model folder at {model_copy.parent / 'missing'}; nothing pushed" in caplog.text


def test_other_namespace_is_forbidden(hub_env, model_copy, caplog):
    assert push_model(model_copy, "bob/not-yours") != 0
    assert "403" in caplog.text and "bob" in caplog.text


def test_no_token_says_how_to_log_in(hub_env, model_copy, monkeypatch, caplog):
    monkeypatch.delenv("HF_TOKEN")
    assert push_model(model_copy, "alice/unet-no-token") != 0
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in caplog.text


def test_an_endpoint_that_is_no_address_is_a_setting_to_fix(hub_env, model_copy, monkeypatch, caplog):
    monkeypatch.setenv("HF_ENDPOINT", "huggingface.co")  # the scheme forgotten
    message = "HF_ENDPOINT='huggingface.co' is not an http(s) address such as https://huggingface.co"
    assert push_model(model_copy, "alice/unet-no-scheme") == 2
    assert f"error: {message}; nothing pushed" in caplog.text
    with pytest.raises(ValueError, match=re.escape(message)):
        serving.load_for_serving("alice/unet-no-scheme")  # not taken for a dead network: no fallback


@pytest.mark.timeout(60)  # a hang guard: the bounded timeouts answer in seconds
def test_dead_endpoint_push_fails_fast(hub_env, model_copy, monkeypatch, caplog, dead_endpoint):
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    assert push_model(model_copy, "alice/unet-offline") != 0
    assert "cannot reach" in caplog.text and "HF_ENDPOINT" in caplog.text


# ---- pull errors and offline fallbacks -----------------------------------------------------------


def test_missing_repo_is_a_clear_error(hub_env):
    with pytest.raises(FileNotFoundError, match="model repo alice/does-not-exist not found at http://127.0.0.1"):
        hub.resolve_model_dir("alice/does-not-exist")
    with pytest.raises(FileNotFoundError, match="not found"):
        serving.load_for_serving("alice/does-not-exist")  # a wrong MODEL_ID is an error, not a silent fallback
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a Hub repo id"):
        hub.resolve_model_dir("runs/no/such/model")


def test_pickle_only_repo_is_refused(hub_env, model_copy, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(model_copy / "config.json", folder)
    torch.save(load_file(model_copy / "model.safetensors"), folder / "pytorch_model.bin")
    api = HfApi(endpoint=hub_env.url)
    api.create_repo("alice/pickled")
    api.upload_folder(repo_id="alice/pickled", folder_path=folder)
    with pytest.raises(
        FileNotFoundError, match=r"no model.safetensors \(only pytorch_model.bin: pickled weights are refused\)"
    ):
        Segmenter.from_pretrained("alice/pickled")


def test_repo_without_config_is_refused(hub_env, model_copy):
    api = HfApi(endpoint=hub_env.url)
    api.create_repo("alice/no-config")
    api.upload_file(
        repo_id="alice/no-config", path_or_fileobj=model_copy / "model.safetensors", path_in_repo="model.safetensors"
    )
    with pytest.raises(FileNotFoundError, match="model repo alice/no-config has no config.json"):
        Segmenter.from_pretrained("alice/no-config")


@pytest.mark.timeout(60)  # a hang guard: the bounded timeouts answer in seconds
def test_offline_uses_the_cached_copy(hub_env, model_copy, monkeypatch, dead_endpoint):
    assert push_model(model_copy, "alice/unet-cached") == 0
    online = serving.load_for_serving("alice/unet-cached")
    assert online.notice is None and online.description.startswith("alice/unet-cached @ main (")

    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    offline = serving.load_for_serving("alice/unet-cached")
    assert offline.model_dir == online.model_dir
    assert "offline" in offline.notice and "cached copy of alice/unet-cached" in offline.notice
    assert offline.examples_dir is None  # pushed without examples

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: the cache, without trying
    assert "HF_HUB_OFFLINE is set" in serving.load_for_serving("alice/unet-cached").notice


def test_timeouts_outlive_the_clients_reset_after_a_connection_error(monkeypatch):
    for name in hub.TIMEOUT_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    hub.use_short_timeouts()  # installs the client factory the app and push install: no need to undo it
    huggingface_hub.close_session()  # what the client does after a ConnectError, before it retries
    session = huggingface_hub.get_session()
    hooks = session.event_hooks["request"]
    assert hub._bound_timeouts in hooks and len(hooks) >= 2  # the client's own hook is kept beside ours
    monkeypatch.setenv("HUB_READ_TIMEOUT", "7")
    request = session.build_request("GET", "http://127.0.0.1:9/")
    hub._bound_timeouts(request)
    assert request.extensions["timeout"] == {"connect": 5.0, "read": 7.0, "write": 7.0, "pool": 7.0}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [429, 503])
def test_a_rate_limited_or_failing_hub_serves_the_cached_copy(hub_env, model_copy, monkeypatch, status):
    assert push_model(model_copy, f"alice/unet-{status}") == 0
    online = serving.load_for_serving(f"alice/unet-{status}")

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "try again later"}')

        def log_message(self, *_):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Refusing) as refusing:
        threading.Thread(target=refusing.serve_forever, daemon=True).start()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{refusing.server_address[1]}")
        served = serving.load_for_serving(f"alice/unet-{status}")
        refusing.shutdown()
    assert served.model_dir == online.model_dir
    assert f"answered {status}" in served.notice and f"cached copy of alice/unet-{status}" in served.notice


@pytest.mark.timeout(60)  # a hang guard: the bounded timeouts answer in seconds
def test_offline_without_cache_serves_the_shipped_model(hub_env, tiny_model_dir, monkeypatch, tmp_path, dead_endpoint):
    monkeypatch.setattr(serving, "SHIPPED_MODEL_DIR", tiny_model_dir)  # the real one may not be trained yet
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)
    fresh_cache(monkeypatch, tmp_path, "empty_cache")
    served = serving.load_for_serving("alice/never-pulled")
    assert served.model_dir == tiny_model_dir and served.description.startswith("shipped model")
    assert "no cached copy of alice/never-pulled" in served.notice and "shipped model" in served.notice
    with pytest.raises(hub.HubUnavailable):
        hub.resolve_model_dir("alice/never-pulled")


@pytest.mark.timeout(60)  # a hang guard: the bounded timeouts answer in seconds
def test_hung_endpoint_does_not_hang_the_app(hub_env, tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(serving, "SHIPPED_MODEL_DIR", tiny_model_dir)
    monkeypatch.setenv("HUB_PROBE_TIMEOUT", "1")
    fresh_cache(monkeypatch, tmp_path, "empty_cache")
    with socket.socket() as hung:  # accepts connections (the kernel does) but never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hung.getsockname()[1]}")
        served = serving.load_for_serving("alice/unet-hung")
    assert "ReadTimeout" in served.notice and served.model_dir == tiny_model_dir


def test_model_id_selects_the_model(hub_env, model_copy, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(serving, "SHIPPED_MODEL_DIR", tiny_model_dir)
    assert serving.load_for_serving().model_dir == tiny_model_dir
    assert push_model(model_copy, "alice/unet-env") == 0
    monkeypatch.setenv("MODEL_ID", "alice/unet-env")
    assert serving.load_for_serving().description.startswith("alice/unet-env @ main")


# ---- card and examples ---------------------------------------------------------------------------


def test_card_metadata_round_trips(tiny_model_dir):
    metrics = json.loads((tiny_model_dir / "metrics.json").read_text())
    card = ModelCard.load(tiny_model_dir / "README.md")
    assert card.data.to_dict() == card_data(metrics).to_dict()
    assert "synthetic-data" in card.data.tags  # a smoke-test model says so
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["Mean patient Dice"] == round(metrics["test"]["patient_dice_mean"], 4)
    for text in ("Not a medical device and not for clinical use", metrics["command"], *metrics["splits"]["test"]):
        assert text in card.text


def test_card_of_real_data_names_the_dataset_and_skips_missing_metrics():
    metrics = {
        "data": "../shared/data/lgg_subset",
        "test": {"patient_dice_mean": 0.81, "tumor_slice_dice_mean": float("nan")},
    }
    data = card_data(metrics)
    assert data.datasets == ["mateuszbuda/lgg-mri-segmentation"] and data.license == "mit"
    assert [r.metric_name for r in data.eval_results] == ["Mean patient Dice"]


def test_card_explains_the_volume_step_only_when_the_config_has_it():
    metrics = {"data": "../shared/data/lgg_subset", "test": {"patient_dice_mean": 0.81}}
    on = model_card_text(metrics, postprocessing=Postprocessing(threshold=0.6, largest_3d_component=True))
    off = model_card_text(metrics, postprocessing=Postprocessing(threshold=0.6, largest_3d_component=False))
    assert "threshold 0.6," in on and "whole-volume step: largest 3D component by voxels" in on
    assert "demo's volume tab apply it" in on
    assert "whole-volume step: off" in off and "volume tab" not in off
    by_probability = Postprocessing(largest_3d_component=True, largest_3d_component_by="probability")
    assert "whole-volume step: largest 3D component by probability" in model_card_text(
        metrics, postprocessing=by_probability
    )


# ---- the whole path, as a user runs it ---------------------------------------------------------------


@pytest.mark.slow
def test_train_push_then_evaluate_from_the_hub(server, tmp_path):
    out = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--synthetic",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "2",
            "--image-size",
            "64",
            "--width",
            "4",
            "--out-dir",
            str(out),
            "--push",
            "--repo-id",
            "alice/e2e",
        ],
        cwd=ROOT,
        env=subprocess_env(server.url, ALICE, tmp_path / "home_train"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert not (out / "model" / "examples").exists()
    files = HfApi(endpoint=server.url, token=ALICE).list_repo_files("alice/e2e")
    assert {"config.json", "model.safetensors", "README.md", "metrics.json", "curves.png"} <= set(files)
    assert any(f.endswith("_tumor.png") for f in files) and any(f.endswith("_healthy_mask.png") for f in files)

    evaluate = subprocess.run(
        [
            sys.executable,
            "-m",
            "unet.evaluate",
            "--data-dir",
            str(out / "synthetic"),
            "--model",
            "alice/e2e",
            "--split",
            "test",
            "--json",
        ],
        cwd=ROOT,
        env=subprocess_env(server.url, ALICE, tmp_path / "home_eval"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    pushed = json.loads((out / "model" / "metrics.json").read_text())["test"]
    assert json.loads(evaluate.stdout.strip().splitlines()[-1])["patient_dice_mean"] == pytest.approx(
        pushed["patient_dice_mean"]
    )


# ---- a Hub that echoes the token back: redacted on every error path ------------------------------------


def test_redact_takes_out_tokens_and_this_machines_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "my-own-secret-value")  # no hf_ prefix: caught as the configured token
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    cache = str(tmp_path / "hf_home" / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    home, repo = str(Path.home()), str(ROOT)
    text = (
        f"403 bad Authorization: Bearer {ALICE}; token {BOB} and my-own-secret-value; read "
        f"{cache}/models--a--b/snapshots/1/config.json, {repo}/models/x and {home}/.netrc"
    )
    cleaned = hub.redact(text)
    for secret in (ALICE, BOB, "my-own-secret-value", cache, repo, f"{home}/"):
        assert secret not in cleaned, secret
    assert cleaned.startswith("403 bad Authorization: Bearer ***; token *** and ***; read $HF_HUB_CACHE/models--a--b")
    assert "<repo>/models/x" in cleaned and "~/.netrc" in cleaned
    # words that only look alike are left alone
    assert hub.redact("call hf_hub_download; HF_HUB_OFFLINE is set; /tmp/pytest-of-root/x") == (
        "call hf_hub_download; HF_HUB_OFFLINE is set; /tmp/pytest-of-root/x"
    )


@pytest.fixture(params=[400, 403, 422])
def echoing_hub(request, monkeypatch, tmp_path):
    """A Hub that answers everything with an error quoting the request's Authorization header; alice's token set."""
    with HubServer(tokens={ALICE: "alice"}, echo_status=request.param) as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        monkeypatch.setenv("HF_TOKEN", ALICE)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("MODEL_ID", raising=False)
        yield running


def test_the_echoing_hub_does_echo_the_token(echoing_hub):
    # the premise of the tests below: unredacted, the client's own error carries the token
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as caught:
        HfApi(endpoint=echoing_hub.url, token=ALICE).model_info("alice/echo")
    assert ALICE in str(caught.value) + (caught.value.server_message or "")


def test_pull_errors_never_carry_the_token(echoing_hub, caplog, capsys):
    status = echoing_hub.state.echo_status
    with caplog.at_level(logging.INFO):  # what the app and the command lines log
        with pytest.raises(OSError) as pulled:
            hub.resolve_model_dir("alice/echo")
        with pytest.raises(OSError) as served:
            serving.load_for_serving("alice/echo")
    for message in (str(pulled.value), str(served.value)):
        assert f"failed: {status} cannot handle request with Authorization: Bearer ***" in message
        assert ALICE not in message and "\n" not in message
    output = capsys.readouterr()
    assert ALICE not in caplog.text + output.out + output.err


def test_push_errors_never_carry_the_token(echoing_hub, model_copy, caplog):
    with caplog.at_level(logging.INFO):  # what the app and the command lines log
        assert push_model(model_copy, "alice/echo") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "push to" in errors[0]
    if echoing_hub.state.echo_status != 403:  # a 403 is explained in our own words, without the server's
        assert (
            f"failed: {echoing_hub.state.echo_status} cannot handle request with Authorization: Bearer ***" in errors[0]
        )
    assert ALICE not in caplog.text


@pytest.mark.parametrize("command", ["evaluate", "app"])
def test_command_lines_never_print_the_token(command, tmp_path):
    with HubServer(tokens={ALICE: "alice"}, echo_status=403) as echoing:
        args = {
            "evaluate": ["-m", "unet.evaluate", "--data-dir", str(tmp_path), "--model", "alice/echo", "--json"],
            "app": ["app.py", "--model", "alice/echo"],  # refused before it would listen
        }[command]
        result = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=subprocess_env(echoing.url, ALICE, tmp_path / "home"),
            capture_output=True,
            text=True,
            timeout=180,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "403" in output and "Bearer ***" in output
    assert ALICE not in output and "Traceback" not in output


# ---- models of every layout -----------------------------------------------------------------------------


def test_a_model_pushed_before_the_redesign_pulls_and_loads_with_its_processing(hub_env, model_copy, tmp_path):
    """An old repo: one flat config.json (architecture and processing), no processing files."""
    segmenter = Segmenter.from_pretrained(model_copy)
    old = tmp_path / "old_layout"
    old.mkdir()
    shutil.copy(model_copy / "model.safetensors", old)
    flat = {
        **segmenter.network.architecture,
        "image_size": segmenter.preprocessing.image_size,
        "threshold": 0.35,
        "min_component_area": 12,
        "fill_holes": True,
        "largest_3d_component": True,
        "normalization": "slice",
        "channel_order": "RGB",
        "mean": [0.1, 0.1, 0.1],
        "std": [0.2, 0.2, 0.2],
        "tta_flips": False,
    }
    (old / "config.json").write_text(json.dumps(flat))
    api = HfApi(endpoint=hub_env.url)
    api.create_repo("alice/old-layout")
    api.upload_folder(repo_id="alice/old-layout", folder_path=old)
    pulled = Segmenter.from_pretrained("alice/old-layout")
    assert pulled.postprocessing == Postprocessing(
        threshold=0.35, min_component_area=12, fill_holes=True, largest_3d_component=True
    )
    assert pulled.preprocessing.mean == (0.1, 0.1, 0.1) and pulled.preprocessing.normalization == "slice"
    # pushed again with this code, its repo holds the flat config and no processing file of a later push
    api.upload_folder(repo_id="alice/old-layout", folder_path=model_copy, allow_patterns=["*_config.json"])
    assert push_model(old, "alice/old-layout") == 0
    files = set(api.list_repo_files("alice/old-layout"))
    assert "preprocessor_config.json" not in files and "postprocessor_config.json" not in files


def test_a_push_publishes_the_processing_files(hub_env, model_copy):
    assert push_model(model_copy, "alice/processing") == 0
    files = set(HfApi(endpoint=hub_env.url).list_repo_files("alice/processing"))
    assert {"config.json", "preprocessor_config.json", "postprocessor_config.json", "model.safetensors"} <= files


def test_a_model_whose_processing_file_is_broken_is_never_pushed(hub_env, model_copy, caplog):
    path = model_copy / "postprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "treshold": 0.5}))
    assert push_model(model_copy, "alice/broken-processing") == 2
    assert f"error: {path}: unknown setting 'treshold'" in caplog.text and "nothing pushed" in caplog.text
    assert "alice/broken-processing" not in hub_env.state.repos


def test_the_card_keeps_the_facts_of_the_model(tiny_model_dir):
    metrics = json.loads((tiny_model_dir / "metrics.json").read_text())
    segmenter = Segmenter.from_pretrained(tiny_model_dir)
    text = ModelCard.load(tiny_model_dir / "README.md").text
    arch, post = segmenter.network.architecture, segmenter.postprocessing
    assert f"U-Net, width {arch['width']}, depth {arch['depth']}, {arch['upsampling']} upsampling" in text
    size = segmenter.preprocessing.image_size
    assert f"input {size}x{size} slices" in text
    assert f"threshold {post.threshold}, minimum component area {post.min_component_area} px" in text
    assert f"| Mean patient Dice | {metrics['test']['patient_dice_mean']:.4f} |" in text
    assert f"test: {len(metrics['splits']['test'])} patients" in text
    assert f"Command: `{metrics['command']}`" in text and "Segmenter.from_pretrained(" in text
    assert "Intended use and limitations" in text and "synthetic phantom slices" in text


def test_a_model_trained_without_test_patients_shows_and_publishes_its_validation_patients(hub_env, tmp_path):
    import train
    from unet.examples import load_examples, write_model_examples
    from unet.push import main as push_main

    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--image-size", "64", "--width", "4"]
    assert train.main(["--synthetic", "--test-fraction", "0", *tiny, "--out-dir", str(out)]) == 0
    model, data = out / "model", out / "synthetic"
    splits = json.loads((model / "metrics.json").read_text())["splits"]
    assert splits["test"] == [] and splits["val"]

    def patients(names) -> set[str]:  # SYN_CC_1007_20000101_10_tumor.png -> SYN_CC_1007_20000101
        return {"_".join(Path(name).name.split("_")[:4]) for name in names if Path(name).name != "NOTICE"}

    assert push_main(["--model", str(model), "--repo-id", "alice/no-test", "--data-dir", str(data)]) == 0
    api = HfApi(endpoint=hub_env.url, token=ALICE)
    pushed = [f for f in api.list_repo_files("alice/no-test") if f.startswith("examples/")]
    assert pushed and patients(pushed) <= set(splits["val"])
    card = (model / "README.md").read_text()
    assert "--split val" in card and "validation-split slices" in card and "--split test" not in card
    # its headline and table are its validation patients', said to flatter it, and no empty test is reported
    assert "validation patients, which chose its epoch and post-processing" in card
    assert "small test set" not in card and "| test" not in card

    files = write_model_examples(data, model)
    assert patients(files) <= set(splits["val"]) and "this model's validation split" in (
        model / "examples" / "NOTICE"
    ).read_text().replace("\n", " ")
    examples, label = load_examples(serving.load_for_serving(str(model)), None, tmp_path / "shown")
    assert examples and label == "published with the model · slices of its validation patients"
