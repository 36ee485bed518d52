"""Lightning's console output in a real training run: progress bars and the model summary stay, the noise goes."""

import logging

from src.train import main
from src.training.output import DropNoise, quiet_lightning


def test_a_training_run_prints_no_lightning_noise(demo_dir, tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)  # under pytest Lightning's log lines reach pytest's handler, not stderr
    main(["--approach", "classification", "--dataset-dirs", str(demo_dir), "--backbone", "tiny", "--no-pretrained",
          "--epochs", "1", "--image-size", "32", "--num-workers", "0", "--out-dir", str(tmp_path),
          "--cache-dir", str(tmp_path / "cache")])
    captured = capfd.readouterr()
    err = captured.err + caplog.text
    for noise in ("GPU available", "TPU available", "litlogger", "Total Flops", "FLOPs", "v_num",
                  "Trainer already configured"):
        assert noise not in err, noise
    for kept in ("Trainable params", "| Name", "Epoch 0: 100%", "val/km_mean="):
        assert kept in err, kept
    assert captured.out.splitlines()[-1].startswith("checkpoint: ")


def test_the_noise_filter_is_installed_once_and_keeps_other_lines():
    quiet_lightning()
    quiet_lightning()
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert sum(isinstance(f, DropNoise) for f in logger.filters) == 1
    record = lambda message: logging.LogRecord("x", logging.INFO, "", 0, message, None, None)  # noqa: E731
    assert not DropNoise().filter(record("GPU available: False, used: False"))
    assert DropNoise().filter(record("Restoring states from the checkpoint path at x.ckpt"))
