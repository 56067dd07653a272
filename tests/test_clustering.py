"""Clustering: synthetic embeddings with known groups, the HDBSCAN retry/fallback rules, settings, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from workflow_scripts import cluster_algorithms as A
from workflow_scripts import cluster_balance, cluster_plot
from workflow_scripts import clustering as C
from workflow_scripts.settings import default_run

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
    labels, info, reduced = A.cluster_embeddings(x.astype(np.float32), cfg, k, seed)
    return labels, A.build_summary(labels, info, ["ALS"] * len(labels), reduced)


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
    out, n = cluster_balance.reassign_noise(z, labels)
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
    with pytest.raises(A.ClusteringError, match="reduce_experts is false"):
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


def test_defaults_are_the_schema_defaults() -> None:
    cfg, num_experts, seed = C.resolve_settings({"num_experts": 4})
    assert cfg == default_run()["clustering"] and (num_experts, seed) == (4, default_run()["seed"])


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
    cluster_plot.run_plot(str(tmp_path / "emb"), str(tmp_path / "labels.npy"), str(tmp_path / "p.png"), settings)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = blobs()
    etis = write_embeddings(tmp_path / "embeddings", x)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"seed": 0, "num_experts": 4, "clustering": {}}))
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
        [sys.executable, "-m", "workflow_scripts.cluster_plot", *emb, "--labels", str(out / "cluster_labels.npy"),
         "--out", str(out / "plot.png"), "--settings", inline, "--summary", str(out / "clusters.json")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (out / "plot.png").stat().st_size > 1000
    np.save(out / "short.npy", labels[:-1])
    with pytest.raises(SystemExit) as exit_info:  # the plot CLI's ClusteringError path, in-process
        cluster_plot.main([*emb, "--labels", str(out / "short.npy"), "--out", str(out / "bad.png"),
                           "--settings", inline])  # fmt: skip
    assert exit_info.value.code == 2 and "rerun the cluster step" in capsys.readouterr().err
    assert not (out / "bad.png").exists()
    bad_settings = {"num_experts": 9, "clustering": {"reduce_experts": False, "max_retries": 0}}
    with pytest.raises(SystemExit) as exit_info:  # same CLI in-process: saves a slow interpreter start
        C.main(["cluster", *emb, "--labels-out", str(out / "l.npy"), "--summary-out", str(out / "s.json"),
                "--settings", json.dumps(bad_settings)])  # fmt: skip
    assert exit_info.value.code == 2 and "reduce_experts is false" in capsys.readouterr().err
    assert not (out / "l.npy").exists() and not (out / "s.json").exists()


def speakers_reading_prompts(seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """12 speakers of 3 etiologies, each reading the same 4 prompts.

    What is said (4 prompt centres) moves an embedding far more than who says it (3 etiology
    offsets, a small per-speaker one): utterances cluster by prompt, speaker means by etiology.
    """
    rng = np.random.default_rng(seed)
    dim = 32
    prompts = rng.normal(scale=6.0, size=(4, dim))
    etiology_offsets = rng.normal(scale=2.0, size=(3, dim))
    rows, speakers, etis = [], [], []
    for s in range(12):
        voice = etiology_offsets[s % 3] + rng.normal(scale=0.3, size=dim)
        for p in range(4):
            for _ in range(2):
                rows.append(prompts[p] + voice + rng.normal(scale=0.3, size=dim))
                speakers.append(f"spk{s}")
                etis.append(ETIS[s % 3])
    return np.array(rows), speakers, etis


def test_speaker_level_routes_on_the_speaker_not_the_prompt() -> None:
    x, speakers, etis = speakers_reading_prompts()
    summaries = {}
    for level in ("utterance", "speaker"):
        cfg, k, seed = C.resolve_settings({"num_experts": 3, "clustering": {"algorithm": "kmeans", "level": level}})
        labels, info, reduced = A.cluster_embeddings(x.astype(np.float32), cfg, k, seed, speakers)
        summaries[level] = A.build_summary(labels, info, etis, reduced)
    by_speaker: dict[str, set[int]] = {}
    for spk, lab in zip(speakers, labels.tolist(), strict=True):
        by_speaker.setdefault(spk, set()).add(lab)
    assert all(len(labs) == 1 for labs in by_speaker.values())  # one expert per speaker
    speaker, utterance = summaries["speaker"], summaries["utterance"]
    assert speaker["level"] == "speaker" and speaker["n_units"] == 12 and utterance["n_units"] == 96
    assert speaker["nmi_etiology"] == 1.0 and speaker["ari_etiology"] == 1.0
    assert utterance["nmi_etiology"] < 0.2  # utterances grouped by what was said


def test_speaker_level_needs_speakers() -> None:
    x, _, _ = speakers_reading_prompts()
    cfg, k, seed = C.resolve_settings({"num_experts": 3, "clustering": {"level": "speaker"}})
    with pytest.raises(A.ClusteringError, match="level: speaker needs the speaker"):
        A.cluster_embeddings(x, cfg, k, seed)


def test_kmeans_gives_exactly_num_experts_clusters() -> None:
    x, _ = blobs(k=2)  # two natural groups, four experts asked for
    labels, summary = run(x, num_experts=4, algorithm="kmeans")
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3] and summary["num_clusters"] == 4
    assert summary["algorithm_used"] == "kmeans"
    few, _ = run(x[:3], num_experts=4, algorithm="kmeans", reduce="none")  # capped by the number of units
    assert sorted(set(few.tolist())) == [0, 1, 2]


def test_max_cluster_share_caps_the_largest_cluster() -> None:
    x, y = blobs(n_per=80, k=4)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:10], np.flatnonzero(y == 2)[:5],
                           np.flatnonzero(y == 3)[:5]])  # 80 / 10 / 5 / 5
    uncapped, before = run(x[keep], num_experts=4, algorithm="kmeans")
    assert before["sizes"] == [80, 10, 5, 5] and before["capped_moves"] == 0
    labels, summary = run(x[keep], num_experts=4, algorithm="kmeans", max_cluster_share=0.3)
    assert max(summary["sizes"]) == 30 and sum(summary["sizes"]) == 100
    assert summary["capped_moves"] == 50 and summary["unit_sizes"] == summary["sizes"]
    assert sorted(summary["unit_sizes_before_cap"], reverse=True) == [80, 10, 5, 5]
    moved = labels != uncapped
    assert moved.sum() == 50 and (y[keep][moved] == 0).all()  # only the oversize cluster gave units away


def test_cap_moves_the_cheapest_units_to_the_nearest_cluster_with_room() -> None:
    z = np.array([[0.0], [1], [2], [3], [4], [5], [10], [-10]])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 2])
    out, moves = cluster_balance.cap_cluster_share(z, labels, 0.5)  # at most ceil(4.0) = 4 units
    # 5 then 4 are the cheapest to move (towards 10); cluster 2 at -10 has room but is farther for both.
    assert moves == 2 and out.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert cluster_balance.max_units(0.1, 30) == 3  # not 4 from 0.1 * 30 = 3.0000000000000004


def test_impossible_share_names_the_key_and_the_smallest_value() -> None:
    with pytest.raises(C.ClusteringError, match=r"max_cluster_share=0.2 is impossible.*smallest allowed value .* 0.25"):
        C.resolve_settings({"num_experts": 4, "clustering": {"max_cluster_share": 0.2}})
    with pytest.raises(C.ClusteringError, match=r"clustering.max_cluster_share: 0 is less than or equal"):
        C.resolve_settings({"num_experts": 4, "clustering": {"max_cluster_share": 0}})
    # Allowed for 3 experts, but HDBSCAN finds only 2 clusters: the cap cannot be met.
    x, _ = blobs(k=2)
    with pytest.raises(A.ClusteringError, match=r"2 clusters were found.*1/2 = 0.5"):
        run(x, num_experts=3, max_cluster_share=0.4, min_experts=2)


def test_nmi_and_ari_against_etiology() -> None:
    etis = [ETIS[i % 3] for i in range(30)]
    same = np.array([i % 3 for i in range(30)])
    z = np.random.default_rng(0).normal(size=(30, 2))
    summary = A.build_summary(same, {}, etis, z)
    assert summary["nmi_etiology"] == pytest.approx(1.0) and summary["ari_etiology"] == pytest.approx(1.0)
    # Each etiology split evenly over two clusters: the clusters say nothing about etiology.
    other = A.build_summary(np.array([(i // 3) % 2 for i in range(30)]), {}, etis, z)
    assert other["nmi_etiology"] == pytest.approx(0.0, abs=1e-9) and other["ari_etiology"] <= 0


def test_cli_speaker_level_and_plot(tmp_path: Path) -> None:
    x, _ = blobs(n_per=10)
    write_embeddings(tmp_path / "embeddings", x)  # 5 speakers
    settings = {"seed": 0, "num_experts": 2, "clustering": {"level": "speaker", "algorithm": "kmeans",
                                                             "plot_method": "pca"}}
    summary = C.run_cluster(str(tmp_path / "embeddings"), str(tmp_path / "labels.npy"), str(tmp_path / "c.json"),
                            settings)
    labels = np.load(tmp_path / "labels.npy")
    speakers = C.row_speakers(tmp_path / "embeddings")
    assert all(len({lab for lab, s in zip(labels, speakers, strict=True) if s == spk}) == 1 for spk in set(speakers))
    assert summary["level"] == "speaker" and summary["n_units"] == 5 and sum(summary["unit_sizes"]) == 5
    assert set(json.loads((tmp_path / "c.json").read_text())) >= {"level", "n_units", "nmi_etiology", "ari_etiology"}
    cluster_plot.run_plot(str(tmp_path / "embeddings"), str(tmp_path / "labels.npy"), str(tmp_path / "p.png"),
                          settings, str(tmp_path / "c.json"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
