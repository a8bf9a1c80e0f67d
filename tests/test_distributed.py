"""train.py under torchrun: two gloo processes on the CPU train one model as one process does with the same global
batch, resume after a kill in the middle of an epoch, and stop together when one rank fails."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from unet.checkpoint import Checkpoint
from unet.config import TrainConfig, TrainingError
from unet.distributed import SINGLE, Distributed
from unet.segmenter import Segmenter
from unet.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RUN_FILES = {"last.pt", "best", "model", "history.csv", "curves.png"}

# The one-process and two-process runs differ in two ways, both expected of DDP without SyncBatchNorm (which
# torch runs on GPUs only): each process's batch norm normalises its own half of the global batch, and the Dice
# term of the loss pools each half-batch instead of the whole batch. Measured on this recipe: per-epoch loss
# within 0.003 (loss about 1.6) and validation patient Dice within 0.024. Loss is the tight check (a rank drawing
# the wrong share, or gradients not averaged, move it by far more); Dice is looser because this early in training
# (healthy-slice false positives still 1.0) it moves steeply with small weight differences: one more epoch of the
# same run gave 0.19 against 0.06.
LOSS_TOLERANCE = 0.02
DICE_TOLERANCE = 0.1


def recipe(real_data_dir: Path, out: Path, *extra: str) -> list[str]:
    """A short real-data run: 6 patients at 64 px, 2 epochs of 20 steps of a global batch of 8."""
    return [
        "train.py",
        "--data-dir",
        str(real_data_dir),
        "--patients",
        "6",
        "--image-size",
        "64",
        "--width",
        "8",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "20",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--checkpoint-every",
        "5",
        "--seed",
        "1",
        "--out-dir",
        str(out),
        *extra,
    ]


def finished(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    # one thread a process, as torchrun gives each rank: the runs do not fight over the cores
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def kill_at_first_checkpoint(command: list[str], checkpoint: Path) -> None:
    """Start ``command`` in its own process group and SIGTERM the whole group (torchrun and both ranks, as a
    cluster's scheduler does) as soon as ``checkpoint`` exists."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 180
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.fail(f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.real_data
def test_two_processes_train_like_one_and_resume_after_a_kill(real_data_dir, tmp_path):
    one = finished([sys.executable, *recipe(real_data_dir, tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]

    out = tmp_path / "two"
    kill_at_first_checkpoint([*TORCHRUN, *recipe(real_data_dir, out)], out / "last.pt")
    killed = Checkpoint.load(out / "last.pt")
    assert (killed.epoch, killed.step_in_epoch) == (0, 5), "the kill should land after the first mid-epoch save"
    assert not (out / "model").exists()

    resumed = finished([*TORCHRUN, *recipe(real_data_dir, out, "--resume")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr
    assert f"resuming {out / 'last.pt'} at epoch 1, step 5" in log
    assert "DDP: 2 processes, batch 4 per device, global batch 8, per-device batch norm" in log
    assert log.count("model written to") == 1 and "[rank 1]" not in log  # rank 1 says nothing when all is well
    # one model, written once: the run folder holds what a one-process run's does, no second copy, no leftovers
    assert {p.name for p in out.iterdir()} == {p.name for p in (tmp_path / "one").iterdir()} == RUN_FILES
    final = Checkpoint.load(out / "last.pt")
    assert final.scheduler["last_epoch"] == 40  # every step of both epochs ran exactly once
    assert final.machines[-1]["machine"].endswith(", 2 processes (DDP)")
    Segmenter.from_pretrained(out / "model")  # a plain model: no DDP or SyncBatchNorm traces in it

    single, ddp = (pd.read_csv(tmp_path / name / "history.csv") for name in ("one", "two"))
    assert ddp["epoch"].tolist() == single["epoch"].tolist() == [1, 2]
    assert ddp["lr"].tolist() == pytest.approx(single["lr"].tolist(), rel=1e-9)  # the same schedule
    loss_gap = (ddp["train_loss"] - single["train_loss"]).abs().max()
    dice_gap = (ddp["val_patient_dice"] - single["val_patient_dice"]).abs().max()
    assert loss_gap <= LOSS_TOLERANCE, (single, ddp)
    assert dice_gap <= DICE_TOLERANCE, (single, ddp)
    assert ddp["train_loss"].iloc[1] < ddp["train_loss"].iloc[0]  # it trains


FAILING_RANK = """
import os, runpy, sys
from unet import training

if os.environ["RANK"] == "1":  # rank 1 meets a file it cannot read at its first step; rank 0 is mid-step
    def unreadable(*args, **kwargs):
        raise training.TrainingError("planted failure of rank 1")
    training.train_step = unreadable
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank_with_its_one_line_error(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    logs = tmp_path / "logs"
    command = [
        *TORCHRUN,
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        str(script),
        "--synthetic",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "4",
        "--batch-size",
        "4",
        "--image-size",
        "64",
        "--width",
        "4",
        "--out-dir",
        str(tmp_path / "run"),
    ]
    result = finished(command, timeout=180)  # a hung rank 0 would run into this timeout
    assert result.returncode != 0
    errors = {path.parent.name: path.read_text() for path in logs.rglob("stderr.log")}
    assert set(errors) == {"0", "1"}, list(logs.rglob("*"))
    lines = errors["1"].strip().splitlines()
    assert lines == [lines[0]] and lines[0].endswith("[rank 1] error: planted failure of rank 1"), errors["1"]
    # torchrun's summary names the failing rank with that line; it stopped rank 0 rather than let it wait
    assert "[rank 1] error: planted failure of rank 1" in result.stderr
    assert "model written" not in errors["0"] and not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize(
    "processes, resumed, message",
    [
        (3, False, "--batch-size, the global batch, 4 does not divide among 3 processes"),
        (
            3,
            True,
            "the run's global --batch-size 4 does not divide among 3 processes: each takes an equal share; "
            "resume with a number of processes that divides it",
        ),
    ],
)
def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(processes, resumed, message, tmp_path):
    trainer = Trainer.__new__(Trainer)  # the check alone: no process group is needed to ask it
    trainer.distributed = Distributed(rank=0, local_rank=0, world_size=processes)
    with pytest.raises(TrainingError, match="^" + message.replace("(", r"\(")):
        trainer._check_processes(TrainConfig(batch_size=4, device="cpu"), resumed)
    trainer._check_processes(TrainConfig(batch_size=6, device="cpu"), resumed)  # 6 = 3 x 2: fine


def test_sync_batchnorm_on_the_cpu_is_refused_in_one_line():
    trainer = Trainer.__new__(Trainer)
    trainer.distributed = Distributed(rank=0, local_rank=0, world_size=2)
    with pytest.raises(TrainingError, match="^--sync-batchnorm needs CUDA"):
        trainer._check_processes(TrainConfig(batch_size=4, device="cpu", sync_batchnorm=True), resumed=False)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_rank_shares_of_each_global_batch_make_up_the_one_process_order(tmp_path, monkeypatch):
    """Without torchrun, a Trainer told it is rank r of 2 draws exactly the r-th half of every global batch."""
    config = TrainConfig(synthetic=True, epochs=1, steps_per_epoch=3, batch_size=4, image_size=64, width=4, seed=5)
    trainer, drawn = Trainer(config, tmp_path / "run"), {}
    for name, here in (("one", SINGLE), ("rank0", Distributed(0, 0, 2)), ("rank1", Distributed(1, 1, 2))):
        trainer.distributed, seen = here, []
        monkeypatch.setattr(
            "unet.training.train_step", lambda model, images, masks, *rest, seen=seen: seen.append(images) or 0.5
        )
        trainer.state.step_in_epoch = 0
        trainer._train_epoch()
        drawn[name] = seen
    for step in range(3):
        assert torch.equal(torch.cat([drawn["rank0"][step], drawn["rank1"][step]]), drawn["one"][step])
