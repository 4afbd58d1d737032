"""Settings shared by the training and run-directory tests."""

from cmc_kit.config import preset


def tiny_config(**overrides):
    """cpu-demo shrunk for tests: ResNet-18 (half the blocks to trace), 32 px crops, batch 4,
    2 epochs."""
    base = {
        "model.trunk": "resnet18",
        "data.crop_size": 32, "data.batch_size": 4, "data.validation_fraction": 0.2,
        "model.width": 0.125, "model.embedding_dim": 16, "model.views": "terrain,height,segmentation",
        "train.epochs": 2, "train.queue_multiplier": 2, "train.eval_subset": 8,
        "train.pairs": "full",
    }
    base.update(overrides)
    return preset("cpu-demo").with_overrides(base)
