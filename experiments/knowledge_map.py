"""Is a run's knowledge-neuron map a map of knowledge? Counts behind RESULTS "A map of knowledge".

For each aggregated run directory: its facts and how many the model predicts (some prompt with
gold_rank 1, from the probe), the knowledge-neuron rows of every level (knowledge_neurons plus
shared_neuron_facts: the paper's rule) and of the fact level, the share of those rows that belong
to facts the model predicts in no prompt, the share that are neurons of at least a quarter of
all facts (the issue's "generic" test), and how many relations the most shared neuron spans.

    PYTHONPATH=. python experiments/knowledge_map.py /work/data/before-smollm2 /work/data/after-smollm2 ...
"""

from __future__ import annotations

import sys

import pandas as pd

from kn_ray.pipeline.rundir import RunDirectory


def rows(run: RunDirectory, table: str) -> pd.DataFrame:
    return run.read(table).to_pandas() if run.parts(table) else pd.DataFrame(columns=["fact_id", "relation", "layer", "neuron", "method"])


def summary(path: str) -> dict:
    run = RunDirectory(path)
    prompts = run.read("prompts").to_pandas()
    usable = prompts[(prompts.status == "ok") & prompts.known.fillna(True).astype(bool)]
    top1 = set(prompts[prompts.gold_rank == 1].fact_id)
    facts = set(usable.fact_id)
    kn = rows(run, "knowledge_neurons")
    every = pd.concat([kn, rows(run, "shared_neuron_facts")], ignore_index=True)
    every = every[every.method == "ig"].drop_duplicates(["fact_id", "layer", "neuron"])
    fact_level = every[every.get("level", pd.Series("fact", index=every.index)) == "fact"] if "level" in every else every
    per_neuron = every.groupby(["layer", "neuron"]).agg(n_facts=("fact_id", "nunique"), n_rel=("relation", "nunique"))
    common = per_neuron[per_neuron.n_facts >= 0.25 * len(facts)].index
    key = pd.MultiIndex.from_frame(every[["layer", "neuron"]])
    out = dict(run=path.rstrip("/").split("/")[-1], facts=len(facts), facts_top1=len(facts & top1),
               relations=usable.relation.nunique(), prompts=len(usable),
               kn_rows=len(every), kn_rows_fact_level=len(fact_level),
               share_rows_of_unpredicted_facts=float((~every.fact_id.isin(top1)).mean()) if len(every) else float("nan"),
               share_rows_of_quarter_neurons=float(key.isin(common).mean()) if len(every) else float("nan"),
               max_relations_of_a_neuron=int(per_neuron.n_rel.max()) if len(per_neuron) else 0)
    if len(per_neuron):
        top = per_neuron.sort_values(["n_facts", "n_rel"], ascending=False).head(1)
        (layer, neuron), row = next(iter(top.iterrows()))
        out["most_shared"] = f"L{layer} N{neuron}: {row.n_facts} facts in {row.n_rel} relations"
    return out


if __name__ == "__main__":
    table = pd.DataFrame([summary(p) for p in sys.argv[1:]]).set_index("run").T
    print(table.to_string())
