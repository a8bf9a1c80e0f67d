import logging
import shutil

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from unet.data import (
    DatasetError,
    LGGDataset,
    example_slices,
    flair_only,
    scan_dataset,
    seed_augmentation,
    split_patients,
    train_transforms,
)
from unet.processing import LGG_MEAN, LGG_STD, Preprocessing, normalize
from unet.reader import ReadError, read_image, read_mask
from unet.synthetic import make_synthetic_dataset


def test_scan_generated_folder(synthetic_dir):
    df = scan_dataset(synthetic_dir)
    assert list(df.columns[:4]) == ["patient", "slice", "image_path", "mask_path"]
    assert df["patient"].nunique() == 8 and len(df) == 80
    # slices are numbered 1..n and sorted numerically, not as strings (10 after 9)
    first = df[df["patient"] == df["patient"].iloc[0]]
    assert first["slice"].tolist() == list(range(1, 11))
    # has_tumor agrees with the masks on disk
    for _, row in df.sample(10, random_state=0).iterrows():
        assert row["has_tumor"] == bool(read_mask(row["mask_path"]).any())
    healthy = df.groupby("patient")["has_tumor"].any()
    assert (~healthy).sum() == 1


def test_scan_accepts_the_parent_folder(synthetic_dir):
    assert len(scan_dataset(synthetic_dir.parent)) == len(scan_dataset(synthetic_dir))


@pytest.fixture
def small_copy(tmp_path):
    return make_synthetic_dataset(tmp_path, patients=2, slices=3, size=64)


def test_missing_mask_is_named(small_copy):
    victim = sorted(small_copy.glob("*/*_2_mask.tif"))[0]
    victim.unlink()
    with pytest.raises(DatasetError, match="missing mask.*_2.tif"):
        scan_dataset(small_copy)


def test_a_mask_without_its_image_and_a_slice_stored_twice_are_named(small_copy):
    image = sorted(small_copy.glob("*/*_2.tif"))[0]
    twin = image.with_name(image.name.replace("_2.tif", "_02.tif"))  # the same slice number, spelt another way
    twin.write_bytes(image.read_bytes())
    twin.with_name(twin.stem + "_mask.tif").write_bytes(image.with_name(image.stem + "_mask.tif").read_bytes())
    with pytest.raises(DatasetError, match=f"^two images of slice 2: .*{twin.name} and .*{image.name}$"):
        scan_dataset(small_copy)
    twin.unlink()
    with pytest.raises(DatasetError, match=f"^mask without its image: .*{twin.stem}_mask.tif$"):
        scan_dataset(small_copy)


def test_corrupt_image_is_named(small_copy):
    victim = sorted(small_copy.glob("*/*_1.tif"))[0]
    victim.write_bytes(b"II*\x00 this is not a tiff")
    # the one reader's error: a ValueError, one line, naming the file
    with pytest.raises(ReadError, match=f"{victim.name}: the image is corrupt or truncated"):
        scan_dataset(small_copy)


def test_truncated_tiff_is_one_line_and_opencv_stays_quiet(small_copy, capfd):
    victim = sorted(small_copy.glob("*/*_2.tif"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # the header survives, the image directory does not
    capfd.readouterr()
    # the one reader's error: a ValueError, one line, naming the file
    with pytest.raises(ReadError, match=f"{victim.name}: the image is corrupt or truncated"):
        scan_dataset(small_copy)
    out, err = capfd.readouterr()
    assert "TIFF" not in err + out and "ERROR" not in err + out  # OpenCV logs nothing of its own


def test_masks_stored_as_0_1_read_as_tumor(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    cv2.imwrite(str(tmp_path / "a_mask.tif"), mask)
    cv2.imwrite(str(tmp_path / "b_mask.tif"), mask * 255)
    cv2.imwrite(str(tmp_path / "c_mask.tif"), mask * 100)
    assert read_mask(tmp_path / "a_mask.tif").sum() == read_mask(tmp_path / "b_mask.tif").sum() == 16
    assert read_mask(tmp_path / "c_mask.tif").sum() == 16


def test_size_mismatch_is_named(small_copy):
    victim = sorted(small_copy.glob("*/*_3_mask.tif"))[0]
    cv2.imwrite(str(victim), np.zeros((32, 64), np.uint8))
    with pytest.raises(DatasetError, match="size mismatch.*_3.tif"):
        scan_dataset(small_copy)


def test_empty_and_absent_folders(tmp_path):
    with pytest.raises(DatasetError, match="no slices found"):
        scan_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        scan_dataset(tmp_path / "nope")


def test_errors_are_one_line(small_copy):
    sorted(small_copy.glob("*/*_1.tif"))[0].write_bytes(b"")
    with pytest.raises(ReadError) as info:
        scan_dataset(small_copy)
    assert "\n" not in str(info.value)


def test_read_image_gives_file_order_like_pillow(synthetic_dir):
    df = scan_dataset(synthetic_dir, check_images=False)
    path = df[df["has_tumor"]].iloc[0]["image_path"]
    assert np.array_equal(read_image(path), np.array(Image.open(path).convert("RGB")))
    # the generator puts the tumor's hyperintensity in FLAIR, the middle channel
    mask = read_mask(str(path).replace(".tif", "_mask.tif"))
    image = read_image(path).astype(float)
    assert image[mask > 0, 1].mean() > image[mask > 0, 0].mean() + 40


def test_split_is_by_patient_and_reproducible(synthetic_dir):
    df = scan_dataset(synthetic_dir)
    a = split_patients(df, 0.25, 0.25, seed=1)
    b = split_patients(df, 0.25, 0.25, seed=1)
    assert a == b
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(df["patient"])
    assert len(a["val"]) == 2 and len(a["test"]) == 2
    assert split_patients(df, 0.25, 0.25, seed=2) != a


def test_folds_test_every_patient_once(synthetic_dir):
    df = scan_dataset(synthetic_dir)
    splits = [split_patients(df, 0.25, seed=3, folds=4, fold=k) for k in range(4)]
    tested = [p for s in splits for p in s["test"]]
    assert sorted(tested) == sorted(df["patient"].unique())
    for s in splits:
        assert len(s["test"]) == 2 and len(s["val"]) == 2
        assert not set(s["train"]) & set(s["val"]) and not (set(s["train"]) | set(s["val"])) & set(s["test"])
    assert splits == [split_patients(df, 0.25, seed=3, folds=4, fold=k) for k in range(4)]
    for folds, fold in ((4, 4), (1, 0), (9, 0)):
        with pytest.raises(DatasetError, match="fold"):
            split_patients(df, folds=folds, fold=fold)


def test_split_stratifies_by_institution_and_says_when_it_cannot(caplog):
    patients = [f"TCGA_{site}_{n:04d}_19990101" for site in ("AA", "BB") for n in range(10)]
    df = pd.DataFrame({"patient": patients, "has_tumor": True})
    caplog.set_level(logging.INFO, logger="unet.data")
    for seed in range(5):
        test = split_patients(df, 0.2, 0.2, seed=seed)["test"]
        assert sorted(p.split("_")[1] for p in test) == ["AA", "AA", "BB", "BB"], test
    assert "stratified by tumor presence" not in caplog.text
    lone = pd.concat([df, pd.DataFrame({"patient": ["TCGA_CC_0001_19990101"], "has_tumor": [True]})])
    split_patients(lone, 0.2, 0.2, seed=0)
    assert "test patients split off stratified by tumor presence only: the finer strata have too few" in caplog.text
    with pytest.raises(
        DatasetError,
        match=r"^too few patients \(1\) to split off validation patients "
        r"\(val_fraction 0.15\): use a folder with more patients$",
    ):
        split_patients(df.head(2))


@pytest.mark.real_data
def test_real_folds_spread_each_institution(real_data_dir):
    df = scan_dataset(real_data_dir, check_images=False)
    for k in range(5):
        test = split_patients(df, folds=5, fold=k)["test"]
        per_institution = {i: sum(p.split("_")[1] == i for p in test) for i in ("CS", "DU", "FG", "HT")}
        assert len(test) == 12 and min(per_institution.values()) >= 1, per_institution


def test_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    image = np.zeros((256, 256, 3), np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    for _ in range(3):  # asymmetric blobs, so a flip of one but not the other would show
        y, x = rng.integers(40, 200, 2)
        cv2.ellipse(
            mask,
            (int(x), int(y)),
            (int(rng.integers(8, 30)), int(rng.integers(8, 20))),
            float(rng.uniform(0, 180)),
            0,
            360,
            1,
            -1,
        )
    image[mask > 0] = 200
    transform = train_transforms(256)
    for seed in range(20):
        seed_augmentation(transform, seed)  # 20 reproducible draws
        out = transform(image=image, mask=mask)
        bright = out["image"][..., 1] > 100
        moved = out["mask"] > 0
        intersection = (bright & moved).sum()
        assert intersection / max((bright | moved).sum(), 1) > 0.9


def test_dataset_items_are_normalised_tensors(synthetic_dir):
    df = scan_dataset(synthetic_dir).head(6)
    preprocessing = Preprocessing(image_size=128, normalization="dataset")
    dataset = LGGDataset(df, A.Compose([A.Resize(128, 128, interpolation=cv2.INTER_AREA)]), preprocessing)
    image, mask = dataset[3]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert mask.shape == (1, 128, 128) and set(mask.unique().tolist()) <= {0.0, 1.0}
    raw = cv2.resize(read_image(df["image_path"].iloc[3]), (128, 128), interpolation=cv2.INTER_LINEAR)
    expected = (raw[..., 1] / 255.0 - LGG_MEAN[1]) / LGG_STD[1]
    assert np.allclose(image[1].numpy(), expected, atol=1e-5)


def test_a_seeded_item_augments_the_same_whatever_came_before(synthetic_dir):
    df = scan_dataset(synthetic_dir).head(4)
    dataset = LGGDataset(df, train_transforms(64, 0.2), Preprocessing(image_size=64))
    first = dataset[(2, (7, 0, 5))]
    for row in (0, 1, 3):  # other items, seeded or not, draw from the pipeline in between
        dataset[row], dataset[(row, (7, 0, row))]
    again = dataset[(2, (7, 0, 5))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # other epochs get other augmentations (a draw that only flips brightness normalises back to the same)
    draws = {dataset[(2, (7, epoch, 5))][0].numpy().tobytes() for epoch in range(8)}
    assert len(draws) >= 5


@pytest.mark.real_data
def test_real_subset_scans_and_splits(real_data_dir):
    df = scan_dataset(real_data_dir)
    assert df["patient"].nunique() == 60 and len(df) == 2191 and int(df["has_tumor"].sum()) == 749
    splits = split_patients(df)
    assert sum(len(v) for v in splits.values()) == 60
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))
    assert not set(splits["val"]) & set(splits["test"])
    # every institution that has at least three patients reaches training
    institutions = {p.split("_")[1] for p in splits["train"]}
    assert {"CS", "DU", "HT"} <= institutions
    # file (RGB) order on real scans: what OpenCV decodes is flipped back to Pillow's order
    for path in df["image_path"].sample(5, random_state=0):
        with Image.open(path) as im:
            assert np.array_equal(read_image(path), np.array(im.convert("RGB")))


def test_slice_normalisation_ignores_background_and_scanner_gain():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = rng.integers(20, 120, (32, 32, 3))
    brighter = (image.astype(np.float64) * 2).astype(np.uint8)  # another scanner's gain
    a, b = normalize(image, LGG_MEAN, LGG_STD, "slice"), normalize(brighter, LGG_MEAN, LGG_STD, "slice")
    inside = a[:, 16:48, 16:48]
    assert torch.allclose(inside.mean((1, 2)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(inside.std((1, 2)), torch.ones(3), atol=1e-2)
    assert torch.allclose(a, b, atol=1e-4)
    # the dataset mode uses the fixed statistics instead
    assert torch.allclose(normalize(image, (0.0,) * 3, (1.0,) * 3, "dataset")[:, 0, 0], torch.zeros(3))


def test_slice_statistics_from_histograms_equal_those_of_the_float_pixels():
    rng = np.random.default_rng(1)
    dark = np.zeros((64, 64, 3), np.uint8)
    dark[0, :10, 1] = 200  # under 64 non-zero pixels: the whole slice counts
    brain = np.zeros((64, 64, 3), np.uint8)
    brain[8:56, 10:50] = rng.integers(0, 256, (48, 40, 3))
    brain[20:30, 20:30, 0] = 0  # a pixel is background only where every channel is 0
    for image in (brain, dark, rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)):
        x = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1) / 255
        foreground = x.amax(0) > 0
        pixels = x[:, foreground] if int(foreground.sum()) >= 64 else x.flatten(1)
        expected = (x - pixels.mean(1).view(-1, 1, 1)) / pixels.std(1).clamp_min(1e-3).view(-1, 1, 1)
        assert torch.allclose(normalize(image, LGG_MEAN, LGG_STD, "slice").double(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        normalize(brain.astype(np.float32), LGG_MEAN, LGG_STD, "slice")


def test_flair_only_augmentation_copies_flair_into_every_channel():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    always = train_transforms(64, flair_only_p=1.0)(image=image, mask=mask)["image"]
    assert (always[..., 0] == always[..., 1]).all() and (always[..., 2] == always[..., 1]).all()
    assert np.array_equal(flair_only(image)[..., 0], image[..., 1])
    never = [train_transforms(64, flair_only_p=0.0)(image=image, mask=mask)["image"] for _ in range(5)]
    assert not any((n[..., 0] == n[..., 1]).all() for n in never)


def transform_names(transform: A.Compose) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_examples_are_tumor_and_healthy_slices_of_different_patients(synthetic_dir):
    frame = scan_dataset(synthetic_dir, check_images=False)
    chosen = example_slices(frame)
    tumor, healthy = chosen[chosen["has_tumor"]], chosen[~chosen["has_tumor"]]
    assert len(tumor) == 3 and tumor["patient"].nunique() == 3
    assert len(healthy) == 2 and healthy["patient"].nunique() == 2
    assert chosen.equals(example_slices(frame.sample(frac=1, random_state=0)).loc[chosen.index])


def test_channel_stats_are_the_mean_and_std_of_every_pixel(synthetic_dir):
    from unet.data import channel_stats

    df = scan_dataset(synthetic_dir, check_images=False).head(12)
    pixels = np.stack([read_image(p) for p in df["image_path"]]).reshape(-1, 3) / 255.0
    mean, std = channel_stats(df)
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-4)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-4)


@pytest.fixture
def numbered_volumes(tmp_path) -> pd.DataFrame:
    """Two patients whose slices are filled with (patient, slice number) values, slice 3 of A missing, rows shuffled."""
    root = tmp_path / "kaggle_3m"
    for patient, numbers in (("TCGA_AA_0001_19990101", (1, 2, 4, 5)), ("TCGA_BB_0002_19990101", (1, 2, 3))):
        (root / patient).mkdir(parents=True)
        for n in numbers:
            green = 100 + 10 * n + (50 if patient.startswith("TCGA_BB") else 0)
            image = np.dstack([np.full((32, 32), v, np.uint8) for v in (10 * n, green, 7)])
            mask = np.zeros((32, 32), np.uint8)
            mask[4:12, 2:8] = 255  # off-centre, so a flip shows
            cv2.imwrite(str(root / patient / f"{patient}_{n}.tif"), image[..., ::-1])
            cv2.imwrite(str(root / patient / f"{patient}_{n}_mask.tif"), mask)
    return scan_dataset(root).sample(frac=1, random_state=0)


def test_items_are_the_seeded_augmentation_then_the_inference_preprocessing(numbered_volumes):
    """A training item is exactly what the seeded transform makes of the files, preprocessed as inference does."""
    preprocessing = Preprocessing(image_size=32)
    dataset = LGGDataset(numbered_volumes, train_transforms(32, 0.5), preprocessing)
    reference = train_transforms(32, 0.5)
    for row in range(4):
        image, mask = dataset[(row, (42, 1, row))]
        seed_augmentation(reference, (42, 1, row))
        paths = dataset.df.iloc[row]
        out = reference(image=read_image(paths["image_path"]), mask=read_mask(paths["mask_path"]).astype(np.uint8))
        assert torch.equal(image, preprocessing(out["image"]))
        assert torch.equal(image, normalize(out["image"], LGG_MEAN, LGG_STD, "slice"))
        assert torch.equal(mask, torch.from_numpy((out["mask"] > 0).astype(np.float32))[None])


def test_two_folders_are_read_as_one_set_and_a_patient_in_both_is_named(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", patients=2, slices=3, size=32, seed=0)
    second = make_synthetic_dataset(tmp_path / "b", patients=4, slices=2, size=32, seed=1)
    one, two, three, four = (
        f"SYN_{site}_{n}_20000101" for site, n in (("AA", 1000), ("BB", 1001), ("CC", 1002), ("DD", 1003))
    )
    for patient in (one, two):  # the generator names patients by position: the second folder keeps the others
        shutil.rmtree(second / patient)
    df = scan_dataset([first, tmp_path / "b"])  # a kaggle_3m folder, and a folder that holds one
    assert sorted(df["patient"].unique()) == [one, two, three, four] and len(df) == 2 * 3 + 2 * 2
    assert df.equals(df.sort_values(["patient", "slice"], ignore_index=True))
    assert df.loc[df["patient"] == three, "image_path"].str.startswith(str(second)).all()
    shutil.copytree(first / one, second / one)
    with pytest.raises(DatasetError) as info:
        scan_dataset([first, tmp_path / "b"])
    assert str(info.value) == f"patient {one} is in two data folders: {first} and {tmp_path / 'b'}"
