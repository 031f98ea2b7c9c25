"""Configuration of ``leanrec serve`` and ``leanrec join``: one TOML file, overridden by flags."""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from leanrec.errors import InputError
from leanrec.schema import FeatureSet
from leanrec.stores.redis_common import CLUSTER_SCHEME, cluster_seeds, redact
from leanrec.warehouse.tables import TableLayout

DEVELOPMENT_SECRET = "leanrec-development-secret-change-me"
"""The built-in token key. It is in leanrec's source for anyone to read, so anyone could sign tokens
with it: only a development run (``development = true``, ``leanrec serve --dev``) signs with it."""

SERVE_REMEDY = (
    "set LEANREC_SECRET (or secret in the config file) to a key of your own, shared by every process of "
    "the deployment, or pass --dev (config: development = true) for a development run"
)
"""How ``leanrec serve`` gets a key of its own, said when it refuses the built-in one."""


class ConfigError(InputError, ValueError):
    """A configuration file or flag that cannot be used, with the reason."""


@dataclass(frozen=True)
class ServeConfig:
    """Settings of a serving process and of the joiners that work for it.

    Attributes:
        host: Interface to listen on.
        port: TCP port.
        store_url: TransientStore (``memory://``, ``redis://host:port/db`` or
            ``redis+cluster://host:port[,host:port...]``).
        bus_url: EventBus (``memory://``, ``redis://host:port/db`` or ``redis+cluster://…``, sharded
            over 16 streams); joiners must share it.
        logging: ``lazy`` (the lean way), ``eager`` (the naive baseline) or ``off``.
        featureset: The FeatureSet file the service logs under (its ranker's features); empty for
            the synthetic world's, which ``n_users``, ``n_items`` and ``seed`` describe.
        features_url: With ``featureset``: the FeatureStore holding the catalog's current user and
            item features (``redis://host:port/db``, filled by ``leanrec features load``); set, the
            service ranks that catalog at ``/v1/rank``; empty, it only logs (``/v1/log``).
        retrieval: A retrieval index file (``leanrec.retrieval.save_index``) that gives ``/v1/rank``
            its candidates when a request brings none.
        model: A ``leanrec train`` checkpoint: the late ranker of ``/v1/rank``; empty, candidates
            keep their retrieval order.
        n_retrieve: Candidates the late ranker scores (and most a request may bring).
        n_rank: Items ``/v1/rank`` returns and logs.
        n_users: Users of the synthetic world the service ranks for.
        n_items: Items of its corpus.
        seed: Seed of the world (joiners derive the FeatureSet from the same settings).
        window_ms: Attribution window.
        lateness_ms: How long after the window an event batch may arrive.
        ttl_grace_ms: Transient entries live for window + lateness + this.
        context_max_bytes: Byte bound of the lazy logger's held contexts.
        context_idle_ms: A context untouched this long is released.
        lookahead: Positions a pagination signal looks ahead.
        shared_rows: Lazy logging stores item rows and the request's slowly changing features once
            per distinct content, referenced by hash (see :mod:`leanrec.featurelog.rows`). Joiners
            read either layout whatever this says.
        max_body_bytes: Largest request body accepted.
        max_events: Events in one batch.
        max_items: Longest ranked list a ranker may log (``/v1/log`` and the library).
        secret: HMAC key of request tokens (``LEANREC_SECRET`` in the environment wins); every
            process serving one deployment must share it. The default is the built-in
            :data:`DEVELOPMENT_SECRET`, which only a development run may use.
        secret_previous: The key tokens were signed with before the current one
            (``LEANREC_SECRET_PREVIOUS`` in the environment wins): during a rotation, tokens are
            signed with ``secret`` and accepted if either key signed them. Empty: none.
        development: A development run, which may sign tokens with the built-in secret.
        warehouse: Folder (or URI) joiners write to.
        warehouse_layout: How joiners write it: ``request`` (one row per request), ``dedup`` (request
            rows whose user and item feature rows are stored once per distinct content in side
            tables of each partition) or ``impression`` (one row per viewed item, the naive
            baseline); empty: ``impression`` under eager logging, ``request`` otherwise.
        consumer: Name of this joiner in the bus's consumer group.
        poll_ms: How often a joiner polls the bus and joins what is due.

    """

    host: str = "127.0.0.1"
    port: int = 8000
    store_url: str = "memory://"
    bus_url: str = "memory://"
    logging: str = "lazy"
    featureset: str = ""
    features_url: str = ""
    retrieval: str = ""
    model: str = ""
    n_retrieve: int = 1_000
    n_rank: int = 100
    n_users: int = 10_000
    n_items: int = 50_000
    seed: int = 7
    window_ms: int = 600_000
    lateness_ms: int = 60_000
    ttl_grace_ms: int = 300_000
    context_max_bytes: int = 512 << 20
    context_idle_ms: int = 120_000
    lookahead: int = 2
    shared_rows: bool = False
    max_body_bytes: int = 256 << 10
    max_events: int = 1_000
    max_items: int = 1_000
    secret: str = DEVELOPMENT_SECRET
    secret_previous: str = ""
    development: bool = False
    warehouse: str = "leanrec-warehouse"
    warehouse_layout: str = ""
    consumer: str = "joiner-1"
    poll_ms: int = 1_000

    def __post_init__(self) -> None:
        if self.logging not in ("lazy", "eager", "off"):
            raise ConfigError(f"logging must be lazy, eager or off, got {self.logging!r}")
        if self.warehouse_layout not in ("", *(layout.value for layout in TableLayout)):
            raise ConfigError(
                f"warehouse_layout must be request, dedup or impression, got {self.warehouse_layout!r}"
            )
        positive = ("port", "n_users", "n_retrieve", "n_rank", "window_ms", "max_body_bytes", "max_events")
        for name in (*positive, "max_items", "poll_ms", "context_max_bytes", "context_idle_ms"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_items < 1000:
            raise ConfigError(f"n_items must be at least 1000 (retrieval takes 1,000), got {self.n_items}")
        if self.lateness_ms < 0 or self.ttl_grace_ms < 0:
            raise ConfigError("lateness_ms and ttl_grace_ms must be >= 0")
        if self.port > 65_535:
            raise ConfigError(f"port must be at most 65535, got {self.port}")
        for name in ("store_url", "bus_url"):
            _check_url(name, getattr(self, name))
        if self.n_rank > self.n_retrieve:
            raise ConfigError(f"n_rank ({self.n_rank}) must be at most n_retrieve ({self.n_retrieve})")
        if (self.features_url or self.retrieval or self.model) and not self.featureset:
            raise ConfigError(
                "features_url, retrieval and model rank a catalog of your own: give its featureset file too"
            )
        if (self.retrieval or self.model) and not self.features_url:
            raise ConfigError("retrieval and model rank with the catalog's features: give features_url too")
        if self.features_url:
            _check_url("features_url", self.features_url)
            if self.features_url.startswith("memory:"):
                raise ConfigError(
                    "features_url must be redis://host:port/db: the FeatureStore is shared with "
                    "`leanrec features load`, so it cannot live in the serving process"
                )

    def catalog_featureset(self) -> FeatureSet:
        """The FeatureSet the deployment logs under: the ``featureset`` file's, else the world's.

        Raises:
            FeatureSetFileError: The file cannot be used.

        """
        if self.featureset:
            from leanrec.featurefile import load_featureset

            return load_featureset(self.featureset)
        from leanrec.world import WorldConfig, default_featureset

        return default_featureset(WorldConfig(n_users=self.n_users, n_items=self.n_items, seed=self.seed))[0]

    def _secret(self) -> str:
        return os.environ.get("LEANREC_SECRET") or self.secret  # set but empty: not set

    def _secret_previous(self) -> str:
        return os.environ.get("LEANREC_SECRET_PREVIOUS") or self.secret_previous

    def secret_bytes(self) -> bytes:
        """The HMAC key: the environment's ``LEANREC_SECRET`` if set, else the configured one."""
        return _key_bytes(self._secret())

    def previous_secret_bytes(self) -> bytes | None:
        """The key of the previous rotation (``LEANREC_SECRET_PREVIOUS`` wins), or None."""
        previous = self._secret_previous()
        return _key_bytes(previous) if previous else None

    def has_own_secret(self) -> bool:
        """Whether the current key is one of the deployment's own: neither empty nor the built-in one."""
        return self._secret() not in ("", DEVELOPMENT_SECRET)

    def check_secret(self, who: str = "leanrec serve", remedy: str = SERVE_REMEDY) -> None:
        """Refuse to sign or check tokens with a key anyone can read, unless this is a development run.

        Args:
            who: What refuses (the start of the message).
            remedy: How to set a key of one's own.

        Raises:
            ConfigError: The current or the previous key is empty or the built-in development secret.

        """
        if self.development:
            return
        if not self.has_own_secret():
            raise ConfigError(
                f"{who} will not sign tokens with the built-in development secret, which anyone can read in "
                f"leanrec's source and forge tokens with: {remedy}"
            )
        self.check_previous_secret(who, remedy)

    def check_previous_secret(self, who: str, remedy: str) -> None:
        """Refuse a previous key that is the built-in development secret (unless a development run).

        Raises:
            ConfigError: It is.

        """
        if not self.development and self._secret_previous() == DEVELOPMENT_SECRET:
            raise ConfigError(
                f"{who} will not accept tokens signed with the built-in development secret as the "
                f"previous key (secret_previous, LEANREC_SECRET_PREVIOUS): anyone can forge them; "
                f"leave it empty, or {remedy}"
            )

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> ServeConfig:
        """Settings from a TOML file (a ``[leanrec]`` table or top-level keys), then ``overrides``.

        Overrides whose value is ``None`` are ignored (flags not given).

        Raises:
            ConfigError: Missing or malformed file, unknown key, or a value of the wrong type.

        """
        values: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(
                    f"config file {path} does not exist; give the path of a TOML file"
                ) from None
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(f"config file {path} cannot be read: {why}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
            values = data.get("leanrec", data)
        known = {f.name: f for f in fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        for name, value in values.items():
            if known[name].type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{name} must be true or false, got {value!r}")
                continue
            want = int if known[name].type in ("int", int) else str
            if want is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if want is str and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {value!r}")
        return replace(cls(), **values)


def _key_bytes(text: str) -> bytes:
    """An HMAC key from its text: the bytes, or their SHA-256 if shorter than 16 bytes."""
    raw = text.encode()
    return raw if len(raw) >= 16 else hashlib.sha256(raw).digest()


def _check_url(name: str, url: str) -> None:
    """Refuse a backend URL no backend opens, before anything connects.

    Raises:
        ConfigError: A scheme other than ``memory://``, ``redis://`` and ``redis+cluster://``, a
            Redis URL whose port or database is not a number, a cluster URL whose seeds are not
            ``host:port``, or a ``max_bytes`` option that is not a positive number.

    """
    parsed = urlsplit(url)
    url = redact(url)  # never print a password
    if parsed.scheme not in ("memory", "redis", CLUSTER_SCHEME):
        raise ConfigError(
            f"{name} must be memory://, redis://host:port/db or redis+cluster://host:port, got {url!r}"
        )
    if parsed.scheme == CLUSTER_SCHEME:
        try:
            cluster_seeds(url)
        except ValueError as err:
            raise ConfigError(f"{name}: {err}") from None
    if parsed.scheme == "redis":
        try:
            parsed.port  # noqa: B018 (parsing the port is the check)
        except ValueError:
            raise ConfigError(f"{name} {url!r}: the port is not a number") from None
        db = parsed.path.strip("/")
        if not parsed.hostname or (db and not db.isdigit()):
            raise ConfigError(f"{name} must be redis://host:port/db with a database number, got {url!r}")
    for value in parse_qs(parsed.query, keep_blank_values=True).get("max_bytes", []):
        if not value.isdigit() or int(value) == 0:
            raise ConfigError(f"{name} {url!r}: max_bytes must be a positive whole number of bytes")
