// boxlite's Node.js kernel: a long-lived process that runs code cells with state kept between
// them and speaks the interpreter wire protocol (docs: "Kernel wire protocol").
//
//   node -e "$(cat node_kernel.js)"   or   node node_kernel.js
//
// Requests come on stdin, one JSON object a line: {"op": "run", "id": "...", "code": "..."}.
// Messages go to the real stdout as lines "\x1e\x1fBOXLITE:" + JSON: ready once, then per run
// stdout/stderr/result/error and exactly one done. Cells are evaluated by V8's REPL mode (through
// an in-process inspector session): top-level let/const/class persist and may be declared again,
// top-level await works, and the last expression's value is the result. Without an inspector
// (or with BOXLITE_NODE_KERNEL_NO_INSPECTOR set) cells run as plain scripts: no top-level await
// and no redeclaration.
//
// SIGINT interrupts a synchronous cell (vm's breakOnSigint, as Node's own REPL does) or stops
// waiting for an awaiting one; either way the run ends with an "Interrupted" error and the
// kernel goes on. Node's SIGINT watchdog is set up and taken down around each cell's
// synchronous part, and a SIGINT landing within those microseconds can be dropped (the host
// sends it again when no "done" follows within a second) or, rarely, kill the process (the
// host restarts the kernel). A dropped SIGINT can linger in the watchdog and end a later cell,
// so after every interrupt the kernel takes it with a short (50 ms) interruptible sleep.
(function boxliteNodeKernel() {
  'use strict';
  const Module = require('module');
  const path = require('path');
  const util = require('util');
  const vm = require('vm');
  const fs = require('fs');
  const { Readable, Writable } = require('stream');
  const { StringDecoder } = require('string_decoder');

  const FRAME = '\x1e\x1fBOXLITE:';
  const OBJECT_GROUP = 'boxlite-cell';
  const PIPE_BUF = 4096;
  // One hidden global: the trampoline's callee and the inspector's value hand-over.
  const SLOT = Symbol.for('boxlite.kernel');
  Object.defineProperty(globalThis, SLOT, { value: { call: null, value: undefined }, enumerable: false });
  const slot = globalThis[SLOT];
  const TRAMPOLINE = new vm.Script("globalThis[Symbol.for('boxlite.kernel')].call()", {
    filename: 'boxlite-kernel-trampoline',
  });
  const INTERRUPTED = 'ERR_SCRIPT_EXECUTION_INTERRUPTED';
  // A sleep (not a busy loop) so that the watchdog's thread gets to run even on a busy machine.
  const LINGERING_SIGINT = new vm.Script('Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50)', {
    filename: 'boxlite-kernel-pause',
  });

  // Frames are written to fd 1 with plain write(2) calls, and process.stdout/stderr are
  // replaced (before anything created Node's own) by streams whose write() only frames the
  // text: SIGINT ends a cell wherever it is, and inside Node's stream code it would leave the
  // real stdout stream stuck.
  const pause = new Int32Array(new SharedArrayBuffer(4));
  function writeLine(line) {
    const bytes = Buffer.from(line);
    let offset = 0;
    while (offset < bytes.length) {
      try {
        offset += fs.writeSync(1, bytes, offset);
      } catch (err) {
        if (err.code !== 'EAGAIN') throw err;
        Atomics.wait(pause, 0, 0, 1); // a non-blocking stdout that is full: wait for the reader
      }
    }
  }
  function send(message) {
    writeLine(FRAME + JSON.stringify(message) + '\n');
  }
  // Output frames stay within PIPE_BUF, so each goes out in one atomic write: a SIGINT that
  // ends the cell during a write leaves a whole frame or none, never a cut line.
  function sendText(type, text) {
    if (!text) return undefined;
    const line = FRAME + JSON.stringify({ type, text }) + '\n';
    if (Buffer.byteLength(line) <= PIPE_BUF || text.length < 2) return writeLine(line);
    let half = text.length >> 1;
    if (/[\ud800-\udbff]/.test(text[half - 1])) half += 1; // keep a surrogate pair together
    sendText(type, text.slice(0, half));
    return sendText(type, text.slice(half));
  }

  function outputStream(type, fd) {
    const decoder = new StringDecoder('utf8');
    const toText = (chunk, encoding) => {
      if (typeof chunk === 'string') {
        return !encoding || /^utf-?8$/i.test(encoding) ? chunk : decoder.write(Buffer.from(chunk, encoding));
      }
      return decoder.write(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    };
    const stream = new Writable({
      write(chunk, encoding, callback) {
        const text = toText(chunk, encoding);
        if (text) sendText(type, text);
        callback();
      },
    });
    // The usual path (console.log, process.stdout.write) skips the stream's state machine.
    stream.write = function write(chunk, encoding, callback) {
      if (typeof encoding === 'function') {
        callback = encoding;
        encoding = undefined;
      }
      const text = toText(chunk, encoding);
      if (text) sendText(type, text);
      if (typeof callback === 'function') process.nextTick(callback);
      return true;
    };
    Object.assign(stream, { fd, isTTY: false });
    return stream;
  }
  for (const [name, fd] of [['stdout', 1], ['stderr', 2]]) {
    const stream = outputStream(name, fd);
    Object.defineProperty(process, name, { configurable: true, enumerable: true, get: () => stream });
  }

  // Cells see a require() resolving from the working directory (as `node -e` code does).
  globalThis.require = Module.createRequire(path.join(process.cwd(), '[cell]'));

  // ------------------------------------------------------------------ messages

  function inspect(value) {
    return util.inspect(value);
  }

  // Drops the kernel's own frames (inspector, vm, trampoline) from a stack.
  function userStack(stack) {
    const lines = String(stack).split('\n');
    const cut = lines.findIndex((line) =>
      /\((node:inspector|node:vm):|at (Session\.post|Script\.runInThisContext) |boxlite-kernel-trampoline/.test(line),
    );
    return (cut < 0 ? lines : lines.slice(0, cut)).join('\n');
  }

  function errorMessage(thrown, where) {
    if (thrown instanceof CellExit) {
      const { message, status } = thrown;
      return status ? { type: 'error', name: 'Exit', value: message, traceback: '', exit_code: status } : null;
    }
    if (util.types.isNativeError(thrown) || thrown instanceof Error) {
      let value = String(thrown.message);
      if (thrown.code === 'ERR_VM_DYNAMIC_IMPORT_CALLBACK_MISSING' || value === 'Invalid host defined options') {
        value += ' (dynamic import() is not available in cells; use require())';
      }
      const traceback = userStack(thrown.stack || `${thrown.name}: ${thrown.message}`);
      return { type: 'error', name: String(thrown.name), value, traceback: where ? `${where}\n\n${traceback}` : traceback };
    }
    const text = typeof thrown === 'string' ? thrown : inspect(thrown);
    return { type: 'error', name: 'Error', value: text, traceback: `Uncaught ${inspect(thrown)}` };
  }

  // process.exit() in a cell ends the cell, not the kernel (as sys.exit() does in Python):
  // status 0 is a plain end, another one an "Exit" error with that exit_code.
  class CellExit extends Error {
    constructor(code) {
      super(`process.exit(${code === undefined ? '' : code})`);
      const status = code === undefined ? 0 : Number(code);
      this.status = Number.isInteger(status) ? status : 1;
    }
  }
  const exitProcess = process.exit;
  process.exit = function exit(code) {
    if (!current) return exitProcess.call(process, code);
    throw new CellExit(code);
  };

  function interrupted() {
    const value = 'execution interrupted by SIGINT';
    return { type: 'error', name: 'Interrupted', value, traceback: `Interrupted: ${value}` };
  }

  // Runs fn() so that SIGINT stops it (vm throws ERR_SCRIPT_EXECUTION_INTERRUPTED).
  function interruptible(fn) {
    slot.call = fn;
    try {
      return TRAMPOLINE.runInThisContext({ breakOnSigint: true, displayErrors: false });
    } finally {
      slot.call = null;
    }
  }

  // ------------------------------------------------------------------ engines
  // evaluate(code, filename, done): done(threw, value, where) once, unless interrupted.

  function openSession() {
    if (process.env.BOXLITE_NODE_KERNEL_NO_INSPECTOR) return null;
    try {
      const inspector = require('inspector');
      const session = new inspector.Session();
      session.connect();
      return session;
    } catch {
      return null; // a node built without the inspector
    }
  }
  const session = openSession();

  // The JS value behind an inspector RemoteObject.
  function materialize(remote, done) {
    if (!remote || remote.type === 'undefined') return done(undefined);
    if (remote.objectId) {
      const functionDeclaration = "function () { 'use strict'; globalThis[Symbol.for('boxlite.kernel')].value = this; }";
      session.post('Runtime.callFunctionOn', { objectId: remote.objectId, functionDeclaration, silent: true }, () => {
        const value = slot.value;
        slot.value = undefined;
        done(value);
      });
      return undefined;
    }
    if ('unserializableValue' in remote) {
      const text = remote.unserializableValue;
      return done(text.endsWith('n') ? BigInt(text.slice(0, -1)) : Number(text));
    }
    return done(remote.value);
  }

  function evaluateRepl(code, filename, done) {
    const params = {
      expression: `${code}\n//# sourceURL=${filename}`,
      replMode: true,
      silent: true,
      objectGroup: OBJECT_GROUP,
    };
    interruptible(() =>
      session.post('Runtime.evaluate', params, (err, response) => {
        if (err) return done(true, err);
        const details = response.exceptionDetails;
        materialize(details ? details.exception : response.result, (value) => {
          session.post('Runtime.releaseObjectGroup', { objectGroup: OBJECT_GROUP });
          let where = '';
          if (details && util.types.isNativeError(value) && value.name === 'SyntaxError') {
            where = `${filename}:${details.lineNumber + 1}:${details.columnNumber + 1}`;
          }
          done(Boolean(details), details && !details.exception ? new Error(details.text) : value, where);
        });
        return undefined;
      }),
    );
  }

  function evaluateScript(code, filename, done) {
    let value;
    try {
      const script = new vm.Script(code, { filename });
      value = script.runInThisContext({ breakOnSigint: true, displayErrors: false });
    } catch (err) {
      if (err && err.code === INTERRUPTED) throw err;
      return done(true, err);
    }
    return done(false, value);
  }

  const evaluate = session ? evaluateRepl : evaluateScript;

  // An object literal at the start reads as a block; evaluate `{a: 1}` as a value, as a REPL does.
  function prepare(code) {
    if (/^\s*\{/.test(code) && !/;\s*$/.test(code)) {
      try {
        new vm.Script(`(${code}\n)`);
        return `(${code}\n)`;
      } catch {
        // not an expression: keep the block
      }
    }
    return code;
  }

  // ------------------------------------------------------------------ runs

  let executionCount = 0;
  let current = null;
  let stdinEnded = false;
  let wasInterrupted = false;
  const queue = [];

  function takeLingeringSigint() {
    try {
      LINGERING_SIGINT.runInThisContext({ breakOnSigint: true });
    } catch (err) {
      if (err.code !== INTERRUPTED) throw err;
    }
  }

  function start(request) {
    const run = { id: request.id, finished: false };
    current = run;
    run.finish = (error) => {
      if (run.finished) return;
      run.finished = true;
      if (error) send(error);
      wasInterrupted = Boolean(error && error.name === 'Interrupted');
      send({ type: 'done', id: run.id, execution_count: run.count });
      current = null;
      setImmediate(next);
    };
    if (request.op !== 'run' || typeof request.code !== 'string') {
      run.count = executionCount;
      const value = `bad request: expected {"op": "run", "id": ..., "code": "<string>"}`;
      run.finish({ type: 'error', name: 'KernelError', value, traceback: value });
      return;
    }
    executionCount += 1;
    run.count = executionCount;
    const onDone = (threw, value, where) => {
      if (run.finished) return;
      if (threw) return run.finish(errorMessage(value, where));
      if (value !== undefined) {
        let text;
        try {
          text = inspect(value);
        } catch (err) {
          return run.finish(errorMessage(err));
        }
        send({ type: 'result', data: { 'text/plain': text }, main: true });
      }
      return run.finish(null);
    };
    try {
      evaluate(prepare(request.code), `cell-${run.count}`, onDone);
    } catch (err) {
      run.finish(err && err.code === INTERRUPTED ? interrupted() : errorMessage(err));
    }
  }

  function next() {
    if (current) return;
    if (wasInterrupted) {
      wasInterrupted = false;
      takeLingeringSigint();
    }
    while (queue.length) {
      const request = parse(queue.shift());
      if (request) return start(request);
    }
    if (stdinEnded) process.exit(0);
  }

  // Lines are parsed when their turn comes, so a complaint lands between runs.
  function parse(line) {
    if (!line.trim()) return null;
    try {
      const request = JSON.parse(line);
      return request !== null && typeof request === 'object' ? request : {};
    } catch (err) {
      send({ type: 'stderr', text: `boxlite kernel: ignored a request that is not JSON (${err.message})\n` });
      return null;
    }
  }

  function receive(line) {
    queue.push(line);
    next();
  }

  // SIGINT while a cell awaits: stop waiting (the cell's promise is left behind).
  process.on('SIGINT', () => {
    if (current) current.finish(interrupted());
  });
  // An error thrown by a callback while a cell awaits ends that cell; otherwise it is reported.
  process.on('uncaughtException', (err) => {
    if (current) current.finish(errorMessage(err));
    else send({ type: 'stderr', text: `Uncaught ${inspect(err)}\n` });
  });
  // Should the process end during a run anyway (stdin closed and nothing left to wait for but
  // the cell's promise), the run still gets its done.
  process.on('exit', (code) => {
    const value = `the kernel exited (status ${code}) with the cell still running`;
    if (current) current.finish({ type: 'error', name: 'Exit', value, traceback: '', exit_code: code });
  });
  process.on('unhandledRejection', (reason) => {
    send({ type: 'stderr', text: `Uncaught (in promise) ${inspect(reason)}\n` });
  });

  const decoder = new StringDecoder('utf8');
  let pending = '';
  // Requests come on the real stdin; cells see an empty one (as /dev/null), so that reading
  // process.stdin in a cell cannot swallow the next requests.
  const requests = process.stdin;
  const emptyStdin = Readable.from([]);
  Object.defineProperty(process, 'stdin', { configurable: true, enumerable: true, get: () => emptyStdin });
  requests.on('data', (chunk) => {
    pending += decoder.write(chunk);
    let end;
    while ((end = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, end);
      pending = pending.slice(end + 1);
      receive(line);
    }
  });
  requests.on('end', () => {
    receive(pending + decoder.end());
    pending = '';
    stdinEnded = true;
    next();
  });

  send({ type: 'ready', language: 'node', version: process.versions.node, pid: process.pid });
})();
