"""Unit tests of hivecli.recipe: the shipped recipes, layering, error messages, TOML round trips, the schema."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hivecli._exceptions import ConfigError
from hivecli.recipe import (
    ENV_NAMES,
    NON_RECIPE_ENV_VARS,
    SECTIONS,
    Recipe,
    dumps_toml,
    is_user_code,
    json_schema,
    load_recipe,
)

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
    assert (r.data.batch_size, r.optimizer.name, r.optimizer.lr) == (16, "sgd", 0.01)
    assert (r.optimizer.schedule, r.optimizer.warmup_steps, r.optimizer.final_lr_fraction) == ("cosine", 100, 0.05)
    assert (r.averaging.target_group_size, r.averaging.request_timeout) == (4, 1.0)
    assert (r.run.total_epochs, r.run.total_samples, r.limits.max_steps) == (300, None, None)  # the run's goal
    assert (r.run.min_peers, r.run.min_peers_timeout) == (2, 300.0)
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
        ("[averaging]\nuplink_mbps = 0\n", "averaging.uplink_mbps = 0: must be > 0"),
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
    assert message == "--set data.batch_size=0: must be >= 1 (and 1 more problem)"  # the first in recipe order
    assert config_error(None, ["optimizer.lr=0", "data.batch_size=0", "data.workers=-1"]).endswith(
        "(and 2 more problems)"
    )


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    assert config_error(path) == f"{path}: no such recipe file; see `hive recipe check --help` or the recipes/ folder"


def test_env_and_override_values_are_validated(tmp_path):
    path = write(tmp_path, "")
    from_env = config_error(path, env={"HIVE_LIMITS_MAX_STEPS": "0"})
    assert from_env == "HIVE_LIMITS_MAX_STEPS=0 (environment variable): must be >= 1"
    from_flag = config_error(path, ["limits.max_steps=0"])
    assert from_flag == "--set limits.max_steps=0: must be >= 1"
    assert "unknown key limits.max_step (did you mean 'max_steps'?)" in config_error(path, ["limits.max_step=3"])
    assert "unknown section [limit] (did you mean 'limits'?)" in config_error(path, ["limit.max_steps=3"])
    assert config_error(path, env={"HIVE_AVERAGING_COMPRESSION": "fp8"}).startswith(
        "HIVE_AVERAGING_COMPRESSION=fp8 (environment variable): must be 'auto', 'none', 'fp16'"
    )


@pytest.mark.parametrize("item", ["limits.max_steps", "limits=5", "limits.=5", "=5"])
def test_malformed_set_item(item):
    message = config_error(None, [item])
    assert message.startswith(f"--set {item!r}: write SECTION.KEY=VALUE")


def test_a_toml_date_where_a_string_belongs_is_a_config_error(tmp_path):
    # An unquoted date (`prefix = 2024-05-01`) must be reported like any other bad value, not crash with a TypeError.
    message = config_error(write(tmp_path, "[run]\nprefix = 2024-05-01\n"))
    assert message.endswith('run.prefix = 2024-05-01: must be text, not a date or time (write "2024-05-01" in quotes)')


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
    with pytest.raises(ConfigError, match=r"^--set model\.name=\"resnet\": did you mean 'resnet-small'\?"):
        load_recipe(None, ['model.name="resnet"'], env={})
    with pytest.raises(ConfigError, match=r"^--set data\.name=cifar: did you mean 'cifar10'\?"):
        load_recipe(None, ["data.name=cifar"], env={})
    assert load_recipe(None, ['model.name="pkg.mod:build"'], env={}).model.name == "pkg.mod:build"


def test_registry_builds_exactly_the_names_recipes_accept():
    from hivecli import recipe, registry

    assert tuple(registry.MODELS) == recipe.MODEL_NAMES


def test_out_of_range_betas_and_seeds_are_config_errors():
    with pytest.raises(
        ConfigError,
        match=r"^--set optimizer\.betas=\[1\.0, 0\.999\]: both betas must be in \[0, 1\)",
    ):
        load_recipe(None, ["optimizer.betas=[1.0, 0.999]"], env={})
    with pytest.raises(ConfigError, match=r"run\.seed"):
        load_recipe(None, ["run.seed=99999999999999999999999"], env={})


def test_a_numeric_prefix_from_the_command_line_is_text():
    assert load_recipe(None, ["run.prefix=2024"], env={}).run.prefix == "2024"


# ---- the run's goal, schedules, this peer's limits, checkpoints kept -----------------------------------------


def test_new_fields_have_their_defaults():
    r = Recipe()
    assert (r.run.total_samples, r.run.total_epochs, r.run.min_peers, r.run.min_peers_timeout) == (None, None, 1, 300.0)
    assert (r.optimizer.schedule, r.optimizer.warmup_steps) == ("constant", 0)
    assert (r.optimizer.final_lr_fraction, r.optimizer.clip_grad_norm) == (0.0, None)
    assert r.output.keep_checkpoints == 3


def test_new_fields_load_from_a_file(tmp_path):
    path = write(
        tmp_path,
        "[run]\ntotal_epochs = 3\nmin_peers = 2\nmin_peers_timeout = 0\n"
        '[optimizer]\nschedule = "cosine"\nwarmup_steps = 10\nfinal_lr_fraction = 0.1\nclip_grad_norm = 1\n'
        "[output]\nkeep_checkpoints = 1\n",
    )
    r = load_recipe(path, env={})
    assert (r.run.total_epochs, r.run.min_peers, r.run.min_peers_timeout) == (3.0, 2, 0.0)
    assert (r.optimizer.schedule, r.optimizer.warmup_steps, r.optimizer.final_lr_fraction) == ("cosine", 10, 0.1)
    assert (r.optimizer.clip_grad_norm, r.output.keep_checkpoints) == (1.0, 1)
    assert load_recipe(None, ["run.total_samples=5000", "optimizer.schedule=linear"], env={}).run.total_samples == 5000
    assert load_recipe(write(tmp_path, r.to_toml()), env={}) == r


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[run]\ntotal_samples = 0\n", "run.total_samples = 0: must be >= 1"),
        ("[run]\ntotal_epochs = 0\n", "run.total_epochs = 0: must be > 0"),
        ("[run]\nmin_peers = 0\n", "run.min_peers = 0: must be >= 1"),
        ("[run]\nmin_peers_timeout = -1\n", "run.min_peers_timeout = -1: must be >= 0"),
        ('[optimizer]\nschedule = "step"\n', "optimizer.schedule = \"step\": must be 'constant', 'cosine' or 'linear'"),
        ("[optimizer]\nwarmup_steps = -1\n", "optimizer.warmup_steps = -1: must be >= 0"),
        ("[optimizer]\nfinal_lr_fraction = 1.5\n", "optimizer.final_lr_fraction = 1.5: must be <= 1"),
        ("[optimizer]\nclip_grad_norm = 0\n", "optimizer.clip_grad_norm = 0: must be > 0"),
        ("[output]\nkeep_checkpoints = 0\n", "output.keep_checkpoints = 0: must be >= 1"),
        ("[run]\ntotal_samples = 100\ntotal_epochs = 2\n", "run: set run.total_samples or run.total_epochs, not both"),
        (
            '[optimizer]\nschedule = "cosine"\n',
            'optimizer.schedule = "cosine" decays over the run\'s goal; set run.total_samples or run.total_epochs, '
            'or use schedule = "constant"',
        ),
    ],
)
def test_new_fields_are_validated(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: {expected}"


def test_limits_are_this_peers_and_the_goal_is_the_runs():
    properties = json_schema()["$defs"]
    assert "Stop this peer at this step" in properties["LimitsSection"]["properties"]["max_steps"]["description"]
    assert "counted over all peers" in properties["RunSection"]["properties"]["total_epochs"]["description"]
    assert "late keeps contributing" in properties["RunSection"]["properties"]["total_samples"]["description"]


# ---- strict types ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[optimizer]\nlr = "0.02"\n', 'optimizer.lr = "0.02": must be a number, not text (write 0.02 without quotes)'),
        ("[optimizer]\nlr = true\n", "optimizer.lr = true: must be a number, not true/false"),
        ('[optimizer]\nlr = "true"\n', 'optimizer.lr = "true": must be a number, not text'),
        ("[run]\nprefix = 42\n", 'run.prefix = 42: must be text, not a number (write "42" in quotes)'),
        (
            '[averaging]\naverage_parameters = "yes"\n',
            'averaging.average_parameters = "yes": must be true or false, not text '
            "(write true or false, without quotes)",
        ),
        (
            '[averaging]\naverage_gradients = "false"\n',
            'averaging.average_gradients = "false": must be true or false, not text (write false without quotes)',
        ),
        (
            "[averaging]\naverage_parameters = 1\n",
            "averaging.average_parameters = 1: must be true or false, not a number",
        ),
        ("[limits]\nmax_steps = 5.0\n", "limits.max_steps = 5.0: must be a whole number (write 5)"),
        ("[limits]\nmax_steps = 5.5\n", "limits.max_steps = 5.5: must be a whole number"),
        (
            '[data]\nbatch_size = "8"\n',
            'data.batch_size = "8": must be a whole number, not text (write 8 without quotes)',
        ),
        ('[data]\nchannels = "3"\n', 'data.channels = "3": must be 1 or 3'),
        ("[optimizer]\nbetas = [0.9]\n", "optimizer.betas = [0.9]: must be two numbers, e.g. [0.9, 0.999]"),
        (
            '[optimizer]\nbetas = ["0.9", 0.999]\n',
            'optimizer.betas[0] = "0.9": must be a number, not text (write 0.9 without quotes)',
        ),
        (
            '[network]\nannounce = "/ip4/1.2.3.4/tcp/5"\n',
            'network.announce = "/ip4/1.2.3.4/tcp/5": must be a list, not text (write ["/ip4/1.2.3.4/tcp/5"])',
        ),
        (
            "[network]\ninitial_peers = [1]\n",
            'network.initial_peers[0] = 1: must be text, not a number (write "1" in quotes)',
        ),
        ("[limits]\nmax_seconds = inf\n", "limits.max_seconds = inf: must be a finite number"),
    ],
)
def test_file_values_are_strictly_typed(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: {expected}"


def test_an_int_for_a_float_and_a_list_for_betas_are_fine(tmp_path):
    r = load_recipe(write(tmp_path, "[optimizer]\nlr = 1\nbetas = [0, 0.5]\n[limits]\nmax_seconds = 60\n"), env={})
    assert (r.optimizer.lr, r.optimizer.betas, r.limits.max_seconds) == (1.0, (0.0, 0.5), 60.0)
    assert isinstance(r.optimizer.lr, float)


def test_published_recipes_are_strictly_typed():
    with pytest.raises(ConfigError) as info:
        load_recipe(None, env={}, data={"run": {"prefix": 7}})
    assert (
        str(info.value)
        == 'the run\'s published recipe: run.prefix = 7: must be text, not a number (write "7" in quotes)'
    )


def test_a_text_field_takes_typed_text_as_is():
    env = {"HIVE_RUN_PREFIX": "2024", "HIVE_DATA_ROOT": "true", "HIVE_NETWORK_IDENTITY": "1.5"}
    r = load_recipe(None, env=env)
    assert (r.run.prefix, r.data.root, r.network.identity) == ("2024", "true", "1.5")
    r = load_recipe(None, ["run.prefix=2024", "output.dir=2024-05-01", 'data.root="quoted"'], env={})
    assert (r.run.prefix, r.output.dir, r.data.root) == ("2024", "2024-05-01", "quoted")


def test_typed_values_are_strictly_typed_too():
    assert (
        config_error(None, ["averaging.average_parameters=yes"])
        == "--set averaging.average_parameters=yes: must be true or false, not text (write true or false, "
        "without quotes)"
    )
    assert config_error(None, ["optimizer.lr=fast"]) == "--set optimizer.lr=fast: must be a number, not text"
    assert config_error(None, ['optimizer.lr="0.02"']).endswith(
        "must be a number, not text (write 0.02 without quotes)"
    )
    assert load_recipe(None, ["averaging.average_parameters=false"], env={}).averaging.average_parameters is False


# ---- HIVE_* environment variables ---------------------------------------------------------------------------------


def test_a_misspelt_env_var_is_an_error_with_a_suggestion():
    message = config_error(None, env={"HIVE_LIMIT_MAX_STEPS": "500"})
    assert message.startswith(
        "HIVE_LIMIT_MAX_STEPS=500 (environment variable): not a recipe setting (did you mean HIVE_LIMITS_MAX_STEPS?); "
    )
    assert "`hive recipe schema`" in message
    assert "(did you mean HIVE_LOGLEVEL?)" in config_error(None, env={"HIVE_LOG_LEVEL": "DEBUG"})
    assert "(did you mean HIVE_AVERAGING_TARGET_GROUP_SIZE?)" in config_error(
        None, env={"HIVE_AVERAGING_TARGET_GROUP": "4"}
    )


def test_an_unknown_env_var_is_an_error_even_without_a_suggestion():
    message = config_error(None, env={"HIVE_FOO": "1"})
    assert message.startswith("HIVE_FOO=1 (environment variable): not a recipe setting; recipe settings are HIVE_")


def test_hives_own_env_vars_are_not_recipe_settings():
    env = dict.fromkeys(NON_RECIPE_ENV_VARS, "1")
    assert set(NON_RECIPE_ENV_VARS) >= {"HIVE_DEBUG", "HIVE_LOGLEVEL", "HIVE_INITIAL_PEERS", "HIVE_ENCRYPT_SAME_HOST"}
    assert load_recipe(None, env=env) == Recipe()
    assert not set(NON_RECIPE_ENV_VARS) & set(ENV_NAMES)


def test_every_hive_env_var_that_hive_reads_is_known_to_the_recipe_loader():
    """A HIVE_* variable read anywhere in hivecli must not be refused as an unknown recipe setting."""
    package = Path(__file__).resolve().parent.parent / "hivecli"
    pattern = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()["'](HIVE_[A-Z0-9_]+)["']""")
    read = {name for path in package.rglob("*.py") for name in pattern.findall(path.read_text())}
    assert read >= {"HIVE_DEBUG", "HIVE_ENCRYPT_SAME_HOST"}  # the scan finds them
    assert read <= set(NON_RECIPE_ENV_VARS) | set(ENV_NAMES), read - set(NON_RECIPE_ENV_VARS) - set(ENV_NAMES)


def test_every_recipe_key_has_an_env_var():
    assert ENV_NAMES["HIVE_LIMITS_MAX_STEPS"] == ("limits", "max_steps")
    assert ENV_NAMES["HIVE_OPTIMIZER_CLIP_GRAD_NORM"] == ("optimizer", "clip_grad_norm")
    assert len(ENV_NAMES) == sum(len(Recipe.model_fields[s].annotation.model_fields) for s in SECTIONS)


# ---- every error names its source ------------------------------------------------------------------------------


def test_the_same_problem_names_each_source(tmp_path):
    path = write(tmp_path, "[averaging]\ntarget_group_size = 0\n")
    assert config_error(path) == f"{path}: averaging.target_group_size = 0: must be >= 2"
    clean = write(tmp_path, "")
    assert (
        config_error(clean, env={"HIVE_AVERAGING_TARGET_GROUP_SIZE": "1"})
        == "HIVE_AVERAGING_TARGET_GROUP_SIZE=1 (environment variable): must be >= 2"
    )
    assert config_error(clean, ["averaging.target_group_size=1"]) == "--set averaging.target_group_size=1: must be >= 2"
    # a file's bad value that a later layer replaces is no problem
    assert load_recipe(path, ["averaging.target_group_size=4"], env={}).averaging.target_group_size == 4


def test_unknown_keys_from_env_or_flags_name_their_source(tmp_path):
    path = write(tmp_path, "")
    assert config_error(path, ["limits.max_step=3"]).startswith(
        "--set limits.max_step=3: unknown key limits.max_step (did you mean 'max_steps'?); [limits] takes: "
    )
    assert config_error(path, [" limit.max_steps=3"]) == (
        "--set limit.max_steps=3: unknown section [limit] (did you mean 'limits'?)"
    )


def test_published_recipes_and_named_sources():
    data = {"averaging": {"target_group_size": 0}}
    with pytest.raises(ConfigError) as info:
        load_recipe(None, env={}, data=data)
    assert str(info.value) == "the run's published recipe: averaging.target_group_size = 0: must be >= 2"
    with pytest.raises(ConfigError) as info:
        load_recipe(None, env={}, data=data, source="the recipe of run 'x'")
    assert str(info.value).startswith("the recipe of run 'x': averaging.target_group_size = 0")
    with pytest.raises(ConfigError) as info:
        load_recipe(None, env={}, data={"averaging": {"target_grop_size": 4}})
    assert str(info.value).startswith("the run's published recipe: unknown key averaging.target_grop_size")


def test_a_check_across_keys_blames_the_layer_that_broke_it(tmp_path):
    path = write(tmp_path, "[averaging]\ntarget_group_size = 4\n[run]\ntotal_samples = 100\n")
    assert config_error(path, ["averaging.min_group_size=8"]) == (
        "--set averaging.min_group_size=8: min_group_size = 8 is larger than target_group_size = 4; "
        "lower min_group_size"
    )
    assert config_error(path, env={"HIVE_RUN_TOTAL_EPOCHS": "2", "HIVE_RUN_TOTAL_SAMPLES": "5"}) == (
        "HIVE_RUN_TOTAL_SAMPLES=5 (environment variable): set run.total_samples or run.total_epochs, not both"
    )
    assert config_error(None, env={"HIVE_OPTIMIZER_SCHEDULE": "linear"}).startswith(
        'HIVE_OPTIMIZER_SCHEDULE=linear (environment variable): optimizer.schedule = "linear" decays over'
    )
    both = config_error(None, ["averaging.target_group_size=4", "averaging.min_group_size=8"])
    assert both.startswith("--set averaging.min_group_size=8: ")  # the key the message names first


def test_a_value_with_a_newline_stays_on_one_line():
    assert config_error(None, env={"HIVE_LIMITS_MAX_STEPS": "1\n2"}).startswith(
        "HIVE_LIMITS_MAX_STEPS='1\\n2' (environment variable): must be a whole number"
    )


def test_a_goal_set_later_replaces_the_goal_of_the_file(tmp_path):
    path = write(tmp_path, "[run]\ntotal_epochs = 100\n")
    r = load_recipe(path, ["run.total_samples=3200"], env={})
    assert (r.run.total_samples, r.run.total_epochs) == (3200, None)
    r = load_recipe(path, env={"HIVE_RUN_TOTAL_SAMPLES": "64"})
    assert (r.run.total_samples, r.run.total_epochs) == (64, None)
