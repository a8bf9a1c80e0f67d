import io
import json
import logging
import os
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
from unet import checkpoint, run_record, training
from unet.checkpoint import Checkpoint
from unet.config import TrainConfig, TrainingError
from unet.data import scan_dataset, split_patients
from unet.evaluate import main as evaluate_main
from unet.evaluate import run_name
from unet.evaluation import predict_frame
from unet.losses import BCEDiceLoss
from unet.model import UNet
from unet.processing import LGG_MEAN, Postprocessing, Preprocessing
from unet.reader import read_image, read_mask
from unet.segmenter import Segmenter
from unet.synthetic import make_synthetic_dataset
from unet.training import Trainer

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def quick(out: Path, *extra: str) -> list[str]:
    """A short synthetic run: 1 epoch of 2 steps on a width-4 net at 64 px, unless ``extra`` says otherwise."""
    return [
        "--synthetic",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "4",
        "--image-size",
        "64",
        "--width",
        "4",
        "--out-dir",
        str(out),
        *extra,
    ]


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_synthetic_run_lowers_loss_and_writes_everything(trained_run):
    history = pd.read_csv(trained_run / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    for name in (
        "last.pt",
        "curves.png",
        "best/model.safetensors",
        "best/preprocessor_config.json",
        "model/config.json",
        "model/model.safetensors",
        "model/preprocessor_config.json",
        "model/postprocessor_config.json",
        "model/metrics.json",
        "model/README.md",
        "model/curves.png",
    ):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "model" / "metrics.json").read_text())
    assert set(metrics) == {
        "test",
        "test_per_slice",
        "val",
        "val_per_slice",
        "best_epoch",
        "trained_on",
        "epochs_trained",
        "train_hours",
        "machine",
        "precision",
        "parameters",
        "splits",
        "data",
        "command",
    }
    assert set(metrics["splits"]) == {"train", "val", "test"} and metrics["trained_on"] == ["train"]
    assert metrics["command"].startswith("python train.py --synthetic")
    assert metrics["data"] == "synthetic phantoms"
    checkpoint = Checkpoint.load(trained_run / "last.pt")
    assert checkpoint.epoch == 3 and checkpoint.step_in_epoch == 0
    # the fixture's model finds the phantoms' tumors and carries non-default post-processing (see conftest)
    assert metrics["test"]["patient_dice_mean"] > 0.5
    post = json.loads((trained_run / "model" / "postprocessor_config.json").read_text())
    assert post == {
        "threshold": 0.4,
        "min_component_area": 16,
        "fill_holes": True,
        "tta_flips": False,
        "largest_3d_component": True,
        "largest_3d_component_by": "probability",
    }
    assert json.loads((trained_run / "model" / "config.json").read_text()) == UNet(width=8).architecture


def test_with_the_3d_step_the_slice_by_slice_scores_are_recorded_beside(trained_run):
    metrics = json.loads((trained_run / "model" / "metrics.json").read_text())
    for split in ("val", "test"):
        on, off = metrics[split], metrics[f"{split}_per_slice"]
        assert on["largest_3d_component"] is True and off["largest_3d_component"] is False
        assert on["patients"] == off["patients"] == len(metrics["splits"][split])


evaluate_table_keys = [
    "patient_dice_mean",
    "patient_dice_ci95",
    "patient_dice_median",
    "patient_dice_min",
    "tumor_slice_dice_mean",
    "slice_dice_mean",
    "slice_iou_mean",
    "healthy_fp_rate",
    "worst_patient",
    "largest_3d_component",
    "patients / slices",
]


def test_evaluate_cli_loads_the_trained_model(trained_run, capsys):
    assert (
        evaluate_main(
            [
                "--data-dir",
                str(trained_run / "synthetic"),
                "--model",
                str(trained_run / "model"),
                "--split",
                "test",
                "--json",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    metrics = last_json(out)
    for key in (
        "patient_dice_mean",
        "tumor_slice_dice_mean",
        "slice_dice_mean",
        "healthy_fp_rate",
        "patients",
        "slices",
    ):
        assert key in metrics
    saved = json.loads((trained_run / "model" / "metrics.json").read_text())["test"]
    # evaluate and train's final test evaluation are the same code path on the same patients
    assert metrics["patients"] == saved["patients"] and metrics["slices"] == saved["slices"]
    assert metrics["patient_dice_mean"] == pytest.approx(saved["patient_dice_mean"], abs=1e-3)
    assert len(out.strip().splitlines()) == len(evaluate_table_keys) + 1  # the table and the JSON only


def test_evaluate_takes_the_split_the_model_recorded(trained_run, tmp_path, capsys, caplog):
    # In another folder (e.g. the full dataset) the seed gives other patients; the model's record does not.
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
    scored = last_json(capsys.readouterr().out)
    assert sorted(scored["per_patient_dice"]) == metrics["splits"]["test"]
    assert "--seed ignored: the model recorded its split" in caplog.text
    # a model without a record (metrics.json deleted): the split is worked out from the seed given
    (model_dir / "metrics.json").unlink()
    assert evaluate_main([*data, "--split", "test", "--seed", "7"]) == 0
    scored = last_json(capsys.readouterr().out)
    assert sorted(scored["per_patient_dice"]) == sorted(recomputed)
    assert "no split recorded with the model: working it out from --seed 7" in caplog.text
    (model_dir / "metrics.json").write_text(json.dumps(metrics))
    # patients the model trained on are scored when asked for, with a warning
    caplog.set_level(logging.WARNING, logger="unet.evaluation")
    assert evaluate_main([*data, "--patients", metrics["splits"]["train"][0]]) == 0
    assert "trained this model" in caplog.text
    # one patient has no interval: null in the JSON, which strict readers take (they refuse NaN)
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=pytest.fail)
    assert scored["patient_dice_ci95"] == [None, None] and 0 <= scored["patient_dice_mean"] <= 1


def test_evaluate_follows_the_models_3d_step_unless_told(trained_run, tmp_path, capsys):
    # Each test patient gets a tumor slice's image on healthy slice 15 (its mask stays empty), two healthy slices
    # away from the tumor on slices 6-12: a 3D component of its own that the step must remove, whatever the CPU's
    # rounding made of the fixture's model.
    model = trained_run / "model"
    post = json.loads((model / "postprocessor_config.json").read_text())
    data = shutil.copytree(trained_run / "synthetic", tmp_path / "synthetic")
    for patient in json.loads((model / "metrics.json").read_text())["splits"]["test"]:
        folder = next(data.rglob(patient))
        shutil.copyfile(folder / f"{patient}_9.tif", folder / f"{patient}_15.tif")
    results = {}
    for choice in ("config", "on", "off"):
        assert (
            evaluate_main(
                [
                    "--data-dir",
                    str(data),
                    "--model",
                    str(model),
                    "--split",
                    "test",
                    "--largest-3d-component",
                    choice,
                    "--json",
                ]
            )
            == 0
        )
        results[choice] = last_json(capsys.readouterr().out)
    assert results["config"]["largest_3d_component"] is post["largest_3d_component"]
    assert results["on"]["largest_3d_component"] is True and results["off"]["largest_3d_component"] is False
    assert results["config"] == results["on" if post["largest_3d_component"] else "off"]
    assert results["on"]["healthy_fp_rate"] <= results["off"]["healthy_fp_rate"]
    assert results["on"]["per_patient_dice"] != results["off"]["per_patient_dice"]  # the step does act here


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data-dir", "/no/such/folder"], "data folder not found: /no/such/folder"),
        (["--data-dir", "SYNTH", "--model", "./no/such/model"], "no/such/model"),
        (["--data-dir", "SYNTH", "--device", "gpu"], "--device gpu: not a device name"),
    ],
)
def test_evaluate_cli_errors_are_one_line(trained_run, args, message):
    args = [str(trained_run / "synthetic") if a == "SYNTH" else a for a in args]
    if "--model" not in args:
        args += ["--model", str(trained_run / "model")]
    result = run(["-m", "unet.evaluate", *args])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_refuses_a_fold_without_the_number_of_folds(capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--data-dir", "anywhere", "--model", "any/model", "--fold", "2"])
    assert "--fold 2 needs --folds K" in capsys.readouterr().err


def test_dataset_normalisation_uses_the_runs_own_training_slices(tmp_path, caplog):
    from unet.data import channel_stats

    out = tmp_path / "run"
    config = tmp_path / "dataset.yaml"  # a setting only an experiment changes: a config file, YAML or JSON
    config.write_text("normalization: dataset\n")
    assert train.main(quick(out, "--config", str(config))) == 0
    pre = json.loads((out / "model" / "preprocessor_config.json").read_text())
    splits = json.loads((out / "model" / "metrics.json").read_text())["splits"]
    df = scan_dataset(out / "synthetic")
    mean, std = channel_stats(df[df["patient"].isin(splits["train"])])
    assert pre["normalization"] == "dataset" and (pre["mean"], pre["std"]) == (mean, std)
    assert mean != list(LGG_MEAN)  # not the LGG default
    assert (
        '--config config.json  # config.json: {"normalization": "dataset"}'
        in json.loads((out / "model" / "metrics.json").read_text())["command"]
    )
    # a resumed run keeps the statistics it started with, even where the training slices changed since
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    checkpoint["preprocessing"] = {**checkpoint["preprocessing"], "mean": [0.25] * 3, "std": [0.5] * 3}
    torch.save(checkpoint, out / "last.pt")
    caplog.set_level(logging.INFO, logger="unet.training")
    assert train.main(["--out-dir", str(out), "--resume", "--epochs", "2"]) == 0
    assert "channel statistics: mean [0.25, 0.25, 0.25]" in caplog.text
    assert Checkpoint.load(out / "last.pt").preprocessing["mean"] == (0.25, 0.25, 0.25)


def test_resume_keeps_the_runs_settings_and_says_which_it_ignored(tmp_path, caplog):
    out = tmp_path / "run"
    base = ["--synthetic", "--steps-per-epoch", "2", "--batch-size", "4", "--image-size", "64", "--out-dir", str(out)]
    assert train.main([*base, "--epochs", "1", "--width", "4"]) == 0
    caplog.set_level(logging.WARNING, logger="unet.training")
    assert train.main([*base, "--epochs", "2", "--width", "8", "--resume"]) == 0
    assert "--resume keeps the run's --width 4; the 8 given is ignored" in caplog.text
    # 16 is the default: still named. A config file's setting is held the same way.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"weight_decay": 0.01}))
    assert train.main([*base, "--epochs", "3", "--width", "16", "--config", str(config), "--resume"]) == 0
    assert "--resume keeps the run's --width 4; the 16 given is ignored" in caplog.text
    assert "--resume keeps the run's weight_decay 0.0001; the 0.01 given is ignored" in caplog.text
    assert "--image-size" not in caplog.text  # named again with the run's own value: nothing to say
    assert json.loads((out / "model" / "config.json").read_text())["width"] == 4
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3]
    # A bare --resume is the run as it last stood: no default --epochs 60.
    assert train.main(["--out-dir", str(out), "--resume"]) == 0
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert Checkpoint.load(out / "last.pt").config["epochs"] == 3


def test_two_fold_runs_pool_into_one_evaluation_of_every_patient(tmp_path, capsys):
    models = []
    for fold in (0, 1):
        out = tmp_path / f"cv-{fold}"
        args = quick(out, "--folds", "2", "--fold", str(fold), "--steps-per-epoch", "3", "--width", "8")
        assert train.main(args) == 0
        models.append(json.loads((out / "model" / "metrics.json").read_text()))
    data_dir = tmp_path / "cv-0" / "synthetic"
    folds = [str(tmp_path / "cv-0" / "model"), str(tmp_path / "cv-1" / "model")]
    assert evaluate_main(["--data-dir", str(data_dir), "--json", "--cv", *folds]) == 0
    pooled = last_json(capsys.readouterr().out)
    assert pooled["patients"] == scan_dataset(data_dir)["patient"].nunique()
    # each patient's Dice is the one its own fold's model measured at the end of training
    expected = {**models[0]["test"]["per_patient_dice"], **models[1]["test"]["per_patient_dice"]}
    assert pooled["per_patient_dice"] == pytest.approx(expected, abs=1e-3)
    # the per-fold table: each fold's own test patients and scores
    assert [fold["model"] for fold in pooled["folds"]] == folds
    for fold, model in zip(pooled["folds"], models):
        assert fold["patients"] == len(model["splits"]["test"])
        assert fold["patient_dice_mean"] == pytest.approx(model["test"]["patient_dice_mean"], abs=1e-3)
    assert evaluate_main(["--data-dir", str(data_dir), "--cv", *folds, "--largest-3d-component", "probability"]) == 0
    table = capsys.readouterr().out
    assert "largest 3D component by probability" in table and table.count("\n0     ") + table.count("\n1     ") == 2

    # recorded into a model folder: the file, and the card that now leads with it
    shipped = shutil.copytree(folds[0], tmp_path / "shipped")
    assert evaluate_main(["--data-dir", str(data_dir), "--cv", *folds, "--record", str(shipped), "--json"]) == 0
    recorded = json.loads((shipped / "cross_validation.json").read_text())
    assert recorded["patient_dice_mean"] == pytest.approx(pooled["patient_dice_mean"], abs=1e-9)
    assert [fold["model"] for fold in recorded["folds"]] == ["cv-0/model", "cv-1/model"]  # no machine paths
    assert recorded["folds"][1]["command"] == models[1]["command"]
    assert str(tmp_path) not in (shipped / "cross_validation.json").read_text()
    card = (shipped / "README.md").read_text()
    assert f"mean patient Dice **{pooled['patient_dice_mean']:.4f}**" in card
    assert "2-fold cross-validation of its recipe over" in card and "| cv-1/model |" in card
    assert "dataset_split: cross-validation" in card or "split: cross-validation" in card
    refused = run(["-m", "unet.evaluate", "--data-dir", str(data_dir), "--model", folds[0], "--record", str(shipped)])
    assert refused.returncode == 2 and "--record writes a cross-validation: it needs --cv" in refused.stderr

    twice = run(["-m", "unet.evaluate", "--data-dir", str(data_dir), "--cv", folds[0], folds[0]])
    assert twice.returncode == 2 and "which another fold tests too" in twice.stderr
    assert len(twice.stderr.strip().splitlines()) == 1
    refused = run(
        ["-m", "unet.evaluate", "--data-dir", str(data_dir), "--cv", folds[0], "--seed", "7"]
    )  # a split of one model means nothing to pooled folds
    assert refused.returncode == 2 and "--seed does not apply" in refused.stderr
    refused = run(
        ["-m", "unet.evaluate", "--data-dir", str(data_dir), "--cv", folds[0], "--split", "all"]
    )  # named with its default value: still refused
    assert refused.returncode == 2 and "--split does not apply" in refused.stderr


def test_a_fold_is_named_by_its_path_from_here_or_by_its_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as in the repository: models/cv80/fold0 is a path anyone can rerun
    assert run_name(str(tmp_path / "models" / "cv80" / "fold0")) == "models/cv80/fold0"
    assert run_name("models/cv80/fold0") == "models/cv80/fold0"
    elsewhere = tmp_path.parent / "runs" / "cv80-fold0" / "model"  # never the machine's path to it
    assert run_name(str(elsewhere)) == "cv80-fold0/model"


def test_predict_frame_keeps_the_frames_row_order(synthetic_dir):
    torch.manual_seed(0)
    segmenter = Segmenter(UNet(width=4, depth=1), Preprocessing(image_size=32), precision="fp32", batch_size=4)
    df = scan_dataset(synthetic_dir)
    shuffled = df[df["patient"].isin(sorted(df["patient"].unique())[:2])].sample(frac=1, random_state=0)
    probs, targets = predict_frame(segmenter, shuffled, progress=False)
    assert len(probs) == len(targets) == len(shuffled)
    for (_, row), prob, target in zip(shuffled.iterrows(), probs, targets):
        assert np.allclose(prob, segmenter.probabilities([read_image(row["image_path"])])[0], atol=1e-5)
        assert np.array_equal(target, read_mask(row["mask_path"]))


def tuning_segmenter(size: int = 64) -> Segmenter:
    return Segmenter(UNet(width=4, depth=1), Preprocessing(image_size=size))  # areas in pixels of these maps


@pytest.mark.parametrize("stray_is_tumor", [False, True])
def test_tuning_keeps_the_largest_3d_component_only_where_validation_gains(monkeypatch, stray_is_tumor):
    # One validation patient: a tumor through slices 1-3 and a 324-px blob on slice 5, beyond every
    # minimum area the per-slice tuning tries. As a false positive the blob makes the 3D step worth
    # keeping; as a second lesion the 3D step would delete tumor, so it stays off.
    from unet import tuning

    probs = [np.zeros((64, 64), np.float32) for _ in range(6)]
    for k in (1, 2, 3):
        probs[k][10:30, 10:30] = 1.0
    probs[5][40:58, 40:58] = 1.0
    targets = [p > 0.5 for p in probs]
    if not stray_is_tumor:
        targets[5] = np.zeros((64, 64), bool)
    val_df = pd.DataFrame({"patient": ["P"] * 6, "slice": [1, 2, 3, 4, 5, 6]})
    monkeypatch.setattr(tuning, "predict_frame", lambda segmenter, df, progress=True: (probs, targets))
    chosen = tuning.tune_postprocessing(tuning_segmenter(), val_df)
    # every threshold and area scores the same here: a tie goes to the first, simplest setting
    assert chosen == Postprocessing(threshold=0.3, min_component_area=0, largest_3d_component=not stray_is_tumor)


def test_tuning_measures_the_3d_component_by_probability_where_voxels_would_keep_a_false_blob(monkeypatch):
    # A tumor the network is sure of (0.99) on three slices of 121 px, 363 voxels, and on slice 5 a false 400-px
    # blob at 0.75: above every threshold and minimum area tried, with more voxels but less summed probability
    # (300 against 359). By voxels the 3D step keeps the blob and loses the tumor; by probability the reverse.
    from unet import tuning

    probs = [np.zeros((64, 64), np.float32) for _ in range(6)]
    targets = [np.zeros((64, 64), bool) for _ in range(6)]
    for k in (1, 2, 3):
        probs[k][10:21, 10:21] = 0.99
        targets[k][10:21, 10:21] = True
    probs[5][30:50, 30:50] = 0.75
    val_df = pd.DataFrame({"patient": ["P"] * 6, "slice": [1, 2, 3, 4, 5, 6]})
    monkeypatch.setattr(tuning, "predict_frame", lambda segmenter, df, progress=True: (probs, targets))
    chosen = tuning.tune_postprocessing(tuning_segmenter(), val_df)
    assert chosen.largest_3d_component is True and chosen.largest_3d_component_by == "probability"
    assert chosen.threshold == 0.3 and chosen.min_component_area == 0  # ties go to the first


@pytest.mark.parametrize("consider_tta", [False, True])
def test_tuning_finds_the_one_threshold_and_area_that_score_best(monkeypatch, consider_tta):
    # Slice 1: a tumor at 0.65 (its last column missed) inside a rim of 0.55 that is not tumor: only 0.6 keeps
    # the one and drops the other. Slice 2: a 100-px tumor that a minimum area of 128 would delete. Slice 3,
    # healthy: a 48-px blob at 0.9 that only a minimum area of 64 or more removes. So 0.6 and 64, and nothing
    # else, score best. With TTA considered, the flipped passes find the whole tumor and nothing more.
    from unet import tuning

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

    def fake_predict_frame(segmenter, df, progress=True):
        return (perfect if segmenter.postprocessing.tta_flips else probs), targets

    monkeypatch.setattr(tuning, "predict_frame", fake_predict_frame)
    segmenter = tuning_segmenter(size)
    chosen = tuning.tune_postprocessing(segmenter, val_df, consider_tta=consider_tta)
    expected = (
        Postprocessing(threshold=0.3, min_component_area=0, tta_flips=True)
        if consider_tta
        else Postprocessing(threshold=0.6, min_component_area=64)
    )
    assert chosen == expected
    assert segmenter.postprocessing == Postprocessing()  # tuning returns a value; the segmenter is as it was


@pytest.mark.parametrize("hole_is_tumor", [False, True])
def test_tuning_fills_holes_only_where_validation_gains(monkeypatch, hole_is_tumor):
    # A tumor on three slices whose centre the model is unsure of (probability 0.2, under every threshold
    # tried): filling it is right where the reference has tumor there, and wrong where it does not.
    from unet import tuning

    probs = [np.zeros((64, 64), np.float32) for _ in range(4)]
    for k in (1, 2, 3):
        probs[k][10:40, 10:40] = 0.9
        probs[k][20:30, 20:30] = 0.2
    targets = [p > 0.5 for p in probs]
    if hole_is_tumor:
        targets = [p > 0.1 for p in probs]
    val_df = pd.DataFrame({"patient": ["P"] * 4, "slice": [1, 2, 3, 4]})
    monkeypatch.setattr(tuning, "predict_frame", lambda segmenter, df, progress=True: (probs, targets))
    chosen = tuning.tune_postprocessing(tuning_segmenter(), val_df)
    assert chosen.fill_holes is hole_is_tumor and chosen.largest_3d_component is False


def test_epoch_indices_are_replayable_and_tumor_weighted():
    has_tumor = np.array([True] * 10 + [False] * 90)
    a = training.epoch_indices(has_tumor, 0.5, 4000, seed=3, epoch=7)
    assert a == training.epoch_indices(has_tumor, 0.5, 4000, seed=3, epoch=7)
    assert a != training.epoch_indices(has_tumor, 0.5, 4000, seed=3, epoch=8)
    assert 0.45 < has_tumor[a].mean() < 0.55
    assert 0.17 < has_tumor[training.epoch_indices(has_tumor, 0.2, 4000, seed=3, epoch=7)].mean() < 0.23


def test_recorded_command_and_data_name_hold_no_machine_paths(tmp_path):
    settings = tmp_path / "experiment.json"
    settings.write_text(json.dumps({"tumor_fraction": 0.3}))
    args = train.build_parser().parse_args(
        [
            "--data-dir",
            "/home/alice/lgg/kaggle_3m",
            "/home/alice/extra",
            "--out-dir",
            "/scratch/alice/run7",
            "--epochs",
            "5",
            "--config",
            str(settings),
            "--push",
            "--repo-id",
            "a/b",
        ]
    )
    config, named = train.config_from_args(args)
    assert config.data_dirs == ("/home/alice/lgg/kaggle_3m", "/home/alice/extra")
    assert named == {"data_dirs", "epochs", "tumor_fraction"}
    command = run_record.training_command(config)
    assert command == 'python train.py --epochs 5 --config config.json  # config.json: {"tumor_fraction": 0.3}'
    assert "alice" not in command
    assert run_record.dataset_name(config.data_dirs[0]) == "lgg/kaggle_3m"
    assert run_record.dataset_name("/home/alice/lgg_subset/") == "lgg_subset"


def test_lr_warms_up_then_decays():
    factors = [training.lr_factor(s, 10, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.01, abs=0.01)


@pytest.mark.real_data
@pytest.mark.slow
def test_real_run_resumes_after_kill_mid_epoch(real_data_dir, tmp_path):
    """A short run on 6 real patients, killed mid-epoch, resumes where it stopped and evaluates."""
    out = tmp_path / "run"
    args = [
        "train.py",
        "--data-dir",
        str(real_data_dir),
        "--patients",
        "6",
        "--image-size",
        "128",
        "--width",
        "8",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "40",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "5",
        "--out-dir",
        str(out),
        "--seed",
        "1",
    ]
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
    state = Checkpoint.load(checkpoint)
    assert state.epoch == 0 and state.step_in_epoch > 0, "the kill should land mid-epoch"
    killed_at = state.step_in_epoch

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
    final = Checkpoint.load(checkpoint)
    assert final.scheduler["last_epoch"] == 80  # every step of both epochs ran exactly once

    evaluated = run(
        [
            "-m",
            "unet.evaluate",
            "--data-dir",
            str(real_data_dir),
            "--model",
            str(out / "model"),
            "--patients",
            *json.loads((out / "model" / "metrics.json").read_text())["splits"]["test"],
            "--json",
        ]
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert last_json(evaluated.stdout)["slices"] > 0
    assert Segmenter.from_pretrained(out / "model").preprocessing.image_size == 128


def test_train_reports_bad_data_dir(tmp_path):
    result = run(["train.py", "--data-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "run")])
    assert result.returncode == 2
    assert "data folder not found" in result.stderr and "Traceback" not in result.stderr


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    result = run(["train.py", "--out-dir", str(tmp_path), "--resume"])
    assert result.returncode == 2 and "no checkpoint" in result.stderr


def test_a_run_resumed_on_another_machine_names_both():
    machines = [{"machine": "NVIDIA H200", "from_epoch": 1}, {"machine": "AMD EPYC, 2 cores", "from_epoch": 47}]
    assert run_record.machines_text(machines, 60) == "NVIDIA H200 (epochs 1-46), AMD EPYC, 2 cores (epochs 47-60)"
    assert run_record.machines_text(machines[:1], 60) == "NVIDIA H200"
    assert (
        run_record.machines_text(machines[1:], 60)
        == "an unrecorded machine (epochs 1-46), AMD EPYC, 2 cores (epochs 47-60)"
    )


def test_same_seed_same_run_with_any_number_of_workers(tmp_path):
    """Augmentation included: one seed trains the same weights with 0 or 2 DataLoader workers, another does not."""

    def weights(name: str, seed: int, workers: int) -> dict:
        config = TrainConfig(
            synthetic=True,
            epochs=1,
            steps_per_epoch=4,
            batch_size=4,
            image_size=64,
            width=8,
            seed=seed,
            workers=workers,
        )
        trainer = Trainer(config, tmp_path / name)
        trainer.fit()
        return trainer.network.state_dict()

    first, again, other = weights("a", 1, 0), weights("b", 1, 2), weights("c", 2, 0)
    assert same_tensors(first, again)
    assert not same_tensors(first, other)


class Stop(Exception):
    """Stands for a kill: raised from inside the loop, nothing after it runs."""


def stop_at_step(monkeypatch, step: int) -> None:
    """Make the ``step``-th training step of this process (counted over epochs) raise Stop."""
    real_step, calls = training.train_step, []

    def stopping_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise Stop
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", stopping_step)


def test_a_run_killed_mid_epoch_resumes_to_exactly_the_uninterrupted_run(tmp_path, monkeypatch):
    """The default recipe: a run stopped in epoch 2 after a checkpoint and resumed ends with the same weights,
    optimiser state, history and final model as the run that never stopped."""

    def args(name: str) -> list[str]:
        return quick(
            tmp_path / name, "--epochs", "3", "--steps-per-epoch", "4", "--width", "8", "--checkpoint-every", "2"
        )

    assert train.main(args("whole")) == 0
    stop_at_step(monkeypatch, 7)  # epoch 2, step 3: after its checkpoint at step 2
    with pytest.raises(Stop):
        train.main(args("stopped"))
    monkeypatch.undo()
    stopped = Checkpoint.load(tmp_path / "stopped" / "last.pt")
    assert (stopped.epoch, stopped.step_in_epoch) == (1, 2)
    assert train.main(args("stopped") + ["--resume"]) == 0

    whole, resumed = (Checkpoint.load(tmp_path / name / "last.pt") for name in ("whole", "stopped"))
    assert same_tensors(resumed.model, whole.model)
    assert resumed.optimizer["state"].keys() == whole.optimizer["state"].keys()
    for key, state in whole.optimizer["state"].items():
        assert same_tensors(resumed.optimizer["state"][key], state)
    assert resumed.scheduler == whole.scheduler
    untimed = [{k: v for k, v in row.items() if k != "train_seconds"} for row in whole.history]
    assert [{k: v for k, v in row.items() if k != "train_seconds"} for row in resumed.history] == untimed
    assert (resumed.best_score, resumed.best_epoch, resumed.bad_epochs) == (
        whole.best_score,
        whole.best_epoch,
        whole.bad_epochs,
    )
    metrics = [json.loads((tmp_path / name / "model" / "metrics.json").read_text()) for name in ("whole", "stopped")]
    assert metrics[0]["test"] == metrics[1]["test"] and metrics[0]["val"] == metrics[1]["val"]


def scripted_validation(scores: list[float], weights_seen: list[dict]):
    """A stand-in for `unet.evaluation.evaluate` that gives these patient Dice scores in turn."""
    scripted = iter(scores)

    def validate(segmenter, frame, progress=True):
        weights_seen.append({k: v.detach().clone() for k, v in segmenter.network.state_dict().items()})
        dice = next(scripted)
        return {
            "patient_dice_mean": dice,
            "tumor_slice_dice_mean": dice,
            "slice_dice_mean": dice,
            "healthy_fp_rate": 0.0,
        }

    return validate


def test_the_best_validation_epoch_is_kept_and_patience_stops_the_run(tmp_path, monkeypatch):
    weights_seen = []  # the 0.9 would come after patience has run out
    monkeypatch.setattr(training, "evaluate", scripted_validation([0.5, 0.8, 0.6, 0.6, 0.9], weights_seen))
    out = tmp_path / "run"
    assert train.main(quick(out, "--epochs", "5", "--patience", "2")) == 0
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["epochs_trained"] == 4
    assert pd.read_csv(out / "history.csv")["val_patient_dice"].tolist() == [0.5, 0.8, 0.6, 0.6]
    shipped = Segmenter.from_pretrained(out / "model").network.state_dict()
    assert same_tensors(shipped, weights_seen[1])  # epoch 2's weights
    assert not same_tensors(shipped, weights_seen[3])


def test_a_resume_keeps_the_best_score_and_the_patience_count(tmp_path, monkeypatch):
    # Epochs 1-3 score 0.5, 0.8, 0.6: best 0.8 at epoch 2, one epoch of patience used. Resumed with patience 2,
    # epoch 4's 0.7 is the second epoch without a better score, so the run stops there with epoch 2's weights. A
    # resume that forgot the best score would keep 0.7; one that forgot the count would go on to 0.9.
    weights_seen = []
    monkeypatch.setattr(training, "evaluate", scripted_validation([0.5, 0.8, 0.6, 0.7, 0.9], weights_seen))
    out = tmp_path / "run"
    assert train.main(quick(out, "--epochs", "3", "--patience", "2")) == 0
    state = Checkpoint.load(out / "last.pt")
    assert (state.best_score, state.best_epoch, state.bad_epochs) == (0.8, 2, 1)
    assert train.main(["--out-dir", str(out), "--resume", "--epochs", "6"]) == 0
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["epochs_trained"] == 4
    assert pd.read_csv(out / "history.csv")["val_patient_dice"].tolist() == [0.5, 0.8, 0.6, 0.7]
    assert same_tensors(Segmenter.from_pretrained(out / "model").network.state_dict(), weights_seen[1])


@pytest.mark.parametrize(
    "args, message",
    [
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
        (["--val-fraction", "0"], "--val-fraction must lie between 0 and 1, not 0.0"),
        (["--test-fraction", "-0.1"], "--test-fraction must be from 0 to below 1 - --val-fraction, not -0.1"),
        (["--patients", "-1"], "--patients must be at least 3 (train, validation, test), not -1"),
        (["--folds", "5", "--fold", "5"], "--fold must be from 0 to 4, not 5"),
        (["--folds", "2", "--val-fraction", "0.5"], "--val-fraction must be below 1 - 1/--folds = 0.50, not 0.5"),
        (["--device", "gpu"], "--device gpu: not a device name"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_data_is_read(args, message, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.ERROR)
    assert train.main([*args, "--out-dir", str(out)]) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tumor_fraction": 2}, "tumor_fraction is a share of each batch, from 0 to 1, not 2"),
        ({"flair_only_p": 2.0}, "flair_only_p is a probability, from 0 to 1, not 2.0"),
        ({"weight_decay": -1}, "weight_decay must be a number from 0, not -1"),
        ({"warmup_epochs": float("nan")}, "warmup_epochs must be a number from 0, not nan"),
        ({"normalization": "image"}, "normalization must be slice or dataset, not image"),
        ({"fn_weight": 0.7}, "unknown setting 'fn_weight'"),  # a removed experiment's setting: said, not ignored
    ],
)
def test_config_file_settings_are_checked_like_flags(settings, message, tmp_path, caplog):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(settings))
    caplog.set_level(logging.ERROR)
    assert train.main(["--config", str(config), "--out-dir", str(tmp_path / "run")]) == 2
    assert message in caplog.text and not (tmp_path / "run").exists()
    with pytest.raises(TrainingError, match="must|is a|unknown"):
        TrainConfig.from_dict(settings)


def test_a_run_is_never_overwritten_and_a_broken_checkpoint_is_named(tmp_path, caplog):
    out = tmp_path / "run"
    base = quick(out)
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
    big = ["--synthetic", "--epochs", "1", "--batch-size", "1000", "--image-size", "64", "--width", "4"]
    assert train.main([*big, "--out-dir", str(tmp_path / "big")]) == 2  # an epoch would have no step
    assert "--batch-size 1000 is more than the" in caplog.text


class Planted:
    """A pickle that creates a folder when it is unpickled: what a hostile last.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_planted_pickle_in_last_pt_runs_nothing_and_is_refused_in_one_line(trained_run, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "planted"
    out.mkdir()
    record = torch.load(trained_run / "last.pt", weights_only=True)
    torch.save({**record, "history": Planted(marker)}, out / "last.pt")
    result = run(["train.py", "--out-dir", str(out), "--resume"])
    assert result.returncode == 2
    assert not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{out / 'last.pt'} is not a checkpoint of train.py" in lines[0], result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]  # nothing trained, nothing written
    torch.load(out / "last.pt", weights_only=False)  # the plant is real: a full unpickler runs it
    assert marker.is_dir()


def test_a_checkpoint_missing_a_key_is_refused_in_one_line(trained_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    record = torch.load(trained_run / "last.pt", weights_only=True)
    del record["bad_epochs"]  # e.g. edited by hand
    torch.save(record, out / "last.pt")
    result = run(["train.py", "--out-dir", str(out), "--resume"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{out / 'last.pt'} is not a checkpoint of train.py (it lacks 'bad_epochs')" in lines[0]


def test_a_non_finite_loss_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, caplog):
    real_forward, calls = BCEDiceLoss.forward, []

    def diverging(self, logits, target):
        calls.append(1)
        loss = real_forward(self, logits, target)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(BCEDiceLoss, "forward", diverging)
    out = tmp_path / "run"
    caplog.set_level(logging.ERROR)
    assert train.main(quick(out, "--epochs", "2", "--steps-per-epoch", "4", "--checkpoint-every", "2")) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "loss nan at epoch 2, step 3: the run stops" in errors[0]
    assert f"{out / 'last.pt'} holds the run after epoch 1 and 2 steps" in errors[0]
    state = Checkpoint.load(out / "last.pt")
    assert (state.epoch, state.step_in_epoch) == (1, 2)
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())
    assert not (out / "model").exists()
    monkeypatch.undo()
    assert train.main(["--out-dir", str(out), "--resume"]) == 0  # the run goes on from there


def test_a_save_of_the_best_epoch_cut_short_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    best = tmp_path / "best"
    first = Segmenter(UNet(width=4, depth=2), Preprocessing(image_size=64, normalization="dataset"))
    checkpoint.save_best(first, best)
    second = Segmenter(UNet(width=4, depth=2), Preprocessing(image_size=64))

    def killed_mid_write(self, folder, **_):  # dies after the weights, before the configs
        Path(folder).mkdir()
        (Path(folder) / "model.safetensors").write_bytes(b"torn")
        raise KeyboardInterrupt

    monkeypatch.setattr(Segmenter, "save_pretrained", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_best(second, best)
    monkeypatch.undo()
    kept = Segmenter.from_pretrained(best)
    assert kept.preprocessing == first.preprocessing
    assert same_tensors(kept.network.state_dict(), first.network.state_dict())
    checkpoint.save_best(second, best)  # the next epoch's save clears what the cut one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    kept = Segmenter.from_pretrained(best)
    assert kept.preprocessing == second.preprocessing
    assert same_tensors(kept.network.state_dict(), second.network.state_dict())


def test_a_checkpoint_save_cut_short_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"epoch": 1}, path)

    class CutShortFile(io.FileIO):  # Ctrl-C lands while torch is writing the weights
        def write(self, data):
            if self.tell() > 1000:
                raise KeyboardInterrupt
            return super().write(data)

    monkeypatch.setattr(checkpoint, "open", CutShortFile, raising=False)
    with pytest.raises(KeyboardInterrupt):  # not torch's "unexpected pos" error from closing the torn zip
        checkpoint.save_atomic({"epoch": 2, "weights": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_ctrl_c_stops_a_run_with_the_command_that_resumes_it(tmp_path):
    out = tmp_path / "run"
    args = [
        "train.py",
        "--synthetic",
        "--epochs",
        "200",
        "--steps-per-epoch",
        "5",
        "--batch-size",
        "2",
        "--image-size",
        "64",
        "--width",
        "4",
        "--checkpoint-every",
        "1",
        "--out-dir",
        str(out),
    ]
    # a shell that started pytest in the background passes SIGINT on as ignored: the run gets it as a terminal would
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while not (out / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()[-2000:]
    assert "interrupted: the same command with --resume goes on from OUT_DIR/last.pt" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert Checkpoint.load(out / "last.pt").epoch < 200
