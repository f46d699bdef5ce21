import json
import logging

import pytest
import torch

from megedit.errors import ConfigError, MeGError
from megedit.stages.generator import Generator, GeneratorConfig, train_generator
from megedit.stages.generator.diffusion import Diffusion, Schedule
from megedit.stages.generator.dit import DiT, DiTConfig

TINY_DIT = dict(patch=8, hidden=64, depth=2, heads=4)


def _pairs(n: int, length: int = 20, cond_dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.nn.functional.normalize(torch.randn(n, cond_dim, generator=g), dim=-1)
    return cond, 0.3 * torch.randn(n, length, generator=g) + 0.1


def test_schedule_is_the_specified_linear_one():
    d = Diffusion()
    assert d.schedule == Schedule(1000, 1e-4, 0.02)
    assert float(d.alpha_bar[0]) == pytest.approx(1 - 1e-4)
    betas = 1 - d.alpha_bar[1:] / d.alpha_bar[:-1]
    assert float(betas[-1]) == pytest.approx(0.02) and float(betas[499]) == pytest.approx(1e-4 + 500 * 0.0199 / 999)
    assert d.timesteps(50)[0] == 999 and d.timesteps(50)[-1] == 0 and len(d.timesteps(50)) == 50
    assert d.timesteps(1) == [999] and d.timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ConfigError, match="sampling steps"):
        d.timesteps(0)


def test_add_noise_v_target_and_x0_round_trip_exactly():
    d = Diffusion()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 30, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t, v = d.add_noise(x0, t, noise), d.v_target(x0, t, noise)
    assert torch.allclose(d.x0_from_v(x_t, t, v), x0, atol=1e-12, rtol=0)
    assert torch.allclose(d.eps_from_v(x_t, t, v), noise, atol=1e-12, rtol=0)


def _oracle(d: Diffusion, x0: torch.Tensor):
    """The perfect network for a known x0: x0 itself, F from x0 = c_skip x_t + c_out F, or v from
    x0 = a x_t - s v (written out here rather than taken from the class under test)."""
    def net(x_t, t, cond):
        a, s = d._coefficients(t, x_t)
        if d.prediction == "x0":
            return x0
        if d.prediction == "edm":
            norm = a * a * d.sigma_data ** 2 + s * s
            return (x0 - a * d.sigma_data ** 2 / norm * x_t) / (s * d.sigma_data / norm.sqrt())
        return (a * x_t - x0) / s
    return net


@pytest.mark.parametrize("prediction", ["v", "x0", "edm"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 1), ("ddim", 50), ("ancestral", 50), ("ancestral", 10)])
def test_sampling_with_a_perfect_prediction_reaches_x0(sampler, steps, prediction):
    d = Diffusion(prediction=prediction, sigma_data=0.3)
    x0 = torch.randn(4, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = d.sample(_oracle(d, x0), torch.zeros(4, 3, dtype=torch.float64), (4, 12), steps, sampler,
                   torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-9)


def test_the_training_target_follows_the_prediction_type():
    x0, cond = torch.randn(64, 10, dtype=torch.float64), torch.zeros(64, 3, dtype=torch.float64)
    for prediction in ("v", "x0", "edm"):
        d = Diffusion(prediction=prediction, sigma_data=0.3)
        loss = d.training_loss(_oracle(d, x0), x0, cond, torch.Generator().manual_seed(0))
        assert float(loss) < 1e-20
    wrong = Diffusion(prediction="x0").training_loss(_oracle(Diffusion(), x0), x0, cond, torch.Generator().manual_seed(0))
    assert float(wrong) > 0.1  # a v network scored against x0 targets is not right by accident
    # EDM's preconditioning with sigma_data 1 is v-prediction with the sign turned
    edm, v = Diffusion(prediction="edm", sigma_data=1.0), Diffusion()
    t, noise = torch.tensor([0, 7, 300, 999]), torch.randn(4, 10, dtype=torch.float64)
    assert torch.allclose(edm.target(x0[:4], t, noise), -v.target(x0[:4], t, noise), atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="prediction must be one of"):
        Diffusion(prediction="eps")


def test_dit_starts_as_zero_and_handles_padding():
    net = DiT(20, 16, DiTConfig(**TINY_DIT))
    assert net.tokens == 3  # 20 -> padded to 24 = 3 patches of 8
    cond, x = _pairs(5)
    out = net(x, torch.tensor([0, 10, 100, 500, 999]), cond)
    assert out.shape == (5, 20) and torch.count_nonzero(out) == 0  # adaLN-Zero and a zero output layer


def _fit(kind: str, steps: int, tmp_path=None, **extra) -> Generator:
    cond, vectors = _pairs(8)
    config = GeneratorConfig(kind=kind, dit=TINY_DIT, mlp=dict(hidden=128, depth=2, dropout=0.0), lr=2e-3,
                             batch_size=8, train_steps=steps, passes=None, validate_every=extra.pop("validate_every", steps),
                             ema_decay=0.99, validation_size=8, **extra)
    return train_generator(cond, vectors, config, work_dir=tmp_path, progress=False)


@pytest.mark.parametrize("prediction", ["edm", "v"])
def test_the_dit_overfits_eight_vectors(prediction):
    cond, vectors = _pairs(8)
    # each pair 16 times per batch: 16 noise draws per vector and step, so it converges in few steps
    config = GeneratorConfig(kind="dit", dit=dict(TINY_DIT, cond_dropout=0.0), lr=2e-3, batch_size=128, train_steps=600,
                             passes=None,
                             validate_every=200, ema_decay=0.9, validation_size=8, prediction=prediction)
    generator = train_generator(cond.repeat(16, 1), vectors.repeat(16, 1), config, progress=False)
    history = [h["rel_l2"] for h in generator.record["history"]]
    assert len(history) == 3 and history[-1] < history[0] and generator.record["best"]["rel_l2"] == min(history)
    for steps in (1, 50):  # one step is the more accurate here (see the README's denoising profile)
        out = generator.generate(cond, steps=steps)
        rel = ((out - vectors).norm(dim=1) / vectors.norm(dim=1)).mean()
        assert rel < 0.1, (steps, float(rel))  # predicting the mean vector instead would be ~1
        # each embedding gets its own vector: the nearest fitted vector of every output is its own
        assert torch.equal(torch.cdist(out, vectors).argmin(dim=1), torch.arange(8))


def test_the_mlp_generator_overfits_and_zero_augmentation_maps_unrelated_queries_to_zero():
    cond, vectors = _pairs(8)
    unrelated, _ = _pairs(8, seed=5)
    config = GeneratorConfig(kind="mlp", mlp=dict(hidden=128, depth=2, dropout=0.0), lr=2e-3, batch_size=16,
                             train_steps=600, passes=None, validate_every=600, ema_decay=0.9, zero_augment=1.0)
    generator = train_generator(cond, vectors, config, unrelated=unrelated, progress=False)
    assert generator.record["n_pairs"] == 16
    assert ((generator.generate(cond) - vectors).norm(dim=1) / vectors.norm(dim=1)).mean() < 0.05
    assert generator.generate(unrelated).norm(dim=1).mean() < 0.05 * vectors.norm(dim=1).mean()
    with pytest.raises(ConfigError, match="unrelated query embeddings"):
        train_generator(cond, vectors, config, progress=False)


def test_save_load_gives_the_same_vectors_and_a_corrupt_file_is_one_error(tmp_path):
    generator = _fit("dit", 30)
    cond, _ = _pairs(8)
    path = generator.save(tmp_path / "generator.safetensors")
    loaded = Generator.load(path)
    assert torch.equal(loaded.generate(cond, seed=3), generator.generate(cond, seed=3))
    assert not torch.equal(generator.generate(cond, seed=3), generator.generate(cond, seed=4))
    assert loaded.record["steps"] == 30
    # the file records every network field, not just the preset's name
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"]["dit"] == dict(DiTConfig(**TINY_DIT).to_dict(), cond_dropout=0.0, cond_token=True)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MeGError, match="generator.safetensors"):
        Generator.load(path)


def test_a_file_saved_before_prediction_types_were_recorded_loads_as_it_was_trained(tmp_path):
    cond, vectors = _pairs(4)
    then = GeneratorConfig(kind="dit", dit=dict(TINY_DIT, cond_dropout=0.2, cond_token=False), prediction="v", passes=None)
    generator = Generator.for_vectors(then, vectors, cond.shape[1])
    with torch.no_grad():
        for p in generator.net.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    path = generator.save(tmp_path / "old.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in ("prediction", "sigma_data")}
    meta["config"]["dit"] = TINY_DIT  # then: the preset's name and overrides only
    path.with_suffix(".json").write_text(json.dumps(meta))
    loaded = Generator.load(path)
    assert loaded.diffusion.prediction == "v" and loaded.net.config == generator.net.config
    assert torch.equal(loaded.generate(cond, seed=1), generator.generate(cond, seed=1))


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path):
    straight = _fit("dit", 40, validate_every=20)
    _fit("dit", 20, tmp_path, validate_every=20)  # stops after 20 steps, checkpoint written
    checkpoint = torch.load(tmp_path / "generator-train.pt", weights_only=True)
    checkpoint["history"][-1]["seconds"] = 1000.0  # as if the first session had taken 1,000 s
    torch.save(checkpoint, tmp_path / "generator-train.pt")
    resumed = _fit("dit", 40, tmp_path, validate_every=20)
    assert 1000 < resumed.record["history"][-1]["seconds"] <= resumed.record["seconds"] < 1500  # both sessions
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.record["history"] == [{**h, "seconds": r["seconds"]} for h, r in
                                         zip(straight.record["history"], resumed.record["history"])]


def test_an_unreadable_checkpoint_is_named_and_one_of_other_data_ignored(tmp_path, caplog):
    (tmp_path / "generator-train.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MeGError, match="generator-train.pt: not a readable generator checkpoint"):
        _fit("dit", 20, tmp_path, validate_every=20)
    torch.save({"key": "another run", "step": 10}, tmp_path / "generator-train.pt")
    with caplog.at_level(logging.WARNING):
        fitted = _fit("dit", 20, tmp_path, validate_every=20)
    assert "generator checkpoint of another run" in caplog.text and fitted.record["steps"] == 20


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="kind must be one of"):
        GeneratorConfig(kind="gan").validate()
    with pytest.raises(ConfigError, match="unknown network fields"):
        GeneratorConfig(dit={"width": 3}).validate()


def test_training_runs_data_parallel_under_accelerate_launch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).parent / "jobs" / "train_generator_ddp.py"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(job), str(tmp_path)]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    generator = Generator.load(tmp_path / "generator.safetensors")
    assert generator.record["processes"] == 2
    history = [h["rel_l2"] for h in generator.record["history"]]
    assert history[-1] < 0.5 * history[0]
    digests = {p.read_text() for p in tmp_path.glob("weights-*.sha256")}
    assert len(list(tmp_path.glob("weights-*.sha256"))) == 2 and len(digests) == 1  # the processes stayed in step
