import pytest
from pydantic import Field

from mobile_vla.config import StrictModel, apply_overrides, flatten, load_config
from mobile_vla.errors import ConfigError


class Optim(StrictModel):
    lr: float = Field(1e-4, gt=0)
    betas: list[float] = [0.9, 0.999]


class Job(StrictModel):
    name: str = "run"
    optim: Optim = Optim()


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_with_dotted_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "name: a\noptim:\n  lr: 0.001\n"), Job, ["optim.lr=3e-4", "optim.betas=[0.8, 0.9]"]
    )
    assert cfg.name == "a" and cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == [0.8, 0.9]


def test_defaults_without_file():
    assert load_config(None, Job).optim.lr == pytest.approx(1e-4)


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: unknown key 'optim\.learning_rate'"):
        load_config(path, Job)


def test_bad_value_names_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.yaml: optim\.lr = 'fast'"):
        load_config(write(tmp_path, "optim:\n  lr: fast\n"), Job)
    with pytest.raises(ConfigError, match=r"optim\.lr = -1"):
        load_config(write(tmp_path, "{}"), Job, ["optim.lr=-1"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", Job)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"), Job)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
