"""S3D-G: released key layout, stems, space-to-depth ordering, and the released-checkpoint loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.s3d import S3D, load_s3d_howto100m, space_to_depth

KEYS = Path(__file__).parent / "data" / "s3d_howto100m_keys.json"  # copied from the released checkpoint's listing


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def released_keys() -> list[tuple[str, list[int]]]:
    return [(k, shape) for k, shape in json.loads(KEYS.read_text())]


def test_state_dict_equals_released_video_keys_and_shapes():
    expected = [(k, s) for k, s in released_keys() if not k.startswith("text_module.")]
    ours = [(k, list(v.shape)) for k, v in S3D(space_to_depth=True).state_dict().items()]
    assert ours == expected
    assert sum(p.numel() for p in S3D().parameters()) == 9_670_800


def test_plain_stem_has_released_shape():
    assert S3D(space_to_depth=False).conv1.conv1.weight.shape == (64, 3, 3, 7, 7)


def _map_sizes(model: S3D, x: torch.Tensor) -> dict[str, tuple]:
    sizes = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape)))
        for name in ("mixed_3c", "mixed_4f", "mixed_5c")
    ]
    model.forward_features(x)
    for h in hooks:
        h.remove()
    return sizes


def test_space_to_depth_stem_gives_the_plain_stem_sizes_at_full_size():
    # Measured on the release (algorithms.md 1.2) at 32x224^2.
    expected = {"mixed_3c": (1, 480, 16, 28, 28), "mixed_4f": (1, 832, 8, 14, 14), "mixed_5c": (1, 1024, 4, 7, 7)}
    with torch.device("meta"):
        x = torch.zeros(1, 3, 32, 224, 224)
        for s2d in (True, False):
            assert _map_sizes(S3D(space_to_depth=s2d), x) == expected


@pytest.mark.parametrize("shape", [(2, 3, 8, 64, 64), (1, 3, 16, 112, 112), (1, 3, 6, 48, 40)])
def test_space_to_depth_and_plain_stems_agree_on_sizes(shape):
    with torch.device("meta"):
        x = torch.zeros(shape)
        assert _map_sizes(S3D(True, width=0.125), x) == _map_sizes(S3D(False, width=0.125), x)


def test_space_to_depth_channel_order_matches_the_release():
    x = torch.randn(2, 3, 4, 6, 8)
    y = space_to_depth(x)
    assert y.shape == (2, 24, 2, 3, 4)
    for dt in range(2):
        for dh in range(2):
            for dw in range(2):
                for c in range(3):
                    channel = ((dt * 2 + dh) * 2 + dw) * 3 + c
                    torch.testing.assert_close(y[:, channel], x[:, c, dt::2, dh::2, dw::2])
    with pytest.raises(ValueError, match="even"):
        space_to_depth(torch.zeros(1, 3, 3, 8, 8))


@pytest.mark.parametrize("width", [0.125, 1.0], ids=["tiny", "full"])
def test_fresh_model_in_eval_mode_separates_clips(width):
    """With PyTorch's default conv init the activations vanish through S3D (features ~1e-10), so a random-init
    model maps every clip to its fc bias: a degenerate baseline that no embedding test can fail on."""
    torch.manual_seed(0)
    model = S3D(width=width, embed_dim=512).eval()
    a = torch.rand(1, 3, 8, 64, 64)
    b = torch.zeros_like(a)
    b[:, :, :, :32] = 1.0  # half white, half black
    with torch.no_grad():
        fa, fb = model.forward_features(a), model.forward_features(b)
        za, zb = model.project(fa), model.project(fb)
    assert fa.abs().mean() > 1e-3 and fb.abs().mean() > 1e-3
    assert (fa - fb).norm() > 0.05 * fa.norm()
    # through the fc (whose bias would otherwise dominate) the clips still differ clearly
    assert (za - zb).norm() > 0.05 * (za - model.fc.bias).norm()
    assert (za - model.fc.bias).norm() > 0.1 * model.fc.bias.norm()


def test_init_keeps_the_released_state_dict_layout():
    bn = S3D(width=0.125).conv_2c.bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    conv = S3D(width=0.125).mixed_5c.conv_b0.conv1.weight  # Kaiming fan_out: std sqrt(2 / (cout * k))
    expected = (2.0 / (conv.shape[0] * conv[0, 0].numel())) ** 0.5
    assert conv.std().item() == pytest.approx(expected, rel=0.1)


def test_tiny_forward_shapes():
    model = S3D(width=0.125, embed_dim=16).eval()
    x = torch.rand(2, 3, 8, 64, 64)
    assert model.forward_features(x).shape == (2, model.feature_dim)
    assert model(x).shape == (2, 16)
    assert S3D(width=0.125, embed_dim=None).eval()(x).shape == (2, model.feature_dim)


# ---- the released-checkpoint loader -----------------------------------------------------------------------------


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Input-dependent fills (algorithms.md 7): He-scaled weights, BN near identity with random statistics.

    Small random BN scales or large biases make a deep net's output a constant, which would test wiring only.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if t.dim() > 1:  # conv / linear weights
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith(("running_var", "bn1.weight", "bn2.weight")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.4 + (1.2 if "weight" in name else 0.8))
            else:  # biases, running means
                t.copy_(torch.randn(t.shape, generator=g) * 0.01)


def _write_released_layout(tmp_path: Path, video: S3D, words: list[str], seed: int) -> tuple[Path, Path, dict]:
    text = {
        "text_module.word_embd.weight": torch.randn(len(words) + 1, 300),
        "text_module.fc1.weight": torch.randn(2048, 300) * 0.05,
        "text_module.fc1.bias": torch.randn(2048) * 0.05,
        "text_module.fc2.weight": torch.randn(512, 2048) * 0.05,
        "text_module.fc2.bias": torch.randn(512) * 0.05,
    }
    state = {**video.state_dict(), **text}
    ckpt, dict_path = tmp_path / "s3d_howto100m.pth", tmp_path / "s3d_dict.npy"
    torch.save(state, ckpt)
    np.save(dict_path, np.array(words))  # a plain unicode array, like the released word list
    return ckpt, dict_path, text


def test_loader_reads_released_layout_and_changes_outputs(tmp_path):
    source = S3D(space_to_depth=True, width=0.125)
    _randomise(source, seed=1)
    source.eval()
    words = ["cut", "the", "onion", "pour", "water"]
    ckpt, dict_path, text = _write_released_layout(tmp_path, source, words, seed=1)

    released = load_s3d_howto100m(ckpt, dict_path)
    fresh = S3D(space_to_depth=True, width=0.125).eval()
    x1 = torch.rand(2, 3, 8, 64, 64)
    x1[1] = x1[1] ** 4  # rows with different statistics: pooled features of iid noise are nearly constant
    x2 = torch.zeros_like(x1)
    x2[:, :, :, :32] = 1.0

    def differ(a, b):
        return (a - b).abs().max() > 0.05 * a.abs().max()

    with torch.no_grad():
        out1, out2 = released.video(x1), released.video(x2)
        torch.testing.assert_close(out1, source(x1))
        assert differ(out1, fresh(x1))
        assert differ(out1, out2) and differ(out1[0], out1[1])  # the fill really makes the output input-dependent

        batch = {"video": (x1 * 255).to(torch.uint8).unsqueeze(1)}  # (B, V=1, 3, T, H, W)
        out = released(batch)
        assert out["video/feat"].shape == (2, 1, source.feature_dim) and out["video@vt"].shape == (2, 1, 512)


def test_loader_text_tokenisation_and_unmasked_padding_are_faithful(tmp_path):
    source = S3D(space_to_depth=True, width=0.125)
    words = ["cut", "the", "onion", "pour", "water", "don't"]
    ckpt, dict_path, text = _write_released_layout(tmp_path, source, words, seed=2)
    model = load_s3d_howto100m(ckpt, dict_path)

    ids = model.tokenize(["Cut THE onion, slowly!", "nothing known here", "don't " * 20])
    assert ids.shape == (3, 16)
    assert ids[0, :3].tolist() == [1, 2, 3] and ids[0, 3:].eq(0).all()  # lowercased, unknown dropped, id = index+1
    assert ids[1].eq(0).all()
    assert ids[2].eq(6).all()  # truncated to max_words

    emb = text["text_module.word_embd.weight"]
    hidden = torch.relu(emb[ids[0]] @ text["text_module.fc1.weight"].T + text["text_module.fc1.bias"])
    expected = hidden.max(dim=0).values @ text["text_module.fc2.weight"].T + text["text_module.fc2.bias"]
    with torch.no_grad():
        got = model.text(ids[:1])[0]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        model.text.word_embd.weight[0] += 5.0  # the padding row enters the max-pool, as released
        assert not torch.allclose(model.text(ids[:1])[0], got)
        out = model({"text": ids.view(1, 3, 16)})
    assert out["text@vt"].shape == (1, 3, 512)


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_s3d_howto100m(tmp_path / "missing.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an S3D"):
        load_s3d_howto100m(tmp_path / "other.pth")
    ckpt, _, _ = _write_released_layout(tmp_path, S3D(width=0.125), ["a", "b"], seed=3)
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array(["a", "b"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled"):
        load_s3d_howto100m(ckpt, pickled)
    # The checkpoint has 3 embedding rows (padding + 2 words): a longer word list cannot fit.
    np.save(tmp_path / "long.npy", np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="rows"):
        load_s3d_howto100m(ckpt, tmp_path / "long.npy")
    assert load_s3d_howto100m(ckpt).text is None


def test_loader_accepts_a_padded_embedding_and_exposes_max_words_and_case(tmp_path):
    """The release pads its embedding table past len(words) + 1; MIL-NCE's evaluators tokenise 30 words."""
    ckpt, _, text = _write_released_layout(tmp_path, S3D(width=0.125), ["a", "b", "c", "d"], seed=5)
    np.save(tmp_path / "short.npy", np.array(["a", "b"]))  # 5 rows for 2 words: rows 3 and 4 are spare
    model = load_s3d_howto100m(ckpt, tmp_path / "short.npy", max_words=30)
    assert model.text.word_embd.weight.shape == (5, 300)
    torch.testing.assert_close(model.text.word_embd.weight, text["text_module.word_embd.weight"])
    ids = model.tokenize(["a b " * 20])
    assert ids.shape == (1, 30) and ids[0].tolist() == [1, 2] * 15
    cased = load_s3d_howto100m(ckpt, tmp_path / "short.npy", lowercase=False)
    assert cased.tokenize(["A b"])[0, :2].tolist() == [2, 0] and model.tokenize(["A b"])[0, :2].tolist() == [1, 2]


@pytest.mark.parametrize(
    "content",
    [b"\x00\x01 not a torch file at all " * 20, b"PK\x03\x04 a broken zip", b""],
    ids=["bytes", "zip", "empty"],
)
def test_corrupt_checkpoint_is_a_value_error_naming_the_file(tmp_path, content):
    bad = tmp_path / "s3d_howto100m.pth"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="s3d_howto100m.pth is not a torch checkpoint"):
        load_s3d_howto100m(bad)
    torch.save([torch.zeros(1)], bad)  # a torch file, but not a state dict
    with pytest.raises(ValueError, match="not an S3D HowTo100M state_dict"):
        load_s3d_howto100m(bad)


def test_loader_reads_a_full_size_checkpoint_with_the_exact_released_keys(tmp_path):
    source = S3D(space_to_depth=True)
    _randomise(source, seed=4)
    words = [f"w{i}" for i in range(66249)]
    ckpt, dict_path, _ = _write_released_layout(tmp_path, source, words, seed=4)
    saved = torch.load(ckpt, weights_only=True)
    assert [(k, list(v.shape)) for k, v in saved.items()] == released_keys()
    model = load_s3d_howto100m(ckpt, dict_path)
    x = torch.rand(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.video(x), source.eval()(x))
        assert model.text(model.tokenize(["w5 w7"])).shape == (1, 512)
