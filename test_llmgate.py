"""Tests for llmgate.py.

Every test runs real servers on 127.0.0.1, port 0: the gateway, and a fake
provider that speaks the event sequences real providers send (OpenAI chat
and Responses, Anthropic Messages, Azure).  Every socket has a timeout;
nothing waits on a fixed sleep.  Run with:

    python3 -m unittest -v test_llmgate
"""

import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
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
from unittest import mock

import llmgate

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "llmgate.py")
TIMEOUT = 10            # seconds, on every socket and wait in these tests
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
ANTHROPIC_OUTPUT = 12
ANTHROPIC_TOTAL = 30 + 100 + 200 + 12


# The fake provider ###########################################################

class Recorded:
    """One request as the fake provider saw it."""

    def __init__(self, method, path, headers, body, peer):
        self.method = method
        self.path = path
        self.headers = headers          # list of (name, value)
        self.body = body
        self.peer = peer                # the gateway's (host, port)

    def header(self, name):
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def names(self):
        return [key.lower() for key, _ in self.headers]

    def json(self):
        return json.loads(self.body)


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


class FakeProvider:
    """A provider on 127.0.0.1:0 speaking OpenAI, Anthropic and Azure.

    Tests steer it through `mode`:
      gzip           compress answers (streams too)
      break_after    send this many events, then drop the connection
      hold           an Event to wait on before answering (a slow provider)
      hold_after     (n, Event): send n events, wait for the Event
      status         (code, doc): answer with this error instead
      error_after    send this many Anthropic events, then an error event
      responses_end  the Responses stream's last event type
      no_usage       report no usage at all
    `gone` is set when a stream's client (the gateway) hung up."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.mode = {}
        self.gone = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      FakeHandler)
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

    def last(self):
        with self.lock:
            return self.requests[-1]

    def count(self):
        with self.lock:
            return len(self.requests)

    # answers

    def respond(self, h, rec):
        mode = self.mode
        if "hold" in mode:
            mode["hold"].wait(TIMEOUT)
        if "status" in mode:
            code, doc = mode["status"]
            return h.send_json(code, doc)
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
        compressor = None
        headers = ()
        if mode.get("gzip"):
            import zlib
            compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
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
                        __import__("zlib").Z_SYNC_FLUSH)
                h.send_chunk(event)
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

    def chat_events(self, doc):
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                "model": doc.get("model")}
        with_usage = (doc.get("stream_options") or {}).get("include_usage")
        for i, text in enumerate(["Hel", "lo", "!"]):
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
        for text in ["Hel", "lo", "!"]:
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
        for text in ["Hel", "lo", "!"]:
            events.append(sse({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": text}},
                              "content_block_delta"))
        events.append(sse({"type": "content_block_stop", "index": 0},
                          "content_block_stop"))
        events.append(sse({"type": "message_delta",
                           "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": ANTHROPIC_OUTPUT}},
                          "message_delta"))
        events.append(sse({"type": "message_stop"}, "message_stop"))
        if "error_after" in self.mode:
            n = self.mode["error_after"]
            events = events[:n] + [sse({"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}},
                "error")] + events[n:]
        return events


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


def raw_exchange(port, data, read=True):
    """Send raw bytes; return all the gateway sends until it closes or
    TIMEOUT passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        if not read:
            return b""
        chunks = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                got = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not got:
                break
            chunks.append(got)
        return b"".join(chunks)


def status_of(raw):
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else None


def body_of(raw):
    return raw.split(b"\r\n\r\n", 1)[1]


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude-sonnet-4", "max_tokens": 1000,
            "messages": [{"role": "user", "content": "hi"}]}


# The gateway under test ######################################################

class LogCapture(io.StringIO):
    """A thread-safe stand-in for stderr."""

    def __init__(self):
        io.StringIO.__init__(self)
        self.lock = threading.Lock()

    def write(self, text):
        with self.lock:
            return io.StringIO.write(self, text)

    def text(self):
        with self.lock:
            return self.getvalue()


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
                "providers": self.providers(), "limitResetPeriod": 3600,
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

    def write_config(self, doc):
        path = os.path.join(self.dir, "config.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    def start(self, doc):
        path = self.write_config(doc)
        self.gateway = llmgate.Gateway(llmgate.load_config(path))
        _, self.port = self.gateway.start(poll_interval=0.02)
        self.addCleanup(self.gateway.stop, 0)

    def restart(self, doc):
        """Stop the running gateway and start one on `doc`."""
        self.gateway.stop(0)
        self.start(doc)

    def usage(self, name="alice"):
        user = [u for u in self.gateway.config.users if u.name == name][0]
        return self.gateway.ledger.figures(user)["used"]

    def log_lines(self):
        return [line for line in self.logs.text().splitlines()
                if " status=" in line]


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
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["transfer-encoding"], "chunked")
        sent = self.fake.last().json()
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        datas = [d for _, d in reply.events()]
        self.assertEqual(datas[-1], "[DONE]")
        chunks = [json.loads(d) for d in datas[:-1]]
        self.assertEqual(len(chunks), 4)
        self.assertTrue(all(c["choices"] for c in chunks))
        self.assertEqual(self.usage(), 18)

    def test_streamed_chat_keeps_the_usage_chunk_when_asked(self):
        body = dict(CHAT, stream=True, stream_options={"include_usage": True})
        reply = call(self.port, "POST", "/v1/chat/completions", body)
        self.assertEqual(self.fake.last().body, json.dumps(body).encode())
        chunks = [json.loads(d) for _, d in reply.events()[:-1]]
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"], CHAT_USAGE)
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


if __name__ == "__main__":
    unittest.main()
