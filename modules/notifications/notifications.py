"""The notifications domain, a Chimera module in Python: tells buyers what happens to their orders.

Written from docs/contract.md alone (no SDK): one program, two heads.

- `worker` consumes CHIMERA_WORKER_QUEUE: users' events (to know a buyer's name and email) and
  orders' events (each becomes a notification for the buyer), with the inbox, retries, the
  dead-letter queue, payload schemas and SIGTERM drain of the contract;
- `query` serves `GET /notifications?user_id=...&limit=&after=` from the same database (SQLite
  under `chimera up`, MySQL/MariaDB on Kubernetes: store.py).

Both heads serve /healthz, /readyz and /metrics on CHIMERA_HTTP_ADDR and answer errors in JSON.
"""

import copy
import json
import os
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from store import ConfigError, Database

# The contract's histogram buckets (docs/contract.md, section 5).
BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2,
           0.25, 0.3, 0.4, 0.5, 1.0, 2.5, 5.0]

ORDER_TEXT = {
    "order.placed": "Your order {order_id} was placed.",
    "order.rejected": "Your order {order_id} could not be accepted: {reason}.",
    "order.delivered": "Your order {order_id} was delivered.",
    "order.completed": "Your order {order_id} is complete.",
    "order.cancelled": "Your order {order_id} was cancelled.",
}


def log(level, message, **fields):
    """One line per event on stderr; JSON lines with CHIMERA_LOG_FORMAT=json."""
    if os.environ.get("CHIMERA_LOG_FORMAT") == "json":
        line = json.dumps({"level": level, "message": message, **fields})
    else:
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{level.upper()} {message} {extra}".rstrip()
    print(line, file=sys.stderr, flush=True)


def env(name, default=None):
    value = os.environ.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise ConfigError(f"{name} is not set (docs/contract.md, section 2)")
    return default


def env_int(name, default):
    value = env(name, str(default))
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{name} must not be negative, got {number}")
    return number


def http_addr():
    """CHIMERA_HTTP_ADDR as (host, port)."""
    value = env("CHIMERA_HTTP_ADDR")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"CHIMERA_HTTP_ADDR must be HOST:PORT, got {value!r}")
    return host, int(port)


def label(value):
    """A Prometheus label value, escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The contract's metrics, in Prometheus text format."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # (route, method, status) -> [bucket counts..., sum, count]
        self.in_flight = 0
        self.messages = {}  # (kind, outcome) -> count
        self.batches = [0] * len(BUCKETS) + [0.0, 0]

    @staticmethod
    def _observe(cell, seconds):
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                cell[i] += 1
        cell[-2] += seconds
        cell[-1] += 1

    def request(self, route, method, status, seconds):
        with self.lock:
            cell = self.requests.setdefault((route, method, status), [0] * len(BUCKETS) + [0.0, 0])
            self._observe(cell, seconds)

    def message(self, kind, outcome):
        with self.lock:
            self.messages[(kind, outcome)] = self.messages.get((kind, outcome), 0) + 1

    def batch(self, seconds):
        with self.lock:
            self._observe(self.batches, seconds)

    @staticmethod
    def _histogram(lines, name, labels, cell):
        prefix = f"{labels}," if labels else ""
        for i, bound in enumerate(BUCKETS):
            lines.append(f'{name}_bucket{{{prefix}le="{bound}"}} {cell[i]}')
        lines.append(f'{name}_bucket{{{prefix}le="+Inf"}} {cell[-1]}')
        braces = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{braces} {cell[-2]}")
        lines.append(f"{name}_count{braces} {cell[-1]}")

    def render(self):
        with self.lock:
            lines = ["# TYPE chimera_http_request_duration_seconds histogram"]
            for (route, method, status), cell in sorted(self.requests.items()):
                labels = f'route="{route}",method="{method}",status="{status}"'
                self._histogram(lines, "chimera_http_request_duration_seconds", labels, cell)
            lines += ["# TYPE chimera_http_requests_in_flight gauge",
                      f"chimera_http_requests_in_flight {self.in_flight}",
                      "# TYPE chimera_worker_messages_total counter"]
            for (kind, outcome), n in sorted(self.messages.items()):
                # The kind comes from the sender: escaped, so that no type breaks the scrape.
                lines.append(f'chimera_worker_messages_total{{kind="{label(kind)}",outcome="{outcome}"}} {n}')
            lines.append("# TYPE chimera_worker_batch_duration_seconds histogram")
            self._histogram(lines, "chimera_worker_batch_duration_seconds", "", self.batches)
            # No outbox: this domain publishes nothing.
            lines.append("# TYPE chimera_outbox_pending_rows gauge")
            lines.append("chimera_outbox_pending_rows 0")
            return "\n".join(lines) + "\n"


def http_server(addr, metrics, ready, routes):
    """The contract's endpoints and `routes` ({path: handler(query) -> (status, body)}), with
    JSON errors (404, 405 with Allow, 500)."""
    host, port = addr

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status, body, content_type="application/json", headers=()):
            data = body if isinstance(body, bytes) else body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status, code, message, headers=()):
            self._send(status, json.dumps({"error": code, "message": message}), headers=headers)

        def _handle(self):
            started = time.monotonic()
            # A request's body is read (and ignored), so that the connection stays in step.
            length = self.headers.get("Content-Length", "0")
            if length.isdigit() and int(length) > 0:
                self.rfile.read(min(int(length), 1 << 20))
            if self.command in ("HEAD", "OPTIONS"):
                self.close_connection = True  # a HEAD's answer has no body to frame
            url = urlsplit(self.path)
            known = {"/healthz", "/readyz", "/metrics", *routes}
            route = url.path if url.path in known else "unmatched"
            with metrics.lock:
                metrics.in_flight += 1
            status = 500
            try:
                if url.path not in known:
                    status = 404
                    self._error(404, "not_found", f"no route for {url.path}")
                elif self.command != "GET":
                    status = 405
                    self._error(405, "method_not_allowed",
                                f"{self.command} is not allowed on {url.path}", [("Allow", "GET")])
                elif url.path == "/healthz":
                    status = 200
                    self._send(200, "ok", "text/plain")
                elif url.path == "/readyz":
                    why = ready()
                    status = 200 if why is None else 503
                    if why is None:
                        self._send(200, "ready", "text/plain")
                    else:
                        self._error(503, "unavailable", why)
                elif url.path == "/metrics":
                    status = 200
                    self._send(200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
                else:
                    status, body = routes[url.path](parse_qs(url.query))
                    if status >= 400:
                        self._error(status, body["error"], body["message"])
                    else:
                        self._send(status, json.dumps(body))
            except Exception as error:  # the head's own fault: a 500, details in the log
                log("error", "request failed", path=url.path, error=repr(error))
                status = 500
                self._error(500, "internal", "the head failed to answer; details are in its log")
            finally:
                with metrics.lock:
                    metrics.in_flight -= 1
                metrics.request(route, self.command, status, time.monotonic() - started)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def list_notifications(database):
    def handler(query):
        user = (query.get("user_id") or [""])[0]
        if not user:
            return 400, {"error": "bad_request", "message": "bad query parameter: user_id is required"}
        try:
            limit = int((query.get("limit") or ["50"])[0])
        except ValueError:
            return 400, {"error": "bad_request", "message": "bad query parameter: limit must be a whole number"}
        if not 1 <= limit <= 500:
            return 400, {"error": "bad_request", "message": "bad query parameter: limit must be 1-500"}
        after = (query.get("after") or [""])[0]
        try:
            db = database.connect(read_only=True)
            try:
                rows = db.execute(
                    "SELECT notification_id, order_id, kind, text, created_at FROM notifications "
                    "WHERE user_id = ? AND notification_id > ? ORDER BY notification_id LIMIT ?",
                    (user, after, limit + 1)).fetchall()
            finally:
                db.close()
        except database.errors as error:
            # A dependency down is a 503, not the head's own fault (contract, section 4).
            log("warn", "the database did not answer a read", error=type(error).__name__)
            return 503, {"error": "unavailable", "message": "the database does not answer"}
        items = [{"notification_id": r[0], "user_id": user, "order_id": r[1], "kind": r[2],
                  "text": r[3], "created_at": r[4]} for r in rows[:limit]]
        nxt = items[-1]["notification_id"] if len(rows) > limit else None
        return 200, {"items": items, "next": nxt}
    return handler


def run_query(database):
    metrics = Metrics()
    stop = threading.Event()

    def ready():
        return database.answers()

    server = http_server(http_addr(), metrics, ready,
                         {"/notifications": list_notifications(database)})
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log("info", "serving HTTP", addr=env("CHIMERA_HTTP_ADDR"))
    stop.wait()
    # Stop accepting, then finish the requests in flight within the drain budget (the handler
    # threads are daemons: they would die with the process).
    server.shutdown()
    server.server_close()
    deadline = time.monotonic() + max(1, env_int("CHIMERA_DRAIN_SECONDS", 30) - 1)
    while metrics.in_flight > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    log("info", "query head stopped", unfinished=metrics.in_flight)


def topic_matches(pattern, name):
    def match(p, w):
        if not p:
            return not w
        if p[0] == "#":
            return any(match(p[1:], w[i:]) for i in range(len(w) + 1))
        if p[0] == "*":
            return bool(w) and match(p[1:], w[1:])
        return bool(w) and w[0] == p[0] and match(p[1:], w[1:])
    return match(pattern.split("."), name.split("."))


class InboxRace(Exception):
    """Another consumer recorded the same message in the inbox at the same moment."""


def attempt_of(properties):
    """The delivery's `x-chimera-attempt` (1 when missing or not a number)."""
    try:
        return max(1, int((properties.headers or {}).get("x-chimera-attempt", 1) or 1))
    except (TypeError, ValueError):
        return 1


class Worker:
    """Consumes the worker queue and settles each message per docs/contract.md, section 8."""

    def __init__(self, database):
        import jsonschema
        self.database = database
        self.db = None  # the consuming thread's connection, opened by run()
        self.domain = env("CHIMERA_DOMAIN")
        self.queue = env("CHIMERA_WORKER_QUEUE")
        self.dlq = env("CHIMERA_DEAD_LETTER_QUEUE")
        self.failures = env("CHIMERA_FAILURES_EXCHANGE", self.queue + ".failures")
        delays = os.environ.get("CHIMERA_RETRY_DELAYS_SECONDS", "")
        if not all(d.strip().isdigit() for d in delays.split(",") if d.strip()):
            raise ConfigError(f"CHIMERA_RETRY_DELAYS_SECONDS must be whole seconds separated by commas, got {delays!r}")
        self.delays = [int(d) for d in delays.split(",") if d.strip()]
        self.max_attempts = env_int("CHIMERA_MAX_ATTEMPTS", len(self.delays) + 1)
        self.prefetch = env_int("CHIMERA_PREFETCH", 100)
        if not 0 < self.prefetch < 65536:
            raise ConfigError(f"CHIMERA_PREFETCH must be 1-65535, got {self.prefetch}")
        self.commands = [c for c in env("CHIMERA_COMMANDS", " ").split(",") if c.strip()]
        subs = os.environ.get("CHIMERA_SUBSCRIPTIONS")
        self.patterns = None if subs is None else [
            s.split(":", 1)[1] for s in subs.split(",") if ":" in s]
        try:
            schemas = json.loads(os.environ.get("CHIMERA_SCHEMAS") or "{}")
        except ValueError as error:
            raise ConfigError(f"CHIMERA_SCHEMAS is not JSON: {error}") from None
        if not isinstance(schemas, dict):
            raise ConfigError("CHIMERA_SCHEMAS must be a JSON object (message type -> schema)")
        self.schemas = {}
        for kind, schema in schemas.items():
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as error:
                raise ConfigError(f"CHIMERA_SCHEMAS: the schema of {kind} is invalid: {error.message}") from None
            self.schemas[kind] = jsonschema.Draft202012Validator(schema)
        import pika
        try:
            # Parsed now: a bad URL is a refusal to start, and its text (credentials) is not printed.
            self.amqp = pika.URLParameters(env("CHIMERA_AMQP_URL"))
        except ConfigError:
            raise
        except Exception:
            raise ConfigError("CHIMERA_AMQP_URL is not an AMQP URL (amqp://USER:PASS@HOST:PORT/VHOST)") from None
        self.handlers = {
            "user.registered": self.user_known,
            "user.updated": self.user_known,
            "user.deleted": self.user_deleted,
            **{kind: self.order_event for kind in ORDER_TEXT},
        }
        self.metrics = Metrics()
        self.stopping = False
        self.connected = False

    # --- handlers: they write through `tx` only (the inbox row commits with them) ---

    def user_known(self, tx, kind, data):
        tx.execute(self.database.upsert_buyer(),
                   (data["user_id"], data.get("name", ""), data.get("email", "")))

    def user_deleted(self, tx, kind, data):
        tx.execute("DELETE FROM buyers WHERE user_id = ?", (data["user_id"],))
        tx.execute("DELETE FROM notifications WHERE user_id = ?", (data["user_id"],))

    def order_event(self, tx, kind, data):
        text = ORDER_TEXT[kind].format(order_id=data["order_id"], reason=data.get("reason") or "no reason given")
        buyer = tx.execute("SELECT name FROM buyers WHERE user_id = ?", (data["buyer_id"],)).fetchone()
        if buyer and buyer[0]:
            text = f"{buyer[0]}: {text}"
        # A time-ordered id: a buyer's notifications list in the order they happened.
        now = time.time_ns()
        notification_id = f"{now:020d}-{uuid.uuid4().hex[:8]}"
        created_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9)) + f".{now // 10**6 % 1000:03d}Z"
        tx.execute("INSERT INTO notifications (notification_id, user_id, order_id, kind, text, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (notification_id, data["buyer_id"], data["order_id"], kind, text, created_at))

    # --- settlement ---

    def subscribed_event(self, kind):
        return (kind not in self.commands and self.patterns is not None
                and any(topic_matches(p, kind) for p in self.patterns))

    def settle(self, channel, publish, method, properties, body):
        attempt = attempt_of(properties)
        try:
            envelope = json.loads(body)
            if not isinstance(envelope, dict):
                raise ValueError("the body is not a JSON object")
            message_id, kind = str(uuid.UUID(str(envelope["id"]))), envelope["type"]
            if not isinstance(kind, str) or not kind.strip():
                raise ValueError("the type is empty")
            data = envelope["data"]
            envelope["occurred_at"]
        except Exception as error:  # whatever the bytes are: parked as they came, never a loop
            self.dead_letter(publish, method, properties, body, f"not a Chimera envelope: {error!r}", raw=True)
            return properties.type or "unknown", "dead_lettered"
        handler = self.handlers.get(kind)
        if handler is None:
            if self.subscribed_event(kind):
                return kind, "ignored"
            what = "command" if kind in self.commands else "message type"
            self.dead_letter(publish, method, properties, body, f'no handler for {what} "{kind}"')
            return kind, "dead_lettered"
        validator = self.schemas.get(kind)
        if validator is not None:
            errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))[:3]
            if errors:
                why = "; ".join(f"{e.message} (at /{'/'.join(map(str, e.path))})" for e in errors)
                self.dead_letter(publish, method, properties, body,
                                 f"the payload does not match the schema of {kind}: {why}")
                return kind, "dead_lettered"
        db = self.db
        try:
            db.begin()
            try:
                seen = db.execute(
                    "SELECT 1 FROM chimera_inbox WHERE consumer = ? AND message_id = ?",
                    (self.domain, message_id)).fetchone()
                if seen:
                    db.rollback()
                    return kind, "duplicate"
                try:
                    handler(db, kind, data)
                except (KeyError, TypeError, ValueError, AttributeError, self.database.duplicate) as error:
                    # A payload that does not fit (a field missing, of another type, a row it
                    # contradicts): it will never be valid.
                    db.rollback()
                    why = f"missing field {error}" if isinstance(error, KeyError) else f"the payload does not fit: {error!r}"
                    self.dead_letter(publish, method, properties, body, why)
                    return kind, "dead_lettered"
                try:
                    db.execute("INSERT INTO chimera_inbox (consumer, message_id, message_type, processed_at) "
                               "VALUES (?, ?, ?, ?)", (self.domain, message_id, kind, int(time.time() * 1e6)))
                except self.database.duplicate:
                    raise InboxRace() from None
                db.commit()
                return kind, "handled"
            except BaseException:
                db.rollback()
                raise
        except InboxRace:
            # Another replica recorded the same message at the same moment: back to the queue,
            # where the redelivery is a duplicate.
            raise
        except self.database.transient as error:  # the database failed: may pass later
            return self.retry_or_park(publish, method, properties, body, attempt, f"database: {error}", kind)
        except Exception as error:  # the handler's own failure: retried, then parked; never a loop
            log("error", "handler failed", kind=kind, error=repr(error))
            return self.retry_or_park(publish, method, properties, body, attempt,
                                      f"the handler failed: {error!r}", kind)

    def retry_or_park(self, publish, method, properties, body, attempt, reason, kind):
        if attempt < self.max_attempts and attempt <= len(self.delays):
            self.republish(publish, properties, body, f"{self.queue}.retry.{attempt}", attempt + 1,
                           reason, method.routing_key)
            return kind, "retried"
        self.dead_letter(publish, method, properties, body, f"failed {attempt} time(s); last error: {reason}")
        return kind, "dead_lettered"

    def republish(self, publish, properties, body, routing_key, attempt, reason, original, raw=False):
        import pika
        headers = dict(properties.headers or {})
        headers.setdefault("x-chimera-original-routing-key", original)
        headers.update({"x-chimera-attempt": attempt, "x-chimera-reason": reason})
        headers = {k: v for k, v in headers.items() if not k.startswith("x-death")
                   and not k.startswith("x-first-death") and not k.startswith("x-last-death")}
        if raw:
            # Not an envelope: parked with its properties exactly as they came (headers added).
            props = copy.copy(properties)
            props.headers = headers
            props.delivery_mode = 2
        else:
            props = pika.BasicProperties(message_id=properties.message_id, type=properties.type,
                                         content_type="application/json", delivery_mode=2,
                                         timestamp=properties.timestamp, headers=headers)
        publish(self.failures, routing_key, body, props)

    def dead_letter(self, publish, method, properties, body, reason, raw=False):
        log("warn", "dead-lettering a message", reason=reason)
        self.republish(publish, properties, body, self.dlq, attempt_of(properties), reason,
                       method.routing_key, raw=raw)

    def run(self):
        import pika
        import pika.exceptions
        params = self.amqp
        params.client_properties = {"connection_name": f"{self.domain}-worker {env('CHIMERA_POD_NAME', str(os.getpid()))}"}
        self.db = self.database.connect()
        connection = pika.BlockingConnection(params)
        self.connected = True
        channel = connection.channel()
        channel.basic_qos(prefetch_count=self.prefetch)
        publisher = connection.channel()
        publisher.confirm_delivery()

        def publish(exchange, routing_key, body, props):
            # Confirmed and mandatory: an unroutable or refused copy raises, and the original
            # is requeued instead of acked (never lost).
            publisher.basic_publish(exchange, routing_key, body, props, mandatory=True)

        def on_message(ch, method, properties, body):
            started = time.monotonic()
            try:
                kind, outcome = self.settle(ch, publish, method, properties, body)
                ch.basic_ack(method.delivery_tag)
            except Exception as error:
                log("warn", "message returned to the queue", error=repr(error))
                kind, outcome = properties.type or "unknown", "requeued"
                ch.basic_nack(method.delivery_tag, requeue=True)
            self.metrics.message(kind, outcome)
            self.metrics.batch(time.monotonic() - started)

        tag = env("CHIMERA_POD_NAME", f"{self.domain}-worker-{os.getpid()}")
        # A queue missing now is an error: the head exits non-zero and is restarted.
        channel.basic_consume(self.queue, on_message, consumer_tag=tag)
        current = {"channel": channel}

        def stop(*_):
            if not self.stopping:
                self.stopping = True
                # pika is not thread safe: the cancel runs in the connection's loop.
                connection.add_callback_threadsafe(lambda: current["channel"].stop_consuming(tag))
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log("info", "consuming", queue=self.queue)
        backoff = 1
        while True:
            current["channel"].start_consuming()
            if self.stopping:
                break
            # The broker cancelled the consumer (the queue deleted or moved): consume again
            # once the control plane has it back, never declaring it (contract, section 3).
            log("warn", "the broker cancelled the consumer; consuming again", in_seconds=backoff)
            while not self.stopping:
                connection.sleep(backoff)
                try:
                    if current["channel"].is_closed:
                        current["channel"] = connection.channel()
                        current["channel"].basic_qos(prefetch_count=self.prefetch)
                    current["channel"].basic_consume(self.queue, on_message, consumer_tag=tag)
                    backoff = 1
                    break
                except pika.exceptions.ChannelClosedByBroker as error:
                    log("warn", "the worker queue is not back yet", reply=error.reply_code)
                    backoff = min(backoff * 2, 30)
            if self.stopping:
                break
        connection.close()
        log("info", "worker stopped: messages in flight settled")


def main(argv):
    head = argv[1] if len(argv) > 1 else os.environ.get("CHIMERA_HEAD", "")
    if head in ("-h", "--help"):
        print("usage: notifications query|worker (the head contract's environment: docs/contract.md)")
        return 0
    if head not in ("query", "worker"):
        print(f"notifications: unknown head {head!r}: expected query or worker", file=sys.stderr)
        return 2
    try:
        database = Database(env("CHIMERA_DATABASE_URL", "sqlite://notifications.db"))
        http_addr()
        worker = Worker(database) if head == "worker" else None  # its settings, checked first
        database.migrate(log)
        if worker is None:
            run_query(database)
            return 0

        def ready():
            if worker.stopping:
                return "stopping: finishing the messages in flight"
            if not worker.connected:
                return "the broker connection is not up"
            return database.answers()
        server = http_server(http_addr(), worker.metrics, ready, {})
        worker.run()
        server.shutdown()
        return 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        log("error", "head stopped", error=repr(error))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
