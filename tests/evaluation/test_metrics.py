"""FID, IS, CLIP-Score and MS-SSIM wrappers against closed forms and direct library computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from arra_megatron.evaluation.metrics import (FeatureStats, clip_score_metric, frechet_distance, inception_score,
                                              ms_ssim_of_pairs, random_pairs)
from tests.evaluation.conftest import write_images

NET = {"name": "test-net", "weights": "/w", "sha256": "0"}


def _closed_form_fid(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), float64, principal square root by scipy."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _gaussian(seed: int, n: int, mean: np.ndarray, mix: np.ndarray) -> torch.Tensor:
    z = np.random.default_rng(seed).standard_normal((n, mix.shape[1]))
    return torch.from_numpy(mean + z @ mix.T).float()


def test_fid_matches_closed_form_on_gaussian_features():
    d = 8
    rng = np.random.default_rng(0)
    mix1, mix2 = rng.normal(size=(d, d)), rng.normal(size=(d, d)) * 0.7
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    x1, x2 = _gaussian(1, 20000, mu1, mix1), _gaussian(2, 20000, mu2, mix2)
    a, b = FeatureStats.from_features(x1, NET), FeatureStats.from_features(x2, NET)
    # The sample statistics are numpy's mean and (N-1)-normalised covariance of the features.
    x1d, x2d = x1.double().numpy(), x2.double().numpy()
    np.testing.assert_allclose(a.mu, x1d.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.sigma, np.cov(x1d, rowvar=False), rtol=1e-12)
    fid = frechet_distance(a, b)
    sample = _closed_form_fid(x1d.mean(0), np.cov(x1d, rowvar=False), x2d.mean(0), np.cov(x2d, rowvar=False))
    assert fid == pytest.approx(sample, rel=1e-6)
    population = _closed_form_fid(mu1, mix1 @ mix1.T, mu2, mix2 @ mix2.T)
    assert fid == pytest.approx(population, rel=0.05)  # 20k samples: a few per cent of sampling error at most
    assert population > 5  # the two distributions are far apart: the check above is not 0 == 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_agrees_with_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 6

        def forward(self, x):
            return x

    rng = np.random.default_rng(3)
    x1 = _gaussian(4, 500, np.zeros(6), rng.normal(size=(6, 6)))
    x2 = _gaussian(5, 400, np.ones(6), rng.normal(size=(6, 6)))
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(x1, real=True)
    metric.update(x2, real=False)
    ours = frechet_distance(FeatureStats.from_features(x2, NET), FeatureStats.from_features(x1, NET))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-4)


def test_statistics_file_round_trip_and_errors(tmp_path, caplog):
    stats = FeatureStats.from_features(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)), NET)
    stats.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.num_images, loaded.feature_net) == (50, NET)
    assert list(tmp_path.iterdir()) == [tmp_path / "ref.npz"]  # no temporary file left

    # An ADM / LlamaGen reference batch: mu and sigma (float64) among other arrays, no feature-net record.
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=stats.mu, sigma=stats.sigma,
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    adm = FeatureStats.load(tmp_path / "adm.npz")
    assert adm.feature_net == {} and adm.num_images == 0
    assert frechet_distance(stats, adm) == pytest.approx(0.0, abs=1e-9)
    assert "do not record their feature net" in caplog.text

    np.savez(tmp_path / "no_sigma.npz", mu=stats.mu)
    with pytest.raises(ValueError, match=r"needs arrays 'mu' and 'sigma', found \['mu'\]"):
        FeatureStats.load(tmp_path / "no_sigma.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        FeatureStats.load(tmp_path / "junk.npz")
    wider = FeatureStats.from_features(torch.randn(50, 5), NET)
    with pytest.raises(ValueError, match="5-d but the reference statistics are 4-d"):
        frechet_distance(wider, stats)
    other_net = FeatureStats(stats.mu, stats.sigma, 50, {"name": "xrv:densenet121"})
    with pytest.raises(ValueError, match="computed with 'xrv:densenet121'"):
        frechet_distance(stats, other_net)


def test_inception_score_known_values():
    assert inception_score(torch.zeros(20, 10), splits=2) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.0))
    # Confident and uniformly spread over 10 classes: IS = number of classes.
    one_hot = 50.0 * torch.eye(10).repeat(3, 1)
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(10.0, rel=1e-9)
    # Random logits, one split: exp(E_x KL(p(y|x) || p(y))) computed directly in float64.
    logits = torch.randn(64, 12, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits.double(), 1).numpy()
    direct = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1)))
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(direct, rel=1e-9) and std == 0.0
    assert 1.5 < direct < 12
    mean4, std4 = inception_score(logits, splits=4)
    assert 1 < mean4 < direct and std4 > 0  # smaller splits see fewer classes: a lower, spread score
    with pytest.raises(ValueError, match="needs at least 10 images"):
        inception_score(logits[:5])


def test_random_pairs_are_distinct_seeded_and_cover_the_set():
    pairs = random_pairs(7, 500, seed=1)
    assert pairs.shape == (500, 2) and (pairs[:, 0] != pairs[:, 1]).all()
    assert set(pairs.ravel()) == set(range(7))
    np.testing.assert_array_equal(pairs, random_pairs(7, 500, seed=1))
    assert not np.array_equal(pairs, random_pairs(7, 500, seed=2))
    with pytest.raises(ValueError, match="at least 2 usable images"):
        random_pairs(1, 3, seed=0)


def test_ms_ssim_identical_pairs_one_different_pairs_below(tmp_path):
    from PIL import Image
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    files = write_images(tmp_path / "gen", [0, 1, 2], prompts=False)
    cpu = torch.device("cpu")
    assert ms_ssim_of_pairs(files, np.array([[0, 0], [2, 2]]), 2, cpu, False) == pytest.approx(1.0, abs=1e-6)
    pairs = np.array([[0, 1], [1, 2], [2, 0]])
    value = ms_ssim_of_pairs(files, pairs, 2, cpu, False)  # two batches: the mean runs across them
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
                          for f in files])
    direct = multiscale_structural_similarity_index_measure(images[pairs[:, 0]], images[pairs[:, 1]], data_range=1.0)
    assert value == pytest.approx(float(direct), rel=1e-5)
    assert 0 < value < 0.9
    small = write_images(tmp_path / "small", [0, 1], side=64, prompts=False)
    with pytest.raises(ValueError, match=r"MS-SSIM on images of shape \(3, 64, 64\)"):
        ms_ssim_of_pairs(small, np.array([[0, 1]]), 2, cpu, False)


def test_clip_score_is_torchmetrics_definition_on_open_clip(clip_dir, tmp_path):
    import open_clip
    from PIL import Image

    files = write_images(tmp_path / "gen", [0, 1, 2, 3], prompts=False)
    prompts = ["a chest x-ray", "a red square", "two cats", "PA view chest X-ray image, no acute process"]
    images = [Image.open(f).convert("RGB") for f in files]
    metric = clip_score_metric(str(clip_dir), torch.device("cpu"))
    metric.update([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1) for i in images[:3]], prompts[:3])
    metric.update([torch.from_numpy(np.asarray(images[3]).copy()).permute(2, 0, 1)], prompts[3:])
    model, transform = open_clip.create_model_from_pretrained(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    with torch.no_grad():
        cos = F.cosine_similarity(model.eval().encode_image(torch.stack([transform(i) for i in images])),
                                  model.encode_text(tokenizer(prompts)))
    assert cos.abs().min() > 1e-3 and cos.std() > 1e-3  # a real spread of values, not all zero
    assert float(metric.score / metric.n_samples / 100) == pytest.approx(float(cos.mean()), abs=1e-5)
    assert float(metric.compute()) == pytest.approx(max(100 * float(cos.mean()), 0.0), abs=1e-3)


def test_streamed_moments_equal_torch_fidelitys_statistics_of_the_whole_set():
    """FID statistics accumulated batch by batch (O(D^2) memory) equal torch-fidelity's of all
    features at once, also with a large common offset (post-ReLU features)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from arra_megatron.evaluation.metrics import FeatureMoments

    gen = torch.Generator().manual_seed(0)
    features = 50.0 + torch.randn(1003, 24, generator=gen) * torch.linspace(0.01, 3.0, 24)
    moments = FeatureMoments()
    for batch in features.split(97):
        moments.update(batch)
    expected = fid_features_to_statistics(features.double())
    stats = FeatureStats.from_moments(moments, {"name": "x"})
    assert stats.num_images == 1003
    np.testing.assert_allclose(stats.mu, expected["mu"], rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, expected["sigma"], rtol=1e-9, atol=1e-12)
