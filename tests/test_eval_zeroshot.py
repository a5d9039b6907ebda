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


def test_the_command_scores_an_embedding_by_its_label_names(export_tiny_model, tmp_path, capsys):
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
    assert main([*argv, "--set", "templates=['a video of {}.']"]) == 0
    out = json.loads((emb / "zeroshot.json").read_text())["zero-shot"]
    assert out["top1"] == 100.0 and out["classes"] == 2 and out["videos"] == 5 and "top5" not in out
    assert "zero-shot" in capsys.readouterr().out
    assert main([*argv, "--set", "templates=['no slot']"]) == 2
    assert "exactly one" in capsys.readouterr().err
