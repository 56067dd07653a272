"""Clustering stage: synthetic embeddings with known groups, the HDBSCAN retry/fallback rules, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from workflow_scripts import clustering as C

ETIS = ("ALS", "Parkinson's Disease", "Stroke")


def blobs(n_per: int = 30, k: int = 4, dim: int = 384, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated gaussian blobs, rows shuffled so groups are not contiguous."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(k, dim))
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centers])
    y = np.repeat(np.arange(k), n_per)
    order = rng.permutation(len(y))
    return x[order], y[order]


def run(x: np.ndarray, num_experts: int, seed: int = 0, **clustering) -> tuple[np.ndarray, dict]:
    cfg, k, seed = C.resolve_settings({"num_experts": num_experts, "seed": seed, "clustering": clustering})
    labels, info, reduced = C.cluster_embeddings(x.astype(np.float32), cfg, k, seed)
    return labels, C.build_summary(labels, info, ["ALS"] * len(labels), reduced)


def write_embeddings(folder: Path, x: np.ndarray) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", x.astype(np.float16))
    etis = [ETIS[i % len(ETIS)] for i in range(len(x))]
    utts = {f"spk{i % 5}_utt{i}": {"row": i, "etiology": etis[i], "speaker": f"spk{i % 5}"} for i in range(len(x))}
    mapping = {"base_model": "tiny-random", "pooling": "mean", "dim": x.shape[1], "utterances": utts}
    (folder / "mapping.json").write_text(json.dumps(mapping))
    return etis


@pytest.mark.parametrize("algorithm", ["spectral", "hdbscan"])
def test_finds_separated_blobs(algorithm: str) -> None:
    x, y = blobs()
    labels, summary = run(x, num_experts=4, algorithm=algorithm)
    assert labels.dtype == np.int64 and labels.shape == (120,)
    assert adjusted_rand_score(y, labels) == 1.0
    assert summary["num_clusters"] == 4 and summary["sizes"] == [30, 30, 30, 30]
    assert summary["algorithm_used"] == algorithm and summary["fallback"] is None
    assert summary["reduce_dim_used"] == 50 and summary["silhouette"] > 0.5


def test_labels_ordered_by_size_largest_first() -> None:
    x, y = blobs(n_per=10, k=3)
    keep = np.concatenate([np.flatnonzero(y == 0)[:4], np.flatnonzero(y == 1), np.flatnonzero(y == 2)[:7]])
    labels, summary = run(x[keep], num_experts=3, algorithm="spectral")
    assert summary["sizes"] == [10, 7, 4]
    assert (labels[y[keep] == 1] == 0).all() and (labels[y[keep] == 0] == 2).all()


def test_noise_points_go_to_nearest_cluster() -> None:
    z = np.array([[0, 0], [0, 1], [1, 0], [10, 0], [10, 1], [9, 1], [8.5, 3], [1, -2]], dtype=float)
    labels = np.array([0, 0, 0, 1, 1, 1, -1, -1])
    out, n = C.reassign_noise(z, labels)
    assert n == 2 and out.tolist() == [0, 0, 0, 1, 1, 1, 1, 0]


def test_hdbscan_noise_is_reassigned_and_counted() -> None:
    x, y = blobs()
    rng = np.random.default_rng(1)
    # Two sparse points well outside each blob: too few to form a cluster, so HDBSCAN calls them noise.
    centers = np.stack([x[y == c].mean(axis=0) for c in range(4)])
    outliers = np.concatenate([c + rng.normal(scale=4.0, size=(2, x.shape[1])) for c in centers])
    labels, summary = run(np.concatenate([x, outliers]), num_experts=4, min_clusters=4)
    assert summary["algorithm_used"] == "hdbscan" and summary["noise_reassigned"] == 8
    assert summary["num_clusters"] == 4 and sum(summary["sizes"]) == 128
    # Each outlier joins the cluster of the blob it was drawn around.
    truth = np.concatenate([y, np.repeat(np.arange(4), 2)])
    assert adjusted_rand_score(truth, labels) == 1.0


def test_more_clusters_than_experts_are_merged() -> None:
    x, y = blobs()
    labels, summary = run(x, num_experts=2, min_clusters=4)
    assert summary["num_clusters"] == 2 and summary["merged_clusters"] == 2
    for blob in range(4):  # merging moves whole clusters, never splits a blob
        assert len(set(labels[y == blob].tolist())) == 1


def test_fewer_clusters_accepted_when_reduce_experts() -> None:
    x, y = blobs()
    labels, summary = run(x, num_experts=6, min_clusters=4, reduce_experts=True)
    assert summary["num_clusters"] == 4 and summary["fallback"] is None
    assert adjusted_rand_score(y, labels) == 1.0


def test_too_few_points_for_hdbscan_falls_back_to_spectral() -> None:
    x = np.random.default_rng(3).normal(size=(6, 64))
    labels, summary = run(x, num_experts=3, reduce_experts=True)
    assert summary["algorithm_used"] == "spectral"
    assert "HDBSCAN found" in summary["fallback"] and summary["retries"] >= 1
    assert summary["num_clusters"] == 3 and sorted(set(labels.tolist())) == [0, 1, 2]


def test_too_few_clusters_without_reduction_is_an_error() -> None:
    x = np.random.default_rng(3).normal(size=(6, 64))
    with pytest.raises(C.ClusteringError, match="reduce_experts is false"):
        run(x, num_experts=3, reduce_experts=False)


def test_tiny_run_with_pca_dim_capped() -> None:
    x = np.random.default_rng(4).normal(size=(10, 384))
    labels, summary = run(x, num_experts=2, reduce="pca", reduce_dim=50)
    assert summary["reduce_dim_used"] == 9 and labels.shape == (10,)
    assert 1 <= summary["num_clusters"] <= 2 and sum(summary["sizes"]) == 10


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(C.ClusteringError, match="min_cluster_sise"):
        C.resolve_settings({"num_experts": 4, "clustering": {"min_cluster_sise": 3}})
    with pytest.raises(C.ClusteringError, match="clustering.reduce"):
        C.resolve_settings({"num_experts": 4, "clustering": {"reduce": "tsne"}})


def test_mapping_mismatch_names_the_file(tmp_path: Path) -> None:
    write_embeddings(tmp_path, np.zeros((5, 8)))
    np.save(tmp_path / "embeddings.npy", np.zeros((4, 8), dtype=np.float16))
    with pytest.raises(C.ClusteringError, match="mapping.json lists 5"):
        C.load_embeddings(tmp_path)


def test_same_seed_same_labels_with_umap(tmp_path: Path) -> None:
    x, y = blobs(n_per=20)
    first, s1 = run(x, num_experts=4, seed=7, reduce="umap", reduce_dim=5)
    second, s2 = run(x, num_experts=4, seed=7, reduce="umap", reduce_dim=5)
    assert np.array_equal(first, second) and s1 == s2
    assert adjusted_rand_score(y, first) == 1.0
    a, _ = run(x, num_experts=4, seed=7, algorithm="spectral")
    b, _ = run(x, num_experts=4, seed=7, algorithm="spectral")
    assert np.array_equal(a, b)
    # UMAP plot projection on a tiny set (numba is already compiled by now).
    write_embeddings(tmp_path / "emb", x[:10])
    np.save(tmp_path / "labels.npy", first[:10])
    settings = {"num_experts": 4, "clustering": {"plot_method": "umap"}}
    C.run_plot(str(tmp_path / "emb"), str(tmp_path / "labels.npy"), str(tmp_path / "p.png"), settings)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = blobs()
    etis = write_embeddings(tmp_path / "embeddings", x)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"seed": 0, "num_experts": 4, "clustering": {"plot": True}}))
    base = [sys.executable, "-m", "workflow_scripts.clustering"]
    emb = ["--embeddings-dir", str(tmp_path / "embeddings")]
    out = tmp_path / "out"
    subprocess.run(
        [*base, "cluster", *emb, "--labels-out", str(out / "cluster_labels.npy"),
         "--summary-out", str(out / "clusters.json"), "--settings", str(settings)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    labels = np.load(out / "cluster_labels.npy")
    summary = json.loads((out / "clusters.json").read_text())
    assert labels.dtype == np.int64 and adjusted_rand_score(y, labels) == 1.0
    assert summary["num_clusters"] == 4 and summary["algorithm_used"] == "hdbscan"
    expected = {eti: int(sum(e == eti for e in etis)) for eti in ETIS}
    assert {eti: sum(c.values()) for eti, c in summary["per_etiology"].items()} == expected
    assert sorted(p.name for p in out.iterdir()) == ["cluster_labels.npy", "clusters.json"]  # no temp files left
    inline = json.dumps({"seed": 0, "num_experts": 4, "clustering": {"plot_method": "pca"}})
    subprocess.run(
        [*base, "plot", *emb, "--labels", str(out / "cluster_labels.npy"), "--out", str(out / "plot.png"),
         "--settings", inline, "--summary", str(out / "clusters.json")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (out / "plot.png").stat().st_size > 1000
    bad_settings = {"num_experts": 9, "clustering": {"reduce_experts": False, "max_retries": 0}}
    with pytest.raises(SystemExit) as exit_info:  # same CLI in-process: saves a slow interpreter start
        C.main(["cluster", *emb, "--labels-out", str(out / "l.npy"), "--summary-out", str(out / "s.json"),
                "--settings", json.dumps(bad_settings)])  # fmt: skip
    assert exit_info.value.code == 2 and "reduce_experts is false" in capsys.readouterr().err
    assert not (out / "l.npy").exists() and not (out / "s.json").exists()
