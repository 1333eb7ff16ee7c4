# ruff: noqa: UP031  (runs on the image's python3, which may be old)
# The boxlite Python kernel: a long-lived interpreter inside the box that runs cells with
# state kept between them. Started by the host as `python3 -c <this source>`; speaks the frame
# protocol of docs/interpreter.md on its original stdout. Runs on the image's own python3
# (3.8 or newer) with the standard library only.
import ast
import base64
import builtins
import codecs
import importlib
import json
import linecache
import os
import signal
import sys
import threading
import traceback

PREFIX = b"\x1e\x1fBOXLITE:"
# Output kept per stream per run; more is counted and dropped here (the host caps it again).
OUTPUT_CAP = int(os.environ.pop("BOXLITE_OUTPUT_CAP", str(1 << 20)))
SYNC = ("\x00boxlite-sync-%s\x00" % os.urandom(8).hex()).encode()

KERNEL_FILE = sys._getframe().f_code.co_filename  # "<string>" under `python3 -c`
_proto_fd = os.dup(1)
_requests = os.fdopen(os.dup(0), "rb")
_send_lock = threading.Lock()


def send(message):
    data = PREFIX + json.dumps(message, default=repr).encode("utf-8", "backslashreplace") + b"\n"
    with _send_lock:
        view = memoryview(data)
        while view:
            view = view[os.write(_proto_fd, view) :]


class Forwarder(threading.Thread):
    """Reads what the cell (and its children) write to fd 1 or 2 and sends it as frames."""

    def __init__(self, fd, name):
        super().__init__(name="boxlite-" + name, daemon=True)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.fd, self.read_end, self.name_ = fd, read_end, name
        self.synced = threading.Event()
        self.sent = self.dropped = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def emit(self, data, final=False):
        text = self.decoder.decode(data, final)
        if not text:
            return
        room = OUTPUT_CAP - self.sent
        if room <= 0:
            self.dropped += len(text)
            return
        if len(text) > room:
            self.dropped += len(text) - room
            text = text[:room]
        self.sent += len(text)
        send({"type": self.name_, "text": text})

    def run(self):
        pending = b""
        while True:
            chunk = os.read(self.read_end, 65536)
            if not chunk:
                return
            pending += chunk
            while True:
                at = pending.find(SYNC)
                if at < 0:
                    break
                self.emit(pending[:at], final=True)
                pending = pending[at + len(SYNC) :]
                if self.dropped:
                    send({"type": "truncated", "stream": self.name_, "chars": self.dropped})
                self.sent = self.dropped = 0
                self.synced.set()
            # Keep a tail that might be the start of a sync marker.
            keep = 0
            for size in range(min(len(SYNC) - 1, len(pending)), 0, -1):
                if SYNC.startswith(pending[-size:]):
                    keep = size
                    break
            self.emit(pending[: len(pending) - keep])
            pending = pending[len(pending) - keep :]

    def sync(self):
        self.synced.clear()
        os.write(self.fd, SYNC)
        self.synced.wait(10)


MIME_METHODS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("application/pdf", "_repr_pdf_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
    ("application/javascript", "_repr_javascript_"),
)
BINARY = ("image/png", "image/jpeg", "application/pdf")


def jsonable(mime, value):
    if mime in BINARY and isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode()
    if mime == "application/json":
        return value
    return value if isinstance(value, str) else str(value)


def mime_bundle(obj):
    """What IPython's display formatter would produce: every `_repr_*_` the object has."""
    data = {}
    bundle = getattr(obj, "_repr_mimebundle_", None)
    if callable(bundle):
        try:
            got = bundle(include=None, exclude=None)
            got = got[0] if isinstance(got, tuple) else got
            for mime, value in dict(got or {}).items():
                data[str(mime)] = jsonable(mime, value)
        except Exception:
            pass
    for mime, method in MIME_METHODS:
        fn = getattr(obj, method, None)
        if mime in data or not callable(fn) or isinstance(obj, type):
            continue
        try:
            value = fn()
        except Exception:
            continue
        if isinstance(value, tuple):
            value = value[0]
        if value is not None:
            data[mime] = jsonable(mime, value)
    if "text/plain" not in data:
        try:
            data["text/plain"] = repr(obj)
        except Exception as error:
            data["text/plain"] = "<repr failed: %r>" % (error,)
    return data


def display(*objs, **_ignored):
    """Shows each object as a rich result of the running cell (IPython's `display`)."""
    for obj in objs:
        send({"type": "result", "data": mime_bundle(obj), "main": False})


def show_figures():
    """Sends matplotlib figures left open by the cell as PNG results, as a notebook would."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    import io

    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        send(
            {
                "type": "result",
                "data": {"text/plain": repr(figure), "image/png": base64.b64encode(buffer.getvalue()).decode()},
                "main": False,
            }
        )
    pyplot.close("all")


def add_new_site_dirs():
    import site

    folders = list(getattr(site, "getsitepackages", lambda: [])())
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    for folder in folders:
        if folder not in sys.path and os.path.isdir(folder):
            site.addsitedir(folder)


class Kernel:
    def __init__(self):
        self.namespace = {"__name__": "__main__", "__builtins__": builtins, "display": display}
        self.count = 0
        self.in_cell = False
        self.loop = None  # made on the first cell that awaits (asyncio is slow to import)
        self.forwarders = [Forwarder(1, "stdout"), Forwarder(2, "stderr")]
        for forwarder in self.forwarders:
            forwarder.start()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdin = open(os.devnull)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.argv = [""]
        builtins.display = display
        os.environ.setdefault("MPLBACKEND", "Agg")
        signal.signal(signal.SIGINT, self.on_interrupt)

    def on_interrupt(self, signum, frame):
        # Only a running cell is interrupted; a stray SIGINT between cells is ignored.
        if self.in_cell:
            raise KeyboardInterrupt

    def serve(self):
        send({"type": "ready", "language": "python", "version": sys.version.split()[0], "pid": os.getpid()})
        while True:
            try:
                line = _requests.readline()
            except KeyboardInterrupt:
                continue
            if not line:
                return
            try:
                request = json.loads(line)
            except ValueError:
                continue
            if request.get("op") == "run":
                self.run(str(request.get("id")), str(request.get("code", "")))

    def run(self, run_id, code):
        # Packages installed since the last cell (pip in another process) must be importable,
        # also from a site-packages folder that pip has only just made.
        importlib.invalidate_caches()
        add_new_site_dirs()
        self.count += 1
        filename = "<cell-%d>" % self.count
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            self.in_cell = True
            try:
                self.execute(code, filename)
            finally:
                self.in_cell = False
        except SystemExit as stop:
            status = stop.code
            if status not in (None, 0):
                if not isinstance(status, int):
                    sys.stderr.write("%s\n" % (status,))
                    status = 1
                send(
                    {
                        "type": "error",
                        "name": "SystemExit",
                        "value": str(stop.code),
                        "traceback": "",
                        "exit_code": status,
                    }
                )
        except BaseException as error:
            self.report(error)
        try:
            show_figures()
        except Exception as error:
            self.report(error)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        for forwarder in self.forwarders:
            forwarder.sync()
        send({"type": "done", "id": run_id, "execution_count": self.count})

    def execute(self, code, filename):
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        flags = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
        self.evaluate(compile(tree, filename, "exec", flags=flags))
        if last is not None:
            value = self.evaluate(compile(last, filename, "eval", flags=flags))
            if value is not None:
                self.namespace["_"] = value
                send({"type": "result", "data": mime_bundle(value), "main": True})

    def evaluate(self, code):
        result = eval(code, self.namespace)
        if code.co_flags & 0x80:  # CO_COROUTINE: the cell used top-level await
            if self.loop is None:
                import asyncio

                self.loop = asyncio.new_event_loop()
            result = self.loop.run_until_complete(result)
        return result

    def report(self, error):
        tb = error.__traceback__
        while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
            tb = tb.tb_next
        if isinstance(error, SyntaxError):
            tb = None
        frames = [frame for frame in traceback.extract_tb(tb) if frame.filename != KERNEL_FILE]
        lines = ["Traceback (most recent call last):\n"] if frames else []
        lines += traceback.format_list(frames) + traceback.format_exception_only(type(error), error)
        name = type(error).__name__
        value = str(error)
        sys.stderr.flush()
        send({"type": "error", "name": name, "value": value, "traceback": "".join(lines)})


Kernel().serve()
