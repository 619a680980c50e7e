"""Parallel tiled VAE: the spatial tiles of diffusers' tiled Wan VAE encode/decode shared out over the ranks.

`ParallelAutoencoderKLWan` is an `AutoencoderKLWan` whose `tiled_decode` / `tiled_encode` give rank `r` the tiles
`r, r + world, r + 2 world, ...` (row-major), all-gather the results and blend and crop them exactly as one-rank
tiling does: every rank holds the whole, bit-identical output (a tile's computation does not depend on which rank
runs it). Outside torchrun, with one rank, or for patchified VAEs (Wan2.2), the one-rank methods run unchanged.

`enable_parallel_vae(pipe)` swaps a pipeline's VAE for this subclass (sharing the weights) and turns tiling on.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DecoderOutput


_TILING_ATTRIBUTES = (
    "use_tiling",
    "use_slicing",
    "tile_sample_min_height",
    "tile_sample_min_width",
    "tile_sample_stride_height",
    "tile_sample_stride_width",
)


def _world() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_tiles(local: list[torch.Tensor], num_tiles: int, dtype: torch.dtype, device: torch.device) -> list:
    """All tiles in order, on every rank, from each rank's `local` tiles (rank `r` holds tiles `r, r + world, ...`).

    Tiles may differ in their last two sizes (edge tiles): each rank pads its tiles to the largest shape, one
    `all_gather` moves them, and every tile is cut back to its own shape (shapes travel first, as objects). A rank
    without tiles (fewer tiles than ranks) sends zeros."""
    _, world = _world()
    shapes: list = [None] * world
    dist.all_gather_object(shapes, [tuple(t.shape) for t in local])
    every = [shape for rank_shapes in shapes for shape in rank_shapes]
    height, width = max(s[-2] for s in every), max(s[-1] for s in every)
    send = torch.zeros(math.ceil(num_tiles / world), *every[0][:-2], height, width, dtype=dtype, device=device)
    for index, tile in enumerate(local):
        send[index, ..., : tile.shape[-2], : tile.shape[-1]] = tile
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send)
    tiles = []
    for index in range(num_tiles):
        owner, slot = index % world, index // world
        shape = shapes[owner][slot]
        tiles.append(received[owner][slot, ..., : shape[-2], : shape[-1]])
    return tiles


class ParallelAutoencoderKLWan(AutoencoderKLWan):
    """`AutoencoderKLWan` whose tiled encode and decode split the tiles over the default process group (see the
    module docstring). Results equal the one-rank tiled ones exactly."""

    @classmethod
    def from_vae(cls, vae: AutoencoderKLWan) -> ParallelAutoencoderKLWan:
        """The same VAE (its parameters, not copies; its tiling settings) as a `ParallelAutoencoderKLWan`."""
        with torch.device("meta"):
            parallel = cls.from_config(vae.config)
        parallel.load_state_dict(vae.state_dict(), assign=True, strict=True)
        for name in _TILING_ATTRIBUTES:
            setattr(parallel, name, getattr(vae, name))
        return parallel.eval().requires_grad_(False)

    def _split(self) -> bool:
        return _world()[1] > 1 and self.config.patch_size is None

    # ------------------------------------------------------------------------------------------ one tile
    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """Decode one latent tile frame by frame through the causal cache (`[B, C, F, h, w]` -> pixels)."""
        self.clear_cache()
        frames = []
        for k in range(z.shape[2]):
            self._conv_idx = [0]
            latent = self.post_quant_conv(z[:, :, k : k + 1])
            frames.append(self.decoder(latent, feat_cache=self._feat_map, feat_idx=self._conv_idx, first_chunk=k == 0))
        self.clear_cache()
        return torch.cat(frames, dim=2)

    def encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        """Encode one pixel tile: the first frame alone, then 4 frames at a time through the causal cache."""
        self.clear_cache()
        chunks = []
        for k in range(1 + (x.shape[2] - 1) // 4):
            self._enc_conv_idx = [0]
            frames = x[:, :, :1] if k == 0 else x[:, :, 1 + 4 * (k - 1) : 1 + 4 * k]
            chunks.append(
                self.quant_conv(self.encoder(frames, feat_cache=self._enc_feat_map, feat_idx=self._enc_conv_idx))
            )
        self.clear_cache()
        return torch.cat(chunks, dim=2)

    # ------------------------------------------------------------------------------------------ grid
    def _run_tiles(self, source: torch.Tensor, size: tuple[int, int], stride: tuple[int, int], run) -> list:
        """Tiles of `source` (`size` at `stride`, row-major) through `run`, split over the ranks and gathered;
        returns the rows of tiles."""
        rank, world = _world()
        height, width = source.shape[-2:]
        corners = [(i, j) for i in range(0, height, stride[0]) for j in range(0, width, stride[1])]
        local = [run(source[..., i : i + size[0], j : j + size[1]]) for i, j in corners[rank::world]]
        tiles = gather_tiles(local, len(corners), source.dtype, source.device)
        columns = len(range(0, width, stride[1]))
        return [tiles[r : r + columns] for r in range(0, len(tiles), columns)]

    def _blend(self, rows: list, blend: tuple[int, int], stride: tuple[int, int], size: tuple[int, int]):
        """Blend each tile with the one above and the one to its left, keep `stride` of each, crop to `size`."""
        out_rows = []
        for i, row in enumerate(rows):
            kept = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = self.blend_v(rows[i - 1][j], tile, blend[0])
                if j > 0:
                    tile = self.blend_h(row[j - 1], tile, blend[1])
                kept.append(tile[..., : stride[0], : stride[1]])
            out_rows.append(torch.cat(kept, dim=-1))
        return torch.cat(out_rows, dim=-2)[..., : size[0], : size[1]]

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Tiled decode with the tiles shared out over the ranks (one-rank: diffusers' own)."""
        if not self._split():
            return super().tiled_decode(z, return_dict=return_dict)
        ratio = self.spatial_compression_ratio
        size = (self.tile_sample_min_height // ratio, self.tile_sample_min_width // ratio)
        stride = (self.tile_sample_stride_height // ratio, self.tile_sample_stride_width // ratio)
        rows = self._run_tiles(z, size, stride, self.decode_tile)
        blend = (
            self.tile_sample_min_height - self.tile_sample_stride_height,
            self.tile_sample_min_width - self.tile_sample_stride_width,
        )
        sample_stride = (self.tile_sample_stride_height, self.tile_sample_stride_width)
        dec = self._blend(rows, blend, sample_stride, (z.shape[-2] * ratio, z.shape[-1] * ratio))
        dec = torch.clamp(dec, min=-1.0, max=1.0)
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    def tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Tiled encode with the tiles shared out over the ranks (one-rank: diffusers' own)."""
        if not self._split():
            return super().tiled_encode(x)
        ratio = self.spatial_compression_ratio
        size = (self.tile_sample_min_height, self.tile_sample_min_width)
        stride = (self.tile_sample_stride_height, self.tile_sample_stride_width)
        rows = self._run_tiles(x, size, stride, self.encode_tile)
        latent_size, latent_stride = (size[0] // ratio, size[1] // ratio), (stride[0] // ratio, stride[1] // ratio)
        blend = (latent_size[0] - latent_stride[0], latent_size[1] - latent_stride[1])
        return self._blend(rows, blend, latent_stride, (x.shape[-2] // ratio, x.shape[-1] // ratio))


def enable_parallel_vae(pipe, **tiling) -> None:
    """Give `pipe` a `ParallelAutoencoderKLWan` sharing its VAE's weights, with tiling on (`tiling`: the
    `enable_tiling` sizes; default: the VAE's current ones). A no-op on a pipeline that already has one."""
    if not isinstance(pipe.vae, ParallelAutoencoderKLWan):
        pipe.vae = ParallelAutoencoderKLWan.from_vae(pipe.vae)
    pipe.vae.enable_tiling(**tiling)
