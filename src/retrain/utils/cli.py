"""Config mistakes caught at the door: the closest valid key for a typo, and wrong types before any data is read.

Hydra rejects an unknown key while composing, before our code runs, so `with_config_hints` wraps the
`@hydra.main` function: when Hydra has failed, it replays the overrides one by one to find the ones that do
not compose and prints the closest valid key under Hydra's own message. Hydra also types data.* and model.*
(utils/schemas.py); `check_types` does the same for the nodes that build other libraries' objects
(`_target_`: trainer, optimizer, callbacks...), from their signatures. Kept free of torch and Lightning, so
a typo is reported in about a second.
"""

from __future__ import annotations

import difflib
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from retrain.errors import ConfigError
from retrain.utils.schemas import register_schemas

_EXAMPLES = {bool: "true", int: "10", float: "0.01", str: "text"}


def with_config_hints(entry: Callable[[], object], *, config_dir: Path, config_name: str) -> None:
    """Run a `@hydra.main` function; when Hydra rejects an override, add the valid key that was probably meant."""
    try:
        entry()
    except SystemExit as stop:
        if stop.code not in (0, None) and not HydraConfig.initialized():
            _print_hints(config_dir, config_name)
        raise
    except Exception:  # HYDRA_FULL_ERROR=1: Hydra raises instead of printing and exiting
        if not HydraConfig.initialized():
            _print_hints(config_dir, config_name)
        raise


def _print_hints(config_dir: Path, config_name: str) -> None:
    script = Path(sys.argv[0]).name
    for line in override_hints(sys.argv[1:], config_dir=config_dir, config_name=config_name, script=script):
        print(line, file=sys.stderr)


def override_hints(
    overrides: Sequence[str], *, config_dir: Path, config_name: str, script: str = "train.py"
) -> list[str]:
    """One hint per override whose key is in no config, naming the closest valid key; [] when none is found."""
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except Exception:  # a syntax error: Hydra's own message already points at it
        return []
    hints = []
    register_schemas()  # conf/data and conf/model name them in their defaults
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
            accepted: list[str] = []
            for override in parsed:
                line = _single_value(override)
                if line is None or override.key_or_group.split(".")[0] == "hydra":
                    continue
                if _composes(config_name, [*accepted, line]):
                    accepted.append(line)
                elif override.type == OverrideType.CHANGE:
                    known = _known_keys(compose(config_name, overrides=accepted, return_hydra_config=True))
                    if override.key_or_group not in known:
                        hints.append(_hint(override.key_or_group, known, script))
    finally:
        GlobalHydra.instance().clear()
    return hints


def _single_value(override: Override) -> str | None:
    """The override as `key=value`; a sweep counts as its first value, since only its key is checked."""
    if not override.is_sweep_override():
        return str(override.input_line)
    try:
        first = next(override.sweep_string_iterator())
    except Exception:  # interval sweeps (Optuna) have no first value
        return None
    return f"{override.get_key_element()}={first}"


def _composes(config_name: str, overrides: list[str]) -> bool:
    try:
        compose(config_name, overrides=overrides)
    except Exception:  # ConfigCompositionException, MissingConfigException, OmegaConf errors
        return False
    return True


def _known_keys(cfg: DictConfig) -> set[str]:
    """Every dotted key of the composed config, plus the config group names (`trainer`, `model/optimizer`)."""
    groups = {group for group in cfg.hydra.runtime.choices if not group.startswith("hydra")}
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return groups | set(_dotted(container))


def _dotted(node: dict[Any, Any], prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        yield prefix + str(key)
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")


def _hint(key: str, known: set[str], script: str) -> str:
    parent = key.rpartition(".")[0]
    # Siblings first: `model.frezze` should find `model.freeze` before any look-alike elsewhere.
    siblings = sorted(k for k in known if k.rpartition(".")[0] == parent)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    close = close or difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    listing = f"`python {script} --cfg job` prints every key"
    if not close:
        return f"hint: {key} is not a key of this config; {listing}."
    return f"hint: {key} is not a key of this config; did you mean {close[0]}? ({listing})"


def check_types(cfg: DictConfig) -> None:
    """Raise ConfigError when a `_target_` node's value cannot be what its class takes, before any data is read.

    Only clear mismatches are reported (a word where a number or a bool is expected, a number outside a
    Literal); arguments typed as anything richer are left for the class to judge.
    """
    problems = []
    for key, target, node in _configured_objects(cfg):
        try:
            hints = _init_hints(get_object(target))
        except Exception:  # an unknown _target_: instantiate reports it with its own message
            continue
        written = OmegaConf.to_container(node, resolve=False)  # as typed, before interpolation
        assert isinstance(written, dict)
        for name in node:
            if not isinstance(name, str) or name.startswith("_") or name not in hints:
                continue
            try:
                value = node[name]
            except Exception:  # an interpolation that cannot resolve yet; the task reports it
                continue
            if OmegaConf.is_config(value):
                continue
            if _accepts(value, hints[name]) is False:
                raw = written[name]
                problems.append((raw != value, f"{key}.{name}", raw, value, target, name, hints[name]))
    if problems:
        # A value typed by the user comes before the interpolations that copy it (scheduler.T_max).
        _, full_key, raw, value, target, name, hint = min(problems, key=lambda p: p[0])
        raise ConfigError(_type_message(full_key, raw, value, target, name, hint))


def _configured_objects(cfg: DictConfig) -> Iterator[tuple[str, str, DictConfig]]:
    """(dotted key, target name, node) for every node with a `_target_`."""
    # items_ex(resolve=False): `${hydra:...}` values cannot resolve outside a Hydra run, and need not.
    stack = [(str(k), v) for k, v in cfg.items_ex(resolve=False) if isinstance(v, DictConfig)]
    while stack:
        key, node = stack.pop(0)
        if key == "hydra":
            continue
        if "_target_" in node:
            yield key, str(node._target_), node
        stack += [(f"{key}.{k!s}", v) for k, v in node.items_ex(resolve=False) if isinstance(v, DictConfig)]


def _init_hints(target: Callable[..., Any]) -> dict[str, Any]:
    """Parameter annotations of a class's __init__ (through its bases, for **kwargs pass-throughs) or a function."""
    if inspect.isclass(target):
        functions = [klass.__dict__["__init__"] for klass in target.__mro__ if "__init__" in klass.__dict__]
    else:
        functions = [target]
    hints: dict[str, Any] = {}
    for function in functions:
        try:
            found = typing.get_type_hints(inspect.unwrap(function))
        except Exception:  # annotations naming types only imported for type checkers
            continue
        for name, hint in found.items():
            hints.setdefault(name, hint)
    hints.pop("return", None)
    return hints


def _accepts(value: Any, hint: Any) -> bool | None:
    """True or False when the value clearly fits the annotation or not; None when this check cannot tell."""
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        verdicts = [_accepts(value, arm) for arm in typing.get_args(hint)]
        if True in verdicts:
            return True
        return None if None in verdicts else False
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return None


def _type_message(key: str, raw: Any, value: Any, target: str, name: str, hint: Any) -> str:
    shown = f"{key}={raw}" if raw == value else f"{key}={raw} (= {value!r})"
    expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    expected = expected.replace("NoneType", "None")
    kind = _example(hint)
    fix = f"e.g. {key}={kind}" if kind else "a value of that type"
    return (
        f"{shown} has the wrong type: {target} takes {name} as {expected}, but got {type(value).__name__} "
        f"{value!r}. Nothing was read or trained. Fix: pass {fix}."
    )


def _example(hint: Any) -> str | None:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return str(args[0]).lower() if isinstance(args[0], bool) else str(args[0])
    for candidate in (hint, *args):
        if candidate in _EXAMPLES:
            return _EXAMPLES[candidate]
    for arg in args:
        if (example := _example(arg)) is not None:
            return example
    return None


def set_on_command_line(overrides: Iterable[str], key: str) -> bool:
    """Whether the command line set `key` (`key=`, `+key=`, `++key=`): the user's choice wins over a default."""
    return any(str(o).split("=", 1)[0].lstrip("+~") == key for o in overrides)
