import io
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from unet.data import read_image, read_mask, scan_dataset
from unet.evaluate import predict_frame
from unet.inference import predict_proba
from unet.model import UNet, load_model
from unet.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def test_synthetic_run_lowers_loss_and_writes_everything(trained_run):
    history = pd.read_csv(trained_run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    for name in ("last.pt", "curves.png", "best/model.safetensors", "model/config.json", "model/model.safetensors",
                 "model/metrics.json", "model/README.md"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "model" / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"train", "val", "test"}
    assert metrics["command"].startswith("python train.py")
    checkpoint = torch.load(trained_run / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 2 and checkpoint["step_in_epoch"] == 0


def test_evaluate_cli_loads_the_trained_model(trained_run):
    data_dir = trained_run / "synthetic"
    result = run(["-m", "unet.evaluate", "--data-dir", str(data_dir), "--model", str(trained_run / "model"),
                  "--split", "test", "--json"])
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("patient_dice_mean", "tumor_slice_dice_mean", "slice_dice_mean", "healthy_fp_rate", "patients", "slices"):
        assert key in metrics
    saved = json.loads((trained_run / "model" / "metrics.json").read_text())["test"]
    # evaluate and train's final test evaluation are the same code path on the same patients
    assert metrics["patients"] == saved["patients"] and metrics["slices"] == saved["slices"]
    assert metrics["patient_dice_mean"] == pytest.approx(saved["patient_dice_mean"], abs=1e-3)
    assert len(result.stdout.strip().splitlines()) == len(evaluate_table_keys) + 1  # the table and the JSON only


evaluate_table_keys = ["patient_dice_mean", "patient_dice_ci95", "patient_dice_median", "patient_dice_min", "tumor_slice_dice_mean",
                       "slice_dice_mean", "slice_iou_mean", "healthy_fp_rate", "worst_patient",
                       "largest_3d_component", "patients / slices"]


def test_evaluate_takes_the_split_the_model_recorded(trained_run, tmp_path, capsys, caplog):
    # In another folder (e.g. the full dataset) the seed gives other patients; the model's record does not.
    from unet.data import split_patients
    from unet.evaluate import main as evaluate_main

    model_dir = tmp_path / "model"
    shutil.copytree(trained_run / "model", model_dir)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    df = scan_dataset(trained_run / "synthetic")
    patients = sorted(df["patient"].unique())
    recomputed = split_patients(df, seed=7)["test"]
    metrics["splits"]["test"] = [p for p in patients if p not in recomputed][:2]
    (model_dir / "metrics.json").write_text(json.dumps(metrics))
    data = ["--data-dir", str(trained_run / "synthetic"), "--model", str(model_dir), "--json"]
    caplog.set_level(logging.INFO, logger="unet.evaluate")
    assert evaluate_main([*data, "--split", "test", "--seed", "7"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(scored["per_patient_dice"]) == metrics["splits"]["test"]
    assert "--seed ignored: the model recorded its split" in caplog.text
    # a model without a record (metrics.json deleted): the split is worked out from the seed given
    (model_dir / "metrics.json").unlink()
    assert evaluate_main([*data, "--split", "test", "--seed", "7"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(scored["per_patient_dice"]) == sorted(recomputed)
    assert "no split recorded with the model: working it out from --seed 7" in caplog.text
    (model_dir / "metrics.json").write_text(json.dumps(metrics))
    # patients the model trained on are scored when asked for, with a warning
    caplog.set_level(logging.WARNING, logger="unet.evaluate")
    assert evaluate_main([*data, "--patients", metrics["splits"]["train"][0]]) == 0
    assert "trained this model" in caplog.text
    # one patient has no interval: null in the JSON, which strict readers take (they refuse NaN)
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=pytest.fail)
    assert scored["patient_dice_ci95"] == [None, None] and 0 <= scored["patient_dice_mean"] <= 1


def test_evaluate_follows_the_models_3d_step_unless_told(trained_run, capsys):
    from unet.evaluate import main as evaluate_main

    config = json.loads((trained_run / "model" / "config.json").read_text())
    results = {}
    for choice in ("config", "on", "off"):
        assert evaluate_main(["--data-dir", str(trained_run / "synthetic"), "--model", str(trained_run / "model"),
                              "--split", "test", "--largest-3d-component", choice, "--json"]) == 0
        results[choice] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["config"]["largest_3d_component"] is config["largest_3d_component"]
    assert results["on"]["largest_3d_component"] is True and results["off"]["largest_3d_component"] is False
    assert results["config"] == results["on" if config["largest_3d_component"] else "off"]
    assert results["on"]["healthy_fp_rate"] <= results["off"]["healthy_fp_rate"]


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "/no/such/folder"], "data folder not found: /no/such/folder"),
    (["--data-dir", "SYNTH", "--model", "./no/such/model"], "no/such/model"),
    (["--data-dir", "SYNTH", "--device", "gpu"], "--device gpu: not a device name"),
])
def test_evaluate_cli_errors_are_one_line(trained_run, args, message):
    args = [str(trained_run / "synthetic") if a == "SYNTH" else a for a in args]
    if "--model" not in args:
        args += ["--model", str(trained_run / "model")]
    result = run(["-m", "unet.evaluate", *args])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_refuses_a_fold_without_the_number_of_folds(capsys):
    from unet import evaluate

    with pytest.raises(SystemExit):
        evaluate.main(["--data-dir", "anywhere", "--model", "any/model", "--fold", "2"])
    assert "--fold 2 needs --folds K" in capsys.readouterr().err


def test_train_on_val_fits_train_and_val_patients_and_keeps_the_last_epoch(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train")
    out = tmp_path / "final"
    code = train.main(["--synthetic", "--train-on-val", "--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "4",
                       "--image-size", "64", "--width", "8", "--threshold", "0.55", "--min-component-area", "16",
                       "--out-dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["trained_on"] == ["train", "val"] and metrics["val"] == {} and metrics["best_epoch"] == 2
    assert metrics["test"]["patients"] == len(metrics["splits"]["test"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert (config["threshold"], config["min_component_area"]) == (0.55, 16)
    assert pd.read_csv(out / "history.csv")["val_patient_dice"].isna().all()
    slices = scan_dataset(out / "synthetic")["patient"].isin(metrics["splits"]["train"] + metrics["splits"]["val"]).sum()
    assert f"training on {slices} slices" in caplog.text
    shipped = load_model(str(out / "model")).state_dict()
    last = torch.load(out / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(shipped[k], last[k]) for k in last)
    card = (out / "model" / "README.md").read_text()
    assert "trained on the training and validation patients" in card
    assert f"Trained on {len(metrics['splits']['train']) + len(metrics['splits']['val'])} patients" in card
    caplog.set_level(logging.WARNING, logger="unet.evaluate")
    from unet.evaluate import main as evaluate_main
    assert evaluate_main(["--data-dir", str(out / "synthetic"), "--model", str(out / "model"), "--split", "val"]) == 0
    assert "trained this model" in caplog.text  # its validation patients are training patients now


def test_dataset_normalisation_uses_the_runs_own_training_slices(tmp_path, caplog):
    from unet.data import channel_stats

    out = tmp_path / "run"
    assert train.main(["--synthetic", "--normalization", "dataset", "--epochs", "1", "--steps-per-epoch", "2",
                       "--batch-size", "4", "--image-size", "64", "--width", "4", "--no-tune", "--out-dir", str(out)]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    splits = json.loads((out / "model" / "metrics.json").read_text())["splits"]
    df = scan_dataset(out / "synthetic")
    mean, std = channel_stats(df[df["patient"].isin(splits["train"])])
    assert (config["mean"], config["std"]) == (mean, std)
    assert mean != list(train.UNet().mean)  # not the constructor's LGG default
    # a resumed run keeps the statistics it started with, even where the training slices changed since
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    checkpoint["stats"] = {"mean": [0.25, 0.25, 0.25], "std": [0.5, 0.5, 0.5]}
    torch.save(checkpoint, out / "last.pt")
    caplog.set_level(logging.INFO, logger="train")
    assert train.main(["--out-dir", str(out), "--resume", "--epochs", "2"]) == 0
    assert "channel statistics: mean [0.25, 0.25, 0.25]" in caplog.text
    assert torch.load(out / "last.pt", weights_only=False)["stats"]["mean"] == [0.25, 0.25, 0.25]


def test_resume_keeps_the_runs_settings_and_says_which_it_ignored(tmp_path, caplog):
    out = tmp_path / "run"
    base = ["--synthetic", "--steps-per-epoch", "2", "--batch-size", "4", "--image-size", "64", "--no-tune",
            "--out-dir", str(out)]
    assert train.main([*base, "--epochs", "1", "--width", "4"]) == 0
    caplog.set_level(logging.WARNING, logger="train")
    assert train.main([*base, "--epochs", "2", "--width", "8", "--resume"]) == 0
    assert "--resume keeps the run's --width 4; the 8 given is ignored" in caplog.text
    # 16 is the default: still named. The post-processing is chosen at the end, so a resume may set it.
    assert train.main([*base, "--epochs", "3", "--width", "16", "--threshold", "0.7", "--resume"]) == 0
    assert "--resume keeps the run's --width 4; the 16 given is ignored" in caplog.text
    assert "--image-size" not in caplog.text  # named again with the run's own value: nothing to say
    assert "--threshold" not in caplog.text
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["width"] == 4 and config["threshold"] == 0.7
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3]
    # A bare --resume is the run as it last stood: no default --epochs 60, no default threshold.
    assert train.main(["--out-dir", str(out), "--resume"]) == 0
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert json.loads((out / "model" / "config.json").read_text())["threshold"] == 0.7


def test_two_fold_runs_pool_into_one_evaluation_of_every_patient(tmp_path):
    models = []
    for fold in (0, 1):
        out = tmp_path / f"cv-{fold}"
        assert train.main(["--synthetic", "--folds", "2", "--fold", str(fold), "--epochs", "1", "--steps-per-epoch", "3",
                           "--batch-size", "4", "--image-size", "64", "--width", "8", "--no-tune", "--out-dir", str(out)]) == 0
        models.append(json.loads((out / "model" / "metrics.json").read_text()))
    data_dir = tmp_path / "cv-0" / "synthetic"
    result = run(["-m", "unet.evaluate", "--data-dir", str(data_dir), "--json",
                  "--cv", str(tmp_path / "cv-0" / "model"), str(tmp_path / "cv-1" / "model")])
    assert result.returncode == 0, result.stderr
    pooled = json.loads(result.stdout.strip().splitlines()[-1])
    assert pooled["patients"] == scan_dataset(data_dir)["patient"].nunique()
    # each patient's Dice is the one its own fold's model measured at the end of training
    expected = {**models[0]["test"]["per_patient_dice"], **models[1]["test"]["per_patient_dice"]}
    assert pooled["per_patient_dice"] == pytest.approx(expected, abs=1e-3)
    # models without context slices: predicting each slice alone changes nothing
    alone = run(["-m", "unet.evaluate", "--data-dir", str(data_dir), "--json", "--context", "off",
                 "--cv", str(tmp_path / "cv-0" / "model"), str(tmp_path / "cv-1" / "model")])
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout.strip().splitlines()[-1]) == pooled

    twice = run(["-m", "unet.evaluate", "--data-dir", str(data_dir), "--cv", str(tmp_path / "cv-0" / "model"),
                 str(tmp_path / "cv-0" / "model")])
    assert twice.returncode == 2 and "which another fold tests too" in twice.stderr
    assert len(twice.stderr.strip().splitlines()) == 1
    refused = run(["-m", "unet.evaluate", "--data-dir", str(data_dir), "--cv", str(tmp_path / "cv-0" / "model"),
                   "--seed", "7"])  # a split of one model means nothing to pooled folds
    assert refused.returncode == 2 and "--seed does not apply" in refused.stderr
    refused = run(["-m", "unet.evaluate", "--data-dir", str(data_dir), "--cv", str(tmp_path / "cv-0" / "model"),
                   "--split", "all"])  # named with its default value: still refused
    assert refused.returncode == 2 and "--split does not apply" in refused.stderr


def test_a_context_run_trains_resumes_and_evaluates_with_context_on_and_off(tmp_path, caplog):
    out = tmp_path / "context"
    base = ["--synthetic", "--steps-per-epoch", "3", "--batch-size", "4", "--image-size", "64", "--width", "4",
            "--out-dir", str(out)]
    assert train.main([*base, "--epochs", "1", "--context-slices", "1"]) == 0
    caplog.set_level(logging.WARNING, logger="train")
    assert train.main([*base, "--epochs", "2", "--context-slices", "2", "--context-dropout", "0.5", "--resume"]) == 0
    assert "--resume keeps the run's --context-slices 1; the 2 given is ignored" in caplog.text
    assert "--resume keeps the run's --context-dropout 0.25; the 0.5 given is ignored" in caplog.text
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["context_slices"] == 1 and config["in_channels"] == 9
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert "--context-slices 1" in metrics["command"] and "--context-dropout" not in metrics["command"]
    # beside the volume scores, those of slices uploaded one at a time
    assert metrics["test_per_slice"]["patients"] == metrics["test"]["patients"] == len(metrics["splits"]["test"])
    assert metrics["test_per_slice"]["largest_3d_component"] is False

    def evaluate(*extra: str) -> dict:
        result = run(["-m", "unet.evaluate", "--data-dir", str(out / "synthetic"), "--model", str(out / "model"),
                      "--split", "test", "--json", *extra])
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    volume, alone = evaluate("--context", "config"), evaluate("--context", "off", "--largest-3d-component", "off")
    assert volume["patient_dice_mean"] == pytest.approx(metrics["test"]["patient_dice_mean"], abs=1e-3)
    assert alone["patient_dice_mean"] == pytest.approx(metrics["test_per_slice"]["patient_dice_mean"], abs=1e-3)
    assert evaluate("--context", "off")["slices"] == volume["slices"]


def test_predict_frame_feeds_each_patients_volume_and_keeps_the_frames_row_order(synthetic_dir):
    model = UNet(in_channels=9, context_slices=1, width=4, depth=1, image_size=32).eval()
    df = scan_dataset(synthetic_dir)
    df = df[df["patient"].isin(sorted(df["patient"].unique())[:2])]
    shuffled = df.sample(frac=1, random_state=0)
    probs, targets = predict_frame(model, shuffled, batch_size=4, progress=False)
    for (_, row), prob, target in zip(shuffled.iterrows(), probs, targets):
        volume = df[df["patient"] == row["patient"]].sort_values("slice")
        expected = predict_proba(model, [read_image(p) for p in volume["image_path"]], volume=True)
        assert np.allclose(prob, expected[list(volume.index).index(row.name)], atol=1e-5)
        assert np.array_equal(target, read_mask(row["mask_path"]))
    alone, _ = predict_frame(model, shuffled, batch_size=4, progress=False, context=False)
    for (_, row), prob in zip(shuffled.iterrows(), alone):
        assert np.allclose(prob, predict_proba(model, [read_image(row["image_path"])])[0], atol=1e-5)
    assert not all(np.allclose(a, b, atol=1e-4) for a, b in zip(probs, alone))


@pytest.mark.parametrize("stray_is_tumor", [False, True])
def test_tuning_keeps_the_largest_3d_component_only_where_validation_gains(monkeypatch, stray_is_tumor):
    # One validation patient: a tumor through slices 1-3 and a 324-px blob on slice 5, beyond every
    # minimum area the per-slice tuning tries. As a false positive the blob makes the 3D step worth
    # keeping; as a second lesion the 3D step would delete tumor, so it stays off.
    probs = [np.zeros((64, 64), np.float32) for _ in range(6)]
    for k in (1, 2, 3):
        probs[k][10:30, 10:30] = 1.0
    probs[5][40:58, 40:58] = 1.0
    targets = [p > 0.5 for p in probs]
    if not stray_is_tumor:
        targets[5] = np.zeros((64, 64), bool)
    val_df = pd.DataFrame({"patient": ["P"] * 6, "slice": [1, 2, 3, 4, 5, 6]})
    monkeypatch.setattr(train, "predict_frame", lambda model, df, precision="auto", progress=True: (probs, targets))
    chosen = train.tune_postprocessing(train.UNet(width=4, depth=1), val_df)
    # every threshold and area scores the same here: a tie goes to the first, simplest setting
    assert chosen == {"tta_flips": False, "threshold": 0.3, "min_component_area": 0, "fill_holes": False,
                      "largest_3d_component": not stray_is_tumor}


@pytest.mark.parametrize("consider_tta", [False, True])
def test_tuning_finds_the_one_threshold_and_area_that_score_best(monkeypatch, consider_tta):
    # Slice 1: a tumor at 0.65 (its last column missed) inside a rim of 0.55 that is not tumor: only 0.6 keeps
    # the one and drops the other. Slice 2: a 100-px tumor that a minimum area of 128 would delete. Slice 3,
    # healthy: a 48-px blob at 0.9 that only a minimum area of 64 or more removes. So 0.6 and 64, and nothing
    # else, score best. With TTA considered, the flipped passes find the whole tumor and nothing more.
    size = 64
    probs = [np.zeros((size, size), np.float32) for _ in range(3)]
    targets = [np.zeros((size, size), bool) for _ in range(3)]
    probs[0][6:34, 6:34] = 0.55
    probs[0][10:30, 10:29] = 0.65
    targets[0][10:30, 10:30] = True
    probs[1][12:22, 12:22] = 0.65
    targets[1][12:22, 12:22] = True
    probs[2][45:51, 45:53] = 0.9
    perfect = [t.astype(np.float32) for t in targets]
    val_df = pd.DataFrame({"patient": ["P"] * 3, "slice": [1, 2, 3]})

    def fake_predict_frame(model, df, precision="auto", progress=True):
        return (perfect if model.tta_flips else probs), targets

    monkeypatch.setattr(train, "predict_frame", fake_predict_frame)
    model = train.UNet(width=4, depth=1, image_size=size)  # areas in pixels of these maps
    chosen = train.tune_postprocessing(model, val_df, consider_tta=consider_tta)
    expected = {"tta_flips": True, "threshold": 0.3, "min_component_area": 0} if consider_tta else \
        {"tta_flips": False, "threshold": 0.6, "min_component_area": 64}
    assert chosen == {**expected, "fill_holes": False, "largest_3d_component": False}
    assert model.tta_flips is False  # tuning leaves the model as it found it; the caller applies the choice


@pytest.mark.parametrize("hole_is_tumor", [False, True])
def test_tuning_fills_holes_only_where_validation_gains(monkeypatch, hole_is_tumor):
    # A tumor on three slices whose centre the model is unsure of (probability 0.2, under every threshold
    # tried): filling it is right where the reference has tumor there, and wrong where it does not.
    probs = [np.zeros((64, 64), np.float32) for _ in range(4)]
    for k in (1, 2, 3):
        probs[k][10:40, 10:40] = 0.9
        probs[k][20:30, 20:30] = 0.2
    targets = [p > 0.5 for p in probs]
    if hole_is_tumor:
        targets = [p > 0.1 for p in probs]
    val_df = pd.DataFrame({"patient": ["P"] * 4, "slice": [1, 2, 3, 4]})
    monkeypatch.setattr(train, "predict_frame", lambda model, df, precision="auto", progress=True: (probs, targets))
    chosen = train.tune_postprocessing(train.UNet(width=4, depth=1), val_df)
    assert chosen["fill_holes"] is hole_is_tumor and chosen["largest_3d_component"] is False


def test_epoch_indices_are_replayable_and_tumor_weighted():
    has_tumor = np.array([True] * 10 + [False] * 90)
    a = train.epoch_indices(has_tumor, 0.5, 4000, seed=3, epoch=7)
    assert a == train.epoch_indices(has_tumor, 0.5, 4000, seed=3, epoch=7)
    assert a != train.epoch_indices(has_tumor, 0.5, 4000, seed=3, epoch=8)
    assert 0.45 < has_tumor[a].mean() < 0.55


def test_patient_sampling_draws_each_tumor_patient_equally():
    # patient a: 2 tumor slices, patient b: 18; 80 healthy slices between them
    patients = np.array(["a"] * 10 + ["b"] * 90)
    has_tumor = np.zeros(100, bool)
    has_tumor[:2] = True
    has_tumor[10:28] = True
    by_slice = np.array(train.epoch_indices(has_tumor, 0.5, 20000, seed=0, epoch=0))
    by_patient = np.array(train.epoch_indices(has_tumor, 0.5, 20000, seed=0, epoch=0, patients=patients))
    for drawn in (by_slice, by_patient):
        assert 0.47 < has_tumor[drawn].mean() < 0.53
    tumor_draws = by_patient[has_tumor[by_patient]]
    assert 0.47 < (patients[tumor_draws] == "a").mean() < 0.53
    assert (patients[by_slice[has_tumor[by_slice]]] == "a").mean() < 0.15
    assert by_patient.tolist() == train.epoch_indices(has_tumor, 0.5, 20000, seed=0, epoch=0, patients=patients)


def test_recorded_command_and_data_name_hold_no_machine_paths():
    args = train.build_parser().parse_args(["--data-dir", "/home/alice/lgg/kaggle_3m", "--out-dir", "/scratch/alice/run7",
                                            "--epochs", "5", "--tumor-sampling", "patient", "--push", "--repo-id", "a/b"])
    assert train.training_command(args) == "python train.py --tumor-sampling patient --epochs 5"
    assert train.dataset_name(args.data_dir) == "lgg/kaggle_3m"
    assert train.dataset_name("/home/alice/lgg_subset/") == "lgg_subset"


def test_lr_warms_up_then_decays():
    factors = [train.lr_factor(s, 10, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.01, abs=0.01)


@pytest.mark.real_data
@pytest.mark.slow
def test_real_run_resumes_after_kill_mid_epoch(real_data_dir, tmp_path):
    """A short run on 6 real patients, killed mid-epoch, resumes where it stopped and evaluates."""
    out = tmp_path / "run"
    args = ["train.py", "--data-dir", str(real_data_dir), "--patients", "6", "--image-size", "128", "--width", "8",
            "--epochs", "2", "--steps-per-epoch", "40", "--batch-size", "4", "--checkpoint-every", "5",
            "--out-dir", str(out), "--seed", "1"]
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / "last.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.fail(f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
    assert checkpoint.exists(), "no checkpoint within 240 s"
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = torch.load(checkpoint, weights_only=False)
    assert state["epoch"] == 0 and state["step_in_epoch"] > 0, "the kill should land mid-epoch"
    killed_at = state["step_in_epoch"]

    # a run moves between machines: its data folder may change, its patients may not
    other = make_synthetic_dataset(tmp_path / "other", patients=3, slices=4, size=128, healthy_patients=1, seed=0)
    refused = run(args + ["--resume", "--data-dir", str(other)])
    assert refused.returncode == 2 and "lacks" in refused.stderr and "Traceback" not in refused.stderr
    moved = tmp_path / "moved"
    moved.symlink_to(real_data_dir, target_is_directory=True)
    resumed = run(args + ["--resume", "--data-dir", str(moved)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "model" / "metrics.json").read_text())["data"] == "moved"
    assert f"resuming {checkpoint} at epoch 1, step {killed_at}" in resumed.stderr
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    final = torch.load(checkpoint, weights_only=False)
    assert final["scheduler"]["last_epoch"] == 80  # every step of both epochs ran exactly once

    evaluated = run(["-m", "unet.evaluate", "--data-dir", str(real_data_dir), "--model", str(out / "model"),
                     "--patients", *json.loads((out / "model" / "metrics.json").read_text())["splits"]["test"], "--json"])
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["slices"] > 0
    assert load_model(str(out / "model")).image_size == 128


def test_train_reports_bad_data_dir(tmp_path):
    result = run(["train.py", "--data-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "run")])
    assert result.returncode == 2
    assert "data folder not found" in result.stderr and "Traceback" not in result.stderr


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    result = run(["train.py", "--out-dir", str(tmp_path), "--resume"])
    assert result.returncode == 2 and "no checkpoint" in result.stderr


def test_a_run_resumed_on_another_machine_names_both():
    machines = [{"machine": "NVIDIA H200", "from_epoch": 1}, {"machine": "AMD EPYC, 2 cores", "from_epoch": 47}]
    assert train.machines_text(machines, 60) == "NVIDIA H200 (epochs 1-46), AMD EPYC, 2 cores (epochs 47-60)"
    assert train.machines_text(machines[:1], 60) == "NVIDIA H200"
    assert train.machines_text(machines[1:], 60) == "an unrecorded machine (epochs 1-46), AMD EPYC, 2 cores (epochs 47-60)"


def test_same_seed_same_run_with_any_number_of_workers(tmp_path):
    """Augmentation included: one seed trains the same weights with 0 or 2 DataLoader workers, another does not."""
    def weights(name: str, seed: int, workers: int) -> dict:
        out = tmp_path / name
        assert train.main(["--synthetic", "--epochs", "1", "--steps-per-epoch", "4", "--batch-size", "4", "--image-size", "64",
                           "--width", "8", "--no-tune", "--seed", str(seed), "--workers", str(workers),
                           "--out-dir", str(out)]) == 0
        return torch.load(out / "last.pt", weights_only=False)["model"]
    first, again, other = weights("a", 1, 0), weights("b", 1, 2), weights("c", 2, 0)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_weight_average_warms_up_so_the_initialisation_fades_fast():
    update = train.ema_update(0.999)
    averaged, counter = [torch.zeros(3)], [torch.tensor(5)]
    update(averaged, [torch.ones(3)], torch.tensor(1))  # decay 2/11: the average mostly follows the weights
    assert torch.allclose(averaged[0], torch.full((3,), 9 / 11))
    for n in range(2, 1100):
        update(averaged, [torch.ones(3)], torch.tensor(n))
    assert float(averaged[0][0]) > 0.999  # a constant decay of 0.999 would leave a third of the start
    update(counter, [torch.tensor(9)], torch.tensor(3))
    assert int(counter[0]) == 9


def test_weight_average_is_what_gets_kept_and_it_resumes_exactly(tmp_path, monkeypatch):
    """--ema: the averaged weights are validated and kept, and a run stopped mid-epoch resumes to the same average."""
    def args(name: str) -> list[str]:
        return ["--synthetic", "--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "4", "--image-size", "64",
                "--width", "8", "--train-on-val", "--ema", "0.7", "--checkpoint-every", "2",
                "--out-dir", str(tmp_path / name)]

    assert train.main(args("whole")) == 0
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    assert int(whole["ema"]["n_averaged"]) == 8
    averaged = {k.removeprefix("module."): v for k, v in whole["ema"].items() if k != "n_averaged"}
    assert not all(torch.equal(averaged[k], whole["model"][k]) for k in whole["model"])
    # --train-on-val keeps the last epoch: the kept model is the average then, not the raw weights
    kept = load_model(str(tmp_path / "whole" / "best")).state_dict()
    assert all(torch.equal(kept[k], averaged[k]) for k in kept)

    class Stop(Exception):
        pass

    real_step, calls = train.train_step, []
    def stopping_step(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint at step 2 of epoch 1
            raise Stop
        return real_step(*a, **k)
    monkeypatch.setattr(train, "train_step", stopping_step)
    with pytest.raises(Stop):
        train.main(args("stopped"))
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.main(args("stopped") + ["--resume"]) == 0
    resumed = torch.load(tmp_path / "stopped" / "last.pt", weights_only=False)
    assert all(torch.equal(resumed["model"][k], whole["model"][k]) for k in whole["model"])
    assert all(torch.equal(resumed["ema"][k], whole["ema"][k]) for k in whole["ema"])


def test_with_the_3d_step_the_slice_by_slice_scores_are_recorded_beside(tmp_path):
    out = tmp_path / "run"
    assert train.main(["--synthetic", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--image-size", "64",
                       "--width", "4", "--no-tune", "--largest-3d-component", "--out-dir", str(out)]) == 0
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    for split in ("val", "test"):
        on, off = metrics[split], metrics[f"{split}_per_slice"]
        assert on["largest_3d_component"] is True and off["largest_3d_component"] is False
        assert on["patients"] == off["patients"] == len(metrics["splits"][split])


def test_fn_weight_changes_the_loss_trained_on_and_is_recorded(tmp_path, capsys):
    def losses(name: str, *extra: str) -> list[float]:
        out = tmp_path / name
        assert train.main(["--synthetic", "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "4", "--image-size",
                           "64", "--width", "4", "--no-tune", "--out-dir", str(out), *extra]) == 0
        return pd.read_csv(out / "history.csv")["train_loss"].tolist()

    assert losses("tversky", "--fn-weight", "0.8") != losses("dice")  # same seed, same batches: only the loss differs
    assert "--fn-weight 0.8" in json.loads((tmp_path / "tversky" / "model" / "metrics.json").read_text())["command"]


@pytest.mark.parametrize("args, message", [
    (["--fn-weight", "1.5"], "--fn-weight must lie between 0 and 1, not 1.5"),
    (["--tumor-fraction", "2"], "--tumor-fraction is a share of each batch, from 0 to 1, not 2.0"),
    (["--epochs", "0"], "--epochs and --patience must be at least 1"),
    (["--fold", "3"], "--fold 3 needs --folds K"),
    (["--image-size", "100"], "--image-size 100 must be a positive multiple of 2**depth = 16"),
    (["--image-size", "0"], "--image-size 0 must be a positive multiple of 2**depth = 16"),
    (["--push"], "--push needs --repo-id USER/NAME"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1, not 0"),
    (["--steps-per-epoch", "0"], "--steps-per-epoch must be at least 1, not 0"),
    (["--width", "0"], "--width must be at least 1, not 0"),
    (["--workers", "-1"], "--workers cannot be negative, not -1"),
    (["--lr", "nan"], "--lr must be a positive number, not nan"),
    (["--flair-only-p", "2"], "--flair-only-p is a probability, from 0 to 1, not 2.0"),
    (["--val-fraction", "0"], "--val-fraction must lie between 0 and 1, not 0.0"),
    (["--test-fraction", "-0.1"], "--test-fraction must be from 0 to below 1 - --val-fraction, not -0.1"),
    (["--patients", "-1"], "--patients must be at least 3 (train, validation, test), not -1"),
    (["--folds", "5", "--fold", "5"], "--fold must be from 0 to 4, not 5"),
    (["--folds", "2", "--val-fraction", "0.5"], "--val-fraction must be below 1 - 1/--folds = 0.50, not 0.5"),
    (["--threshold", "1"], "--threshold must lie between 0 and 1, not 1.0"),
    (["--context-slices", "-1"], "--context-slices cannot be negative, not -1"),
    (["--context-dropout", "1.5"], "--context-dropout is a probability, from 0 to 1, not 1.5"),
])
def test_settings_that_cannot_work_are_refused_before_any_data_is_read(args, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(args)
    assert message in capsys.readouterr().err


def test_the_best_validation_epoch_is_kept_and_patience_stops_the_run(tmp_path, monkeypatch):
    scripted = iter([0.5, 0.8, 0.6, 0.6, 0.9])  # the 0.9 would come after patience has run out
    weights_seen = []

    def scripted_validation(model, frame, **_):
        weights_seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        dice = next(scripted)
        return {"patient_dice_mean": dice, "tumor_slice_dice_mean": dice, "slice_dice_mean": dice, "healthy_fp_rate": 0.0}

    monkeypatch.setattr(train, "evaluate_model", scripted_validation)
    out = tmp_path / "run"
    assert train.main(["--synthetic", "--epochs", "5", "--patience", "2", "--steps-per-epoch", "2", "--batch-size", "4",
                       "--image-size", "64", "--width", "4", "--no-tune", "--out-dir", str(out)]) == 0
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["epochs_trained"] == 4
    assert pd.read_csv(out / "history.csv")["val_patient_dice"].tolist() == [0.5, 0.8, 0.6, 0.6]
    shipped = load_model(str(out / "model")).state_dict()
    assert all(torch.equal(shipped[k], weights_seen[1][k]) for k in shipped)  # epoch 2's weights
    assert not all(torch.equal(shipped[k], weights_seen[3][k]) for k in shipped)


def test_a_run_is_never_overwritten_and_a_broken_checkpoint_is_named(tmp_path, caplog):
    out = tmp_path / "run"
    base = ["--synthetic", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--image-size", "64",
            "--width", "4", "--no-tune", "--out-dir", str(out)]
    assert train.main(base) == 0
    checkpoint = (out / "last.pt").read_bytes()
    caplog.set_level(logging.ERROR, logger="train")
    assert train.main(base) == 2  # the same command again, without --resume
    assert f"{out} already holds a run (last.pt): add --resume" in caplog.text
    assert (out / "last.pt").read_bytes() == checkpoint
    (out / "last.pt").write_bytes(checkpoint[: len(checkpoint) // 2])  # a copy cut short
    assert train.main([*base, "--resume"]) == 2
    assert f"{out / 'last.pt'} is not a readable checkpoint" in caplog.text
    torch.save({"weights": 1}, out / "last.pt")
    assert train.main([*base, "--resume"]) == 2
    assert f"{out / 'last.pt'} is not a checkpoint of train.py" in caplog.text
    (out / "last.pt").unlink()  # the largest file, the first one deleted to save space: the run is still there
    history = (out / "history.csv").read_bytes()
    assert train.main(base) == 2
    assert f"{out} already holds a run (best): add --resume" in caplog.text
    assert (out / "history.csv").read_bytes() == history
    big = ["--synthetic", "--epochs", "1", "--batch-size", "1000", "--image-size", "64", "--width", "4", "--no-tune"]
    assert train.main([*big, "--out-dir", str(tmp_path / "big")]) == 2  # an epoch would have no step
    assert "--batch-size 1000 is more than the" in caplog.text


def test_a_save_of_the_best_epoch_cut_short_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    best = tmp_path / "best"
    first = UNet(width=4, depth=2, image_size=64, normalization="slice")
    train.save_best(first, best)
    second = UNet(width=4, depth=2, image_size=64, normalization="slice")

    def killed_mid_write(self, folder, **_):  # dies after the weights, before the config
        Path(folder).mkdir()
        (Path(folder) / "model.safetensors").write_bytes(b"torn")
        raise KeyboardInterrupt

    monkeypatch.setattr(UNet, "save_pretrained", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train.save_best(second, best)
    kept = load_model(str(best))
    assert kept.normalization == "slice"
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in first.state_dict().items())
    monkeypatch.undo()
    train.save_best(second, best)  # the next epoch's save clears what the cut one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert all(torch.equal(load_model(str(best)).state_dict()[k], v) for k, v in second.state_dict().items())


def test_a_checkpoint_save_cut_short_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    train.save_atomic({"epoch": 1}, path)

    class CutShortFile(io.FileIO):  # Ctrl-C lands while torch is writing the weights
        def write(self, data):
            if self.tell() > 1000:
                raise KeyboardInterrupt
            return super().write(data)

    monkeypatch.setattr(train, "open", CutShortFile, raising=False)
    with pytest.raises(KeyboardInterrupt):  # not torch's "unexpected pos" error from closing the torn zip
        train.save_atomic({"epoch": 2, "weights": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_ctrl_c_stops_a_run_with_the_command_that_resumes_it(tmp_path):
    out = tmp_path / "run"
    args = ["train.py", "--synthetic", "--epochs", "200", "--steps-per-epoch", "5", "--batch-size", "2",
            "--image-size", "64", "--width", "4", "--checkpoint-every", "1", "--no-tune", "--out-dir", str(out)]
    # a shell that started pytest in the background passes SIGINT on as ignored: the run gets it as a terminal would
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (out / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()[-2000:]
    assert "interrupted: the same command with --resume goes on from OUT_DIR/last.pt" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] < 200

