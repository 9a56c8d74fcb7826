"""`kn-ray edit OUT`: suppress / amplify / update / erase experiments on the knowledge neurons."""

from __future__ import annotations

import json

from kn_ray.choices import PRECISIONS


def register(sub) -> None:
    p = sub.add_parser("edit", help="knowledge-neuron experiments: suppress, amplify, update, erase",
                       description="Reads OUT/prompts, OUT/knowledge_neurons and OUT/relation_neurons (run "
                                   "`kn-ray aggregate OUT` first); writes OUT/edits/part-<op>-*.parquet and "
                                   "OUT/edits/summary.json. The model is edited in memory only.")
    p.add_argument("out", help="output directory of `kn-ray attribute` + `kn-ray aggregate`")
    p.add_argument("--op", action="append", default=None, metavar="OP",
                   help="suppress, amplify, update, erase; repeat or comma-separate (default: all four)")
    p.add_argument("--model", help="model to edit (default: the run's model from run.json)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: the run's precision")
    p.add_argument("--batch-prompts", type=int, default=32, help="prompts per forward pass (default 32)")
    p.add_argument("--relation", action="append", default=[], help="only this relation (repeatable)")
    p.add_argument("--fact-id", action="append", default=[], help="only this fact (repeatable)")
    p.add_argument("--max-facts", type=int, help="at most N facts per relation, a seeded sample (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample and random control (default 0)")
    p.add_argument("--control-prompts", type=int, default=10,
                   help="suppress/amplify: other-relation prompts per fact (default 10)")
    p.add_argument("--ppl-facts", type=int, default=5, help="update: facts per perplexity check (default 5)")
    p.add_argument("--lambda1", type=float, default=1.0, help="update: weight of the old object (default 1)")
    p.add_argument("--lambda2", type=float, default=8.0, help="update: weight of the new object (default 8)")
    p.add_argument("--shared-share", type=float, default=0.1,
                   help="update: leave out the fact's neurons that more than this share of its relation's other "
                        "facts also have (default 0.1, as the authors)")
    p.add_argument("--keep-shared-neurons", action="store_true", help="update: edit all the fact's ig neurons")
    p.add_argument("--erase-top", type=int, default=20, help="erase: top relation neurons per relation (default 20)")
    p.add_argument("--erase-value", choices=("zero", "unk"), default="zero",
                   help="erase: set value slots to zero or to the unknown token's embedding (default zero)")
    p.add_argument("--erase-other-prompts", type=int, default=500,
                   help="erase: other relations' prompts checked per relation (default 500)")
    p.add_argument("--unit-facts", type=int, default=16, help="facts per work unit (default 16)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors; 1 runs in this process (default 1)")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("--save", metavar="DIR", help="apply one update (--fact-id) or erase (--relation) and save the "
                                                  "edited model to DIR (safetensors) instead of experimenting")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_ops(values: list[str] | None) -> tuple[str, ...]:
    """`--op a,b --op c` -> (a, b, c); () when not given."""
    ops = [op.strip() for value in values or () for op in value.split(",") if op.strip()]
    return tuple(dict.fromkeys(ops))


def run(args) -> int:
    from kn_ray.stages.edit.corpus import OPS, EditSettings
    from kn_ray.stages.edit.stage import EditOptions, run_edits, save_edit

    settings = EditSettings(seed=args.seed, max_facts=args.max_facts, control_prompts=args.control_prompts,
                            ppl_facts=args.ppl_facts, lambda1=args.lambda1, lambda2=args.lambda2,
                            shared_share=None if args.keep_shared_neurons else args.shared_share,
                             erase_top=args.erase_top,
                            erase_other_prompts=args.erase_other_prompts, erase_value=args.erase_value)
    options = EditOptions(ops=parse_ops(args.op) or OPS, settings=settings, model=args.model, precision=args.precision,
                          batch_prompts=args.batch_prompts, relations=tuple(args.relation),
                          fact_ids=tuple(args.fact_id), unit_facts=args.unit_facts, workers=args.workers,
                          local=args.local)
    if args.save:
        edit = save_edit(args.out, options, args.save)
        print(json.dumps(dict(saved=str(args.save), **edit), indent=2))
        return 0
    summary = run_edits(args.out, options, progress=not args.quiet)
    print(summary["text"])
    return 0
