"""Bottom-feature cache: the frozen bottom's output, computed once per image (and view).

The bottom runs in eval mode without autograd, so its output for an image is a fixed function of
the (possibly augmented) image. Caching it makes every epoch cost only the trained top. With
augmentation on, ``views`` augmented copies of each image are cached and epoch ``e`` trains on view
``e % views``; with augmentation off one view suffices and training matches the uncached run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from edgetl.train.prepare import TransferModel


@dataclass
class FeatureCache:
    """Bottom outputs: ``features[v, i]`` is view ``v`` of image ``i``."""

    features: Tensor  # views x N x C x H x W
    labels: Tensor  # N

    @property
    def views(self) -> int:
        return self.features.shape[0]

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def view(self, index: int) -> Dataset:
        """One view as a dataset of ``(features, label)``."""
        return TensorDataset(self.features[index], self.labels)


def cache_features(
    model: TransferModel, dataset: Dataset, *, views: int = 1, seed: int = 0, batch_size: int = 64, workers: int = 0
) -> FeatureCache:
    """Run ``model``'s frozen bottom over ``dataset`` ``views`` times and keep the outputs."""
    per_view, labels = [], None
    model.eval()
    with torch.random.fork_rng(devices=[]):  # augmentation draws from the global generator; the caller's state is kept
        for v in range(views):
            torch.manual_seed(seed * 7919 + v)  # each view's augmentation is reproducible
            loader = DataLoader(
                dataset, batch_size=batch_size, shuffle=False, num_workers=workers, generator=torch.Generator().manual_seed(seed * 7919 + v)
            )
            chunks, ys = [], []
            for x, y in loader:
                chunks.append(model.forward_bottom(x))
                ys.append(torch.as_tensor(y))
            per_view.append(torch.cat(chunks))
            labels = torch.cat(ys)
    return FeatureCache(torch.stack(per_view), labels)
