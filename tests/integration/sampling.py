"""A tiny SD 1.5 sampling graph for comparing what LoRA nodes do to an image, and reading its saved image."""
import os


def sample_prompt(ckpt: str, lora_nodes: dict, model_ref, clip_ref, seed: int = 11, prefix: str = "qimg/x") -> dict:
    """Checkpoint → two prompts → 64×64, 2-step KSampler → SaveImage (node "7"); `lora_nodes` are added and
    `model_ref`/`clip_ref` say which node's MODEL/CLIP the sampler and prompts use."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": clip_ref}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip_ref}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model_ref, "positive": ["2", 0], "negative": ["3", 0],
                                                  "latent_image": ["4", 0], "seed": seed, "steps": 2, "cfg": 5.0,
                                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    p.update(lora_nodes)
    return p


def saved_image(server, entry):
    """The image node "7" saved, as int32 pixels."""
    import numpy as np
    from PIL import Image
    img = entry["outputs"]["7"]["images"][0]
    return np.asarray(Image.open(os.path.join(server.output, img["subfolder"], img["filename"]))).astype("int32")
