"""`kn-ray edit OUT`: suppress / amplify / update / erase experiments on the knowledge neurons."""

from __future__ import annotations

import json
from dataclasses import replace

from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import add_progress_flag
from kn_ray.placement import Placement
from kn_ray.stages.edit.options import EditOptions


def register(sub) -> None:
    p = sub.add_parser("edit", help="knowledge-neuron experiments: suppress, amplify, update, erase",
                       description="Reads OUT/prompts, OUT/knowledge_neurons and OUT/relation_neurons (run "
                                   "`kn-ray aggregate OUT` first); writes OUT/edits (parts per op) and "
                                   "its summary beside it. The model is edited in memory only. It loads as the "
                                   "run loaded it (run.json); the placement flags, the same as `kn-ray attribute`'s, "
                                   "change that.")
    p.add_argument("out", help="output directory of `kn-ray attribute` + `kn-ray aggregate`: a path or URI")
    declared.add_flags(p, EditOptions)
    declared.add_flags(p, Placement, defaults_from="the run's")
    p.add_argument("--keep-shared-neurons", action="store_true", help="update: edit all the fact's ig neurons")
    p.add_argument("--save", metavar="DIR", help="apply one update (--fact-id) or erase (--relation) and save the "
                                                  "edited model to DIR (safetensors; a path or URI) instead of "
                                                  "experimenting")
    add_progress_flag(p, "--quiet")  # --quiet: its spelling before
    p.set_defaults(func=run)


def run(args) -> int:
    from kn_ray.stages.edit.stage import run_edits, save_edit

    options = declared.from_args(EditOptions, args, placement=declared.overrides(Placement, args))
    if args.keep_shared_neurons:
        options = replace(options, settings=replace(options.settings, shared_share=None))
    if args.save:
        edit = save_edit(args.out, options, args.save)
        print(json.dumps(dict(saved=str(args.save), **edit), indent=2))
        return 0
    summary = run_edits(args.out, options, progress=not args.no_progress)
    print(summary["text"])
    return 0
