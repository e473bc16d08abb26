"""`bertforge <command>`: a run's config comes from defaults, then an optional JSON file, then --field value flags.

    bertforge pretrain                                  # small stacking run on the packaged news corpus
    bertforge pretrain --stages 3:50000,6:70000,12:280000 --hidden_size 768 --num_heads 12 --intermediate_size 3072
    bertforge pretrain --config run.json --resume true
    bertforge finetune                                  # MiniLM on Rotten Tomatoes, plain fine-tuning
    bertforge finetune --recipe romebert --gradient_projection true --data train.tsv --dev_data dev.tsv
    bertforge earlybird                                 # EarlyBERT: ticket search, prune, retrain (MiniLM, RT)
    bertforge convert --checkpoint runs/pretrain/checkpoint.pt --out_dir runs/pretrain/hf   # -> Hugging Face folder
    torchrun --nproc_per_node 2 -m bertforge.train.cli pretrain ...
"""

import argparse
import dataclasses
import json
import sys
import types
import typing

from .checkpoint import CheckpointError
from .classification_data import DataError
from .distributed import RankTimeout
from .earlybird import EarlybirdConfig, earlybird
from .export import ConvertConfig, convert
from .finetune import FinetuneConfig, finetune
from .loop import ConfigError
from .pretrain import PretrainConfig, pretrain
from .run_folder import RunFolderError
from .text import CorpusError
from .tickets import TICKET_FIELDS, TicketSettings

COMMANDS = {"pretrain": (PretrainConfig, pretrain), "finetune": (FinetuneConfig, finetune),
            "earlybird": (EarlybirdConfig, earlybird), "convert": (ConvertConfig, convert)}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(field: dataclasses.Field):
    """str -> value for a field annotated bool, int, float, str, or `X | None` (the text "none" gives None)."""
    annotation = field.type
    optional = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    parse = _parse_bool if base is bool else base

    def convert(text):
        if optional and text.lower() == "none":
            return None
        return parse(text)

    convert.__name__ = getattr(base, "__name__", str(base))
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bertforge", description="Fast BERT training on fused Triton kernels.",
                                     epilog="bertforge bench -h: the benchmarks, one command and one report")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (config_class, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0])
        sub.add_argument("--config", help="JSON file of field values (flags override it)")
        # the ticket's fields after the command's own (argparse lists a group after the plain options)
        ticket = sub.add_argument_group("EarlyBERT ticket search") if issubclass(config_class, TicketSettings) else sub
        for field in dataclasses.fields(config_class):
            group = ticket if field.name in TICKET_FIELDS else sub
            group.add_argument(f"--{field.name}", type=_converter(field), default=argparse.SUPPRESS,
                               help=f"default: {field.default!r}")
    return parser


def _json_problem(field: dataclasses.Field, value) -> str | None:
    """Why a JSON value does not fit a field annotated bool, int, float, str, or `X | None`; None if it fits."""
    annotation = field.type
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return None
    fits = {bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            str: lambda v: isinstance(v, str)}
    if any(fits[kind](value) for kind in allowed if kind in fits):
        return None
    expected = " or ".join("null" if kind is type(None) else kind.__name__ for kind in allowed)
    return f"{field.name} must be {expected}, got {json.dumps(value)}"


def config_from_args(config_class, args: argparse.Namespace):
    """Defaults, then the JSON file, then flags; every problem is reported at once, one line each, before any work."""
    values = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, ValueError) as error:
            raise SystemExit(f"bertforge: cannot read config file {args.config}: {error}") from None
        if not isinstance(values, dict):
            raise SystemExit(f"bertforge: config file {args.config} must hold a JSON object of field values")
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        problems = [f"unknown field {name!r}" for name in sorted(set(values) - set(fields))]
        problems += [p for name, value in values.items() if name in fields
                     for p in [_json_problem(fields[name], value)] if p]
        if problems:
            raise SystemExit(f"bertforge: bad config file {args.config}:\n  " + "\n  ".join(problems))
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    try:
        return config_class(**values)
    except ValueError as error:
        raise SystemExit("bertforge: bad configuration:\n  " + str(error).replace("\n", "\n  ")) from None


# A user's mistake or a run that cannot go on: one line, no traceback.
USER_ERRORS = (CorpusError, CheckpointError, RunFolderError, FloatingPointError, FileNotFoundError,
               FileExistsError, RankTimeout, DataError, ConfigError)


def main(argv=None):
    args = build_parser().parse_args(argv)
    config_class, run = COMMANDS[args.command]
    config = config_from_args(config_class, args)
    try:
        summary = run(config)
    except USER_ERRORS as error:
        raise SystemExit(f"bertforge {args.command}: {error}") from None
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}))


if __name__ == "__main__":
    sys.exit(main())
