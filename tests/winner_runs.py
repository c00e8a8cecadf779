"""A finished 'search' written by hand: one mobile_small winner trained on digits at 8x8, so the
export and compression tests need no Ray search (config.yaml, winners.json, winners/01/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from evaluators.optim import TrainConfig
from evaluators.train import train
from evaluators.variables import save_variables
from nas.config import config_from_dict
from search_spaces.catalog import load_space

KEY = "100-100--100--1"
TRAIN = {"epochs": 3, "batch_size": 64, "learning_rate": 0.005}


def trained_winner_run(tmp: Path, data, **sections: Any) -> Path:
    """RUN_DIR under `tmp` with winner 1 = KEY trained 3 epochs on `data`; `sections` are added to
    the experiment config (e.g. distill={...})."""
    cfg = config_from_dict({"name": "exp", "space": "mobile_small", "space_input": {"resolution": 8},
                            "dataset": "digits", "seed": 0, "output_dir": str(tmp), "top_k": 1,
                            "train": TRAIN, "objective": {"cost": None}, **sections}, source="test")
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    arch = load_space("mobile_small").with_input(resolution=8).decode(KEY)
    res = train(arch, data, TrainConfig.from_dict(TRAIN))
    ck = run / "winners" / "01"
    save_variables(ck / "variables.msgpack", res.variables)
    (ck / "architecture.json").write_text(arch.to_json())
    (run / "winners.json").write_text(json.dumps([{
        "rank": 1, "key": arch.key, "space": arch.space, "trial_id": "t0", "score": res.val_accuracy,
        "val_accuracy": res.val_accuracy, "params": 0, "macs": 0, "architecture": arch.to_dict(),
        "checkpoint": "winners/01"}]))
    return run
