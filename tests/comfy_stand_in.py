"""A stand-in for a ComfyUI model object: what `comfy.lora.model_lora_keys_unet` reads (the class, for its key
rules; `state_dict()`; `model_config.unet_config`) without building the network. Used by the integration tests that
take ComfyUI's own key maps as the ground truth."""
from types import SimpleNamespace

import torch


def stand_in_model(base_cls, weights: dict, config: dict):
    """An instance of ComfyUI's model class `base_cls` whose state dict is `weights` and whose unet_config is
    `config` (its __init__ is skipped)."""
    class StandIn(base_cls):
        def __init__(self):
            torch.nn.Module.__init__(self)

        def state_dict(self, *a, **k):
            return dict(weights)
    m = StandIn()
    m.model_config = SimpleNamespace(unet_config=config)
    return m
