"""A random-weight SD 1.5 checkpoint, built at test time from ComfyUI's own model classes.

`make_sd15_checkpoint(path)` instantiates ComfyUI's SD 1.5 UNet (via `comfy.supported_models.SD15`),
its CLIP-L text encoder (`comfy.sd1_clip.SD1ClipModel`) and its KL VAE (`comfy.ldm.models.autoencoder.AutoencoderKL`)
on the CPU, fills every tensor with small random values (so sampling and decoding give finite images), and saves
them with ComfyUI's own "for saving" key mapping (model.diffusion_model.*, cond_stage_model.transformer.*,
first_stage_model.*), fp16. The architecture numbers come from ComfyUI's bundled `models/configs/v1-inference.yaml`;
nothing from ComfyUI is copied here, it is imported when this runs (so it needs ComfyUI's Python and COMFYUI_DIR).

`cached_sd15_checkpoint()` returns a cached copy (LENS_TINY_CKPT_CACHE or the temp dir), building it once in a
subprocess with ComfyUI's Python so the ~1.7 GB of tensors never stay in the test process. Never commit the file.

Run by hand: COMFYUI_DIR=/work/comfyui /work/comfyui-venv/bin/python tests/integration/tiny_checkpoint.py OUT.safetensors
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time

VERSION = 1  # bump when the recipe changes (the cache file name carries it)
SEED = 1234
# Sizes of SD 1.5 in the original format: key counts per part (a real v1-5 checkpoint has these, not counting
# the scheduler buffers such as alphas_cumprod that ComfyUI does not need).
EXPECTED_KEYS = {"model.diffusion_model.": 686, "cond_stage_model.": 196, "first_stage_model.": 248}
EXPECTED_PARAMS = {"model.diffusion_model.": 859_520_964, "cond_stage_model.": 123_060_480,
                   "first_stage_model.": 83_653_863}


def _comfy(comfyui_dir: str | None = None):
    comfyui_dir = comfyui_dir or os.environ.get("COMFYUI_DIR")
    if not comfyui_dir:
        raise RuntimeError("COMFYUI_DIR is not set: the tiny checkpoint is built from ComfyUI's own model classes")
    if comfyui_dir not in sys.path:
        sys.path.insert(0, comfyui_dir)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management  # noqa: F401  (device selection reads args.cpu)
    return comfyui_dir


def _unet_config(params: dict, dtype) -> dict:
    """The LDM yaml's UNet params in the form ComfyUI's UNetModel takes (per-block transformer depths instead
    of attention_resolutions)."""
    p = dict(params)
    att = set(p.pop("attention_resolutions"))
    depth = p.pop("transformer_depth")
    mult = p["channel_mult"]
    nrb = p["num_res_blocks"]
    down = []
    for level in range(len(mult)):
        down += [depth if 2 ** level in att else 0] * nrb
    up = []  # UNetModel pops these from the end while building the output blocks (deepest level first)
    for level in range(len(mult)):
        up += [depth if 2 ** level in att else 0] * (nrb + 1)
    p.update(num_res_blocks=[nrb] * len(mult), transformer_depth=down, transformer_depth_output=up,
             transformer_depth_middle=depth, use_checkpoint=False, dtype=dtype, adm_in_channels=None,
             use_linear_in_transformer=False, use_temporal_attention=False, use_temporal_resblock=False,
             num_head_channels=-1)
    return p


def _fill(sd: dict, seed: int) -> dict:
    """Small random values: weights ~ N(0, 0.5/sqrt(fan_in)), norm scales ~ 1, biases ~ N(0, 0.01)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(sd):
        t = sd[k]
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        shape = tuple(t.shape)
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:]) if "embedding" not in k else shape[-1]
            v = torch.randn(shape, generator=g) * (0.5 / math.sqrt(fan_in))
        elif k.endswith(".weight") and "norm" in k.lower():
            v = 1.0 + 0.02 * torch.randn(shape, generator=g)
        else:
            v = 0.01 * torch.randn(shape, generator=g)
        out[k] = v.to(torch.float16)
    return out


def checkpoint_state_dict(seed: int = SEED, comfyui_dir: str | None = None) -> dict:
    """{key: fp16 tensor} of a random SD 1.5 checkpoint, in ComfyUI's saving layout."""
    comfyui_dir = _comfy(comfyui_dir)
    import torch
    import yaml
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with open(os.path.join(comfyui_dir, "models", "configs", "v1-inference.yaml")) as f:
        ldm = yaml.safe_load(f)["model"]["params"]
    unet_config = _unet_config(ldm["unet_config"]["params"], torch.float16)
    if not comfy.supported_models.SD15.matches(unet_config):
        raise RuntimeError("ComfyUI's SD15 model config does not match the v1-inference.yaml UNet")
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(torch.float16, None)

    sd = {}
    unet = model_config.get_model({}, device="cpu").diffusion_model
    sd.update(model_config.process_unet_state_dict_for_saving(_fill(unet.state_dict(), seed)))
    del unet
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float16)
    sd.update(model_config.process_clip_state_dict_for_saving(_fill(clip.state_dict(), seed + 1)))
    del clip
    fs = ldm["first_stage_config"]["params"]
    vae = AutoencoderKL(ddconfig=fs["ddconfig"], embed_dim=fs["embed_dim"])
    sd.update(model_config.process_vae_state_dict_for_saving(_fill(vae.state_dict(), seed + 2)))
    del vae

    for prefix, n in EXPECTED_KEYS.items():
        got = sum(k.startswith(prefix) for k in sd)
        if got != n:
            raise RuntimeError(f"tiny checkpoint has {got} keys under {prefix}, a real SD 1.5 checkpoint has {n}")
        params = sum(v.numel() for k, v in sd.items() if k.startswith(prefix))
        if params != EXPECTED_PARAMS[prefix]:
            raise RuntimeError(f"tiny checkpoint has {params} parameters under {prefix}, "
                               f"a real SD 1.5 checkpoint has {EXPECTED_PARAMS[prefix]}")
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if type(detected) is not comfy.supported_models.SD15:
        raise RuntimeError(f"ComfyUI detects the tiny checkpoint as {type(detected).__name__}, not SD15")
    return sd


def make_sd15_checkpoint(path: str, seed: int = SEED, comfyui_dir: str | None = None) -> str:
    """Write a random-weight SD 1.5 checkpoint (.safetensors, fp16) that CheckpointLoaderSimple loads as SD1.5."""
    from safetensors.torch import save_file
    sd = checkpoint_state_dict(seed, comfyui_dir)
    tmp = f"{path}.{os.getpid()}.part"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp,
              metadata={"lora_lens.test_fixture": f"random SD1.5 v{VERSION} seed {seed}; not a real model"})
    os.replace(tmp, path)
    return path


def cached_sd15_checkpoint(python: str | None = None, timeout: float = 900) -> str:
    """Path of the cached tiny checkpoint, built once (in a subprocess with ComfyUI's Python) when missing."""
    cache = os.environ.get("LENS_TINY_CKPT_CACHE") or os.path.join(tempfile.gettempdir(), "lens-tiny-ckpt")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"tiny_sd15_v{VERSION}_s{SEED}.safetensors")
    if os.path.isfile(path):
        return path
    lock = path + ".lock"
    deadline = time.time() + timeout
    while True:  # one builder at a time (parallel test runs share the cache)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            break
        except FileExistsError:
            if os.path.isfile(path):
                return path
            if time.time() - os.path.getmtime(lock) > timeout:  # stale lock of a killed run
                os.unlink(lock)
                continue
            if time.time() > deadline:
                raise RuntimeError(f"waited {timeout:.0f} s for another run to build {path}")
            time.sleep(2)
    try:
        if not os.path.isfile(path):
            subprocess.run([python or os.environ.get("COMFYUI_PYTHON", sys.executable), os.path.abspath(__file__), path],
                           check=True, timeout=timeout)
    finally:
        os.unlink(lock)
    return path


if __name__ == "__main__":
    t0 = time.time()
    make_sd15_checkpoint(sys.argv[1])
    print(f"wrote {sys.argv[1]} ({os.path.getsize(sys.argv[1]) / 2**30:.2f} GiB) in {time.time() - t0:.1f} s")
