"""The batch pipeline: facts -> prompts -> shards -> Ray actors -> Parquet (docs/pipeline.md).

facts    reading PARAREL / JSON Lines; bad records become rows, never exceptions
prompts  (fact, template) -> prompt and target for masked or causal LMs; stable ids
plan     deterministic shards of whole facts
options  validated run options (the CLI and job specs build them)
tables   results as Arrow tables (the Parquet contract, docs/output-schema.md)
rundir   the run directory on any filesystem: run.json, per-attempt parts, done markers, readers
worker   computing one shard with the engine (no Ray)
execute  the Ray actor pool and dispatcher (also `kn-ray edit`'s); shards committed by the driver
         (the only module importing Ray)
driver   one run end to end; report: the end-of-run text; faults: test hooks
"""
