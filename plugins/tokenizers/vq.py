"""A diffusers ``VQModel`` (VQ-VAE / VQGAN) from a local folder as a tokenizer: codebook vectors as tokens.

``encode`` returns the quantised latent -- every latent pixel replaced by its nearest codebook vector, then
shifted and scaled like any latent -- so the core stays continuous: a ``CategoricalHead`` maps each token
back to its codebook index (cross-entropy over the codebook, MAR's Table 1 "CrossEnt" rows), and a
continuous head sees codebook vectors as ordinary tokens. With ``quantize: false`` the tokens are the
encoder's latent before quantisation, MAR's Table 2 "VQ-16, latent before quantisation + Diffusion Loss".

The folder is what ``VQModel.save_pretrained`` writes (config.json and weights), a repository with a
``vae/`` subfolder, or a ``sandbox train-tokenizer`` run directory trained with ``autoencoder.bottleneck: vq``
(its ``vae/``, with the measured latent scale as ``scaling_factor``). Nothing downloads. ``config`` instead
builds a VQModel with random weights from those arguments: for tests and wiring checks only.

References:
    van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017 (VQ-VAE: nearest-codebook
    quantisation); Esser et al., "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021 (VQGAN);
    MAR sec. 5.1, Tables 1-2 (VQ-16 tokens: the cross-entropy baseline, and its latent before quantisation with
    Diffusion Loss); diffusers ``VQModel`` and ``VectorQuantizer`` (the model and codebook used here).
"""
from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor

from sandbox.core.contracts import Tokenizer
from sandbox.errors import UserError
from sandbox.plugins.tokenizers.diffusers_vae import find_vae_folder, read_vae_config

ROWS_PER_CHUNK = 2**26  # nearest_code: at most this many (row, code) distances at once (256 MiB in float32)


def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """The index of the nearest codebook row for every row: z (N, c), codebook (K, c) -> (N,) long.

    Exact Euclidean distances (cdist without the ||z||^2 - 2 z.e + ||e||^2 expansion), so a codebook row
    always finds itself, at distance 0. (diffusers' VectorQuantizer uses the expansion for more than 25 rows.)
    """
    z, codebook = z.detach().float(), codebook.detach().float()
    if not len(z):
        return z.new_zeros(0, dtype=torch.long)
    chunk = max(1, ROWS_PER_CHUNK // max(len(codebook), 1))
    return torch.cat([torch.cdist(part, codebook, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
                      for part in z.split(chunk)])  # (N,)


class VQTokenizer(Tokenizer):
    """A diffusers VQModel from a local folder: the quantised latent (codebook vectors) or the latent before it."""

    # a tiny random VQModel (two levels: stride 2, 16 codes of 4 dims) with 2 x 2 tokens of 4 codes each
    contract_args = {"config": {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
                                "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4,
                                "norm_num_groups": 4, "num_vq_embeddings": 16}, "patch_size": 2}

    def __init__(
        self,
        path: Optional[str] = None,  # diffusers-format VQModel folder, a repo with vae/, or a train-tokenizer run
        patch_size: int = 1,  # latent pixels per token side; a token then holds patch_size^2 codes
        quantize: bool = True,  # True: codebook vectors (VQ tokens); False: the latent before quantisation (Table 2)
        scale: Optional[float] = None,  # latent multiplier; None: the model's scaling_factor (train-tokenizer: 1/std)
        shift: Optional[float] = None,  # subtracted before scaling; None: the folder's shift_factor, or 0
        subfolder: Optional[str] = None,  # where config.json is inside ``path`` (default: path itself, else path/vae)
        config: Optional[dict] = None,  # instead of ``path``: VQModel arguments, random weights (tests only)
    ):
        super().__init__(patch_size)
        vae, self.folder = self._load(path, subfolder, config)
        scale = vae.config.scaling_factor if scale is None else scale
        shift = (getattr(vae.config, "shift_factor", None) or 0.0) if shift is None else shift
        if not scale > 0:
            raise UserError(f"tokenizer scale must be > 0, got {scale}")
        self.vae = vae.eval().requires_grad_(False)
        self.quantize, self.scale, self.shift = bool(quantize), float(scale), float(shift)
        self.latent_channels = int(vae.quantize.vq_embed_dim)  # c: the code dimension (VQModel's vq_embed_dim)
        self.stride = 2 ** (len(vae.config.block_out_channels) - 1)  # one 2x downsampling per level but the last

    @staticmethod
    def _load(path: str | None, subfolder: str | None, config: dict | None):
        from diffusers import VQModel  # imported on first use: seconds of imports every CLI start otherwise

        if (path is None) == (config is None):
            raise ValueError("give either path (a VQModel folder or a train-tokenizer run) or config (VQModel "
                             "arguments, random weights), not both or neither")
        if config is not None:
            return VQModel(**config), None
        folder = find_vae_folder(path, subfolder, model="VQModel")
        read_vae_config(folder, model="VQModel")
        try:
            return VQModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False), folder
        except Exception as e:  # a torn or mismatched weight file: one line naming the folder
            raise UserError(f"cannot load the VQModel in {folder}: {' '.join(str(e).split())[:200]}") from e

    # None when quantize is False: those tokens are continuous (not rows of any codebook), so the core refuses a
    # categorical head on them instead of letting it train on nearest-code indices the decoder never receives.
    @property
    def codebook(self) -> Tensor | None:
        """(K, c): the codebook in the scaled latent units ``encode`` returns; None with ``quantize`` False."""
        if not self.quantize:
            return None
        return (self.vae.quantize.embedding.weight.detach().float() - self.shift) * self.scale  # (K, c)

    # Deterministic: a VQ encoder has no posterior, so ``sample`` and ``generator`` change nothing. The model runs
    # in float32 even inside the trainer's autocast, as the KL tokenizers do: the latents are training targets.
    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        with torch.autocast(images.device.type, enabled=False):
            h = self.vae.encode(images.float()).latents  # (B, c, H/s, W/s) before quantisation
        if not self.quantize:
            return (h - self.shift) * self.scale
        B, _, hh, ww = h.shape
        index = nearest_code(rearrange(h, "b c h w -> (b h w) c"), self.vae.quantize.embedding.weight)  # (B h w,)
        # gathered from the scaled codebook itself, so every token is bit for bit a row of ``codebook``
        return rearrange(self.codebook[index], "(b h w) c -> b c h w", b=B, h=hh, w=ww)  # (B, c, H/s, W/s)

    # Never re-quantised: taming's VQGAN decodes the latent it is given, and snapping here would turn Diffusion
    # Loss on the latent before quantisation back into a categorical model at decode time. Quantised tokens are
    # codebook rows already. (VQModel.decode's own argument for this indexes the codebook in some configs.)
    def decode(self, latent: Tensor) -> Tensor:
        z = latent.float() / self.scale + self.shift  # (B, c, h, w) in the VQModel's units
        with torch.autocast(latent.device.type, enabled=False):
            spatial = z if self.vae.config.norm_type == "spatial" else None  # MoVQ-style decoders read the codes
            return self.vae.decoder(self.vae.post_quant_conv(z), spatial)  # (B, 3, H, W)
