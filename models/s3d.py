"""S3D-G, exactly as released with MIL-NCE HowTo100M (antoine77340/S3D_HowTo100M `s3dg.py`), plus its loader.

The module tree mirrors the release so `state_dict()` keys and shapes equal the video part of
`s3d_howto100m.pth` key for key (no prefix). Input: float RGB in [0, 1], `(B, 3, T, H, W)`; no mean/std.
Faithful details kept on purpose: TF-"SAME" max-pools built from a constant pad plus `ceil_mode=True`,
PyTorch BatchNorm defaults (eps 1e-5), self-gating always on (the release's `gating=False` is a no-op), and
the space-to-depth stem with its one-voxel crop.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.contracts import PAD_ID, VideoInput

log = logging.getLogger(__name__)

# Inception channel plans (b0, b1a, b1b, b2a, b2b, b3b) from the release, by block name.
_INCEPTION = {
    "mixed_3b": (64, 96, 128, 16, 32, 32),
    "mixed_3c": (128, 128, 192, 32, 96, 64),
    "mixed_4b": (192, 96, 208, 16, 48, 64),
    "mixed_4c": (160, 112, 224, 24, 64, 64),
    "mixed_4d": (128, 128, 256, 24, 64, 64),
    "mixed_4e": (112, 144, 288, 32, 64, 64),
    "mixed_4f": (256, 160, 320, 32, 128, 128),
    "mixed_5b": (256, 160, 320, 32, 128, 128),
    "mixed_5c": (384, 192, 384, 48, 128, 128),
}


class STConv3D(nn.Module):
    """Conv3d (no bias) + BN + ReLU; `separable`: spatial 1 x k x k conv, BN, ReLU, then temporal k x 1 x 1."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, separable: bool = False):
        super().__init__()
        kernel, stride, padding = (_triple(v) for v in (kernel, stride, padding))
        self.separable = separable and kernel[0] != 1
        if self.separable:
            self.conv1 = nn.Conv3d(
                cin, cout, (1, *kernel[1:]), (1, *stride[1:]), (0, *padding[1:]), bias=False
            )  # spatial
            self.bn1 = nn.BatchNorm3d(cout)
            self.conv2 = nn.Conv3d(
                cout, cout, (kernel[0], 1, 1), (stride[0], 1, 1), (padding[0], 0, 0), bias=False
            )  # temporal
            self.bn2 = nn.BatchNorm3d(cout)
        else:
            self.conv1 = nn.Conv3d(cin, cout, kernel, stride, padding, bias=False)
            self.bn1 = nn.BatchNorm3d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.separable:
            x = F.relu(self.bn2(self.conv2(x)))
        return x


class SelfGating(nn.Module):
    """Channel gate from the clip-averaged features: `x * sigmoid(fc(mean_{T,H,W} x))`."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))))  # (B, C)
        return weights[:, :, None, None, None] * x


class MaxPool3dTFPadding(nn.Module):
    """TF "SAME" max-pool as the release builds it: zero pad `max(k - s, 0)` split low/high, then ceil-mode pool.

    Zero padding equals -inf padding here because every input is post-ReLU.
    """

    def __init__(self, kernel, stride):
        super().__init__()
        kernel, stride = _triple(kernel), _triple(stride)
        pads = []
        for k, s in reversed(list(zip(kernel, stride))):  # F.pad wants (W, H, T) pairs
            along = max(k - s, 0)
            pads += [along // 2, along - along // 2]
        self.pad = tuple(pads)
        self.pool = nn.MaxPool3d(kernel, stride, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.pad(x, self.pad, mode="constant", value=0.0))


class InceptionBlock(nn.Module):
    """Four branches (1x1; 1x1 -> sep 3x3x3; 1x1 -> sep 3x3x3; maxpool -> 1x1), each self-gated, concatenated."""

    def __init__(self, cin: int, b0: int, b1a: int, b1b: int, b2a: int, b2b: int, b3b: int):
        super().__init__()
        self.conv_b0 = STConv3D(cin, b0, 1)
        self.conv_b1_a = STConv3D(cin, b1a, 1)
        self.conv_b1_b = STConv3D(b1a, b1b, 3, padding=1, separable=True)
        self.conv_b2_a = STConv3D(cin, b2a, 1)
        self.conv_b2_b = STConv3D(b2a, b2b, 3, padding=1, separable=True)
        self.maxpool_b3 = nn.MaxPool3d(3, stride=1, padding=1)
        self.conv_b3_b = STConv3D(cin, b3b, 1)
        self.gating_b0 = SelfGating(b0)
        self.gating_b1 = SelfGating(b1b)
        self.gating_b2 = SelfGating(b2b)
        self.gating_b3 = SelfGating(b3b)
        self.out_channels = b0 + b1b + b2b + b3b

    def forward(self, x: Tensor) -> Tensor:
        b0 = self.gating_b0(self.conv_b0(x))
        b1 = self.gating_b1(self.conv_b1_b(self.conv_b1_a(x)))
        b2 = self.gating_b2(self.conv_b2_b(self.conv_b2_a(x)))
        b3 = self.gating_b3(self.conv_b3_b(self.maxpool_b3(x)))
        return torch.cat([b0, b1, b2, b3], dim=1)


class S3D(nn.Module):
    """S3D-G video tower. `forward_features(x) -> (B, 1024)` (pooled mixed_5c), `forward(x) -> (B, 512)` (fc).

    `width` scales every channel count (tiny CPU variants); `embed_dim=None` drops `fc`, and `forward` then
    returns the pooled features (the multi-tower model projects with its own heads).
    """

    def __init__(self, space_to_depth: bool = True, *, width: float = 1.0, embed_dim: int | None = 512):
        super().__init__()
        if width <= 0:
            raise ValueError(f"S3D width must be > 0, got {width}")

        def ch(c: int) -> int:
            return max(1, round(c * width))

        self.space_to_depth = space_to_depth
        if space_to_depth:
            self.conv1 = STConv3D(24, ch(64), (2, 4, 4), stride=1, padding=(1, 2, 2))
        else:
            self.conv1 = STConv3D(3, ch(64), (3, 7, 7), stride=2, padding=(1, 3, 3))
        self.conv_2b = STConv3D(ch(64), ch(64), 1)
        self.conv_2c = STConv3D(ch(64), ch(192), 3, padding=1, separable=True)
        self.gating = SelfGating(ch(192))
        self.maxpool_2a = MaxPool3dTFPadding((1, 3, 3), (1, 2, 2))
        self.maxpool_3a = MaxPool3dTFPadding((1, 3, 3), (1, 2, 2))
        cin = ch(192)
        for name, plan in _INCEPTION.items():
            block = InceptionBlock(cin, *(ch(c) for c in plan))
            setattr(self, name, block)
            cin = block.out_channels
        self.maxpool_4a = MaxPool3dTFPadding((3, 3, 3), (2, 2, 2))
        self.maxpool_5a = MaxPool3dTFPadding((2, 2, 2), (2, 2, 2))
        self.feature_dim = cin
        self.embed_dim = embed_dim
        self.fc = nn.Linear(cin, embed_dim) if embed_dim else None
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled mixed_5c features `(B, feature_dim)` of RGB clips `(B, 3, T, H, W)` in [0, 1]."""
        if self.space_to_depth:
            x = space_to_depth(x)
            x = self.conv1(x)[:, :, 1:, 1:, 1:]  # the release crops the extra voxel its (1, 2, 2) pad creates
        else:
            x = self.conv1(x)
        x = self.maxpool_2a(x)
        x = self.gating(self.conv_2c(self.conv_2b(x)))
        x = self.maxpool_3a(x)
        x = self.mixed_3c(self.mixed_3b(x))
        x = self.maxpool_4a(x)
        for name in ("mixed_4b", "mixed_4c", "mixed_4d", "mixed_4e", "mixed_4f"):
            x = getattr(self, name)(x)
        x = self.maxpool_5a(x)
        x = self.mixed_5c(self.mixed_5b(x))
        return x.mean(dim=(2, 3, 4))

    def project(self, features: Tensor) -> Tensor:
        """The release's video_embedding: `fc` applied to pooled features (identity without `fc`)."""
        return self.fc(features) if self.fc is not None else features

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, BN weight 1 / bias 0 (torchvision's video init; the release ships no init).

    PyTorch's default conv init shrinks activations ~100x through S3D's depth, so a fresh model in eval mode
    gives nearly the same (~1e-10) vector for every clip: a degenerate random-init baseline.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def space_to_depth(x: Tensor) -> Tensor:
    """`(B, C, T, H, W) -> (B, 8C, T/2, H/2, W/2)` with channel `((dt*2+dh)*2+dw)*C + c`, as the release."""
    b, c, t, h, w = x.shape
    if t % 2 or h % 2 or w % 2:
        raise ValueError(f"space_to_depth needs even T, H, W; got T={t} H={h} W={w}")
    x = x.view(b, c, t // 2, 2, h // 2, 2, w // 2, 2)
    x = x.permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(b, 8 * c, t // 2, h // 2, w // 2)


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


# --------------------------------------------------------------------------------------------------------------
# The original word2vec text tower and the released checkpoint.


class Word2VecText(nn.Module):
    """The release's `Sentence_Embedding`: embedding(300) -> fc1(2048) + ReLU -> max over ALL positions -> fc2(512).

    Padding (token `PAD_ID`, row 0) is deliberately not masked, as in the release: `word_embd[0]` enters the max-pool.
    `tokenize` reproduces the release's word splitting and lookup.
    """

    def __init__(
        self, words: np.ndarray | list[str], *, rows: int | None = None, max_words: int = 16, lowercase: bool = True
    ):
        super().__init__()
        rows = len(words) + 1 if rows is None else rows
        if rows < len(words) + 1 or max_words < 1:
            raise ValueError(f"word2vec text needs rows >= {len(words) + 1} and max_words >= 1: {rows}, {max_words}")
        self.word_embd = nn.Embedding(rows, 300)
        self.fc1 = nn.Linear(300, 2048)
        self.fc2 = nn.Linear(2048, 512)
        self.word_to_token = {str(w): i + 1 for i, w in enumerate(words)}
        self.max_words = max_words
        self.lowercase = lowercase

    def tokenize(self, sentences: list[str]) -> Tensor:
        """Ids `(N, max_words)`: regex words, unknown words dropped, id = word-list index + 1, padded with `PAD_ID`."""
        out = torch.full((len(sentences), self.max_words), PAD_ID, dtype=torch.long)
        for i, sentence in enumerate(sentences):
            text = str(sentence).lower() if self.lowercase else str(sentence)
            ids = [self.word_to_token[w] for w in re.findall(r"[\w']+", text) if w in self.word_to_token]
            ids = ids[: self.max_words]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def forward(self, ids: Tensor) -> Tensor:
        """Text embeddings `(N, 512)` of token ids `(N, L)` (padding included, as released)."""
        x = F.relu(self.fc1(self.word_embd(ids)))  # (N, L, 2048)
        return self.fc2(x.max(dim=1).values)


class S3DHowTo100M(nn.Module):
    """The released MIL-NCE model: S3D-G video tower and (optionally) the word2vec text tower, dot-product space "vt".

    `forward(batch)` follows the multi-tower convention for what it can eat: `video` uint8 `(B, V, 3, T, H, W)`
    -> `video/feat` (B, V, 1024), `video@vt` (B, V, 512); `text` ids from `tokenize` `(B, K, L)` -> `text@vt`.
    """

    def __init__(self, video: S3D, text: Word2VecText | None):
        super().__init__()
        self.video = video
        self.text = text

    dot_product_spaces = ("vt",)  # the release compares un-normalised embeddings by their dot product

    def input_contracts(self) -> dict[str, VideoInput]:
        return {"video": VideoInput(num_frames=32, size=224, fps=10.0)}

    def tokenize(self, sentences: list[str]) -> Tensor:
        if self.text is None:
            raise ValueError("this S3D HowTo100M model was loaded without a word list (dict_path)")
        return self.text.tokenize(sentences)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        device = self.video.conv1.conv1.weight.device
        if "video" in batch:
            b, v = batch["video"].shape[:2]
            x = batch["video"].to(device).flatten(0, 1).float() / 255.0  # (B*V, 3, T, H, W)
            feat = self.video.forward_features(x)
            out["video/feat"] = feat.view(b, v, -1)
            out["video@vt"] = self.video.project(feat).view(b, v, -1)
        if "text" in batch and self.text is not None:
            b, k = batch["text"].shape[:2]
            out["text@vt"] = self.text(batch["text"].to(device).flatten(0, 1)).view(b, k, -1)
        return out


def load_s3d_howto100m(
    path: str | Path, dict_path: str | Path | None = None, *, max_words: int = 16, lowercase: bool = True
) -> S3DHowTo100M:
    """Load the released `s3d_howto100m.pth` (and with `dict_path`, the word list `s3d_dict.npy`) in eval mode.

    `max_words` caps the tokenizer's words per sentence (the release's default is 16; MIL-NCE's evaluation
    scripts use 30); `lowercase` lowercases text before the word lookup, as the release does.

    The checkpoint is read with `torch.load(weights_only=True)`; the word list with `np.load(allow_pickle=False)`
    (the released file is a plain string array). Space-to-depth and width are read off the stem weights.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"S3D checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a torch checkpoint readable with weights_only=True: {reason}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an S3D HowTo100M state_dict (holds a {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "conv1.conv1.weight" not in state:
        raise ValueError(f"{path}: not an S3D HowTo100M state_dict (no 'conv1.conv1.weight')")
    stem = state["conv1.conv1.weight"]  # (64, 24, 2, 4, 4) with space-to-depth, (64, 3, 3, 7, 7) without
    video = S3D(space_to_depth=stem.shape[1] == 24, width=stem.shape[0] / 64, embed_dim=state["fc.weight"].shape[0])
    video_state = {k: v for k, v in state.items() if not k.startswith("text_module.")}
    video.load_state_dict(video_state, strict=True)
    text = None
    if dict_path is not None:
        text = _load_text_module(state, Path(dict_path), max_words=max_words, lowercase=lowercase)
    log.info("loaded S3D HowTo100M from %s (text tower: %s)", path, "yes" if text is not None else "no")
    return S3DHowTo100M(video, text).eval()


def _load_text_module(state: dict[str, Tensor], dict_path: Path, *, max_words: int, lowercase: bool) -> Word2VecText:
    if not dict_path.is_file():
        raise ValueError(f"S3D word list not found: {dict_path}")
    try:
        words = np.load(dict_path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{dict_path}: not a plain string array (pickled word lists are refused): {e}") from e
    text_state = {k.removeprefix("text_module."): v for k, v in state.items() if k.startswith("text_module.")}
    if "word_embd.weight" not in text_state:
        raise ValueError("checkpoint has no text_module.* weights, but a word list was given")
    rows = text_state["word_embd.weight"].shape[0]
    # Row 0 is padding and word i is row i + 1; the release pads its table, so spare rows at the end are fine.
    if rows < len(words) + 1:
        raise ValueError(
            f"{dict_path}: {len(words)} words, but the checkpoint's embedding has only {rows} rows (needs words + 1)"
        )
    text = Word2VecText(words, rows=rows, max_words=max_words, lowercase=lowercase)
    text.load_state_dict(text_state, strict=True)
    return text
