"""Tests for llmgate.py: the one test file of the project.

The harness comes first: a fake provider, clients, GatewayTest (a gateway
in this process per test) and helpers for a gateway in a subprocess.  Then
one section per issue:

  Issue 2  the core gateway: auth, forwarding, billing, the quota,
           self-service, refusals, logging and the command line
  Issue 3  the Anthropic Messages API, Azure, any OpenAI-compatible
           provider, and routing
  Issue 4  reservations, abandoned and broken streams, durable usage,
           live reload, per-user controls, keys at rest, the admin view

Every test runs real servers on 127.0.0.1, port 0: the gateway, in this
process or as `python3 llmgate.py` in a session of its own that cleanup
kills, and a fake provider that speaks the event sequences real providers
send (OpenAI chat and Responses, Anthropic Messages, Azure).  Every
socket, wait and subprocess has a timeout.  Nothing waits on a fixed
sleep: tests wait on Events, Barriers, Conditions and, for subprocesses,
on select() with a deadline.  The one timed wait is
Server.assert_running_for: proving that a stopping server has NOT exited
yet needs a window, 0.5 s, in which it must not.  Three loops pace
themselves with short waits that end early on the event they look for:
wait_listener_closed (nothing tells from outside when a port closes),
FakeProvider.stream_until_gone and RefusalTest's header dribble.
Standard library only, Python 3.8 or later.  Run from the folder that
holds llmgate.py:

    python3 -m unittest -v test_llmgate
"""

import contextlib
import datetime
import gzip
import hashlib
import http.client
import http.server
import io
import json
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib
from unittest import mock

import llmgate

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "llmgate.py")
TIMEOUT = 10            # seconds, on every socket, wait and subprocess
PROVIDER_KEY = "sk-provider-SECRET-0123456789"
ALICE_KEY = "alice-key-0123456789"
BOB_KEY = "bob-key-0123456789"

# usage the fake provider reports, per API
CHAT_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
RESPONSES_USAGE = {"input_tokens": 20, "output_tokens": 9, "total_tokens": 29,
                   "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens_details": {"reasoning_tokens": 0}}
EMBEDDINGS_USAGE = {"prompt_tokens": 5, "total_tokens": 5}
COMPLETIONS_USAGE = {"prompt_tokens": 3, "completion_tokens": 4,
                     "total_tokens": 7}
ANTHROPIC_START_USAGE = {"input_tokens": 30,
                         "cache_creation_input_tokens": 100,
                         "cache_read_input_tokens": 200, "output_tokens": 1}
ANTHROPIC_INPUT = 30 + 100 + 200    # message_start: input + both caches
ANTHROPIC_OUTPUT = 12
ANTHROPIC_TOTAL = ANTHROPIC_INPUT + ANTHROPIC_OUTPUT
CHAT_TOTAL = CHAT_USAGE["total_tokens"]                 # 18
RESPONSES_TOTAL = RESPONSES_USAGE["total_tokens"]       # 29

# A fixed clock for the ledger: WINDOW is a multiple of PERIOD, so NOW is
# in the window [WINDOW, WINDOW + PERIOD), which resets 2600 s later.
PERIOD = 3600
WINDOW = 1800000000
NOW = WINDOW + 1000
RESET_ISO = "2027-01-15T09:00:00Z"      # WINDOW + PERIOD
RESET_IN = "2600"                       # Retry-After at NOW


def iso(ts):
    """A Unix time as the ISO 8601 UTC text the gateway shows."""
    moment = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# The fake provider ###########################################################

class Recorded:
    """One request as the fake provider saw it."""

    def __init__(self, method, path, headers, body, peer):
        self.method = method
        self.path = path
        self.headers = headers          # list of (name, value)
        self.body = body
        self.peer = peer                # the gateway's (host, port)

    def values(self, name):
        """Every value of header `name`."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name):
        found = self.values(name)
        return found[0] if found else None

    def names(self):
        return [key.lower() for key, _ in self.headers]

    def json(self):
        return json.loads(self.body)


TEXTS = ["Hel", "lo", "!"]   # what the fake's streams say


def sse(data, event=None):
    head = "event: %s\n" % event if event else ""
    return ("%sdata: %s\n\n" % (head, json.dumps(data))).encode()


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT

    def log_message(self, *args):
        pass

    def handle_any(self):
        body = b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            body = b"".join(parts)
        elif self.headers.get("Content-Length"):
            body = self.rfile.read(int(self.headers["Content-Length"]))
        rec = Recorded(self.command, self.path, list(self.headers.items()),
                       body, self.client_address)
        self.server.fake.record(rec)
        self.server.fake.respond(self, rec)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any

    # answer helpers

    def send_json(self, status, doc, headers=(), compress=False):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if compress:
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def start_stream(self, headers=()):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def send_chunk(self, data):
        if not data:
            return   # an empty chunk would end the body
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def break_connection(self):
        """Drop the connection mid-answer, with no last chunk."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FakeServer(http.server.ThreadingHTTPServer):
    """The fake's server: a gateway that resets a kept-alive connection is
    no traceback on whatever stderr is at that moment."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):
            http.server.ThreadingHTTPServer.handle_error(
                self, request, client_address)


class FakeProvider:
    """A provider on 127.0.0.1:0 speaking OpenAI, Anthropic and Azure.

    Tests steer it through `mode`:
      gzip           compress answers (streams too)
      break_after    send this many events, then drop the connection
      hold           an Event to wait on before answering (a slow provider)
      hold_after     (n, Event): send n events, wait for the Event
      status         (code, doc): answer with this error instead
      early_hints    send a 103 Early Hints before the answer
      drop           this many requests get their connection closed
                     without a word of answer; later ones are answered
      raw            bytes written as the whole answer, in pieces when a
                     list, each flushed (an Event in the list is waited
                     on); the connection is then kept if `raw_keep` is
                     set, else closed
      answer         a doc: answer 200 with it, whatever the path
      truncate       (declared, sent): a plain answer whose Content-Length
                     says `declared` bytes, cut off after `sent`
      chat_error_after  send this many chat chunks, then an error chunk
      stall_body     an Event: send a plain answer's head and part of its
                     body, then wait for the Event
      headers        answer 200 JSON with these extra response headers
      done           an Event set once an answer was given (or failed)
      error_after    send this many Anthropic events, then an error event
      output_totals  one Anthropic message_delta per running output total
      delta_usages   one Anthropic message_delta per usage object
      one_chunk      send a whole stream as a single chunk
      line_end       end the lines of stream events with these bytes
                     (b"\r", b"\r\n") instead of LF
      gzip_members   gzip each stream event on its own: a body of many
                     gzip members
      raw_deflate    send streams as "deflate" without the zlib wrapper
      open_end       the stream's last event lacks its blank line
      texts          the text pieces a stream sends (default Hel, lo, !)
      responses_end  the Responses stream's last event type
      no_usage       report no usage at all
      until_gone     after a stream's events, go on (SSE comments) until
                     a write fails or TIMEOUT passes, as a provider still
                     generating does
    `gone` is set when a stream's client (the gateway) hung up;
    `arrived` is notified on every request (see wait_count); a gateway
    that hung up is no traceback on stderr."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.mode = {}
        self.gone = threading.Event()
        self.arrived = threading.Condition()
        self.local = threading.local()      # .handler: see EofWatch
        self.server = FakeServer(("127.0.0.1", 0), FakeHandler)
        self.server.daemon_threads = True
        self.server.fake = self
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.02})
        self.thread.daemon = True
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)

    def reset(self):
        with self.lock:
            self.requests = []
        self.mode = {}
        self.gone = threading.Event()

    def record(self, rec):
        with self.lock:
            self.requests.append(rec)
        with self.arrived:
            self.arrived.notify_all()

    def last(self):
        with self.lock:
            return self.requests[-1]

    def count(self):
        with self.lock:
            return len(self.requests)

    def wait_count(self, n, timeout=TIMEOUT):
        """Whether `n` requests have arrived within `timeout`."""
        with self.arrived:
            return self.arrived.wait_for(lambda: self.count() >= n, timeout)

    # answers

    def respond(self, h, rec):
        mode = self.mode
        self.local.handler = h
        try:
            return self.answer(h, rec)
        except OSError:
            h.close_connection = True
        finally:
            if "done" in mode:
                mode["done"].set()

    def answer(self, h, rec):
        mode = self.mode
        if "hold" in mode:
            mode["hold"].wait(TIMEOUT)
        if mode.get("early_hints"):
            h.wfile.write(b"HTTP/1.1 103 Early Hints\r\n"
                          b"Link: </a.css>; rel=preload\r\n\r\n")
            h.wfile.flush()
        if mode.get("drop"):
            mode["drop"] -= 1
            return h.break_connection()
        if "raw" in mode:
            pieces = mode["raw"]
            for piece in pieces if isinstance(pieces, list) else [pieces]:
                if isinstance(piece, threading.Event):
                    piece.wait(TIMEOUT)
                    continue
                h.wfile.write(piece)
                h.wfile.flush()
            h.close_connection = not mode.get("raw_keep")
            return None
        if "answer" in mode:
            return h.send_json(200, mode["answer"])
        if "truncate" in mode:
            declared, sent = mode["truncate"]
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(declared))
            h.end_headers()
            h.wfile.write(b" " * sent)
            h.wfile.flush()
            return h.break_connection()
        if "status" in mode:
            code, doc = mode["status"]
            return h.send_json(code, doc)
        if "stall_body" in mode:
            # the head and half the body of a plain answer, then silence
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "100")
            h.end_headers()
            h.wfile.write(b'{"usage": ')
            h.wfile.flush()
            mode["stall_body"].wait(TIMEOUT)
            h.close_connection = True
            return
        if "headers" in mode:
            return h.send_json(200, {"ok": True}, headers=mode["headers"])
        path = rec.path.split("?", 1)[0]
        try:
            doc = json.loads(rec.body) if rec.body else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        stream = doc.get("stream") is True
        if path.endswith("/messages/count_tokens"):
            return h.send_json(200, {"input_tokens": 42})
        if path.endswith("/messages"):
            if stream:
                return self.stream(h, self.anthropic_events())
            return h.send_json(200, self.with_usage({
                "id": "msg_1", "type": "message", "role": "assistant",
                "model": doc.get("model"), "stop_reason": "end_turn",
                "content": [{"type": "text", "text": "Hello!"}]},
                dict(ANTHROPIC_START_USAGE, output_tokens=ANTHROPIC_OUTPUT)),
                compress=mode.get("gzip"))
        if path.endswith("/chat/completions"):
            if stream:
                return self.stream(h, self.chat_events(doc),
                                   last=b"data: [DONE]\n\n")
            return h.send_json(200, self.with_usage({
                "id": "chatcmpl-1", "object": "chat.completion",
                "model": doc.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant",
                                         "content": "Hello!"}}]},
                CHAT_USAGE), compress=mode.get("gzip"))
        if path.endswith("/completions"):
            return h.send_json(200, self.with_usage({
                "id": "cmpl-1", "object": "text_completion",
                "choices": [{"text": "Hi", "index": 0}]},
                COMPLETIONS_USAGE), compress=mode.get("gzip"))
        if path.endswith("/responses"):
            if stream:
                return self.stream(h, self.responses_events(doc))
            return h.send_json(200, self.with_usage(
                self.response_doc(doc, "completed"), RESPONSES_USAGE),
                compress=mode.get("gzip"))
        if path.endswith("/embeddings"):
            return h.send_json(200, self.with_usage({
                "object": "list", "data": [{"object": "embedding",
                                            "index": 0, "embedding": "AAAA"}]},
                EMBEDDINGS_USAGE), compress=mode.get("gzip"))
        if path == "/v1/models" or path.endswith("/models"):
            return h.send_json(200, {"object": "list", "data": [
                {"id": "gpt-4o", "object": "model"}]})
        return h.send_json(200, {"echo": {"method": rec.method,
                                          "path": rec.path}})

    def with_usage(self, doc, usage):
        if not self.mode.get("no_usage"):
            doc["usage"] = usage
        return doc

    def stream(self, h, events, last=b""):
        mode = self.mode
        events = list(events)
        if mode.get("open_end"):
            events[-1] = events[-1][:-1]   # "...}\n": no blank line
        if "line_end" in mode:
            events = [e.replace(b"\n", mode["line_end"]) for e in events]
        if mode.get("one_chunk"):
            events, last = [b"".join(events) + last], b""
        compressor = None
        headers = ()
        if mode.get("gzip"):
            compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
            headers = (("Content-Encoding", "gzip"),)
        if mode.get("raw_deflate"):
            compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            headers = (("Content-Encoding", "deflate"),)
        if mode.get("gzip_members"):
            events = [gzip.compress(e) for e in events]
            last = gzip.compress(last) if last else b""
            headers = (("Content-Encoding", "gzip"),)
        h.start_stream(headers)
        try:
            for i, event in enumerate(events):
                if mode.get("break_after") == i:
                    return h.break_connection()
                if "hold_after" in mode and mode["hold_after"][0] == i:
                    mode["hold_after"][1].wait(TIMEOUT)
                if compressor:
                    event = compressor.compress(event) + compressor.flush(
                        zlib.Z_SYNC_FLUSH)
                h.send_chunk(event)
            if mode.get("until_gone"):
                self.stream_until_gone(h)
            if last:
                if compressor:
                    last = compressor.compress(last)
                h.send_chunk(last)
            if compressor:
                h.send_chunk(compressor.flush())
            h.end_stream()
        except OSError:
            self.gone.set()
            h.close_connection = True

    def stream_until_gone(self, h):
        """Send SSE comments until a write fails.  A gateway that hangs
        up may shut the connection down first (the fake reads EOF) and
        close it a moment later: only once it is closed do writes fail.
        Each round waits up to 50 ms for that close (an error or hang-up
        on the connection) before writing again."""
        poller = select.poll()
        poller.register(h.connection, select.POLLERR | select.POLLHUP)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            h.send_chunk(b": still generating\n\n")
            poller.poll(50)

    def chat_events(self, doc):
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                "model": doc.get("model")}
        with_usage = (doc.get("stream_options") or {}).get("include_usage")
        for i, text in enumerate(self.mode.get("texts", TEXTS)):
            if self.mode.get("chat_error_after") == i:
                yield sse({"error": {"message": "overloaded",
                                     "type": "server_error"}})
                return
            delta = {"content": text}
            if i == 0:
                delta["role"] = "assistant"
            yield sse(dict(base, choices=[{"index": 0, "delta": delta,
                                           "finish_reason": None}]))
        yield sse(dict(base, choices=[{"index": 0, "delta": {},
                                       "finish_reason": "stop"}]))
        if with_usage and not self.mode.get("no_usage"):
            yield sse(dict(base, choices=[], usage=CHAT_USAGE))

    def response_doc(self, doc, status):
        return {"id": "resp_1", "object": "response", "status": status,
                "model": doc.get("model"),
                "output": [{"type": "message", "id": "msg_1",
                            "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text",
                                         "text": "Hello!"}]}]}

    def responses_events(self, doc):
        shell = {"id": "resp_1", "object": "response",
                 "status": "in_progress", "model": doc.get("model"),
                 "output": [], "usage": None}
        seq = [0]

        def ev(kind, **fields):
            seq[0] += 1
            return sse(dict(type=kind, sequence_number=seq[0], **fields),
                       kind)
        yield ev("response.created", response=shell)
        yield ev("response.in_progress", response=shell)
        item = {"type": "message", "id": "msg_1", "role": "assistant",
                "status": "in_progress", "content": []}
        yield ev("response.output_item.added", output_index=0, item=item)
        yield ev("response.content_part.added", item_id="msg_1",
                 output_index=0, content_index=0,
                 part={"type": "output_text", "text": ""})
        for text in self.mode.get("texts", TEXTS):
            yield ev("response.output_text.delta", item_id="msg_1",
                     output_index=0, content_index=0, delta=text)
        yield ev("response.output_text.done", item_id="msg_1",
                 output_index=0, content_index=0, text="Hello!")
        yield ev("response.content_part.done", item_id="msg_1",
                 output_index=0, content_index=0,
                 part={"type": "output_text", "text": "Hello!"})
        yield ev("response.output_item.done", output_index=0,
                 item=dict(item, status="completed"))
        end = self.mode.get("responses_end", "response.completed")
        status = end.split(".", 1)[1]
        yield ev(end, response=self.with_usage(
            self.response_doc(doc, status), RESPONSES_USAGE))

    def anthropic_events(self):
        message = {"id": "msg_1", "type": "message", "role": "assistant",
                   "model": "claude", "content": [], "stop_reason": None,
                   "usage": dict(ANTHROPIC_START_USAGE)}
        events = [
            sse({"type": "message_start", "message": message},
                "message_start"),
            sse({"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}},
                "content_block_start"),
            sse({"type": "ping"}, "ping")]
        for text in self.mode.get("texts", TEXTS):
            events.append(sse({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": text}},
                              "content_block_delta"))
        events.append(sse({"type": "content_block_stop", "index": 0},
                          "content_block_stop"))
        usages = self.mode.get("delta_usages") or [
            {"output_tokens": n} for n in
            self.mode.get("output_totals", [ANTHROPIC_OUTPUT])]
        for usage in usages:
            events.append(sse({"type": "message_delta",
                               "delta": {"stop_reason": "end_turn"},
                               "usage": usage}, "message_delta"))
        events.append(sse({"type": "message_stop"}, "message_stop"))
        if "error_after" in self.mode:
            n = self.mode["error_after"]
            events = events[:n] + [sse({"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}},
                "error")] + events[n:]
        return events


class EofWatch:
    """Stands in for the Event of the fake's `hold` or `hold_after`: the
    provider waits, and its wait ends when the gateway closes the
    provider connection (the fake reads EOF).  `at` is when."""

    def __init__(self, fake):
        self.fake = fake
        self.reached = threading.Event()   # the provider is waiting
        self.eof = threading.Event()
        self.at = None

    def wait(self, timeout):
        sock = self.fake.local.handler.connection
        self.reached.set()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready = select.select([sock], [], [], left)[0]
            if not ready:
                continue
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except OSError:
                data = b""
            if data:
                return False        # not what the gateway should send
            self.at = time.monotonic()
            self.eof.set()
            return True


# Clients #####################################################################

class Reply:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers      # lower-case name -> value
        self.body = body

    def json(self):
        return json.loads(self.body)

    def events(self):
        """[(event name or None, data string)] of an SSE body."""
        out = []
        for block in self.body.decode().split("\n\n"):
            if not block.strip():
                continue
            name, data = None, []
            for line in block.split("\n"):
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
            out.append((name, "\n".join(data)))
        return out

    def names(self):
        """The event names of an SSE body."""
        return [name for name, _ in self.events()]

    def datas(self):
        """The data strings of an SSE body."""
        return [data for _, data in self.events()]


def call(port, method, path, body=None, headers=None, key=ALICE_KEY,
         conn=None):
    """One request through a fresh (or the given) connection."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    hdrs = {}
    if key is not None:
        hdrs["Authorization"] = "Bearer " + key
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    hdrs = {k: v for k, v in hdrs.items() if v is not None}
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in
                                   resp.getheaders()}, data)
    finally:
        if own:
            conn.close()


def request(method, target, headers=(), body=b"", key=ALICE_KEY):
    """The raw bytes of a request: head (with the key as a bearer token
    unless None) and body."""
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: gw"]
    if key is not None:
        lines.append("Authorization: Bearer " + key)
    lines.extend("%s: %s" % kv for kv in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def open_request(port, path, body, key=ALICE_KEY, close=False,
                 expect=False):
    """POST the JSON `body` on a raw socket and return the socket.  With
    `expect`, send only the head, asking for 100 Continue."""
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"),
               ("Content-Length", str(len(data)))]
    if expect:
        headers.append(("Expect", "100-continue"))
        data = b""
    if close:
        headers.append(("Connection", "close"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(request("POST", path, headers, data, key))
    return sock


def receive(sock, buf=None, done=None, timeout=TIMEOUT):
    """Read into `buf` until done(buf), the peer closes (or resets) the
    connection, or `timeout` passes.  Returns (buf, whether the peer
    closed)."""
    buf = bytearray() if buf is None else buf
    deadline = time.monotonic() + timeout
    while done is None or not done(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            got = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return buf, True
        if not got:
            return buf, True
        buf += got
    return buf, False


def read_until(sock, buf, done, timeout=TIMEOUT):
    """Read into `buf` until done(buf) or end of stream; the deadline
    passing is an AssertionError."""
    buf, closed = receive(sock, buf, done, timeout)
    if not (closed or done(buf)):
        raise AssertionError("timed out reading; got %r" % bytes(buf))
    return buf


def raw_exchange(port, data, timeout=TIMEOUT):
    """Send raw bytes, read until the gateway closes or `timeout` passes.
    Returns (bytes received, whether the connection was closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got, closed = receive(s, timeout=timeout)
        return bytes(got), closed


def status_of(raw):
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else None


def head_of(raw):
    """Lower-case header name -> value of a raw response."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    out = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        out[name.strip().lower()] = value.strip()
    return out


def body_of(raw):
    return raw.split(b"\r\n\r\n", 1)[1]


def dechunk(raw):
    """(Reply, whether it ended with the last chunk) of a raw chunked
    answer."""
    raw = bytes(raw)
    rest = body_of(raw)
    body, ended = b"", False
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0:
            ended = rest == b"\r\n"
            break
        body += rest[:size]
        rest = rest[size + 2:]
    return Reply(status_of(raw), head_of(raw), body), ended


def free_port():
    """A port nobody listens on (bound, noted, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude-sonnet-4", "max_tokens": 1000,
            "messages": [{"role": "user", "content": "hi"}]}


# The gateway under test ######################################################

def write_json(folder, doc, name="config.json"):
    """Write `doc` to folder/name; returns the path."""
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


class LogCapture(io.StringIO):
    """A thread-safe stand-in for stderr that can be waited on."""

    def __init__(self):
        io.StringIO.__init__(self)
        self.cond = threading.Condition()

    def write(self, text):
        with self.cond:
            n = io.StringIO.write(self, text)
            self.cond.notify_all()
            return n

    def text(self):
        with self.cond:
            return self.getvalue()

    def wait(self, pred, timeout=TIMEOUT):
        """Whether pred(text) came to hold within `timeout`."""
        with self.cond:
            return self.cond.wait_for(lambda: pred(self.getvalue()),
                                      timeout)


class GatewayTest(unittest.TestCase):
    """Starts a fake provider per class and a fresh gateway per test."""

    @classmethod
    def setUpClass(cls):
        cls.fake = FakeProvider()

    @classmethod
    def tearDownClass(cls):
        cls.fake.close()

    def providers(self):
        return {"openai": {"url": self.fake.url, "apiKey": PROVIDER_KEY},
                "anthropic": {"type": "anthropic", "url": self.fake.url,
                              "apiKey": PROVIDER_KEY}}

    def users(self):
        return [{"name": "alice", "apiKey": ALICE_KEY, "tokens": 100000},
                {"name": "bob", "apiKey": BOB_KEY, "tokens": 50000}]

    def config(self):
        return {"listen": {"host": "127.0.0.1", "port": 0},
                "providers": self.providers(), "limitResetPeriod": PERIOD,
                "users": self.users()}

    def setUp(self):
        self.fake.reset()
        self.dir = tempfile.mkdtemp(prefix="llmgate-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.logs = LogCapture()
        patcher = mock.patch("sys.stderr", self.logs)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.start(self.config())

    def write_config(self, doc, name="config.json"):
        return write_json(self.dir, doc, name)

    def start(self, doc):
        path = self.write_config(doc)
        self.gateway = llmgate.Gateway(llmgate.load_config(path))
        _, self.port = self.gateway.start(poll_interval=0.02)
        self.addCleanup(self.stop_gateway, self.gateway)

    def stop_gateway(self, gateway):
        """Stop `gateway` once its requests are done, so that none of them
        logs into the next test's capture; none may still be running."""
        self.assertEqual(gateway.stop(TIMEOUT), 0)

    def restart(self, doc):
        """Stop the running gateway and start one on `doc`."""
        self.stop_gateway(self.gateway)
        self.start(doc)

    def restart_with_quota(self, tokens):
        """Restart with alice's quota at `tokens`, the clock at NOW."""
        doc = self.config()
        doc["users"][0]["tokens"] = tokens
        self.restart(doc)
        self.fix_clock()

    def fix_clock(self, now=NOW):
        """Stop the ledger's clock at `now`.  Returns a one-item list:
        setting its item moves the clock."""
        moment = [now]
        self.gateway.ledger.clock = lambda: moment[0]
        return moment

    def ledger_figures(self, name="alice"):
        user = [u for u in self.gateway.config.users if u.name == name][0]
        return self.gateway.ledger.figures(user)

    def usage(self, name="alice"):
        return self.ledger_figures(name)["used"]

    def reserved(self, name="alice"):
        return self.ledger_figures(name)["reserved"]

    def log_lines(self):
        return [line for line in self.logs.text().splitlines()
                if " status=" in line]

    def wait_log(self, pred, timeout=TIMEOUT):
        """The request log lines once pred(lines) holds."""
        lines = self.log_lines
        ok = self.logs.wait(lambda text: pred(lines()), timeout)
        self.assertTrue(ok, "log never matched: %r" % self.logs.text())
        return lines()

    def wait_log_lines(self, count):
        """The request log lines once there are at least `count`."""
        return self.wait_log(lambda lines: len(lines) >= count)

    def main_until_sigterm(self, argv):
        """Run llmgate.main(argv) on a thread with signal handlers caught,
        once it logs that it listens send it SIGTERM; its exit status."""
        handlers = {}
        installed = threading.Event()

        def fake_signal(signum, handler):
            handlers[signum] = handler
            if signum == signal.SIGTERM:
                installed.set()
        done = []
        with mock.patch.object(llmgate, "raise_fd_limit"), \
                mock.patch("signal.signal", side_effect=fake_signal):
            thread = threading.Thread(target=lambda: done.append(
                llmgate.main(argv)), daemon=True)
            thread.start()
            self.assertTrue(installed.wait(TIMEOUT))
            self.assertTrue(self.logs.wait(
                lambda text: "listening on" in text))
            handlers[signal.SIGTERM](signal.SIGTERM, None)
            thread.join(TIMEOUT)
        self.assertEqual(len(done), 1, "main did not return")
        return done[0]

    def assert_clean_logs(self):
        text = self.logs.text()
        self.assertNotIn("Traceback", text)
        self.assertNotIn(ALICE_KEY, text)
        self.assertNotIn(BOB_KEY, text)
        self.assertNotIn(PROVIDER_KEY, text)

    def assert_never_forwarded(self):
        self.assertEqual(self.fake.count(), 0)

    def assert_error(self, doc, code, kind):
        """`doc` is an OpenAI error with this code and type."""
        self.assertEqual(sorted(doc), ["error"])
        err = doc["error"]
        self.assertEqual(sorted(err), ["code", "message", "param", "type"])
        self.assertEqual(err["code"], code)
        self.assertEqual(err["type"], kind)
        self.assertIsNone(err["param"])
        self.assertIsInstance(err["message"], str)
        self.assertTrue(err["message"])

    def assert_openai_error(self, reply, status, kind, code):
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.headers["content-type"], "application/json")
        self.assert_error(reply.json(), code, kind)

    def assert_anthropic_error(self, reply, status, kind):
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.headers["content-type"], "application/json")
        doc = reply.json()
        self.assertEqual(sorted(doc), ["error", "type"])
        self.assertEqual(doc["type"], "error")
        self.assertEqual(sorted(doc["error"]), ["message", "type"])
        self.assertEqual(doc["error"]["type"], kind)
        self.assertIsInstance(doc["error"]["message"], str)
        self.assertTrue(doc["error"]["message"])

    def assert_upstream_key(self, rec, header, key):
        """The provider got its key in `header` only, and no other
        credential header at all."""
        creds = ("authorization", "x-api-key", "api-key")
        seen = [(k.lower(), v) for k, v in rec.headers if k.lower() in creds]
        self.assertEqual(seen, [(header, key)])

    def assert_chat_stream(self, reply):
        """`reply` is the fake's streamed chat: four chunks with choices
        (no usage chunk), then [DONE]."""
        self.assertEqual(reply.status, 200)
        datas = reply.datas()
        self.assertEqual(datas[-1], "[DONE]")
        chunks = [json.loads(d) for d in datas[:-1]]
        self.assertEqual(len(chunks), 4)
        self.assertTrue(all(c["choices"] for c in chunks))


# A gateway in a subprocess ###################################################

def reap(proc):
    """Kill `proc` if it still runs, wait for it, close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(TIMEOUT)
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


def popen_script(test, args, stdout=subprocess.DEVNULL, **options):
    """`python3 llmgate.py ARGS` in a session of its own, stderr piped;
    killed in the test's cleanup."""
    proc = subprocess.Popen(
        [sys.executable, SCRIPT] + list(args), stdin=subprocess.DEVNULL,
        stdout=stdout, stderr=subprocess.PIPE, start_new_session=True,
        **options)
    test.addCleanup(reap, proc)
    return proc


def run_script(args, timeout=TIMEOUT, env=None):
    """`python3 llmgate.py ARGS` run to its end (killed at `timeout`): a
    CompletedProcess with text stdout and stderr."""
    return subprocess.run(
        [sys.executable, SCRIPT] + list(args), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
        env=env, start_new_session=True, universal_newlines=True)


class Server:
    """llmgate.py serving in a subprocess of its own session; killed in
    cleanup.  Its stderr is read with select() and a deadline."""

    def __init__(self, test, args, cwd=None):
        self.proc = popen_script(test, args, cwd=cwd)
        self.err = ""
        self.pos = 0

    def _read(self, left):
        fd = self.proc.stderr.fileno()
        if not select.select([fd], [], [], left)[0]:
            return True
        data = os.read(fd, 65536)
        self.err += data.decode("utf-8", "replace")
        return bool(data)

    def wait_for(self, pattern, timeout=TIMEOUT):
        """The next match of `pattern` in stderr, after the last one."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.err, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError("no %r in stderr: %r"
                                     % (pattern, self.err))

    def port(self):
        """The port of the whole `listening on` line."""
        return int(self.wait_for(
            r"listening on http://127\.0\.0\.1:(\d+) .*\n").group(1))

    def assert_running_for(self, test, seconds):
        """The server has not exited within `seconds` (it is waiting)."""
        with test.assertRaises(subprocess.TimeoutExpired,
                               msg="exited: %r" % self.err):
            self.proc.wait(seconds)

    def finish(self, timeout=TIMEOUT):
        """Wait for the exit; return the exit code, all stderr read."""
        code = self.proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(
                deadline - time.monotonic()):
            pass
        return code


def serve(test, path, cwd=None):
    """llmgate.py serving the config at `path` on a port of its choice:
    (Server, port)."""
    server = Server(test, ["--config", path, "--port", "0"], cwd=cwd)
    return server, server.port()


def wait_listener_closed(port, timeout=TIMEOUT):
    """Return once connecting to `port` is refused: the server closed its
    listening socket.  Polls every 10 ms: nothing tells from outside."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        try:
            probe = socket.create_connection(("127.0.0.1", port),
                                             timeout=TIMEOUT)
        except ConnectionRefusedError:
            return
        except ConnectionResetError:    # closed while connecting: retry
            continue
        probe.close()
        pause.wait(0.01)
    raise AssertionError("port %d still accepts connections" % port)


# Issue 2: the core gateway ###################################################

class CoreTest(GatewayTest):

    def test_chat_is_forwarded_and_billed(self):
        reply = call(self.port, "POST", "/v1/chat/completions?x=1", CHAT)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["usage"], CHAT_USAGE)
        rec = self.fake.last()
        self.assertEqual(rec.path, "/v1/chat/completions?x=1")
        self.assertEqual(rec.body, json.dumps(CHAT).encode())
        self.assertEqual(rec.header("Authorization"), "Bearer " + PROVIDER_KEY)
        self.assertEqual(self.usage(), 18)
        self.assertEqual(reply.headers["x-llmgate-tokens-limit"], "100000")
        self.assertEqual(reply.headers["x-llmgate-tokens-remaining"],
                         str(100000 - 18))

    def test_streamed_chat_hides_the_usage_chunk_it_added(self):
        body = dict(CHAT, stream=True)
        reply = call(self.port, "POST", "/v1/chat/completions", body)
        self.assert_chat_stream(reply)
        self.assertEqual(reply.headers["transfer-encoding"], "chunked")
        sent = self.fake.last().json()
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(self.usage(), 18)

    def test_streamed_chat_keeps_the_usage_chunk_when_asked(self):
        body = dict(CHAT, stream=True, stream_options={"include_usage": True})
        reply = call(self.port, "POST", "/v1/chat/completions", body)
        self.assertEqual(self.fake.last().body, json.dumps(body).encode())
        chunks = [json.loads(d) for _, d in reply.events()[:-1]]
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"], CHAT_USAGE)
        self.assertEqual(self.usage(), 18)

    def test_rewritten_body_keeps_a_lone_surrogate(self):
        # "\ud800" is valid JSON but cannot be encoded as UTF-8: the body
        # the gateway rewrites (stream_options) must still go out
        raw = (b'{"model": "gpt-4o", "stream": true, "messages": '
               b'[{"role": "user", "content": "a\\ud800b \xc3\xa9"}]}')
        reply = call(self.port, "POST", "/v1/chat/completions", raw,
                     headers={"Content-Type": "application/json"})
        self.assertEqual(reply.status, 200)
        sent = self.fake.last().json()
        self.assertEqual(sent["messages"][0]["content"],
                         "a\ud800b \u00e9")
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(self.usage(), 18)

    def test_missing_and_unknown_keys_get_401(self):
        reply = call(self.port, "POST", "/v1/chat/completions", CHAT, key=None)
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.json()["error"]["code"], "missing_api_key")
        reply = call(self.port, "POST", "/v1/chat/completions", CHAT,
                     key="nobody-knows-this-key")
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.json()["error"]["type"], "authentication_error")
        self.assertEqual(reply.json()["error"]["code"], "invalid_api_key")
        self.assertEqual(self.fake.count(), 0)
        self.assertNotIn("nobody-knows-this-key", self.logs.text())


# Auth ########################################################################

class AuthTest(GatewayTest):

    def check_forwarded_without_internal_key(self, rec):
        for name, value in rec.headers:
            self.assertNotIn(ALICE_KEY, value, name)
        self.assertNotIn(ALICE_KEY.encode(), rec.body)
        self.assertNotIn(ALICE_KEY, rec.path)

    def check_reply_without_provider_key(self, reply):
        self.assertNotIn(PROVIDER_KEY.encode(), reply.body)
        for name, value in reply.headers.items():
            self.assertNotIn(PROVIDER_KEY, value, name)

    def test_bearer_x_api_key_and_api_key_authenticate(self):
        variants = [
            ("authorization", {"Authorization": "Bearer " + ALICE_KEY}),
            ("x-api-key", {"x-api-key": ALICE_KEY}),
            ("api-key", {"api-key": ALICE_KEY})]
        for i, (label, headers) in enumerate(variants):
            with self.subTest(header=label):
                reply = call(self.port, "POST", "/v1/chat/completions",
                             CHAT, headers=headers, key=None)
                self.assertEqual(reply.status, 200)
                self.assertEqual(reply.json()["usage"], CHAT_USAGE)
                self.assertEqual(self.usage(), 18 * (i + 1))
                rec = self.fake.last()
                self.assertEqual(rec.names().count("authorization"), 1)
                self.assertEqual(rec.header("Authorization"),
                                 "Bearer " + PROVIDER_KEY)
                self.assertIsNone(rec.header("x-api-key"))
                self.assertIsNone(rec.header("api-key"))
                self.check_forwarded_without_internal_key(rec)
                self.check_reply_without_provider_key(reply)
        self.assertEqual(self.usage("bob"), 0)
        self.assert_clean_logs()

    def test_anthropic_route_gets_provider_x_api_key_not_the_users(self):
        reply = call(self.port, "POST", "/v1/messages", MESSAGES,
                     headers={"x-api-key": ALICE_KEY}, key=None)
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        self.assertEqual(rec.names().count("x-api-key"), 1)
        self.assertEqual(rec.header("x-api-key"), PROVIDER_KEY)
        self.assertIsNone(rec.header("Authorization"))
        self.check_forwarded_without_internal_key(rec)
        self.check_reply_without_provider_key(reply)
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)
        self.assert_clean_logs()

    def test_bad_keys_in_each_header_get_401_and_are_not_logged(self):
        bad = "unknown-internal-key-77"
        for headers in ({"Authorization": "Bearer " + bad},
                        {"x-api-key": bad}, {"api-key": bad},
                        {"Authorization": "Basic " + bad}):
            with self.subTest(headers=sorted(headers)):
                reply = call(self.port, "POST", "/v1/chat/completions",
                             CHAT, headers=headers, key=None)
                self.assertEqual(reply.status, 401)
                code = "missing_api_key" if "Basic " in headers.get(
                    "Authorization", "") else "invalid_api_key"
                self.assert_error(reply.json(), code, "authentication_error")
                self.assertNotIn(bad.encode(), reply.body)
        self.assert_never_forwarded()
        self.assertNotIn(bad, self.logs.text())
        self.assert_clean_logs()

    def test_provider_key_never_in_replies_or_logs(self):
        replies = [
            call(self.port, "POST", "/v1/chat/completions", CHAT),
            call(self.port, "POST", "/v1/chat/completions",
                 dict(CHAT, stream=True)),
            call(self.port, "GET", "/v1/models"),
            call(self.port, "GET", "/llmgate/usage"),
            call(self.port, "GET", "/v1/models", key="wrong-key-123456")]
        self.fake.mode = {"status": (401, {"error": {
            "message": "Incorrect API key provided: sk-pro***789",
            "type": "invalid_request_error", "code": "invalid_api_key"}})}
        upstream_401 = call(self.port, "POST", "/v1/chat/completions", CHAT)
        replies.append(upstream_401)
        # the provider refusing the shared key is the admin's problem
        self.assertEqual(upstream_401.status, 502)
        self.assert_error(upstream_401.json(), "upstream_auth_failed",
                          "api_error")
        self.assertEqual([r.status for r in replies],
                         [200, 200, 200, 200, 401, 502])
        for reply in replies:
            self.check_reply_without_provider_key(reply)
        self.assert_clean_logs()


# Forwarding ##################################################################

class ForwardingTest(GatewayTest):

    def test_method_path_and_query_are_preserved(self):
        cases = [("GET", "/v1/models?limit=2&after=m%2Fx&a=1&a=2"),
                 ("DELETE", "/v1/files/file-abc%20def?purpose=x+y"),
                 ("PUT", "/v1/vector_stores/vs_1"),
                 ("PATCH", "/v1/organization/projects/p_1?q="),
                 ("POST", "/v1/batches/batch_1/cancel")]
        for method, target in cases:
            with self.subTest(method=method, target=target):
                body = b'{"a": 1}' if method in ("PUT", "PATCH") else None
                headers = {"Content-Type": "application/json"} if body \
                    else None
                reply = call(self.port, method, target, body, headers)
                self.assertEqual(reply.status, 200)
                rec = self.fake.last()
                self.assertEqual(rec.method, method)
                self.assertEqual(rec.path, target)
                self.assertEqual(rec.body, body or b"")
                if not target.startswith("/v1/models"):
                    self.assertEqual(reply.json(), {"echo": {
                        "method": method, "path": target}})
        self.assertEqual(self.fake.count(), len(cases))
        self.assert_clean_logs()

    def test_json_body_is_forwarded_byte_for_byte(self):
        body = ('{"model":"gpt-4o",  "messages":[{"role":"user",'
                '"content":"h\\u00e9 \u00e9\u4e2d"}] ,"temperature": 0.50,'
                '"x": [1, 2.0e0, true]}\n').encode("utf-8")
        reply = call(self.port, "POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json"})
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        self.assertEqual(rec.body, body)
        self.assertEqual(rec.header("Content-Length"), str(len(body)))
        self.assertEqual(rec.header("Content-Type"), "application/json")
        self.assertEqual(self.usage(), 18)

    def test_multipart_body_passes_unparsed(self):
        boundary = "----llmgateBOUNDARY"
        body = (b"--" + boundary.encode() + b"\r\n"
                b'Content-Disposition: form-data; name="model"\r\n\r\n'
                b"whisper-1\r\n--" + boundary.encode() + b"\r\n"
                b'Content-Disposition: form-data; name="file"; '
                b'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
                + bytes(range(256)) + b'{"not": json\r\n--' +
                boundary.encode() + b"--\r\n")
        ctype = "multipart/form-data; boundary=" + boundary
        reply = call(self.port, "POST", "/v1/audio/transcriptions", body,
                     {"Content-Type": ctype})
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        self.assertEqual(rec.body, body)
        self.assertEqual(rec.header("Content-Type"), ctype)
        self.assertEqual(rec.header("Content-Length"), str(len(body)))
        self.assertEqual(reply.json(), {"echo": {
            "method": "POST", "path": "/v1/audio/transcriptions"}})
        self.assert_clean_logs()

    def test_credentials_and_hop_by_hop_headers_are_removed(self):
        headers = {
            "Authorization": "Bearer " + ALICE_KEY,
            "x-api-key": ALICE_KEY,
            "api-key": ALICE_KEY,
            "Cookie": "session=cookie-secret-1",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "dropped-value",
            "Keep-Alive": "timeout=5, max=100",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Proxy-Connection": "keep-alive",
        }
        reply = call(self.port, "POST", "/v1/chat/completions", CHAT,
                     headers=headers)
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        names = rec.names()
        for gone in ("x-api-key", "api-key", "cookie",
                     "proxy-authorization", "x-drop-me", "keep-alive",
                     "te", "trailer", "proxy-connection",
                     "transfer-encoding", "upgrade"):
            self.assertNotIn(gone, names)
        connection = rec.header("Connection") or ""
        self.assertNotIn("x-drop-me", connection.lower())
        self.assertEqual(names.count("authorization"), 1)
        self.assertEqual(rec.header("Authorization"),
                         "Bearer " + PROVIDER_KEY)
        for _, value in rec.headers:
            self.assertNotIn("cookie-secret-1", value)
            self.assertNotIn("dropped-value", value)
            self.assertNotIn(ALICE_KEY, value)
        self.assertEqual(self.usage(), 18)

    def test_client_headers_pass_through(self):
        passed = {
            "OpenAI-Beta": "responses=experimental",
            "x-stainless-lang": "python",
            "x-stainless-retry-count": "0",
            "x-stainless-timeout": "600",
            "originator": "codex_exec",
            "session-id": "0199a1b2-c3d4",
            "thread-id": "thr_1",
            "x-client-request-id": "req-42",
            "x-codex-turn-metadata": '{"turn": 3}',
            "x-codex-beta-features": "a,b",
            "Accept": "text/event-stream",
            "User-Agent": "codex_exec/0.171.0",
        }
        body = {"model": "gpt-4o", "input": "hi", "stream": True}
        reply = call(self.port, "POST", "/v1/responses", body,
                     headers=passed)
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        for name, value in passed.items():
            self.assertEqual(rec.header(name), value, name)
            self.assertEqual(rec.names().count(name.lower()), 1, name)
        self.assertEqual(rec.body, json.dumps(body).encode())
        self.assertEqual(self.usage(), 29)

    def test_provider_status_and_error_body_pass_through(self):
        for code in (400, 404, 429, 500):
            doc = {"error": {"message": "Provider says no (%d)" % code,
                             "type": "invalid_request_error",
                             "param": "model", "code": "model_not_found"}}
            self.fake.mode = {"status": (code, doc)}
            with self.subTest(status=code):
                reply = call(self.port, "POST", "/v1/chat/completions",
                             CHAT)
                self.assertEqual(reply.status, code)
                self.assertEqual(reply.body, json.dumps(doc).encode())
                self.assertEqual(reply.headers["content-type"],
                                 "application/json")
                self.assertEqual(reply.headers["x-llmgate-tokens-limit"],
                                 "100000")
        self.assertEqual(self.fake.count(), 4)
        self.assertEqual(self.usage(), 0)
        self.assertEqual(self.reserved(), 0)
        self.assert_clean_logs()

    def test_response_hop_by_hop_headers_are_not_passed(self):
        self.fake.mode = {"headers": [
            ("Connection", "keep-alive, X-Hop-Resp"),
            ("X-Hop-Resp", "hop-value"),
            ("Keep-Alive", "timeout=5, max=100"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authenticate", "Basic realm=x"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("X-Request-Id", "req_123"),
            ("x-ratelimit-remaining-tokens", "999"),
            ("openai-processing-ms", "12")]}
        reply = call(self.port, "GET", "/v1/models")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json(), {"ok": True})
        for gone in ("connection", "x-hop-resp", "keep-alive",
                     "proxy-connection", "proxy-authenticate", "trailer",
                     "upgrade", "transfer-encoding"):
            self.assertNotIn(gone, reply.headers)
        self.assertEqual(reply.headers["x-request-id"], "req_123")
        self.assertEqual(reply.headers["x-ratelimit-remaining-tokens"],
                         "999")
        self.assertEqual(reply.headers["openai-processing-ms"], "12")
        self.assertEqual(reply.headers["content-length"],
                         str(len(reply.body)))

    def test_provider_connections_are_reused(self):
        first = call(self.port, "POST", "/v1/chat/completions", CHAT)
        second = call(self.port, "POST", "/v1/chat/completions",
                      dict(CHAT, stream=True))
        third = call(self.port, "GET", "/v1/models")
        self.assertEqual([first.status, second.status, third.status],
                         [200, 200, 200])
        with self.fake.lock:
            peers = [r.peer for r in self.fake.requests]
        self.assertEqual(len(peers), 3)
        self.assertEqual(peers[0], peers[1])
        self.assertEqual(peers[1], peers[2])


# Billing #####################################################################

def est_tokens(*strings):
    """The gateway's input estimate: the characters of every string value
    in the request, CHARS_PER_TOKEN (4) to a token, rounded up."""
    return int(math.ceil(sum(len(s) for s in strings) / 4.0))


class BillingTest(GatewayTest):

    def test_non_streamed_answers_are_charged_exactly(self):
        cases = [
            ("/v1/chat/completions", CHAT, 11 + 7),
            ("/v1/completions", {"model": "gpt-3.5-turbo-instruct",
                                 "prompt": "Say hi", "max_tokens": 5},
             3 + 4),
            ("/v1/responses", {"model": "gpt-4o", "input": "hi"}, 20 + 9),
            ("/v1/embeddings", {"model": "text-embedding-3-small",
                                "input": "hi"}, 5)]
        total = 0
        for path, body, charge in cases:
            with self.subTest(path=path):
                reply = call(self.port, "POST", path, body)
                self.assertEqual(reply.status, 200)
                total += charge
                self.assertEqual(self.usage(), total)
                self.assertEqual(self.reserved(), 0)
                self.assertEqual(
                    reply.headers["x-llmgate-tokens-remaining"],
                    str(100000 - total))
        self.assertEqual(total, 59)
        self.assertEqual(self.usage("bob"), 0)

    def test_cache_figures_beside_prompt_tokens_are_not_added(self):
        # an OpenAI-compatible server fronting Anthropic (LiteLLM) reports
        # cache figures that its prompt_tokens already include
        self.fake.mode = {"answer": {"usage": {
            "prompt_tokens": 1000, "completion_tokens": 50,
            "total_tokens": 1050, "cache_read_input_tokens": 800,
            "cache_creation_input_tokens": 100}}}
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status,
                         200)
        self.assertEqual(self.usage(), 1050)

    def test_streamed_responses_billed_from_each_final_event(self):
        ends = ["response.completed", "response.incomplete",
                "response.failed"]
        body = {"model": "gpt-4o", "input": "hi", "stream": True}
        for i, end in enumerate(ends):
            self.fake.mode = {"responses_end": end}
            with self.subTest(end=end):
                reply = call(self.port, "POST", "/v1/responses", body)
                self.assertEqual(reply.status, 200)
                events = reply.events()
                self.assertEqual(events[-1][0], end)
                final = json.loads(events[-1][1])
                self.assertEqual(final["response"]["usage"],
                                 RESPONSES_USAGE)
                self.assertEqual(len(events), 11)
                self.assertEqual(self.usage(), 29 * (i + 1))
                self.assertEqual(self.reserved(), 0)

    def test_a_responses_error_event_does_not_hide_what_follows(self):
        # the Responses API may send `error`, then response.failed with
        # its usage: both reach the client, and the usage is charged
        def ev(kind, **fields):
            return sse(dict(type=kind, **fields), kind)
        events = [ev("response.created", response={"id": "r"}),
                  ev("response.output_text.delta", delta="x" * 400),
                  ev("error", code="server_error", message="boom"),
                  ev("response.failed", response={
                      "id": "r", "status": "failed",
                      "usage": RESPONSES_USAGE})]
        for tail, charged in ((events, RESPONSES_TOTAL),
                              (events[:3], est_tokens("gpt-4o", "hi") +
                               100)):
            with self.subTest(events=len(tail)):
                before = self.usage()
                self.fake.mode = {"raw": [
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"
                    b"\r\nTransfer-Encoding: chunked\r\n\r\n"] +
                    [b"%x\r\n%s\r\n" % (len(e), e) for e in tail] +
                    [b"0\r\n\r\n"]}
                reply = call(self.port, "POST", "/v1/responses",
                             {"model": "gpt-4o", "input": "hi",
                              "stream": True})
                self.assertEqual(reply.body, b"".join(tail))
                self.assertEqual(self.usage() - before, charged)

    def test_streamed_responses_without_final_usage_is_estimated(self):
        # no usage reported: the input estimate plus the streamed text
        self.fake.mode = {"no_usage": True}
        prompt = "q" * 41
        body = {"model": "gpt-4o", "input": prompt, "stream": True}
        reply = call(self.port, "POST", "/v1/responses", body)
        self.assertEqual(reply.status, 200)
        expected = est_tokens("gpt-4o", prompt) + \
            est_tokens("Hel", "lo", "!")
        self.assertEqual(expected, 12 + 2)
        self.assertEqual(self.usage(), expected)

    def test_gzip_non_streamed_answers_are_billed(self):
        self.fake.mode = {"gzip": True}
        reply = call(self.port, "POST", "/v1/chat/completions", CHAT,
                     headers={"Accept-Encoding": "gzip, deflate"})
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.fake.last().header("Accept-Encoding"),
                         "identity")
        self.assertEqual(reply.headers["content-encoding"], "gzip")
        self.assertEqual(json.loads(gzip.decompress(reply.body))["usage"],
                         CHAT_USAGE)
        self.assertEqual(self.usage(), 18)
        reply = call(self.port, "POST", "/v1/responses",
                     {"model": "gpt-4o", "input": "hi"})
        self.assertEqual(json.loads(gzip.decompress(reply.body))["usage"],
                         RESPONSES_USAGE)
        self.assertEqual(self.usage(), 18 + 29)

    def test_gzip_streams_are_billed(self):
        self.fake.mode = {"gzip": True}
        reply = call(self.port, "POST", "/v1/chat/completions",
                     dict(CHAT, stream=True),
                     headers={"Accept-Encoding": "gzip"})
        self.assert_chat_stream(reply)
        self.assertNotIn("content-encoding", reply.headers)
        self.assertEqual(self.usage(), 18)
        reply = call(self.port, "POST", "/v1/responses",
                     {"model": "gpt-4o", "input": "hi", "stream": True})
        self.assertEqual(reply.status, 200)
        self.assertNotIn("content-encoding", reply.headers)
        self.assertEqual(reply.events()[-1][0], "response.completed")
        self.assertEqual(self.usage(), 18 + 29)
        self.assert_clean_logs()

    def test_a_last_event_without_its_blank_line_is_billed(self):
        # the provider ends the stream right after a final event's data
        # line: its usage still counts, and a usage chunk llmgate asked
        # for still stays hidden
        self.fake.mode = {"open_end": True}
        reply = call(self.port, "POST", "/v1/responses",
                     {"model": "gpt-4o", "input": "hi", "stream": True})
        self.assertEqual(reply.status, 200)
        self.assertTrue(reply.body.endswith(b"}\n"), reply.body[-20:])
        self.assertEqual(reply.events()[-1][0], "response.completed")
        self.assertEqual(self.usage(), RESPONSES_TOTAL)
        # a chat stream that ends on the usage chunk, no [DONE]
        chunks = [sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]}),
                  sse({"choices": [], "usage": CHAT_USAGE})[:-1]]
        self.fake.mode = {"raw": [
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"] +
            [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] +
            [b"0\r\n\r\n"]}
        reply = call(self.port, "POST", "/v1/chat/completions",
                     dict(CHAT, stream=True))
        self.assertEqual(reply.body, chunks[0])
        self.assertEqual(self.usage(), RESPONSES_TOTAL + CHAT_TOTAL)
        line = self.wait_log_lines(2)[-1]
        self.assertFalse(line.endswith(" aborted"), line)

    def test_streams_with_any_line_ending_are_split_and_billed(self):
        # the SSE spec allows CRLF, LF and CR alone; each event must go
        # out on its own (the fake holds after the first), be metered,
        # and the usage chunk llmgate asked for stay hidden
        for line_end in (b"\r", b"\r\n"):
            with self.subTest(line_end=line_end):
                before = self.usage()
                hold = threading.Event()
                self.fake.mode = {"line_end": line_end,
                                  "hold_after": (1, hold)}
                s = open_request(self.port, CHAT_PATH,
                                 dict(CHAT, stream=True), close=True)
                with s:
                    first = b'"assistant"}, "finish_reason": null}]}' + \
                        line_end * 2
                    buf, _ = receive(s, done=lambda b: first in b)
                    self.assertIn(first, bytes(buf))   # before the rest
                    hold.set()
                    buf, closed = receive(s, buf)
                self.assertTrue(closed)
                reply, ended = dechunk(buf)
                self.assertTrue(ended)
                self.assertNotIn(b'"usage"', reply.body)
                # four chunks in the fake's line ending; [DONE] in LF
                self.assertEqual(reply.body.count(line_end * 2), 4)
                self.assertTrue(reply.body.endswith(b"data: [DONE]\n\n"))
                self.assertEqual(self.usage() - before, CHAT_TOTAL)

    def test_compressed_streams_as_clients_read_them(self):
        # gzip in one member per event, and deflate without its zlib
        # wrapper: both are read whole, as urllib3 and browsers read them
        for mode in ("gzip_members", "raw_deflate"):
            with self.subTest(mode=mode):
                before = self.usage()
                self.fake.mode = {mode: True}
                reply = call(self.port, "POST", "/v1/messages",
                             dict(MESSAGES, stream=True))
                self.assertEqual(reply.status, 200)
                self.assertEqual(reply.names(), ANTHROPIC_EVENTS)
                self.assertEqual(self.usage() - before, ANTHROPIC_TOTAL)
        self.assertNotIn("broke off", self.logs.text())

    def test_streamed_legacy_completion_text_is_estimated(self):
        # a completion stream cut off before any usage: its text (in
        # choices[].text, not a delta) is estimated like any other
        chunks = [sse({"object": "text_completion",
                       "choices": [{"index": 0, "text": "x" * 400}]})
                  for _ in range(3)]
        self.fake.mode = {"raw": [
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"] +
            [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks]}
        prompt = "Say hi"
        reply = call(self.port, "POST", "/v1/completions", {
            "model": "gpt-3.5-turbo-instruct", "prompt": prompt,
            "max_tokens": 500, "stream": True})
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.usage(), est_tokens(
            "gpt-3.5-turbo-instruct", prompt) + 300)

    def broken_stream(self, path, body, after):
        self.fake.mode = {"break_after": after}
        t0 = time.monotonic()
        reply = call(self.port, "POST", path, body)
        elapsed = time.monotonic() - t0
        self.assertLess(elapsed, 3.0)          # no hang
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["transfer-encoding"], "chunked")
        self.assertEqual(self.reserved(), 0)
        return reply.events()

    PROMPT = "p" * 37
    STREAMED_CHAT = {"model": "gpt-4o", "stream": True,
                     "messages": [{"role": "user", "content": PROMPT}]}

    def test_broken_chat_stream_ends_cleanly_and_is_charged(self):
        events = self.broken_stream("/v1/chat/completions",
                                    self.STREAMED_CHAT, 2)
        self.assertEqual(len(events), 3)
        texts = [json.loads(d)["choices"][0]["delta"]["content"]
                 for _, d in events[:2]]
        self.assertEqual(texts, ["Hel", "lo"])
        name, data = events[-1]
        self.assertIsNone(name)
        self.assert_error(json.loads(data), "upstream_stream_broken",
                          "api_error")
        # no usage reported: input estimate + ceil(streamed chars / 4)
        expected = est_tokens("gpt-4o", "user", self.PROMPT) + \
            est_tokens("Hel", "lo")
        self.assertEqual(expected, 12 + 2)
        self.assertEqual(self.usage(), expected)
        line = self.wait_log_lines(1)[0]
        self.assertIn(" status=200 in=12 out=2 ", line)
        self.assert_clean_logs()

    def test_chat_stream_broken_before_any_event(self):
        events = self.broken_stream("/v1/chat/completions",
                                    self.STREAMED_CHAT, 0)
        self.assertEqual(len(events), 1)
        self.assert_error(json.loads(events[0][1]),
                          "upstream_stream_broken", "api_error")
        self.assertEqual(self.usage(),
                         est_tokens("gpt-4o", "user", self.PROMPT))

    def test_broken_responses_stream_ends_cleanly_and_is_charged(self):
        prompt = "r" * 37
        body = {"model": "gpt-4o", "input": prompt, "stream": True}
        # created, in_progress, item added, part added, "Hel", "lo"
        events = self.broken_stream("/v1/responses", body, 6)
        self.assertEqual(len(events), 7)
        self.assertEqual(events[-2][0], "response.output_text.delta")
        name, data = events[-1]
        self.assertEqual(name, "error")
        doc = json.loads(data)
        self.assertEqual(doc["type"], "error")
        self.assertEqual(doc["code"], "upstream_stream_broken")
        expected = est_tokens("gpt-4o", prompt) + est_tokens("Hel", "lo")
        self.assertEqual(expected, 11 + 2)
        self.assertEqual(self.usage(), expected)
        self.assert_clean_logs()

    def test_broken_stream_prefers_reported_usage(self):
        # Anthropic reports input (30 + 100 + 200) and output 1 at the
        # start; 5 streamed characters are ceil(5/4) = 2 output tokens
        body = dict(MESSAGES, stream=True)
        events = self.broken_stream("/v1/messages", body, 5)
        self.assertEqual(events[-1][0], "error")
        self.assertEqual(json.loads(events[-1][1])["type"], "error")
        self.assertEqual(self.usage(), 30 + 100 + 200 + 2)


# Quota #######################################################################

class QuotaTest(GatewayTest):

    def users(self):
        return [{"name": "alice", "apiKey": ALICE_KEY, "tokens": 18},
                {"name": "bob", "apiKey": BOB_KEY, "tokens": 50000}]

    def test_quota_exhaustion_429_and_reset(self):
        moment = self.fix_clock(WINDOW + PERIOD - 1234)
        small = dict(CHAT, max_tokens=5)
        reply = call(self.port, "POST", "/v1/chat/completions", small)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.usage(), 18)
        self.assertEqual(reply.headers["x-llmgate-tokens-remaining"], "0")

        refused = call(self.port, "POST", "/v1/chat/completions", small)
        self.assertEqual(refused.status, 429)
        self.assertEqual(self.fake.count(), 1)
        doc = refused.json()
        self.assert_error(doc, "quota_exceeded", "insufficient_quota")
        message = doc["error"]["message"]
        self.assertIn("quota", message)
        self.assertIn(iso(WINDOW + PERIOD), message)
        self.assertEqual(refused.headers["retry-after"], "1234")
        self.assertEqual(refused.headers["x-llmgate-tokens-limit"], "18")
        self.assertEqual(refused.headers["x-llmgate-tokens-remaining"], "0")
        self.assertEqual(refused.headers["x-llmgate-tokens-reset"],
                         iso(WINDOW + PERIOD))
        self.assertEqual(self.usage(), 18)

        # someone else's quota is theirs
        other = call(self.port, "POST", "/v1/chat/completions", small,
                     key=BOB_KEY)
        self.assertEqual(other.status, 200)
        self.assertEqual(self.usage("bob"), 18)

        # the next window starts afresh
        moment[0] = WINDOW + PERIOD
        self.assertEqual(self.usage(), 0)
        again = call(self.port, "POST", "/v1/chat/completions", small)
        self.assertEqual(again.status, 200)
        self.assertEqual(self.usage(), 18)
        self.assertEqual(again.headers["x-llmgate-tokens-reset"],
                         iso(WINDOW + 2 * PERIOD))
        self.assertEqual(self.fake.count(), 3)
        self.assert_clean_logs()

    def test_retry_after_rounds_up_to_the_window_end(self):
        self.fix_clock(WINDOW + 0.25)
        call(self.port, "POST", "/v1/chat/completions",
             dict(CHAT, max_tokens=5))
        refused = call(self.port, "GET", "/v1/models")
        self.assertEqual(refused.status, 429)
        self.assertEqual(refused.headers["retry-after"],
                         str(PERIOD))     # 3599.75 s, rounded up


class QuotaHeadersTest(GatewayTest):

    def test_every_proxied_response_carries_quota_headers(self):
        self.fix_clock(WINDOW + 100)
        reset = iso(WINDOW + PERIOD)

        def check(reply, remaining):
            self.assertEqual(reply.headers["x-llmgate-tokens-limit"],
                             "100000")
            self.assertEqual(reply.headers["x-llmgate-tokens-remaining"],
                             str(remaining))
            self.assertEqual(reply.headers["x-llmgate-tokens-reset"], reset)

        check(call(self.port, "POST", "/v1/chat/completions", CHAT),
              100000 - 18)
        # a stream's head goes out before it is charged
        check(call(self.port, "POST", "/v1/chat/completions",
                   dict(CHAT, stream=True)), 100000 - 18)
        self.assertEqual(self.usage(), 36)
        check(call(self.port, "GET", "/v1/models"), 100000 - 36)
        self.fake.mode = {"status": (400, {"error": {"message": "no"}})}
        check(call(self.port, "POST", "/v1/chat/completions", CHAT),
              100000 - 36)
        self.fake.mode = {}
        bob = call(self.port, "GET", "/v1/models", key=BOB_KEY)
        self.assertEqual(bob.headers["x-llmgate-tokens-limit"], "50000")
        self.assertEqual(bob.headers["x-llmgate-tokens-remaining"], "50000")
        # the fake sends no x-ratelimit-*: none may come from the gateway
        self.assertEqual([n for n in bob.headers
                          if n.startswith("x-ratelimit")], [])


# Self-service ################################################################

class SelfServiceTest(GatewayTest):

    def test_usage_document_is_exact(self):
        self.fix_clock(WINDOW + 42)
        self.assertEqual(call(self.port, "POST", "/v1/chat/completions",
                              CHAT).status, 200)
        reply = call(self.port, "GET", "/llmgate/usage")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["content-type"], "application/json")
        self.assertEqual(reply.json(), {
            "user": "alice", "limit": 100000, "used": 18,
            "remaining": 100000 - 18, "window_seconds": PERIOD,
            "resets_at": iso(WINDOW + PERIOD), "reserved": 0})
        reply = call(self.port, "GET", "/llmgate/usage", key=None,
                     headers={"x-api-key": BOB_KEY})
        self.assertEqual(reply.json(), {
            "user": "bob", "limit": 50000, "used": 0, "remaining": 50000,
            "window_seconds": PERIOD, "resets_at": iso(WINDOW + PERIOD),
            "reserved": 0})
        self.assertEqual(self.fake.count(), 1)

    def test_usage_needs_a_key(self):
        reply = call(self.port, "GET", "/llmgate/usage", key=None)
        self.assertEqual(reply.status, 401)
        self.assert_error(reply.json(), "missing_api_key",
                          "authentication_error")
        reply = call(self.port, "GET", "/llmgate/usage",
                     key="nobody-has-this-key")
        self.assertEqual(reply.status, 401)
        self.assert_error(reply.json(), "invalid_api_key",
                          "authentication_error")

    def test_usage_takes_only_get_and_head(self):
        reply = call(self.port, "POST", "/llmgate/usage", {"x": 1})
        self.assertEqual(reply.status, 405)
        self.assert_error(reply.json(), "method_not_allowed",
                          "invalid_request_error")
        reply = call(self.port, "HEAD", "/llmgate/usage")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, b"")

    def test_healthz_needs_no_auth(self):
        reply = call(self.port, "GET", "/healthz", key=None)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["content-type"], "application/json")
        self.assertEqual(reply.json(), {"status": "ok"})
        self.assert_never_forwarded()


# Refusals ####################################################################

class RefusalTest(GatewayTest):

    def assert_raw_refused(self, raw, status, code,
                           kind="invalid_request_error", closed=None):
        self.assertEqual(status_of(raw), status, raw[:200])
        head = head_of(raw)
        self.assertEqual(head["content-type"], "application/json")
        body = body_of(raw)
        self.assertEqual(head["content-length"], str(len(body)))
        self.assert_error(json.loads(body.decode()), code, kind)
        if closed is not None:
            self.assertTrue(closed, "the connection was left open")
            self.assertEqual(head.get("connection"), "close")
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1)

    def assert_refuses(self, data, status, code):
        """The raw request `data` gets this refusal and a close; nothing
        is forwarded, nothing secret logged."""
        raw, closed = raw_exchange(self.port, data)
        self.assert_raw_refused(raw, status, code, closed=closed)
        self.assert_never_forwarded()
        self.assert_clean_logs()

    def test_unknown_path_404(self):
        for path in ("/nope", "/v2/chat/completions", "/llmgate/other",
                     "/v1x"):
            with self.subTest(path=path):
                reply = call(self.port, "GET", path)
                self.assertEqual(reply.status, 404)
                self.assert_error(reply.json(), "not_found",
                                  "invalid_request_error")
        self.assert_never_forwarded()
        self.assert_clean_logs()

    def test_absolute_form_target_400_never_forwarded(self):
        for target in ("http://127.0.0.1:%d/v1/models" % self.fake.port,
                       "https://api.openai.com/v1/models",
                       "127.0.0.1:443", "*"):
            with self.subTest(target=target):
                self.assert_refuses(request("GET", target), 400,
                                    "invalid_path")

    def test_dot_segments_400_never_forwarded(self):
        paths = ["/v1/../v1/models", "/v1/./models", "/v1/models/..",
                 "/v1/%2e%2e/v1/models", "/v1/%2E%2E/v1/models",
                 "/v1/%2e/models", "/v1/.%2E/models", "/v1/%2e%2E/secret",
                 "/v1/a%2f..%2fmodels", "/v1/a%5c..%5cmodels"]
        for path in paths:
            with self.subTest(path=path):
                self.assert_refuses(request("GET", path), 400,
                                    "invalid_path")
                reply = call(self.port, "POST", path, CHAT)
                self.assertEqual(reply.status, 400)
        self.assert_never_forwarded()
        self.assertEqual(self.usage(), 0)
        self.assert_clean_logs()

    def test_a_refusal_is_in_flight_until_it_is_logged(self):
        # shutdown waits for requests in flight; one refused at its head
        # must count too, or its log line lands after the gateway stopped
        held, gate = threading.Event(), threading.Event()
        write = self.logs.write

        def slow_write(text):
            if " status=400 " in text:
                held.set()
                gate.wait(TIMEOUT)
            return write(text)
        self.logs.write = slow_write
        with socket.create_connection(("127.0.0.1", self.port),
                                      timeout=TIMEOUT) as s:
            s.sendall(request("POST", CHAT_PATH, [
                ("Content-Length", "5"), ("Content-Length", "6")]))
            self.assertTrue(held.wait(TIMEOUT))
            self.assertEqual(self.gateway.busy, 1)
            gate.set()
            self.assertEqual(self.gateway.stop(TIMEOUT), 0)
            self.assertEqual(len(self.log_lines()), 1)
            raw, closed = receive(s)
        self.assert_raw_refused(bytes(raw), 400, "bad_framing", closed=closed)

    def test_a_fragment_in_the_target_is_refused(self):
        # a provider that cut the fragment off would serve
        # /v1/chat/completions while llmgate took it for a free count
        for target in ("/v1/chat/completions#/count_tokens",
                       "/v1/chat/completions?x=1#y"):
            with self.subTest(target=target):
                self.assert_refuses(request("POST", target, [
                    ("Content-Length", "2")], b"{}"), 400, "invalid_path")
        self.assertEqual(self.usage(), 0)

    def test_a_dribbled_head_is_in_flight_until_it_is_refused(self):
        # shutdown waits for a head still arriving: its 408 and its log
        # line come before stop() returns, never into another capture
        with mock.patch.object(llmgate, "HEADER_TIMEOUT_S", 0.5):
            with socket.create_connection(("127.0.0.1", self.port),
                                          timeout=TIMEOUT) as s:
                s.sendall(b"GET /v1/models HTTP/1.1\r\n")
                deadline = time.monotonic() + TIMEOUT
                while self.gateway.busy == 0 and \
                        time.monotonic() < deadline:
                    select.select([s], [], [], 0.01)
                self.assertEqual(self.gateway.busy, 1)
                self.assertEqual(self.gateway.stop(TIMEOUT), 0)
                self.assertEqual(len(self.log_lines()), 1)
                self.assertIn(" status=408 ", self.log_lines()[0])
                raw, closed = receive(s)
        self.assert_raw_refused(bytes(raw), 408, "request_timeout",
                                closed=closed)

    def test_a_client_leaving_after_stop_is_no_traceback(self):
        # the watcher outlives stop() by one poll.  A kept-alive client
        # that leaves then, the watcher having seen it go but its handler
        # closing the socket first, must not crash the watcher
        seen, closed, confirmed = (threading.Event(), threading.Event(),
                                   threading.Event())
        finish = llmgate.Handler.finish
        shutdown_request = llmgate.GatewayServer.shutdown_request
        confirm = llmgate.DisconnectWatcher._confirm

        def late_finish(handler):
            seen.wait(TIMEOUT)   # the watcher holds the hang-up event
            finish(handler)

        def closing(server, request):
            shutdown_request(server, request)   # this closes the socket
            closed.set()

        def late_confirm(watcher, fd):
            seen.set()
            closed.wait(TIMEOUT)
            try:
                return confirm(watcher, fd)
            finally:
                confirmed.set()
        with mock.patch.object(llmgate.Handler, "finish", late_finish), \
                mock.patch.object(llmgate.GatewayServer, "shutdown_request",
                                  closing), \
                mock.patch.object(llmgate.DisconnectWatcher, "_confirm",
                                  late_confirm), \
                mock.patch.object(llmgate, "WATCH_POLL_S", TIMEOUT):
            self.restart(self.config())   # a watcher in one long poll
            seen.clear()
            closed.clear()
            conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                              timeout=TIMEOUT)
            self.assertEqual(call(self.port, "GET", "/healthz",
                                  conn=conn).status, 200)
            self.assertEqual(self.gateway.stop(TIMEOUT), 0)
            conn.close()
            self.assertTrue(confirmed.wait(TIMEOUT))
            for thread in threading.enumerate():
                if thread.name == "disconnect-watcher":
                    thread.join(TIMEOUT)
        self.assert_clean_logs()

    def test_invalid_json_400(self):
        for ctype in ("application/json", "application/json; charset=utf-8"):
            with self.subTest(content_type=ctype):
                reply = call(self.port, "POST", "/v1/chat/completions",
                             b'{"model": "gpt-4o", "messages": [',
                             {"Content-Type": ctype})
                self.assertEqual(reply.status, 400)
                self.assert_error(reply.json(), "invalid_json",
                                  "invalid_request_error")
        self.assert_never_forwarded()
        self.assertEqual(self.usage(), 0)
        self.assertEqual(self.reserved(), 0)
        self.assert_clean_logs()

    def test_body_over_the_limit_413_without_reading_it(self):
        for length in (llmgate.MAX_BODY_BYTES + 1, 10 ** 12):
            with self.subTest(length=length):
                data = request("POST", "/v1/audio/transcriptions", [
                    ("Content-Type", "multipart/form-data; boundary=x"),
                    ("Content-Length", str(length))])
                t0 = time.monotonic()
                self.assert_refuses(data, 413, "body_too_large")
                self.assertLess(time.monotonic() - t0, 3.0)

    def test_chunked_body_over_the_limit_413(self):
        doc = self.config()
        doc["maxBodyBytes"] = 16
        self.restart(doc)
        data = request("POST", "/v1/chat/completions", [
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked")]) + b"20\r\n" + b"x" * 32
        self.assert_refuses(data, 413, "body_too_large")

    def test_content_length_and_transfer_encoding_400_then_close(self):
        # a second request pipelined behind must not be answered
        data = request("POST", "/v1/chat/completions", [
            ("Content-Length", "5"), ("Transfer-Encoding", "chunked")]) + \
            request("GET", "/healthz", key=None)
        self.assert_refuses(data, 400, "bad_framing")

    def test_conflicting_content_lengths_400_then_close(self):
        data = request("POST", "/v1/chat/completions", [
            ("Content-Length", "5"), ("Content-Length", "6")])
        self.assert_refuses(data, 400, "bad_framing")

    def test_non_numeric_content_length_400_then_close(self):
        for value in ("abc", "-1", "5x", "0x10", "1e3"):
            with self.subTest(value=value):
                data = request("POST", "/v1/chat/completions", [
                    ("Content-Length", value)])
                self.assert_refuses(data, 400, "bad_framing")

    def test_unsupported_transfer_encoding_400(self):
        data = request("POST", "/v1/chat/completions", [
            ("Transfer-Encoding", "gzip, chunked")])
        self.assert_refuses(data, 400, "bad_framing")

    def test_too_many_headers_431(self):
        headers = [("X-H%d" % i, "v")
                   for i in range(llmgate.MAX_HEADER_COUNT + 1)]
        self.assert_refuses(request("GET", "/v1/models", headers), 431,
                            "headers_too_large")

    def test_too_long_request_line_414(self):
        target = "/v1/" + "a" * llmgate.MAX_REQUEST_LINE_BYTES
        self.assert_refuses(request("GET", target), 414, "uri_too_long")

    def test_unfinished_head_over_the_limit_431(self):
        # exactly one byte more than the limit, with no blank line
        start = request("GET", "/v1/models")[:-2] + b"X-Big: "
        data = start + b"a" * (llmgate.MAX_HEADER_BYTES + 1 - len(start))
        self.assertEqual(len(data), llmgate.MAX_HEADER_BYTES + 1)
        self.assert_refuses(data, 431, "headers_too_large")

    def test_complete_head_over_the_limit_431(self):
        big = "a" * (llmgate.MAX_HEADER_BYTES + 100)
        raw, closed = raw_exchange(self.port, request("GET", "/v1/models", [
            ("X-Big", big), ("Connection", "close")]))
        # the fake provider's own answers carry "Server: BaseHTTP/..."
        self.assertFalse(b"BaseHTTP" in raw, "a %d-byte head was forwarded "
                         "to the provider, which answered %s" % (
                             len(big), status_of(raw)))
        self.assert_never_forwarded()
        self.assert_raw_refused(raw, 431, "headers_too_large", closed=closed)

    def test_provider_unreachable_502(self):
        doc = self.config()
        doc["providers"]["openai"]["url"] = "http://127.0.0.1:%d" % \
            free_port()
        self.restart(doc)
        reply = call(self.port, "POST", "/v1/chat/completions", CHAT)
        self.assertEqual(reply.status, 502)
        self.assert_error(reply.json(), "upstream_unreachable", "api_error")
        self.assertEqual(reply.headers["x-llmgate-tokens-remaining"],
                         "100000")
        self.assertEqual(self.usage(), 0)
        self.assertEqual(self.reserved(), 0)
        line = self.wait_log_lines(1)[0]
        self.assertIn(" status=502 in=0 out=0 ", line)
        self.assert_clean_logs()

    def test_provider_too_slow_504(self):
        release = threading.Event()
        self.addCleanup(release.set)
        doc = self.config()
        doc["providers"]["openai"]["timeout"] = 0.3
        self.restart(doc)
        answered = threading.Event()
        self.fake.mode = {"hold": release, "done": answered}
        t0 = time.monotonic()
        reply = call(self.port, "POST", "/v1/chat/completions", CHAT)
        elapsed = time.monotonic() - t0
        self.assertEqual(reply.status, 504)
        self.assert_error(reply.json(), "upstream_timeout", "api_error")
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 3.0)
        # the provider had the request and may still be working on it:
        # its input estimate is charged, as for a hung-up client
        self.assertEqual(self.usage(), est_tokens("gpt-4o", "user", "hi"))
        self.assertEqual(self.reserved(), 0)
        self.assertRegex(self.wait_log_lines(1)[0],
                         r" status=504 in=3 out=0 ms=[0-9.]+ "
                         r"ttfb=[0-9.]+ aborted\Z")
        self.assert_clean_logs()
        release.set()
        self.assertTrue(answered.wait(TIMEOUT))   # the fake is done

    def test_provider_stalling_mid_answer_504(self):
        release = threading.Event()
        self.addCleanup(release.set)
        doc = self.config()
        doc["providers"]["openai"]["timeout"] = 0.3
        self.restart(doc)
        self.fake.mode = {"stall_body": release}
        reply = call(self.port, "POST", "/v1/chat/completions", CHAT)
        self.assertEqual(reply.status, 504)
        self.assert_error(reply.json(), "upstream_timeout", "api_error")
        self.assertIn("0.3 s", reply.json()["error"]["message"])
        # no usage was reported: the input estimate of the request
        self.assertEqual(self.usage(), llmgate.estimate(
            CHAT, "/v1/chat/completions", self.gateway.config)[0])
        self.assertEqual(self.reserved(), 0)
        self.assert_clean_logs()

    def test_chunked_request_body_is_forwarded_with_length(self):
        parts = [b'{"model": "gpt-4o", ', b'"messages": [{"role": "user", ',
                 b'"content": "hi"}]}']
        body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts)
        data = request("POST", "/v1/chat/completions", [
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"), ("Connection", "close")]) + \
            body + b"0\r\nX-Trailer: 1\r\n\r\n"
        raw, closed = raw_exchange(self.port, data)
        self.assertEqual(status_of(raw), 200, raw[:300])
        self.assertTrue(closed)
        self.assertEqual(json.loads(body_of(raw))["usage"], CHAT_USAGE)
        rec = self.fake.last()
        whole = b"".join(parts)
        self.assertEqual(rec.body, whole)
        self.assertEqual(rec.header("Content-Length"), str(len(whole)))
        self.assertIsNone(rec.header("Transfer-Encoding"))
        self.assertIsNone(rec.header("X-Trailer"))
        self.assertEqual(self.usage(), 18)

    def test_dribbled_headers_are_dropped_after_the_header_timeout(self):
        with mock.patch.object(llmgate, "HEADER_TIMEOUT_S", 0.3):
            s = socket.create_connection(("127.0.0.1", self.port),
                                         timeout=TIMEOUT)
            self.addCleanup(s.close)
            dribble = request("GET", "/v1/models")
            t0 = time.monotonic()
            deadline = t0 + 5.0
            i = 0
            # one byte at a time, until the gateway answers
            while time.monotonic() < deadline and i < len(dribble) - 4:
                try:
                    s.sendall(dribble[i:i + 1])
                except OSError:
                    break
                i += 1
                if select.select([s], [], [], 0.05)[0]:
                    break
            got, closed = receive(
                s, timeout=max(0.01, deadline - time.monotonic()))
            elapsed = time.monotonic() - t0
        raw = bytes(got)
        self.assertTrue(closed)
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 2.0)
        self.assertLess(i, len(dribble) - 4)   # cut off mid-head
        self.assert_raw_refused(raw, 408, "request_timeout", closed=closed)
        self.assert_never_forwarded()
        line = self.wait_log_lines(1)[0]
        self.assertIn(" status=408 ", line)
        self.assert_clean_logs()

    def test_silent_connection_is_closed_after_the_first_byte_timeout(self):
        with mock.patch.object(llmgate, "FIRST_BYTE_TIMEOUT_S", 0.3):
            t0 = time.monotonic()
            raw, closed = raw_exchange(self.port, b"", timeout=5.0)
            elapsed = time.monotonic() - t0
        self.assertTrue(closed)
        self.assertEqual(raw, b"")
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 2.0)
        self.assertEqual(self.log_lines(), [])   # no request, no line
        self.assert_clean_logs()

    def test_an_idle_kept_alive_connection_is_closed(self):
        with mock.patch.object(llmgate, "CLIENT_IDLE_TIMEOUT_S", 0.5):
            conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                              timeout=TIMEOUT)
            self.addCleanup(conn.close)
            reply = call(self.port, "GET", "/healthz", conn=conn)
            self.assertEqual(reply.status, 200)
            t0 = time.monotonic()
            got, closed = receive(conn.sock, timeout=5.0)
            elapsed = time.monotonic() - t0
        self.assertTrue(closed)
        self.assertEqual(bytes(got), b"")
        # the gateway's wait began before t0, by as much as this thread
        # was late to read the answer: a wide margin below 0.5 s
        self.assertGreaterEqual(elapsed, 0.2)
        self.assertLess(elapsed, 3.0)

    def test_connections_past_the_cap_are_closed_at_once(self):
        with mock.patch.object(llmgate, "MAX_CONNECTIONS", 2):
            held = []
            for _ in range(2):
                conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                  timeout=TIMEOUT)
                self.addCleanup(conn.close)
                self.assertEqual(call(self.port, "GET", "/healthz",
                                      conn=conn).status, 200)
                held.append(conn)
            raw, closed = raw_exchange(self.port, request(
                "GET", "/healthz", key=None), timeout=5.0)
            self.assertTrue(closed)
            self.assertEqual(raw, b"")
            held[0].close()
            # the freed place is taken again once the server sees it go
            deadline = time.monotonic() + TIMEOUT
            while True:
                raw, _ = raw_exchange(self.port, request(
                    "GET", "/healthz", [("Connection", "close")],
                    key=None), timeout=5.0)
                if status_of(raw) == 200 or time.monotonic() > deadline:
                    break
            self.assertEqual(status_of(raw), 200)


# Logging #####################################################################

LINE_RE = (r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1 %s %s %s "
           r"model=%s status=%d in=%d out=%d ms=\d+\.\d ttfb=\d+\.\d$")


class LoggingTest(GatewayTest):

    PROMPT = "zebra-quartz-PROMPT-8841-do-not-log"

    def test_one_line_per_request_without_keys_or_prompts(self):
        chat = {"model": "gpt-4o",
                "messages": [{"role": "user", "content": self.PROMPT}]}
        self.assertEqual(call(self.port, "POST",
                              "/v1/chat/completions?trace=1",
                              chat).status, 200)
        lines = self.wait_log_lines(1)
        self.assertRegex(lines[0], LINE_RE % (
            "alice", "POST", "/v1/chat/completions", "gpt-4o", 200, 11, 7))

        body = {"model": "gpt-4o", "input": self.PROMPT, "stream": True}
        self.assertEqual(call(self.port, "POST", "/v1/responses", body,
                              key=None, headers={"x-api-key": BOB_KEY}
                              ).status, 200)
        lines = self.wait_log_lines(2)
        self.assertRegex(lines[1], LINE_RE % (
            "bob", "POST", "/v1/responses", "gpt-4o", 200, 20, 9))

        bad = "bad-key-%s" % self.PROMPT
        self.assertEqual(call(self.port, "POST", "/v1/chat/completions",
                              chat, key=bad).status, 401)
        lines = self.wait_log_lines(3)
        self.assertRegex(lines[2], LINE_RE % (
            "-", "POST", "/v1/chat/completions", "-", 401, 0, 0))

        self.assertEqual(call(self.port, "GET", "/nope").status, 404)
        lines = self.wait_log_lines(4)
        self.assertEqual(len(lines), 4)
        self.assertIn(" GET /nope model=- status=404 in=0 out=0 ", lines[3])

        text = self.logs.text()
        self.assertNotIn(self.PROMPT, text)
        self.assertNotIn("zebra", text)
        self.assertNotIn("trace=1", text)
        self.assert_clean_logs()
        # each request exactly once
        self.assertEqual(len(self.log_lines()), 4)


# Config through the gateway ##################################################

class EnvExpansionTest(GatewayTest):

    def test_env_variables_are_expanded(self):
        doc = self.config()
        doc["providers"]["openai"]["apiKey"] = "sk-${LLMGATE_T_PART}-end"
        doc["providers"]["openai"]["url"] = "${LLMGATE_T_URL}"
        env = {"LLMGATE_T_PART": "from-env-123", "LLMGATE_T_URL":
               self.fake.url}
        with mock.patch.dict(os.environ, env):
            self.restart(doc)
        reply = call(self.port, "GET", "/v1/models")
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.fake.last().header("Authorization"),
                         "Bearer sk-from-env-123-end")
        self.assertNotIn(b"from-env-123", reply.body)
        self.assertNotIn("from-env-123", self.logs.text())


# Command line ################################################################

def cli_config(**changes):
    doc = {"listen": {"host": "127.0.0.1", "port": 0},
           "providers": {"openai": {"url": "http://127.0.0.1:9",
                                    "apiKey": "sk-cli-provider-secret"}},
           "limitResetPeriod": 3600,
           "users": [{"name": "alice", "apiKey": ALICE_KEY,
                      "tokens": 100000},
                     {"name": "bob", "apiKey": BOB_KEY, "tokens": 50000}]}
    doc.update(changes)
    return doc


class CommandLineTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="llmgate-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def assert_config_errors(self, cases, env=None):
        """Run every (doc, message) case at once, as a plain serve and
        with --check; each must exit 2 naming the field, no traceback."""
        procs = []
        for i, (doc, message) in enumerate(cases):
            path = write_json(self.dir, doc, "config-%d.json" % i)
            for extra in ([], ["--check"]):
                proc = popen_script(self, ["--config", path] + extra,
                                    stdout=subprocess.PIPE, env=env,
                                    universal_newlines=True)
                procs.append((proc, message, extra))
        for proc, message, extra in procs:
            with self.subTest(message=message, args=extra):
                out, err = proc.communicate(timeout=TIMEOUT)
                self.assertEqual(proc.returncode, 2, err)
                self.assertEqual(out, "")
                self.assertNotIn("Traceback", err)
                self.assertTrue(err.startswith("llmgate: config error: "),
                                err)
                self.assertIn(message, err)
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertNotIn(ALICE_KEY, err)
                self.assertNotIn("sk-cli-provider-secret", err)

    def test_check_exits_0_and_prints_routes(self):
        path = write_json(self.dir, cli_config())
        proc = run_script(["--config", path, "--check"])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = proc.stdout.splitlines()
        self.assertEqual(lines[:3], [
            "config OK: 1 providers, 2 users", "routes:",
            "  /v1/...  ->  openai (openai, http://127.0.0.1:9)"])
        self.assertNotIn("Traceback", proc.stderr)
        self.assertNotIn("sk-cli-provider-secret", proc.stdout)
        self.assertNotIn(ALICE_KEY, proc.stdout)

    def test_bad_tokens_name_the_field(self):
        cases = []
        for value in (-5, "5", True, 1.5):
            users = cli_config()["users"]
            users[1]["tokens"] = value
            cases.append((cli_config(users=users),
                          "users[1].tokens must be a non-negative integer"))
        self.assert_config_errors(cases)

    def test_duplicate_user_names_and_keys_rejected(self):
        same_name = cli_config()["users"]
        same_name[1]["name"] = "alice"
        same_key = cli_config()["users"]
        same_key[1]["apiKey"] = ALICE_KEY
        self.assert_config_errors([
            (cli_config(users=same_name),
             "users[1].name repeats the name of users[0]"),
            (cli_config(users=same_key),
             "users[1].apiKey: the same key is configured twice")])

    def test_missing_env_variable_is_an_error(self):
        env = dict(os.environ)
        env.pop("LLMGATE_T_MISSING", None)
        doc = cli_config()
        doc["providers"]["openai"]["apiKey"] = "${LLMGATE_T_MISSING}"
        self.assert_config_errors([(
            doc, "providers.openai.apiKey: environment variable "
            "LLMGATE_T_MISSING is not set")], env=env)

    def test_env_expansion_in_check(self):
        env = dict(os.environ, LLMGATE_T_URL="http://127.0.0.1:7",
                   LLMGATE_T_KEY="sk-env-key-0000")
        doc = cli_config()
        doc["providers"]["openai"] = {"url": "${LLMGATE_T_URL}",
                                      "apiKey": "${LLMGATE_T_KEY}"}
        path = write_json(self.dir, doc)
        proc = run_script(["--config", path, "--check"], env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("  /v1/...  ->  openai (openai, http://127.0.0.1:7)",
                      proc.stdout.splitlines())
        self.assertNotIn("sk-env-key-0000", proc.stdout + proc.stderr)

    def test_unknown_keys_rejected(self):
        provider = cli_config()
        provider["providers"]["openai"]["token"] = "x"
        users = cli_config()["users"]
        users[1]["limit"] = 5
        self.assert_config_errors([
            (cli_config(quota=5), "config: unknown field 'quota'"),
            (provider, "providers.openai: unknown field 'token'"),
            (cli_config(users=users), "users[1]: unknown field 'limit'"),
            (cli_config(listen={"port": 0, "ip": "x"}),
             "listen: unknown field 'ip'")])

    def test_version(self):
        proc = run_script(["--version"])
        self.assertEqual(proc.returncode, 0)
        self.assertEqual(proc.stdout, "llmgate %s\n" % llmgate.__version__)

    def test_help_has_examples(self):
        proc = run_script(["--help"])
        self.assertEqual(proc.returncode, 0)
        self.assertIn("examples:", proc.stdout)
        self.assertIn("python3 llmgate.py --config config.json", proc.stdout)
        self.assertIn("--check", proc.stdout)
        self.assertIn("--port 0", proc.stdout)

    # serving

    def start(self):
        """Serve with --port 0 while the config's own port is taken;
        returns (Server, port)."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        doc = cli_config(listen={"host": "127.0.0.1",
                                 "port": busy.getsockname()[1]})
        server, port = serve(self, write_json(self.dir, doc))
        self.assertNotEqual(port, 0)
        self.assertNotEqual(port, busy.getsockname()[1])
        return server, port

    def stop_with(self, signum, serve_first):
        """Start, optionally serve one request, stop with `signum`.
        Without `serve_first` the signal goes out as soon as the gateway
        says it listens: it must be handled from then on."""
        server, port = self.start()
        self.assertIn("(providers: openai=openai; 2 users)", server.err)
        if serve_first:
            reply = call(port, "GET", "/healthz", key=None)
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.json(), {"status": "ok"})
        server.proc.send_signal(signum)
        self.assertEqual(server.finish(), 0)
        text = server.err
        self.assertIn(" stopped", text)
        self.assertNotIn("Traceback", text)
        self.assertNotIn("sk-cli-provider-secret", text)
        self.assertNotIn(ALICE_KEY, text)

    def test_port_0_serves_and_sigterm_stops_with_0(self):
        self.stop_with(signal.SIGTERM, True)

    def test_sigint_right_after_start_stops_with_0(self):
        self.stop_with(signal.SIGINT, False)


# Hardening: what a review of the request path turned up #####################

class HardeningTest(GatewayTest):

    def test_trace_is_refused_and_never_forwarded(self):
        for method in ("TRACE", "CONNECT"):
            raw, closed = raw_exchange(self.port, request(
                method, "/v1/models", [("Connection", "close")]))
            self.assertEqual(status_of(raw), 405, raw[:200])
            self.assert_error(json.loads(body_of(raw)),
                              "method_not_allowed", "invalid_request_error")
        self.assert_never_forwarded()

    def test_early_hints_are_skipped_and_the_connection_stays_clean(self):
        self.fake.mode = {"early_hints": True}
        first = call(self.port, "POST", "/v1/chat/completions", CHAT)
        self.assertEqual(first.status, 200)
        self.assertEqual(first.json()["usage"], CHAT_USAGE)
        self.fake.mode = {}
        second = call(self.port, "POST", "/v1/embeddings",
                      {"model": "e", "input": "x"})
        self.assertEqual(second.json()["usage"], EMBEDDINGS_USAGE)
        self.assertEqual(self.usage(), CHAT_TOTAL + 5)

    def raw_answer(self, head_lines, body, sep=b"\r\n"):
        """A provider's answer as bytes: head lines, then `body`."""
        return sep.join(head_lines) + sep + sep + body

    def test_an_answer_head_too_large_is_a_502(self):
        body = json.dumps({"usage": CHAT_USAGE}).encode()
        base = [b"HTTP/1.1 200 OK", b"Content-Type: application/json",
                b"Content-Length: %d" % len(body)]
        cases = [
            base + [b"X-H%d: v" % i for i in range(llmgate.MAX_HEADER_COUNT)],
            base + [b"X-Big: " + b"v" * llmgate.MAX_HEADER_BYTES]]
        for head in cases:
            with self.subTest(lines=len(head)):
                self.fake.mode = {"raw": self.raw_answer(head, body)}
                reply = call(self.port, "POST", CHAT_PATH, CHAT)
                self.assert_openai_error(reply, 502, "api_error",
                                         "upstream_unreachable")
        self.assertEqual(self.usage(), 0)
        self.assert_clean_logs()

    def test_an_answer_head_in_bare_line_feeds_is_read(self):
        # as http.client reads it: LF alone ends a line, a reason is
        # optional, and each 1xx before the answer is skipped
        body = json.dumps({"usage": CHAT_USAGE}).encode()
        head = [b"HTTP/1.1 200", b"Content-Type: application/json",
                b"Content-Length: %d" % len(body), b"X-Odd:  spaced  "]
        self.fake.mode = {"raw": [
            b"HTTP/1.1 100 Continue\r\n\r\n",
            self.raw_answer(head, body, b"\n")]}
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.body, body)
        self.assertEqual(reply.headers["x-odd"], "spaced")
        self.assertEqual(self.usage(), CHAT_TOTAL)

    def test_an_answer_in_pieces_is_read_whole(self):
        # the head split mid-line and the body split from it: each piece
        # is its own write, so the gateway reads them one by one
        body = json.dumps({"usage": CHAT_USAGE}).encode()
        data = self.raw_answer([b"HTTP/1.1 200 OK",
                                b"Content-Type: application/json",
                                b"Content-Length: %d" % len(body)], body)
        cut = data.index(b"Content-Length") + 5
        self.fake.mode = {"raw": [data[:cut], data[cut:-10], data[-10:]],
                          "raw_keep": True}
        for _ in range(2):   # the second on the kept connection
            reply = call(self.port, "POST", CHAT_PATH, CHAT)
            self.assertEqual(reply.status, 200, reply.body)
            self.assertEqual(reply.body, body)
        self.assertEqual(self.usage(), 2 * CHAT_TOTAL)

    def test_an_answer_longer_than_declared_ends_its_connection(self):
        # bytes past the Content-Length are no one's answer: they are
        # dropped, and the connection is not used again
        body = json.dumps({"usage": CHAT_USAGE}).encode()
        self.fake.mode = {"raw": self.raw_answer(
            [b"HTTP/1.1 200 OK", b"Content-Type: application/json",
             b"Content-Length: %d" % len(body)], body + b"HTTP/1.1 200 OK"),
            "raw_keep": True}
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.body, body)
        self.fake.mode = {}
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["usage"], CHAT_USAGE)
        self.assertEqual(self.usage(), 2 * CHAT_TOTAL)
        self.assertNotEqual(self.fake.requests[0].peer,
                            self.fake.requests[1].peer)

    def test_a_whole_event_stream_with_a_length_is_not_cut_short(self):
        # an SSE answer with a Content-Length that came with its head, and
        # the same gzipped, which passes through unparsed
        events = (sse({"choices": [{"delta": {"content": "hi"}}]}) +
                  sse({"choices": [], "usage": CHAT_USAGE}) +
                  b"data: [DONE]\n\n")
        for encoding in (None, "br"):
            with self.subTest(encoding=encoding):
                head = [b"HTTP/1.1 200 OK",
                        b"Content-Type: text/event-stream",
                        b"Content-Length: %d" % len(events)]
                if encoding:
                    head.append(b"Content-Encoding: " + encoding.encode())
                self.fake.mode = {"raw": self.raw_answer(head, events),
                                  "raw_keep": True}
                reply = call(self.port, "POST", CHAT_PATH,
                             dict(CHAT, stream=True))
                self.assertEqual(reply.status, 200)
                if encoding is None:
                    # the usage chunk was asked for by llmgate: hidden
                    self.assertEqual(reply.body, events.replace(
                        sse({"choices": [], "usage": CHAT_USAGE}), b""))
                    self.assertEqual(self.usage(), CHAT_TOTAL)
                    line = self.wait_log_lines(1)[-1]
                    self.assertFalse(line.endswith(" aborted"), line)
                else:   # unreadable: whole, but billed as an estimate
                    self.assertEqual(reply.body, events)
        self.assertNotIn("broke off", self.logs.text())
        self.assertEqual(self.fake.requests[0].peer,
                         self.fake.requests[1].peer)   # kept and reused

    def test_a_bad_status_line_is_a_502(self):
        for line in (b"HTTP/1.1 2x0 OK", b"HTTP/1.1 \xb2\xb2\xb2 OK",
                     b"ICY 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 099 Low"):
            with self.subTest(line=line):
                self.fake.mode = {"raw": self.raw_answer(
                    [line, b"Content-Length: 2"], b"{}")}
                reply = call(self.port, "POST", CHAT_PATH, CHAT)
                self.assert_openai_error(reply, 502, "api_error",
                                         "upstream_unreachable")

    def test_a_request_the_provider_may_have_worked_on_is_not_sent_again(
            self):
        # on a kept-alive connection the provider takes the request, then
        # closes it unanswered: past STALE_RETRY_S (here 0) it may have
        # generated, so it is a 502, not a second generation
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status,
                         200)
        self.fake.mode = {"drop": 1}
        with mock.patch.object(llmgate, "STALE_RETRY_S", 0):
            reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assert_openai_error(reply, 502, "api_error",
                                 "upstream_unreachable")
        self.assertEqual(self.fake.count(), 2)
        # the same failure within STALE_RETRY_S is a stale connection: the
        # request goes again, on a new one
        self.fake.mode = {}
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status,
                         200)
        self.fake.mode = {"drop": 1}
        with mock.patch.object(llmgate, "STALE_RETRY_S", TIMEOUT):
            reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.fake.count(), 5)
        self.assertEqual(self.usage(), 3 * CHAT_TOTAL)

    def test_bytes_nobody_asked_for_never_pass_for_an_answer(self):
        # after a whole answer, the provider sends another one unasked:
        # the idle connection holds it, so it is dropped, not reused
        body = json.dumps({"usage": CHAT_USAGE}).encode()
        late = json.dumps({"leak": "not yours"}).encode()
        answered, sent = threading.Event(), threading.Event()
        self.fake.mode = {"raw": [
            self.raw_answer([b"HTTP/1.1 200 OK",
                             b"Content-Length: %d" % len(body)], body),
            answered,   # the gateway has pooled the connection by then
            self.raw_answer([b"HTTP/1.1 200 OK",
                             b"Content-Length: %d" % len(late)], late)],
            "raw_keep": True, "done": sent}
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).body, body)
        answered.set()
        self.assertTrue(sent.wait(TIMEOUT))   # the late answer is out
        self.fake.mode = {}
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.json().get("usage"), CHAT_USAGE)
        self.assertNotEqual(self.fake.requests[0].peer,
                            self.fake.requests[1].peer)

    def test_gzip_padding_after_the_last_member_is_skipped(self):
        # gzip tools pad with zeros; gzip.decompress skips them, and so
        # must billing, plain or streamed
        body = gzip.compress(json.dumps({"usage": CHAT_USAGE}).encode())
        self.fake.mode = {"raw": self.raw_answer(
            [b"HTTP/1.1 200 OK", b"Content-Type: application/json",
             b"Content-Encoding: gzip",
             b"Content-Length: %d" % (len(body) + 9)], body + b"\0" * 9)}
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(gzip.decompress(reply.body),
                         json.dumps({"usage": CHAT_USAGE}).encode())
        self.assertEqual(self.usage(), CHAT_TOTAL)
        events = (sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
                  + sse({"choices": [], "usage": CHAT_USAGE}))
        data = gzip.compress(events) + b"\0" * 5
        self.fake.mode = {"raw": self.raw_answer(
            [b"HTTP/1.1 200 OK", b"Content-Type: text/event-stream",
             b"Content-Encoding: gzip", b"Transfer-Encoding: chunked"],
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))}
        reply = call(self.port, "POST", CHAT_PATH, dict(CHAT, stream=True))
        self.assertEqual(reply.body, events.split(b"\n\n")[0] + b"\n\n")
        self.assertEqual(self.usage(), 2 * CHAT_TOTAL)
        self.assertNotIn("broke off", self.logs.text())

    def test_a_provider_that_closes_without_a_word_is_a_502(self):
        for data in (b"", b"HTTP/1.1 200 OK\r\nContent-Ty"):
            with self.subTest(data=data):
                self.fake.mode = {"raw": data}
                reply = call(self.port, "POST", CHAT_PATH, CHAT)
                self.assert_openai_error(reply, 502, "api_error",
                                         "upstream_unreachable")
        self.assertEqual(self.usage(), 0)

    def chunked(self, chunks, trailer=b""):
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        return request("POST", "/v1/chat/completions", [
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"), ("Connection", "close")]) + \
            body + b"0\r\n" + trailer + b"\r\n"

    def test_many_small_chunks_are_read_whole(self):
        data = json.dumps(CHAT).encode()
        raw, _ = raw_exchange(self.port, self.chunked(
            [data[i:i + 1] for i in range(len(data))]))
        self.assertEqual(status_of(raw), 200, raw[:200])
        self.assertEqual(self.fake.last().body, data)

    def test_too_many_chunks_are_refused(self):
        data = json.dumps(CHAT).encode()
        with mock.patch.object(llmgate, "MAX_BODY_CHUNKS", 10):
            raw, closed = raw_exchange(self.port, self.chunked(
                [data[i:i + 1] for i in range(len(data))]))
        self.assertEqual(status_of(raw), 400)
        self.assertTrue(closed)
        self.assert_never_forwarded()

    def test_bare_line_feeds_in_chunk_lines_are_refused(self):
        smuggled = [
            request("POST", "/v1/chat/completions", [
                ("Transfer-Encoding", "chunked")]) +
            b"3;x\nZZZZ\r\nabc\r\n0\r\n\r\n",
            # a size line ending in a bare LF: `$` would let it pass
            request("POST", "/v1/chat/completions", [
                ("Transfer-Encoding", "chunked")]) +
            b"3\n\r\nabc\r\n0\r\n\r\n",
            self.chunked([b"abc"], b"X: a\nGET /v1/evil HTTP/1.1\r\n")]
        for data in smuggled:
            raw, closed = raw_exchange(self.port, data)
            self.assertEqual(status_of(raw), 400, raw[:200])
            self.assert_error(json.loads(body_of(raw)), "bad_framing",
                              "invalid_request_error")
            self.assertTrue(closed)
        self.assert_never_forwarded()

    def test_a_long_chunk_size_line_is_refused_before_its_end(self):
        # no CRLF yet: refused at MAX_CHUNK_LINE_BYTES, not after waiting
        data = request("POST", "/v1/chat/completions", [
            ("Transfer-Encoding", "chunked")]) + b"1;" + b"x" * 5000
        raw, closed = raw_exchange(self.port, data, timeout=5.0)
        self.assertEqual(status_of(raw), 400, raw[:200])
        self.assert_error(json.loads(body_of(raw)), "bad_framing",
                          "invalid_request_error")
        self.assertTrue(closed)
        self.assert_never_forwarded()

    def test_a_provider_url_with_credentials_is_refused(self):
        doc = self.config()
        doc["providers"]["openai"]["url"] = "https://:sk-x@api.openai.com"
        with self.assertRaises(llmgate.ConfigError) as caught:
            llmgate.parse_config(doc, self.dir, {})
        self.assertIn("providers.openai.url", str(caught.exception))
        self.assertNotIn("sk-x", str(caught.exception))

    def test_config_errors_never_echo_a_value(self):
        # a value in the wrong field may be a secret pasted there
        secret = "sk-pasted-secret-0001"
        cases = [("url", secret, "providers.openai.url must be an http:// "
                  "or https:// URL with a host"),
                 ("url", "http://[" + secret, "providers.openai.url must "
                  "be an http:// or https:// URL with a host"),
                 ("type", secret, "providers.openai.type must be one of")]
        for field, value, message in cases:
            with self.subTest(field=field, value=value):
                doc = self.config()
                doc["providers"]["openai"][field] = value
                with self.assertRaises(llmgate.ConfigError) as caught:
                    llmgate.parse_config(doc, self.dir, {})
                self.assertIn(message, str(caught.exception))
                self.assertNotIn(secret, str(caught.exception))
        doc = self.config()
        doc["users"][0]["expires"] = secret
        with self.assertRaises(llmgate.ConfigError) as caught:
            llmgate.parse_config(doc, self.dir, {})
        self.assertEqual(str(caught.exception), "users[0].expires must be "
                         "an ISO date such as 2027-01-31 or "
                         "2027-01-31T18:00:00Z")

    def test_a_config_nested_too_deeply_is_a_config_error(self):
        path = self.write_config({}, "deep.json")
        with open(path, "w") as f:
            f.write('{"users": ' + "[" * 100000 + "]" * 100000 + "}")
        with self.assertRaises(llmgate.ConfigError) as caught:
            llmgate.load_config(path)
        self.assertEqual(str(caught.exception),
                         "%s is nested too deeply" % path)

    def test_hostile_usage_and_deltas_are_ignored(self):
        meter = llmgate.Meter()
        deep = b'{"usage": ' + b'{"a": ' * 100000 + b"1" + b"}" * 100001
        meter.tail(deep)
        meter.answer(deep)
        self.assertFalse(meter.has_input())
        for calls in (5, [7, None], {"function": {"arguments": "xyz"}}):
            doc = {"choices": [{"delta": {"content": "hi",
                                          "tool_calls": calls}}]}
            self.assertEqual(llmgate.delta_chars(doc), 2)

    def test_a_utf8_key_is_matched_as_the_bytes_sent(self):
        key = "cl\u00e9-secr\u00e8te-\u00fc\u00df-0001"
        doc = self.config()
        doc["users"][0]["apiKey"] = key
        self.restart(doc)
        sent = key.encode("utf-8").decode("latin-1")   # the wire's bytes
        for header in ("Authorization", "x-api-key"):
            value = ("Bearer " + sent) if header == "Authorization" \
                else sent
            raw, _ = raw_exchange(self.port, request(
                "GET", llmgate.USAGE_PATH,
                [(header, value), ("Connection", "close")], key=None))
            self.assertEqual(status_of(raw), 200, raw[:300])
            self.assertEqual(json.loads(body_of(raw))["user"], "alice")
        raw, _ = raw_exchange(self.port, request(
            "GET", llmgate.USAGE_PATH, [("Connection", "close")],
            key=key.encode("latin-1", "replace").decode("latin-1")))
        self.assertEqual(status_of(raw), 401)
        self.assert_clean_logs()

    def test_100_continue_is_not_the_first_byte(self):
        seen = []
        write = llmgate.Handler._write

        def spy(handler, data, interim=False):
            write(handler, data, interim)
            seen.append((data[:12], handler.first_byte is not None))
        with mock.patch.object(llmgate.Handler, "_write", spy):
            s = open_request(self.port, CHAT_PATH, CHAT, expect=True,
                             close=True)
            with s:
                buf, _ = receive(s, done=lambda b: b"\r\n\r\n" in b)
                self.assertEqual(bytes(buf),
                                 b"HTTP/1.1 100 Continue\r\n\r\n")
                s.sendall(json.dumps(CHAT).encode())
                buf, closed = receive(s)
        self.assertTrue(closed)
        self.assertEqual(status_of(bytes(buf)), 200)
        self.assertEqual(seen[0], (b"HTTP/1.1 100", False))
        self.assertEqual(seen[1], (b"HTTP/1.1 200", True))

    def test_a_line_feed_never_splits_a_log_line(self):
        # `$` would match before a final LF: the method, path and model
        # must not carry one into the log
        raw, _ = raw_exchange(self.port, b"GET\n /healthz HTTP/1.1\r\n"
                              b"Host: gw\r\nConnection: close\r\n\r\n")
        self.assertEqual(status_of(raw), 400)
        reply = call(self.port, "POST", CHAT_PATH,
                     dict(CHAT, model="gpt-4o\n"))
        self.assertEqual(reply.status, 200)
        lines = self.wait_log_lines(2)
        self.assertEqual(len(self.logs.text().splitlines()), 2, lines)
        self.assertIn(" status=400 ", lines[0])   # refused unparsed
        self.assertIn(" model=gpt-4o? ", lines[1])

    def test_a_body_too_deep_to_rewrite_is_a_400(self):
        # json reads a level or so deeper than it writes; a stream that
        # llmgate must rewrite (include_usage) finds the difference
        for depth in range(950, 1000):
            nested = '{"a": ' * depth + "1" + "}" * depth
            body = ('{"model": "gpt-4o", "stream": true, "messages": [], '
                    '"x": %s}' % nested).encode()
            reply = call(self.port, "POST", CHAT_PATH + "?k=s3cret-query",
                         body, {"Content-Type": "application/json"})
            self.assertIn(reply.status, (200, 400), depth)
            if reply.status == 400:
                self.assertEqual(reply.json()["error"]["code"],
                                 "invalid_json")
        self.assertNotIn("Traceback", self.logs.text())
        self.assertNotIn("s3cret-query", self.logs.text())

    def test_a_flood_of_early_hints_is_a_502(self):
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
        body = json.dumps({"usage": CHAT_USAGE}).encode()
        self.fake.mode = {"raw": [hint * 400] * 4 + [self.raw_answer(
            [b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(body)],
            body)]}
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assert_openai_error(reply, 502, "api_error",
                                 "upstream_unreachable")
        # a few hints are skipped as before
        self.fake.mode = {"raw": [hint * 3 + self.raw_answer(
            [b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(body)],
            body)]}
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).body,
                         body)

    def test_a_long_wait_never_spins_on_a_short_timeout(self):
        # a head finished just before its deadline left a tiny timeout on
        # the socket; the next wait must not poll with it
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        calls = []

        class Counting:
            def recv(self, n):
                calls.append(n)
                return a.recv(n)

            def settimeout(self, t):
                a.settimeout(t)
        handler = llmgate.Handler.__new__(llmgate.Handler)
        handler.connection = Counting()
        handler.inbuf = bytearray()
        handler.sock_timeout = None
        handler._set_timeout(0.005)
        with mock.patch.object(llmgate, "TIMEOUT_SLACK_S", 0.05), \
                self.assertRaises(socket.timeout):
            handler._recv(time.monotonic() + 0.3)
        self.assertLessEqual(len(calls), 3)

    def test_a_count_only_when_every_reading_says_so(self):
        # decoded, this path ends in /count_tokens; a provider that does
        # not decode %2F serves chat: it is reserved and charged
        for path, charged in (("/v1/chat/completions%2Fcount_tokens",
                               CHAT_TOTAL), ("/v1/messages/count_tokens",
                                             0)):
            with self.subTest(path=path):
                before = self.usage()
                self.fake.mode = {"answer": {"usage": CHAT_USAGE}}
                reply = call(self.port, "POST", path, CHAT)
                self.assertEqual(reply.status, 200)
                self.assertEqual(self.usage() - before, charged)

    def test_an_answer_cut_short_is_not_taken_for_whole(self):
        with mock.patch.object(llmgate, "HOLD_BODY_BYTES", 1000):
            self.fake.mode = {"truncate": (5000, 3000)}
            with self.assertRaises(http.client.IncompleteRead):
                call(self.port, "POST", "/v1/chat/completions", CHAT)
            self.assertTrue(self.wait_log_lines(1)[0].endswith(" aborted"))
            self.fake.mode = {}
            reply = call(self.port, "POST", "/v1/chat/completions", CHAT)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["usage"], CHAT_USAGE)

    def test_a_content_length_of_other_digits_is_refused(self):
        raw, closed = raw_exchange(self.port, request(
            "POST", "/v1/chat/completions",
            [("Content-Length", "\u00b2")]))
        self.assertEqual(status_of(raw), 400)
        self.assert_error(json.loads(body_of(raw)), "bad_framing",
                          "invalid_request_error")
        self.assertTrue(closed)
        self.assertNotIn("Traceback", self.logs.text())

    def test_a_slow_body_gets_the_body_deadline_not_the_heads(self):
        data = json.dumps(CHAT).encode()
        with mock.patch.object(llmgate, "HEADER_TIMEOUT_S", 0.2):
            sock = socket.create_connection(("127.0.0.1", self.port),
                                            timeout=TIMEOUT)
            self.addCleanup(sock.close)
            sock.sendall(request("POST", "/v1/chat/completions", [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Connection", "close")]))
            # slower than the head's timeout, well within the body's
            threading.Event().wait(0.5)
            sock.sendall(data)
            got, _ = receive(sock)
        self.assertEqual(status_of(bytes(got)), 200, bytes(got)[:200])

    def test_an_encoded_path_is_still_metered(self):
        body = dict(CHAT, stream=True)
        reply = call(self.port, "POST", "/v1/chat/%63ompletions", body)
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        self.assertEqual(rec.path, "/v1/chat/%63ompletions")
        self.assertEqual(rec.json()["stream_options"],
                         {"include_usage": True})

    def test_retrieving_a_stored_answer_is_not_charged_again(self):
        stored = {"id": "resp_1", "object": "response",
                  "usage": {"input_tokens": 4000, "output_tokens": 1000}}
        self.fake.mode = {"answer": stored}
        for _ in range(3):
            reply = call(self.port, "GET", "/v1/responses/resp_1")
            self.assertEqual(reply.json(), stored)
        self.assertEqual(self.usage(), 0)
        reply = call(self.port, "POST", "/v1/responses/resp_1/cancel",
                     {"x": 1})
        self.assertEqual(self.usage(), 5000)

    def test_an_error_chunk_after_text_is_estimated(self):
        self.fake.mode = {"chat_error_after": 2}
        body = dict(CHAT, stream=True)
        reply = call(self.port, "POST", "/v1/chat/completions", body)
        datas = [json.loads(d) for d in reply.datas()]
        self.assertIn("error", datas[-1])
        expected_in = llmgate.estimate(body, "/v1/chat/completions",
                                       self.gateway.config)[0]
        # "Hel" + "lo": 5 characters, 2 tokens at 4 a token
        self.assertEqual(self.usage(), expected_in + 2)
        self.assertTrue(self.wait_log_lines(1)[0].endswith(" aborted"))


# Issue 3: Anthropic, Azure and routing #######################################

OPENAI_KEY = "sk-openai-provider-KEY-1111111111"
ANTHROPIC_KEY = "sk-ant-provider-KEY-2222222222"
GROQ_KEY = "gsk-groq-provider-KEY-3333333333"
ALT_KEY = "sk-ant-alt-provider-KEY-4444444444"
AZURE_KEY = "azure-provider-KEY-5555555555"
ANTHROPIC_EVENTS = ["message_start", "content_block_start", "ping",
                    "content_block_delta", "content_block_delta",
                    "content_block_delta", "content_block_stop",
                    "message_delta", "message_stop"]

# Claude Code's traffic (PROTOCOLS.md): headers and a body with a system
# message inside `messages`, unknown fields, and number spellings a JSON
# round trip would change (2.50, \u00e9, two spaces).
CLAUDE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                      "fine-grained-tool-streaming-2025-05-14",
    "x-app": "cli",
    "X-Claude-Code-Session-Id": "6f1c9a52-2d7e-4d3b-9a0e-5b8f1e2c3d4a",
    "User-Agent": "claude-cli/2.1.197 (external, cli)",
    "Content-Type": "application/json",
}


def claude_body(stream):
    return (
        b'{"model": "claude-sonnet-4-5",  "max_tokens": 64000, '
        b'"stream": ' + (b"true" if stream else b"false") + b', '
        b'"thinking": {"type": "enabled", "budget_tokens": 31999}, '
        b'"system": [{"type": "text", "text": "You are Claude Code.", '
        b'"cache_control": {"type": "ephemeral"}}], '
        b'"tools": [{"name": "Bash", "description": "run", '
        b'"input_schema": {"type": "object"}}], '
        b'"messages": [{"role": "system", "content": "caveat \\u00e9"}, '
        b'{"role": "user", "content": [{"type": "text", "text": "hi"}]}], '
        b'"metadata": {"user_id": "u-1"}, '
        b'"future_field_xyz": {"a": [1, 2.50]}}')


SMALL_MESSAGES = {"model": "claude-sonnet-4", "max_tokens": 10,
                  "messages": [{"role": "user", "content": "hi"}]}
SMALL_CHAT = dict(CHAT, max_tokens=10)


class TwoFakeTest(GatewayTest):
    """A second fake provider, so two providers can be told apart."""

    @classmethod
    def setUpClass(cls):
        cls.fake = FakeProvider()
        cls.fake2 = FakeProvider()

    @classmethod
    def tearDownClass(cls):
        cls.fake.close()
        cls.fake2.close()

    def setUp(self):
        self.fake2.reset()
        GatewayTest.setUp(self)

    def assert_routed(self, fake, path, body, sent, header, upstream_key,
                      **kw):
        """POST `body` to `path`: `fake` gets it as `sent`, with the
        provider key `upstream_key` in `header`."""
        reply = call(self.port, "POST", path, body, **kw)
        self.assertEqual(reply.status, 200, reply.body)
        rec = fake.last()
        self.assertEqual(rec.path, sent)
        self.assert_upstream_key(rec, header, upstream_key)


# Routing #####################################################################

class PathRoutingTest(TwoFakeTest):
    """openai on fake, anthropic on fake2, a keyless /local with a base
    path on fake."""

    def providers(self):
        return {"openai": {"url": self.fake.url, "apiKey": OPENAI_KEY},
                "anthropic": {"type": "anthropic", "url": self.fake2.url,
                              "apiKey": ANTHROPIC_KEY},
                "local": {"type": "openai", "url": self.fake.url + "/api/",
                          "prefix": "/local"}}

    def assert_routed(self, cases, fake, header, key):
        """Each (method, path, body) gets a 200 from `fake`, which saw
        it as sent, with its provider key in `header` only."""
        for method, path, body in cases:
            reply = call(self.port, method, path, body)
            self.assertEqual(reply.status, 200, path)
            rec = fake.last()
            self.assertEqual((rec.method, rec.path), (method, path))
            self.assert_upstream_key(rec, header, key)

    def test_messages_and_below_go_to_the_anthropic_provider(self):
        self.assert_routed((
            ("POST", "/v1/messages", MESSAGES),
            ("POST", "/v1/messages/count_tokens", MESSAGES),
            ("GET", "/v1/messages/batches/b1?x=1", None)),
            self.fake2, "x-api-key", ANTHROPIC_KEY)
        self.assertEqual(self.fake2.count(), 3)
        self.assertEqual(self.fake.count(), 0)

    def test_other_v1_paths_go_to_the_openai_provider(self):
        self.assert_routed((
            ("POST", "/v1/chat/completions", CHAT),
            ("POST", "/v1/responses", {"model": "gpt-4o", "input": "hi"}),
            ("POST", "/v1/embeddings", {"model": "e", "input": "x"}),
            ("GET", "/v1/models", None),
            ("GET", "/v1/messagesx", None),
            ("GET", "/v1", None)),
            self.fake, "authorization", "Bearer " + OPENAI_KEY)
        self.assertEqual(self.fake.count(), 6)
        self.assertEqual(self.fake2.count(), 0)
        self.assertEqual(self.usage(), CHAT_TOTAL + RESPONSES_TOTAL + 5)

    def test_prefix_is_stripped_base_path_prepended_query_kept(self):
        reply = call(self.port, "POST",
                     "/local/v1/chat/completions?a=1&b=%2F", CHAT)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["usage"], CHAT_USAGE)
        rec = self.fake.last()
        self.assertEqual(rec.path, "/api/v1/chat/completions?a=1&b=%2F")
        self.assertEqual(rec.body, json.dumps(CHAT).encode())
        self.assertEqual([k for k in rec.names() if k in (
            "authorization", "x-api-key", "api-key")], [])
        self.assertEqual(self.usage(), CHAT_TOTAL)
        reply = call(self.port, "GET", "/local")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json(), {"echo": {"method": "GET",
                                                 "path": "/api/"}})
        self.assertEqual(self.fake2.count(), 0)

    def test_prefix_needs_a_whole_segment(self):
        reply = call(self.port, "GET", "/localhost/v1/models")
        self.assert_openai_error(reply, 404, "invalid_request_error",
                                 "not_found")
        self.assertEqual(self.fake.count() + self.fake2.count(), 0)

    def test_base_path_of_an_unprefixed_provider(self):
        doc = self.config()
        doc["providers"]["openai"]["url"] = self.fake.url + "/proxy/openai"
        doc["providers"]["anthropic"]["url"] = self.fake2.url + "/ant"
        self.restart(doc)
        reply = call(self.port, "POST", "/v1/chat/completions?q=1", CHAT)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.fake.last().path,
                         "/proxy/openai/v1/chat/completions?q=1")
        reply = call(self.port, "POST", "/v1/messages?beta=true", MESSAGES)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.fake2.last().path,
                         "/ant/v1/messages?beta=true")
        self.assertEqual(self.usage(), CHAT_TOTAL + ANTHROPIC_TOTAL)

    def test_unrouted_paths_get_404_without_forwarding(self):
        for path in ("/v2/chat/completions", "/openai/v1/chat/completions",
                     "/openai/deployments/d/chat/completions"):
            reply = call(self.port, "POST", path, CHAT)
            self.assert_openai_error(reply, 404, "invalid_request_error",
                                     "not_found")
        self.assertEqual(self.fake.count() + self.fake2.count(), 0)
        self.assertEqual(self.usage(), 0)

    def test_messages_without_an_anthropic_provider_404s(self):
        doc = self.config()
        del doc["providers"]["anthropic"]
        self.restart(doc)
        reply = call(self.port, "POST", "/v1/messages", MESSAGES)
        self.assert_anthropic_error(reply, 404, "not_found_error")
        self.assertEqual(self.fake.count() + self.fake2.count(), 0)
        self.assertEqual(self.usage(), 0)


class ModelRoutingTest(TwoFakeTest):
    """Model lists: exact beats pattern, then config order, then the
    path rule.  Providers are told apart by base path and key."""

    def providers(self):
        f, f2 = self.fake.url, self.fake2.url
        return {
            "openai": {"url": f, "apiKey": OPENAI_KEY},
            "anthropic": {"type": "anthropic", "url": f2,
                          "apiKey": ANTHROPIC_KEY},
            "groq": {"url": f + "/groq", "apiKey": GROQ_KEY,
                     "prefix": "/groq", "models": ["llama-*",
                                                   "mixtral-8x7b"]},
            "router": {"url": f + "/router", "prefix": "/router",
                       "models": ["*-instruct", "llama-3-70b"]},
            "second": {"url": f + "/second", "prefix": "/second",
                       "models": ["llama-*", "qwen-*"]},
            "alt": {"type": "anthropic", "url": f2 + "/alt",
                    "apiKey": ALT_KEY, "prefix": "/alt",
                    "models": ["claude-opus-*"]},
            "az": {"type": "azure", "url": f + "/az", "apiKey": AZURE_KEY,
                   "prefix": "/azure", "models": ["azure-gpt-4o"]}}

    def chat(self, model, path="/v1/chat/completions"):
        reply = call(self.port, "POST", path, dict(CHAT, model=model))
        self.assertEqual(reply.status, 200, reply.body)
        return self.fake.last()

    def test_exact_name_routes(self):
        rec = self.chat("mixtral-8x7b")
        self.assertEqual(rec.path, "/groq/v1/chat/completions")
        self.assert_upstream_key(rec, "authorization", "Bearer " + GROQ_KEY)
        self.assertEqual(rec.json()["model"], "mixtral-8x7b")

    def test_pattern_routes_and_config_order_breaks_ties(self):
        # groq and second both match llama-*: groq comes first
        rec = self.chat("llama-3-8b")
        self.assertEqual(rec.path, "/groq/v1/chat/completions")
        self.assert_upstream_key(rec, "authorization", "Bearer " + GROQ_KEY)
        rec = self.chat("qwen-2")
        self.assertEqual(rec.path, "/second/v1/chat/completions")
        rec = self.chat("mistral-7b-instruct")
        self.assertEqual(rec.path, "/router/v1/chat/completions")

    def test_exact_beats_pattern_whatever_the_order(self):
        # groq (earlier) matches by pattern, router (later) exactly
        rec = self.chat("llama-3-70b")
        self.assertEqual(rec.path, "/router/v1/chat/completions")
        self.assertEqual([k for k in rec.names() if k in (
            "authorization", "x-api-key", "api-key")], [])

    def test_no_match_falls_back_to_the_path_rule(self):
        rec = self.chat("gpt-4o")
        self.assertEqual(rec.path, "/v1/chat/completions")
        self.assert_upstream_key(rec, "authorization",
                                 "Bearer " + OPENAI_KEY)
        reply = call(self.port, "GET", "/v1/models")
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.fake.last().path, "/v1/models")
        self.assertEqual(self.fake.count(), 2)
        self.assertEqual(self.fake2.count(), 0)

    def test_a_prefix_beats_the_model(self):
        rec = self.chat("mixtral-8x7b", "/second/v1/chat/completions")
        self.assertEqual(rec.path, "/second/v1/chat/completions")
        self.assertEqual(self.fake.count(), 1)

    def test_messages_route_on_model_among_anthropic_providers(self):
        for model, path, sent, key in (
                ("claude-opus-4-1", "/v1/messages?beta=true",
                 "/alt/v1/messages?beta=true", ALT_KEY),
                # an OpenAI-type provider's model list never takes
                # /v1/messages
                ("llama-3-8b", "/v1/messages", "/v1/messages",
                 ANTHROPIC_KEY)):
            self.assert_routed(self.fake2, path, dict(MESSAGES, model=model),
                               sent, "x-api-key", key)
        self.assertEqual(self.fake.count(), 0)
        self.assertEqual(self.usage(), 2 * ANTHROPIC_TOTAL)

    def test_model_routed_azure_gets_its_v1_path(self):
        rec = self.chat("azure-gpt-4o")
        self.assertEqual(rec.path, "/az/openai/v1/chat/completions")
        self.assert_upstream_key(rec, "api-key", AZURE_KEY)
        self.assertEqual(self.usage(), CHAT_TOTAL)


class CheckAndConfigTest(GatewayTest):
    """--check and the config errors of issue 3."""

    def run_check(self, doc):
        return run_script(["--config", self.write_config(doc), "--check"])

    def assert_check_refuses(self, doc, field, named):
        """--check exits 2 on `doc`, naming `field` first, then `named`."""
        done = self.run_check(doc)
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stdout, "")
        self.assertTrue(done.stderr.startswith(
            "llmgate: config error: %s " % field), done.stderr)
        self.assertIn(named, done.stderr)

    def parse(self, providers):
        doc = {"providers": providers, "users": self.users()}
        return llmgate.parse_config(doc, self.dir, {})

    def assert_config_error(self, providers, field):
        with self.assertRaises(llmgate.ConfigError) as cm:
            self.parse(providers)
        message = str(cm.exception)
        self.assertTrue(message.startswith(field + " "), message)
        return message

    def test_check_prints_the_routing_table(self):
        doc = self.config()
        doc["providers"] = {
            "openai": {"url": "https://api.openai.com", "apiKey": "k1"},
            "anthropic": {"type": "anthropic",
                          "url": "https://api.anthropic.com",
                          "apiKey": "k2"},
            "azure": {"type": "azure", "url": "https://acme.openai.azure.com",
                      "apiKey": "k3", "prefix": "/azure"},
            "local": {"type": "openai", "url": "http://127.0.0.1:8000",
                      "prefix": "/local"},
            "groq": {"url": "https://api.groq.com/openai", "apiKey": "k4",
                     "prefix": "/groq", "models": ["llama-*", "mixtral"]}}
        done = self.run_check(doc)
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[:2], ["config OK: 5 providers, 2 users",
                                     "routes:"])
        routes = [line for line in lines[2:] if line.startswith("  ")]
        self.assertEqual(sorted(routes), sorted([
            "  /azure/...  ->  azure (azure, https://acme.openai.azure.com)",
            "  /local/...  ->  local (openai, http://127.0.0.1:8000)",
            "  /groq/...  ->  groq (openai, https://api.groq.com/openai)",
            "  /v1/messages...  ->  anthropic (anthropic, "
            "https://api.anthropic.com)",
            "  /v1/...  ->  openai (openai, https://api.openai.com)",
            "  model llama-*, mixtral  ->  groq (openai, "
            "https://api.groq.com/openai)"]))
        # /v1/messages is listed before the /v1/... catch-all
        self.assertLess(routes.index(
            "  /v1/messages...  ->  anthropic (anthropic, "
            "https://api.anthropic.com)"), routes.index(
            "  /v1/...  ->  openai (openai, https://api.openai.com)"))
        self.assertNotIn("k1", done.stdout + done.stderr)

    def test_check_lists_an_unprefixed_azure(self):
        doc = self.config()
        doc["providers"] = {"azure": {
            "type": "azure", "url": "https://acme.openai.azure.com",
            "apiKey": "k3"}}
        done = self.run_check(doc)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("  /openai/...  ->  azure (azure, "
                      "https://acme.openai.azure.com)\n", done.stdout)

    def test_check_exits_2_on_an_unknown_type(self):
        doc = self.config()
        doc["providers"]["bedrock"] = {"type": "bedrock",
                                       "url": "https://x.example"}
        self.assert_check_refuses(doc, "providers.bedrock.type", "bedrock")

    def test_check_exits_2_on_a_prefix_collision(self):
        doc = self.config()
        doc["providers"]["a"] = {"url": self.fake.url, "prefix": "/team"}
        doc["providers"]["b"] = {"url": self.fake.url, "prefix": "/team"}
        self.assert_check_refuses(doc, "providers.b.prefix", "providers.a")

    def test_unknown_type_is_a_config_error(self):
        for kind in ("bedrock", "OpenAI", "", 3, None):
            message = self.assert_config_error(
                {"x": {"type": kind, "url": "https://x.example"}},
                "providers.x.type")
            self.assertIn("must be one of openai, anthropic, azure", message)
            if kind:   # a value is never echoed: it could be a secret
                self.assertNotIn(str(kind), message)

    def test_known_types_are_accepted(self):
        config = self.parse({
            "o": {"url": "https://o.example"},
            "a": {"type": "anthropic", "url": "https://a.example"},
            "z": {"type": "azure", "url": "https://z.example"},
            "l": {"type": "openai", "url": "http://127.0.0.1:8000",
                  "prefix": "/local"}})
        self.assertEqual([(p.name, p.type) for p in config.providers],
                         [("o", "openai"), ("a", "anthropic"),
                          ("z", "azure"), ("l", "openai")])

    def test_same_prefix_twice(self):
        message = self.assert_config_error({
            "a": {"url": "https://a.example", "prefix": "/team"},
            "b": {"url": "https://b.example", "prefix": "/team"}},
            "providers.b.prefix")
        self.assertIn("providers.a", message)

    def test_nested_prefixes(self):
        for first, second in (("/team", "/team/eu"), ("/team/eu", "/team")):
            message = self.assert_config_error({
                "a": {"url": "https://a.example", "prefix": first},
                "b": {"url": "https://b.example", "prefix": second}},
                "providers.b.prefix")
            self.assertIn("providers.a", message)

    def test_sibling_prefixes_are_fine(self):
        config = self.parse({
            "a": {"url": "https://a.example", "prefix": "/team"},
            "b": {"url": "https://b.example", "prefix": "/teamb"},
            "c": {"url": "https://c.example", "prefix": "/v1beta"}})
        self.assertEqual(sorted(p.prefix for p in config.prefixed),
                         ["/team", "/teamb", "/v1beta"])

    def test_prefixes_llmgate_serves_itself(self):
        for prefix in ("/v1", "/v1/messages", "/llmgate", "/llmgate/usage",
                       "/openai"):
            self.assert_config_error(
                {"p": {"url": "https://p.example", "prefix": prefix}},
                "providers.p.prefix")

    def test_two_unprefixed_providers_of_one_type(self):
        cases = (
            ({"a": {"url": "https://a.example"},
              "b": {"type": "openai", "url": "https://b.example"}}),
            ({"a": {"type": "anthropic", "url": "https://a.example"},
              "b": {"type": "anthropic", "url": "https://b.example"}}),
            ({"a": {"type": "azure", "url": "https://a.example"},
              "b": {"type": "azure", "url": "https://b.example"}}))
        for providers in cases:
            message = self.assert_config_error(providers, "providers.b")
            self.assertIn("providers.a", message)


# Anthropic ###################################################################

class AnthropicTest(GatewayTest):

    def messages(self, body=None, path="/v1/messages", headers=None,
                 key=ALICE_KEY):
        return call(self.port, "POST", path,
                    MESSAGES if body is None else body,
                    headers=headers, key=key)

    def test_internal_key_from_x_api_key(self):
        reply = self.messages(key=None, headers={"x-api-key": ALICE_KEY})
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.json()["content"],
                         [{"type": "text", "text": "Hello!"}])
        rec = self.fake.last()
        self.assert_upstream_key(rec, "x-api-key", PROVIDER_KEY)
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)

    def test_internal_key_from_authorization_bearer(self):
        reply = self.messages(headers={"anthropic-version": "2026-10-21"})
        self.assertEqual(reply.status, 200, reply.body)
        rec = self.fake.last()
        self.assert_upstream_key(rec, "x-api-key", PROVIDER_KEY)
        self.assertEqual(rec.values("anthropic-version"), ["2026-10-21"])
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)

    def test_claude_code_headers_pass_untouched(self):
        headers = dict(CLAUDE_HEADERS, **{"x-api-key": ALICE_KEY})
        reply = call(self.port, "POST", "/v1/messages?beta=true",
                     claude_body(False), headers=headers, key=None)
        self.assertEqual(reply.status, 200, reply.body)
        rec = self.fake.last()
        self.assertEqual(rec.path, "/v1/messages?beta=true")
        for name in ("anthropic-beta", "x-app", "X-Claude-Code-Session-Id",
                     "User-Agent", "Content-Type"):
            self.assertIn((name, CLAUDE_HEADERS[name]), rec.headers)
            self.assertEqual(len(rec.values(name)), 1, name)
        self.assertEqual(rec.values("anthropic-version"), ["2023-06-01"])
        self.assert_upstream_key(rec, "x-api-key", PROVIDER_KEY)
        self.assertEqual(rec.values("accept-encoding"), ["identity"])
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)

    def test_anthropic_version_supplied_when_absent(self):
        reply = self.messages()
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.fake.last().values("anthropic-version"),
                         ["2023-06-01"])

    def test_body_passes_byte_for_byte(self):
        body = claude_body(False)
        reply = call(self.port, "POST", "/v1/messages", body,
                     headers=CLAUDE_HEADERS)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(self.fake.last().body, body)
        self.assertEqual(self.fake.last().values("content-length"),
                         [str(len(body))])

    def test_count_tokens_works_and_is_not_charged(self):
        reply = call(self.port, "POST",
                     "/v1/messages/count_tokens?beta=true",
                     claude_body(False), headers=CLAUDE_HEADERS)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.json(), {"input_tokens": 42})
        rec = self.fake.last()
        self.assertEqual(rec.path, "/v1/messages/count_tokens?beta=true")
        self.assertEqual(rec.body, claude_body(False))
        self.assertEqual(self.usage(), 0)
        self.assertEqual(reply.headers["x-llmgate-tokens-remaining"],
                         "100000")

    def test_count_tokens_needs_no_output_reserve(self):
        self.restart_with_quota(5)
        reply = call(self.port, "POST", "/v1/messages/count_tokens",
                     claude_body(False), headers=CLAUDE_HEADERS)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(self.usage(), 0)

    def test_non_streamed_billing_counts_cache_tokens(self):
        reply = self.messages()
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["usage"], dict(
            ANTHROPIC_START_USAGE, output_tokens=ANTHROPIC_OUTPUT))
        self.assertEqual(self.usage(), 30 + 100 + 200 + 12)
        self.assertEqual(reply.headers["x-llmgate-tokens-remaining"],
                         str(100000 - ANTHROPIC_TOTAL))

    def test_streamed_billing_and_events(self):
        reply = call(self.port, "POST", "/v1/messages?beta=true",
                     claude_body(True), headers=CLAUDE_HEADERS)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.headers["content-type"], "text/event-stream")
        self.assertEqual(reply.headers["transfer-encoding"], "chunked")
        events = reply.events()
        self.assertEqual([n for n, _ in events], ANTHROPIC_EVENTS)
        for name, data in events:
            self.assertEqual(json.loads(data)["type"], name)
        self.assertEqual(self.fake.last().body, claude_body(True))
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)

    def test_streamed_output_tokens_are_a_running_total(self):
        self.fake.mode = {"output_totals": [5, 9, 12]}
        reply = call(self.port, "POST", "/v1/messages",
                     dict(MESSAGES, stream=True))
        self.assertEqual(reply.status, 200)
        deltas = [json.loads(d)["usage"]["output_tokens"]
                  for n, d in reply.events() if n == "message_delta"]
        self.assertEqual(deltas, [5, 9, 12])
        self.assertEqual(self.usage(), ANTHROPIC_INPUT + 12)

    def test_streamed_message_delta_with_cumulative_input(self):
        # newer API versions repeat the cumulative input figures in
        # message_delta: they replace, never add
        usage = dict(ANTHROPIC_START_USAGE,
                     output_tokens=ANTHROPIC_OUTPUT)
        self.fake.mode = {"delta_usages": [usage]}
        reply = call(self.port, "POST", "/v1/messages",
                     dict(MESSAGES, stream=True))
        self.assertEqual(reply.names(), ANTHROPIC_EVENTS)
        delta = [json.loads(d) for n, d in reply.events()
                 if n == "message_delta"]
        self.assertEqual([d["usage"] for d in delta], [usage])
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)

    def test_error_event_ends_the_stream_and_bills_what_was_reported(self):
        self.fake.mode = {"error_after": 4}
        reply = call(self.port, "POST", "/v1/messages?beta=true",
                     claude_body(True), headers=CLAUDE_HEADERS)
        self.assertEqual(reply.status, 200)
        events = reply.events()
        self.assertEqual([n for n, _ in events], ANTHROPIC_EVENTS[:4] +
                         ["error"])
        self.assertEqual(json.loads(events[-1][1]), {
            "type": "error", "error": {"type": "overloaded_error",
                                       "message": "Overloaded"}})
        # outcome "error": the reported usage only, i.e. message_start's
        # input, both caches and its output_tokens of 1
        self.assertEqual(self.usage(), ANTHROPIC_INPUT + 1)
        self.assertEqual(self.usage("bob"), 0)

    def test_text_before_an_error_event_is_billed_at_its_estimate(self):
        # message_start reports an output of 1 whatever follows: text
        # streamed before the error counts at least at its estimate
        self.fake.mode = {"error_after": 4, "texts": ["y" * 4000]}
        reply = call(self.port, "POST", "/v1/messages",
                     dict(MESSAGES, stream=True))
        self.assertEqual(reply.names(), ANTHROPIC_EVENTS[:4] + ["error"])
        self.assertEqual(self.usage(), ANTHROPIC_INPUT + 1000)
        self.assertTrue(self.wait_log_lines(1)[0].endswith(" aborted"))

    def test_error_event_ends_the_stream_within_one_read(self):
        # a provider may put several events in one chunk: nothing after
        # the error event is forwarded or billed
        self.fake.mode = {"error_after": 4, "one_chunk": True}
        reply = call(self.port, "POST", "/v1/messages",
                     dict(MESSAGES, stream=True))
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.names(), ANTHROPIC_EVENTS[:4] +
                         ["error"])
        self.assertEqual(self.usage(), ANTHROPIC_INPUT + 1)

    def test_claude_code_fallback_to_a_plain_request(self):
        headers = dict(CLAUDE_HEADERS, **{"x-api-key": ALICE_KEY})
        conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                          timeout=TIMEOUT)
        self.addCleanup(conn.close)
        first = call(self.port, "POST", "/v1/messages?beta=true",
                     claude_body(True), headers=headers, key=None,
                     conn=conn)
        self.assertEqual(first.status, 200)
        self.assertEqual(first.names(), ANTHROPIC_EVENTS)
        second = call(self.port, "POST", "/v1/messages?beta=true",
                      claude_body(False), headers=headers, key=None,
                      conn=conn)
        self.assertEqual(second.status, 200)
        self.assertEqual(second.headers["content-type"], "application/json")
        doc = second.json()
        self.assertEqual((doc["type"], doc["role"], doc["content"]),
                         ("message", "assistant",
                          [{"type": "text", "text": "Hello!"}]))
        self.assertEqual(self.fake.last().body, claude_body(False))
        self.assertEqual(self.fake.count(), 2)
        self.assertEqual(self.usage(), 2 * ANTHROPIC_TOTAL)

    def test_bad_keys_get_anthropic_authentication_errors(self):
        for key, headers in ((None, None),
                             (None, {"x-api-key": "not-a-known-key-123"}),
                             ("not-a-known-key-123", None)):
            reply = self.messages(key=key, headers=headers)
            self.assert_anthropic_error(reply, 401, "authentication_error")
            reply = call(self.port, "POST", "/v1/messages/count_tokens",
                         MESSAGES, key=key, headers=headers)
            self.assert_anthropic_error(reply, 401, "authentication_error")
        self.assertEqual(self.fake.count(), 0)
        self.assertNotIn("not-a-known-key-123", self.logs.text())

    def test_exhausted_quota_gets_rate_limit_error_with_retry_after(self):
        self.restart_with_quota(300)
        reply = self.messages(SMALL_MESSAGES,
                              headers={"anthropic-version": "2023-06-01"})
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)
        for path in ("/v1/messages?beta=true", "/v1/messages"):
            reply = self.messages(SMALL_MESSAGES, path=path)
            self.assert_anthropic_error(reply, 429, "rate_limit_error")
            self.assertEqual(reply.headers["retry-after"], RESET_IN)
        self.assertEqual(self.fake.count(), 1)
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)

    def test_too_large_a_request_gets_rate_limit_error(self):
        self.restart_with_quota(500)
        reply = self.messages()     # max_tokens 1000 > 500
        self.assert_anthropic_error(reply, 429, "rate_limit_error")
        self.assertEqual(reply.headers["retry-after"], RESET_IN)
        self.assertEqual(self.fake.count(), 0)

    def test_bad_json_gets_invalid_request_error(self):
        reply = call(self.port, "POST", "/v1/messages", b'{"model": ',
                     headers={"Content-Type": "application/json"})
        self.assert_anthropic_error(reply, 400, "invalid_request_error")
        self.assertEqual(self.fake.count(), 0)
        self.assertEqual(self.usage(), 0)

    def test_provider_errors_pass_through_uncharged(self):
        doc = {"type": "error", "error": {"type": "overloaded_error",
                                          "message": "Overloaded"}}
        self.fake.mode = {"status": (529, doc)}
        reply = self.messages()
        self.assertEqual(reply.status, 529)
        self.assertEqual(reply.json(), doc)
        self.assertEqual(self.usage(), 0)

    def test_prefixed_anthropic_provider(self):
        doc = self.config()
        doc["providers"] = {"claude": {
            "type": "anthropic", "url": self.fake.url + "/base",
            "apiKey": ANTHROPIC_KEY, "prefix": "/claude"}}
        self.restart(doc)
        reply = self.messages(path="/claude/v1/messages?beta=true",
                              key=None, headers={"x-api-key": ALICE_KEY})
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        self.assertEqual(rec.path, "/base/v1/messages?beta=true")
        self.assert_upstream_key(rec, "x-api-key", ANTHROPIC_KEY)
        self.assertEqual(rec.values("anthropic-version"), ["2023-06-01"])
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)
        reply = self.messages(path="/claude/v1/messages", key="wrong-key-1")
        self.assert_anthropic_error(reply, 401, "authentication_error")
        self.assertEqual(self.fake.count(), 1)

    def test_prefixed_anthropic_route_refused_while_shutting_down(self):
        doc = self.config()
        doc["providers"]["claude"] = {
            "type": "anthropic", "url": self.fake.url,
            "apiKey": ANTHROPIC_KEY, "prefix": "/claude"}
        self.restart(doc)
        self.gateway.draining = True
        for path in ("/v1/messages", "/claude/v1/messages"):
            reply = self.messages(path=path)
            self.assert_anthropic_error(reply, 503, "overloaded_error")
        self.assertEqual(self.fake.count(), 0)

    def test_refusals_of_a_malformed_head_have_anthropic_shape(self):
        # refused while the head is parsed, before any routing: the shape
        # still follows the path of the request line
        many = [("X-H%d" % i, "v") for i in range(llmgate.MAX_HEADER_COUNT)]
        cases = [
            (request("POST", "/v1/messages", many), 431),
            (request("POST", "/v1/messages", [
                ("X-Big", "v" * llmgate.MAX_HEADER_BYTES)]), 431),
            (b"POST /v1/messages HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
            (request("POST", "/v1/messages", [
                ("x-api-key", "a" * 20), ("x-api-key", "b" * 20)]), 400),
            (b"POST /v1/messages HTTP/2.0\r\nHost: gw\r\n\r\n", 505),
            (request("POST", "/v1/messages?" + "q" * (
                llmgate.MAX_REQUEST_LINE_BYTES + 10)), 414),
            (request("POST", "http://gw/v1/messages"), 400),
            (request("POST", "/v1/messages#frag"), 400)]
        for data, status in cases:
            with self.subTest(data=data[:60], status=status):
                raw, closed = raw_exchange(self.port, data)
                self.assertTrue(closed)
                self.assertEqual(status_of(raw), status, raw[:200])
                doc = json.loads(body_of(raw))
                self.assertEqual(doc["type"], "error")
                self.assertEqual(sorted(doc["error"]), ["message", "type"])
                self.assertEqual(doc["error"]["type"], {
                    431: "invalid_request_error",
                    400: "invalid_request_error",
                    505: "invalid_request_error",
                    414: "invalid_request_error"}[status])
        # the same heads on an OpenAI path keep OpenAI's shape
        raw, _ = raw_exchange(self.port, request(
            "POST", "/v1/chat/completions", many))
        self.assert_error(json.loads(body_of(raw)), "headers_too_large",
                          "invalid_request_error")
        self.assertEqual(self.fake.count(), 0)

    def test_dribbled_head_on_an_anthropic_route_gets_anthropic_408(self):
        with mock.patch.object(llmgate, "HEADER_TIMEOUT_S", 0.3):
            with socket.create_connection(("127.0.0.1", self.port),
                                          timeout=TIMEOUT) as s:
                s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\n")
                raw, closed = receive(s)
        self.assertTrue(closed)
        self.assertEqual(status_of(bytes(raw)), 408)
        self.assertEqual(json.loads(body_of(bytes(raw)))["type"], "error")

    def test_probe_head_and_get_root_need_no_auth(self):
        for method in ("HEAD", "GET"):
            reply = call(self.port, method, "/", key=None)
            self.assertEqual(reply.status, 200, method)
        reply = call(self.port, "GET", "/", key=None)
        self.assertEqual(reply.json(), {"status": "ok"})
        reply = call(self.port, "HEAD", "/", key="not-a-known-key")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, b"")
        self.assertEqual(self.fake.count(), 0)


# Azure #######################################################################

AZURE_DEPLOYMENT = ("/openai/deployments/gpt-4o-prod/chat/completions"
                    "?api-version=2024-10-21")


class AzureTest(GatewayTest):

    def providers(self):
        return {"openai": {"url": self.fake.url, "apiKey": OPENAI_KEY},
                "azure": {"type": "azure", "url": self.fake.url,
                          "apiKey": PROVIDER_KEY, "prefix": "/azure"}}

    def azure(self, path, body=None, key=ALICE_KEY):
        return call(self.port, "POST", path,
                    CHAT if body is None else body, key=None,
                    headers={"api-key": key})

    def test_deployment_path_with_api_version(self):
        reply = self.azure("/azure" + AZURE_DEPLOYMENT)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.json()["usage"], CHAT_USAGE)
        rec = self.fake.last()
        self.assertEqual(rec.path, AZURE_DEPLOYMENT)
        self.assertEqual(rec.body, json.dumps(CHAT).encode())
        self.assert_upstream_key(rec, "api-key", PROVIDER_KEY)
        self.assertEqual(rec.values("anthropic-version"), [])
        self.assertEqual(self.usage(), CHAT_TOTAL)

    def test_deployment_names_the_model_when_the_body_does_not(self):
        doc = self.config()
        doc["users"][0]["models"] = ["gpt-4o*"]
        doc["users"][1]["models"] = ["claude-*"]
        self.restart(doc)
        body = {"messages": [{"role": "user", "content": "hi"}]}
        reply = self.azure("/azure" + AZURE_DEPLOYMENT, body)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertIn("model=gpt-4o-prod ", self.wait_log_lines(1)[0])
        reply = self.azure("/azure" + AZURE_DEPLOYMENT, body, key=BOB_KEY)
        self.assertEqual(reply.status, 403)
        self.assertEqual(reply.json()["error"]["code"], "model_not_allowed")
        self.assertEqual(self.fake.count(), 1)

    def test_v1_path(self):
        reply = self.azure("/azure/openai/v1/chat/completions?x=1")
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        self.assertEqual(rec.path, "/openai/v1/chat/completions?x=1")
        self.assert_upstream_key(rec, "api-key", PROVIDER_KEY)
        self.assertEqual(self.usage(), CHAT_TOTAL)

    def test_streamed_chat_is_billed_like_openai(self):
        reply = self.azure("/azure" + AZURE_DEPLOYMENT,
                           dict(CHAT, stream=True))
        self.assert_chat_stream(reply)
        self.assertEqual(self.fake.last().json()["stream_options"],
                         {"include_usage": True})
        self.assertEqual(self.usage(), CHAT_TOTAL)

    def test_responses_through_azure_v1(self):
        body = {"model": "gpt-4o", "input": "hi", "stream": True}
        reply = self.azure("/azure/openai/v1/responses?api-version=preview",
                           body)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.names()[-1], "response.completed")
        self.assertEqual(self.fake.last().path,
                         "/openai/v1/responses?api-version=preview")
        self.assertEqual(self.usage(), RESPONSES_TOTAL)

    def test_bad_api_key_gets_openai_shaped_401(self):
        reply = self.azure("/azure" + AZURE_DEPLOYMENT, key="nope-nope-nope")
        self.assert_openai_error(reply, 401, "authentication_error",
                                 "invalid_api_key")
        self.assertEqual(self.fake.count(), 0)

    def test_v1_still_goes_to_openai(self):
        reply = call(self.port, "POST", "/v1/chat/completions", CHAT)
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        self.assertEqual(rec.path, "/v1/chat/completions")
        self.assert_upstream_key(rec, "authorization",
                                 "Bearer " + OPENAI_KEY)


class UnprefixedAzureTest(TwoFakeTest):
    """Azure without a prefix owns /openai/...; /v1 stays OpenAI's."""

    def providers(self):
        return {"openai": {"url": self.fake2.url, "apiKey": OPENAI_KEY},
                "azure": {"type": "azure", "url": self.fake.url,
                          "apiKey": PROVIDER_KEY}}

    def test_openai_paths_go_to_azure(self):
        for path in (AZURE_DEPLOYMENT,
                     "/openai/v1/chat/completions?api-version=preview"):
            self.assert_routed(self.fake, path, CHAT, path, "api-key",
                               PROVIDER_KEY, key=None,
                               headers={"api-key": ALICE_KEY})
        self.assertEqual(self.fake2.count(), 0)
        self.assertEqual(self.usage(), 2 * CHAT_TOTAL)

    def test_v1_goes_to_openai(self):
        reply = call(self.port, "POST", "/v1/chat/completions",
                     CHAT, key=None, headers={"api-key": ALICE_KEY})
        self.assertEqual(reply.status, 200)
        rec = self.fake2.last()
        self.assertEqual(rec.path, "/v1/chat/completions")
        self.assert_upstream_key(rec, "authorization",
                                 "Bearer " + OPENAI_KEY)
        self.assertEqual(self.fake.count(), 0)


# Every provider ##############################################################

class EveryProviderTest(GatewayTest):

    def providers(self):
        doc = GatewayTest.providers(self)
        doc["local"] = {"type": "openai", "url": self.fake.url,
                        "prefix": "/local"}
        doc["localclaude"] = {"type": "anthropic", "url": self.fake.url,
                              "prefix": "/lc"}
        return doc

    def test_provider_without_api_key_gets_no_auth_header(self):
        reply = call(self.port, "POST", "/local/v1/chat/completions",
                     CHAT, headers={"api-key": ALICE_KEY,
                                    "x-api-key": ALICE_KEY})
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        self.assertEqual(rec.path, "/v1/chat/completions")
        for name in ("authorization", "x-api-key", "api-key"):
            self.assertNotIn(name, rec.names())
        self.assertNotIn(ALICE_KEY, json.dumps(rec.headers))
        self.assertEqual(self.usage(), CHAT_TOTAL)

    def test_anthropic_provider_without_api_key(self):
        reply = call(self.port, "POST", "/lc/v1/messages",
                     MESSAGES, key=None,
                     headers={"x-api-key": ALICE_KEY})
        self.assertEqual(reply.status, 200)
        rec = self.fake.last()
        for name in ("authorization", "x-api-key", "api-key"):
            self.assertNotIn(name, rec.names())
        self.assertEqual(rec.values("anthropic-version"), ["2023-06-01"])
        self.assertEqual(self.usage(), ANTHROPIC_TOTAL)

    def test_openai_then_anthropic_share_one_budget(self):
        self.restart_with_quota(350)
        reply = call(self.port, "POST", "/v1/chat/completions", SMALL_CHAT)
        self.assertEqual(reply.status, 200)
        reply = call(self.port, "POST", "/v1/messages", SMALL_MESSAGES,
                     key=None, headers={"x-api-key": ALICE_KEY})
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.usage(), CHAT_TOTAL + ANTHROPIC_TOTAL)
        self.assertEqual(reply.headers["x-llmgate-tokens-remaining"], "0")
        # spent through Anthropic: OpenAI and the keyless route refuse too
        for path in ("/v1/chat/completions", "/local/v1/chat/completions"):
            reply = call(self.port, "POST", path, SMALL_CHAT)
            self.assert_openai_error(reply, 429, "insufficient_quota",
                                     "quota_exceeded")
            self.assertEqual(reply.headers["retry-after"], RESET_IN)
        self.assertEqual(self.fake.count(), 2)
        self.assertEqual(self.usage("bob"), 0)

    def test_spent_through_openai_blocks_anthropic(self):
        self.restart_with_quota(15)
        reply = call(self.port, "POST", "/v1/chat/completions", SMALL_CHAT)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.usage(), CHAT_TOTAL)
        reply = call(self.port, "POST", "/v1/messages", SMALL_MESSAGES)
        self.assert_anthropic_error(reply, 429, "rate_limit_error")
        self.assertEqual(reply.headers["retry-after"], RESET_IN)
        self.assertEqual(self.fake.count(), 1)
        # bob's budget is his own
        reply = call(self.port, "POST", "/v1/messages", SMALL_MESSAGES,
                     key=BOB_KEY)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.usage("bob"), ANTHROPIC_TOTAL)


# Websockets and client traffic shapes ########################################

CODEX_HEADERS = {
    "Accept": "text/event-stream",
    "Accept-Encoding": "zstd,gzip",
    "Content-Type": "application/json",
    "originator": "codex_exec",
    "session-id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "thread-id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c",
    "x-client-request-id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5d",
    "x-codex-turn-metadata": '{"turn":1}',
    "User-Agent": "codex_exec/0.171.0 (Linux; x86_64)",
}
CODEX_BODY = {"model": "gpt-5-codex", "stream": True, "store": False,
              "instructions": "You are Codex.",
              "input": [{"type": "message", "role": "developer",
                         "content": [{"type": "input_text", "text": "d"}]},
                        {"type": "message", "role": "user",
                         "content": [{"type": "input_text", "text": "hi"}]}],
              "tools": [], "reasoning": {"effort": "medium"},
              "include": ["reasoning.encrypted_content"],
              "prompt_cache_key": "0199a1b2"}

STAINLESS_HEADERS = {
    "Accept": "application/json",
    "Accept-Encoding": "gzip, deflate",
    "Connection": "keep-alive",
    "User-Agent": "OpenAI/Python 1.109.1",
    "X-Stainless-Lang": "python",
    "X-Stainless-Package-Version": "1.109.1",
    "X-Stainless-OS": "Linux",
    "X-Stainless-Arch": "x64",
    "X-Stainless-Runtime": "CPython",
    "X-Stainless-Runtime-Version": "3.12.3",
    "x-stainless-retry-count": "0",
    "x-stainless-read-timeout": "600",
}


class ClientTrafficTest(GatewayTest):

    def test_websocket_upgrade_gets_426_then_codex_falls_back(self):
        upgrade = dict(CODEX_HEADERS, **{
            "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13"})
        del upgrade["Content-Type"]
        reply = call(self.port, "GET", "/v1/responses", headers=upgrade)
        self.assert_openai_error(reply, 426, "invalid_request_error",
                                 "websocket_unsupported")
        self.assertEqual(self.fake.count(), 0)
        self.assertEqual(self.usage(), 0)
        reply = call(self.port, "POST", "/v1/responses", CODEX_BODY,
                     headers=CODEX_HEADERS)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.headers["content-type"], "text/event-stream")
        names = reply.names()
        self.assertEqual(names[0], "response.created")
        self.assertEqual(names[-1], "response.completed")
        last = json.loads(reply.events()[-1][1])
        self.assertEqual(last["response"]["usage"], RESPONSES_USAGE)
        rec = self.fake.last()
        self.assertEqual((rec.method, rec.path), ("POST", "/v1/responses"))
        self.assertEqual(rec.json(), CODEX_BODY)
        for name in ("Accept", "originator", "session-id", "thread-id",
                     "x-client-request-id", "x-codex-turn-metadata",
                     "User-Agent"):
            self.assertEqual(rec.values(name), [CODEX_HEADERS[name]], name)
        self.assertEqual(rec.values("accept-encoding"), ["identity"])
        for name in ("upgrade", "sec-websocket-key"):
            self.assertNotIn(name, rec.names())
        self.assert_upstream_key(rec, "authorization",
                                 "Bearer " + PROVIDER_KEY)
        self.assertEqual(self.fake.count(), 1)
        self.assertEqual(self.usage(), RESPONSES_TOTAL)

    def test_an_h2c_upgrade_is_ignored_not_refused(self):
        # curl --http2 on an http:// URL offers h2c; only websockets are
        # refused, any other upgrade offer is answered in HTTP/1.1
        reply = call(self.port, "POST", "/v1/chat/completions",
                     CHAT, headers={
                         "Upgrade": "h2c",
                         "Connection": "Upgrade, HTTP2-Settings",
                         "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"})
        self.assertEqual(reply.status, 200, reply.body)
        rec = self.fake.last()
        for name in ("upgrade", "http2-settings"):
            self.assertNotIn(name, rec.names())
        self.assertEqual(self.usage(), CHAT_TOTAL)

    def test_websocket_upgrade_needs_a_key_first(self):
        reply = call(self.port, "GET", "/v1/responses", key=None,
                     headers={"Upgrade": "websocket",
                              "Connection": "Upgrade"})
        self.assert_openai_error(reply, 401, "authentication_error",
                                 "missing_api_key")
        self.assertEqual(self.fake.count(), 0)

    def test_openai_sdk_headers_and_gzip(self):
        reply = call(self.port, "POST", "/v1/chat/completions",
                     CHAT, headers=STAINLESS_HEADERS)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["usage"], CHAT_USAGE)
        self.assertNotIn("content-encoding", reply.headers)
        rec = self.fake.last()
        for name, value in STAINLESS_HEADERS.items():
            if name.lower() in ("accept-encoding", "connection"):
                continue
            self.assertEqual(rec.values(name), [value], name)
        self.assertIn(("X-Stainless-OS", "Linux"), rec.headers)
        self.assertEqual(rec.values("accept-encoding"), ["identity"])
        self.assert_upstream_key(rec, "authorization",
                                 "Bearer " + PROVIDER_KEY)
        self.assertEqual(self.usage(), CHAT_TOTAL)

    def test_openai_sdk_with_a_provider_that_gzips_anyway(self):
        self.fake.mode = {"gzip": True}
        reply = call(self.port, "POST", "/v1/chat/completions",
                     CHAT, headers=STAINLESS_HEADERS)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["content-encoding"], "gzip")
        doc = json.loads(gzip.decompress(reply.body))
        self.assertEqual(doc["usage"], CHAT_USAGE)
        self.assertEqual(self.usage(), CHAT_TOTAL)


# Issue 4: quotas and keys that hold ##########################################

CHAT_PATH = "/v1/chat/completions"
# a period so long that no test crosses a window: [0, 4e9), until 2096
LONG_PERIOD = 4 * 10 ** 9
LONG_WINDOW = 0
LONG_RESET_ISO = "2096-10-02T07:06:40Z"


def sha(key):
    return hashlib.sha256(key.encode()).hexdigest()


def openai_error(code, message):
    _, kind, _ = llmgate.ERRORS[code]
    return {"error": {"message": message, "type": kind, "param": None,
                      "code": code}}


def anthropic_error(code, message):
    _, _, kind = llmgate.ERRORS[code]
    return {"type": "error", "error": {"type": kind, "message": message}}


class Issue4Test(GatewayTest):
    """GatewayTest with the helpers of this section."""

    def account(self, name="alice"):
        return self.gateway.ledger.accounts[name]

    def figures(self, name="alice"):
        reply = call(self.port, "GET", llmgate.USAGE_PATH,
                     key={"alice": ALICE_KEY, "bob": BOB_KEY}[name])
        self.assertEqual(reply.status, 200)
        return reply.json()

    def with_users(self, *users, **top):
        doc = self.config()
        doc["users"] = list(users)
        doc.update(top)
        self.restart(doc)

    def assert_refused(self, reply, code, message, retry_after=None,
                       family="openai"):
        self.assertEqual(reply.status, llmgate.ERRORS[code][0])
        body = (anthropic_error if family == "anthropic"
                else openai_error)(code, message)
        self.assertEqual(reply.json(), body)
        self.assertEqual(reply.headers.get("retry-after"), retry_after)

    def in_thread(self, fn, *args):
        """Run fn(*args) on a thread; returns (thread, result list)."""
        out = []

        def run():
            try:
                out.append(fn(*args))
            except Exception as exc:   # reported by the test's asserts
                out.append(exc)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, out

    @contextlib.contextmanager
    def held_request(self, path=CHAT_PATH, body=CHAT):
        """POST `body` on a thread while the fake holds its answer; the
        block runs once the request reached the fake.  Afterwards it is
        let through, and must have succeeded."""
        hold = threading.Event()
        self.fake.mode = {"hold": hold}
        before = self.fake.count()
        thread, out = self.in_thread(call, self.port, "POST", path, body)
        try:
            self.assertTrue(self.fake.wait_count(before + 1))
            yield
        finally:
            hold.set()
            thread.join(TIMEOUT)
        self.assertEqual(out[0].status, 200)


# 1. Reservations #############################################################

class EstimateTest(unittest.TestCase):
    """The documented rule: ceil(characters of JSON string values, less
    data: URLs and base64 `data`, / 4) plus the output cap asked (times
    n) or reserveOutputTokens; count_tokens reserves nothing."""

    def setUp(self):
        self.config = llmgate.Config()

    def test_text_chars_counts_string_values_only(self):
        self.assertEqual(llmgate.text_chars(CHAT), 12)  # gpt-4o user hi
        doc = {"model": "m", "n": 3, "stream": True, "temperature": 0.5,
               "x": None, "messages": [{"content": ["ab", {"t": "cde"}]}]}
        self.assertEqual(llmgate.text_chars(doc), 1 + 2 + 3)
        self.assertEqual(llmgate.text_chars("x" * 13), 13)
        self.assertEqual(llmgate.text_chars({}), 0)

    def test_text_chars_skips_inline_media(self):
        image = {"type": "image_url",
                 "image_url": {"url": "data:image/png;base64," + "A" * 999}}
        self.assertEqual(llmgate.text_chars(image), len("image_url"))
        source = {"type": "base64", "media_type": "image/png",
                  "data": "B" * 5000}
        self.assertEqual(llmgate.text_chars(source),
                         len("base64") + len("image/png"))
        # `data` is skipped only inside a base64 source
        self.assertEqual(llmgate.text_chars({"data": "hello"}), 5)

    def test_text_chars_survives_deep_nesting(self):
        doc = "leaf"
        for _ in range(100000):
            doc = [doc]
        self.assertEqual(llmgate.text_chars({"a": doc}), 4)

    def test_output_cap_fields(self):
        cap = llmgate.output_cap
        self.assertIsNone(cap({}))
        self.assertEqual(cap({"max_tokens": 100}), 100)
        self.assertEqual(cap({"max_completion_tokens": 200}), 200)
        self.assertEqual(cap({"max_output_tokens": 300}), 300)
        self.assertEqual(cap({"max_tokens": 0}), 0)
        self.assertIsNone(cap({"max_tokens": True}))
        self.assertIsNone(cap({"max_tokens": -5}))
        self.assertIsNone(cap({"max_tokens": "100"}))
        # which field a provider reads varies: the largest one counts
        self.assertEqual(cap({"max_output_tokens": 1, "max_tokens": 900}),
                         900)
        self.assertEqual(cap({"max_completion_tokens": 50,
                              "max_tokens": 5}), 50)

    def test_estimate_adds_the_output_cap(self):
        est = llmgate.estimate
        self.assertEqual(est(dict(CHAT, max_tokens=100), CHAT_PATH,
                             self.config), (3, 103))
        self.assertEqual(est(dict(CHAT, max_completion_tokens=7),
                             CHAT_PATH, self.config), (3, 10))
        self.assertEqual(est({"model": "gpt-4o", "input": "hello",
                              "max_output_tokens": 50}, "/v1/responses",
                             self.config), (3, 53))
        self.assertEqual(est(MESSAGES, "/v1/messages", self.config),
                         (6, 1006))   # claude-sonnet-4 user hi: 21 chars

    def test_estimate_rounds_characters_up(self):
        for chars, tokens in ((0, 0), (1, 1), (4, 1), (5, 2), (13, 4)):
            doc = {"prompt": "x" * chars, "max_tokens": 0}
            self.assertEqual(llmgate.estimate(doc, "/v1/completions",
                                              self.config),
                             (tokens, tokens), chars)

    def test_estimate_multiplies_the_cap_by_n(self):
        self.assertEqual(llmgate.estimate(dict(CHAT, max_tokens=100, n=3),
                                          CHAT_PATH, self.config), (3, 303))
        self.assertEqual(llmgate.estimate(dict(CHAT, n=2), CHAT_PATH,
                                          self.config), (3, 3 + 2 * 4096))
        # legacy completions generate best_of candidates, and bill them
        doc = {"model": "m", "prompt": "p" * 7, "max_tokens": 100}
        path = "/v1/completions"
        tokens_in = llmgate.estimate(doc, path, self.config)[0]
        for extra, out in (({"best_of": 20}, 2000),
                           ({"best_of": 5, "n": 2}, 500),
                           ({"best_of": True, "n": 8.5}, 100)):
            self.assertEqual(llmgate.estimate(dict(doc, **extra), path,
                                              self.config),
                             (tokens_in, tokens_in + out))

    def test_estimate_default_output_reserve(self):
        self.assertEqual(llmgate.RESERVE_OUTPUT_TOKENS, 4096)
        self.assertEqual(llmgate.estimate(CHAT, CHAT_PATH, self.config),
                         (3, 4099))
        self.config.reserve_output = 500
        self.assertEqual(llmgate.estimate(CHAT, CHAT_PATH, self.config),
                         (3, 503))

    def test_count_tokens_and_embeddings(self):
        self.assertEqual(llmgate.estimate(
            MESSAGES, "/v1/messages/count_tokens", self.config), (0, 0))
        doc = {"model": "text-embedding-3-small", "input": "hello world"}
        self.assertEqual(llmgate.estimate(doc, "/v1/embeddings",
                                          self.config), (9, 9))


class LedgerTest(unittest.TestCase):
    """The usage table with explicit `now`."""

    def setUp(self):
        self.ledger = llmgate.Ledger(3600)
        self.user = llmgate.User("u")
        self.user.tokens = 100

    def refusal(self, estimate, now=NOW):
        with self.assertRaises(llmgate.Refusal) as ctx:
            self.ledger.admit(self.user, estimate, now=now)
        return ctx.exception

    def test_admit_reserves_and_settle_charges_once(self):
        res = self.ledger.admit(self.user, 60, now=NOW)
        fig = self.ledger.figures(self.user, now=NOW)
        self.assertEqual((fig["used"], fig["reserved"]), (0, 60))
        version = self.ledger.settle(res, 70, now=NOW)
        self.assertEqual(version, 1)
        self.assertEqual(self.ledger.settle(res, 70, now=NOW), 1)
        self.assertEqual(self.ledger.settle(res, 5, now=NOW), 1)
        fig = self.ledger.figures(self.user, now=NOW)
        self.assertEqual((fig["used"], fig["reserved"]), (70, 0))
        self.assertEqual(self.ledger.accounts["u"].in_flight, 0)

    def test_others_reservations_give_quota_busy(self):
        self.ledger.admit(self.user, 60, now=NOW)
        exc = self.refusal(50)
        self.assertEqual(exc.code, "quota_busy")
        self.assertEqual(exc.retry_after, llmgate.BUSY_RETRY_AFTER_S)
        self.ledger.admit(self.user, 40, now=NOW)     # exactly 100
        self.assertEqual(self.refusal(1).code, "quota_busy")

    def test_quota_exceeded_retries_at_the_window_end(self):
        res = self.ledger.admit(self.user, 10, now=NOW)
        self.ledger.settle(res, 70, now=NOW)
        exc = self.refusal(40)      # 70 + 40 > 100 whatever is in flight
        self.assertEqual(exc.code, "quota_exceeded")
        self.assertEqual(exc.retry_after, 2600)
        self.assertEqual(exc.message,
                         "You have used 70 of your 100-token quota for this "
                         "3600-second window. This request needs an "
                         "estimated 40 tokens (its input plus its output "
                         "cap) and 30 remain; ask for fewer output tokens. "
                         "Your quota resets at %s, in 2600 s." % RESET_ISO)
        self.ledger.admit(self.user, 30, now=NOW)
        exc = self.refusal(1, now=NOW + 600)
        self.assertEqual(exc.code, "quota_busy")

    def test_used_up_quota_refuses_even_empty_requests(self):
        res = self.ledger.admit(self.user, 10, now=NOW)
        self.ledger.settle(res, 130, now=NOW)
        exc = self.refusal(0)
        self.assertEqual((exc.code, exc.retry_after),
                         ("quota_exceeded", 2600))
        with self.assertRaises(llmgate.Refusal) as ctx:
            self.ledger.check(self.user, now=NOW)
        self.assertEqual(ctx.exception.code, "quota_exceeded")

    def test_window_rollover(self):
        res = self.ledger.admit(self.user, 10, now=NOW)
        self.ledger.settle(res, 100, now=NOW)
        self.assertEqual(self.refusal(1, now=NOW + 2599).code,
                         "quota_exceeded")
        later = NOW + 2600          # the first second of the next window
        fig = self.ledger.figures(self.user, now=later)
        self.assertEqual(fig, {"user": "u", "limit": 100, "used": 0,
                               "remaining": 100, "reserved": 0,
                               "window_seconds": 3600,
                               "resets_at": "2027-01-15T10:00:00Z"})
        res = self.ledger.admit(self.user, 100, now=later)
        self.ledger.settle(res, 5, now=later)
        self.assertEqual(self.ledger.figures(self.user, now=later)["used"],
                         5)

    def test_reservation_spanning_a_rollover_is_released(self):
        res = self.ledger.admit(self.user, 90, now=NOW)
        self.ledger.settle(res, 0, now=NOW + 3600)
        fig = self.ledger.figures(self.user, now=NOW + 3600)
        self.assertEqual((fig["used"], fig["reserved"]), (0, 0))
        self.ledger.admit(self.user, 100, now=NOW + 3600)


class ReservationTest(Issue4Test):

    def users(self):
        return [{"name": "alice", "apiKey": ALICE_KEY, "tokens": 100},
                {"name": "bob", "apiKey": BOB_KEY, "tokens": 50000}]

    def reserved_while_held(self, path, body):
        """What /llmgate/usage shows reserved while the fake holds
        `body`; the request is then let through."""
        with self.held_request(path, body):
            reserved = self.figures()["reserved"]
        self.assertEqual(self.figures()["reserved"], 0)
        return reserved

    def test_reservation_is_the_estimate(self):
        self.with_users({"name": "alice", "apiKey": ALICE_KEY,
                         "tokens": 100000})
        self.assertEqual(self.reserved_while_held(
            CHAT_PATH, dict(CHAT, max_tokens=100)), 103)
        self.assertEqual(self.reserved_while_held(CHAT_PATH, CHAT), 4099)
        self.assertEqual(self.reserved_while_held(
            CHAT_PATH, dict(CHAT, max_tokens=100, n=3)), 303)
        self.assertEqual(self.reserved_while_held(
            "/v1/messages/count_tokens", MESSAGES), 0)
        self.assertEqual(self.usage(), 3 * CHAT_TOTAL)
        self.with_users({"name": "alice", "apiKey": ALICE_KEY,
                         "tokens": 100000}, reserveOutputTokens=500)
        self.assertEqual(self.reserved_while_held(CHAT_PATH, CHAT), 503)

    def test_count_tokens_passes_on_the_last_token(self):
        self.fix_clock()
        for _ in range(5):          # 5 x 18 = 90 of 100
            reply = call(self.port, "POST", CHAT_PATH,
                         dict(CHAT, max_tokens=15))
            self.assertEqual(reply.status, 200)
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assert_refused(
            reply, "quota_exceeded",
            "You have used 90 of your 100-token quota for this 3600-second "
            "window. This request needs an estimated 4099 tokens (its input "
            "plus its output cap) and 10 remain; ask for fewer output "
            "tokens. Your quota resets at %s, in 2600 s." % RESET_ISO,
            RESET_IN)
        reply = call(self.port, "POST", "/v1/messages/count_tokens", MESSAGES)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json(), {"input_tokens": 42})
        self.assertEqual(self.usage(), 90)

    def race(self, bodies):
        """Send every body at once (a Barrier) while the fake holds the
        answers; once each request was admitted (reached the fake) or
        refused, release them.  Returns (replies, indexes refused before
        the release)."""
        n = len(bodies)
        hold = threading.Event()
        self.fake.mode = {"hold": hold}
        start = self.fake.count()
        barrier = threading.Barrier(n, timeout=TIMEOUT)
        replies = [None] * n
        finished = []
        cond = self.fake.arrived

        def worker(i):
            try:
                barrier.wait()
                replies[i] = call(self.port, "POST", CHAT_PATH, bodies[i])
            except Exception as exc:
                replies[i] = exc
            with cond:
                finished.append(i)
                cond.notify_all()
        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(n)]
        for t in threads:
            t.start()
        try:
            with cond:
                settled = cond.wait_for(
                    lambda: self.fake.count() - start + len(finished) >= n,
                    TIMEOUT)
                refused = sorted(finished)
                admitted = self.fake.count() - start
            self.assertTrue(settled, "requests neither admitted nor "
                            "refused: %r" % replies)
            self.assertEqual(admitted + len(refused), n)
        finally:
            hold.set()
            for t in threads:
                t.join(TIMEOUT)
        return replies, refused

    def bound(self, bodies, replies):
        """tokens + the largest amount by which one admitted request's
        real usage (18) exceeded its estimate: issue 4, point 1."""
        excess = [max(0, CHAT_TOTAL - llmgate.estimate(
            b, CHAT_PATH, self.gateway.config)[1])
            for b, r in zip(bodies, replies) if r.status == 200]
        return 100 + max(excess + [0])

    def test_racing_for_the_whole_quota(self):
        self.fix_clock()
        body = dict(CHAT, max_tokens=15)    # estimate 3 + 15 = 18 = usage
        self.assertEqual(llmgate.estimate(body, CHAT_PATH,
                                          self.gateway.config)[1], 18)
        bodies = [body] * 24
        replies, refused = self.race(bodies)
        statuses = sorted(r.status for r in replies)
        self.assertEqual(statuses, [200] * 5 + [429] * 19)
        self.assertEqual(len(refused), 19)
        for i in refused:
            self.assert_refused(
                replies[i], "quota_busy",
                "Your other requests in flight hold the rest of your token "
                "quota; retry in a moment.",
                str(llmgate.BUSY_RETRY_AFTER_S))
        self.assertEqual(self.usage(), 90)
        self.assertLessEqual(self.usage(), self.bound(bodies, replies))
        self.assertEqual(self.bound(bodies, replies), 100)
        self.assertEqual(self.account().reserved, 0)
        self.assertEqual(self.account().in_flight, 0)
        # nothing in flight now: the same request is over the quota
        reply = call(self.port, "POST", CHAT_PATH, body)
        self.assertEqual(reply.status, 429)
        self.assertEqual(reply.json()["error"]["code"], "quota_exceeded")
        self.assertEqual(reply.headers["retry-after"], RESET_IN)

    def test_racing_for_the_last_tokens(self):
        self.fix_clock()
        for _ in range(5):
            self.assertEqual(call(self.port, "POST", CHAT_PATH, dict(
                CHAT, max_tokens=15)).status, 200)
        self.assertEqual(self.usage(), 90)          # 10 tokens left
        small = dict(CHAT, max_tokens=5)            # estimate 8, uses 18
        large = dict(CHAT, max_tokens=9)            # estimate 12 > 10
        bodies = [small, large] * 8
        replies, refused = self.race(bodies)
        ok = [i for i, r in enumerate(replies) if r.status == 200]
        self.assertEqual(len(ok), 1)
        self.assertIs(bodies[ok[0]], small)
        self.assertEqual(sorted(refused), sorted(
            set(range(16)) - set(ok)))
        busy = [i for i in refused if bodies[i] is small]
        over = [i for i in refused if bodies[i] is large]
        self.assertEqual((len(busy), len(over)), (7, 8))
        for i in busy:
            self.assertEqual(replies[i].json()["error"]["code"],
                             "quota_busy")
            self.assertEqual(replies[i].headers["retry-after"], "2")
        for i in over:
            self.assert_refused(
                replies[i], "quota_exceeded",
                "You have used 90 of your 100-token quota for this "
                "3600-second window. This request needs an estimated 12 "
                "tokens (its input plus its output cap) and 10 remain; ask "
                "for fewer output tokens. Your quota resets at %s, in "
                "2600 s." % RESET_ISO, RESET_IN)
        self.assertEqual(self.usage(), 108)
        self.assertEqual(self.bound(bodies, replies), 110)
        self.assertLessEqual(self.usage(), self.bound(bodies, replies))
        reply = call(self.port, "POST", CHAT_PATH, small)
        self.assert_refused(
            reply, "quota_exceeded",
            "You have used 108 of your 100-token quota for this 3600-second "
            "window. Your quota resets at %s, in 2600 s." % RESET_ISO,
            RESET_IN)
        self.assertEqual(reply.headers["x-llmgate-tokens-remaining"], "0")

    def assert_released(self, used):
        acct = self.account()
        self.assertEqual((acct.used, acct.reserved, acct.in_flight),
                         (used, 0, 0))

    def test_settled_once_on_success_and_provider_error(self):
        self.with_users({"name": "alice", "apiKey": ALICE_KEY,
                         "tokens": 100000})
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.status, 200)
        self.assert_released(18)
        doc = {"error": {"message": "boom", "type": "server_error"}}
        self.fake.mode = {"status": (500, doc)}
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual((reply.status, reply.json()), (500, doc))
        self.assert_released(18)
        self.fake.mode = {"status": (401, doc)}
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assert_refused(reply, "upstream_auth_failed",
                            "The provider refused the gateway's provider "
                            "key; tell the gateway's admin.")
        self.assert_released(18)

    def test_settled_once_when_the_provider_is_unreachable(self):
        doc = self.config()
        doc["users"][0]["tokens"] = 100000
        doc["providers"]["openai"]["url"] = "http://127.0.0.1:%d" % (
            free_port())
        self.restart(doc)
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assert_refused(reply, "upstream_unreachable",
                            "The provider cannot be reached (Connection "
                            "refused).")
        self.assert_released(0)

    def test_settled_once_on_a_gateway_error(self):
        self.with_users({"name": "alice", "apiKey": ALICE_KEY,
                         "tokens": 100000})
        with mock.patch.object(llmgate.Handler, "_relay",
                               side_effect=RuntimeError("boom")):
            reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assert_refused(reply, "internal_error",
                            "The gateway failed; the error is in its log.")
        self.assertEqual(self.fake.count(), 1)
        # the request reached the provider: billed as aborted, its input
        self.assert_released(3)
        lines = self.wait_log(
            lambda lines: any("status=500" in line for line in lines))
        self.assertTrue(lines[-1].endswith(" aborted"), lines[-1])
        self.assertIn("error: unexpected failure on POST "
                      "/v1/chat/completions", self.logs.text())


class EventSplitterTest(unittest.TestCase):

    def test_events_cut_anywhere_come_out_whole(self):
        # every line ending the SSE spec allows, the stream cut into
        # random reads: the bytes come out unchanged and each event's
        # data in a piece of its own
        rng = random.Random(7)
        for trial in range(300):
            end = rng.choice([b"\n", b"\r\n", b"\r"])
            events = [end.join([b"event: e%d" % i, b'data: {"i": %d}' % i])
                      + end * 2 for i in range(rng.randint(1, 6))]
            stream = b"".join(events)
            splitter = llmgate.EventSplitter()
            pieces, pos = [], 0
            while pos < len(stream):
                n = rng.randint(1, 9)
                pieces += splitter.feed(stream[pos:pos + n])
                pos += n
            rest = splitter.flush()
            self.assertEqual(b"".join(pieces) + rest, stream, trial)
            self.assertEqual(len([p for p in pieces if b"data:" in p]),
                             len(events), (trial, end))

    def test_an_event_too_large_is_handed_on_unparsed(self):
        splitter = llmgate.EventSplitter()
        with mock.patch.object(llmgate, "MAX_EVENT_BYTES", 1000):
            self.assertEqual(splitter.feed(b"data: " + b"x" * 600), [])
            out = splitter.feed(b"x" * 600)
        self.assertEqual(out, [b"data: " + b"x" * 1200])
        self.assertEqual(splitter.feed(b"\n\ndata: 1\n\n"),
                         [b"\n\n", b"data: 1\n\n"])


# 2. Abandoned and broken streams #############################################

class AbortTest(Issue4Test):

    def walk_away(self, path, body, events, hold_after=True):
        """Read `events` SSE events of a streamed answer (0: just send),
        close the socket, and return (EofWatch, time of the close)."""
        watch = EofWatch(self.fake)
        self.fake.mode = ({"hold_after": (events, watch),
                           "until_gone": True} if hold_after
                          else {"hold": watch})
        sock = open_request(self.port, path, body)
        try:
            if events:
                read_until(sock, bytearray(),
                           lambda b: b.count(b"data: ") >= events)
            self.assertTrue(watch.reached.wait(TIMEOUT))
        finally:
            closed_at = time.monotonic()
            sock.close()
        self.assertTrue(watch.eof.wait(TIMEOUT), "provider never saw EOF")
        return watch, closed_at

    def assert_aborted(self, tokens_in, tokens_out):
        lines = self.wait_log(lambda ls: len(ls) == 1)
        self.assertTrue(lines[0].endswith(" aborted"), lines[0])
        self.assertIn(" in=%d out=%d " % (tokens_in, tokens_out), lines[0])
        acct = self.account()
        self.assertEqual((acct.used, acct.reserved, acct.in_flight),
                         (tokens_in + tokens_out, 0, 0))
        self.assertEqual(self.usage(), tokens_in + tokens_out)

    def test_client_walks_away_mid_chat_stream(self):
        watch, closed_at = self.walk_away(
            CHAT_PATH, dict(CHAT, stream=True), 2)
        self.assertLess(watch.at - closed_at, 1.0)
        # the provider's next writes fail: it was hung up on
        self.assertTrue(self.fake.gone.wait(TIMEOUT))
        # no usage was reported: input estimate 3 ("gpt-4o", "user",
        # "hi") + ceil(len("Hel" + "lo") / 4) = 2
        self.assert_aborted(3, 2)

    def test_client_walks_away_mid_anthropic_stream(self):
        # message_start (reports input 30 + 100 + 200, output 1),
        # content_block_start, ping, "Hel", "lo"; then the client leaves
        watch, closed_at = self.walk_away(
            "/v1/messages", dict(MESSAGES, stream=True), 5)
        self.assertLess(watch.at - closed_at, 1.0)
        self.assertTrue(self.fake.gone.wait(TIMEOUT))
        self.assert_aborted(ANTHROPIC_INPUT, 2)

    def test_client_walks_away_before_the_answer(self):
        watch, closed_at = self.walk_away(CHAT_PATH, CHAT, 0,
                                          hold_after=False)
        self.assertLess(watch.at - closed_at, 1.0)
        self.assert_aborted(3, 0)

    def test_provider_breaks_a_chat_stream(self):
        self.fake.mode = {"break_after": 2}
        reply = call(self.port, "POST", CHAT_PATH, dict(CHAT, stream=True))
        self.assertEqual(reply.status, 200)
        events = reply.datas()
        self.assertEqual(len(events), 3)
        self.assertEqual(json.loads(events[-1]), {"error": {
            "message": "The provider broke off the stream.",
            "type": "api_error", "param": None,
            "code": "upstream_stream_broken"}})
        self.assert_aborted(3, 2)
        self.assertIn("warning: provider openai: The provider broke off "
                      "the stream.", self.logs.text())

    def test_provider_breaks_an_anthropic_stream(self):
        self.fake.mode = {"break_after": 5}
        reply = call(self.port, "POST", "/v1/messages",
                     dict(MESSAGES, stream=True))
        self.assertEqual(reply.status, 200)
        events = reply.events()
        self.assertEqual(len(events), 6)
        self.assertEqual(events[-1][0], "error")
        self.assertEqual(json.loads(events[-1][1]), {
            "type": "error", "error": {
                "type": "api_error",
                "message": "The provider broke off the stream."}})
        self.assert_aborted(ANTHROPIC_INPUT, 2)


# 3. Durable usage ############################################################

class DurableTest(Issue4Test):

    def durable_doc(self):
        doc = self.config()
        doc["stateFile"] = "usage.json"
        doc["limitResetPeriod"] = LONG_PERIOD
        return doc

    def read_state(self):
        with open(os.path.join(self.dir, "usage.json")) as f:
            return json.load(f)

    def test_a_final_save_that_fails_is_reported_not_raised(self):
        folder = os.path.join(self.dir, "state")
        os.mkdir(folder)
        ledger = llmgate.Ledger(LONG_PERIOD, os.path.join(folder, "u.json"))
        ledger.start_writer()
        user = llmgate.User("alice")
        user.tokens = 1000
        ledger.settle(ledger.admit(user, 10), 7)
        self.assertTrue(ledger.wait_saved(ledger.version))
        shutil.rmtree(folder)   # a lost volume, say
        ledger.settle(ledger.admit(user, 10), 5)   # not saved yet
        self.assertEqual(ledger.stop(), "No such file or directory")
        self.assertFalse(ledger.writer.is_alive())
        self.assertNotIn("Traceback", self.logs.text())

    def test_a_failed_save_is_retried_once_a_second_not_per_charge(self):
        folder = os.path.join(self.dir, "state")
        os.mkdir(folder)
        ledger = llmgate.Ledger(LONG_PERIOD, os.path.join(folder, "u.json"))
        user = llmgate.User("alice")
        user.tokens = 10 ** 6
        saves = []
        save = ledger.save

        def failing_save():
            saves.append(time.monotonic())
            raise OSError(28, "No space left on device")
        ledger.save = failing_save
        ledger.start_writer()
        self.addCleanup(ledger.stop)
        for _ in range(50):   # each charge wakes the writer
            ledger.settle(ledger.admit(user, 1), 1)
        self.assertFalse(ledger.wait_saved(ledger.version, timeout=0.3))
        self.assertEqual(len(saves), 1)
        self.assertIn("error: cannot save state file %s: No space left on "
                      "device; retrying in 1 s" % ledger.state_path,
                      self.logs.text())
        ledger.save = save   # the disk is back: the retry saves all
        self.assertTrue(ledger.wait_saved(ledger.version, timeout=TIMEOUT))
        self.assertIsNone(ledger.stop())

    def test_serve_exits_1_when_the_usage_could_not_be_saved(self):
        path = self.write_config(self.durable_doc())
        with mock.patch.object(llmgate.Ledger, "stop",
                               return_value="Read-only file system"):
            code = self.main_until_sigterm(["--config", path, "--port", "0"])
        self.assertEqual(code, 1)
        self.assertIn("error: usage not saved to %s: Read-only file system"
                      % os.path.join(self.dir, "usage.json"),
                      self.logs.text())
        self.assertNotIn("Traceback", self.logs.text())

    def test_usage_survives_sigkill(self):
        path = self.write_config(self.durable_doc(), "sub.json")
        elsewhere = tempfile.mkdtemp(prefix="llmgate-cwd-")
        self.addCleanup(lambda: os.rmdir(elsewhere))
        server, port = serve(self, path, cwd=elsewhere)
        self.assertIn("state file %s" % os.path.join(self.dir, "usage.json"),
                      server.err)
        self.assertEqual(call(port, "POST", CHAT_PATH, CHAT).status, 200)
        # the answer came after the save: the file already holds it
        state = self.read_state()
        self.assertEqual(state["format"], "llmgate-usage/1")
        self.assertEqual(state["users"], {"alice": {
            "window_start": LONG_WINDOW, "used": CHAT_TOTAL}})
        self.assertEqual(os.listdir(elsewhere), [])
        server.proc.send_signal(signal.SIGKILL)
        self.assertEqual(server.finish(), -signal.SIGKILL)

        server, port = serve(self, path, cwd=elsewhere)
        reply = call(port, "GET", llmgate.USAGE_PATH)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json(), {
            "user": "alice", "limit": 100000, "used": CHAT_TOTAL,
            "remaining": 100000 - CHAT_TOTAL, "reserved": 0,
            "window_seconds": LONG_PERIOD, "resets_at": LONG_RESET_ISO})
        reply = call(port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.headers["x-llmgate-tokens-remaining"],
                         str(100000 - 2 * CHAT_TOTAL))

    def test_state_file_is_whole_at_all_times(self):
        self.restart(self.durable_doc())
        state_path = os.path.join(self.dir, "usage.json")
        stop = threading.Event()
        seen = {"reads": 0, "bad": []}

        def reader():
            while not stop.is_set():
                try:
                    with open(state_path, "rb") as f:
                        raw = f.read()
                except FileNotFoundError:
                    continue
                seen["reads"] += 1
                try:
                    doc = json.loads(raw)
                    assert doc["format"] == "llmgate-usage/1"
                except (ValueError, KeyError, AssertionError):
                    seen["bad"].append(raw)
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            for i in range(1, 16):
                reply = call(self.port, "POST", CHAT_PATH, CHAT)
                self.assertEqual(reply.status, 200)
                # a charge is saved before its answer is sent
                self.assertEqual(self.read_state()["users"]["alice"]["used"],
                                 i * CHAT_TOTAL)
        finally:
            stop.set()
            thread.join(TIMEOUT)
        self.assertGreater(seen["reads"], 0)
        self.assertEqual(seen["bad"], [])
        self.assertEqual([n for n in os.listdir(self.dir)
                          if n.startswith(".llmgate-state-")], [])

    def test_a_failed_save_leaves_the_old_file(self):
        state_path = os.path.join(self.dir, "usage.json")
        ledger = llmgate.Ledger(3600, state_path)
        user = llmgate.User("u")
        user.tokens = 1000
        ledger.settle(ledger.admit(user, 10, now=NOW), 7, now=NOW)
        ledger.save()
        with open(state_path, "rb") as f:
            old = f.read()
        ledger.settle(ledger.admit(user, 10, now=NOW), 9, now=NOW)
        with mock.patch("os.fsync", side_effect=OSError(5, "EIO")):
            with self.assertRaises(OSError):
                ledger.save()
        with open(state_path, "rb") as f:
            self.assertEqual(f.read(), old)
        self.assertEqual(sorted(os.listdir(self.dir)),
                         ["config.json", "usage.json"])
        with mock.patch("os.replace", wraps=os.replace) as replace:
            ledger.save()
        tmp, target = replace.call_args[0]
        self.assertEqual(os.path.dirname(tmp), self.dir)
        self.assertEqual(target, state_path)
        self.assertEqual(self.read_state()["users"],
                         {"u": {"window_start": NOW // 3600 * 3600,
                                "used": 16}})

    def test_corrupt_state_file_stops_start_up(self):
        path = self.write_config(self.durable_doc(), "sub.json")
        state_path = os.path.join(self.dir, "usage.json")
        with open(state_path, "w") as f:
            f.write('{"format": "llmgate-usage/1", "users": {')
        message = ("llmgate: state file %s is corrupt (not JSON); fix or "
                   "move it away, llmgate will not reset usage silently\n"
                   % state_path)
        server = Server(self, ["--config", path, "--port", "0"])
        self.assertEqual(server.finish(), 2)
        self.assertEqual(server.err, message)
        result = run_script(["--config", path, "--check"])
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, message)
        with open(state_path) as f:
            self.assertEqual(f.read(),
                             '{"format": "llmgate-usage/1", "users": {')

    def test_state_file_checks(self):
        state_path = os.path.join(self.dir, "usage.json")

        def load(raw):
            with open(state_path, "w") as f:
                f.write(raw)
            with self.assertRaises(llmgate.ConfigError) as ctx:
                llmgate.Ledger(3600, state_path).load()
            return str(ctx.exception)
        tail = "; fix or move it away, llmgate will not reset usage silently"
        self.assertEqual(load('{"format": "other", "users": {}}'),
                         "state file %s is corrupt (format is not "
                         "llmgate-usage/1)%s" % (state_path, tail))
        self.assertEqual(load(json.dumps({
            "format": "llmgate-usage/1", "users": {
                "alice": {"window_start": 0, "used": -1}}})),
            "state file %s is corrupt (users.alice has a bad number)%s"
            % (state_path, tail))
        os.unlink(state_path)
        os.mkdir(state_path)
        with self.assertRaises(llmgate.ConfigError) as ctx:
            llmgate.Ledger(3600, state_path).load()
        self.assertEqual(str(ctx.exception), "cannot read state file %s: "
                         "Is a directory" % state_path)
        os.rmdir(state_path)
        ledger = llmgate.Ledger(3600, state_path)   # missing: starts empty
        ledger.load()
        self.assertEqual(ledger.accounts, {})
        # a folder that is not there: every save would fail, so start-up
        # and --check refuse it
        doc = self.durable_doc()
        doc["stateFile"] = "gone/usage.json"
        path = self.write_config(doc, "gone.json")
        result = run_script(["--config", path, "--check"])
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, "llmgate: the folder of state file "
                         "%s does not exist\n"
                         % os.path.join(self.dir, "gone", "usage.json"))
        # reading usage writes nothing: no folder, no usage yet
        result = run_script(["usage", "--config", path])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines()[1].split()[:3],
                         ["alice", "100000", "0"])

    def test_sigterm_waits_for_a_stream_then_saves(self):
        path = self.write_config(self.durable_doc(), "sub.json")
        server, port = serve(self, path)
        release = threading.Event()
        self.fake.mode = {"hold_after": (2, release)}
        sock = open_request(port, CHAT_PATH, dict(CHAT, stream=True),
                            close=True)
        self.addCleanup(sock.close)
        buf = read_until(sock, bytearray(),
                         lambda b: b.count(b"data: ") >= 2)
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(r"stopping: waiting up to 30 s for requests in "
                        r"flight")
        # past its accept loop, the server must still wait for the stream
        wait_listener_closed(port)
        server.assert_running_for(self, 0.5)
        release.set()
        read_until(sock, buf, lambda b: False)    # to the end of stream
        reply, ended = dechunk(buf)
        self.assertEqual(reply.status, 200)
        self.assertTrue(ended)
        events = reply.datas()
        self.assertEqual(len(events), 5)
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual("".join(
            json.loads(e)["choices"][0]["delta"].get("content", "")
            for e in events[:-1]), "Hello!")
        self.assertEqual(server.finish(), 0)
        self.assertRegex(server.err, r"Z stopped\n$")
        self.assertNotIn("cut off", server.err)
        self.assertEqual(self.read_state()["users"], {"alice": {
            "window_start": LONG_WINDOW, "used": CHAT_TOTAL}})

    def test_sigterm_waits_for_a_request_still_uploading(self):
        path = self.write_config(self.durable_doc(), "sub.json")
        server, port = serve(self, path)
        sock = open_request(port, CHAT_PATH, CHAT, close=True, expect=True)
        self.addCleanup(sock.close)
        # the gateway took the request: it asks for the body
        buf = read_until(sock, bytearray(), lambda b: b"\r\n\r\n" in b)
        self.assertEqual(bytes(buf), b"HTTP/1.1 100 Continue\r\n\r\n")
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(r"stopping: waiting up to 30 s")
        wait_listener_closed(port)
        server.assert_running_for(self, 0.5)
        sock.sendall(json.dumps(CHAT).encode())
        raw = read_until(sock, bytearray(), lambda b: False)
        self.assertEqual(status_of(bytes(raw)), 200)
        self.assertEqual(json.loads(body_of(bytes(raw)))["usage"],
                         CHAT_USAGE)
        self.assertEqual(server.finish(), 0)
        self.assertEqual(self.read_state()["users"], {"alice": {
            "window_start": LONG_WINDOW, "used": CHAT_TOTAL}})

    def test_sigint_saves_and_exits_0(self):
        path = self.write_config(self.durable_doc(), "sub.json")
        server, port = serve(self, path)
        self.assertEqual(call(port, "POST", CHAT_PATH, CHAT,
                              key=BOB_KEY).status, 200)
        server.proc.send_signal(signal.SIGINT)
        self.assertEqual(server.finish(), 0)
        self.assertEqual(self.read_state()["users"], {"bob": {
            "window_start": LONG_WINDOW, "used": CHAT_TOTAL}})

    def test_usage_command_prints_the_table(self):
        self.restart(self.durable_doc())
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        self.gateway.stop(0)
        path = os.path.join(self.dir, "config.json")
        result = run_script(["usage", "--config", path])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines(), [
            "user   limit   used  remaining  resets_at",
            "alice  100000  18    99982      %s" % LONG_RESET_ISO,
            "bob    50000   0     50000      %s" % LONG_RESET_ISO])
        # without a state file there is nothing to print
        plain = self.write_config(self.config(), "plain.json")
        result = run_script(["usage", "--config", plain])
        self.assertEqual(result.returncode, 2)
        self.assertIn("has no stateFile", result.stderr)


# 4. Live reload and revocation ###############################################

class ReloadTest(Issue4Test):

    NEW_KEY = "alice-NEW-0123456789"    # as long as ALICE_KEY

    def doc_with(self, alice=None, bob_tokens=50000):
        doc = self.config()
        doc["users"] = [{"name": "bob", "apiKey": BOB_KEY,
                         "tokens": bob_tokens}]
        if alice is not None:
            doc["users"].insert(0, {"name": "alice", "apiKey": alice,
                                    "tokens": 100000})
        return doc

    def bump(self, path):
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10 ** 9))

    def test_changed_key_refused_on_a_kept_alive_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                          timeout=TIMEOUT)
        self.addCleanup(conn.close)
        reply = call(self.port, "POST", CHAT_PATH, CHAT, conn=conn)
        self.assertEqual(reply.status, 200)
        self.assertNotIn("connection", reply.headers)
        kept = conn.sock
        self.assertIsNotNone(kept)
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT,
                              key=BOB_KEY).status, 200)
        self.write_config(self.doc_with(self.NEW_KEY, bob_tokens=60000))
        self.assertTrue(self.gateway.reload())
        self.assertIs(conn.sock, kept)
        reply = call(self.port, "POST", CHAT_PATH, CHAT, conn=conn)
        self.assert_refused(reply, "invalid_api_key", "The API key is not "
                            "valid for this gateway.")
        self.assertEqual(self.fake.count(), 2)
        reply = call(self.port, "POST", CHAT_PATH, CHAT, key=self.NEW_KEY)
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.usage("alice"), 2 * CHAT_TOTAL)
        self.assertEqual(self.figures("bob")["used"], CHAT_TOTAL)
        self.assertEqual(self.figures("bob")["limit"], 60000)
        self.assertIn("config reloaded: 2 providers, 2 users",
                      self.logs.text())

    def test_removed_user_refused_on_a_kept_alive_usage_poll(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                          timeout=TIMEOUT)
        self.addCleanup(conn.close)
        reply = call(self.port, "GET", llmgate.USAGE_PATH, conn=conn)
        self.assertEqual(reply.status, 200)
        kept = conn.sock
        self.write_config(self.doc_with(None))
        self.assertTrue(self.gateway.reload())
        self.assertIs(conn.sock, kept)
        reply = call(self.port, "GET", llmgate.USAGE_PATH, conn=conn)
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.json()["error"]["code"], "invalid_api_key")

    def test_running_stream_finishes_after_reload(self):
        release = threading.Event()
        self.fake.mode = {"hold_after": (2, release)}
        sock = open_request(self.port, CHAT_PATH, dict(CHAT, stream=True),
                            close=True)
        self.addCleanup(sock.close)
        buf = read_until(sock, bytearray(),
                         lambda b: b.count(b"data: ") >= 2)
        self.write_config(self.doc_with(None))
        self.assertTrue(self.gateway.reload())
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.status, 401)
        release.set()
        read_until(sock, buf, lambda b: False)
        reply, ended = dechunk(buf)
        self.assertEqual((reply.status, ended), (200, True))
        events = reply.datas()
        self.assertEqual((len(events), events[-1]), (5, "[DONE]"))
        lines = self.wait_log(
            lambda lines: any("status=200" in line for line in lines))
        streamed = [line for line in lines if "status=200" in line]
        self.assertIn(" in=11 out=7 ", streamed[0])
        self.assertFalse(streamed[0].endswith(" aborted"))
        self.assertEqual(self.account("alice").used, CHAT_TOTAL)

    def test_file_watcher_reloads_on_its_own(self):
        self.assertEqual(self.usage("bob"), 0)
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT,
                              key=BOB_KEY).status, 200)
        path = self.write_config(self.doc_with(self.NEW_KEY))
        self.bump(path)
        self.assertTrue(self.gateway.wait_reload(1, 5))
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 401)
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT,
                              key=self.NEW_KEY).status, 200)
        self.assertEqual(self.usage("bob"), CHAT_TOTAL)

    def test_a_broken_config_is_logged_and_ignored(self):
        good = self.gateway.config
        bad = self.config()
        bad["users"][0]["tokens"] = -1
        self.write_config(bad)
        self.assertFalse(self.gateway.reload())
        self.assertIn("error: config reload failed, keeping the last good "
                      "config: users[0].tokens must be a non-negative "
                      "integer\n", self.logs.text())
        self.assertIs(self.gateway.config, good)
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        # a half-written file, found by the watcher
        path = os.path.join(self.dir, "config.json")
        with open(path, "w") as f:
            f.write('{"providers": {')
        self.bump(path)
        self.assertTrue(self.gateway.wait_reload(2, 5))
        self.assertEqual(self.logs.text().count(
            "error: config reload failed"), 2)
        self.assertIn("config.json is not valid JSON", self.logs.text())
        self.assertIs(self.gateway.config, good)
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        self.assertEqual(self.usage(), 2 * CHAT_TOTAL)

    def test_sighup_reloads_a_running_server(self):
        path = self.write_config(self.config(), "sub.json")
        server, port = serve(self, path)
        self.assertEqual(call(port, "POST", CHAT_PATH, CHAT).status, 200)
        # same size, same inode, same mtime: only the signal can tell
        st = os.stat(path)
        text = json.dumps(self.config()).replace(ALICE_KEY, self.NEW_KEY)
        with open(path, "w") as f:
            f.write(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertEqual(llmgate.config_stamp(path),
                         (st.st_mtime_ns, st.st_size, st.st_ino))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"config reloaded: 2 providers, 2 users")
        self.assertEqual(call(port, "POST", CHAT_PATH, CHAT).status, 401)
        reply = call(port, "GET", llmgate.USAGE_PATH, key=self.NEW_KEY)
        self.assertEqual(reply.json()["used"], CHAT_TOTAL)


# 5. Per-user controls ########################################################

class ControlsTest(Issue4Test):

    def alice(self, **fields):
        entry = {"name": "alice", "apiKey": ALICE_KEY, "tokens": 100000}
        entry.update(fields)
        self.with_users(entry, {"name": "bob", "apiKey": BOB_KEY,
                                "tokens": 50000})

    def test_models(self):
        self.alice(models=["gpt-4o", "claude-*"])
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        self.assertEqual(call(self.port, "POST", "/v1/messages",
                              MESSAGES).status, 200)
        reply = call(self.port, "POST", CHAT_PATH,
                     dict(CHAT, model="gpt-4o-mini"))
        self.assert_refused(reply, "model_not_allowed", "You may not use "
                            "the model gpt-4o-mini through this gateway.")
        reply = call(self.port, "POST", "/v1/messages",
                     dict(MESSAGES, model="o3"))
        self.assert_refused(reply, "model_not_allowed", "You may not use "
                            "the model o3 through this gateway.",
                            family="anthropic")
        self.assertEqual(self.fake.count(), 2)
        self.assertEqual(self.usage(), CHAT_TOTAL + ANTHROPIC_TOTAL)
        self.assertEqual(self.account().reserved, 0)
        self.assertEqual(call(self.port, "POST", CHAT_PATH,
                              dict(CHAT, model="o3"),
                              key=BOB_KEY).status, 200)

    def test_models_hold_whatever_the_body_is_labelled(self):
        self.alice(models=["gpt-4o"])
        body = json.dumps(dict(CHAT, model="gpt-4o-mini")).encode()
        message = ("You may not use the model gpt-4o-mini through this "
                   "gateway.")
        # JSON with a leading newline and no Content-Type: the gateway
        # sniffs JSON without a Content-Type, and providers read it
        reply = call(self.port, "POST", CHAT_PATH, b"\n" + body)
        self.assert_refused(reply, "model_not_allowed", message)
        # JSON labelled text/plain, which servers such as Ollama read
        reply = call(self.port, "POST", CHAT_PATH, body,
                     headers={"Content-Type": "text/plain"})
        self.assert_refused(reply, "model_not_allowed", message)
        self.assertEqual(self.fake.count(), 0)

    def form(self, parts, boundary="LlmGate-Bound4ry"):
        """A multipart/form-data body of (name, value) parts, and its
        Content-Type."""
        b = boundary.encode()
        body = b""
        for name, value in parts:
            body += (b"--" + b + b"\r\nContent-Disposition: form-data; "
                     b'name="' + name.encode() + b'"\r\n\r\n' + value +
                     b"\r\n")
        return (body + b"--" + b + b"--\r\n",
                'multipart/form-data; boundary="%s"' % boundary)

    def upload(self, body, ctype):
        return call(self.port, "POST", "/v1/audio/transcriptions", body,
                    {"Content-Type": ctype})

    def test_models_hold_for_multipart_uploads(self):
        self.alice(models=["whisper-1"])
        body, ctype = self.form([("model", b"whisper-1"),
                                 ("file", b"RIFF....WAVE")])
        self.assertEqual(self.upload(body, ctype).status, 200)
        self.assertEqual(self.fake.last().body, body)
        message = ("You may not use the model gpt-4o-transcribe through "
                   "this gateway.")
        # the file comes first and holds what looks like an allowed
        # model field: only the form's own field counts
        fake_field = (b'--x\r\nContent-Disposition: form-data; '
                      b'name="model"\r\n\r\nwhisper-1\r\n')
        body, ctype = self.form([("file", fake_field),
                                 ("model", b"gpt-4o-transcribe")])
        self.assert_refused(self.upload(body, ctype), "model_not_allowed",
                            message)
        # the boundary keeps its case; an unquoted one works as well
        body, _ = self.form([("model", b"gpt-4o-transcribe")], "AbC")
        self.assert_refused(self.upload(
            body, "Multipart/Form-Data; boundary=AbC; charset=utf-8"),
            "model_not_allowed", message)
        self.assertEqual(self.fake.count(), 1)

    def test_a_form_naming_its_model_twice_is_refused(self):
        self.alice(models=["whisper-1"])
        body, ctype = self.form([("model", b"whisper-1"),
                                 ("model", b"gpt-4o-transcribe")])
        reply = self.upload(body, ctype)
        self.assert_refused(reply, "invalid_request",
                            "The form names its model more than once.")
        parts = [("f%d" % i, b"v") for i in range(
            llmgate.MAX_FORM_PARTS + 1)]
        body, ctype = self.form(parts)
        self.assert_refused(self.upload(body, ctype), "invalid_request",
                            "The form has more than %d parts."
                            % llmgate.MAX_FORM_PARTS)
        self.assert_never_forwarded()
        self.assertEqual(self.usage(), 0)

    def test_a_form_parsers_could_read_two_ways_is_refused(self):
        # quoted parameters hide a second name or boundary from a naive
        # split on ";"; a name* or a doubled one is read differently by
        # different parsers: none of them may pick the model for llmgate
        self.alice(models=["allowed"])
        cd = b"Content-Disposition: form-data; "
        # read as a parser reads it, the first part is a note, not the
        # model: the model is the second part's, and it is not allowed
        body = (b"--B\r\n" + cd + b'x="; name=model"; name="note"\r\n\r\n'
                b"allowed\r\n--B\r\n" + cd + b'name="model"\r\n\r\n'
                b"forbidden\r\n--B--\r\n")
        self.assert_refused(
            self.upload(body, "multipart/form-data; boundary=B"),
            "model_not_allowed", "You may not use the model forbidden "
            "through this gateway.")
        cases = [
            (cd + b"name*=utf-8''model", "Content-Disposition"),
            (cd + b'name="model"; name="note"', "Content-Disposition"),
            (cd + b'name="model', "Content-Disposition"),
            (cd + b'name="model"\r\n' + cd + b'name="note"',
             "Content-Disposition")]
        for head, what in cases:
            with self.subTest(head=head):
                body = (b"--B\r\n" + head + b"\r\n\r\nforbidden\r\n"
                        b"--B--\r\n")
                self.assert_refused(
                    self.upload(body, "multipart/form-data; boundary=B"),
                    "invalid_request", "A part of the form has a %s "
                    "llmgate cannot read safely." % what)
        body, _ = self.form([("model", b"allowed")], "BBB")
        for ctype in ('multipart/form-data; x="; boundary=AAA"; '
                      'boundary=BBB; boundary=AAA',
                      "multipart/form-data; boundary*=utf-8''BBB",
                      'multipart/form-data; boundary="BBB'):
            with self.subTest(ctype=ctype):
                self.assert_refused(
                    self.upload(body, ctype), "invalid_request",
                    "The form's Content-Type cannot be read safely.")
        # a quoted ";" is just text, and the name after it counts
        body, _ = self.form([("model", b"allowed")], "a;b")
        self.assertEqual(self.upload(
            body, 'multipart/form-data; x="y;z"; boundary="a;b"').status,
            200)
        self.assertEqual(self.fake.count(), 1)

    def test_a_limited_key_must_name_its_model_plainly(self):
        self.alice(models=["whisper-1"])
        unknown = ("Your key is limited to some models, and llmgate cannot "
                   "tell which model this request is for; name it in a "
                   "\"model\" field.")
        # a long or padded name is still the name: no way around the list
        padded = b"gpt-4o-transcribe" + b" " * 300
        body, ctype = self.form([("model", padded)])
        self.assert_refused(self.upload(body, ctype), "model_not_allowed",
                            "You may not use the model gpt-4o-transcribe "
                            "through this gateway.")
        # no model field, or a form without a boundary: no model known
        body, ctype = self.form([("file", b"RIFF")])
        self.assert_refused(self.upload(body, ctype), "model_not_allowed",
                            unknown)
        self.assert_refused(self.upload(body, "multipart/form-data"),
                            "model_not_allowed", unknown)
        # JSON without a model, on a path that generates
        reply = call(self.port, "POST", CHAT_PATH,
                     {"messages": CHAT["messages"]})
        self.assert_refused(reply, "model_not_allowed", unknown)
        # a part whose head never ends could hide a second model field
        body, ctype = self.form([("model", b"whisper-1")])
        body = body[:-len(b"--LlmGate-Bound4ry--\r\n")] + (
            b"--LlmGate-Bound4ry\r\nContent-Disposition: form-data; "
            b'name="model"\r\nX-Pad: ' + b"p" * llmgate.MAX_HEADER_BYTES +
            b"\r\n\r\ngpt-4o-transcribe\r\n--LlmGate-Bound4ry--\r\n")
        self.assert_refused(
            self.upload(body, ctype), "invalid_request",
            "A part of the form has no head llmgate can read (at most "
            "%d bytes, ended by an empty line)." % llmgate.MAX_HEADER_BYTES)
        # a second model field behind bare line feeds, which a lax parser
        # would take for a part of its own
        body, ctype = self.form([("model", b"whisper-1"), (
            "file", b"RIFF\n--LlmGate-Bound4ry\nContent-Disposition: "
            b'form-data; name="model"\n\ngpt-4o-transcribe\n')])
        self.assert_refused(
            self.upload(body, ctype), "invalid_request",
            "The form's boundary appears where it does not delimit a part.")
        self.assert_never_forwarded()
        # a key with no list may send a form without a model
        body, ctype = self.form([("file", b"RIFF")])
        reply = call(self.port, "POST", "/v1/audio/transcriptions", body,
                     {"Content-Type": ctype}, key=BOB_KEY)
        self.assertEqual(reply.status, 200)

    def sent(self, path, body):
        reply = call(self.port, "POST", path, body)
        self.assertEqual(reply.status, 200, reply.body)
        return self.fake.last()

    def test_max_output_tokens_caps_and_inserts(self):
        self.alice(maxOutputTokens=50)
        cases = [
            (CHAT_PATH, dict(CHAT, max_tokens=1000),
             dict(CHAT, max_tokens=50)),
            (CHAT_PATH, dict(CHAT, max_completion_tokens=1000),
             dict(CHAT, max_completion_tokens=50)),
            (CHAT_PATH, dict(CHAT, max_tokens=1000,
                             max_completion_tokens=70),
             dict(CHAT, max_tokens=50, max_completion_tokens=50)),
            (CHAT_PATH, CHAT, dict(CHAT, max_completion_tokens=50)),
            ("/v1/responses", {"model": "gpt-4o", "input": "hi",
                               "max_output_tokens": 1000},
             {"model": "gpt-4o", "input": "hi", "max_output_tokens": 50}),
            ("/v1/responses", {"model": "gpt-4o", "input": "hi"},
             {"model": "gpt-4o", "input": "hi", "max_output_tokens": 50}),
            ("/v1/messages", MESSAGES, dict(MESSAGES, max_tokens=50)),
            ("/v1/messages", {"model": "claude-sonnet-4", "messages": []},
             {"model": "claude-sonnet-4", "messages": [], "max_tokens": 50}),
            ("/v1/completions", {"model": "m", "prompt": "hi"},
             {"model": "m", "prompt": "hi", "max_tokens": 50}),
        ]
        for path, body, expected in cases:
            self.assertEqual(self.sent(path, body).json(), expected,
                             (path, body))
        # under the cap: forwarded byte for byte
        body = dict(CHAT, max_tokens=20)
        self.assertEqual(self.sent(CHAT_PATH, body).body,
                         json.dumps(body).encode())
        # streamed: capped, and asked for its usage
        rec = self.sent(CHAT_PATH, dict(CHAT, stream=True, max_tokens=99))
        self.assertEqual(rec.json(), dict(
            CHAT, stream=True, max_tokens=50,
            stream_options={"include_usage": True}))

    def test_max_output_tokens_shrinks_the_reservation(self):
        self.alice(maxOutputTokens=50)
        with self.held_request():
            self.assertEqual(self.figures()["reserved"], 53)

    def test_rpm(self):
        self.alice(rpm=2)
        moment = self.fix_clock()
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        moment[0] = NOW + 10
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        moment[0] = NOW + 20
        message = ("You have sent 2 requests in the last minute, your "
                   "limit; retry in 40 s.")
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assert_refused(reply, "rate_limit_exceeded", message, "40")
        reply = call(self.port, "POST", "/v1/messages", MESSAGES)
        self.assert_refused(reply, "rate_limit_exceeded", message, "40",
                            family="anthropic")
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT,
                              key=BOB_KEY).status, 200)
        moment[0] = NOW + 60        # the first request leaves the minute
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.status, 429)
        self.assertEqual(reply.headers["retry-after"], "10")
        self.assertEqual(self.fake.count(), 4)
        self.assertEqual(self.usage(), 3 * CHAT_TOTAL)

    def test_max_parallel(self):
        self.alice(maxParallel=1)
        with self.held_request():
            reply = call(self.port, "POST", CHAT_PATH, CHAT)
            self.assert_refused(reply, "too_many_parallel_requests",
                                "You already have 1 requests in flight, "
                                "your limit; retry when one finishes.",
                                str(llmgate.PARALLEL_RETRY_AFTER_S))
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        self.assertEqual(self.fake.count(), 2)
        self.assertEqual(self.account().in_flight, 0)

    def test_expires(self):
        self.alice(expires="2000-01-01")
        message = ("This key expired at 2000-01-01T00:00:00Z; ask the "
                   "gateway's admin for a new one.")
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assert_refused(reply, "key_expired", message)
        reply = call(self.port, "POST", "/v1/messages", MESSAGES)
        self.assert_refused(reply, "key_expired", message,
                            family="anthropic")
        self.alice(expires="2001-02-03T04:05:06Z")
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assertEqual(reply.json()["error"]["message"],
                         "This key expired at 2001-02-03T04:05:06Z; ask "
                         "the gateway's admin for a new one.")
        self.assertEqual(self.fake.count(), 0)
        self.alice(expires="2999-12-31")
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        for bad in ("next tuesday", "2027-02-30", "2027-01-31T25:00",
                    "2027-01-31T18:00+24:00", "2027-1-31", 20270131):
            with self.assertRaises(llmgate.ConfigError, msg=bad):
                llmgate.parse_expiry(bad, "users[0].expires")
        # read alike on every Python: fractions, offsets, no seconds
        for text, moment in (
                ("2027-01-31", 1801353600),
                ("2027-01-31T18:00:00.5Z", 1801418400.5),
                ("2027-01-31T18:00", 1801418400),
                ("2027-01-31T18", 1801418400),
                ("2027-01-31 18:00:00+05:30", 1801418400 - 19800),
                ("2027-01-31T18:00:00-0800", 1801418400 + 28800)):
            self.assertEqual(llmgate.parse_expiry(text, "x"), moment, text)

    def test_disabled(self):
        self.alice(disabled=True)
        reply = call(self.port, "POST", CHAT_PATH, CHAT)
        self.assert_refused(reply, "key_disabled", "This user is disabled; "
                            "ask the gateway's admin.")
        reply = call(self.port, "GET", llmgate.USAGE_PATH)
        self.assertEqual(reply.status, 401)
        self.assertEqual(self.fake.count(), 0)
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT,
                              key=BOB_KEY).status, 200)
        self.alice(disabled=False)
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)


# 6. Keys at rest #############################################################

class KeysTest(Issue4Test):

    def test_hashed_and_several_keys(self):
        bob2, bob3, bob4 = ("bob-second-key-0001", "bob-third-key-0002",
                            "bob-fourth-key-0003")
        doc = self.config()
        doc["users"] = [
            {"name": "alice", "apiKeySha256": sha(ALICE_KEY),
             "tokens": 100000},
            {"name": "bob", "apiKeys": [BOB_KEY, bob2],
             "apiKeySha256s": [sha(bob3), sha(bob4).upper()],
             "tokens": 50000}]
        self.restart(doc)
        with open(os.path.join(self.dir, "config.json")) as f:
            text = f.read()
        self.assertNotIn(ALICE_KEY, text)
        self.assertNotIn(bob3, text)
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        for key in (BOB_KEY, bob2, bob3, bob4):
            self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT,
                                  key=key).status, 200, key)
        self.assertEqual(self.usage("alice"), CHAT_TOTAL)
        self.assertEqual(self.usage("bob"), 4 * CHAT_TOTAL)
        reply = call(self.port, "POST", CHAT_PATH, CHAT, key=sha(ALICE_KEY))
        self.assertEqual(reply.status, 401)   # the hash is not a key
        self.assertEqual(llmgate.config_warnings(self.gateway.config)[:1], [
            "1 user(s) have plaintext keys in the config (bob); "
            "`llmgate.py keygen NAME` makes a hashed one"])

    def test_a_key_ending_in_a_latin_1_space_byte_works_as_bearer(self):
        # "voil\u00e0" ends in the bytes C3 A0; A0 is not whitespace in a
        # header, however str.strip reads it
        key = "secret-key-voil\u00e0"
        doc = self.config()
        doc["users"][0]["apiKey"] = key
        self.restart(doc)
        sent = key.encode("utf-8").decode("latin-1")
        raw, _ = raw_exchange(self.port, request(
            "GET", llmgate.USAGE_PATH, [("Connection", "close")], key=sent))
        self.assertEqual(status_of(raw), 200, raw[:200])

    def test_keygen(self):
        result = run_script(["keygen", "carol", "--tokens", "500"])
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], "key (give it to carol; it is not "
                         "stored anywhere):")
        self.assertEqual(lines[2], 'config entry for "users":')
        key = lines[1].strip()
        self.assertRegex(key, r"^lg-[A-Za-z0-9_-]{43}$")
        entry = json.loads(lines[3])
        self.assertEqual(entry, {"name": "carol", "apiKeySha256": sha(key),
                                 "tokens": 500})
        self.assertNotIn(key, lines[3])
        again = run_script(["keygen", "carol"]).stdout
        self.assertNotIn(key, again)
        self.assertIn('"tokens": 100000', again)
        doc = self.config()
        doc["users"].append(entry)
        self.restart(doc)
        reply = call(self.port, "POST", CHAT_PATH, CHAT, key=key)
        self.assertEqual(reply.status, 429)     # 3 + 4096 > 500
        self.assertEqual(reply.json()["error"]["code"], "quota_exceeded")
        reply = call(self.port, "POST", CHAT_PATH,
                     dict(CHAT, max_tokens=100), key=key)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["x-llmgate-tokens-limit"], "500")
        self.assertEqual(self.usage("carol"), CHAT_TOTAL)

    def test_config_warnings(self):
        path = self.write_config(self.config())
        os.chmod(path, 0o644)
        warnings = llmgate.config_warnings(llmgate.load_config(path))
        self.assertEqual(warnings, [
            "2 user(s) have plaintext keys in the config (alice, bob); "
            "`llmgate.py keygen NAME` makes a hashed one",
            "%s is readable by other users (mode 644); chmod 600 it" % path])
        doc = self.config()
        doc["users"] = [{"name": "alice", "apiKeySha256": sha(ALICE_KEY),
                         "tokens": 1}]
        doc["listen"]["host"] = "0.0.0.0"
        path = self.write_config(doc)
        os.chmod(path, 0o600)
        self.assertEqual(llmgate.config_warnings(llmgate.load_config(path)),
                         ["listening on 0.0.0.0 without TLS: keys cross the "
                          "network in clear; listen on 127.0.0.1 or put a "
                          "TLS proxy in front"])
        for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
            doc["listen"]["host"] = host
            path = self.write_config(doc)
            os.chmod(path, 0o600)
            self.assertEqual(llmgate.config_warnings(
                llmgate.load_config(path)), [], host)

    def test_start_up_warns_for_a_host_given_on_the_command_line(self):
        doc = self.config()
        doc["users"] = [{"name": "alice", "apiKeySha256": sha(ALICE_KEY),
                         "tokens": 1}]
        path = self.write_config(doc)
        os.chmod(path, 0o600)
        # no socket is bound: start() is replaced by what it would return
        with mock.patch.object(llmgate.Gateway, "start",
                               return_value=("0.0.0.0", 4321)) as start:
            code = self.main_until_sigterm(["--config", path, "--host",
                                            "0.0.0.0", "--port", "0"])
        self.assertEqual(code, 0)
        self.assertEqual(start.call_args[0], ("0.0.0.0", 0))
        self.assertIn("listening on http://0.0.0.0:4321", self.logs.text())
        self.assertIn("warning: listening on 0.0.0.0 without TLS: keys "
                      "cross the network in clear; listen on 127.0.0.1 or "
                      "put a TLS proxy in front", self.logs.text())

    def test_start_up_logs_the_warnings(self):
        path = self.write_config(self.config(), "sub.json")
        os.chmod(path, 0o640)
        server, _ = serve(self, path)
        self.assertIn("warning: 2 user(s) have plaintext keys in the config "
                      "(alice, bob)", server.err)
        self.assertIn("warning: %s is readable by other users (mode 640)"
                      % path, server.err)


# 7. Admin view ###############################################################

class AdminTest(Issue4Test):

    def users(self):
        return [{"name": "alice", "apiKey": ALICE_KEY, "tokens": 100000,
                 "admin": True},
                {"name": "bob", "apiKey": BOB_KEY, "tokens": 50000}]

    def fig(self, name, limit, used):
        return {"user": name, "limit": limit, "used": used,
                "remaining": limit - used, "reserved": 0,
                "window_seconds": 3600, "resets_at": RESET_ISO}

    def test_admin_sees_every_user(self):
        self.fix_clock()
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT,
                              key=BOB_KEY).status, 200)
        reply = call(self.port, "GET", llmgate.USAGE_PATH + "?all=1")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json(), {"users": [
            self.fig("alice", 100000, 0), self.fig("bob", 50000, 18)]})
        for query in ("?all=0", "?all=False", "?all=FALSE", "?all="):
            reply = call(self.port, "GET", llmgate.USAGE_PATH + query)
            self.assertEqual(reply.json(), self.fig("alice", 100000, 0))

    def test_others_get_403(self):
        self.fix_clock()
        self.assertEqual(call(self.port, "POST", CHAT_PATH, CHAT).status, 200)
        for query in ("?all=1", "?all=true", "?x=1&all=yes"):
            reply = call(self.port, "GET", llmgate.USAGE_PATH + query,
                         key=BOB_KEY)
            self.assert_refused(reply, "not_admin", "Only an admin may see "
                                "every user's usage.")
            self.assertNotIn(b"alice", reply.body)
        reply = call(self.port, "GET", llmgate.USAGE_PATH, key=BOB_KEY)
        self.assertEqual(reply.json(), self.fig("bob", 50000, 0))
        reply = call(self.port, "GET", llmgate.USAGE_PATH + "?all=1", key=None)
        self.assertEqual(reply.status, 401)


if __name__ == "__main__":
    unittest.main()
