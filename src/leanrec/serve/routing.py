"""Several serving processes behind a load balancer: the request id header and nginx's configuration.

With lazy logging a ranked request's frozen features wait in the memory of the process that ranked
it (:class:`~leanrec.featurelog.loggers.ContextCache`), so its ``/v1/paginate`` and ``/v1/events``
calls must reach that process. The API names the request in a header, :data:`REQUEST_ID_HEADER`,
that a load balancer hashes on: nginx sets it on a ``/v1/rank`` or ``/v1/log`` call that comes
without one (from its own ``$request_id``, 128 random bits), hashes it onto one process with a
consistent hash, and passes it on; the process ranks under that id, and the client sends it back in
the same header with the request's later calls, which the same hash sends to the same process.
:func:`nginx_conf` writes that configuration for the processes of ``leanrec serve --workers N``.
"""

from __future__ import annotations

import re

from leanrec.errors import InputError

REQUEST_ID_HEADER = "X-Leanrec-Request-Id"
"""The header that names a ranked request, for the load balancer to route by (case-insensitive)."""

MAX_REQUEST_ID = 64
"""Longest request id: what ``/v1/paginate`` and ``/v1/events`` accept in their bodies."""

UPSTREAM_KEEPALIVE_S = 60
"""Seconds nginx keeps an idle connection to a serving process (``keepalive_timeout`` upstream)."""

PROCESS_KEEP_ALIVE_S = 75
"""Seconds a serving process keeps an idle connection open (uvicorn's ``timeout_keep_alive``).

Longer than nginx's ``UPSTREAM_KEEPALIVE_S``, so that nginx never sends a call on a connection the
process is closing: the call would meet a reset, and nginx answers 502 without sending a POST again.
"""

_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RequestIdError(InputError, ValueError):
    """A request id the caller chose that cannot name a request, with the reason."""


def check_request_id(value: str) -> str:
    """A caller-chosen request id, if it can name a request.

    Ids become transient-store keys (``lr:{<id>}:…``, where braces are the Redis Cluster hash tag)
    and fields of the signed token (``|``-separated), so only letters, digits, ``-`` and ``_``
    are taken. The caller keeps ids unique: nginx's ``$request_id`` is 32 random hex digits.

    Raises:
        RequestIdError: Empty, longer than 64 characters, or with another character.

    """
    if type(value) is not str or _REQUEST_ID.fullmatch(value) is None:
        raise RequestIdError(
            f"request id {value!r} must be 1 to {MAX_REQUEST_ID} letters, digits, '-' or '_' "
            f"(the {REQUEST_ID_HEADER} header)"
        )
    return value


def worker_ports(port: int, workers: int) -> list[int]:
    """The ports of ``workers`` serving processes: ``port`` and the ones after it.

    Raises:
        InputError: Fewer than one worker, or a port past 65535.

    """
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    last = port + workers - 1
    if last > 65_535:
        raise InputError(f"{workers} workers from port {port} need ports up to {last}, past 65535")
    return list(range(port, last + 1))


def _address(host: str) -> str:
    """``host`` as nginx writes it before ``:port`` (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def upstream_host(host: str) -> str:
    """Where nginx reaches a process that listens on ``host``: loopback for the wildcard addresses."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def nginx_conf(
    upstreams: list[tuple[str, int]],
    listen_port: int,
    listen_host: str = "127.0.0.1",
    max_body_bytes: int = 256 << 10,
    keepalive: int = 64,
) -> str:
    """An nginx configuration that routes each ranked request's calls to the process that ranked it.

    Paths (pid, error log, temporary files) are relative to nginx's prefix, so it runs as any user
    from its own folder: ``nginx -p DIR -c DIR/nginx.conf -e DIR/error.log``. It hashes on
    :data:`REQUEST_ID_HEADER` with ``hash ... consistent`` (ketama), so a process that leaves or
    joins the upstream moves only its share of the requests; it sets the header from
    ``$request_id`` on a call that comes without one, and refuses a ``/v1/paginate`` or
    ``/v1/events`` call without one (400, in the API's ``{"error": ...}`` body), which no hash could
    send to the right process. ``/healthz`` and ``/metrics`` reach some process; scrape each
    process on its own port for its figures.

    Args:
        upstreams: ``(host, port)`` of each serving process.
        listen_port: Where nginx listens.
        listen_host: Its interface.
        max_body_bytes: The processes' ``max_body_bytes``: bodies up to it are held in memory, never
            in temporary files, and larger ones are refused by the processes themselves (413).
        keepalive: Idle connections nginx keeps to the processes (a new one per call costs more
            than the call).

    """
    if not upstreams:
        raise ValueError("nginx_conf needs at least one upstream process")
    servers = "\n".join(f"        server {_address(host)}:{port};" for host, port in upstreams)
    header = REQUEST_ID_HEADER
    var = "$http_" + header.lower().replace("-", "_")
    body_limit = max_body_bytes + 1024  # the process, not nginx, refuses a body too large: same message
    refusal = (
        f'{{"error": "no {header} header: send the request_id that /v1/rank or /v1/log answered in '
        f'the {header} header, so the call reaches the process that ranked the request"}}'
    )
    proxy = "\n".join(
        (
            "            proxy_pass http://leanrec;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_set_header Host $host;",
            f"            proxy_set_header {header} $leanrec_request_id;",
        )
    )
    return f"""# leanrec: {len(upstreams)} serving process(es) behind nginx, routed by the {header} header.
# Written by `leanrec serve --nginx-conf`; run it with
#   nginx -p <this folder> -c <this file> -e <this folder>/error.log
worker_processes 1;
pid nginx.pid;
error_log error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    # Temporary files in the prefix, so that nginx runs as any user from its own folder.
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    client_max_body_size {body_limit};
    client_body_buffer_size {body_limit};

    # The request id: the client's header, else nginx's own (32 random hex digits).
    map {var} $leanrec_request_id {{
        ""      $request_id;
        default {var};
    }}

    upstream leanrec {{
        hash $leanrec_request_id consistent;
{servers}
        keepalive {keepalive};
        keepalive_timeout {UPSTREAM_KEEPALIVE_S}s;
    }}

    server {{
        listen {_address(listen_host)}:{listen_port};
        default_type application/json;
        error_page 502 504 @no_process;

        location = /v1/paginate {{
            if ({var} = "") {{
                return 400 '{refusal}';
            }}
{proxy}
        }}

        location = /v1/events {{
            if ({var} = "") {{
                return 400 '{refusal}';
            }}
{proxy}
        }}

        location / {{
{proxy}
        }}

        location @no_process {{
            return 502 '{{"error": "no serving process answers for this request: start leanrec serve"}}';
        }}
    }}
}}
"""
