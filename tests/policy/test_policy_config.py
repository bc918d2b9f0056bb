import pytest

from mobile_vla.errors import ConfigError
from mobile_vla.policy import ClipConfig, KosmosConfig, PolicyConfig, presets


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PolicyConfig(fusion="sum"), "PolicyConfig.fusion = 'sum'"),
        (lambda: PolicyConfig(window=0), "PolicyConfig.window = 0"),
        (lambda: PolicyConfig(dropout=1.5), "PolicyConfig.dropout = 1.5"),
        (lambda: PolicyConfig(log_var_min=3.0, log_var_max=2.0), "PolicyConfig.log_var_min = 3.0"),
        (lambda: KosmosConfig(text_width=100, text_heads=3), "PolicyConfig.kosmos.text_width = 100"),
        (lambda: KosmosConfig(patch_size=30), "PolicyConfig.kosmos.patch_size = 30"),
        (lambda: ClipConfig(vision_width=100, vision_head_width=64), "PolicyConfig.clip.vision_width = 100"),
        (lambda: PolicyConfig(kosmos=KosmosConfig(lora_rank=8)), "PolicyConfig.kosmos.lora_rank = 8"),
    ],
)
def test_invalid_values_name_field_and_value(build, message):
    with pytest.raises(ConfigError) as info:
        build()
    assert message in str(info.value)


def test_presets_are_frozen_and_round_trip_through_dict():
    for build in (presets.tiny, presets.small, presets.full):
        config = build()
        assert PolicyConfig.from_dict(config.to_dict()) == config
        with pytest.raises(AttributeError):
            config.window = 3  # frozen
    assert presets.full().kosmos.pretrained == "microsoft/kosmos-2-patch14-224"
    assert presets.full(pretrained=False).kosmos.pretrained is None
    assert presets.full(pretrained=False).clip.pretrained is None


def test_from_dict_rejects_unknown_keys():
    data = presets.tiny().to_dict()
    data["kosmos"]["lora_rnk"] = 4
    with pytest.raises(ConfigError, match="kosmos: unknown key.*'lora_rnk'"):
        PolicyConfig.from_dict(data)


def test_token_length_counts_image_slots_and_instruction_budget():
    config = presets.tiny()
    assert config.token_length == 3 + config.kosmos.latent_query_num + config.kosmos.max_instruction_tokens


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="'huge'"):
        presets.get_preset("huge")
