import numpy as np
import pytest

from mobile_vla.errors import DataError, ModelError
from mobile_vla.policy.text import TOKEN_KEYS, build_tokenizer, load_tokenizer

INSTRUCTIONS = ["go to the red box avoiding the barrel on the left", "turn right and stop at the green ball"]


def test_encode_gives_fixed_length_int64_arrays(tiny_config, tiny_tokenizer):
    tokens = tiny_tokenizer.encode(["stop", INSTRUCTIONS[0]])
    L = tiny_config.token_length
    assert set(tokens) == set(TOKEN_KEYS)
    assert tokens["clip_input_ids"].shape == (2, 77)
    for key in TOKEN_KEYS[1:]:
        assert tokens[key].shape == (2, L), key
    assert all(value.dtype == np.int64 for value in tokens.values())
    # short instruction: padded with pad id and attention 0; long one uses more tokens
    assert tokens["kosmos_attention_mask"][0].sum() < tokens["kosmos_attention_mask"][1].sum()
    pad_id = tiny_tokenizer.processor.tokenizer.pad_token_id
    assert (tokens["kosmos_input_ids"][0][tokens["kosmos_attention_mask"][0] == 0] == pad_id).all()


def test_image_slots_match_latent_query_num(tiny_config, tiny_tokenizer):
    tokens = tiny_tokenizer.encode(INSTRUCTIONS)
    N = tiny_config.kosmos.latent_query_num
    position = tokens["kosmos_image_embeds_position_mask"]
    assert (position.sum(axis=1) == N).all()
    # <s> <image> then the N slots, as Kosmos2Processor lays them out
    assert (position[:, 2 : 2 + N] == 1).all() and (position[:, :2] == 0).all()
    names = tiny_tokenizer.processor.tokenizer.convert_ids_to_tokens(tokens["kosmos_input_ids"][0][:2].tolist())
    assert names == ["<s>", "<image>"]


def test_local_bpe_is_deterministic_and_covered_by_model_vocab(tiny_config):
    from mobile_vla.policy import text

    first = text._local_tokenizer_json()
    text._local_tokenizer_json.cache_clear()
    assert text._local_tokenizer_json() == first
    tokenizer = build_tokenizer(tiny_config)
    # the processor adds its 1,035 tag and patch-index tokens on top of the BPE
    assert tokenizer.kosmos_vocab_size > 1035
    assert tokenizer.kosmos_vocab_size <= tiny_config.kosmos.text_vocab_size


def test_vocab_too_small_for_processor_tokens_is_a_model_error(tiny_config, tiny_tokenizer):
    with pytest.raises(ModelError, match="text_vocab_size = 1000"):
        tiny_tokenizer.check_vocab(1000)


def test_save_load_round_trip_gives_identical_tokens(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    a = tiny_tokenizer.encode(INSTRUCTIONS + ["Café, 3 m left!"])
    b = loaded.encode(INSTRUCTIONS + ["Café, 3 m left!"])
    for key in TOKEN_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert loaded.token_length == tiny_tokenizer.token_length


def test_bad_instructions_raise_data_errors(tiny_tokenizer):
    with pytest.raises(DataError, match="has 40 Kosmos-2 tokens, more than max_instruction_tokens = 32"):
        tiny_tokenizer.encode([" ".join(["go"] * 40)])
    with pytest.raises(DataError, match="has 200 CLIP tokens, more than 75"):
        tiny_tokenizer.encode([" ".join(["go"] * 200)])
    with pytest.raises(DataError, match="non-empty"):
        tiny_tokenizer.encode(["   "])
    with pytest.raises(DataError, match="list of strings"):
        tiny_tokenizer.encode("go to the box")


def test_load_from_folder_without_tokenizer_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="text_tokenizer.json"):
        load_tokenizer(tmp_path)


def test_pretrained_processor_offline_is_a_clear_model_error(tmp_path, tiny_config):
    missing = str(tmp_path / "no-such-kosmos")
    config = tiny_config.replace(
        kosmos=tiny_config.kosmos.__class__(**{**tiny_config.kosmos.__dict__, "pretrained": missing})
    )
    with pytest.raises(ModelError, match="cannot load the pretrained Kosmos-2 processor .*pass a local folder"):
        build_tokenizer(config)


def test_tokenizer_pickles_as_its_files(tiny_tokenizer):
    import pickle

    copy = pickle.loads(pickle.dumps(tiny_tokenizer))
    a, b = tiny_tokenizer.encode(INSTRUCTIONS), copy.encode(INSTRUCTIONS)
    for key in TOKEN_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
