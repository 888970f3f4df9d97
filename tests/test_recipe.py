"""Unit tests of hivecli.recipe: the shipped recipes, layering, error messages, TOML round trips, the schema."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hivecli._exceptions import ConfigError
from hivecli.recipe import SECTIONS, Recipe, dumps_toml, is_user_code, json_schema, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def config_error(path, overrides=None, env=None) -> str:
    """The message of the ConfigError that load_recipe raises (checked to be a ValueError on one line)."""
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides, env={} if env is None else env)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- the shipped recipes ----------------------------------------------------------------------------


def test_default_recipe_loads():
    r = load_recipe(RECIPES / "default.toml", env={})
    assert r.run.prefix == "digits-demo"
    assert (r.model.name, r.data.name, r.data.image_size, r.data.channels) == ("quickstart-cnn", "digits", 32, 3)
    assert (r.data.batch_size, r.optimizer.name, r.optimizer.lr) == (16, "sgd", 0.02)
    assert (r.averaging.target_group_size, r.averaging.request_timeout) == (4, 1.0)
    assert r.limits.max_steps == 200
    assert r.user_code() == []


def test_quickstart_cifar10_recipe_loads():
    r = load_recipe(RECIPES / "quickstart-cifar10.toml", env={})
    assert (r.run.prefix, r.data.name, r.data.batch_size) == ("my_cifar_run", "cifar10", 256)
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.momentum) == ("sgd", 0.001, 0.9)
    assert r.averaging.target_group_size == 16
    assert r.averaging.average_parameters and not r.averaging.average_gradients
    assert (r.limits.max_epochs, r.limits.max_steps) == (10, None)
    assert r.output.eval_every_steps == 500


# ---- layering: defaults < file (or data) < env < overrides --------------------------------------------


def test_no_path_gives_the_defaults():
    assert load_recipe(None, env={}) == Recipe()
    assert load_recipe(None, env={}).data.name == "digits"
    assert load_recipe(None, env={}).averaging.target_group_size == 16


def test_layers_in_order(tmp_path):
    path = write(tmp_path, "[limits]\nmax_steps = 5\n[averaging]\ncompression = 'uniform8bit'\n[data]\nbatch_size = 8")
    assert load_recipe(path, env={}).limits.max_steps == 5
    env = {"HIVE_LIMITS_MAX_STEPS": "7", "HIVE_AVERAGING_COMPRESSION": "fp16"}
    r = load_recipe(path, env=env)
    assert (r.limits.max_steps, r.averaging.compression, r.data.batch_size) == (7, "fp16", 8)
    r = load_recipe(path, ["limits.max_steps=9"], env=env)
    assert (r.limits.max_steps, r.averaging.compression, r.data.batch_size) == (9, "fp16", 8)
    assert r.optimizer.lr == 0.05  # untouched fields keep their defaults


def test_overrides_parse_toml_values_or_bare_strings():
    r = load_recipe(None, ["network.initial_peers=['/ip4/1.2.3.4/tcp/5']", "run.prefix=abc", "data.image_size = 16"])
    assert r.network.initial_peers == ["/ip4/1.2.3.4/tcp/5"]
    assert (r.run.prefix, r.data.image_size) == ("abc", 16)


def test_unrelated_env_vars_are_ignored():
    env = {"HIVE_INITIAL_PEERS": "x", "HIVE_DEBUG": "1", "PATH": "/bin", "HIVE_NETWORK_PORT": "1234"}
    r = load_recipe(None, env=env)
    assert r.network.port == 1234
    assert r.network.initial_peers == []
    assert r.to_dict() == Recipe(network={"port": 1234}).to_dict()


def test_data_dict_is_used_when_there_is_no_path():
    data = {"limits": {"max_steps": 3}, "optimizer": {"betas": [0.8, 0.9]}}
    r = load_recipe(None, ["averaging.every_steps=2"], env={"HIVE_LIMITS_MAX_STEPS": "4"}, data=data)
    assert (r.limits.max_steps, r.optimizer.betas, r.averaging.every_steps) == (4, (0.8, 0.9), 2)
    assert data == {"limits": {"max_steps": 3}, "optimizer": {"betas": [0.8, 0.9]}}  # not mutated
    with pytest.raises(ConfigError, match="unknown section"):
        load_recipe(None, env={}, data={"nope": {}})


# ---- error messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[averaging]\ntarget_group_size = 0\n", "averaging.target_group_size = 0: must be >= 2"),
        (
            "[averaging]\ntarget_grop_size = 4\n",
            "unknown key averaging.target_grop_size (did you mean 'target_group_size'?); [averaging] takes: ",
        ),
        ("[averagin]\n", "unknown section [averagin] (did you mean 'averaging'?)"),
        ('[optimizer]\nname = "rmsprop"\n', "optimizer.name = \"rmsprop\": must be 'sgd', 'adam' or 'adamw'"),
        (
            "[averaging]\nmin_group_size = 8\ntarget_group_size = 4\n",
            "averaging: min_group_size = 8 is larger than target_group_size = 4; lower min_group_size",
        ),
        (
            "[averaging]\nrequest_timeout = 5.0\n",
            "averaging: request_timeout = 5.0 must be less than min_matchmaking_time = 5.0",
        ),
        ('[run]\nprefix = "my run"\n', 'run.prefix = "my run": must be 1-64 letters, digits'),
        ("[data]\nchannels = 2\n", "data.channels = 2: must be 1 or 3"),
        ("run = 3\n", "run must be a table ([run]), not 3"),
        ("[optimizer]\nlr = 0\n", "optimizer.lr = 0: must be > 0"),
        ("[network]\nport = 70000\n", "network.port = 70000: must be <= 65535"),
        ("[run\nprefix = 1\n", "not valid TOML: "),
    ],
)
def test_file_errors_name_the_file_and_the_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_two_problems_are_counted():
    message = config_error(None, ["optimizer.lr=0", "data.batch_size=0"])
    assert message.startswith("recipe: ")
    assert message.endswith("(and 1 more problems)")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    assert config_error(path) == f"{path}: no such recipe file; see `hive recipe check --help` or the recipes/ folder"


def test_env_and_override_values_are_validated(tmp_path):
    path = write(tmp_path, "")
    from_env = config_error(path, env={"HIVE_LIMITS_MAX_STEPS": "0"})
    assert (
        f"{path}: limits.max_steps = 0 (from the environment variable HIVE_LIMITS_MAX_STEPS): must be >= 1" == from_env
    )
    from_flag = config_error(path, ["limits.max_steps=0"])
    assert from_flag == f"{path}: limits.max_steps = 0 (from the command line): must be >= 1"
    assert "unknown key limits.max_step (did you mean 'max_steps'?)" in config_error(path, ["limits.max_step=3"])
    assert "unknown section [limit] (did you mean 'limits'?)" in config_error(path, ["limit.max_steps=3"])
    assert 'compression = "fp8" (from the environment variable HIVE_AVERAGING_COMPRESSION): must be' in config_error(
        path, env={"HIVE_AVERAGING_COMPRESSION": "fp8"}
    )


@pytest.mark.parametrize("item", ["limits.max_steps", "limits=5", "limits.=5", "=5"])
def test_malformed_set_item(item):
    message = config_error(None, [item])
    assert message.startswith(f"--set {item!r}: write SECTION.KEY=VALUE")


def test_a_toml_date_where_a_string_belongs_is_a_config_error(tmp_path):
    # An unquoted date (`prefix = 2024-05-01`) must be reported like any other bad value, not crash with a TypeError.
    message = config_error(write(tmp_path, "[run]\nprefix = 2024-05-01\n"))
    assert "run.prefix" in message and "must be a valid string" in message


# ---- writing TOML, the schema, user code -------------------------------------------------------------------


def test_to_toml_round_trips(tmp_path):
    recipe = load_recipe(
        None,
        [
            "optimizer.betas=[0.5, 0.75]",
            "optimizer.lr=1e-5",
            "averaging.average_opt_statistics=['exp_avg_sq']",
            "network.announce=['/ip4/1.2.3.4/tcp/5', '/dns/a\"b/tcp/6']",
            "output.dir='C:\\runs'",
            "data.image_size=16",
            "limits.max_seconds=2.5",
        ],
        env={},
    )
    text = recipe.to_toml()
    assert "max_steps" not in text and "identity" not in text and "channels" not in text  # None is left out
    assert "betas = [0.5, 0.75]" in text
    loaded = load_recipe(write(tmp_path, text), env={})
    assert loaded.to_dict() == recipe.to_dict()
    assert loaded == recipe
    assert loaded.optimizer.betas == (0.5, 0.75)
    assert load_recipe(write(tmp_path, Recipe().to_toml()), env={}) == Recipe()


def test_to_toml_round_trips_any_unicode_string(tmp_path):
    recipe = load_recipe(None, ["output.dir='runs-é-😀'"], env={})
    assert load_recipe(write(tmp_path, recipe.to_toml()), env={}).output.dir == "runs-é-😀"


def test_dumps_toml_writes_plain_values():
    text = dumps_toml({"a": {"t": True, "f": False, "i": 3, "s": "x", "n": None, "l": [1, "y"]}})
    assert text == '[a]\nt = true\nf = false\ni = 3\ns = "x"\nl = [1, "y"]\n'
    with pytest.raises(TypeError):
        dumps_toml({"a": {"d": {"nested": 1}}})


def test_json_schema_has_every_section():
    schema = json_schema()
    assert list(schema["properties"]) == SECTIONS
    assert set(SECTIONS) == {"run", "model", "data", "optimizer", "averaging", "limits", "output", "network"}
    assert json.loads(json.dumps(schema)) == schema
    assert "target_group_size" in json.dumps(schema)


def test_user_code_detection():
    recipe = load_recipe(None, ['model.name = "mypkg.models:build"'], env={})
    assert recipe.user_code() == ["mypkg.models:build"]
    both = load_recipe(None, ["model.name=a:b", "data.name=pkg.data:load_it"], env={})
    assert both.user_code() == ["a:b", "pkg.data:load_it"]
    for name in ("quickstart-cnn", "mlp", "resnet-small", "digits", "cifar10", "imagefolder", "a:", ":f", "a:b.c"):
        assert not is_user_code(name), name


def test_importing_recipe_does_not_import_torch():
    code = "import sys, hivecli.recipe; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_model_and_dataset_names_are_checked_before_anything_runs():
    with pytest.raises(
        ConfigError, match=r"model\.name = \"resnet\" \(from the command line\): did you mean 'resnet-small'\?"
    ):
        load_recipe(None, ['model.name="resnet"'], env={})
    with pytest.raises(
        ConfigError, match=r"data\.name = \"cifar\" \(from the command line\): did you mean 'cifar10'\?"
    ):
        load_recipe(None, ['data.name="cifar"'], env={})
    assert load_recipe(None, ['model.name="pkg.mod:build"'], env={}).model.name == "pkg.mod:build"


def test_registry_builds_exactly_the_names_recipes_accept():
    from hivecli import recipe, registry

    assert tuple(registry.MODELS) == recipe.MODEL_NAMES


def test_out_of_range_betas_and_seeds_are_config_errors():
    with pytest.raises(
        ConfigError,
        match=r"optimizer\.betas = \[1\.0, 0\.999\] \(from the command line\): both betas must be in \[0, 1\)",
    ):
        load_recipe(None, ["optimizer.betas=[1.0, 0.999]"], env={})
    with pytest.raises(ConfigError, match=r"run\.seed"):
        load_recipe(None, ["run.seed=99999999999999999999999"], env={})


def test_a_numeric_prefix_from_the_command_line_is_text():
    assert load_recipe(None, ["run.prefix=2024"], env={}).run.prefix == "2024"
