"""One model through RecBole on a RecBole dataset folder, its defaults, fixed epochs; prints one JSON line.

Run with the interpreter of a venv where RecBole is installed (see ``retrieval_zoo.py``):

    /path/to/venv/bin/python benchmarks/recbole_reference.py BPR --epochs 20 --data ../shared/data/ml-100k

RecBole's defaults for general recommendation apply (random 8:1:1 split per user, full ranking,
seed 2020, Adam 1e-3, batches of 2,048, one uniform negative); epochs are fixed and early stopping
is off, and validation runs once, at the last epoch. Training CPU seconds count the model's
construction (ItemKNN computes its similarities there, LightGCN its graph) and the training epochs,
not validation. RecBole
replaces ``data_path`` with its bundled copy when the dataset is named ``ml-100k``; the files are
linked under another name in a temporary folder so the given ones are read.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole pickles its Config

from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer, init_seed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    one_epoch = args.model in ("Pop", "ItemKNN")
    args.data = args.data.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # RecBole writes its logs under the working folder
        name = "leanrec-ref"
        folder = Path(tmp) / name
        folder.mkdir()
        for f in args.data.iterdir():
            (folder / f.name.replace(args.data.name, name)).symlink_to(f.resolve())
        config = Config(
            model=args.model,
            dataset=name,
            config_dict={
                "data_path": tmp,
                "checkpoint_dir": str(Path(tmp) / "saved"),
                "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
                "epochs": 1 if one_epoch else args.epochs,
                "eval_step": 1 if one_epoch else args.epochs,
                "stopping_step": 10**6,
                "use_gpu": False,
                "show_progress": False,
                "seed": 2020,
                "metrics": ["Recall", "MRR", "NDCG", "Hit", "Precision"],
                "topk": [10],
                "state": "ERROR",
            },
        )
        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        train, valid, test = data_preparation(config, dataset)
        init_seed(config["seed"], config["reproducibility"])
        c, w = time.process_time(), time.perf_counter()
        model = get_model(config["model"])(config, train._dataset).to(config["device"])
        spent = {"cpu": time.process_time() - c, "wall": time.perf_counter() - w}
        base = get_trainer(config["MODEL_TYPE"], config["model"])

        class Timed(base):  # type: ignore[misc, valid-type]
            def _train_epoch(self, *a, **k):
                c, w = time.process_time(), time.perf_counter()
                out = super()._train_epoch(*a, **k)
                spent["cpu"] += time.process_time() - c
                spent["wall"] += time.perf_counter() - w
                return out

        trainer = Timed(config, model)
        trainer.fit(train, valid, saved=True, show_progress=False)
        result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    print(
        json.dumps(
            {
                "model": args.model,
                "test": {k.split("@")[0]: float(v) for k, v in result.items()},
                "train_cpu_s": spent["cpu"],
                "train_wall_s": spent["wall"],
            }
        )
    )


if __name__ == "__main__":
    main()
