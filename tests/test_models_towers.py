"""The multi-tower model: output dict for every modality subset, FAC spaces, view-0 logits, export round trip."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import yaml

from models import VARIANTS, build_encoder
from models.towers import ModelConfig, SpaceConfig, build_model, load_exported, model_config_from_dict, save_exported

pytestmark = pytest.mark.usefixtures("one_torch_thread")


B, V, K, L = 2, 2, 3, 8


def make_batch(cfg: ModelConfig, views: int = V) -> dict[str, torch.Tensor]:
    c = cfg.contracts()
    batch = {}
    if "video" in c:
        v = c["video"]
        batch["video"] = torch.randint(0, 256, (B, views, 3, v.num_frames, v.size, v.size), dtype=torch.uint8)
    if "audio" in c:
        a = c["audio"]
        batch["audio"] = torch.randn(B, views, 1, a.num_mel_bins, a.num_frames)
    if "text" in c:
        batch["text"] = torch.randint(1, c["text"].vocab_size, (B, K, L))
        batch["text_mask"] = torch.ones(B, K, L, dtype=torch.bool)
        batch["text_mask"][0, 2] = False  # a padding caption
        batch["text_mask"][1, 0, 5:] = False
    return batch


def fac_config(**present) -> ModelConfig:
    """MMV-style: fine video-audio space "va", coarse video-text space "vt" reached from it; 2 x 5 self-label heads."""
    return ModelConfig(
        video=present.get("video", "s3d_tiny"),
        audio=present.get("audio", "audio_tiny"),
        text=present.get("text", "text_tiny"),
        spaces=[
            SpaceConfig("va", ["video", "audio"], dim=16, hidden=32),
            SpaceConfig("vt", ["video", "text"], dim=8, head="linear", source="va"),
        ],
        selflabel_heads=2,
        selflabel_clusters=5,
        size=32,
        num_frames=4,
    )


def calibrate_batchnorm(model: torch.nn.Module, batch: dict) -> None:
    """Set BN running statistics to one batch's statistics, then switch to eval mode.

    Fresh deep towers with default BN statistics shrink the signal layer by layer until eval outputs barely depend
    on the input (algorithms.md 7); calibrated statistics make eval-mode outputs input-dependent.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one pass, exactly this batch's statistics
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(("video", "audio", "text"), r)]


@pytest.mark.parametrize("present", SUBSETS, ids=lambda s: "+".join(s))
def test_every_modality_subset_gives_exactly_its_outputs(present):
    cfg = fac_config(**{m: None for m in ("video", "audio", "text") if m not in present})
    if present == ("text",):
        with pytest.raises(ValueError, match="self-label heads need a video or an audio tower"):
            build_model(cfg)
        cfg.selflabel_heads = cfg.selflabel_clusters = 0
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(make_batch(cfg))
    expected = {f"{m}/feat" for m in present}
    expected |= {f"{m}@va" for m in present if m != "text"} | {f"{m}@vt" for m in present if m != "audio"}
    expected |= {f"{m}/logits" for m in present if m != "text"}
    assert set(out) == expected
    dims = {m: model.encoders[m].feature_dim for m in present}
    for m in present:
        lead = (B, K) if m == "text" else (B, V)
        assert out[f"{m}/feat"].shape == (*lead, dims[m])
    for key in expected:
        assert torch.isfinite(out[key]).all(), key
        if "@va" in key:
            assert out[key].shape == (B, V, 16)
            torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(B, V))
        if "@vt" in key:
            assert out[key].shape[-1] == 8
        if key.endswith("/logits"):
            assert out[key].shape == (2, B, 5)
    assert set(model.input_contracts()) == set(present)


def test_missing_inputs_give_missing_outputs():
    cfg = fac_config()
    model = build_model(cfg).eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        out = model({"text": batch["text"], "text_mask": batch["text_mask"]})
    assert set(out) == {"text/feat", "text@vt"}


def test_fac_coarse_space_reads_relu_of_the_fine_space_through_one_shared_head():
    cfg = fac_config()
    cfg.spaces[1] = SpaceConfig("vt", ["video", "audio", "text"], dim=8, head="linear", source="va", normalize=False)
    cfg.spaces[0] = SpaceConfig("va", ["video", "audio"], dim=16, hidden=32, normalize=False)
    model = build_model(cfg).eval()
    assert set(model.heads["vt"]) == {"from_va", "text"}  # audio->text reuses the video head (MMV)
    with torch.no_grad():
        out = model(make_batch(cfg))
        for m in ("video", "audio"):
            expected = model.heads["vt"]["from_va"](F.relu(out[f"{m}@va"]))
            torch.testing.assert_close(out[f"{m}@vt"], expected)
        torch.testing.assert_close(out["text@vt"], model.heads["vt"]["text"](out["text/feat"]))


def test_logits_come_from_view_zero_only():
    cfg = fac_config(text=None)
    model = build_model(cfg)
    batch = make_batch(cfg, views=3)
    calibrate_batchnorm(model, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["video"][:, 1:] = 0  # not a mirror image: iid noise and its negative pool to nearly the same features
    changed["audio"][:, 1:] = 0
    with torch.no_grad():
        a, b = model(batch), model(changed)
    for m in ("video", "audio"):
        torch.testing.assert_close(a[f"{m}/logits"], b[f"{m}/logits"])
        torch.testing.assert_close(a[f"{m}@va"][:, 0], b[f"{m}@va"][:, 0])
        assert not torch.allclose(a[f"{m}@va"][:, 1], b[f"{m}@va"][:, 1])


def test_video_is_scaled_and_normalised_with_the_contract():
    cfg = ModelConfig(video="r2plus1d_tiny", spaces=[SpaceConfig("v", ["video"], dim=4, head="linear")], size=32)
    model = build_model(cfg).eval()
    video = torch.randint(0, 256, (B, 1, 3, 8, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(model.input_contracts()["video"].mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(model.input_contracts()["video"].std).view(1, 3, 1, 1, 1)
    assert not torch.equal(mean, torch.zeros_like(mean))  # GDT statistics, so the check below means something
    with torch.no_grad():
        got = model({"video": video})["video/feat"][:, 0]
        expected = model.encoders["video"].forward_features((video[:, 0].float() / 255 - mean) / std)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", [n for n in VARIANTS if not n.endswith("_tiny")])
def test_full_variants_have_their_feature_shape_at_contract_size(name):
    with torch.device("meta"):
        encoder = build_encoder(name)
        c = encoder.input_contract
        if VARIANTS[name].modality == "video":
            feats = encoder.forward_features(torch.zeros(1, 3, c.num_frames, c.size, c.size))
        elif VARIANTS[name].modality == "audio":
            feats = encoder.forward_features(torch.zeros(1, 1, c.num_mel_bins, c.num_frames))
        else:
            ids = torch.ones(1, c.max_tokens, dtype=torch.long)
            feats = encoder.forward_features(ids, torch.ones_like(ids, dtype=torch.bool))
    assert feats.shape == (1, encoder.feature_dim)


def test_tiny_model_trains_a_step_and_runs_under_bf16_autocast():
    cfg = fac_config()
    cfg.freeze_text_embeddings = True
    model = build_model(cfg)
    batch = make_batch(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(batch)
    sim = torch.einsum("bd,cd->bc", out["video@vt"][:, 0], out["text@vt"][:, 0])  # (B, B)
    loss = F.cross_entropy(sim, torch.arange(B)) + out["video/logits"].logsumexp(-1).mean()
    loss = loss + (out["video@va"] * out["audio@va"]).sum(-1).mean()
    loss.backward()
    opt.step()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert torch.equal(before["encoders.text.word_embd.weight"], model.encoders.text.word_embd.weight)
    assert not torch.equal(before["encoders.video.conv1.conv1.weight"], model.encoders.video.conv1.conv1.weight)
    assert not torch.equal(before["heads.vt.text.weight"], model.heads.vt.text.weight)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        out["video@vt"].float().sum().backward()
    assert out["video@vt"].dtype == torch.bfloat16
    assert all(torch.isfinite(v.float()).all() for v in out.values())


def test_export_round_trip_reproduces_outputs(tmp_path):
    cfg = fac_config()
    cfg.vocab_size = 321
    model = build_model(cfg)
    batch = make_batch(cfg)
    calibrate_batchnorm(model, batch)  # BN statistics that are not the defaults, and input-dependent outputs
    save_exported(model, cfg, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.safetensors", "model.yaml"]
    loaded, loaded_cfg = load_exported(tmp_path / "export")
    assert loaded_cfg == cfg and not loaded.training
    assert loaded.encoders.text.word_embd.num_embeddings == 321
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert not torch.allclose(a["video@va"][0], a["video@va"][1])

    data = yaml.safe_load((tmp_path / "export" / "model.yaml").read_text())
    data["wat"] = 1
    (tmp_path / "export" / "model.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="unknown key 'wat'"):
        load_exported(tmp_path / "export")
    with pytest.raises(ValueError, match="not found"):
        load_exported(tmp_path / "nothing")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(video="s3d_huge"), "unknown variant 's3d_huge'"),
        (dict(video="audio_tiny"), "is a audio encoder"),
        (dict(spaces=[SpaceConfig("vt", ["video"], source="va")]), "source 'va'"),
        (dict(spaces=[SpaceConfig("a", ["video"]), SpaceConfig("a", ["audio"])]), "defined twice"),
        (dict(selflabel_heads=3), "both be 0"),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_bad_space_fields_are_rejected():
    with pytest.raises(ValueError, match="'cnn'"):
        SpaceConfig("va", ["video"], head="cnn")
    with pytest.raises(ValueError, match="subset"):
        SpaceConfig("va", ["smell"])
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        model_config_from_dict({"spaces": [{"name": "va", "modalities": ["video"], "nope": 1}]})


def test_model_config_builds_through_the_typed_config_machinery():
    from pipeline.config import from_dict, to_dict

    data = {"video": "s3d_tiny", "text": "text_tiny", "spaces": [{"name": "vt", "modalities": ["video", "text"]}]}
    cfg = from_dict(ModelConfig, data)
    assert cfg.spaces[0] == SpaceConfig("vt", ["video", "text"]) and cfg.spaces[0].dim == 256
    assert model_config_from_dict(to_dict(cfg)) == cfg


def _fit_last_layer(head: torch.nn.Sequential, feats: torch.Tensor, target: torch.Tensor) -> None:
    """Solve the head's final Linear so that head(feats) == target (least squares, exact for few samples)."""
    hidden = feats
    with torch.no_grad():
        for layer in list(head)[:-1]:
            hidden = layer(hidden)  # (N, hidden)
        a = torch.cat([hidden, torch.ones(len(hidden), 1)], dim=1).double()  # (N, hidden + 1)
        w = torch.linalg.lstsq(a, target.double(), driver="gelsd").solution  # (hidden + 1, K)
        head[-1].weight.copy_(w[:-1].T.float())
        head[-1].bias.copy_(w[-1].float())


def test_first_labelling_permutation_aligns_the_model_and_survives_export(tmp_path):
    """Objective relabel -> model.set_audio_permutation -> heads_argmax agrees with the video clusters, also after
    an export round trip. The audio head is built so that its raw cluster perm[k] is video cluster k."""
    from eval.clustering import heads_argmax
    from pipeline.losses import SelfLabelConfig
    from pipeline.losses.selflabel import SelfLabelling

    torch.manual_seed(0)
    cfg = ModelConfig(
        video="s3d_tiny",
        audio="audio_tiny",
        spaces=[SpaceConfig("va", ["video", "audio"], dim=8, hidden=16)],
        selflabel_heads=1,
        selflabel_clusters=3,
        size=32,
        num_frames=4,
    )
    model = build_model(cfg).eval()
    n, c = 12, cfg.contracts()
    batch = {
        "video": torch.randint(0, 256, (n, 1, 3, 4, 32, 32), dtype=torch.uint8),
        "audio": torch.randn(n, 1, 1, c["audio"].num_mel_bins, c["audio"].num_frames),
    }
    clusters = torch.arange(n) % 3
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(batch)
    _fit_last_layer(model.selflabel["video"].heads[0], out["video/feat"][:, 0], 6.0 * F.one_hot(clusters, 3))
    _fit_last_layer(model.selflabel["audio"].heads[0], out["audio/feat"][:, 0], 6.0 * F.one_hot(perm[clusters], 3))
    with torch.no_grad():
        out = model(batch)
    assert torch.equal(out["video/logits"][0].argmax(-1), clusters)
    assert torch.equal(out["audio/logits"][0].argmax(-1), perm[clusters])  # the construction holds
    before = heads_argmax(out["video/logits"].numpy(), out["audio/logits"].numpy())[0]
    assert (before == clusters.numpy()).mean() < 1.0  # unaligned audio pulls clusters apart

    sl = SelfLabelling(SelfLabelConfig(heads=1, clusters=3, relabels=3), num_samples=n)
    idx = torch.arange(n)
    stats = sl.relabel(*sl.relabel_inputs(out), idx)
    assert torch.equal(stats["audio_perm"], perm[None])
    assert torch.equal(sl.labels[:, 0], clusters)  # labels name VIDEO clusters
    model.set_audio_permutation(stats["audio_perm"])
    with torch.no_grad():
        aligned = model(batch)
    torch.testing.assert_close(aligned["video/logits"], out["video/logits"])
    assert torch.equal(aligned["audio/logits"][0].argmax(-1), clusters)
    after = heads_argmax(aligned["video/logits"].numpy(), aligned["audio/logits"].numpy())[0]
    assert (after == sl.labels[:, 0].numpy()).mean() == 1.0
    terms = sl(aligned, {"idx": idx})  # the loss reads the model's aligned logits against the same labels
    assert float(terms["selflabel/audio"]) == pytest.approx(float(terms["selflabel/video"]), rel=1e-2)
    again = sl.relabel(*sl.relabel_inputs(aligned), idx)  # a later labelling: nothing permuted twice
    assert "audio_perm" not in again and torch.equal(sl.labels[:, 0], clusters)

    save_exported(model, cfg, tmp_path / "export")
    loaded, _ = load_exported(tmp_path / "export")
    assert torch.equal(loaded.state_dict()["selflabel.audio.perm"], perm[None])
    with torch.no_grad():
        exported = loaded(batch)
    torch.testing.assert_close(exported["audio/logits"], aligned["audio/logits"])
    assert (
        heads_argmax(exported["video/logits"].numpy(), exported["audio/logits"].numpy())[0] == clusters.numpy()
    ).all()


def test_audio_permutation_is_validated_and_old_exports_load_as_identity(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = fac_config()
    model = build_model(cfg)
    for bad, message in [(torch.zeros(2, 4, dtype=torch.long), r"\(H=2, K=5\)"), (torch.zeros(2, 5), "permutation of")]:
        with pytest.raises(ValueError, match=message):
            model.set_audio_permutation(bad)
    with pytest.raises(ValueError, match="no audio self-label heads"):
        build_model(fac_config(audio=None)).set_audio_permutation(torch.arange(5).repeat(2, 1))
    save_exported(model, cfg, tmp_path / "old")
    weights = tmp_path / "old" / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.endswith(".perm")}
    save_file(state, str(weights))  # an export from before the permutation buffer existed
    loaded, _ = load_exported(tmp_path / "old")
    assert torch.equal(loaded.selflabel["audio"].perm, torch.arange(5).repeat(2, 1))


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"garbage that is not safetensors" * 10])
def test_corrupt_export_is_a_value_error_naming_the_file(tmp_path, content):
    cfg = fac_config()
    save_exported(build_model(cfg), cfg, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_exported(tmp_path)
    (tmp_path / "model.yaml").write_text("video: [unclosed\n")
    with pytest.raises(ValueError, match="model.yaml is not valid YAML"):
        load_exported(tmp_path)


def test_exporting_the_same_weights_twice_writes_the_same_bytes(tmp_path):
    """Embeddings are keyed by the export's content: a re-export of unchanged weights must not look like another
    checkpoint (safetensors writes its metadata map in hash order, different from one save to the next)."""
    cfg = fac_config()
    model = build_model(cfg)
    blobs = set()
    for i in range(6):
        save_exported(model, cfg, tmp_path / f"export{i}")
        blobs.add((tmp_path / f"export{i}" / "model.safetensors").read_bytes())
    assert len(blobs) == 1
