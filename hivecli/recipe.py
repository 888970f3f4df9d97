"""Run recipes: a TOML file that says what to train and how to average, validated by pydantic.

Settings layer as: defaults < recipe file < environment (HIVE_<SECTION>_<KEY>, e.g.
HIVE_LIMITS_MAX_STEPS=500) < command-line flags (`--set section.key=value`, and the
dedicated flags). Every error names the file, the key, the value and the fix:

    recipes/x.toml: averaging.target_group_size = 0: must be >= 2

This module does not import torch: `hive recipe check` and `hive start`'s first lines stay fast.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hivecli._exceptions import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_USER_CODE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # module.path:function
MODEL_NAMES = ("quickstart-cnn", "mlp", "resnet-small")  # hivecli.registry builds these
DATASET_NAMES = ("digits", "mnist", "cifar10", "imagefolder")


def _registered_or_user_code(value: str, known: tuple[str, ...]) -> str:
    if value in known or _USER_CODE.match(value):
        return value
    close = difflib.get_close_matches(value, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"{hint}choose one of {', '.join(known)}, or write module:function")


ModelName = Annotated[str, AfterValidator(lambda value: _registered_or_user_code(value, MODEL_NAMES))]
DatasetName = Annotated[str, AfterValidator(lambda value: _registered_or_user_code(value, DATASET_NAMES))]


class _Section(BaseModel):
    # "--set run.prefix=2024" parses as a number; a text field takes it as text
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class RunSection(_Section):
    prefix: str = Field("hive-run", description="Name of the run: peers with the same prefix train together.")
    seed: int = Field(
        0, ge=0, lt=2**63, description="Seed of the model's initialisation (every peer starts from the same model)."
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError("must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit")
        return value


class ModelSection(_Section):
    name: ModelName = Field("quickstart-cnn", description="quickstart-cnn, mlp, resnet-small, or module:function.")
    hidden_size: int = Field(128, ge=1, description="Width of the mlp's hidden layer.")


class DataSection(_Section):
    name: DatasetName = Field(
        "digits", description="digits (offline), mnist, cifar10, imagefolder, or module:function."
    )
    root: str = Field("./data", description="Where downloaded datasets live (imagefolder: the folder of classes).")
    image_size: int | None = Field(None, ge=8, description="Resize images to this size (default: the dataset's).")
    channels: Literal[1, 3] | None = Field(None, description="Convert images to 1 or 3 channels (default: as is).")
    batch_size: int = Field(64, ge=1, description="Samples per step on each peer.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes.")


class OptimizerSection(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam and AdamW only.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError("both betas must be in [0, 1), e.g. [0.9, 0.999]")
        return value


class AveragingSection(_Section):
    target_group_size: int = Field(16, ge=2, description="Largest group to average in.")
    min_group_size: int = Field(2, ge=2)
    average_parameters: bool = True
    average_gradients: bool = False
    average_opt_statistics: list[str] = Field(default_factory=list, description='e.g. ["exp_avg_sq"] for Adam.')
    every_steps: int = Field(1, ge=1, description="Start a round every this many steps.")
    every_seconds: float = Field(0.0, ge=0, description="And at most once per this many seconds (0: no limit).")
    compression: Literal["none", "fp16", "uniform8bit", "blockwise8bit"] = "none"
    min_matchmaking_time: float = Field(5.0, gt=0, description="How long an incomplete group waits for more peers.")
    request_timeout: float = Field(3.0, gt=0)
    allreduce_timeout: float = Field(120.0, gt=0)
    round_timeout: float = Field(30.0, gt=0, description="How long one round may look for a group.")

    @model_validator(mode="after")
    def _consistent(self) -> AveragingSection:
        if self.min_group_size > self.target_group_size:
            raise ValueError(
                f"min_group_size = {self.min_group_size} is larger than target_group_size = "
                f"{self.target_group_size}; lower min_group_size"
            )
        if self.request_timeout >= self.min_matchmaking_time:
            raise ValueError(
                f"request_timeout = {self.request_timeout} must be less than min_matchmaking_time = "
                f"{self.min_matchmaking_time}"
            )
        return self


class LimitsSection(_Section):
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (of the run, not this peer).")
    max_epochs: float | None = Field(None, gt=0, description="Stop after this many passes over the data.")
    max_seconds: float | None = Field(None, gt=0, description="Stop after this long.")


class OutputSection(_Section):
    dir: str = Field("runs", description="Run directories go here: DIR/PREFIX/PEER.")
    checkpoint_every_steps: int = Field(200, ge=1)
    eval_every_steps: int = Field(50, ge=1, description="Test accuracy every this many steps (and at the end).")
    report_every_seconds: float = Field(2.0, gt=0, description="Progress line, metrics row and DHT report period.")


class NetworkSection(_Section):
    host: str = "0.0.0.0"
    port: int = Field(0, ge=0, le=65535)
    announce: list[str] = Field(default_factory=list)
    initial_peers: list[str] = Field(default_factory=list)
    identity: str | None = None


class Recipe(_Section):
    """A whole recipe; every section is optional and every field has a default."""

    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optimizer: OptimizerSection = OptimizerSection()
    averaging: AveragingSection = AveragingSection()
    limits: LimitsSection = LimitsSection()
    output: OutputSection = OutputSection()
    network: NetworkSection = NetworkSection()

    def user_code(self) -> list[str]:
        """The `module:function` references in this recipe: code it would run."""
        return [name for name in (self.model.name, self.data.name) if is_user_code(name)]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


SECTIONS = list(Recipe.model_fields)


def is_user_code(name: str) -> bool:
    return bool(_USER_CODE.match(name))


# ---- loading and layering --------------------------------------------------------------------------


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
    data: dict[str, Any] | None = None,
) -> Recipe:
    """Read and validate a recipe: defaults < `path` (or `data`) < HIVE_* env vars < overrides.

    Args:
        path: a TOML file, or None for the defaults (or `data`).
        overrides: "section.key=value" strings; the value is TOML (`4`, `"x"`, `[1, 2]`) or a bare string.
        env: the environment to read HIVE_<SECTION>_<KEY> from (default os.environ).
        data: an already parsed recipe (one fetched from the DHT), used when `path` is None.

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown, or a value is invalid;
            the message names the source, the key, the value and the fix.
    """
    source = str(path) if path is not None else "recipe"
    merged: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: no such recipe file; see `hive recipe check --help` or the recipes/ folder"
            ) from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
        try:
            merged = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    elif data is not None:
        merged = json.loads(json.dumps(data))  # a deep copy of plain data
    _check_keys(merged, source)
    origins: dict[tuple[str, str], str] = {}  # values that did not come from the file: where they did
    env_layer = _env_layer(os.environ if env is None else env, origins)
    flag_layer = _overrides_layer(overrides or [], origins)
    for layer in (env_layer, flag_layer):
        _check_keys(layer, source)
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    try:
        return Recipe.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_describe(e, source, merged, origins)) from None


def _check_keys(data: dict[str, Any], source: str) -> None:
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]{_did_you_mean(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section} must be a table ([{section}]), not {values!r}")
        fields = list(Recipe.model_fields[section].annotation.model_fields)  # type: ignore[union-attr]
        for key in values:
            if key not in fields:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}{_did_you_mean(key, fields)}; "
                    f"[{section}] takes: {', '.join(fields)}"
                )


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _env_layer(
    env: dict[str, str] | os._Environ[str], origins: dict[tuple[str, str], str]
) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for name, value in env.items():
        match = re.fullmatch(r"HIVE_([A-Z]+)_([A-Z0-9_]+)", name)
        if match and match.group(1).lower() in SECTIONS:
            section, key = match.group(1).lower(), match.group(2).lower()
            layer.setdefault(section, {})[key] = _parse_value(value)
            origins[(section, key)] = f"from the environment variable {name}"
    return layer


def _overrides_layer(overrides: list[str], origins: dict[tuple[str, str], str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set averaging.target_group_size=4")
        layer.setdefault(section, {})[field] = _parse_value(value.strip())
        origins[(section, field)] = "from the command line"
    return layer


def _describe(error: ValidationError, source: str, data: dict[str, Any], origins: dict[tuple[str, str], str]) -> str:
    """The first validation problem as one sentence: source: key = value: what is wrong."""
    problem = error.errors()[0]
    location = ".".join(str(part) for part in problem["loc"])
    message = problem["msg"]
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    message = message.replace("Input should be greater than or equal to", "must be >=")
    message = message.replace("Input should be greater than", "must be >")
    message = message.replace("Input should be less than or equal to", "must be <=")
    message = message.replace("Input should be less than", "must be <")
    message = message.replace("Input should be", "must be")
    value: Any = data
    for part in problem["loc"]:
        value = value.get(part) if isinstance(value, dict) else None
    shown = f" = {json.dumps(value, default=str)}" if value is not None and len(problem["loc"]) > 1 else ""
    origin = origins.get(tuple(str(part) for part in problem["loc"][:2]))  # type: ignore[arg-type]
    if shown and origin:
        shown += f" ({origin})"
    more = f" (and {len(error.errors()) - 1} more problems)" if len(error.errors()) > 1 else ""
    return f"{source}: {location}{shown}: {message}{more}"


# ---- writing ----------------------------------------------------------------------------------------


def dumps_toml(data: dict[str, dict[str, Any]]) -> str:
    """TOML for a recipe's two levels of tables with plain values (None is left out: TOML has no null)."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string (no \ud83d pairs)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()


__all__ = ["SECTIONS", "Recipe", "dumps_toml", "is_user_code", "json_schema", "load_recipe"]
