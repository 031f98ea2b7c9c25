"""The ``leanrec`` command."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from leanrec.errors import InputError


@contextmanager
def _phases(console: Console, suffix: str = "") -> Iterator[Callable[[str, int], None]]:
    """A progress display with one counter per phase; yields ``seen(phase, count)``."""
    columns = (TextColumn("[bold]{task.description}"), TextColumn("{task.completed:,}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[str, TaskID] = {}

        def seen(phase: str, n: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase + suffix, total=None)
            progress.advance(tasks[phase], n)

        yield seen


class _StepSpinner(SpinnerColumn):
    """A spinner for the step that runs, a tick for those done, a dot for those still to come."""

    def render(self, task: Task) -> RenderableType:
        """The glyph of ``task``'s state."""
        return Text("·", style="dim") if not task.started else super().render(task)


@contextmanager
def _steps(console: Console) -> Iterator[Callable[..., None]]:
    """A progress display with one line per step of a run; yields ``shown(step, done, total, detail)``.

    Every step shows from when it is first reported; its clock starts when its work does (the first
    unit done, or a detail saying what runs), and a spinner turns while a step without units runs.
    """
    columns = (
        _StepSpinner(finished_text="✓"),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[str, TaskID] = {}
        started: set[str] = set()

        def shown(step: str, done: int, total: int | None, detail: str = "") -> None:
            text = f"[bold]{escape(step)}[/bold]" + (f" [dim]({escape(detail)})[/dim]" if detail else "")
            if step not in tasks:
                tasks[step] = progress.add_task(text, total=total, start=False)
            if (done or detail) and step not in started:
                progress.start_task(tasks[step])
                started.add(step)
            progress.update(tasks[step], completed=done, total=total, description=text)

        yield shown


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65_535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, at most 65535, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32-1, got {value}")
    return value


def _writable_folder(path: Path, flag: str) -> Path:
    """``path`` as a folder this process can write, made if missing (checked before any work).

    Raises:
        InputError: It is a file, or it cannot be made or written.

    """
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} exists and is not a folder; give a folder (it is made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".leanrec-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"cannot write to {flag} {path}: {exc.strerror or exc}; give a folder you can write"
        ) from None
    return path


def _writable_file(path: Path, flag: str) -> Path:
    """``path`` as a file this process can write, checked before a long run that ends by writing it.

    Raises:
        InputError: It is a folder, its folder does not exist, or it cannot be written there.

    """
    if path.is_dir() or not path.parent.is_dir():
        raise InputError(f"{flag} {path} must be a file path in an existing folder")
    try:
        probe = path.parent / ".leanrec-write-test"
        probe.write_bytes(b"")
        probe.unlink()
        if path.exists():
            with path.open("ab"):
                pass
    except OSError as exc:
        raise InputError(
            f"cannot write {flag} {path}: {exc.strerror or exc}; give a path you can write"
        ) from None
    return path


def _demo(args: argparse.Namespace, console: Console) -> int:
    from leanrec.report.demo_report import render_audit, render_loop, render_table, write_html, write_json
    from leanrec.sim.demo import run_demo

    out = _writable_folder(Path(args.out), "--out")
    from leanrec.energy.carbon import grid_intensity
    from leanrec.energy.meter import PowerModel
    from leanrec.energy.stages import Coefficients, EnergyModel

    try:
        power = PowerModel.of_this_machine()
        if args.watts_per_core is not None:
            power = PowerModel(args.watts_per_core, source=f"given {args.watts_per_core:g} W per core")
        energy = EnergyModel(power, Coefficients(), grid_intensity(args.region, args.grid_intensity))
    except ValueError as exc:  # the energy flags, refused before the run
        raise InputError(str(exc)) from None
    with _steps(console) as shown:
        result = run_demo(
            args.requests, args.seed, out, progress=shown, energy=energy, shared_rows=args.shared_rows
        )
    report = result.report
    if args.rounds >= 2:
        from leanrec.sim.loop import close_loop

        budget = args.budget if args.rounds == 3 else None
        with _phases(console) as seen:
            report["loop"] = close_loop(
                result, args.requests, args.seed, out, progress=seen, audit_budget=budget
            )
    write_json(report, out / "report.json")
    write_html(report, out / "report.html")
    console.print(render_table(report, console.width))
    if "loop" in report:
        console.print(render_loop(report["loop"], console.width))
    if "audit" in report.get("loop", {}):
        console.print(render_audit(report["loop"]["audit"], console.width))
    console.print(
        f"reports: {out / 'report.json'}, {out / 'report.html'}; warehouses: "
        f"{out / 'warehouse' / 'naive'}, {out / 'warehouse' / 'lean'}"
    )
    return 0


_SERVE_FLAGS = (
    ("--host", str, "interface to listen on (default 127.0.0.1)"),
    ("--port", int, "TCP port (default 8000)"),
    ("--store-url", str, "transient store: memory://, redis://host:port/db or redis+cluster://host:port,…"),
    ("--bus-url", str, "event bus: memory://, redis://… or redis+cluster://… (joiners must share it)"),
    ("--logging", str, "lazy (default), eager or off"),
    ("--n-users", int, "users of the synthetic world (default 10000)"),
    ("--n-items", int, "items of the corpus (default 50000)"),
    ("--seed", int, "seed of the world (default 7)"),
    ("--featureset", str, "FeatureSet file to log under for a ranker of your own (/v1/log; no world)"),
    ("--features-url", str, "with --featureset: FeatureStore of the catalog to rank (redis://…)"),
    ("--retrieval", str, "with --features-url: retrieval index file giving /v1/rank its candidates"),
    ("--model", str, "with --features-url: `leanrec train` checkpoint, the late ranker of /v1/rank"),
    ("--n-retrieve", int, "candidates the late ranker scores (default 1000)"),
    ("--n-rank", int, "items /v1/rank returns and logs (default 100)"),
    ("--window-ms", int, "attribution window (default 600000)"),
    (
        "--context-max-bytes",
        int,
        "bytes of frozen features one serving process holds at most (default 512 MiB)",
    ),
    ("--lateness-ms", int, "how long after the window event batches may arrive (default 60000)"),
    ("--warehouse", str, "joiner: warehouse folder or URI"),
    ("--warehouse-layout", str, "joiner: request (default), dedup or impression (default under eager)"),
    ("--consumer", str, "joiner: name in the bus's consumer group"),
    ("--poll-ms", int, "joiner: poll interval"),
)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file of settings; flags override it")
    for flag, kind, text in _SERVE_FLAGS:
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument(
        "--shared-rows",
        action="store_true",
        default=None,
        help="lazy logging: store item rows and slowly changing user features once per distinct "
        "content, referenced by hash (joiners read either layout)",
    )


def _config(args: argparse.Namespace):
    """The settings of ``serve`` and ``join``: the TOML file, then the flags (ConfigError if unusable)."""
    from leanrec.serve.config import ServeConfig

    overrides = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in _SERVE_FLAGS
    }
    return ServeConfig.load(
        args.config, **overrides, shared_rows=args.shared_rows, development=getattr(args, "dev", None)
    )


_NOT_ANSWERING = "; start it, or give --store-url and --bus-url a server that answers"


def _check_listen(host: str, port: int) -> None:
    """Bind ``host:port`` once before serving, so a taken port or an unknown host is one clear line.

    Raises:
        InputError: The address cannot be bound.

    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise InputError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what listens there or give "
            "another --port (or --host)"
        ) from None


def _serve(args: argparse.Namespace, console: Console) -> int:
    from leanrec.serve.routing import nginx_conf, upstream_host, worker_ports
    from leanrec.serve.workers import open_app, run_workers, serve_one

    config = _config(args)
    config.check_secret()  # first: nothing is built for a service that would hand out forgeable tokens
    ports = worker_ports(config.port, args.workers)
    if args.nginx_conf is not None and args.nginx_port in ports:
        raise InputError(f"--nginx-port {args.nginx_port} is a worker's port; give nginx another one")
    for port in ports:
        _check_listen(config.host, port)
    if args.nginx_conf is not None:
        conf = _writable_file(Path(args.nginx_conf), "--nginx-conf")
        (conf.parent / "tmp").mkdir(exist_ok=True)  # nginx makes its temporary folders in there
        conf.write_text(
            nginx_conf(
                [(upstream_host(config.host), p) for p in ports],
                args.nginx_port,
                config.host,
                config.max_body_bytes,
            )
        )
        prefix = conf.parent.resolve()
        console.print(
            f"nginx config for {len(ports)} worker(s) on {config.host}:{args.nginx_port}: {conf}; start it "
            f"with: nginx -p {prefix} -c {conf.resolve()} -e {prefix / 'error.log'}",
            markup=False,
            soft_wrap=True,
        )
    app = open_app(config) if len(ports) == 1 else None
    ranks = (
        f"ranks {config.featureset} from {config.features_url}"
        + (f", candidates from {config.retrieval}" if config.retrieval else "")
        + (f", ranker {config.model}" if config.model else ", in retrieval order")
        if config.features_url
        else (f"logs {config.featureset} (/v1/log)" if config.featureset else "ranks the synthetic world")
    )
    where = (
        f"http://{config.host}:{config.port}"
        if len(ports) == 1
        else f"{len(ports)} workers on http://{config.host}:{ports[0]}..{ports[-1]}"
    )
    console.print(
        f"leanrec serve: {ranks}; logging={config.logging}"
        + (" (shared rows)" if config.shared_rows and config.logging == "lazy" else "")
        + f", store={config.store_url}, "
        f"bus={config.bus_url}, {where}",
        markup=False,
        soft_wrap=True,
    )
    if not config.has_own_secret():
        console.print(
            "development run: tokens are signed with the built-in development secret, which anyone can "
            "forge tokens with; set LEANREC_SECRET before serving anyone",
            markup=False,
            soft_wrap=True,
        )
    if app is None:
        if config.store_url.startswith("memory") or config.bus_url.startswith("memory"):
            console.print(
                "note: memory:// backends are each worker's own: no joiner can reach them; give the "
                "workers a shared redis:// store and bus",
                markup=False,
                soft_wrap=True,
            )
        return run_workers(config, ports, lambda line: console.print(line, markup=False, soft_wrap=True))
    serve_one(config, app)
    return 0


def _join(args: argparse.Namespace, console: Console) -> int:
    from leanrec.join.deadletter import DeadLetterFolder
    from leanrec.join.worker import run_worker, set_aside_text

    config = _config(args)
    console.print(
        f"leanrec join: consumer {config.consumer}, bus {config.bus_url}, warehouse {config.warehouse}, "
        f"dead letters {DeadLetterFolder.of_warehouse(config.warehouse).uri}",
        markup=False,
        soft_wrap=True,
    )
    if args.metrics_port is not None:
        console.print(
            f"metrics: http://{config.host}:{args.metrics_port}/metrics", markup=False, soft_wrap=True
        )
    try:
        report = run_worker(
            config,
            max_seconds=args.max_seconds,
            status=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True),
            metrics_port=args.metrics_port,
        )
    except ConnectionError as exc:  # the Redis backends name the server that does not answer
        raise InputError(f"{exc}{_NOT_ANSWERING}") from None
    console.print(
        f"stopped: took over {report.recovered} pending, joined {report.requests_joined} requests, "
        f"{report.examples} examples, {report.labels_lost} labels lost, {report.files} files, "
        f"{set_aside_text(report.dead_letters, report.dead_letters_by_kind)}"
        + (f" in {report.dead_letter_uri}" if report.dead_letters else "")
        + (f", rode out {report.outages} Redis outages" if report.outages else ""),
        markup=False,
        soft_wrap=True,
    )
    return 0


def _features(args: argparse.Namespace, console: Console) -> int:
    from leanrec.featurefile import load_featureset
    from leanrec.schema import Owner
    from leanrec.serve.config import _check_url
    from leanrec.stores.loading import catalog_prefix, load_entities, open_catalog_store

    if args.users is None and args.items is None:
        raise InputError("give --users FILE, --items FILE or both: the Parquet files to load")
    _check_url("--store-url", args.store_url)
    if not args.store_url.startswith("redis"):
        raise InputError(
            f"--store-url must be redis://host:port/db (shared with serve), got {args.store_url!r}"
        )
    fs = load_featureset(args.featureset)
    try:
        store = open_catalog_store(args.store_url, fs)
    except ConnectionError as exc:
        raise InputError(f"{exc}; start it, or give --store-url a server that answers") from None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    loaded = {}
    with Progress(*columns, console=console, transient=True) as progress:
        for owner, path in ((Owner.USER, args.users), (Owner.ITEM, args.items)):
            if path is None:
                continue
            task = progress.add_task(f"{owner.value}s", total=None)
            loaded[owner] = load_entities(
                store,
                fs,
                owner,
                path,
                progress=lambda d, t, task=task: progress.update(task, completed=d, total=t),
            )
    console.print(
        f"loaded {', '.join(f'{n:,} {o.value}s' for o, n in loaded.items())} of FeatureSet {fs.name} "
        f"v{fs.version} into {args.store_url} (keys {catalog_prefix(fs)}:…)",
        markup=False,
        soft_wrap=True,
    )
    return 0


def _given_world(args: argparse.Namespace):
    """The world the flags name, or None when none is given (then simulate learns the service's).

    Flags left out take the world's defaults.
    """
    from leanrec.world import WorldConfig

    given = {"n_users": args.n_users, "n_items": args.n_items, "seed": args.world_seed}
    if all(v is None for v in given.values()):
        return None
    defaults = WorldConfig()
    return WorldConfig(**{k: getattr(defaults, k) if v is None else v for k, v in given.items()})


def _simulate(args: argparse.Namespace, console: Console) -> int:
    from leanrec.report.tables import Col, fitted
    from leanrec.sim.client import simulate

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("sessions", total=args.requests)
        report = simulate(
            args.target,
            args.requests,
            args.concurrency,
            args.seconds,
            args.seed,
            _given_world(args),
            progress=lambda n: progress.advance(task, n),
        )
    rows = []
    for endpoint in ("rank", "paginate", "events"):
        p50, p90, p99 = report.percentiles(endpoint)
        rows.append(
            [
                endpoint,
                f"{len(report.latency_ms.get(endpoint, [])):,}",
                f"{p50:.2f}",
                f"{p90:.2f}",
                f"{p99:.2f}",
            ]
        )
    cols = (Col("endpoint", kind="name"), Col("calls"), Col("p50 ms"), Col("p90 ms"), Col("p99 ms"))
    title = f"leanrec simulate → {args.target}: {report.requests} sessions in {report.seconds:.1f} s"
    console.print(fitted(title, cols, rows, console.width))
    console.print(
        f"throughput: {report.requests / max(report.seconds, 1e-9):,.1f} ranked requests/s; "
        f"failed sessions: {report.sessions_failed}; calls sent again after a 503: {report.resent}; "
        f"responses: {dict(sorted(report.status.items()))}"
    )
    rows = [[name, f"{value:,.0f}"] for name, value in sorted(report.server.items())]
    cols = (Col("metric", kind="name"), Col("value"))
    console.print(fitted("server-side figures (from /metrics)", cols, rows, console.width))
    return 0 if report.sessions_failed == 0 else 1


def _replay(args: argparse.Namespace, console: Console) -> int:
    from leanrec.report.tables import Col, fitted
    from leanrec.sim.replay import replay

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("sessions", total=None)
        report = replay(
            args.target,
            args.sessions,
            args.featureset,
            args.concurrency,
            args.seed,
            args.patience,
            args.fast_scroll_share,
            progress=lambda n: progress.advance(task, n),
        )
    figures = report.figures()
    rows = [
        ("sessions replayed", f"{report.sessions:,}"),
        ("sessions failed", f"{report.failed:,}"),
        ("NDCG@10", f"{figures['ndcg@10']:.4f}"),
        ("recall@10", f"{figures['recall@10']:.4f}"),
        ("engagements per session", f"{figures['engagements_per_session']:.3f}"),
        ("positions viewed per session", f"{figures['viewed_per_session']:.1f}"),
        (
            "pagination signals sent / lost (fast scrolls)",
            f"{report.signals_sent:,} / {report.signals_lost:,}",
        ),
        ("events sent / accepted", f"{report.events_sent:,} / {report.events_accepted:,}"),
        ("transient-store bytes written", f"{report.server.get('leanrec_kv_bytes_written_total', 0):,.0f}"),
    ]
    cols = (Col("replay", kind="label"), Col("value"))
    title = f"{args.target}: {report.catalog.get('featureset')} v{report.catalog.get('version')}"
    console.print(fitted(title, cols, rows, console.width))
    if args.out:
        out = {
            **figures,
            "sessions": report.sessions,
            "failed": report.failed,
            "engagements": report.engagements,
            "likes": report.likes,
            "viewed": report.viewed,
            "signals_sent": report.signals_sent,
            "signals_lost": report.signals_lost,
            "events_sent": report.events_sent,
            "events_accepted": report.events_accepted,
            "status": report.status,
            "seconds": report.seconds,
            "server": report.server,
            "catalog": report.catalog,
        }
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0 if report.sessions else 1


def _progress_columns() -> tuple:
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _featureset_file(path: str, written):
    """A FeatureSet from a TOML file, checked to read data written under ``written``."""
    from leanrec.featurefile import load_featureset

    fs = load_featureset(path)
    if not fs.reads(written):
        raise InputError(
            f"--featureset {path} is {fs.name} v{fs.version}, which cannot read the warehouse's "
            f"{written.name} v{written.version}"
        )
    return fs


def _featureset(args: argparse.Namespace, console: Console) -> int:
    from leanrec.featurefile import dump_featureset, layout_summary, load_featureset
    from leanrec.report.tables import Col, fitted
    from leanrec.schema import Role

    if args.action == "world":
        from leanrec.world import WorldConfig, default_featureset

        fs, _ = default_featureset(WorldConfig(n_users=args.n_users, n_items=args.n_items, seed=args.seed))
        out = _writable_file(Path(args.out), "--out")
        out.write_text(dump_featureset(fs))
        console.print(f"the synthetic world's FeatureSet {fs.name} v{fs.version}: {out}")
        return 0
    fs = load_featureset(args.file)
    rows = [
        [
            f.name,
            f.owner.value,
            f.kind.value,
            str(f.size),
            f"{f.rows:,}" if f.rows else "",
            f.id_map + (f" {f.id_evict}" if f.id_evict else "") + (", strings" if f.string_ids else ""),
            f.role or f.space,
        ]
        for f in fs.features
    ]
    cols = (
        Col("feature", kind="name"),
        Col("owner", kind="name"),
        Col("kind", kind="name"),
        Col("size"),
        Col("rows"),
        Col("id map", kind="name"),
        Col("role / space", kind="name"),
    )
    console.print(fitted(f"{args.file}: FeatureSet {fs.name} v{fs.version}", cols, rows, console.width))
    sides = layout_summary(fs)
    rows = [
        [side, str(s["features"]), str(s["float_columns"]), str(s["int_columns"]), f"{s['bytes']:,}"]
        for side, s in (("request (once)", sides["request"]), ("item (per ranked item)", sides["item"]))
    ]
    cols = (Col("side", kind="name"), Col("features"), Col("float32"), Col("int64"), Col("bytes"))
    console.print(fitted("logged layout", cols, rows, console.width))
    roles = ", ".join(f"{r.value}: {f.name}" for r in Role if (f := fs.role(r)) is not None) or "none"
    console.print(
        f"valid; roles {roles}; a ranked request of 100 items logs "
        f"{sides['request']['bytes'] + 100 * sides['item']['bytes']:,} bytes of features",
        soft_wrap=True,
    )
    return 0


def _train(args: argparse.Namespace, console: Console) -> int:
    from leanrec.train.trainer import TrainConfig, save_checkpoint, train
    from leanrec.warehouse.store import featureset_of

    fs = featureset_of(args.warehouse)
    if args.featureset:
        fs = _featureset_file(args.featureset, fs)
    out = _writable_file(Path(args.out), "--out")
    cfg = TrainConfig(
        epochs=args.epochs,
        request_level=not args.impression_level,
        dedup=args.dedup,
        full_metrics=args.full_metrics,
        seed=args.seed,
    )
    with _phases(console, f" ({fs.name} v{fs.version})") as seen:
        model, result = train(args.warehouse, fs, cfg, progress=seen)
    save_checkpoint(model, out, result)
    console.print(
        _metrics_table(f"held-out test, best of {result.epochs_run} epochs", result.test, console.width)
    )
    wide = "" if result.wide_valid_auc is None else f"solved wide part {result.wide_valid_auc:.4f}, "
    kept = f"epoch {result.best_epoch}" if result.best_epoch else "the solved wide part"
    console.print(_id_maps_table(result.id_maps, console.width))
    console.print(
        f"{result.examples_per_second:,.0f} examples/s; validation AUC: {wide}by epoch "
        f"{[round(a, 4) for a in result.valid_auc]}; kept {kept}; model: {out}"
    )
    return 0


def _id_maps_table(maps: dict[str, dict], width: int):
    """Each embedding table's map: memory, ids seen, rows in use, turnover and collisions."""
    from leanrec.report.tables import Col, fitted

    rows = [
        [
            name,
            m["map"],
            f"{m['rows']:,}",
            f"{m['memory_bytes'] / 1024:,.0f}",
            f"{m.get('ids_seen', 0):,}",
            f"{m['rows_in_use']:,}",
            f"{m['admissions']:,}",
            f"{m['evictions']:,}",
            f"{m.get('collision_rate_head', 0.0):.3f}",
            f"{m.get('collision_rate_rest', 0.0):.3f}",
        ]
        for name, m in maps.items()
    ]
    cols = (
        Col("table", kind="name"),
        Col("map", kind="name"),
        Col("rows"),
        Col("KiB", "KiB", "memory, KiB"),
        Col("ids seen", "ids"),
        Col("rows used", "used", drop=2),
        Col("admitted", "adm", drop=1),
        Col("evicted", "evi", drop=1),
        Col("collide: head 1%", "c.head", "share of the 1% most frequent ids that share a row"),
        Col("rest", "c.rest", "share of the other ids that share a row"),
    )
    return fitted("id maps (collisions among the ids training saw)", cols, rows, width)


def _metrics_table(title: str, metrics: dict[str, float], width: int):
    """The held-out metrics, one a row, fitted to ``width`` columns."""
    from leanrec.report.tables import Col, fitted

    rows = [[name, f"{value:.4f}"] for name, value in metrics.items()]
    return fitted(title, (Col("metric", kind="name"), Col("value")), rows, width)


def _evaluate(args: argparse.Namespace, console: Console) -> int:
    from leanrec.train.reader import ReadStats
    from leanrec.train.trainer import TrainConfig, _batches, evaluate_arrays, load_checkpoint, predict
    from leanrec.warehouse.store import featureset_of

    # The model reads the warehouse under its own FeatureSet: the warehouse's, or a later version
    # that retired features from it (a pruned model evaluated on data logged before the audit).
    model = load_checkpoint(args.model, featureset_of(args.warehouse))
    cfg = TrainConfig()
    with Progress(TextColumn("[bold]evaluating"), TimeElapsedColumn(), console=console, transient=True) as p:
        p.add_task("evaluate", total=None)
        arrays = predict(model, _batches(args.warehouse, model.fs, cfg, 2, ReadStats(), None))
    if len(arrays[0]) == 0:
        raise InputError(
            f"{args.warehouse} has no held-out test requests (a tenth of its requests, by id); "
            "give a warehouse of more requests"
        )
    console.print(
        _metrics_table(
            f"{args.model} on the held-out requests of {args.warehouse}",
            evaluate_arrays(*arrays),
            console.width,
        )
    )
    return 0


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"the AUC budget must be at least 0, got {value}")
    return value


def _audit(args: argparse.Namespace, console: Console) -> int:
    from leanrec.audit import AuditConfig, audit
    from leanrec.audit.report import audit_table, write_audit
    from leanrec.train.trainer import load_checkpoint

    model = load_checkpoint(args.model)
    out = _writable_folder(Path(args.out), "--out")
    with Progress(*_progress_columns(), console=console, transient=True) as progress:
        tasks: dict[str, TaskID] = {}

        def seen(phase: str, n: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.advance(tasks[phase], n)

        result = audit(
            model,
            args.warehouse,
            AuditConfig(budget=args.budget, repeats=args.repeats, seed=args.seed),
            progress=seen,
        )
    pruned = write_audit(result, model.fs, out)
    console.print(audit_table(result, width=console.width))
    console.print(
        f"pruned FeatureSet {pruned.name} v{pruned.version}: {out / 'featureset.toml'}; "
        f"report: {out / 'audit.html'}; {result.evaluations:,} shuffles scored in {result.seconds:.0f} s"
    )
    return 0


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _above_zero(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def _share(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _at_least_zero(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _quantity(value: float, unit: str) -> str:
    """``value`` in ``unit`` with an SI prefix (k, M, G, T, P)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:,.2f} {prefix}{unit}"
    return f"{value:,.2f} {unit}"


def _plan(args: argparse.Namespace, console: Console) -> int:
    from leanrec.energy.capacity import Scale, capacity_plan
    from leanrec.energy.carbon import grid_intensity
    from leanrec.report.tables import Col, fitted

    try:
        report = json.loads(Path(args.report).read_text())
    except FileNotFoundError:
        raise InputError(f"no report at {args.report}: run `leanrec demo` first, or give --report") from None
    except OSError as exc:
        raise InputError(
            f"cannot read --report {args.report}: {exc.strerror or exc}; give the report.json of a demo"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(
            f"{args.report} is not a leanrec demo report (not JSON); give the report.json of a demo"
        ) from None
    if not isinstance(report, dict):
        raise InputError(f"{args.report} is not a leanrec demo report; give the report.json of a demo")
    try:  # the flags and the report's figures, each checked where it is used
        grid = grid_intensity(args.region, args.grid_intensity)
        scale = Scale(args.dau, args.requests_per_user, args.items_per_request, args.retention_days)
        plan = capacity_plan(report, scale, grid)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    cols = (Col("input", kind="label"), Col("value"), Col("from", kind="label"))
    rows = [[name, f"{value:,.4g}", origin] for name, (value, origin) in plan["inputs"].items()]
    console.print(fitted("extrapolated from", cols, rows, console.width))
    figures = (
        ("kv_write_bytes_per_second", "transient-store writes", "B/s"),
        ("warehouse_bytes_per_day", "warehouse bytes a day", "B"),
        ("warehouse_bytes_retained", f"warehouse held ({scale.retention_days:g} days)", "B"),
        ("training_examples_per_day", "training examples a day", ""),
        ("joules_per_request", "energy per request (estimated)", "J"),
        ("average_watts", "average power (estimated)", "W"),
        ("tonnes_co2e_per_year", "CO2e a year (estimated)", "t"),
    )
    rows = []
    for key, label, unit in figures:
        naive, lean = plan["naive"][key], plan["lean"][key]
        fmt = (lambda v: f"{v:,.1f} t") if unit == "t" else (lambda v, u=unit: _quantity(v, u).strip())
        rows.append([label, fmt(naive), fmt(lean), f"{plan['ratio'][key]:.3f}"])
    cols = (Col("figure", kind="label"), Col("naive"), Col("lean"), Col("lean / naive", "R", "lean / naive"))
    title = f"capacity and energy at {scale.requests_per_day:,.0f} requests a day"
    console.print(fitted(title, cols, rows, console.width))
    return 0


def _breakeven(args: argparse.Namespace, console: Console) -> int:
    from leanrec.energy.meter import EnergyMeter
    from leanrec.report.retrieval_report import breakeven_view, zoo_table
    from leanrec.retrieval.models import MODELS
    from leanrec.retrieval.zoo import run_zoo

    data = Path(args.data)
    known = [*MODELS, "TwoTower"]
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models is not None else None
    if names == []:
        raise InputError(f"--models is empty; give a comma-separated subset of {','.join(known)}")
    if names is not None and set(names) - set(known):
        unknown = [n for n in names if n not in known]
        raise InputError(
            f"unknown models {unknown}; --models takes a comma-separated subset of {','.join(known)}"
        )
    meter = EnergyMeter()
    with Progress(*_progress_columns(), console=console, transient=True) as progress:
        task = progress.add_task("training", total=len(names) if names else len(known))
        seen: list[str] = []

        def tick(name: str) -> None:
            if seen:
                progress.advance(task)
            seen.append(name)
            progress.update(task, description=f"training and metering {name}")

        _, results = run_zoo(data, args.epochs, args.seed, names, meter, tick)
    console.print(zoo_table(results, f"{data.name}: models, test metrics and energy", console.width))
    console.print(breakeven_view([r.lifecycle for r in results], console.width))
    how = "measured (RAPL)" if meter.rapl.available else f"estimated: CPU at {meter.power.source}"
    console.print(f"energy {how}; one query = the top 10 for every test user, median of 5 after a warm-up")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its refusals on one line (what was wrong, and where the help is), exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message (see prog --help)`` on stderr and exit 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="leanrec", description="Lean data plumbing for feed recommenders.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the same seeded traffic through naive and lean plumbing and compare them",
        description="Simulate a feed: rank, log features, collect engagement, join, store training data, "
        "once with naive plumbing and once with lean plumbing, on the same traffic. Prints a side-by-side "
        "table and writes report.json, report.html and both warehouses under --out.",
    )
    demo.add_argument("--requests", type=_positive, default=5_000, help="ranked requests (default 5000)")
    demo.add_argument("--seed", type=_seed, default=7, help="seed of the world and the traffic (default 7)")
    demo.add_argument("--out", default="leanrec-demo", help="output folder (default ./leanrec-demo)")
    demo.add_argument(
        "--rounds",
        type=int,
        choices=(1, 2, 3),
        default=1,
        help=(
            "2: also train a model on round 0's warehouse and serve round 1 with it (closing the loop); "
            "3: then audit it, prune, retrain and serve round 2 under the pruned FeatureSet"
        ),
    )
    demo.add_argument(
        "--budget", type=_budget, default=0.001, help="audit round: most held-out AUC to lose (default 0.001)"
    )
    demo.add_argument(
        "--watts-per-core", type=_above_zero, help="power of a busy core (default: from the CPU)"
    )
    demo.add_argument("--region", help="ISO 3166 alpha-3 country of the grid (needs leanrec[carbon])")
    demo.add_argument("--grid-intensity", type=_at_least_zero, help="gCO2e per kWh (wins over --region)")
    demo.add_argument(
        "--shared-rows",
        action="store_true",
        help="lean path: item rows and slowly changing user features stored once per distinct content",
    )

    serve = sub.add_parser("serve", help="serve the ranking API (rank, paginate, events, healthz, metrics)")
    _add_config_flags(serve)
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="a development run: sign tokens with the built-in development secret when LEANREC_SECRET "
        "is not set (refused otherwise: anyone can forge them)",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="serving processes, on --port and the ports after it, for nginx to route to (default 1)",
    )
    serve.add_argument(
        "--nginx-conf", help="write the nginx config that routes each request's calls to its process here"
    )
    serve.add_argument(
        "--nginx-port", type=_port, default=8080, help="with --nginx-conf: where nginx listens (default 8080)"
    )
    join = sub.add_parser("join", help="run a joiner worker on a shared (Redis) bus")
    _add_config_flags(join)
    join.add_argument(
        "--max-seconds", type=_above_zero, default=None, help="stop after this long (default: run)"
    )
    join.add_argument(
        "--metrics-port", type=_positive, default=None, help="serve the joiner's counters on /metrics there"
    )
    sim = sub.add_parser("simulate", help="drive a running service with simulated users over HTTP")
    sim.add_argument("--target", required=True, help="base URL of the service (loopback only)")
    sim.add_argument("--requests", type=_positive, default=1_000, help="sessions to run (default 1000)")
    sim.add_argument("--concurrency", type=_positive, default=8, help="sessions in flight (default 8)")
    sim.add_argument("--seconds", type=_above_zero, default=60.0, help="time bound of the run (default 60)")
    sim.add_argument("--seed", type=_seed, default=7, help="seed of the users' behaviour")
    sim.add_argument("--n-users", type=_positive, help="the service's world (default: learnt from it)")
    sim.add_argument("--n-items", type=_positive, help="the service's world (default: learnt from it)")
    sim.add_argument("--world-seed", type=_seed, help="the service's --seed (default: learnt from it)")
    rp = sub.add_parser("replay", help="replay recorded sessions against a catalog service over HTTP")
    rp.add_argument("--target", required=True, help="base URL of the service (loopback only)")
    rp.add_argument(
        "--sessions", required=True, help="Parquet file: user_id, items (engaged), likes, context"
    )
    rp.add_argument("--featureset", help="the FeatureSet file the sessions are for (default: the service's)")
    rp.add_argument("--concurrency", type=_positive, default=4, help="sessions in flight (default 4)")
    rp.add_argument("--seed", type=_seed, default=7, help="seeds which sessions scroll fast")
    rp.add_argument(
        "--patience", type=_positive, default=10, help="positions viewed past the last engagement"
    )
    rp.add_argument(
        "--fast-scroll-share", type=_share, default=0.2, help="sessions whose signals never arrive"
    )
    rp.add_argument("--out", help="write the figures as JSON here")
    feats = sub.add_parser("features", help="load a catalog's user and item features into a FeatureStore")
    fload = feats.add_subparsers(dest="features_command", required=True).add_parser(
        "load", help="write users and items from Parquet files (an update overwrites what it holds)"
    )
    fload.add_argument("--featureset", required=True, help="the FeatureSet file the features belong to")
    fload.add_argument("--users", help="Parquet file: a user_id column and one per user feature")
    fload.add_argument("--items", help="Parquet file: an item_id column and one per item feature")
    fload.add_argument("--store-url", required=True, help="the FeatureStore: redis://host:port/db")
    fset = sub.add_parser("featureset", help="check a FeatureSet file, or write the synthetic world's")
    fsub = fset.add_subparsers(dest="action", required=True)
    check = fsub.add_parser("check", help="validate a FeatureSet file and print its layout")
    check.add_argument("file", help="a FeatureSet file (TOML)")
    fworld = fsub.add_parser("world", help="write the synthetic world's FeatureSet as a file")
    fworld.add_argument("--out", required=True, help="file to write")
    fworld.add_argument("--n-users", type=_positive, default=10_000, help="users of the world")
    fworld.add_argument("--n-items", type=_positive, default=50_000, help="items of its corpus")
    fworld.add_argument("--seed", type=_seed, default=7, help="seed of the world")
    tr = sub.add_parser("train", help="train the late ranker on a warehouse (request-level by default)")
    tr.add_argument("--warehouse", required=True, help="warehouse folder (either layout)")
    tr.add_argument("--out", required=True, help="checkpoint file to write")
    tr.add_argument("--epochs", type=_positive, default=5, help="most epochs (early stopping on AUC)")
    tr.add_argument("--impression-level", action="store_true", help="one user side per impression (baseline)")
    tr.add_argument(
        "--dedup",
        "--distinct-items",
        dest="dedup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute each distinct row's work once: the user side per request, the item side per "
        "distinct item row, only the interaction per impression (the same model; on by default, "
        "--no-dedup broadcasts the user side and computes the rest per impression)",
    )
    tr.add_argument("--full-metrics", action="store_true", help="full metric suite at every validation")
    tr.add_argument("--seed", type=_seed, default=0)
    tr.add_argument(
        "--featureset",
        help="train under this FeatureSet file (e.g. an audit's featureset.toml)",
    )
    au = sub.add_parser("audit", help="audit which features earn their cost; write a pruned FeatureSet")
    au.add_argument("--model", required=True, help="checkpoint of the trained late ranker")
    au.add_argument("--warehouse", required=True, help="its warehouse (held-out requests are audited)")
    au.add_argument("--budget", type=_budget, default=0.001, help="most held-out AUC to lose (default 0.001)")
    au.add_argument("--out", default="leanrec-audit", help="report folder (default ./leanrec-audit)")
    au.add_argument("--seed", type=_seed, default=0, help="seed of the shuffles")
    au.add_argument(
        "--repeats", type=_positive, default=5, help="shuffles per feature measured singly (default 5)"
    )
    pl = sub.add_parser(
        "plan",
        help="capacity and energy of naive against lean at your scale, from a demo's measured figures",
    )
    pl.add_argument("--report", default="leanrec-demo/report.json", help="a `leanrec demo` report.json")
    pl.add_argument("--dau", type=_above_zero, required=True, help="daily active users")
    pl.add_argument(
        "--requests-per-user", type=_above_zero, default=10.0, help="feed requests per user a day"
    )
    pl.add_argument(
        "--items-per-request",
        type=_above_zero,
        default=None,
        help="items ranked per request (default: as measured)",
    )
    pl.add_argument("--retention-days", type=_above_zero, default=30.0, help="days training data is kept")
    pl.add_argument("--region", help="ISO 3166 alpha-3 country of the grid (needs leanrec[carbon])")
    pl.add_argument("--grid-intensity", type=_at_least_zero, help="gCO2e per kWh (wins over --region)")
    be = sub.add_parser(
        "breakeven",
        help="train the retrieval models on a RecBole dataset; when does each dearer one pay off",
    )
    be.add_argument("--data", required=True, help="a RecBole dataset folder (e.g. ../shared/data/ml-100k)")
    be.add_argument(
        "--epochs", type=_positive, default=20, help="epochs of the embedding models (default 20)"
    )
    be.add_argument("--models", help="comma-separated subset (default: Pop,ItemKNN,BPR,LightGCN,TwoTower)")
    be.add_argument("--seed", type=_seed, default=2020, help="seed of the split and the training")
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on a warehouse's held-out requests")
    ev.add_argument("--model", required=True)
    ev.add_argument("--warehouse", required=True)
    return parser


def _print_error(message: str) -> None:
    """One line on stderr, however long: a log or a narrow terminal must not split it."""
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    err.print(f"[red]error:[/red] {escape(' '.join(message.split()))}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``leanrec`` command.

    A mistake in what the user gave (an :class:`~leanrec.errors.InputError`, raised where it is
    found) is printed once, as one line on stderr, with exit code 2; anything else is a bug and keeps
    its traceback.
    """
    args = build_parser().parse_args(argv)
    console = Console()
    commands = {
        "demo": _demo,
        "serve": _serve,
        "join": _join,
        "simulate": _simulate,
        "featureset": _featureset,
        "features": _features,
        "replay": _replay,
        "train": _train,
        "evaluate": _evaluate,
        "audit": _audit,
        "plan": _plan,
        "breakeven": _breakeven,
    }
    try:
        return commands[args.command](args, console)
    except InputError as exc:
        _print_error(str(exc))
        return 2
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        _print_error(
            f"leanrec {args.command} trains or runs a model, which needs torch: "
            "install the training extra, pip install 'leanrec[train]'"
        )
        return 2
    except KeyboardInterrupt:
        _print_error(f"leanrec {args.command} interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
