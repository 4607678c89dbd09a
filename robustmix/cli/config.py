"""Flag values from files: a ``--config`` file (JSON, YAML or a run's config.json), each value checked as on the
command line, and the check that a resumed run's flags are those its config.json recorded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from robustmix.cli.presets import PRESETS
from robustmix.runs.folder import CONFIG_FILE, flag_differences, read_json, recorded_flags

#: Flags a ``--config`` file may not set: they say what to do with an existing run folder, a decision of the
#: command line. A run's config.json records them (and its ``output_dir``): those entries are not taken.
_COMMAND_LINE_ONLY = ("resume", "overwrite", "config")


def config_file_values(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """The flag values of a ``--config`` file, each checked and converted as its flag would be on the command line.

    The file holds a JSON object (YAML for ``.yaml`` / ``.yml``) of flag names (``step_size`` or ``step-size``)
    to values, ``null`` meaning not set; or it is a run's ``config.json``, whose recorded ``flags`` are taken
    except ``output_dir``, ``resume``, ``overwrite`` and ``config``: the new run gets its own folder.

    Exits:
        With status 2 and a one-line message (``parser.error``) naming the file: unreadable, not an object,
        unknown flag names (all of them), a value its flag refuses, a run of another recipe, or ``resume``,
        ``overwrite`` or ``config`` set in a file that is not a run's config.json.
    """
    path = Path(path)
    where = f"--config {path}"
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        parser.error(f"{where}: cannot be read: {' '.join(str(err).split())}")
    if not isinstance(data, dict):
        parser.error(f"{where}: expected an object of flag values, got {type(data).__name__}")
    recipe = parser.get_default("recipe")
    if isinstance(data.get("flags"), dict) and "recipe" in data:  # a run folder's config.json
        if data["recipe"] != recipe:
            parser.error(
                f"{where} is the config.json of a {data['recipe']} run; this is {recipe}.py: "
                f"run recipes/{data['recipe']}.py --config {path}"
            )
        skipped = ("output_dir", "recipe", *_COMMAND_LINE_ONLY)
        data = {key: value for key, value in recorded_flags(data).items() if key not in skipped}
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(key for key in values if key not in actions)
    if unknown:
        parser.error(f"{where}: unknown flags {', '.join(unknown)} (not flags of {recipe}.py)")
    refused = [key for key in _COMMAND_LINE_ONLY if key in values]
    if refused:
        parser.error(f"{where}: {', '.join(refused)} can only be given on the command line")
    return {key: _config_value(parser, actions[key], value, where) for key, value in values.items()}


def _config_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, where: str) -> Any:
    """A file's ``value`` for ``action``'s flag, through the flag's type and choices (numbers go through their
    text, so ``8/255`` and YAML's ``1e-3``, read as text, parse as on the command line)."""
    flag = action.option_strings[0]
    if value is None:
        return None
    if action.nargs == 0:  # switches: store_true, --x/--no-x
        if not isinstance(value, bool):
            parser.error(f"{where}: {flag} takes true or false, got {json.dumps(value)}")
        return value
    listed = action.nargs in ("*", "+")
    if listed != isinstance(value, list) or (action.nargs == "+" and not value):
        expected = "a list" if listed else "a single value"
        parser.error(f"{where}: {flag} takes {expected}, got {json.dumps(value)}")
    items = value if listed else [value]
    converted = []
    for item in items:
        if isinstance(item, (dict, list, bool)) and action.type is not None:
            parser.error(f"{where}: {flag}: invalid value {json.dumps(item)}")
        try:
            item = action.type(str(item)) if action.type is not None else item
        except (argparse.ArgumentTypeError, ValueError) as err:
            parser.error(f"{where}: {flag}: {err}")
        if not isinstance(item, str) and action.type is None:
            parser.error(f"{where}: {flag} takes text, got {json.dumps(item)}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"{where}: {flag}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if listed else converted[0]


def check_resumed_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, recipe_defaults: dict[str, Any]
) -> None:
    """Exit (``parser.error``) unless every flag that decides what the run computes is the one its config.json
    recorded (``robustmix.runs.folder.flag_differences``): a resumed run continues one computation."""
    output = Path(args.output_dir)

    def default(name: str) -> Any:  # the value a run that predates the flag ran with
        value = parser.get_default(name)
        if value is None:
            value = PRESETS.get(args.preset, {}).get(name)
        if value is None and name in recipe_defaults:
            value = recipe_defaults[name](args) if callable(recipe_defaults[name]) else recipe_defaults[name]
        return value

    try:
        differences = flag_differences(read_json(output / CONFIG_FILE), vars(args), default)
    except (FileNotFoundError, ValueError) as err:
        parser.error(f"--resume: the flags of the run in {output} cannot be checked: {err}")
    if differences:
        listed = "; ".join(
            f"--{name.replace('_', '-')} {json.dumps(saved)} there, {json.dumps(now)} here"
            for name, saved, now in differences
        )
        planned = {"epochs", "max_steps"} & {name for name, _, _ in differences}
        why = " (the lr schedule spans the planned steps: training further is a new run)" if planned else ""
        parser.error(
            f"--resume: the run in {output} was started with other flags: {listed}{why}. A resumed run continues "
            f"the same computation: start a new run with another --output-dir, or one that starts from this "
            f"run's final weights with --init-from {output}"
        )
