"""The measuring instruments: image similarity and the interleaved latency harness."""

import numpy as np
import pytest

from diffship.validation.e2e import compare_images, passes
from diffship.validation.latency import interleaved, peak_rss_bytes, rss_bytes, speedup, summarize


def test_identical_images_have_no_psnr_and_always_pass():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    metrics = compare_images(image, image.copy())
    assert metrics["identical"] and metrics["psnr_db"] is None and metrics["ssim"] == pytest.approx(1.0)
    assert passes(metrics, min_psnr=1000, min_ssim=1.0)


def test_psnr_ssim_and_max_difference_follow_the_size_of_the_error():
    rng = np.random.default_rng(1)
    image = rng.integers(20, 236, (64, 64, 3), dtype=np.uint8)
    one_pixel = image.copy()
    one_pixel[3, 4, 1] += 1
    noisy = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    small, large = compare_images(image, one_pixel), compare_images(image, noisy)
    assert small["max_abs_diff"] == 1 and small["psnr_db"] > 80
    assert 20 < large["psnr_db"] < 35 and large["ssim"] < small["ssim"] and large["max_abs_diff"] == 20
    assert passes(small, 40, 0.98) and not passes(large, 40, 0.98)


def test_images_smaller_than_the_ssim_window_are_still_compared():
    assert compare_images(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8))["max_abs_diff"] == 1


def test_interleaved_runs_take_turns_after_untimed_warmups():
    order = []
    times = interleaved({"baseline": lambda: order.append("b"), "target": lambda: order.append("t")}, warmup=2, runs=3)
    assert order == ["b", "t"] * 5
    assert [len(v) for v in times.values()] == [3, 3] and all(t >= 0 for v in times.values() for t in v)


def test_summary_percentiles_and_speedup():
    stats = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats["p50_s"] == 3.0 and stats["mean_s"] == 4.0 and stats["min_s"] == 1.0 and 4.0 < stats["p90_s"] < 10.0
    assert speedup({"p50_s": 6.0}, {"p50_s": 2.0}) == 3.0


def test_memory_readings_are_of_this_process():
    before = rss_bytes()
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
    assert rss_bytes() - before > 32 * 2**20
    assert peak_rss_bytes() > 64 * 2**20  # the kernel updates the high-water mark lazily: no byte-exact check
    del block
