import math

import pytest
import torch

from megedit.errors import ConfigError, MeGError
from megedit.plots import router_histogram
from megedit.stages.router import Router, RouterConfig, choose_epsilon, epsilon_curve, route_stats, train_router
from megedit.stages.router_entropy import FamiliarityNet, train_familiarity_net


def _unit(n: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


FAST = dict(kind="entropy", max_epochs=300, batch_size=64, fit_entropy=0.02)  # 64-d random points: memorised in ~130 epochs


def test_net_shape_and_entropy_bounds():
    config = RouterConfig(classes=10, blocks=5)
    net = FamiliarityNet(64, config)
    assert len(net.blocks) == 5 and net.head.out_features == 10 and net.blocks[0][0].out_features == 256
    h = net.entropy(_unit(7))
    assert h.shape == (7,) and bool((h >= 0).all()) and bool((h <= math.log(10) + 1e-5).all())
    torch.nn.init.zeros_(net.head.weight), torch.nn.init.zeros_(net.head.bias)
    assert torch.allclose(net.entropy(_unit(3)), torch.full((3,), math.log(10)))  # uniform: ln K


def test_the_net_memorises_random_labels_and_is_unsure_elsewhere():
    edits = _unit(200)
    net, record = train_familiarity_net(edits, RouterConfig(**FAST), progress=False)
    assert record["train_accuracy"] == 100.0 and record["train_mean_entropy"] < 0.02
    near = torch.nn.functional.normalize(edits + 0.05 * _unit(200, seed=1), dim=-1)
    assert float(net.entropy(near).median()) < 0.1
    assert float(net.entropy(_unit(200, seed=2)).median()) > float(net.entropy(near).median()) * 5
    again, _ = train_familiarity_net(edits, RouterConfig(**FAST), progress=False)
    assert torch.equal(again.entropy(edits), net.entropy(edits))  # seeded: the same net


def test_epsilon_curve_and_choice():
    familiar, unrelated = torch.tensor([0.01, 0.02, 0.3, 1.5]), torch.tensor([0.2, 1.0, 2.0, 2.2])
    curve = epsilon_curve(familiar, unrelated, max_distance=math.log(10), points=230)
    at = min(curve, key=lambda r: abs(r["epsilon"] - 0.1))
    assert at["recall"] == 50.0 and at["false_fire"] == 0.0
    best = choose_epsilon(curve)  # recall - false fire is 50 from eps 0.03 to 0.2, and 75 - 25 = 50 after: first wins
    assert best["recall"] - best["false_fire"] == 50.0 and best["epsilon"] <= 0.21
    assert choose_epsilon(curve, max_false_fire=25.0) == best  # a ceiling above the balanced row leaves it
    skewed = [{"epsilon": 0.1, "recall": 40.0, "false_fire": 5.0}, {"epsilon": 0.2, "recall": 60.0, "false_fire": 15.0},
              {"epsilon": 0.3, "recall": 95.0, "false_fire": 30.0}]  # balanced: 0.3 (65), over a 20% ceiling
    assert choose_epsilon(skewed)["epsilon"] == 0.3 and choose_epsilon(skewed, max_false_fire=20.0)["epsilon"] == 0.2
    assert choose_epsilon(curve, max_false_fire=-1) == curve[0]
    # a weight on false fire moves the choice: 3x favours 0.1 (40 - 15), a quarter favours 0.3 (95 - 7.5)
    assert choose_epsilon(skewed, false_fire_weight=3.0)["epsilon"] == 0.1
    assert choose_epsilon(skewed, false_fire_weight=0.25)["epsilon"] == 0.3
    with pytest.raises(ConfigError, match="false_fire_weight"):
        RouterConfig(false_fire_weight=0.0).validate()


def test_train_router_calibrates_on_the_pool_and_round_trips(tmp_path):
    edits, pool = _unit(150, seed=3), _unit(60, seed=4)
    paraphrases = torch.nn.functional.normalize(pool + 0.05 * _unit(60, seed=5), dim=-1)
    router = train_router(edits, RouterConfig(**FAST, max_false_fire=None),  # random points: false fire ~50%
                          calibration=(pool, paraphrases, _unit(100, seed=6)), progress=False)
    calibration = router.record["calibration"]
    chosen = calibration["chosen"]
    assert router.epsilon == chosen["epsilon"]
    assert chosen["recall"] - chosen["false_fire"] == max(r["recall"] - r["false_fire"] for r in calibration["curve"])
    # Random 64-d points are no real embedding space: a random-label classifier is confident on
    # about half of them too (measured: recall 95%, false fire 50%). What must hold is that the
    # rates chosen on the pool carry over to fresh draws of the same kinds of query.
    near_edits = torch.nn.functional.normalize(edits + 0.05 * _unit(150, seed=7), dim=-1)
    stats = route_stats(router, {"near": near_edits, "far": _unit(150, seed=8)})
    assert chosen["recall"] >= 80 and stats["near"]["familiar"] >= 80
    assert abs(stats["near"]["familiar"] - chosen["recall"]) <= 10
    assert abs(stats["far"]["familiar"] - chosen["false_fire"]) <= 15
    assert stats["far"]["distance_median"] > 10 * stats["near"]["distance_median"]
    path = router.save(tmp_path / "router.safetensors")
    loaded = Router.load(path)
    assert torch.equal(loaded.distance(near_edits), router.distance(near_edits)) and loaded.epsilon == router.epsilon
    png = router_histogram({"near": router.distance(near_edits).tolist()}, router.epsilon, math.log(10), "entropy",
                           tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_manual_epsilon_and_config_errors():
    router = train_router(_unit(20), RouterConfig(kind="entropy", epsilon=0.5, max_epochs=5), progress=False)
    assert router.epsilon == 0.5 and router.record["calibration"]["manual"]
    with pytest.raises(ConfigError, match="calibration set"):
        train_router(_unit(20), RouterConfig(max_epochs=5), progress=False)
    with pytest.raises(ConfigError, match="epsilon must be in"):
        RouterConfig(kind="entropy", epsilon=3.0).validate()
    with pytest.raises(ConfigError, match="kind must be one of"):
        RouterConfig(kind="knn").validate()
    with pytest.raises(ConfigError, match="classes must be >= 2, found 1"):
        RouterConfig(classes=1).validate()


def test_nearest_router_is_cosine_distance_and_calibrates(tmp_path):
    edits = _unit(100, seed=10)
    pool = _unit(40, seed=11)
    paraphrase = lambda x, seed: torch.nn.functional.normalize(x + 0.3 * _unit(len(x), seed=seed), dim=-1)
    router = train_router(edits, RouterConfig(), calibration=(pool, paraphrase(pool, 12), _unit(200, seed=13)),
                          progress=False)
    assert router.config.kind == "nearest" and router.net is None
    queries = paraphrase(edits[:5], 14)
    expected = 1 - (queries @ edits.T).max(dim=1).values
    assert torch.allclose(router.distance(3 * queries), expected, atol=1e-6)  # scale-free: cosine
    assert torch.allclose(router.distance(edits), torch.zeros(100), atol=1e-6)
    # 64-d: a paraphrase (noise 0.3) is at distance ~0.04, a random point at ~0.6
    chosen = router.record["calibration"]["chosen"]
    assert chosen["recall"] == 100.0 and chosen["false_fire"] == 0.0 and 0.04 < router.epsilon < 0.6
    stats = route_stats(router, {"near": paraphrase(edits, 15), "far": _unit(300, seed=16)})
    assert stats["near"]["familiar"] == 100.0 and stats["far"]["familiar"] == 0.0
    loaded = Router.load(router.save(tmp_path / "nearest.safetensors"))
    assert torch.equal(loaded.bank, router.bank) and loaded.epsilon == router.epsilon and loaded.net is None


def test_a_corrupt_router_file_is_one_clear_error(tmp_path):
    router = train_router(_unit(10), RouterConfig(epsilon=0.2), progress=False)
    path = router.save(tmp_path / "r.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(MeGError, match="r.safetensors"):
        Router.load(path)


def test_separation_auroc():
    from megedit.stages.router import separation_auroc

    assert separation_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert separation_auroc(torch.tensor([0.5, 0.6]), torch.tensor([0.3, 0.4])) == 0.0
    assert separation_auroc(torch.tensor([0.1, 0.5]), torch.tensor([0.3, 0.5])) == 0.625  # (1 + 1 + 0 + 0.5) / 4


def test_the_calibration_mirror_can_hold_every_wording_as_the_deployed_router_does():
    edits, pool, unrelated = _unit(100, seed=20), _unit(40, seed=21), _unit(200, seed=22)
    paraphrase = lambda x, seed: torch.nn.functional.normalize(x + 0.3 * _unit(len(x), seed=seed), dim=-1)
    calibration = (pool, paraphrase(pool, 23), unrelated)
    # the edits' other wordings sit right by the unrelated queries: a mirror of prompts alone never sees that
    wordings = (paraphrase(unrelated[:100], 24), list(range(100)))
    alone = train_router(edits, RouterConfig(), calibration=calibration, progress=False)
    mirrored = train_router(edits, RouterConfig(calibration_wordings=True), calibration=calibration,
                            mirror_wordings=wordings, progress=False)
    assert alone.record["calibration"]["chosen"]["false_fire"] == 0.0
    assert mirrored.epsilon < alone.epsilon and mirrored.wordings is None  # the mirror's wordings stay in the mirror


def test_negatives_that_a_joining_edit_sits_nearest_go_and_the_kept_reach_saves_recomputing_it():
    bank, wordings, negatives, new = _unit(50, seed=20), _unit(30, seed=21), _unit(400, seed=22), _unit(2, seed=23)
    near_new = torch.nn.functional.normalize(new + 0.05 * _unit(2, seed=24), dim=-1)  # nearest the joining edits
    router = Router(RouterConfig(), 0.3, bank=bank, negatives=torch.cat([negatives, near_new]))
    router = router.with_wordings(wordings, [i % 50 for i in range(30)])

    def grown(start):
        joined = start.with_edits(list(range(50)), new[:1]).with_wordings(new[1:], [50])  # edit 50: two keys
        return joined.with_negatives(_unit(5, seed=25), serve=[50])

    cold = grown(router)
    router._reach()  # what an earlier add leaves known
    warm = grown(router)
    keys = torch.cat([bank, new[:1], wordings, new[1:]])
    owners = torch.tensor([*range(51), *(i % 50 for i in range(30)), 50])
    old_kept = owners[(torch.cat([negatives, near_new]) @ keys.T).argmax(dim=1)] != 50
    assert not old_kept[-2:].any() and old_kept.sum() >= 390  # the two planted negatives go, (nearly) all others stay
    for joined in (cold, warm):
        assert torch.equal(joined.negatives[: int(old_kept.sum())], torch.cat([negatives, near_new])[old_kept])
    assert torch.equal(warm.negatives, cold.negatives) and torch.equal(warm.negative_margins, cold.negative_margins)
    torch.testing.assert_close(warm.negative_reach, (warm.negatives @ keys.T).max(dim=1).values)
