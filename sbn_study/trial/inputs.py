"""What data a study or a final training ran on, as MLflow records a run's dataset inputs: one entry per split
(per domain for a multi-domain dataset) with its size, the digest of its content, and where it came from.

Plain JSON-ready dicts (`name`, `digest`, `source_type`, `source`, `profile`, `context`): the driver computes
them once from the dataset it loaded, and the record's writer queues them like any write
(`RunWriter.log_inputs`), saving them with the writes the store did not take.

The digest is of the decoded images and labels of the split (BLAKE2b), not of the files: the same for
whoever loads the same data, whatever the files' packing, and it covers the validation hold-out, which no
file holds. For generated data the source names the generator and its configuration (its seed), from
which the same images are drawn again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sbn_study.spec.config import DataConfig
from sbn_study.trial.data import ImageDataset, Split
from sbn_study.trial.domains import DomainDataset

# Generated datasets, each configured by the `DataConfig` field of its name.
GENERATED = ("synthetic", "synthetic_domains")


def dataset_inputs(dataset: ImageDataset | DomainDataset, data: DataConfig) -> list[dict[str, Any]]:
    """The dataset inputs of a run that trains on `dataset`, loaded by `data`."""
    if isinstance(dataset, DomainDataset):
        splits, num_classes = dict(dataset.domains), dataset.num_classes
    else:
        splits = {"train": dataset.train, "validation": dataset.val, "test": dataset.test}
        num_classes = dataset.num_classes
    source_type, source = _source(data)
    return [
        {
            "name": dataset.name,
            "digest": _digest(split),
            "source_type": source_type,
            "source": source,
            "profile": json.dumps(
                {
                    "num_rows": len(split),
                    "num_classes": num_classes,
                    "image_shape": list(split.images.shape[1:]),
                }
            ),
            "context": context,
        }
        for context, split in splits.items()
    ]


def _source(data: DataConfig) -> tuple[str, str]:
    if data.dataset in GENERATED:
        config = getattr(data, data.dataset).model_dump(mode="json")
        # MLflow's own type for data made by code.
        return "code", json.dumps({"generator": data.dataset, **config, "split_seed": data.split_seed})
    return "local", json.dumps({"root": str(Path(data.root).expanduser()), "split_seed": data.split_seed})


def _digest(split: Split) -> str:
    digest = hashlib.blake2b(digest_size=16)  # 32 hex digits: MLflow keeps 36
    digest.update(split.labels.contiguous().numpy())
    digest.update(split.images.contiguous().numpy())
    return digest.hexdigest()
