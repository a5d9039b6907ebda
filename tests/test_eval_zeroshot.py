"""Zero-shot classification from class names: prompt building, ensembling, top-k on known answers, a real model."""

from __future__ import annotations

import numpy as np
import pytest

from eval.zeroshot import class_prompts, class_words, ensemble, zero_shot_accuracy


@pytest.mark.parametrize(
    "name, words",
    [("ApplyEyeMakeup", "apply eye makeup"), ("playing_guitar", "playing guitar"), ("YoYo", "yo yo"),
     ("brush_hair", "brush hair"), ("PlayingDaf", "playing daf"), ("BMXBike", "bmx bike"), ("jump", "jump")],
)  # fmt: skip
def test_class_names_become_words(name, words):
    assert class_words(name) == words


def test_prompts_fill_every_template_and_bad_templates_are_refused():
    assert class_prompts(["YoYo", "brush_hair"], ("a video of {}.", "{}")) == [
        ["a video of yo yo.", "yo yo"],
        ["a video of brush hair.", "brush hair"],
    ]
    with pytest.raises(ValueError, match="exactly one"):
        class_prompts(["a"], ("no slot",))
    with pytest.raises(ValueError, match="distinct"):
        class_prompts(["a", "a"])


def test_ensemble_is_the_normalised_mean_of_normalised_prompts():
    x = np.array([[[3.0, 0.0], [0.0, 1.0]]])  # one class, two prompts of different lengths
    np.testing.assert_allclose(ensemble(x), [[np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-6)


def test_top_k_on_known_scores_counts_ties_against_the_true_class():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.4, 0.4, 0.1]])
    labels = np.array([0, 1, 1])
    out = zero_shot_accuracy(scores, labels, ks=(1, 2, 3))
    assert out == {"top1": pytest.approx(100 / 3), "top2": 100.0, "top3": 100.0}  # the tie in row 3 ranks 2nd
    assert zero_shot_accuracy(np.ones((4, 3)), np.array([0, 1, 2, 0]))["top1"] == 0.0  # collapsed: not perfect
    assert "top5" not in zero_shot_accuracy(scores, labels)  # k beyond the class count is not reported
    with pytest.raises(ValueError, match="class indices"):
        zero_shot_accuracy(scores, np.array([0, 1, 3]))


def test_a_real_text_tower_classifies_videos_placed_at_their_class_embedding(export_tiny_model):
    from eval.embed import embed_texts, load_model
    from eval.zeroshot import class_embeddings
    from models.towers import SpaceConfig

    export, data = export_tiny_model(
        "zeroshot", video="s3d_tiny", text="text_tiny", spaces=[SpaceConfig("vt", ["video", "text"], dim=16)]
    )
    model = load_model(export, tokenizer=data / "tokenizer.model")
    names = ["red circle bounce", "blue square rightward", "green triangle grow"]
    prompts = class_prompts(names, ("{}", "a video of {}."))
    classes = class_embeddings(model, prompts, space="vt")  # (3, 16)
    direct = embed_texts(model, [p for ps in prompts for p in ps], "vt").reshape(3, 2, -1)
    np.testing.assert_allclose(classes, ensemble(direct), atol=1e-5)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 30)
    video = classes[labels] + 0.01 * rng.standard_normal((30, 16))
    assert zero_shot_accuracy(video @ classes.T, labels, ks=(1,)) == {"top1": 100.0}


def test_the_command_scores_an_embedding_by_its_label_names(export_tiny_model, tmp_path, capsys, caplog):
    import json

    from eval.embed import load_model
    from eval.zeroshot import class_embeddings
    from launch.cli import main
    from models.towers import SpaceConfig

    export, data = export_tiny_model(
        "zeroshot", video="s3d_tiny", text="text_tiny", spaces=[SpaceConfig("vt", ["video", "text"], dim=16)]
    )
    names = ["green_triangle_grow", "red_circle_bounce"]
    model = load_model(export, tokenizer=data / "tokenizer.model")
    classes = class_embeddings(model, class_prompts(names, ("a video of {}.",)), space="vt")
    emb = tmp_path / "emb"
    emb.mkdir()
    labels = [0, 1, 1, 0, 1]
    with open(emb / "meta.jsonl", "w") as f:
        for i, c in enumerate(labels):
            f.write(json.dumps({"row": i, "idx": i, "id": f"v{i}", "label": names[c], "captions": []}) + "\n")
    np.save(emb / "video@vt.npy", classes[labels].astype(np.float16))
    (emb / "embed.json").write_text("{}")
    argv = ["eval", "zeroshot", str(emb), "--checkpoint", str(export), "--tokenizer", str(data / "tokenizer.model")]
    with caplog.at_level("WARNING"):
        assert main([*argv, "--set", "templates=['a video of {}.']"]) == 0
    assert "does not record the checkpoint that made it" in caplog.text  # made before fingerprints: a warning
    out = json.loads((emb / "zeroshot.json").read_text())["zero-shot"]
    assert out["top1"] == 100.0 and out["classes"] == 2 and out["videos"] == 5 and "top5" not in out
    assert "zero-shot" in capsys.readouterr().out
    assert main([*argv, "--set", "templates=['no slot']"]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_the_command_refuses_another_checkpoints_embeddings_and_a_space_without_text(
    export_tiny_model, tmp_path, capsys
):
    """Real embeddings of the labelled tiny dataset: scored with the checkpoint that made them (into an --out folder
    that does not exist yet); another checkpoint, or a space without text, is one line naming what is wrong."""
    import json

    import torch

    from eval.embed import embed_dataset, load_model
    from eval.embed_files import checkpoint_fingerprint
    from launch.cli import main
    from models.towers import SpaceConfig, load_exported, save_exported

    export, data = export_tiny_model(
        "zeroshot", video="s3d_tiny", text="text_tiny", spaces=[SpaceConfig("vt", ["video", "text"], dim=16)]
    )
    embed_dataset(load_model(export, tokenizer=data / "tokenizer.model"), data, tmp_path / "emb", windows=1)
    argv = ["eval", "zeroshot", str(tmp_path / "emb"), "--tokenizer", str(data / "tokenizer.model")]
    out = tmp_path / "not" / "yet" / "zeroshot.json"
    assert main([*argv, "--checkpoint", str(export), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["zero-shot"]["videos"] == 8
    module, cfg = load_exported(export)
    with torch.no_grad():
        next(module.parameters()).add_(0.05)
    save_exported(module, cfg, tmp_path / "other")
    capsys.readouterr()
    assert main([*argv, "--checkpoint", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    a, b = checkpoint_fingerprint(export), checkpoint_fingerprint(tmp_path / "other")
    assert len(err.splitlines()) == 1 and f"checkpoint {export} (fingerprint {a}), not {tmp_path / 'other'}" in err
    assert f"(fingerprint {b}): pass the checkpoint that made it" in err
    assert main([*argv, "--checkpoint", str(export), "--space", "va"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--space va:" in err and "(spaces with both: vt)" in err


def test_in_a_dot_product_space_classes_are_raw_prompt_means_ranked_by_the_dot_product(export_tiny_model):
    """A space declared `normalize: false` (the MIL-NCE release's vt) compares by the dot product in retrieval, so
    zero-shot does too: dividing out the class norms would rank classes by cosine instead."""
    from eval.embed import embed_texts, load_model
    from eval.zeroshot import class_embeddings, similarity_of
    from models.towers import SpaceConfig

    space = SpaceConfig("vt", ["video", "text"], dim=16, normalize=False)
    export, data = export_tiny_model("zeroshot_dot", video="s3d_tiny", text="text_tiny", spaces=[space])
    model = load_model(export, tokenizer=data / "tokenizer.model")
    assert similarity_of(model, "vt") == "dot"
    prompts = class_prompts(["red circle bounce", "blue square rightward"], ("{}", "a video of {}."))
    raw = embed_texts(model, [p for ps in prompts for p in ps], "vt", normalize=False).reshape(2, 2, -1)
    classes = class_embeddings(model, prompts, space="vt")
    np.testing.assert_allclose(classes, raw.mean(1), atol=1e-5)
    assert not np.allclose(np.linalg.norm(classes, axis=1), 1.0, atol=1e-3)  # norms kept: they count in the dot
    np.testing.assert_allclose(ensemble(raw, "dot"), raw.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="cosine' or 'dot'"):
        ensemble(raw, "euclid")
