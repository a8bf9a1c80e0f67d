"""The fold models kept in models/cv80: each is the fold its name says of the 80-patient split, trained with the
default recipe, so that `unet.evaluate --cv models/cv80/fold*` pools the cross-validation the README reports."""

import json
import re
import shlex
from pathlib import Path

import pytest

import train
from unet.config import TrainConfig
from unet.data import scan_dataset, split_patients
from unet.evaluate import main as evaluate_main
from unet.evaluation import recorded_metrics

ROOT = Path(__file__).resolve().parents[1]
CV_DIR = ROOT / "models" / "cv80"
FOLD_DIRS = sorted(CV_DIR.glob("fold*"))
FOLDS = 5
DEFAULT_RECIPE = TrainConfig()

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not FOLD_DIRS, reason="no fold model kept in models/cv80"),
]


@pytest.fixture(scope="module")
def eighty_patients(eighty_patient_dirs):
    return scan_dataset(eighty_patient_dirs, check_images=False)


def fold_number(fold_dir: Path) -> int:
    return int(fold_dir.name.removeprefix("fold"))


def test_kept_folds_are_named_fold0_to_fold4_and_hold_only_a_model():
    assert {fold_dir.name for fold_dir in FOLD_DIRS} <= {f"fold{k}" for k in range(FOLDS)}
    for fold_dir in FOLD_DIRS:
        assert (fold_dir / "model.safetensors").stat().st_size < 8_000_000
        assert not (fold_dir / "examples").exists()  # the data's slices ship once, with the shipped model


def recorded_options(metrics: dict) -> dict:
    """The train.py options of the command a fold recorded, as train.py parses them (None: not given)."""
    command = metrics["command"]
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"], command
    return vars(train.build_parser().parse_args(words[2:]))


def test_each_kept_fold_is_its_fold_of_the_eighty_patients(eighty_patients):
    assert eighty_patients["patient"].nunique() == 80
    tested = set()
    for fold_dir in FOLD_DIRS:
        k = fold_number(fold_dir)
        metrics = recorded_metrics(fold_dir)
        assert metrics["splits"] == split_patients(eighty_patients, folds=FOLDS, fold=k), fold_dir
        assert metrics["data"] == "lgg_subset + lgg_extra"
        options = recorded_options(metrics)
        assert (options["folds"], options["fold"] or 0) == (FOLDS, k)
        assert not tested & set(metrics["splits"]["test"])
        tested |= set(metrics["splits"]["test"])


def test_each_kept_fold_was_trained_with_the_default_recipe():
    run_options = {"folds", "fold", "data_dirs", "out_dir", "resume", "workers", "device", "checkpoint_every"}
    for fold_dir in FOLD_DIRS:
        metrics = recorded_metrics(fold_dir)
        given = {name for name, value in recorded_options(metrics).items() if value not in (None, False)}
        assert given - run_options == set(), fold_dir  # out_dir has a default: it is a run option
        architecture = json.loads((fold_dir / "config.json").read_text())
        assert (architecture["width"], architecture["depth"]) == (DEFAULT_RECIPE.width, DEFAULT_RECIPE.depth)
        assert metrics["epochs_trained"] <= DEFAULT_RECIPE.epochs


def stated(value: float, text: str) -> bool:
    """Whether the text gives the value to three decimals, allowing one in the last digit: bf16 rounds a little
    differently on CPUs with AMX tiles and on those with AVX512-BF16 only."""
    return any(abs(float(number) - value) <= 0.0011 for number in re.findall(r"\b\d\.\d{3}\b", text))


@pytest.mark.slow
def test_the_readme_reports_the_pooled_cross_validation_of_the_kept_folds(eighty_patient_dirs, capsys):
    assert [fold_number(fold_dir) for fold_dir in FOLD_DIRS] == list(range(FOLDS))
    assert evaluate_main(["--data-dir", *map(str, eighty_patient_dirs), "--cv", *map(str, FOLD_DIRS), "--json"]) == 0
    pooled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert pooled["patients"] == 80
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Results") : readme.index("**The shipped model**")]
    keys = ("patient_dice_mean", "patient_dice_median", "patient_dice_min", "tumor_slice_dice_mean", "healthy_fp_rate")
    for scores in (pooled, pooled["per_slice"]):  # with each fold's 3D step, and slice by slice
        for key in keys:
            assert stated(scores[key], section), key
        assert all(stated(bound, section) for bound in scores["patient_dice_ci95"])
    for fold in pooled["folds"]:
        assert stated(fold["patient_dice_mean"], section) and stated(fold["patient_dice_mean_per_slice"], section)
