"""Random-weight stand-ins for the evaluation networks, saved the way the real ones ship.

- ``save_random_inception``: torch-fidelity's ``FeatureExtractorInceptionV3`` (the FID/IS
  InceptionV3, real architecture) with random weights, written as a state dict like
  ``pt_inception-2015-12-05-6726825d.pth``, so tests load it through ``--inception-weights``.
  The convolutions get He-normal weights and the batch norms unit statistics so activations
  keep their scale through the 90-odd layers (default init shrinks them towards zero,
  which would make every feature vector almost the same).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch


def save_random_inception(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved at ``path`` as a state dict."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    torch.manual_seed(seed)
    # The constructor always loads weights (downloads them when given no path): skip that, keep its init.
    with mock.patch.object(tf_inception.torch, "load", return_value={}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
            torch.nn.init.normal_(module.bias, std=0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
