"""`kn-ray edit OUT`: suppress / amplify / update / erase experiments on the knowledge neurons.

Reads OUT/prompts, OUT/knowledge_neurons and OUT/relation_neurons (run `kn-ray aggregate OUT`
first); writes OUT/edits (parts per op) and its summary beside it. The model is edited in memory
only. It loads as the run loaded it (run.json); the placement flags, the same as
`kn-ray attribute`'s, change that."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from kn_ray.fields import option
from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import Progress, RunDir, add_command
from kn_ray.placement import Placement
from kn_ray.stages.edit.options import EditOptions


@dataclass(frozen=True)
class EditCommand:
    """What only the command line says: shorthands and the save mode."""

    keep_shared_neurons: bool = option(False, "update: edit all the fact's ig neurons (--shared-share none)")
    save: str | None = option(None, "apply one update (--fact-id) or erase (--relation) and save the edited model to "
                                    "DIR (safetensors; a path or URI) instead of experimenting", metavar="DIR")


def register(sub) -> None:
    p = add_command(sub, "edit", run, description=__doc__,
                    help="knowledge-neuron experiments: suppress, amplify, update, erase")
    declared.add_flags(p, RunDir)
    declared.add_flags(p, EditOptions)
    declared.add_flags(p, Placement, defaults_from="the run's")
    declared.add_flags(p, EditCommand)
    declared.add_flags(p, Progress)


def run(args) -> int:
    from kn_ray.stages.edit.stage import run_edits, save_edit

    options = declared.from_args(EditOptions, args, placement=declared.overrides(Placement, args))
    if args.keep_shared_neurons:
        options = replace(options, settings=replace(options.settings, shared_share=None))
    if args.save:
        edit = save_edit(args.out, options, args.save)
        print(json.dumps(dict(saved=str(args.save), **edit), indent=2))
        return 0
    summary = run_edits(args.out, options, progress=Progress.apply(args))
    print(summary["text"])
    return 0
