"""A run's output folder: what may be written into it, checkpoints, the metrics log, and resume checks.

The rule this module enforces is that nothing a run wrote is ever deleted or silently replaced:

* a fresh run refuses a folder that already holds an earlier run's outputs (``RUN_OUTPUTS``); a
  ``config.json`` alone is not an output (it is written at start-up, before anything is trained,
  so a run killed before its first checkpoint leaves only that) and is replaced;
* ``resume`` continues from ``last.pt``; without one it starts a fresh run only where nothing was
  ever saved, and refuses a folder whose outputs it could not continue;
* a resumed run may change only the settings in ``RESUME_MAY_CHANGE``; anything else that differs
  from the stored configuration is refused, naming the flag and both values. Settings are compared
  by their flat names (the flags'; :func:`tolgate_flows.train.stored_settings` reads them from a
  stored configuration in the nested layout or in the flat one of earlier runs).

``metrics.jsonl`` is appended one line per epoch, so a crash mid-write leaves a torn last line: it
is dropped with a warning (the resumed run writes that epoch again). A damaged line anywhere else
is an error naming the file and line: that is not something a crash produces.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.jsonl"
# Everything a run writes apart from config.json; any of them marks the folder as holding a run.
RUN_OUTPUTS = (METRICS_FILE, LAST_CHECKPOINT, "best.pt", "summary.json", "curves.png", "tolerances.png", "samples.png")

# Settings (flat names) a resumed run may change: where and how it runs, how long, and what it
# evaluates and writes at the end. Everything else shapes the training trajectory (or the meaning of
# the metrics already logged) and must equal the stored value. ``epochs`` is the exception under a
# scheduled tolerance, whose schedule spans the run (see :func:`resume_conflicts`).
RESUME_MAY_CHANGE = frozenset(
    {
        "epochs",
        "device",
        "progress_bar",
        "eval_batch_size",
        "max_eval_batches",
        "recheck_tols",
        "sample_every",
        "max_num_steps",
        "data_dir",
        "out",
    }
)
# Settings whose command-line flag is not ``--`` + the name with dashes.
_FLAG_OF = {"progress_bar": "--no-progress", "gate_mean_log10": "--gate-mean-from"}


class RunFolderError(ValueError):
    """An output folder cannot be used as asked (it holds an earlier run, has nothing to resume, or
    holds a damaged file). The message names the folder or file and what to do instead."""


def flag_of(name: str) -> str:
    """The command-line flag of the configuration field ``name`` (``lr`` -> ``--lr``)."""
    return _FLAG_OF.get(name, "--" + name.replace("_", "-"))


def run_outputs(out: Path) -> list[str]:
    """The names of ``RUN_OUTPUTS`` present in ``out`` (empty when it does not exist)."""
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


def check_output_folder(out: Path, resume: bool) -> bool:
    """Check that a run may write into ``out``; return whether it resumes from ``out/last.pt``.

    Raises :class:`RunFolderError` (nothing in the folder touched) when a fresh run would replace
    an earlier run's outputs, or ``resume`` finds outputs but no ``last.pt`` to continue them.
    """
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} exists and is not a folder")
    present = run_outputs(out)
    if not resume:
        if present:
            raise RunFolderError(
                f"{out} already holds an earlier run ({', '.join(present)}); nothing was changed. "
                "Continue it with --resume or choose a new --out"
            )
        return False
    if (out / LAST_CHECKPOINT).exists():
        return True
    if present:
        raise RunFolderError(
            f"{out} holds an earlier run ({', '.join(present)}) but no {LAST_CHECKPOINT} to resume from; "
            "nothing was changed. Choose a new --out"
        )
    return False


def stored_config(out: Path) -> dict[str, Any] | None:
    """The configuration of the run in ``out``: that of ``last.pt`` (what its state was trained
    with), else ``config.json``, else ``None``. It is as the run wrote it: nested, or flat if an
    earlier version wrote it (:meth:`tolgate_flows.train.TrainConfig.from_dict` reads both)."""
    if (out / LAST_CHECKPOINT).exists():
        config = load_checkpoint(out / LAST_CHECKPOINT, torch.device("cpu")).get("config")
        if isinstance(config, dict):
            return config
    path = out / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise RunFolderError(f"{path} does not hold a configuration (a JSON object)")
    return config


def resume_conflicts(stored: Mapping[str, Any], new: Mapping[str, Any], completed_epochs: int) -> list[str]:
    """Why ``new`` cannot continue a run stored with ``stored``: one phrase per refused setting
    (flag, stored value, new value); empty when it can. Both map flat setting names to values
    (``TrainConfig.settings()``, ``stored_settings``). Settings the stored configuration lacks
    (written by an older version) are not compared."""
    problems = [
        f"{flag_of(name)} (stored {stored[name]!r}, now {value!r})"
        for name, value in new.items()
        if name in stored and name not in RESUME_MAY_CHANGE and _differs(stored[name], value)
    ]
    epochs_changed = "epochs" in stored and stored["epochs"] != new.get("epochs")
    if epochs_changed and new.get("tolerance") == "scheduled":
        problems.append(
            f"--epochs (stored {stored['epochs']!r}, now {new.get('epochs')!r}): a scheduled tolerance spans the run"
        )
    if new.get("epochs", completed_epochs) < completed_epochs:
        problems.append(f"--epochs {new['epochs']!r}: {completed_epochs} epochs are already complete")
    return problems


def _differs(stored: Any, new: Any) -> bool:
    # JSON and torch.save keep lists as lists; tuples from code compare equal to them here.
    if isinstance(stored, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(stored) != list(new)
    return stored != new


def check_resume(stored: Mapping[str, Any], new: Mapping[str, Any], completed_epochs: int, out: Path) -> None:
    """Raise :class:`RunFolderError` naming every setting of ``new`` that may not change on resume."""
    problems = resume_conflicts(stored, new, completed_epochs)
    if problems:
        allowed = ", ".join(sorted(flag_of(name) for name in RESUME_MAY_CHANGE))
        raise RunFolderError(
            f"--resume cannot change {'; '.join(problems)} of the run in {out}. "
            f"Only {allowed} may change; start a new --out for a different configuration"
        )


# ----------------------------------------------------------------------------- files


def save_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename: ``path`` is the old file or the new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint loaded with ``weights_only=True``; :class:`RunFolderError` if it cannot be read."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise RunFolderError(f"cannot load checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise RunFolderError(f"{path} is not a checkpoint of this program (it holds a {type(state).__name__})")
    return state


def read_history(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (empty when it does not exist).

    A torn last line (a crash mid-write) is dropped with a warning; a damaged line before it raises
    :class:`RunFolderError` naming the file and line.
    """
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    history = []
    for k, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(lines) - 1:
                warnings.warn(f"{path}: dropped its partial last line {number} (a crash mid-write?)", stacklevel=2)
                break
            raise RunFolderError(f"{path}, line {number}: not a JSON record ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RunFolderError(f"{path}, line {number}: not an epoch record")
        history.append(record)
    return history


def write_history(history: list[dict], path: Path) -> None:
    """Replace ``metrics.jsonl`` by ``history`` atomically (a crash leaves the old file or the new one)."""
    write_text_atomic("".join(json.dumps(h) + "\n" for h in history), path)
