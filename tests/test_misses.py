"""unet.misses: the profile of the patients a model misses."""

import json

import numpy as np
import pandas as pd
import pytest

from unet import misses


def test_components_rank_by_voxels_and_carry_their_overlap_and_probability():
    masks = np.zeros((3, 10, 10), bool)
    probs = np.zeros((3, 10, 10), np.float32)
    masks[0:2, 0:3, 0:3] = True  # 18 voxels at 0.9
    probs[0:2, 0:3, 0:3] = 0.9
    masks[2, 6:10, 6:10] = True  # 16 voxels at 0.5, 4 of them on the reference
    probs[2, 6:10, 6:10] = 0.5
    reference = np.zeros_like(masks)
    reference[2, 6:8, 6:8] = True
    assert misses.components(masks, probs, reference) == [(18, 0, pytest.approx(16.2)), (16, 4, 8.0)]
    assert misses.components(np.zeros_like(masks), probs, reference) == []


def test_flair_contrast_is_the_tumors_mean_over_the_rest_of_the_brain():
    images = np.zeros((1, 8, 8, 3), np.uint8)
    images[0, :, :4, 1] = 50  # brain
    images[0, 0:2, 0:2, 1] = 150  # the tumor, three times brighter
    reference = np.zeros((1, 8, 8), bool)
    reference[0, 0:2, 0:2] = True
    assert misses.flair_contrast(images, reference) == pytest.approx(3.0)
    assert np.isnan(misses.flair_contrast(images, np.zeros_like(reference)))


def test_the_report_scores_each_test_patient_as_evaluation_does(trained_run, capsys):
    model = trained_run / "model"
    recorded = json.loads((model / "metrics.json").read_text())["test"]["per_patient_dice"]
    args = ["--data-dir", str(trained_run / "synthetic"), "--model", str(model), "--split", "test", "--below", "1.01"]
    assert misses.main(args) == 0
    out = capsys.readouterr().out
    cells = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    rows = {row[0].strip("| "): row for row in cells[1:]}  # under the header
    assert rows.keys() == recorded.keys()
    for patient, row in rows.items():  # Dice with the 3D step, as train.py recorded it
        assert float(row[1].split(" / ")[0]) == pytest.approx(recorded[patient], abs=1e-3)
    assert f"{len(recorded)} of {len(recorded)} patients under Dice 1.01" in out


def test_a_model_folder_that_is_not_one_is_a_one_line_error(tmp_path, trained_run, capsys):
    assert misses.main(["--data-dir", str(trained_run / "synthetic"), "--model", str(tmp_path)]) == 2


def test_rank_correlations_follow_the_ranks_and_skip_patients_without_tumor():
    table = pd.DataFrame(
        {
            "dice": [0.1, 0.5, 0.9, 0.7],
            "flair_contrast": [1.1, 1.3, 2.0, float("nan")],  # the last has no tumor: no contrast
            "reference_px": [900, 500, 100, 0],
        }
    )
    rho = misses.rank_correlations(table)
    assert rho["flair_contrast"] == pytest.approx(1.0)
    assert rho["reference_px"] == pytest.approx(-1.0)
    assert rho["patients"] == 3
