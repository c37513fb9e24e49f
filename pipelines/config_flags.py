"""Command-line flags generated from a pydantic config class, so every config field is a flag with its help.

`add_config_flags(parser, EmbedderConfig)` adds `--recipe`, `--pooling`, ... (booleans that default to True get
`--no-NAME`); `config_from_flags(args, EmbedderConfig)` builds the validated object from what was given;
`with_flags(config, args, {"embedder": EmbedderConfig, ...})` is the one "flags override the file" rule that
`vlm-embed backfill` and `vlm-embed serve` share.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def add_config_flags(
    parser: argparse.ArgumentParser, config_cls: type[BaseModel], skip: tuple[str, ...] = ()
) -> None:
    group = parser.add_argument_group(f"{config_cls.__name__} options")
    for name, field in config_cls.model_fields.items():
        if name in skip:
            continue
        annotation = _unwrap_optional(field.annotation)
        help_text = field.description or ""
        if annotation is bool:
            if field.default is True:
                group.add_argument(
                    _flag(f"no_{name}"),
                    dest=name,
                    action="store_false",
                    default=None,
                    help=f"turn off: {help_text}",
                )
            else:
                group.add_argument(_flag(name), dest=name, action="store_true", default=None, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": None}
        if typing.get_origin(annotation) is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif annotation in (int, float):
            kwargs["type"] = annotation
            kwargs["metavar"] = name.upper()
        else:
            kwargs["metavar"] = name.upper()
        default = field.default if field.default is not None else "see above"
        group.add_argument(_flag(name), help=f"{help_text} (default: {default})", **kwargs)


def given_flags(args: argparse.Namespace, config_cls: type[BaseModel]) -> dict[str, Any]:
    """The fields of `config_cls` whose flags were given on the command line (flags default to None)."""
    return {
        name: getattr(args, name) for name in config_cls.model_fields if getattr(args, name, None) is not None
    }


def config_from_flags(args: argparse.Namespace, config_cls: type[BaseModel], **overrides: Any):
    """Only the flags the user gave are passed on; the config's own defaults fill in the rest."""
    given = given_flags(args, config_cls)
    given.update({k: v for k, v in overrides.items() if v is not None})
    return config_cls(**given)


def with_flags(config: BaseModel, args: argparse.Namespace, sections: dict[str, type[BaseModel]]) -> Any:
    """`config` (a file's, validated) with the flags given for each of its `sections` on top, validated again
    as a whole: a flag wins over the file, the file over the defaults."""
    data = config.model_dump()
    for name, section in sections.items():
        data[name] = {**data[name], **given_flags(args, section)}
    return type(config).model_validate(data)
