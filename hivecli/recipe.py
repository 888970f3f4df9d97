"""Run recipes: a TOML file that says what to train and how to average, validated by pydantic.

Each setting comes from the last layer that sets it:

    defaults < the recipe file (or `data=`, a recipe fetched from the DHT)
             < environment variables HIVE_<SECTION>_<KEY> (e.g. HIVE_LIMITS_MAX_STEPS=500)
             < command-line flags (`--set section.key=value`, and the dedicated flags)

Values are strictly typed: a file's `lr = "0.02"`, `prefix = 42` or `average_parameters = "yes"`
is an error, never converted (only an int where a float belongs, `lr = 1`, and a list for
`betas`, are taken as written). Environment variables and `--set` values are text a person
typed: they are read as TOML literals (`4`, `true`, `[1, 2]`, `"x"`), except that a text field
takes the text as it is (`--set run.prefix=2024` is the prefix "2024"), and text that is not
TOML stays text (`--set model.name=resnet-small`). An unknown HIVE_* variable is an error.

Every error is one line that names where the value came from, the key, the value and the fix:

    recipes/x.toml: averaging.target_group_size = 0: must be >= 2
    HIVE_AVERAGING_TARGET_GROUP_SIZE=1 (environment variable): must be >= 2
    --set averaging.target_group_size=1: must be >= 2

This module does not import torch: `hive recipe check` and `hive start`'s first lines stay fast.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from hivecli._exceptions import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_USER_CODE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # module.path:function
MODEL_NAMES = ("quickstart-cnn", "mlp", "resnet-small")  # hivecli.registry builds these
DATASET_NAMES = ("digits", "mnist", "cifar10", "imagefolder")
# HIVE_* variables that hive reads but that are not recipe settings; any other HIVE_* variable is an error
NON_RECIPE_ENV_VARS = (
    "HIVE_DEBUG",
    "HIVE_LOGLEVEL",
    "HIVE_INITIAL_PEERS",
    "HIVE_EVENT_LOOP",
    "HIVE_SWARM_KEY",
    "HIVE_ENCRYPT_SAME_HOST",  # cli/_network.py
)


def _registered_or_user_code(value: str, known: tuple[str, ...]) -> str:
    if value in known or _USER_CODE.match(value):
        return value
    close = difflib.get_close_matches(value, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"{hint}choose one of {', '.join(known)}, or write module:function")


ModelName = Annotated[str, AfterValidator(lambda value: _registered_or_user_code(value, MODEL_NAMES))]
DatasetName = Annotated[str, AfterValidator(lambda value: _registered_or_user_code(value, DATASET_NAMES))]


class _Section(BaseModel):
    # strict: a value of the wrong type is an error, not converted ("0.02" is no number, 42 no name).
    # Strict mode still takes an int where a float belongs; the one tuple field is marked Strict(False)
    # because TOML writes it as a list. No inf or nan: no setting means "forever" that way.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class RunSection(_Section):
    prefix: str = Field("hive-run", description="Name of the run: peers with the same prefix train together.")
    seed: int = Field(
        0, ge=0, lt=2**63, description="Seed of the model's initialisation (every peer starts from the same model)."
    )
    total_samples: int | None = Field(
        None,
        ge=1,
        description="The run's goal: it is done when all its peers together have processed this many training "
        "samples. Counted over all peers, so a peer that joins late keeps contributing until the goal. "
        "Neither this nor total_epochs: the run goes on until stopped (Ctrl+C).",
    )
    total_epochs: float | None = Field(
        None, gt=0, description="The run's goal in passes over the training set, counted over all peers."
    )
    min_peers: int = Field(
        1, ge=1, description="A peer that starts the run waits until this many peers (itself included) are in it."
    )
    min_peers_timeout: float = Field(
        300.0, ge=0, description="Seconds to wait for min_peers before training with fewer."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where this peer trains: cpu; cuda (a GPU per process of the peer, see --nproc-per-node: "
        "an error on a machine without one); auto: cuda if this machine has a GPU, else cpu.",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError("must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _one_goal(self) -> RunSection:
        if self.total_samples is not None and self.total_epochs is not None:
            raise ValueError("set run.total_samples or run.total_epochs, not both")
        return self


class ModelSection(_Section):
    name: ModelName = Field("quickstart-cnn", description="quickstart-cnn, mlp, resnet-small, or module:function.")
    hidden_size: int = Field(128, ge=1, description="Width of the mlp's hidden layer.")


class DataSection(_Section):
    name: DatasetName = Field(
        "digits", description="digits (offline), mnist, cifar10, imagefolder, or module:function."
    )
    root: str = Field(
        "./data",
        description="Where the dataset's files are: cifar10 in ROOT/cifar-10-batches-py, mnist in ROOT/MNIST/raw "
        "(downloaded there when missing, where there is internet); imagefolder: ROOT/train/CLASS/*.png|jpg and "
        "ROOT/val or ROOT/test alike, or ROOT/CLASS/* split 80/20.",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        description="Resize images to this size (default: the dataset's; imagefolder: 32, so that images of any "
        "size stack into batches).",
    )
    channels: Literal[1, 3] | None = Field(None, description="Convert images to 1 or 3 channels (default: as is).")
    normalize: Literal["symmetric", "imagenet", "none"] = Field(
        "symmetric",
        description="mnist, cifar10, imagefolder: symmetric scales pixels to [-1, 1] (mean 0.5, std 0.5), imagenet "
        "uses ImageNet's channel means and stds (3 channels), none leaves them in [0, 1].",
    )
    batch_size: int = Field(64, ge=1, description="Samples per step on each peer.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes.")


class OptimizerSection(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    weight_decay: float = Field(0.0, ge=0)
    betas: Annotated[tuple[float, float], Strict(False)] = Field((0.9, 0.999), description="Adam and AdamW only.")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Learning-rate decay over the run's goal (run.total_samples or run.total_epochs)."
    )
    warmup_steps: int = Field(
        0, ge=0, description="Raise the learning rate linearly from 0 to lr over this many steps."
    )
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="cosine and linear decay end at lr * this.")
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip each step's gradient norm to this.")

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) != 2:
            raise ValueError("must be two numbers, e.g. [0.9, 0.999]")
        return value

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError("both betas must be in [0, 1), e.g. [0.9, 0.999]")
        return value


class AveragingSection(_Section):
    mode: Literal["parameters", "collaborative", "diloco"] = Field(
        "parameters",
        description="parameters: average parameters in the background every few steps (hivemind 0.9); "
        "collaborative: the run steps together every target_batch_size samples (hivemind 1.x Optimizer); "
        "diloco: local_steps inner steps, then an averaged outer step (DiLoCo).",
    )
    target_batch_size: int | None = Field(
        None, ge=1, description="collaborative: samples of the whole run per epoch (default: 4 x data.batch_size)."
    )
    use_local_updates: bool = Field(
        False, description="collaborative: step locally every batch and average parameters every epoch."
    )
    average_state_every: int = Field(1, ge=1, description="collaborative: average parameters every this many epochs.")
    local_steps: int = Field(500, ge=1, description="diloco: inner steps between outer steps (H).")
    outer_lr: float = Field(0.7, gt=0, description="diloco: the outer SGD's learning rate.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="diloco: the outer SGD's Nesterov momentum.")
    target_group_size: int = Field(16, ge=2, description="Largest group to average in.")
    min_group_size: int = Field(2, ge=2)
    average_parameters: bool = True
    average_gradients: bool = False
    average_opt_statistics: list[str] = Field(default_factory=list, description='e.g. ["exp_avg_sq"] for Adam.')
    every_steps: int = Field(1, ge=1, description="Start a round every this many steps.")
    every_seconds: float = Field(0.0, ge=0, description="And at most once per this many seconds (0: no limit).")
    compression: Literal["auto", "none", "fp16", "uniform8bit", "blockwise8bit"] = Field(
        "auto",
        description="How tensors travel: auto picks fp16 for each round only when the measured link is slower "
        "than this machine converts to fp16 and back (exact float32 on fast links).",
    )
    min_matchmaking_time: float = Field(5.0, gt=0, description="How long an incomplete group waits for more peers.")
    request_timeout: float = Field(3.0, gt=0)
    allreduce_timeout: float = Field(120.0, gt=0)
    round_timeout: float = Field(30.0, gt=0, description="How long one round may look for a group.")
    aggregation: Literal["mean", "trimmed_mean", "centered_clip"] = Field(
        "mean",
        description="How a reducer combines the group's values: the weighted mean, or, for runs open to anyone, "
        "a robust rule that bounds what a minority of hostile peers can do (weights then count only as 0 or not).",
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean: the share of highest and of lowest values dropped per position."
    )
    max_weight_ratio: float = Field(
        10.0, ge=1, description="A peer's weight (its samples) counts at most this many times the group's median."
    )
    uplink_mbps: float | None = Field(
        None,
        gt=0,
        description="This peer's upload rate in Mbit/s, if known: each round then paces its connections to their "
        "share of it, so that they do not overflow the link's queue (4 peers on 100 Mbit/s: 0.91-0.93 of the link "
        "rate against 0.85-0.86). Unset: see `pacing`.",
    )
    pacing: Literal["auto", "off"] = Field(
        "auto",
        description="Where uplink_mbps is unset: 'auto' learns the uplink's rate from the rounds once one of them "
        "lost packets on the way (a queue on the path overflowed), and paces the rounds after it a little below that "
        "rate; a link that loses nothing is never paced (4 peers on 100 Mbit/s: 0.91-0.93 of the link rate against "
        "0.83-0.87). 'off': TCP alone.",
    )

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
    """This peer's limits (the run's goal is run.total_samples or run.total_epochs)."""

    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop this peer at this step (its step counter continues the run's when it loads the run's state).",
    )
    max_epochs: float | None = Field(
        None, gt=0, description="Stop this peer after this many of its passes over the data."
    )
    max_seconds: float | None = Field(None, gt=0, description="Stop this peer after it has run this many seconds.")


class OutputSection(_Section):
    dir: str = Field("runs", description="Run directories go here: DIR/PREFIX/RUN_ID/PEER.")
    checkpoint_every_steps: int = Field(200, ge=1)
    keep_checkpoints: int = Field(
        3, ge=1, description="How many of the latest checkpoints to keep (the best one is kept besides)."
    )
    eval_every_steps: int = Field(50, ge=1, description="Test accuracy every this many steps (and at the end).")
    report_every_seconds: float = Field(2.0, gt=0, description="Progress line, metrics row and DHT report period.")
    tensorboard: bool = Field(
        False,
        description="Also write TensorBoard event files into RUN_DIR/tensorboard/ (needs the tensorboard package).",
    )


class NetworkSection(_Section):
    host: str = "0.0.0.0"
    port: int = Field(0, ge=0, le=65535)
    announce: list[str] = Field(default_factory=list)
    initial_peers: list[str] = Field(default_factory=list)
    identity: str | None = None
    client_mode: bool = Field(
        False,
        description="Never accept connections (behind NAT with no relay wanted): the peer trains and averages "
        "through connections it opens. By default a peer asks others to dial it back and decides by itself.",
    )
    relay: bool = Field(
        True,
        description="Relay for peers that others cannot dial (behind NAT), while this peer is reachable itself.",
    )


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

    @model_validator(mode="after")
    def _schedule_has_a_goal(self) -> Recipe:
        schedule = self.optimizer.schedule
        if schedule != "constant" and self.run.total_samples is None and self.run.total_epochs is None:
            raise ValueError(
                f'optimizer.schedule = "{schedule}" decays over the run\'s goal; set run.total_samples or '
                f'run.total_epochs, or use schedule = "constant"'
            )
        return self

    def user_code(self) -> list[str]:
        """The `module:function` references in this recipe: code it would run."""
        return [name for name in (self.model.name, self.data.name) if is_user_code(name)]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


SECTIONS = list(Recipe.model_fields)


def _fields(section: str) -> list[str]:
    return list(Recipe.model_fields[section].annotation.model_fields)  # type: ignore[union-attr]


# HIVE_<SECTION>_<KEY> -> (section, key); sections have no "_", so each name is unambiguous
ENV_NAMES = {f"HIVE_{section}_{key}".upper(): (section, key) for section in SECTIONS for key in _fields(section)}


def is_user_code(name: str) -> bool:
    return bool(_USER_CODE.match(name))


# ---- loading and layering --------------------------------------------------------------------------

# Where a value from the environment or the command line came from: its rank (a later layer wins) and
# its name in messages, e.g. "HIVE_LIMITS_MAX_STEPS=0 (environment variable)" or "--set limits.max_steps=0".
_Origins = dict[tuple[str, str], tuple[int, str]]


# keys that say the same thing two ways: setting one from the environment or --set drops the other
_ONE_OF = {("run", "total_samples"): "total_epochs", ("run", "total_epochs"): "total_samples"}


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    data: dict[str, Any] | None = None,
    source: str | None = None,
) -> Recipe:
    """Read and validate a recipe: defaults < `path` (or `data`) < HIVE_* env vars < overrides.

    Args:
        path: a TOML file, or None for the defaults (or `data`).
        overrides: "section.key=value" strings; the value is TOML (`4`, `"x"`, `[1, 2]`) or a bare string.
        env: the environment to read HIVE_<SECTION>_<KEY> from (default os.environ).
        data: an already parsed recipe (one fetched from the DHT), used when `path` is None.
        source: what messages call `path` or `data` (default: the path, or "the run's published recipe").

    Raises:
        ConfigError: the file is missing or not TOML, a key or HIVE_* variable is unknown, or a value is
            invalid; the message names where the value came from, the key, the value and the fix.
    """
    if source is None:
        source = str(path) if path is not None else "the run's published recipe" if data is not None else "recipe"
    merged: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(
                f"{source}: no such recipe file; see `hive recipe check --help` or the recipes/ folder"
            ) from None
        except OSError as e:
            raise ConfigError(f"{source}: cannot read the recipe: {e.strerror or e}") from None
        try:
            merged = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
    elif data is not None:
        merged = json.loads(json.dumps(data))  # a deep copy of plain data
    for section, values in merged.items():
        _check_key(section, None, source)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section} must be a table ([{section}]), not {values!r}")
        for key in values:
            _check_key(section, key, source)
    origins: _Origins = {}
    for section, key, value in [*_env_layer(os.environ if env is None else env, origins), *_flags(overrides, origins)]:
        merged.setdefault(section, {})[key] = value
        other = _ONE_OF.get((section, key))
        if other is not None and (section, other) not in origins:  # the file's other way to say it gives way
            merged[section].pop(other, None)
    try:
        return Recipe.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_describe(e, source, origins)) from None


def _check_key(section: str, key: str | None, source: str) -> None:
    """Raises ConfigError for an unknown section or key, with the closest known one."""
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section [{section}]{_did_you_mean(section, SECTIONS)}")
    fields = _fields(section)
    if key is not None and key not in fields:
        raise ConfigError(
            f"{source}: unknown key {section}.{key}{_did_you_mean(key, fields)}; [{section}] takes: {', '.join(fields)}"
        )


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _typed_value(section: str, key: str, text: str) -> Any:
    """A value a person typed (HIVE_* or --set): a TOML literal, but a text field takes the text as is,
    so that `run.prefix=2024` is the prefix "2024" (a file's `prefix = 2024` stays an error)."""
    value = _parse_value(text)
    if not isinstance(value, str) and _takes_text(section, key):
        return text
    return value


def _takes_text(section: str, key: str) -> bool:
    annotation = Recipe.model_fields[section].annotation.model_fields[key].annotation  # type: ignore[union-attr]
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return any(
        option is str or (get_origin(option) is Literal and all(isinstance(a, str) for a in get_args(option)))
        for option in options
    )


def _env_layer(env: Mapping[str, str], origins: _Origins) -> list[tuple[str, str, Any]]:
    layer = []
    for name, text in sorted(env.items()):
        if not name.startswith("HIVE_") or name in NON_RECIPE_ENV_VARS:
            continue
        label = f"{name}={_printable(text)} (environment variable)"
        if name not in ENV_NAMES:
            # users set HIVE_* for hive alone: an unknown one is a typo (or a stale name), not someone else's
            known = {other[5:]: other for other in [*ENV_NAMES, *NON_RECIPE_ENV_VARS]}  # compared after "HIVE_"
            close = difflib.get_close_matches(name[5:], list(known), n=1)
            hint = f" (did you mean {known[close[0]]}?)" if close else ""
            raise ConfigError(
                f"{label}: not a recipe setting{hint}; recipe settings are HIVE_<SECTION>_<KEY> "
                "for the keys `hive recipe schema` shows"
            )
        section, key = ENV_NAMES[name]
        layer.append((section, key, _typed_value(section, key, text)))
        origins[(section, key)] = (1, label)
    return layer


def _flags(overrides: list[str] | None, origins: _Origins) -> list[tuple[str, str, Any]]:
    layer = []
    for item in overrides or []:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set averaging.target_group_size=4")
        label = f"--set {_printable(item.strip())}"
        _check_key(section, key, label)
        layer.append((section, key, _typed_value(section, key, text.strip())))
        origins[(section, key)] = (2, label)
    return layer


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)  # keeps the message on one line


# ---- error messages ---------------------------------------------------------------------------------

# pydantic's type errors -> what the field wants, in TOML words
_WANTS = {
    "float_type": "a number",
    "int_type": "a whole number",
    "bool_type": "true or false",
    "string_type": "text",
    "list_type": "a list",
    "tuple_type": "a list",
}


def _describe(error: ValidationError, source: str, origins: _Origins) -> str:
    """The first validation problem as one line: where it came from: key = value: what is wrong."""
    problems = error.errors()
    problem = problems[0]
    loc = tuple(str(part) for part in problem["loc"])
    where = ".".join(loc[:2]) + "".join(f"[{part}]" for part in loc[2:])  # optimizer.betas[0]
    label: str | None = None
    if len(loc) >= 2:
        label = origins[(loc[0], loc[1])][1] if (loc[0], loc[1]) in origins else None
    else:  # a section's or the recipe's own check: blame the latest layer that set a key it names (first named)
        named = []
        for (section, key), (rank, name) in origins.items():
            found = re.search(rf"\b{section}\.{key}\b|\b{key} = ", problem["msg"])
            if found and (not loc or section == loc[0]):
                named.append((rank, -found.start(), name))
        label = max(named)[2] if named else None
    shown = f"{where} = {_shown(problem['input'])}: " if len(loc) >= 2 else f"{where}: " if loc else ""
    if label is not None:
        source = label  # the source names the key and the value already, unless they are inside it
        shown = shown if len(loc) > 2 else ""
    more = len(problems) - 1
    more_text = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {shown}{_message(problem)}{more_text}"


def _message(problem: Any) -> str:
    """What is wrong, and the fix where there is one."""
    value = problem["input"]
    wants = _WANTS.get(problem["type"])
    if wants is None:
        message = re.sub(r"^(Value error|Assertion failed), ", "", problem["msg"])
        for theirs, ours in [
            ("Input should be greater than or equal to", "must be >="),
            ("Input should be greater than", "must be >"),
            ("Input should be less than or equal to", "must be <="),
            ("Input should be less than", "must be <"),
            ("Input should be", "must be"),
        ]:
            message = message.replace(theirs, ours)
        return message
    if isinstance(value, float) and wants == "a whole number":
        return f"must be a whole number (write {int(value)})" if value.is_integer() else "must be a whole number"
    message = f"must be {wants}, not {_kind(value)}"
    if isinstance(value, str) and wants == "a list":  # a list of strings with one item, or betas
        return f"{message} (write [{_shown(value)}])" if problem["type"] == "list_type" else message
    if isinstance(value, str):  # quoted by mistake?
        if _fits(_parse_value(value), wants):
            return f"{message} (write {value} without quotes)"
        if wants == "true or false":
            return f"{message} (write true or false, without quotes)"
    elif wants == "text" and isinstance(value, (int, float, datetime.date, datetime.time)):
        return f'{message} (write "{_shown(value)}" in quotes)'
    return message


def _fits(value: Any, wants: str) -> bool:
    if wants == "true or false" or isinstance(value, bool):
        return wants == "true or false" and isinstance(value, bool)
    return isinstance(value, int) or (wants == "a number" and isinstance(value, float))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date or time"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _shown(value: Any) -> str:
    """`value` as TOML would write it (a date as itself), for messages."""
    try:
        return _toml_value(value)
    except TypeError:
        return str(value) if isinstance(value, (datetime.date, datetime.time)) else repr(value)


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


__all__ = [
    "ENV_NAMES",
    "NON_RECIPE_ENV_VARS",
    "SECTIONS",
    "Recipe",
    "dumps_toml",
    "is_user_code",
    "json_schema",
    "load_recipe",
]
