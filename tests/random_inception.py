"""A random-weights InceptionV3 file in the exact format torch-fidelity loads (none ships here; nothing is
downloaded): the network of `torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3`,
seeded random weights, saved as its weight converter (`utils/util_convert_inception_weights.py`) saves the
TF FID weights: a plain dict of float32 tensors, conv `weight`, batch-norm `weight`/`bias`/`running_mean`/
`running_var` (no `num_batches_tracked`), `fc.weight` (1008, 2048), `fc.bias`, under the file name
`pt_inception-2015-12-05-6726825d.pth`.

The weights keep activations of order 1 through the 94 layers (He-scaled convs, batch norm statistics near
1), so that features differ between images and the metrics are not degenerate.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch

from eval.features import INCEPTION_WEIGHTS_FILE


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of torch-fidelity's InceptionV3 with seeded random weights (keys as the real file)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # Build the network without a weights file: its constructor always loads one.
    with mock.patch("torch.load", return_value=None), mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        net = FeatureExtractorInceptionV3("random", ["2048"], feature_extractor_weights_path="unused")
    gen = torch.Generator().manual_seed(seed)

    def draw(shape: torch.Size, scale: float = 1.0, low: float | None = None) -> torch.Tensor:
        if low is not None:  # uniform in [low, low + 1)
            return low + torch.rand(shape, generator=gen)
        return scale * torch.randn(shape, generator=gen)

    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("conv.weight"):
            tensor = draw(value.shape, (2.0 / value[0].numel()) ** 0.5)
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            tensor = draw(value.shape, low=0.5)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            tensor = draw(value.shape, 0.1)
        elif key == "fc.weight":
            tensor = draw(value.shape, value.shape[1] ** -0.5)
        elif key == "fc.bias":
            tensor = draw(value.shape)
        else:
            raise KeyError(f"unexpected InceptionV3 parameter {key}")
        state[key] = tensor.to(torch.float32).contiguous()
    return state


def write_random_inception_weights(directory: Path, seed: int = 0) -> Path:
    """`directory`/pt_inception-2015-12-05-6726825d.pth with `random_inception_state(seed)`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / INCEPTION_WEIGHTS_FILE
    torch.save(random_inception_state(seed), path)
    return path
