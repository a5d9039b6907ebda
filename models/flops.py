"""Parameter and FLOP counts per encoder variant, measured with `torch.utils.flop_counter.FlopCounterMode`.

FLOPs count 2 per multiply-add (so S3D-G's 73.6 GMAC at 64x224^2 reads 147 GFLOP) and cover convolutions and
matmuls only (BN, pooling, gating elementwise work is not counted). Counting runs on the meta device: no memory,
no compute, so full-size variants are counted in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.contracts import AudioInput, TextInput, VideoInput
from models.variants import VARIANTS, build_encoder


@dataclass(frozen=True)
class ModelCost:
    """What one variant costs: parameters and forward GFLOPs for one clip (or caption) at its contract size."""

    name: str
    modality: str
    params: int
    gflops: float
    contract: VideoInput | AudioInput | TextInput


def count_params(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with `requires_grad`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_flops(module: nn.Module, *inputs, backward: bool = False) -> int:
    """FLOPs of `module(*inputs)` (plus its backward when `backward`), counted by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        out = module(*inputs)
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


def example_input(contract: VideoInput | AudioInput | TextInput, batch: int = 1, device="cpu") -> tuple:
    """Encoder inputs at the contract's size: video `(B, 3, T, S, S)`, audio `(B, 1, F, Ta)`, text `(ids, mask)`."""
    if isinstance(contract, VideoInput):
        return (torch.zeros(batch, 3, contract.num_frames, contract.size, contract.size, device=device),)
    if isinstance(contract, AudioInput):
        return (torch.zeros(batch, 1, contract.num_mel_bins, contract.num_frames, device=device),)
    ids = torch.ones(batch, contract.max_tokens, dtype=torch.long, device=device)
    return ids, torch.ones_like(ids, dtype=torch.bool)


def variant_cost(name: str) -> ModelCost:
    """Parameters and forward GFLOPs per clip of variant `name` (counted on the meta device)."""
    variant = VARIANTS.get(name)
    if variant is None:
        raise ValueError(f"unknown encoder variant {name!r} (known: {', '.join(VARIANTS)})")
    with torch.device("meta"):
        encoder = build_encoder(name)
        inputs = example_input(variant.contract, device="meta")
    encoder.eval()
    flops = count_flops(encoder.forward_features, *inputs)
    return ModelCost(name, variant.modality, count_params(encoder), flops / 1e9, variant.contract)


def describe_contract(contract: VideoInput | AudioInput | TextInput) -> str:
    """One-line summary of a contract, e.g. `32x224^2 @ 10 fps` or `40 mel x 101 @ 16 kHz (1 s)`."""
    if isinstance(contract, VideoInput):
        norm = "" if contract.std == (1.0, 1.0, 1.0) and contract.mean == (0.0, 0.0, 0.0) else ", mean/std"
        return f"{contract.num_frames}x{contract.size}^2 @ {contract.fps:g} fps ([0,1]{norm})"
    if isinstance(contract, AudioInput):
        return (
            f"{contract.num_mel_bins} mel x {contract.num_frames} @ {contract.sample_rate / 1000:g} kHz "
            f"({contract.seconds:g} s, win {contract.win_length_ms:g}/hop {contract.hop_length_ms:g} ms)"
        )
    return f"{contract.max_tokens} tokens, vocab {contract.vocab_size}"
