"""Image quality for `digits-sd`: does a generated image show the digit its prompt asked for?

A small MLP classifier (scikit-learn) is trained on the handwritten digits data set itself, in about a second and
deterministically (fixed split and seed), so nothing is downloaded or pickled. It gives two figures:
  prompt accuracy: the fraction of generated images classified as the prompt's digit;
  FD-digits: the Fréchet distance between the classifier's hidden features of generated and of real digits
  (FID's formula on a 64-feature digit classifier instead of Inception; comparable only within one run).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from diffship.models.digits import prompt_for, to_digit_pixels


@dataclass(frozen=True)
class DigitClassifier:
    """The fitted classifier, its held-out accuracy, and the real digits' feature statistics."""

    model: Any
    held_out_accuracy: float
    real_mean: np.ndarray
    real_cov: np.ndarray

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """The hidden layer's activations (ReLU) for (N, 64) digit pixels."""
        return _hidden(self.model, pixels)


def _hidden(model: Any, pixels: np.ndarray) -> np.ndarray:
    return np.maximum(pixels @ model.coefs_[0] + model.intercepts_[0], 0.0)


@lru_cache(maxsize=1)
def digit_classifier() -> DigitClassifier:
    """Train the digit classifier once per process (80/20 split, seed 0)."""
    from sklearn.datasets import load_digits  # start-up time: sklearn
    from sklearn.model_selection import train_test_split  # start-up time: sklearn
    from sklearn.neural_network import MLPClassifier  # start-up time: sklearn

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(data.data, data.target, test_size=0.2, random_state=0,
                                                        stratify=data.target)
    model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=0).fit(x_train, y_train)
    real = _hidden(model, data.data.astype(np.float64))
    return DigitClassifier(model, float(model.score(x_test, y_test)), real.mean(axis=0), np.cov(real, rowvar=False))


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(A + B - 2 sqrt(A B)), as FID computes it."""
    from scipy import linalg  # start-up time: scipy

    # ReLU features include dead units, so the covariances are singular; a small ridge keeps sqrtm stable.
    ridge = 1e-6 * np.eye(len(cov_a))
    root = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge)).real
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def score_digits(images: np.ndarray, digits: list[int]) -> dict[str, Any]:
    """Prompt accuracy and FD-digits of generated uint8 images (N, H, W, 3) that asked for `digits`."""
    classifier = digit_classifier()
    pixels = to_digit_pixels(images).astype(np.float64)
    predicted = classifier.model.predict(pixels)
    expected = np.asarray(digits)
    features = classifier.features(pixels)
    cov = np.cov(features, rowvar=False) if len(features) > 1 else np.zeros((64, 64))
    return {
        "prompt_accuracy": float((predicted == expected).mean()),
        "per_digit": {int(d): float((predicted[expected == d] == d).mean()) for d in sorted(set(digits))},
        "predicted": [int(p) for p in predicted],
        "fd_digits": frechet_distance(features.mean(axis=0), cov, classifier.real_mean, classifier.real_cov),
        "images": len(images),
        "classifier_held_out_accuracy": classifier.held_out_accuracy,
    }


def quality_task(folder: Path) -> str | None:
    """The quality check a model folder declares (`"quality": "digits"` in diffship_builtin.json), or None."""
    marker = folder / "diffship_builtin.json"
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8")).get("quality")


def digit_cases(seeds: list[int]) -> list[tuple[int, str, int]]:
    """(digit, prompt, seed) for every digit and seed: the fixed set prompt accuracy is measured on."""
    return [(d, prompt_for(d), seed) for seed in seeds for d in range(10)]


def measure(generate: Callable[[str, int], np.ndarray], seeds: list[int],
            say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate every digit case with `generate(prompt, seed) -> uint8 image` and score the images."""
    cases = digit_cases(seeds)
    images = []
    for i, (_, prompt, seed) in enumerate(cases, start=1):
        images.append(generate(prompt, seed))
        if say and (i % 10 == 0 or i == len(cases)):
            say(f"      quality: {i}/{len(cases)} images")
    scores = score_digits(np.stack(images), [d for d, _, _ in cases])
    return {**scores, "seeds": seeds, "prompts": [p for _, p, _ in cases[:10]]}


def judge(scores: dict[str, Any], baseline: dict[str, Any], max_drop_points: float,
          min_accuracy: float) -> dict[str, Any]:
    """An artifact's quality against the baseline's: it fails when prompt accuracy drops by more than the limit,
    or is under the floor."""
    drop = 100.0 * (baseline["prompt_accuracy"] - scores["prompt_accuracy"])
    return {**scores, "baseline_prompt_accuracy": baseline["prompt_accuracy"], "baseline_fd_digits": baseline["fd_digits"],
            "drop_points": drop, "max_drop_points": max_drop_points, "min_prompt_accuracy": min_accuracy,
            "passed": drop <= max_drop_points and scores["prompt_accuracy"] >= min_accuracy}
