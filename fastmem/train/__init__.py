"""The lean memorization trainer (MemFT): `train(config, samples) -> TrainResult`.

Python API:
    from fastmem.train import TrainConfig, train
    result = train(TrainConfig(objective="ot", threshold=0.3, max_steps=200, out="runs/x"), samples)
    result.summary["exact_match"]
"""

from fastmem.train.config import TrainConfig, default_layers
from fastmem.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train", "default_layers"]
