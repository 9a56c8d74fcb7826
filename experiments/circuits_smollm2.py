"""Circuits of PARAREL facts in SmolLM2 (RESULTS.md): EAP-IG edges, faithfulness against random
circuits, relation circuits, the link to knowledge neurons, and two figures.

    flock /tmp/kn-bench.lock python experiments/circuits_smollm2.py --out experiments/circuits
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from kn_ray.engine import Attributor, Prober, load_model
from kn_ray.engine.circuits import EdgeAttributor
from kn_ray.engine.faithfulness import FRACTIONS, circuit_mask, faithfulness_curve, relation_circuit
from kn_ray.pipeline.corrupt import pair_corrupted
from kn_ray.pipeline.facts import Filters, read_facts
from kn_ray.pipeline.prompts import build_prompts


def pick_facts(lm, path, relations, per_relation, probe_limit=150):
    """Per relation, the `per_relation` facts the model gives the highest P(gold) among the first
    `probe_limit` with a partner, on the relation's most common template, each with its
    deterministic corrupted partner."""
    specs = build_prompts(read_facts(path, "pararel", Filters(relations=tuple(relations))), masked=False).prompts
    specs = [s for s in specs if s.status is None]
    tok = lm.tokenizer
    picked = []
    for relation in relations:
        mine = [s for s in specs if s.relation == relation]
        template = Counter(s.template for s in mine).most_common(1)[0][0]
        mine = [s for s in mine if s.template == template]
        mine, partners = pair_corrupted(mine, lambda p: len(tok(p)["input_ids"]))
        mine = [s for s in mine if s.prompt_id in partners][:probe_limit]
        probes = Prober(lm, precision="fp32").probe([s.prompt for s in mine], [s.target for s in mine])
        best = sorted(zip(mine, probes), key=lambda sp: -sp[1].gold_prob)[:per_relation]
        picked += [(s, partners[s.prompt_id], p.gold_prob) for s, p in best]
    return picked


def knowledge_neurons(attr, spec, t=0.2):
    """One prompt's neurons with score >= t x max (the coarse threshold; no sharing rule with one prompt)."""
    [res] = attr.attribute([spec.prompt], [spec.target], n_steps=6, rule="gausslegendre")
    layer, neuron = np.nonzero((res.scores >= t * res.scores.max()) & (res.scores > 0))
    return list(zip(layer.tolist(), neuron.tolist()))


def draw_circuit(graph, scores, k, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    mask = circuit_mask(scores, graph, k)
    g = nx.DiGraph()
    H = graph.heads

    def pos(name, sender):
        if name == "input":
            return (H / 2, -1.0)
        if name == "logits":
            return (H / 2, graph.layers + 0.2)
        layer = int(name[1:].split(".")[0])
        if name.startswith("m"):
            return (H + 1.0, layer + 0.5)
        return (float(name.split(".h")[1]), float(layer))

    for u, v in zip(*np.nonzero(mask)):
        s, r = graph.senders[u], graph.receivers[v]
        g.add_edge(s, r, w=float(scores[u, v]))
    positions = {n: pos(n, True) for n in g.nodes}
    fig, ax = plt.subplots(figsize=(7, 9))
    widths = [0.5 + 4 * abs(d["w"]) / max(abs(scores[mask])) for _, _, d in g.edges(data=True)]
    colors = ["tab:blue" if d["w"] > 0 else "tab:red" for _, _, d in g.edges(data=True)]
    node_colors = ["gold" if n in ("input", "logits") else ("tab:green" if n.startswith("m") else "lightgray") for n in g.nodes]
    nx.draw_networkx(g, positions, ax=ax, width=widths, edge_color=colors, node_color=node_colors, node_size=260,
                     font_size=6, arrowsize=8, connectionstyle="arc3,rad=0.08")
    import textwrap

    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.set_ylabel("layer")
    ax.tick_params(left=True, labelleft=True)
    ax.set_axis_on()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def draw_curves(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for relation, cs in curves.items():
        frac = np.array(FRACTIONS) * 100
        circ = np.median([c["circuit"] for c in cs], axis=0)
        rand = np.median([np.mean(c["random"], axis=0) for c in cs], axis=0)
        line, = ax.plot(frac, circ, marker="o", label=f"{relation} circuit")
        ax.plot(frac, rand, ls="--", color=line.get_color(), label=f"{relation} random")
    ax.set_xscale("log")
    ax.set_xlabel("% of edges kept")
    ax.set_ylabel("faithfulness (median over facts)")
    ax.axhline(1, color="gray", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def redraw(out: Path, n_steps: int):
    saved = json.loads((out / "results.json").read_text())
    fact = next(f for f in saved["facts"] if f["fact_id"] == saved["figure_fact"])
    eap = EdgeAttributor(load_model("smollm2"), precision="fp32")
    [res] = eap.attribute_edges([fact["prompt"]], [fact["target"]], [fact["corrupted"]], n_steps=n_steps)
    draw_circuit(eap.graph, res.scores, 40, f"{fact['prompt']}{fact['target']} (vs. {fact['corrupted']}): "
                 f"top 40 edges by |EAP-IG score|", out / "circuit.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", default="/work/shared/data/pararel")
    ap.add_argument("--relations", default="P1001,P1412,P159")
    ap.add_argument("--per-relation", type=int, default=10)
    ap.add_argument("--n-steps", type=int, default=10)
    ap.add_argument("--top", type=float, default=0.005, help="circuit size as a fraction of all edges")
    ap.add_argument("--share", type=float, default=0.5, help="relation circuit: edges in >= this share of facts")
    ap.add_argument("--out", default="experiments/circuits")
    ap.add_argument("--check-steps", type=lambda t: [int(x) for x in t.split(",") if x], default=[2, 5, 10, 20],
                    help="rules whose completeness residual is measured on the first 6 facts")
    ap.add_argument("--n-random", type=int, default=3)
    ap.add_argument("--redraw", action="store_true", help="only redraw the circuit figure of results.json's fact")
    args = ap.parse_args()
    out = Path(args.out)
    if args.redraw:
        return redraw(out, args.n_steps)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2")
    eap = EdgeAttributor(lm, precision="fp32")
    attr = Attributor(lm, precision="fp32")
    graph = eap.graph
    k = max(1, round(args.top * graph.num_edges))
    t0 = time.time()
    facts = pick_facts(lm, args.facts, args.relations.split(","), args.per_relation)
    print(f"{len(facts)} facts picked in {time.time() - t0:.0f} s; graph: {graph.num_edges} edges, circuit k = {k}")

    # completeness against the rule's nodes, on the first 6 facts
    steps_check = {}
    for m in args.check_steps:
        rs = eap.attribute_edges([s.prompt for s, _, _ in facts[:6]], [s.target for s, _, _ in facts[:6]],
                                 [c.prompt for _, c, _ in facts[:6]], n_steps=m)
        steps_check[m] = [r.input_residual / abs(r.change) for r in rs]
        print("n_steps", m, "relative input residual (embedding path): median %.4f max %.4f" % (np.median(steps_check[m]), max(steps_check[m])))

    t0 = time.time()
    results = eap.attribute_edges([s.prompt for s, _, _ in facts], [s.target for s, _, _ in facts],
                                  [c.prompt for _, c, _ in facts], n_steps=args.n_steps)
    eap_seconds = (time.time() - t0) / len(facts)
    rows, curves, circuits = [], {}, {}
    for (spec, partner, p), res in zip(facts, results):
        assert res.ok, res.reason
        curve = faithfulness_curve(eap, res, n_random=args.n_random, seed=0)
        kn = knowledge_neurons(attr, spec)
        mask = circuit_mask(res.scores, graph, k)
        circuits.setdefault(spec.relation, []).append(mask)
        kn_layers = sorted({layer for layer, _ in kn})
        mlps_in = sorted({int(graph.receivers[v][1:]) for v in np.nonzero(mask.any(0))[0] if graph.receivers[v].startswith("m")}
                         | {int(graph.senders[u][1:]) for u in np.nonzero(mask.any(1))[0] if graph.senders[u].startswith("m")})
        into_kn = [(graph.senders[u], float(res.scores[u, v])) for u, v in zip(*np.nonzero(mask))
                   if graph.receivers[v].startswith("m") and int(graph.receivers[v][1:]) in kn_layers]
        nodes_out = res.scores.sum(1)  # sender node scores
        rows.append(dict(fact_id=spec.fact_id, relation=spec.relation, prompt=spec.prompt, target=spec.target,
                         corrupted=partner.prompt, corrupted_object=partner.object, gold_prob=p,
                         clean_metric=res.clean_metric, corrupted_metric=res.corrupted_metric,
                         completeness=res.completeness, input_residual=res.input_residual, top_edges=res.top_edges(graph, 15),
                         curve=dict(edges=curve.edges.tolist(), circuit=curve.circuit.tolist(), random=curve.random.tolist()),
                         kn=kn, kn_layers=kn_layers, circuit_mlp_layers=mlps_in, into_kn_layers=into_kn,
                         top_nodes=[(graph.senders[i], float(nodes_out[i])) for i in np.argsort(-np.abs(nodes_out))[:10]]))
        curves.setdefault(spec.relation, []).append(dict(circuit=curve.circuit, random=curve.random))
        print(spec.relation, spec.prompt, spec.target, "| corrupted:", partner.prompt, "| faith@k", curve.circuit[[3, 5, 7]].round(3),
              "random", curve.random.mean(0)[[3, 5, 7]].round(3), "| KN layers", kn_layers, "| circuit MLPs", mlps_in, flush=True)
    relation_circuits = {}
    for relation, masks in circuits.items():
        shared = relation_circuit(masks, args.share)
        u, v = np.nonzero(shared)
        mean = np.mean([r["curve"]["circuit"] for r in rows if r["relation"] == relation], axis=0)
        relation_circuits[relation] = dict(edges=[f"{graph.senders[a]}->{graph.receivers[b]}" for a, b in zip(u, v)])
        print(relation, "relation circuit:", len(u), "edges", relation_circuits[relation]["edges"][:40], "mean faith", mean.round(3))
    draw_curves(curves, out / "faithfulness.png")
    best = max(range(len(rows)), key=lambda i: rows[i]["curve"]["circuit"][5])
    r = results[best]
    draw_circuit(graph, r.scores, 40, f"{rows[best]['prompt']}{rows[best]['target']} (vs. {rows[best]['corrupted']}): "
                 f"top 40 edges by |EAP-IG score|", out / "circuit.png")
    (out / "results.json").write_text(json.dumps(dict(
        args=vars(args), graph_edges=graph.num_edges, k=k, eap_seconds_per_prompt=eap_seconds, steps_check=steps_check,
        facts=rows, relation_circuits=relation_circuits, figure_fact=rows[best]["fact_id"]), indent=1, default=float))
    print("done; EAP-IG %.1f s/prompt" % eap_seconds)


if __name__ == "__main__":
    main()
