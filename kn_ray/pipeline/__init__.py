"""The batch pipeline: facts -> prompts -> shards -> Ray actors -> Parquet (docs/pipeline.md).

facts    reading PARAREL / JSON Lines; bad records become rows, never exceptions
prompts  (fact, template) -> prompt and target for masked or causal LMs; stable ids
plan     deterministic shards of whole facts
options  validated run options (the CLI and job specs build them)
neuron_tables  results as Arrow tables (the Parquet contract, docs/output-schema.md)
layout   every file and folder name of the run directory (the catalogue)
uris     local paths and URIs: their filesystem, what may be recorded
storage  files under one root on any filesystem: whole writes, listings, staged folders
record   run.json (RunRecord)
commit   each shard's parts committed exactly once (attempt parts, markers, resume)
rundir   the run directory: run.json, tables and summaries, by the catalogue's names
worker   computing one shard with the engine (no Ray)
ray_env  the environment of the Ray processes (loopback-only local Ray, variables for the actors)
ray_cluster  joining or starting Ray; actors sized to the cluster
executor where tasks run: Ray actors (pool) or one worker in this process (--executor local)
pool     the Ray actor pool (also `kn-ray edit`'s): health pings, tasks in flight; open_pool
dispatch tasks fed to either pool, driver-side retries; run_tasks
execute  attribution shards on the pool, committed by the driver
         (ray_cluster and pool import Ray; executor, dispatch and execute do not)
driver   one run end to end; summary: the end-of-run text; faults: test hooks
"""
