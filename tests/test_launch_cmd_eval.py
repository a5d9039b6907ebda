"""The evaluation commands' settings (eval/config.py): `--set` reaches the eval functions, a bad key or value is a
one-line error naming it, the defaults are the eval functions' own, `--help` lists every key; the tokenizer rule."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from eval.config import ClusterConfig, EmbedConfig, ReportConfig, RetrievalConfig, SearchConfig, eval_config
from eval.embed import find_tokenizer
from launch.cli import main
from pipeline.config import to_dict

CONFIGS = {
    ("embed",): EmbedConfig,
    ("eval", "retrieval"): RetrievalConfig,
    ("eval", "cluster"): ClusterConfig,
    ("report",): ReportConfig,
    ("search",): SearchConfig,
}
REQUIRED = {  # each command's required arguments, naming paths that do not exist
    ("embed",): ["--checkpoint", "nowhere", "--data", "nowhere", "--out", "nowhere"],
    ("eval", "retrieval"): ["nowhere"],
    ("eval", "cluster"): ["nowhere"],
    ("report",): ["nowhere", "--out", "nowhere"],
    ("search",): ["a query", "--embeddings", "nowhere", "--checkpoint", "nowhere"],
}


def planted(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """An embedding directory of `classes` well separated groups of videos, each with one caption."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, 8))
    labels = np.repeat(np.arange(classes), per_class)
    x = centres[labels] + 0.01 * rng.standard_normal((len(labels), 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    root.mkdir(parents=True)
    meta = [{"row": r, "idx": r, "id": f"v{r}", "label": f"c{c}", "captions": ["x"]} for r, c in enumerate(labels)]
    (root / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    for name in ("video@vt", "text@vt"):
        np.save(root / f"{name}.npy", x.astype(np.float16))
    np.save(root / "caption_video.npy", np.arange(len(labels), dtype=np.int64))
    (root / "embed.json").write_text("{}")
    return root


def spy(monkeypatch, module, name: str, result=None):
    """Replace `module.name` by a function that records its keyword arguments (and calls the real one when
    `result` is None); returns the list of recorded calls."""
    real, calls = getattr(module, name), []

    def fake(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs) if result is None else result

    monkeypatch.setattr(module, name, fake)
    return calls


def test_set_reaches_kmeans_and_is_recorded_in_clusters_json(tmp_path, monkeypatch):
    import eval.clustering

    emb = planted(tmp_path / "emb")
    calls = spy(monkeypatch, eval.clustering, "kmeans")
    argv = ["eval", "cluster", str(emb), "--k", "3", "--set", "niter=3", "--set", "nredo=2", "--set", "shots=[1]"]
    assert main([*argv, "--set", "spherical=false", "--set", "seed=7"]) == 0
    assert calls == [dict(seed=7, spherical=False, niter=3, nredo=2, max_points_per_centroid=None)]
    summary = json.loads((emb / "clusters" / "clusters.json").read_text())
    changed = {"niter": 3, "nredo": 2, "spherical": False, "seed": 7, "shots": [1]}
    assert summary["config"] == {**to_dict(ClusterConfig()), **changed}
    assert list(summary["naming"]) == ["all", "1-shot"]


def test_default_cluster_run_passes_the_historical_defaults(tmp_path, monkeypatch):
    import eval.clustering

    emb = planted(tmp_path / "emb")
    calls = spy(monkeypatch, eval.clustering, "cluster_embeddings")
    assert main(["eval", "cluster", str(emb), "--k", "3"]) == 0
    kw = dict(spherical=True, niter=25, nredo=1, max_points_per_centroid=None)
    assert calls == [dict(space="auto", k=3, method="kmeans", shots=(1, 10), seed=1234, **kw)]


def test_set_reaches_retrieval(tmp_path, monkeypatch):
    import eval.probe
    import eval.retrieval

    emb = planted(tmp_path / "emb")
    ranked = spy(monkeypatch, eval.retrieval, "evaluate_retrieval", result={"text->video@vt": {"R@1": 1.0}})
    probed = spy(monkeypatch, eval.probe, "evaluate_classes", result={})
    assert main(["eval", "retrieval", str(emb)]) == 0
    assert ranked[-1] == dict(method="exact", k=100, directions=None) and probed[-1] == dict(space="auto")
    argv = ["eval", "retrieval", str(emb), "--set", "method=ivf", "--set", "nlist=4", "--set", "k=5"]
    assert main([*argv, "--set", "directions=[text->video@vt]", "--set", "classes=false"]) == 0
    assert ranked[-1] == dict(method="ivf", k=5, directions=["text->video@vt"], nlist=4, nprobe=16)
    assert len(probed) == 1  # classes=false: no class retrieval or probes


def test_set_reaches_the_report(tmp_path, monkeypatch):
    import eval.report

    emb = planted(tmp_path / "emb")
    calls = spy(monkeypatch, eval.report, "write_report", result=tmp_path / "index.html")
    assert main(["report", str(emb), "--out", str(tmp_path / "r"), "--k", "3"]) == 0
    assert calls[-1]["per_cluster"] == 8 and calls[-1]["max_clusters"] == 100 and calls[-1]["preview"] == "gif"
    argv = ["report", str(emb), "--out", str(tmp_path / "r"), "--k", "3", "--set", "per_cluster=2"]
    assert main([*argv, "--set", "max_clusters=1", "--set", "preview=jpg"]) == 0
    assert (calls[-1]["per_cluster"], calls[-1]["max_clusters"], calls[-1]["preview"]) == (2, 1, "jpg")


class Stop(Exception):
    pass


def test_set_reaches_embed_and_the_export_tokenizer_wins(tmp_path, monkeypatch):
    import eval.embed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    export, data = tmp_path / "export", tmp_path / "data"
    for d in (export, data):
        d.mkdir()
        (d / "tokenizer.model").write_bytes(b"")
    loaded = spy(monkeypatch, eval.embed, "load_model", result="model")
    embedded = spy(monkeypatch, eval.embed, "embed_dataset", result={"embedded": 0})
    argv = [
        "embed",
        "--checkpoint",
        str(export),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "emb"),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert loaded[-1] == dict(tokenizer=export / "tokenizer.model", dict_path=None, max_words=16, lowercase=True)
    assert embedded[-1] == dict(windows=4, batch_size=8, num_workers=2, rank=0, world_size=1, device="cpu")
    settings = ["windows=0", "batch_size=3", "workers=0", "max_words=30", "lowercase=false", "dict_path=d.npy"]
    assert main([*argv, *(a for s in settings for a in ("--set", s))]) == 0
    assert loaded[-1] == dict(tokenizer=export / "tokenizer.model", dict_path="d.npy", max_words=30, lowercase=False)
    assert (embedded[-1]["windows"], embedded[-1]["batch_size"], embedded[-1]["num_workers"]) == (0, 3, 0)


def test_search_takes_word_list_settings_and_the_embedded_datasets_tokenizer(tmp_path, monkeypatch):
    import eval.embed

    data, ckpt = tmp_path / "data", tmp_path / "export"
    data.mkdir()
    ckpt.mkdir()  # an export without a tokenizer of its own
    (data / "tokenizer.model").write_bytes(b"")
    emb = planted(tmp_path / "emb")
    (emb / "embed.json").write_text(json.dumps({"dataset": str(data)}))
    calls = []

    def load_model(checkpoint, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(eval.embed, "load_model", load_model)
    argv = ["search", "a query", "--embeddings", str(emb), "--checkpoint", str(ckpt)]
    with pytest.raises(Stop):
        main([*argv, "--set", "max_words=30", "--set", "lowercase=false"])
    assert calls == [dict(tokenizer=data / "tokenizer.model", dict_path=None, max_words=30, lowercase=False)]


@pytest.mark.parametrize("command", sorted(CONFIGS), ids=" ".join)
def test_unknown_key_is_one_line_naming_it(command, capsys):
    assert main([*command, *REQUIRED[command], "--set", "no_such_knob=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vatp {' '.join(command)}: error:") and "unknown key 'no_such_knob'" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "command, setting, message",
    [
        (("eval", "cluster"), "niter=three", "ClusterConfig.niter: expected an integer, got 'three'"),
        (("eval", "cluster"), "niter=0", "niter must be >= 1, got 0"),
        (("eval", "cluster"), "method=spectral", "ClusterConfig.method: 'spectral' is not one of ['kmeans', 'heads']"),
        (("eval", "cluster"), "shots=1", "ClusterConfig.shots: expected a list, got 1"),
        (("eval", "cluster"), "niter", "override 'niter' must look like key.path=value"),
        (("eval", "retrieval"), "classes=maybe", "RetrievalConfig.classes: expected true/false, got 'maybe'"),
        (("eval", "retrieval"), "nlist=0", "nlist must be >= 1, got 0"),
        (("report",), "preview=png", "ReportConfig.preview: 'png' is not one of ['gif', 'jpg']"),
        (("embed",), "windows=-1", "windows must be >= 0, got -1"),
        (("search",), "max_words=many", "SearchConfig.max_words: expected an integer, got 'many'"),
    ],
)
def test_bad_value_is_one_line_naming_the_key_and_value(command, setting, message, capsys):
    assert main([*command, *REQUIRED[command], "--set", setting]) == 2
    assert message in capsys.readouterr().err


def test_defaults_are_the_eval_functions_defaults():
    """One fact, one place: a command run with default settings calls the eval functions as their own defaults
    would, and nothing changed from the flags the commands had before."""
    from eval.clustering import cluster_embeddings, kmeans
    from eval.embed import embed_dataset, load_model
    from eval.probe import evaluate_classes
    from eval.report import write_report
    from eval.retrieval import evaluate_retrieval

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    km, ce, ed, lm = defaults(kmeans), defaults(cluster_embeddings), defaults(embed_dataset), defaults(load_model)
    c = ClusterConfig()
    for key in ("spherical", "niter", "nredo", "seed", "max_points_per_centroid"):
        assert getattr(c, key) == km[key], key
    assert (c.method, c.shots, c.seed) == (ce["method"], ce["shots"], ce["seed"])
    r, er = RetrievalConfig(), defaults(evaluate_retrieval)
    assert (r.method, r.k, r.directions) == (er["method"], er["k"], er["directions"])
    assert r.class_space == defaults(evaluate_classes)["space"]
    p, wr = ReportConfig(), defaults(write_report)
    assert (p.per_cluster, p.max_clusters, p.preview) == (wr["per_cluster"], wr["max_clusters"], wr["preview"])
    e = EmbedConfig()
    assert (e.windows, e.batch_size, e.workers) == (ed["windows"], ed["batch_size"], ed["num_workers"])
    for words in (e, SearchConfig()):
        assert (words.dict_path, words.max_words, words.lowercase) == (None, lm["max_words"], lm["lowercase"])
    # the values of the flags these settings replace
    retrieval = dict(method="exact", k=100, nlist=None, nprobe=16, directions=None, classes=True)
    assert to_dict(r) == dict(**retrieval, class_space="auto", gallery=None)
    kmeans_flags = dict(spherical=True, niter=25, nredo=1, seed=1234, max_points_per_centroid=None)
    assert to_dict(c) == dict(method="kmeans", **kmeans_flags, shots=[1, 10])
    assert to_dict(p) == dict(per_cluster=8, max_clusters=100, preview="gif", metrics=None, method="kmeans")
    assert to_dict(e) == dict(dict_path=None, max_words=16, lowercase=True, windows=4, batch_size=8, workers=2)
    assert eval_config(ClusterConfig, []) == c


@pytest.mark.parametrize("command", sorted(CONFIGS), ids=" ".join)
def test_help_lists_every_key_with_its_default_and_meaning(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out
    settings = out.split("with their defaults:\n", 1)[1].splitlines()
    cfg = CONFIGS[command]()
    for f, line in zip(dataclasses.fields(cfg), settings):
        key, _, meaning = line.strip().partition("  ")
        default = to_dict(getattr(cfg, f.name))
        assert key == f"{f.name}={default if isinstance(default, str) else json.dumps(default)}"
        assert meaning.strip(), f"{f.name} is not documented"
    assert len(settings) == len(dataclasses.fields(cfg))


def test_tokenizer_rule(tmp_path):
    export, data, bare = tmp_path / "export", tmp_path / "data", tmp_path / "bare"
    for d in (export, data, bare):
        d.mkdir()
    (export / "tokenizer.model").write_bytes(b"")
    (data / "tokenizer.model").write_bytes(b"")
    assert find_tokenizer("my.model", str(export), str(data)) == Path("my.model")  # explicit wins
    assert find_tokenizer(None, str(export), str(data)) == export / "tokenizer.model"  # then the export's own
    assert find_tokenizer(None, str(bare), str(data)) == data / "tokenizer.model"  # then the dataset's
    assert find_tokenizer(None, str(tmp_path / "s3d.pth"), str(data)) == data / "tokenizer.model"
    assert find_tokenizer(None, str(bare), str(bare)) is None
    assert find_tokenizer(None, str(bare), str(tmp_path / "moved")) is None  # dataset no longer there
    assert find_tokenizer(None, str(bare), None) is None


def test_out_folders_that_do_not_exist_yet_are_created(tmp_path):
    emb = planted(tmp_path / "emb")
    new = tmp_path / "not" / "yet"
    assert main(["eval", "retrieval", str(emb), "--out", str(new / "r" / "retrieval.json")]) == 0
    assert json.loads((new / "r" / "retrieval.json").read_text())
    assert main(["eval", "cluster", str(emb), "--k", "3", "--out", str(new / "c" / "clusters")]) == 0
    assert (new / "c" / "clusters" / "clusters.json").is_file()
    assert main(["report", str(emb), "--k", "3", "--out", str(new / "report")]) == 0
    assert (new / "report" / "index.html").is_file()
