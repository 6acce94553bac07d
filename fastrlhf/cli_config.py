"""The ``fastrlhf train <algo>`` command line, generated from the algorithm's config dataclass.

- One flag per config field: ``--field-name`` (``_`` -> ``-``), typed from the annotation, its
  help the docstring line under the field (the dataclasses document fields that way); bools are
  ``--flag/--no-flag``; ``Optional`` fields take ``none``; fields named in :data:`CHOICES` are
  restricted to the package's own tuples. Every flag defaults to ``None`` ("not given"), so the
  precedence is: dataclass default < embedded-task default < ``--config run.yaml`` < command line.
- Run options (model, data, rewards, eval, logging) that are not config fields, each shown only
  for the algorithms that use it.
- :func:`apply_config_file`, :func:`resolve_pretrained` (local path or Hugging Face cache, never
  online) and :class:`TensorboardWriter`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import typing
from typing import Any, Dict, List, Optional

NONE = "none"  # an Optional field's "None" on the command line (and in args.json)
ROLLOUT = ("grpo", "ppo", "rrhf", "rft")

# Run options: (flags, argparse kwargs, the algorithms showing it; None: all).
RUN_OPTIONS = [
    (("--config",), dict(metavar="YAML", help="YAML file of options (config field names, '_' or '-'); "
                                             "the command line wins"), None),
    (("--model",), dict(help="causal-LM checkpoint: a local path or a hub id already in the local Hugging Face "
                              "cache (default: the embedded tiny Llama)"), None),
    (("--dataset",), dict(help="JSONL in TRL's format (prompt-only for grpo/ppo/rrhf/rft, preference for dpo/rm; "
                                "rm also takes {prompt, responses, scores} rankings): a local file or a cached "
                                "hub dataset id"), None),
    (("--eval-dataset",), dict(help="held-out JSONL of the same format: greedy accuracy for prompt rows with an "
                                     "answer, reward accuracy for preference pairs"), None),
    (("--eval-every",), dict(type=int, metavar="N", help="evaluate on the eval split every N steps (logged to "
                                                         "metrics.jsonl)"), None),
    (("--output-dir",), dict(help="default: runs/<algo>-<timestamp>"), None),
    (("--resume",), dict(metavar="DIR", help="continue the run in DIR from its latest checkpoint"), None),
    (("--overwrite",), dict(action="store_true", default=None, help="replace a previous run in --output-dir"),
     None),
    (("--reward-fn",), dict(action="append", metavar="MOD:FN", help="reward 'module:function' or "
                                                                   "'file.py:function'; repeat for several"),
     ROLLOUT),
    (("--reward-weights",), dict(type=float, nargs="+", metavar="W", help="one weight per --reward-fn (default "
                                                                          "1.0 each): the reward is the weighted sum"),
     ROLLOUT),
    (("--reward-model",), dict(help="sequence-classification checkpoint scoring completions (e.g. the final/ of "
                                     "a `train rm` run): local path or cached hub id"), ROLLOUT),
    (("--warmup-steps",), dict(type=int, help="supervised warm-up steps of the embedded model"), None),
    (("--task-max-operand",), dict(type=int, help="embedded task: operands drawn from [0, N) (default 10)"), None),
    (("--device",), dict(help="default: cuda if available (cuda:LOCAL_RANK under a launcher), else cpu"), None),
    (("--report-to",), dict(choices=("none", "tensorboard"), help="also log metrics to tensorboard "
                                                                  "(<output-dir>/tensorboard; needs tensorboard)"),
     None),
    (("--no-plot",), dict(action="store_true", default=None, help="skip curves.png"), None),
]
# Fields the run options own (the config's output_dir is the run's).
RUN_FIELDS = ("output_dir",)
# Defaults of the command line that differ from the dataclasses'.
CLI_DEFAULTS: Dict[str, Any] = {"seed": 0, "save_every": 100, "task_max_operand": 10}
# Old flag spellings kept working.
ALIASES = {"gradient_accumulation_steps": ("--grad-accum",)}


def _choices() -> Dict[str, Dict[str, tuple]]:
    """Restricted string fields: algorithm ('*': all) -> field -> choices, from the package's own tuples."""
    from .algos.engine import ENGINES
    from .algos.grpo import GRPO_ADVANTAGE_ESTIMATORS
    from .algos.memory import OPTIMIZERS
    from .algos.ppo import PPO_ADVANTAGE_ESTIMATORS

    return {"*": dict(optim=tuple(OPTIMIZERS), distributed=ENGINES,
                      dtype=("auto", "float32", "bfloat16", "float16")),
            "dpo": dict(loss_type=("sigmoid", "hinge", "ipo", "robust")),
            "grpo": dict(advantage_estimator=GRPO_ADVANTAGE_ESTIMATORS),
            "ppo": dict(advantage_estimator=PPO_ADVANTAGE_ESTIMATORS, kl_penalty=("reward", "loss"))}


def config_classes() -> Dict[str, type]:
    from .algos import DPOConfig, GRPOConfig, PPOConfig, RewardModelConfig, RFTConfig, RRHFConfig

    return {"dpo": DPOConfig, "grpo": GRPOConfig, "ppo": PPOConfig, "rm": RewardModelConfig, "rrhf": RRHFConfig,
            "rft": RFTConfig}


def field_docs(cls: type) -> Dict[str, str]:
    """``{field: docstring}`` from the string literal under each field, subclasses overriding bases."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _optional(kind):
    def parse(text: str):
        return NONE if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    parse.optional = True
    return parse


def _field_kwargs(name: str, hint, default, choices) -> Dict[str, Any]:
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is typing.Union and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    shown = "none" if default is None else default
    if base is bool:
        return dict(action=argparse.BooleanOptionalAction, default=None)
    if base is tuple or typing.get_origin(base) is tuple:
        return dict(type=float, nargs="+", default=None, metavar="X", shown=" ".join(map(str, default)))
    if base is Any:  # e.g. lora_target_modules: "all-linear" or a list of names
        return dict(nargs="+", default=None, metavar="NAME", shown=shown)
    kw = dict(type=_optional(base) if optional else base, default=None, shown=shown)
    if choices:
        kw["choices"] = choices + ((NONE,) if optional else ())
    return kw


def add_algo_arguments(p: argparse.ArgumentParser, algo: str) -> None:
    """Every config field of ``algo`` and the run options ``algo`` uses, on ``p``."""
    cls = config_classes()[algo]
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    choices = {**_choices()["*"], **_choices().get(algo, {})}
    for flags, kw, algos in RUN_OPTIONS:
        if algos is None or algo in algos:
            p.add_argument(*flags, **kw)
    g = p.add_argument_group(f"{cls.__name__} fields (python: fastrlhf.algos.{cls.__name__})",
                             "defaults are the dataclass's; the embedded task (no --dataset) tunes steps, lr and "
                             "batch sizes (fastrlhf.cli.TASK_DEFAULTS)")
    for f in dataclasses.fields(cls):
        if f.name in RUN_FIELDS:
            continue
        default = CLI_DEFAULTS.get(f.name, f.default)
        kw = _field_kwargs(f.name, hints[f.name], default, choices.get(f.name))
        shown = kw.pop("shown", default)
        kw["help"] = f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%")
        g.add_argument(f"--{f.name.replace('_', '-')}", *ALIASES.get(f.name, ()), dest=f.name, **kw)


def algo_parser(algo: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fastrlhf train {algo}", add_help=False)
    add_algo_arguments(p, algo)
    return p


def _convert(action: argparse.Action, value: Any, key: str) -> Any:
    """A YAML value through the flag's own type (PyYAML reads ``1e-4`` as a string), lists for list flags."""
    if value is None:  # YAML null: None for an Optional field, else "not given"
        return NONE if getattr(action.type, "optional", False) else None
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if many:
        values = value if isinstance(value, list) else [value]
        return [action.type(str(v)) if action.type and isinstance(v, str) else v for v in values]
    if isinstance(value, list):
        raise SystemExit(f"--config: {key!r} takes one value, got a list")
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise SystemExit(f"--config: {key!r} must be true or false, got {value!r}")
        return value
    if action.type is not None and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            value = action.type(str(value))
        except ValueError as e:
            raise SystemExit(f"--config: {key!r}: {e}") from None
    if action.choices and value not in action.choices:
        raise SystemExit(f"--config: {key!r} must be one of {tuple(action.choices)}, got {value!r}")
    return value


def apply_config_file(args: argparse.Namespace) -> None:
    """Fill the options not given on the command line from ``args.config`` (a YAML mapping)."""
    path = getattr(args, "config", None)
    if not path:
        return
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    actions = {a.dest: a for a in algo_parser(args.algo)._actions if a.dest not in ("help", "config")}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions:
            near = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SystemExit(f"--config {path}: unknown key {raw_key!r} for fastrlhf train {args.algo}{hint}")
        if getattr(args, key, None) is None:  # the command line wins
            setattr(args, key, _convert(actions[key], value, str(raw_key)))


def config_values(args: argparse.Namespace, cls: type, base: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` overridden by the options given (command line or YAML), as ``cls``'s field values."""
    hints = typing.get_type_hints(cls)
    values = {k: v for k, v in {**CLI_DEFAULTS, **base}.items()}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is None or f.name in RUN_FIELDS:
            continue
        hint = hints[f.name]
        if v == NONE:
            v = None
        elif hint is tuple or typing.get_origin(hint) is tuple:
            v = tuple(v)
        elif hint is Any and isinstance(v, list) and len(v) == 1:
            v = v[0]
        values[f.name] = v
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def option(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    """``args.name`` when given, else the command line's default (old args.json files lack new names)."""
    v = getattr(args, name, None)
    return CLI_DEFAULTS.get(name, default) if v is None else v


# ----------------------------------------------------------------------------------------
# models and datasets: a local path, or a hub id already in the local Hugging Face cache
# ----------------------------------------------------------------------------------------


def resolve_pretrained(name: Optional[str], flag: str, repo_type: str = "model") -> Optional[str]:
    """An absolute local path for ``name``: itself when it exists, else its snapshot in the HF cache.

    Never goes online (``local_files_only=True``): a hub id that is not cached is a clear error.
    """
    if not name or os.path.exists(name):
        return os.path.abspath(name) if name else name
    parts = name.split("/")
    looks_like_id = len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not name.endswith(
        (".json", ".jsonl", ".py"))
    if not looks_like_id:
        raise FileNotFoundError(f"{flag} {name!r}: no such file or directory")
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(name, repo_type=repo_type, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, or an invalid id
        raise FileNotFoundError(
            f"{flag} {name!r}: not a local path, and no {repo_type} of that id in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); download it first (`hf download {name}"
            f"{' --repo-type dataset' if repo_type == 'dataset' else ''}`)") from e


def dataset_file(path: str, flag: str, split: str = "train") -> str:
    """A JSONL file: ``path`` itself, or in a dataset directory (a hub snapshot) the one for ``split``."""
    if not os.path.isdir(path):
        return path
    found: List[str] = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                              if f.endswith((".jsonl", ".json")) and not f.startswith("."))
    pick = [f for f in found if split in os.path.basename(f)] or found
    if len(pick) != 1:
        raise FileNotFoundError(f"{flag} {path!r}: expected one {split} .jsonl file in the dataset directory, "
                                f"found {[os.path.relpath(f, path) for f in found] or 'none'}")
    return pick[0]


# ----------------------------------------------------------------------------------------
# tensorboard (optional)
# ----------------------------------------------------------------------------------------


class TensorboardWriter:
    """Scalars of each metrics record under ``<output_dir>/tensorboard``; a clear error without tensorboard."""

    def __init__(self, logdir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise SystemExit("--report-to tensorboard needs the tensorboard package (pip install tensorboard); "
                             "metrics.jsonl is written either way") from e
        self.writer = SummaryWriter(logdir)

    def write(self, record: Dict[str, Any]) -> None:
        step = int(record["step"])
        for key, v in record.items():
            if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(key, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
