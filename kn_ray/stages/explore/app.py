"""`kn-ray explore OUT`: a read-only web app over one run directory (Starlette, Jinja2 templates,
figures drawn by the report's matplotlib definitions as SVG; no JavaScript, nothing from a CDN).

Every page is a set of `RunQueries` (DuckDB over the parts the run's markers name, parameters
bound). The app re-lists the run at most every `refresh` seconds and opens a new snapshot when
shards were committed or a later stage wrote its tables, so a run in progress can be watched.
Pages are served concurrently (a DuckDB cursor per thread); what a snapshot's pages share (the
overview's numbers, the figures) is computed once per snapshot.

Hardening (`Guard`): only requests naming a loopback host (or the host bound) are answered, so a
page of another site cannot read the run through DNS rebinding; every response carries a
Content-Security-Policy (nothing but this server's own scripts, styles and images; no framing);
URLs longer than MAX_URL get 414; numbers in URLs are ASCII digits only.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import matplotlib
import pandas as pd
from jinja2 import Environment, FileSystemLoader, Undefined, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from kn_ray.choices import MEMORY_LIMIT
from kn_ray.pipeline.layout import MARKERS, RUN_FILE, SUMMARIES
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.summary import plural
from kn_ray.stages.edit.criteria import MIN_UNITS
from kn_ray.stages.explore.queries import MEASURES, OPS, PAGE_SIZE, VIEW_RATIO, Listing, RunQueries, overall
from kn_ray.stages.report import figures
from kn_ray.stages.report.html import describe

HERE = Path(__file__).parent
LOG = logging.getLogger("kn_ray.explore")
MAX_QUERY = 200  # characters of search text
WATCHED = (MARKERS, "prompts", "knowledge_neurons", "relation_neurons", "edits")  # listings that change a snapshot
NEURON_QUERY = re.compile(r"^\s*L?\s*([0-9]{1,5})\s*(?:[,:/ ]|\s*N)\s*N?\s*([0-9]{1,9})\s*$", re.IGNORECASE | re.ASCII)
MAX_URL = 8192  # bytes of path and query string; longer requests get 414
MAX_REQUEST = 1 << 20  # bytes uvicorn reads of a request's head, so that long URLs are answered 414, not reset
KEPT = {"q": MAX_QUERY, "sort": 40, "desc": 1, "page": 9, "relation": 200}  # parameters links carry, and their lengths
LOOPBACK_NAMES = ("localhost",)
WILDCARDS = ("", "0.0.0.0", "::")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
FIGURE_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"  # matplotlib's SVG has a <style>
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def ascii_int(text: str | None, most: int) -> int | None:
    """The number written in `text` with 1 to `most` ASCII digits, else None (`str.isdigit` and
    `int` accept other scripts' digits and superscripts; URLs take 0-9 only)."""
    if text is None or not 0 < len(text) <= most or any(c not in "0123456789" for c in text):
        return None
    return int(text)


# ---- hosts, headers, URL length ------------------------------------------------------------------
def host_name(header: str) -> str:
    """The host of a Host header, without its port, lower case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [v6]:port
        name = header[1:header.find("]")] if "]" in header else ""
    else:
        name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def allowed_hosts(bound: str) -> frozenset[str]:
    """Host names the app answers to besides loopback ones: the host bound, and for a wildcard
    bind (0.0.0.0, ::) this machine's name and addresses."""
    names = {host_name(bound) if ":" not in bound else bound.strip("[]").lower()} - set(WILDCARDS)
    if bound in WILDCARDS:
        with contextlib.suppress(OSError):
            hostname = socket.gethostname()
            names |= {hostname.lower(), socket.getfqdn().lower()}
            names |= set(socket.gethostbyname_ex(hostname)[2])
    return frozenset(names)


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: refuses unknown Host headers (400) and over-long URLs (414), and adds
    the security headers to every response."""

    def __init__(self, app, hosts: frozenset[str] = frozenset()):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        name = host_name(headers.get(b"host", b"").decode("latin-1"))
        if not name or not (is_loopback(name) or name in self.hosts):
            LOG.warning("explore: refused a request for host %r", name[:100])
            return await self._send(PlainTextResponse("Unknown host: kn-ray explore answers loopback names only "
                                                      "(and the --host it binds).", 400), scope, receive, send)
        if len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > MAX_URL:
            return await self._send(PlainTextResponse(f"URL too long (over {MAX_URL} bytes).", 414),
                                    scope, receive, send)

        async def secured(message):
            if message["type"] == "http.response.start":
                given = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in
                         {"content-security-policy": CSP, **SECURITY_HEADERS}.items() if k.encode() not in given]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, secured)

    async def _send(self, response, scope, receive, send):
        response.headers.update({"content-security-policy": CSP, **SECURITY_HEADERS})
        await response(scope, receive, send)


# ---- URLs (one place: templates and figures link through these) ---------------------------------
def fact_url(fact_id: str) -> str:
    return "/fact/" + quote(str(fact_id), safe="")


def relation_url(relation: str) -> str:
    return "/relation/" + quote(str(relation), safe="")


def neuron_url(layer: int, neuron: int) -> str:
    return f"/neuron/{int(layer)}/{int(neuron)}"


# ---- the run's state ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RunState:
    """What OUT holds: `missing`, `not_run`, `empty` (no shard committed yet) or `ready`."""

    kind: str
    location: str
    message: str = ""
    committed: int | None = None  # shards with a marker
    planned: int | None = None  # shards of the plan (run.json)
    unmarked: int = 0  # parts of shards not committed (yet)

    @property
    def in_progress(self) -> bool:
        return self.planned is not None and self.committed is not None and self.committed < self.planned


def inspect(run: RunDirectory) -> RunState:
    location = str(run)
    if not run.exists():
        return RunState("missing", location, f"{location} does not exist.")
    try:
        record = run.record()
    except ValueError as error:
        return RunState("not_run", location, f"{RUN_FILE} cannot be read: {error}")
    if record is None:
        return RunState("not_run", location, f"{location} has no {RUN_FILE}: it is not the output directory of "
                                             "`kn-ray attribute` or `kn-ray run`.")
    planned = record.lookup("plan", "shards")
    committed = len(run.commits.markers(record.config_hash))
    unmarked = run.unmarked_parts("prompts")
    kind = "ready" if run.parts("prompts") else "empty"
    message = "" if kind == "ready" else "The run has started but no shard is committed yet."
    return RunState(kind, location, message, committed, int(planned) if planned is not None else None, unmarked)


class Explorer:
    """The run behind the app: a snapshot of its committed parts, renewed when they change."""

    def __init__(self, out: str, memory_limit: str = MEMORY_LIMIT, refresh: float = 5.0):
        self.run = RunDirectory(out)
        self.memory_limit, self.refresh = memory_limit, refresh
        self.lock = threading.RLock()  # the snapshot's replacement and its readers' count
        self._checked = -float("inf")
        self._signature = None
        self.state: RunState | None = None
        self.queries: RunQueries | None = None
        self._readers: dict = {}  # snapshot -> pages reading it

    def _listing_signature(self) -> tuple:
        files = []
        for name in (RUN_FILE, SUMMARIES["aggregate"]):
            info = self.run.fs.get_file_info(self.run.path(name))
            files.append((name, info.type.value, info.mtime_ns, info.size))
        for folder in WATCHED:
            files += sorted((i.path, i.mtime_ns, i.size) for i in self.run.listing(folder))
        return tuple(files)

    def current(self) -> tuple[RunState, RunQueries | None]:
        with self.lock:
            if time.monotonic() - self._checked >= self.refresh:
                self._checked = time.monotonic()
                signature = self._listing_signature() if self.run.exists() else None
                if signature != self._signature or self.state is None:
                    self._open(signature)
            return self.state, self.queries

    @contextlib.contextmanager
    def lease(self):
        """(state, queries) for one page: a snapshot replaced meanwhile is closed only once the
        pages reading it are done."""
        with self.lock:
            state, queries = self.current()
            if queries is not None:
                self._readers[queries] = self._readers.get(queries, 0) + 1
        try:
            yield state, queries
        finally:
            if queries is not None:
                with self.lock:
                    self._readers[queries] -= 1
                    if not self._readers[queries]:
                        del self._readers[queries]
                        if queries is not self.queries:
                            queries.close()

    def _open(self, signature) -> None:
        if self.queries is not None and not self._readers.get(self.queries):
            self.queries.close()  # else its last reader closes it
        self.state, self.queries, self._signature = inspect(self.run), None, signature
        if self.state.kind == "ready":
            self.queries = RunQueries(self.run, self.memory_limit)


# ---- rendering ---------------------------------------------------------------------------------
def _number(value, digits: int = 3) -> str:
    """Integers with thousands separators, other numbers to `digits` significant digits, '–' for none."""
    if value is None or isinstance(value, Undefined) or (isinstance(value, float) and value != value) or value is pd.NA:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (hasattr(value, "is_integer") and float(value).is_integer() and 1e3 <= abs(value) < 1e15):
        return f"{int(value):,}"
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def _signed(value) -> str:
    text = _number(value)
    return text if text == "–" or text.startswith("-") else "+" + text


def _templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_number, signed=_signed)
    env.globals.update(fact_url=fact_url, relation_url=relation_url, neuron_url=neuron_url, ops=OPS,
                       view_ratio=VIEW_RATIO, measures=MEASURES, min_units=MIN_UNITS)
    return Jinja2Templates(env=env)


TEMPLATES = _templates()


def _link(request: Request, **changes) -> str:
    """This page's URL with some query parameters changed (None removes one)."""
    params = {k: v[:KEPT[k]] for k, v in request.query_params.items() if k in KEPT}  # never echo a long URL
    params = {k: v for k, v in {**params, **changes}.items() if v not in (None, "")}
    return request.url.path + ("?" + urlencode(params) if params else "")


def _sort_link(request: Request, key: str) -> str:
    """Sort by `key`; clicking the current sort column flips the direction."""
    current = request.query_params.get("sort")
    desc = "0" if current == key and request.query_params.get("desc") == "1" else "1"
    return _link(request, sort=key, desc=desc, page=None)


def render(request: Request, template: str, context: dict, status: int = 200) -> Response:
    state = context.get("state")
    base = dict(request=request, link=lambda **c: _link(request, **c), sort_link=lambda k: _sort_link(request, k),
                search=request.query_params.get("q", "")[:MAX_QUERY] if template == "search.html" else "",
                state=state)
    return TEMPLATES.TemplateResponse(request, template, {**base, **context}, status_code=status)


def problem(request: Request, status: int, title: str, message: str, hint: str = "", state=None) -> Response:
    return render(request, "problem.html", dict(title=title, message=message, hint=hint, state=state), status)


def _listing(request: Request, default_sort: str = "", default_desc: bool = False) -> Listing:
    params = request.query_params
    return Listing(q=params.get("q", "")[:MAX_QUERY].strip(), sort=params.get("sort", default_sort),
                   desc=params.get("desc", "1" if default_desc else "0") == "1", page=_positive(params.get("page")))


def _positive(text: str | None) -> int:
    return ascii_int(text, 8) or 1


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts with missing values as None (templates print them as '–')."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records") if len(frame) else []


# ---- pages -------------------------------------------------------------------------------------
def _on_run(handler):
    """A page of the run: called with the current snapshot (state, queries), unless the run has
    nothing to show, which gets the page saying why. Pages run concurrently; a snapshot is never
    closed under a page that reads it (`Explorer.lease`)."""

    @functools.wraps(handler)
    def page(self, request: Request) -> Response:
        with self.explorer.lease() as (state, queries):
            got = self._snapshot(request, state)
            if got is not None:
                return got
            with queries.serial:
                return handler(self, request, state, queries)

    return page


class Pages:
    """The request handlers; each takes the current snapshot and renders one template."""

    def __init__(self, explorer: Explorer):
        self.explorer = explorer

    def _snapshot(self, request: Request, state: RunState) -> Response | None:
        """A Response explaining why there is nothing to show, or None."""
        if state.kind == "missing":
            return problem(request, 404, "No such run directory", state.message,
                           "Start `kn-ray explore` on the OUT of `kn-ray attribute` or `kn-ray run`.", state)
        if state.kind == "not_run":
            return problem(request, 404, "Not a kn-ray run", state.message,
                           "A run directory holds run.json, prompts/, neurons/ and _shards/ (docs/output-schema.md).",
                           state)
        if state.kind == "empty":
            return problem(request, 503, "Run in progress: nothing committed yet",
                           f"{state.message} No shard is committed yet (of {plural(state.planned or '?', 'shard')} "
                           "planned); this page shows them "
                           f"as they are committed (it checks every {self.explorer.refresh:g} s).", state=state)
        return None

    @_on_run
    def overview(self, request: Request, state: RunState, q: RunQueries) -> Response:
        context = dict(title="Overview", state=state, record=q.record, location=state.location, run=q.run,
                       tables=q.tables, aggregate=q.aggregate_summary, t=q.t, **q.cached("overview", lambda: _overview(q)))
        return render(request, "overview.html", context)

    @_on_run
    def relations(self, request: Request, state: RunState, q: RunQueries) -> Response:
        listing = _listing(request)
        rows = _records(q.relations(listing))
        return render(request, "relations.html", dict(title="Relations", state=state, rows=rows, listing=listing,
                                                      tables=q.tables))

    @_on_run
    def relation(self, request: Request, state: RunState, q: RunQueries) -> Response:
        relation = request.path_params["relation"]
        listing = _listing(request)
        summary = q.relation_summary(relation)
        if summary.empty:
            return problem(request, 404, "Unknown relation", f"The run has no relation {relation!r}.",
                           "See the list of relations.", state)
        facts = q.facts(listing, relation)
        context = dict(title=f"Relation {relation}", state=state, relation=relation,
                       summary=_records(summary)[0], facts=facts, fact_rows=_records(facts.rows), listing=listing,
                       neurons=_records(q.relation_neurons(relation)), erase=_erase_table(q.relation_erase(relation)),
                       tables=q.tables)
        return render(request, "relation.html", context)

    @_on_run
    def fact(self, request: Request, state: RunState, q: RunQueries) -> Response:
        fact_id = request.path_params["fact_id"]
        fact = q.fact(fact_id)
        if fact is None:
            return problem(request, 404, "Unknown fact", f"The run has no fact with id {fact_id!r}.",
                           "Search for it by subject or object instead.", state)
        prompts = q.fact_prompts(fact_id)
        scores = q.fact_scores(fact_id)
        kn = q.fact_knowledge_neurons(fact_id)
        cells = q.fact_neurons(fact_id, scores, kn)
        layers, width = q.shape
        edits = {op: _records(t) for op, t in q.fact_edits(fact_id).items()}
        coarse = scores[scores.coarse].groupby("prompt_id")[["layer", "neuron"]].apply(
            lambda f: list(f.itertuples(index=False, name=None))).to_dict() if len(scores) else {}
        kn_ig = {(int(r.layer), int(r.neuron)) for r in kn[kn.method == "ig"].itertuples()}
        context = dict(title=f"Fact {fact_id}", state=state, fact=fact, prompts=_records(prompts), coarse=coarse,
                       kn_ig=kn_ig, cells=_records(cells.head(200)), n_cells=len(cells), kn=_records(kn),
                       map_data=_map_data(cells, layers, width, int(fact["ok"])), model=q.record.model_label,
                       edits=edits, tables=q.tables, t=q.t)
        return render(request, "fact.html", context)

    @_on_run
    def neuron(self, request: Request, state: RunState, q: RunQueries) -> Response:
        layer_text, neuron_text = request.path_params["layer"], request.path_params["neuron"]
        layers, width = q.shape
        shape = f"{layers} layers x {width} neurons" if layers and width else "the model's shape is not in run.json"
        layer, neuron = ascii_int(layer_text, 5), ascii_int(neuron_text, 9)
        if layer is None or neuron is None or not q.neuron_in_range(layer, neuron):
            return problem(request, 404, "Unknown neuron", f"No neuron at layer {layer_text[:20]!r}, index "
                           f"{neuron_text[:20]!r} ({shape}; both count from 0).", state=state)
        only = request.query_params.get("relation") or None
        page = _positive(request.query_params.get("page"))
        facts = q.neuron_facts(layer, neuron)
        relations = _records(q.neuron_relations(layer, neuron))
        chosen = facts[facts.relation == only] if only else facts
        start = (page - 1) * PAGE_SIZE
        context = dict(title=f"Neuron L{layer} N{neuron}", state=state, layer=layer, neuron=neuron, shape=(layers, width),
                       by_relation=_records(q.by_relation(facts)), relations=relations, only=only, page=page,
                       levels=q.neuron_level(layer, neuron),
                       pages=max(1, -(-len(chosen) // PAGE_SIZE)), total=len(chosen),
                       facts=_records(chosen.iloc[start:start + PAGE_SIZE]), tables=q.tables, t=q.t)
        return render(request, "neuron.html", context)

    @_on_run
    def search(self, request: Request, state: RunState, q: RunQueries) -> Response:
        listing = _listing(request)
        neuron = NEURON_QUERY.match(listing.q)
        facts = q.facts(listing) if listing.q else None
        relations = _records(q.relations(Listing(q=listing.q))) if listing.q else []
        context = dict(title="Search", state=state, listing=listing, facts=facts,
                       fact_rows=_records(facts.rows) if facts is not None else [], relations=relations,
                       neuron=(int(neuron[1]), int(neuron[2])) if neuron else None, tables=q.tables)
        return render(request, "search.html", context)

    @_on_run
    def figure(self, request: Request, state: RunState, q: RunQueries) -> Response:
        name = request.path_params["name"]
        if not (name == "layers" and q.has("knowledge_neurons") or name in ("suppress", "amplify") and q.has("edits")):
            raise HTTPException(404, "no such figure for this run")
        text = q.cached(("figure", name), lambda: _draw(q, name))
        return Response(text, media_type="image/svg+xml", headers={"content-security-policy": FIGURE_CSP})


def _draw(q: RunQueries, name: str) -> str:
    """A figure of the run as SVG (the report's matplotlib definitions)."""
    caption = q.cached("caption", lambda: describe(q.context()))
    if name == "layers":
        frame, draw = q.cached("layer_histogram", q.layer_histogram), figures.layer_histogram
    else:
        frame, draw = q.cached("edit_summary", q.edit_summary), lambda f, c: figures.edit_effects(f, name, c)
    with figures.DRAWING:
        return figures.svg(draw(frame, caption))


def _overview(q: RunQueries) -> dict:
    """The overview's numbers (a snapshot's: computed once)."""
    stats = q.run_stats()
    total = overall(stats)
    return dict(filters=", ".join(f"{k} {v}" for k, v in (q.record.lookup("input", "filters") or {}).items() if v),
                total=total.iloc[0].to_dict() if len(total) else {}, relations=int((stats.relation != "ALL").sum()),
                neuron_rows=q.neuron_rows(), layers=_layer_counts(q), edits=_edit_overview(q))


COLOURS = matplotlib.colormaps["viridis"]  # the fact map's colour scale (the report's default colour map)


def _map_data(cells: pd.DataFrame, layers: int | None, width: int | None, prompts: int) -> dict:
    """The fact's neurons for static/neuron-map.js: position, colour (mean share of the
    prompt's max), radius (prompts where coarse), the numbers its tooltip shows and its URL."""
    colours = [matplotlib.colors.to_hex(c) for c in COLOURS(cells.mean_rel.fillna(0).clip(0, 1).to_numpy())]
    points = [dict(x=int(c.neuron), y=int(c.layer), c=colour, r=round(2.5 + 1.5 * min(int(c.coarse_prompts), 8), 1),
                   coarse=int(c.coarse_prompts), score=float(c.mean_score) if c.mean_score == c.mean_score else 0.0,
                   rel=float(c.mean_rel) if c.mean_rel == c.mean_rel else 0.0, kn=bool(c.kn_ig),
                   act=bool(c.kn_activation), url=neuron_url(c.layer, c.neuron))
              for c, colour in zip(cells.itertuples(), colours)]
    return dict(layers=layers or int(cells.layer.max() + 1 if len(cells) else 1),
                width=width or int(cells.neuron.max() + 1 if len(cells) else 1), prompts=prompts, points=points)


def _ramp(stops: int = 6) -> str:
    """CSS gradient stops of the colour scale, 0 to 1."""
    return ", ".join(matplotlib.colors.to_hex(COLOURS(i / (stops - 1))) for i in range(stops))


def _layer_counts(q: RunQueries) -> list[dict]:
    frame = q.cached("layer_histogram", q.layer_histogram) if q.has("knowledge_neurons") else pd.DataFrame()
    if frame.empty:
        return []
    table = frame.pivot_table(index="layer", columns="method", values="n_neurons", aggfunc="first")
    table = table[sorted(table.columns, key=lambda m: (m != "ig", m))]  # ig first, then the baselines
    return _records(table[table.sum(axis=1) > 0].reset_index())


def _edit_overview(q: RunQueries) -> dict:
    """The edit experiments in brief: suppress / amplify per condition (ALL), criteria with
    CIs (edits.json), update / erase headline metrics (ALL)."""
    if not q.has("edits"):
        return {}
    scale = overall(q.cached("edit_summary", q.edit_summary))
    metrics = overall(q.edit_metrics())
    return dict(scale=_records(scale), criteria=_records(q.edit_criteria()), metrics=_records(metrics),
                destructive=_destructive(q, metrics))


def _destructive(q: RunQueries, metrics: pd.DataFrame) -> list[dict]:
    """Update / erase (ALL): per op and condition, the edits judged and the destructive ones (their
    collateral perplexity grew past the bound they ran with, edits.json's settings)."""
    flags = metrics[metrics.metric == "destructive"]
    runs = (q.run.summary("edit") or {}).get("runs", {}) if len(flags) else {}
    return [dict(op=r.op, condition=r.condition, judged=int(r.n_edits),
                 destructive=int(round(float(r["mean"]) * int(r.n_edits))) if r.n_edits else 0, share=r["mean"],
                 bound=runs.get(r.op, {}).get("settings", {}).get("destructive_ppl_ratio"))
            for _, r in flags.iterrows()]


def _erase_table(frame: pd.DataFrame) -> list[dict]:
    if frame.empty:
        return []
    return _records(frame.pivot_table(index="metric", columns="condition", values="value", aggfunc="first")
                    .reset_index())


# ---- the app -----------------------------------------------------------------------------------
def create_app(out: str, memory_limit: str = MEMORY_LIMIT, refresh: float = 5.0, host: str = "127.0.0.1") -> Starlette:
    """The app over run directory `out`; `host`: the address it is bound to (requests naming it
    or a loopback name are answered, others refused)."""
    pages = Pages(Explorer(out, memory_limit, refresh))

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return problem(request, 404, "Not found", f"Nothing here: {request.url.path}",
                           "Pages: the overview, relations, a relation, a fact, a neuron (/neuron/LAYER/NEURON).")
        return problem(request, exc.status_code, "Bad request", str(exc.detail))

    async def failed(request: Request, exc: Exception) -> Response:
        LOG.exception("explore: %s failed", request.url.path)
        return problem(request, 500, "This page failed", f"{type(exc).__name__}: {exc}",
                       "The server's log has the details.")

    routes = [
        Route("/", pages.overview, name="overview"),
        Route("/relations", pages.relations, name="relations"),
        Route("/relation/{relation:path}", pages.relation, name="relation"),
        Route("/fact/{fact_id:path}", pages.fact, name="fact"),
        Route("/neuron/{layer}/{neuron}", pages.neuron, name="neuron"),
        Route("/search", pages.search, name="search"),
        Route("/figures/{name}.svg", pages.figure, name="figure"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: failed},
                    middleware=[Middleware(Guard, hosts=allowed_hosts(host))])
    app.state.explorer = pages.explorer
    return app
