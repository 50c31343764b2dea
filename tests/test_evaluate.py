"""Weighted kNN against a brute-force implementation, labelled folders, the knn command."""

import json

import numpy as np
import pytest

from simsiam_embed.errors import UserError
from simsiam_embed.inference.evaluate import knn_classify, labelled_folder

from conftest import assert_one_line_error_in_process, invoke, make_image_folder


def brute_force_knn(bank, bank_labels, queries, classes, k, temperature):
    predictions = []
    for query in queries:
        similarity = bank @ query
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(classes)
        for neighbour in nearest:
            votes[bank_labels[neighbour]] += np.exp(similarity[neighbour] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


@pytest.mark.parametrize("k, temperature", [(200, 0.1), (20, 0.07), (1, 0.5)])
def test_knn_agrees_with_brute_force(k, temperature):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16))
    bank_labels = rng.integers(0, 5, 400)
    bank = centres[bank_labels] + 1.5 * rng.standard_normal((400, 16))
    query_labels = rng.integers(0, 5, 100)
    queries = centres[query_labels] + 1.5 * rng.standard_normal((100, 16))
    bank = (bank / np.linalg.norm(bank, axis=1, keepdims=True)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    report = knn_classify(bank, bank_labels, queries, query_labels, [str(c) for c in range(5)], k, temperature)
    expected = brute_force_knn(bank, bank_labels, queries, 5, k, temperature)
    assert report.top1 == pytest.approx(float(np.mean(expected == query_labels)))
    assert 0.3 < report.top1 <= report.top5 <= 1.0
    assert set(report.per_class) == {str(c) for c in range(5)}


def test_test_classes_missing_from_the_bank_are_named():
    bank = np.eye(4, dtype=np.float32)[:2]
    report = knn_classify(bank, np.array([0, 1]), np.eye(4, dtype=np.float32)[:3], np.array([0, 1, 2]),
                          ["a", "b", "c"], k=2, temperature=0.1)
    assert report.classes_missing_from_bank == ["c"] and report.per_class["c"] == 0.0


def test_labelled_folders_need_class_subfolders(tmp_path):
    make_image_folder(tmp_path / "flat", per_class=1, classes=("disc",))
    (tmp_path / "flat" / "disc" / "disc-00.png").rename(tmp_path / "flat" / "loose.png")
    with pytest.raises(UserError, match="class subfolders"):
        labelled_folder(tmp_path / "flat")
    images = labelled_folder(make_image_folder(tmp_path / "ok", per_class=2))
    assert images.class_names == ["disc", "square", "triangle"] and images.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_knn_command_compares_trained_and_random_init(tmp_path):
    from conftest import FAST_TRAINING

    images = make_image_folder(tmp_path / "train", per_class=6)
    make_image_folder(tmp_path / "test", per_class=3, seed=1)
    assert invoke("pretrain", "train", "--epochs", "1", *FAST_TRAINING, cwd=tmp_path).exit_code == 0
    result = invoke("knn", "--train", "train", "--test", "test", "--compare-random-init", "--compare-raw-pixels",
                    "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert set(scores) == {"trained", "random init", "raw pixels"}
    for name in scores:
        assert [r["k"] for r in scores[name]["knn"]] == [18, 18]   # k capped at the bank size
        assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in scores[name]["knn"])
    assert images.is_dir()

    single = tmp_path / "single"
    make_image_folder(single, per_class=3, classes=("disc",))
    assert_one_line_error_in_process(invoke("knn", "--train", "single", "--test", "test", cwd=tmp_path), "single class")


def test_val_dir_monitor_logs_knn_and_says_whether_training_beat_random_init(tmp_path):
    from conftest import FAST_TRAINING

    make_image_folder(tmp_path / "train", per_class=6)
    make_image_folder(tmp_path / "val", per_class=4, seed=2)
    result = invoke("pretrain", "train", "--epochs", "2", "--val-dir", "val", *FAST_TRAINING, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "at random init:" in result.stderr
    verdict = result.stdout.strip().splitlines()[-1]
    assert "random" in verdict and ("paid off" in verdict or "NOT yet better" in verdict)
    lines = [json.loads(line) for line in (tmp_path / "runs" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= lines[0]["knn_top1_random_init"] <= 1
    epoch_ends = [line for line in lines if "epoch_end" in line]
    assert len(epoch_ends) == 2 and all(0 <= line["knn_top1"] <= 1 for line in epoch_ends)


def test_linear_probe_learns_a_separable_problem():
    from simsiam_embed.inference.evaluate import train_linear_probe

    rng = np.random.default_rng(0)
    directions = rng.standard_normal((4, 32))
    labels = rng.integers(0, 4, 400)
    features = directions[labels] * 3 + rng.standard_normal((400, 32))
    report = train_linear_probe(features[:300], labels[:300], features[300:], labels[300:], 4, epochs=20)
    assert report.train_top1 == 1.0 and report.top1 >= 0.97 and report.top5 == 1.0
    shuffled = rng.permutation(labels[:300])   # no signal: chance level on held-out data
    chance = train_linear_probe(features[:300], shuffled, features[300:], labels[300:], 4, epochs=20)
    assert chance.top1 < 0.5


def test_linear_probe_command(tmp_path):
    from conftest import FAST_TRAINING

    make_image_folder(tmp_path / "train", per_class=6)
    make_image_folder(tmp_path / "test", per_class=3, seed=1)
    assert invoke("pretrain", "train", "--epochs", "1", *FAST_TRAINING, cwd=tmp_path).exit_code == 0
    result = invoke("linear-probe", "--train", "train", "--test", "test", "--epochs", "5", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["test_count"] == 9 and report["train_count"] == 18 and 0 <= report["top1"] <= report["top5"] <= 1
    assert_one_line_error_in_process(invoke("linear-probe", "--train", "nowhere", "--test", "test", cwd=tmp_path), "not a folder")


def test_val_dir_must_have_two_classes(tmp_path):
    from conftest import FAST_TRAINING

    make_image_folder(tmp_path / "train", per_class=6)
    make_image_folder(tmp_path / "val", per_class=3, classes=("disc",))
    result = invoke("pretrain", "train", "--epochs", "1", "--val-dir", "val", *FAST_TRAINING, cwd=tmp_path)
    assert_one_line_error_in_process(result, "--val-dir", "single class")
    assert_one_line_error_in_process(invoke("pretrain", "train", "--val-dir", "nowhere", cwd=tmp_path), "nowhere")


def test_raw_pixels_score_an_images_pattern_whatever_its_brightness():
    """The floor is the pixels' correlation: the same picture brighter is the same picture."""
    from simsiam_embed.inference.embed import RawPixelEncoder, l2_normalize

    rng = np.random.default_rng(0)
    picture = rng.random((1, 3, 16, 16)).astype(np.float32)
    other = rng.random((1, 3, 16, 16)).astype(np.float32)
    encoder = RawPixelEncoder(16)
    a, brighter, b = (l2_normalize(encoder(x)) for x in (picture, picture + 0.3, other))
    assert (a @ brighter.T).item() > 0.9999 and (a @ b.T).item() < 0.5
