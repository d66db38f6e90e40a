"""Bad input: a clear error naming the key and the allowed values, before any training starts."""
import subprocess

import pytest

from recbole_dealrec.quick_start import run_recbole
from recbole_dealrec.registry import ConfigError


def run(tmp_path, **config):
    config = {"checkpoint_dir": str(tmp_path), "output_dir": str(tmp_path), "epochs": 0, **config}
    return run_recbole(config.pop("model", "SASRec"), config.pop("dataset", None), config_dict=config)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sampler": "nope"}, r"unknown sampler 'nope'; known samplers: .*full.*random"),
        ({"model": "NoSuchModel"}, r"unknown model 'NoSuchModel'; known models: .*BERT4Rec.*SASRec"),
        ({"sampler": "random", "selection_ratio": 0}, r"selection_ratio must be a number in \(0, 1\], got 0"),
        ({"sampler": "random", "selection_ratio": 1.5}, r"selection_ratio must be a number in \(0, 1\], got 1.5"),
        ({"sampler": "random", "selection_num": 0}, r"selection_num must be an integer >= 1, got 0"),
        ({"sampler": "random", "selection_num": 944}, r"selection_num=944 is above the number of users .*\(943\)"),
        ({"sampler": "random", "selection_num": 10, "selection_ratio": 0.1}, r"either selection_ratio or selection_num"),
        ({"sampler": "random"}, r"needs a budget: set selection_num"),
        ({"sampler": "full", "selection_num": 10}, r"sampler 'full' keeps every user"),
    ],
)
def test_bad_config_values(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, **config)
    assert not list(tmp_path.glob("*.pth"))  # nothing was trained


def test_unknown_dataset_names_the_path_and_known_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.inter.*Known datasets: ml-100k \(embedded\).*games"):
        run(tmp_path, dataset="nope", data_path=str(tmp_path))


def test_missing_games_files_name_the_path_and_the_importer(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/games/games\.inter \(import it first"):
        run(tmp_path, dataset="games", data_path=str(tmp_path))


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        ["run_recbole", "--model=SASRec", "--sampler=random", "--selection_ratio=2", f"--output_dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "run_recbole: error: selection_ratio must be a number in (0, 1], got 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_code_payload_in_a_property_file_or_on_the_command_line_stays_a_string(tmp_path):
    from recbole_dealrec.config import DealrecConfig

    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    yaml_file = tmp_path / "hostile.yaml"
    yaml_file.write_text(f'report_plots: "{payload}"\n')
    config = DealrecConfig("SASRec", None, [str(yaml_file)], {"sampler": payload},
                           argv=[f"--selection_seed={payload}", "--epochs=3", "--topk=[5, 10]", "--report_plots=false"])
    assert config["sampler"] == payload and config["selection_seed"] == payload
    assert config["epochs"] == 3 and config["topk"] == [5, 10] and config["report_plots"] is False
    # The surrogate's config re-reads the run's file config as a config dict: still no code runs.
    from recbole_dealrec.surrogate import surrogate_config

    file_only = DealrecConfig("SASRec", None, [str(yaml_file)])
    assert surrogate_config(file_only)["report_plots"] == payload
    assert not marker.exists()
    # The payload is live: RecBole's own conversion runs it.
    from recbole.config import Config

    Config._convert_config_dict(None, {"sampler": payload})
    assert marker.exists()
