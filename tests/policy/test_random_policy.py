"""save_random_policy: the untrained model folder benchmarks, the smoke run and test fixtures save."""

from __future__ import annotations

import pytest
import torch

from mobile_vla.errors import ConfigError
from mobile_vla.policy import build_policy, load_policy, presets, save_random_policy
from mobile_vla.policy.random_policy import UNTRAINED_SCALING


def _same_weights(a, b, skip=()) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if k not in skip and not torch.equal(sa[k], sb[k])]


def test_the_saved_folder_is_the_seeded_build_with_the_untrained_scaling(tmp_path):
    returned = save_random_policy("tiny", tmp_path / "model", seed=3)
    loaded, preprocessing = load_policy(tmp_path / "model")
    torch.manual_seed(3)  # what the benchmarks built before: recorded results stay comparable
    expected = build_policy(presets.tiny(), load_pretrained=False)
    assert _same_weights(loaded, expected) == [] and _same_weights(returned, expected) == []
    assert not returned.training
    numbers = {key: getattr(preprocessing, key) for key in UNTRAINED_SCALING}
    assert numbers == {key: list(values) for key, values in UNTRAINED_SCALING.items()}
    config = presets.tiny()
    assert (preprocessing.state_dim, preprocessing.window, preprocessing.chunk) == (
        config.state_dim,
        config.window,
        config.chunk,
    )
    assert preprocessing.tokenize(["go to the red box"])  # the tokenizer is saved with it


def test_head_spread_and_scaling_overrides(tmp_path):
    config = presets.tiny().replace(freeze_clip=True)
    model = save_random_policy(config, tmp_path, head_std=0.2, scaling={"action_low": [-0.2, -0.4, -1.0]})
    torch.manual_seed(0)
    plain = build_policy(config, load_pretrained=False)
    head = model.head[-1].weight
    head_key = next(name for name, p in model.named_parameters() if p is head)
    assert _same_weights(model, plain) == [head_key]  # only the last head layer is redrawn
    assert 0.15 < float(head.detach().std()) < 0.25  # from N(0, 0.2)
    loaded, preprocessing = load_policy(tmp_path)
    assert preprocessing.action_low == [-0.2, -0.4, -1.0]  # replaced
    assert preprocessing.action_high == list(UNTRAINED_SCALING["action_high"])  # the rest kept
    assert loaded.config.freeze_clip  # a PolicyConfig is saved as given


def test_bad_preset_or_scaling_key_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="scaling key 'action_max'"):
        save_random_policy("tiny", tmp_path, scaling={"action_max": [1.0, 1.0, 1.0]})
    with pytest.raises(ConfigError, match="policy preset 'huge'"):
        save_random_policy("huge", tmp_path)
    assert not (tmp_path / "policy").exists()
