from pathlib import Path

import pytest

from mnistops.settings import ConfigError, Settings, load_settings, with_database_url
from mnistops.settings.sources import read_config_dir, reading

pytestmark = pytest.mark.unit


def write(config_dir: Path, text: str) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "stack.yml"
    path.write_text(text)
    return path


def test_defaults_without_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(tmp_path / "missing")
    assert settings.home == tmp_path / ".mnistops"
    assert settings.data_dir == tmp_path / "data"
    assert settings.bind == "127.0.0.1"
    assert (settings.mlflow.port, settings.prefect.port, settings.s3.port) == (5050, 4200, 8333)
    assert settings.mlflow_uri == "http://127.0.0.1:5050"
    assert settings.prefect_api_url == "http://127.0.0.1:4200/api"
    assert not (tmp_path / ".mnistops").exists(), "loading settings must create nothing"


def test_yaml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "mlflow:\n  port: 6001\n  workers: 2\ns3:\n  region: eu-west-1\n")
    monkeypatch.setenv("MNISTOPS_MLFLOW__PORT", "6002")
    settings = load_settings(tmp_path)
    assert settings.mlflow.port == 6002, "environment wins over the file"
    assert settings.mlflow.workers == 2, "the rest of the section still comes from the file"
    assert settings.s3.region == "eu-west-1"


def test_the_files_are_a_settings_source_below_arguments_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "home: state\nmlflow:\n  port: 6001\n  workers: 2\nexperiment_name: A\n")
    read = read_config_dir(tmp_path, root=tmp_path / "project")
    monkeypatch.setenv("MNISTOPS_MLFLOW__WORKERS", "3")
    with reading(read):
        settings = Settings(experiment_name="B")
    assert settings.experiment_name == "B", "an argument wins over the file"
    assert (settings.mlflow.port, settings.mlflow.workers) == (6001, 3), "env wins over file"
    assert settings.home == tmp_path / "project" / "state", "a relative path is the project's"
    assert settings.where("mlflow.port") == f"{tmp_path / 'stack.yml'}: key 'mlflow.port'"
    outside = Settings()
    assert outside.mlflow.port == 5050 and outside.home == Path(".mnistops"), (
        "built outside a reading, the settings are the defaults and the environment"
    )
    assert outside.config_dir is None and outside.notes == []


def test_a_project_with_its_own_state_dir_is_found_from_a_folder_below(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`home: mystate` in the project's stack.yml: a command run in a subfolder finds the
    project by its config/ and uses that state dir, not defaults of the subfolder."""
    write(tmp_path / "project" / "config", "home: mystate\nserve:\n  port: 13999\n")
    below = tmp_path / "project" / "src" / "deep"
    below.mkdir(parents=True)
    monkeypatch.chdir(below)
    monkeypatch.delenv("MNISTOPS_HOME", raising=False)
    monkeypatch.delenv("MNISTOPS_CONFIG_DIR", raising=False)
    settings = load_settings()
    assert settings.home == tmp_path / "project" / "mystate"
    assert settings.serve.port == 13999
    assert settings.config_dir == tmp_path / "project" / "config"


def test_config_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "elsewhere", "prefect:\n  port: 4300\n")
    monkeypatch.setenv("MNISTOPS_CONFIG_DIR", str(tmp_path / "elsewhere"))
    assert load_settings().prefect.port == 4300


def test_external_urls_are_used_as_given(tmp_path: Path) -> None:
    write(
        tmp_path,
        "s3:\n  endpoint_url: https://s3.example.org\n"
        "mlflow:\n  tracking_uri: https://mlflow.example.org\n"
        "prefect:\n  api_url: https://prefect.example.org/api\n",
    )
    settings = load_settings(tmp_path)
    assert settings.s3_endpoint == "https://s3.example.org"
    assert settings.mlflow_uri == "https://mlflow.example.org"
    assert settings.prefect_api_url == "https://prefect.example.org/api"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mlflow:\n  prot: 5050\n", ["stack.yml: key 'mlflow.prot'", "unknown key"]),
        ("mlflow:\n  port: fifty\n", ["stack.yml: key 'mlflow.port'", "valid integer"]),
        ("s3:\n  port: 70000\n", ["stack.yml: key 's3.port'", "between 1 and 65535"]),
        ("database_url: mysql://x\n", ["key 'database_url'", "postgresql://"]),
        ("mlflow: [\n", ["stack.yml: not valid YAML", "line"]),
        ("- just\n- a list\n", ["stack.yml: must be a mapping"]),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    for fragment in expected:
        assert fragment in str(info.value)


def test_bad_environment_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNISTOPS_PREFECT__PORT", "abc")
    with pytest.raises(ConfigError, match="environment variable MNISTOPS_PREFECT__PORT"):
        load_settings(tmp_path)


def test_database_url_override_is_validated(tmp_path: Path) -> None:
    settings = load_settings(tmp_path)
    assert with_database_url(settings, "postgresql://u:p@h:5432").database_url is not None
    with pytest.raises(ConfigError, match="--db"):
        with_database_url(settings, "sqlite:///x.db")


def write_flow(config_dir: Path, text: str) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "flow.yml"
    path.write_text(text)
    return path


def test_two_pools_by_default_and_the_deployment_on_the_cpu_one(tmp_path: Path) -> None:
    deployment = load_settings(tmp_path).deployment
    assert deployment.pools == {"mnist-cpu": "cpu", "mnist-gpu": "cuda"}
    assert (deployment.pool_name, deployment.device) == ("mnist-cpu", "cpu")


def test_the_pool_setting_moves_the_deployment_and_its_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNISTOPS_DEPLOYMENT__POOL_NAME", "mnist-gpu")
    deployment = load_settings(tmp_path).deployment
    assert (deployment.pool_name, deployment.device) == ("mnist-gpu", "cuda")


def test_pools_of_the_file_replace_the_default_ones(tmp_path: Path) -> None:
    write_flow(tmp_path, "deployment:\n  pools: {big-gpu: auto}\n  pool_name: big-gpu\n")
    deployment = load_settings(tmp_path).deployment
    assert deployment.pools == {"big-gpu": "auto"}
    assert deployment.device == "auto"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "deployment:\n  pool_name: nope\n",
            ["flow.yml: key 'deployment.pool_name'", "'nope'", "(mnist-cpu, mnist-gpu)"],
        ),
        (
            "deployment:\n  pools: {gpu-a: cuda}\n",
            ["flow.yml: key 'deployment.pool_name'", "'mnist-cpu'", "(gpu-a)"],
        ),
        (
            "deployment:\n  pools: {gpu-a: tpu}\n  pool_name: gpu-a\n",
            ["flow.yml: key 'deployment.pools.gpu-a'", "'auto', 'cpu' or 'cuda'"],
        ),
    ],
    ids=["pool-not-in-pools", "default-pool-not-in-own-pools", "bad-device"],
)
def test_a_bad_pool_names_the_key_and_the_pools(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    write_flow(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, message
    assert len(message.splitlines()) == 2, "one line per error, under the heading"


@pytest.mark.bad_input
def test_a_pool_from_the_environment_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNISTOPS_DEPLOYMENT__POOL_NAME", "gpu")
    with pytest.raises(ConfigError, match="environment variable MNISTOPS_DEPLOYMENT__POOL_NAME"):
        load_settings(tmp_path)


NOT_YAML = {
    "broken syntax": b"hyperparameter: [unclosed\n",
    "a list": b"- a\n- b\n",
    "binary": bytes(range(128, 256)) * 2,
}


def a_project(tmp_path: Path) -> Path:
    """A config dir like the repository's: every file, `model_registry` and
    `experiment_name` in flow.yml."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "stack.yml").write_text("mlflow:\n  port: 6001\n")
    (config_dir / "flow.yml").write_text(
        "experiment_name: mnist\nmodel_registry:\n  name: digits\n"
    )
    (config_dir / "hyp.yml").write_text("hyperparameter:\n  n_epochs: 2\n")
    (config_dir / "dataset.yml").write_text("dataset:\n  fast_fraction: 0.05\n")
    return config_dir


@pytest.mark.parametrize("content", NOT_YAML.values(), ids=list(NOT_YAML))
@pytest.mark.parametrize("name", ["hyp.yml", "dataset.yml", "flow.yml"])
def test_a_file_that_is_no_settings_at_all_is_set_aside_by_the_stack_commands(
    tmp_path: Path, name: str, content: bytes
) -> None:
    """Not only a bad value: a file that is not YAML, or not a mapping, stops only the
    commands that may need what it holds, and names itself in the one warning."""
    from mnistops.settings import STACK_KEYS, STATE_DIR_KEYS

    config_dir = a_project(tmp_path)
    (config_dir / name).write_bytes(content)
    for needs in (STATE_DIR_KEYS, STACK_KEYS):
        settings = load_settings(config_dir, needs)
        assert settings.mlflow.port == 6001, "stack.yml is still read"
        assert len(settings.set_aside) == 1 and name in settings.set_aside[0]
        assert "\n" not in settings.set_aside[0], "one warning line"
    serving = STACK_KEYS | {"model_registry", "experiment_name"}
    if name == "flow.yml":  # it holds what `models` reads
        with pytest.raises(ConfigError, match=name):
            load_settings(config_dir, serving)
    else:
        assert load_settings(config_dir, serving).model_registry.name == "digits"
    with pytest.raises(ConfigError, match=name):
        load_settings(config_dir)


def test_a_key_set_in_two_files_stops_only_the_commands_that_read_it(tmp_path: Path) -> None:
    from mnistops.settings import STACK_KEYS

    config_dir = a_project(tmp_path)
    with (config_dir / "hyp.yml").open("a") as hyp:
        hyp.write("experiment_name: other\n")
    settings = load_settings(config_dir, STACK_KEYS)
    assert "key 'experiment_name' is already set" in settings.set_aside[0]
    with pytest.raises(ConfigError, match="key 'experiment_name' is already set"):
        load_settings(config_dir, STACK_KEYS | {"experiment_name"})
    with pytest.raises(ConfigError, match="key 'experiment_name' is already set"):
        load_settings(config_dir)


@pytest.mark.parametrize("content", NOT_YAML.values(), ids=list(NOT_YAML))
def test_stack_down_finds_the_state_dir_of_a_stack_yml_that_is_no_yaml(
    tmp_path: Path, content: bytes
) -> None:
    """Only `stack down` reads past a broken stack.yml: from its `home:` line when it has
    one, else the default state dir; every other command refuses, naming the file."""
    from mnistops.settings import STACK_KEYS, STATE_DIR_KEYS

    config_dir = a_project(tmp_path)
    stack_yml = config_dir / "stack.yml"
    stack_yml.write_bytes(content)
    assert load_settings(config_dir, STATE_DIR_KEYS).home.name == ".mnistops"
    stack_yml.write_bytes(b"home: " + str(tmp_path / "state").encode() + b"  # ours\n" + content)
    down = load_settings(config_dir, STATE_DIR_KEYS)
    assert down.home == tmp_path / "state" and "stack.yml" in down.set_aside[0]
    for needs in (STACK_KEYS, None):
        with pytest.raises(ConfigError, match="stack.yml"):
            load_settings(config_dir, needs)


BAD_VARIABLES = {
    "a wrong value": ("MNISTOPS_HYPERPARAMETER__N_EPOCHS", "two"),
    "a section that is no JSON": ("MNISTOPS_DATASET", "{bad"),
    "a misspelled name": ("MNISTOPS_HYPERPARAMTER__N_EPOCHS", "3"),
}


@pytest.mark.parametrize(("variable", "value"), BAD_VARIABLES.values(), ids=list(BAD_VARIABLES))
def test_a_bad_variable_beside_the_stack_never_stops_its_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """The same as a typo in a file, set in the environment: the stack's commands (and
    `stack down` above all) read past it with one warning line naming the variable; the
    commands that read every key refuse, naming it."""
    from mnistops.settings import STACK_KEYS, STATE_DIR_KEYS

    config_dir = a_project(tmp_path)
    monkeypatch.setenv(variable, value)
    for needs in (STATE_DIR_KEYS, STACK_KEYS, STACK_KEYS | {"model_registry"}):
        settings = load_settings(config_dir, needs)
        assert settings.mlflow.port == 6001, "stack.yml is still read"
        assert len(settings.set_aside) == 1 and variable in settings.set_aside[0]
        assert "\n" not in settings.set_aside[0], "one warning line"
    with pytest.raises(ConfigError, match=variable):
        load_settings(config_dir)


def test_a_misspelled_variable_says_which_it_resembles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = a_project(tmp_path)
    monkeypatch.setenv("MNISTOPS_S3_PORT", "9000")
    with pytest.raises(ConfigError, match="did you mean MNISTOPS_S3__PORT"):
        load_settings(config_dir)
    monkeypatch.delenv("MNISTOPS_S3_PORT")
    monkeypatch.setenv("MNISTOPS_TEST_DATABASE_URL", "postgresql://x@127.0.0.1")
    monkeypatch.setenv("MNISTOPS_REQUIRE_BROWSER", "1")
    assert load_settings(config_dir).set_aside == [], "names of no key's shape pass"


def test_a_bad_variable_of_a_key_the_command_reads_still_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnistops.settings import STACK_KEYS

    config_dir = a_project(tmp_path)
    monkeypatch.setenv("MNISTOPS_S3", "{bad")
    with pytest.raises(ConfigError, match="environment variable MNISTOPS_S3 cannot be read"):
        load_settings(config_dir, STACK_KEYS)
    monkeypatch.setenv("MNISTOPS_S3", '{"port": "x"}')
    with pytest.raises(ConfigError, match="MNISTOPS_S3"):
        load_settings(config_dir, STACK_KEYS)


def test_an_unknown_stack_key_stops_the_stack_but_not_its_stop(tmp_path: Path) -> None:
    """`mlfow:` in stack.yml is a typo of a key `stack up` reads: refused, with the key it
    resembles; `stack down` (the state dir only) reads past it. `hyperparamter:` in hyp.yml
    resembles a key the stack does not read: set aside for the stack, refused by train."""
    from mnistops.settings import STACK_KEYS, STATE_DIR_KEYS

    config_dir = a_project(tmp_path)
    with (config_dir / "stack.yml").open("a") as stack_yml:
        stack_yml.write("mlfow:\n  port: 7001\n")
    with pytest.raises(ConfigError, match=r"key 'mlfow': unknown key \(did you mean 'mlflow'\?\)"):
        load_settings(config_dir, STACK_KEYS)
    assert "mlfow" in load_settings(config_dir, STATE_DIR_KEYS).set_aside[0]

    (tmp_path / "other").mkdir()
    config_dir = a_project(tmp_path / "other")
    with (config_dir / "stack.yml").open("a") as stack_yml:
        stack_yml.write("extra_thing: 1\n")
    with pytest.raises(ConfigError, match="key 'extra_thing': unknown key"):
        load_settings(config_dir, STACK_KEYS)

    (tmp_path / "third").mkdir()
    config_dir = a_project(tmp_path / "third")
    (config_dir / "hyp.yml").write_text("hyperparamter:\n  n_epochs: 3\n")
    assert "did you mean 'hyperparameter'" in load_settings(config_dir, STACK_KEYS).set_aside[0]
    with pytest.raises(ConfigError, match="hyperparamter"):
        load_settings(config_dir)


def test_a_config_path_that_is_no_regular_file_is_refused_not_skipped(tmp_path: Path) -> None:
    """A folder, a FIFO (reading it would wait forever) or a link to a device is no
    settings file: refused by the commands that read it, set aside by the others, never
    read as if absent."""
    import os

    from mnistops.settings import STACK_KEYS, STATE_DIR_KEYS

    config_dir = a_project(tmp_path)
    hyp = config_dir / "hyp.yml"
    hyp.unlink()
    for make in (hyp.mkdir, lambda: os.mkfifo(hyp), lambda: hyp.symlink_to("/dev/zero")):
        make()
        with pytest.raises(ConfigError, match="hyp.yml: not a regular file"):
            load_settings(config_dir)
        assert "not a regular file" in load_settings(config_dir, STACK_KEYS).set_aside[0]
        hyp.rmdir() if hyp.is_dir() and not hyp.is_symlink() else hyp.unlink()
    stack_yml = config_dir / "stack.yml"
    stack_yml.unlink()
    os.mkfifo(stack_yml)
    with pytest.raises(ConfigError, match="stack.yml: not a regular file"):
        load_settings(config_dir, STACK_KEYS)
    assert load_settings(config_dir, STATE_DIR_KEYS).home.name == ".mnistops"


def test_a_yaml_error_is_one_line(tmp_path: Path) -> None:
    write(tmp_path, "mlflow: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    assert "\n" not in str(info.value), str(info.value)
    assert "stack.yml: not valid YAML (line 2, column 1): while parsing" in str(info.value)


def test_a_misspelled_stack_variable_stops_the_stack_but_not_its_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MNISTOPS_MLFOW__PORT all but names a key `stack up` reads: refused there, as
    `mlfow:` in stack.yml is; `stack down` (the state dir only) names it and goes on."""
    from mnistops.settings import STACK_KEYS, STATE_DIR_KEYS

    config_dir = a_project(tmp_path)
    monkeypatch.setenv("MNISTOPS_MLFOW__PORT", "1")
    with pytest.raises(ConfigError, match="did you mean MNISTOPS_MLFLOW__PORT"):
        load_settings(config_dir, STACK_KEYS)
    assert "MNISTOPS_MLFOW__PORT" in load_settings(config_dir, STATE_DIR_KEYS).set_aside[0]


def test_a_misspelled_key_under_a_known_section_is_named_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnistops.settings import STACK_KEYS

    config_dir = a_project(tmp_path)
    monkeypatch.setenv("MNISTOPS_HYPERPARAMETER__N_EPOCH", "3")
    (warning,) = load_settings(config_dir, STACK_KEYS).set_aside
    assert warning.count("variable MNISTOPS_HYPERPARAMETER__N_EPOCH") == 1, warning
    assert "did you mean MNISTOPS_HYPERPARAMETER__N_EPOCHS" in warning
    with pytest.raises(ConfigError, match="did you mean MNISTOPS_HYPERPARAMETER__N_EPOCHS"):
        load_settings(config_dir)
