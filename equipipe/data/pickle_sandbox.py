"""Unpickle untrusted molecule pickles in child processes that hand back plain arrays only.

:mod:`equipipe.data.safe_pickle` stops a pickle from *calling* anything outside its allow-list,
but an allow-listed ``rdkit.Chem.rdchem.Mol`` rebuilt from a corrupted binary string can still
crash RDKit's C++ code (a 540-byte GEOM pickle kills the process with SIGSEGV). So the parent
never unpickles such data and never touches an RDKit molecule built from it:

- :class:`Sandbox` keeps ``workers`` long-lived child processes (forked from a clean fork
  server, so no state of the parent is shared) under resource limits: address space ``memory_bytes`` (RLIMIT_AS), no core
  files, and a wall-clock limit per task enforced by the parent.
- A child unpickles with the restricted unpickler and replaces every RDKit molecule by plain
  data (:func:`plain`): ``{"__rdkit_mol__": True, "z": int64 (N,), "pos": float64 (N, 3) | None,
  "n_conformers": int}``; the rest of the object (dicts, lists, numbers, strings, NumPy
  arrays) is kept.
- The parent reads the reply with an unpickler that admits only plain data and NumPy arrays (not
  even RDKit molecules), so a child that misbehaved cannot reach the parent either.
- A child that crashes, exceeds its memory or its time yields ``SandboxError`` for that task
  alone (the caller quarantines the record with this reason) and is replaced; later tasks go on.
  A pickle the restricted unpickler refuses yields ``safe_pickle.RefusedPickle``.

Results come back in submission order, so stores stay deterministic.
"""

from __future__ import annotations

import collections
import io
import multiprocessing as mp
import os
import pickle
import signal
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from equipipe.data import safe_pickle

DEFAULT_MEMORY_BYTES = 4 << 30  # per child; an honest GEOM molecule needs a few MB
DEFAULT_TIMEOUT_S = 120.0  # per task


class SandboxError(RuntimeError):
    """One task failed in its child (crash, memory, time, refused pickle); the reason says how."""


# --------------------------------------------------------------------------------------------
# child side


def plain(obj: Any) -> Any:
    """``obj`` with every RDKit molecule replaced by its atoms and first conformer as arrays."""
    from rdkit import Chem

    if isinstance(obj, Chem.Mol):
        import numpy as np

        z = np.array([a.GetAtomicNum() for a in obj.GetAtoms()], dtype=np.int64)
        n_conf = obj.GetNumConformers()
        pos = np.asarray(obj.GetConformer().GetPositions(), dtype=np.float64) if n_conf else None
        return {"__rdkit_mol__": True, "z": z, "pos": pos, "n_conformers": n_conf}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    return obj


def _limit(memory_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _child(conn: Connection, memory_bytes: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    _limit(memory_bytes)
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", plain(safe_pickle.loads(data)))
        except safe_pickle.RefusedPickle as e:
            reply = ("refused", str(e))
        except MemoryError:
            reply = ("error", f"unpickling needs more than the {memory_bytes >> 20} MiB limit")
        except Exception as e:  # noqa: BLE001 - the reason goes back to the parent
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send_bytes(pickle.dumps(reply, protocol=5))
        except MemoryError:
            conn.send_bytes(pickle.dumps(("error", "result too large for the memory limit")))


# --------------------------------------------------------------------------------------------
# parent side


class _PlainUnpickler(safe_pickle.RestrictedUnpickler):
    """Plain data and NumPy arrays only: what a child is allowed to send back."""

    def find_class(self, module: str, name: str):
        if module == "rdkit.Chem.rdchem":
            raise safe_pickle.RefusedPickle("a sandbox reply may not hold RDKit objects")
        return super().find_class(module, name)


def _plain_loads(data: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class _Worker:
    def __init__(self, ctx, memory_bytes: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_child, args=(child, memory_bytes), daemon=True)
        self.proc.start()
        child.close()
        self.task: int | None = None

    def stop(self, kill: bool = False) -> None:
        if kill and self.proc.is_alive():
            self.proc.kill()
        self.conn.close()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class Sandbox:
    """``workers`` child processes that turn pickle bytes into plain data (see module doc).

    Use as a context manager; :meth:`map` streams ``(tag, result | SandboxError)`` in order.
    """

    def __init__(
        self,
        workers: int = 1,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.n, self.memory_bytes, self.timeout_s = workers, int(memory_bytes), float(timeout_s)
        self._ctx = _context()
        self._workers: list[_Worker] = []
        self.crashes = 0

    def __enter__(self) -> Sandbox:
        self._workers = [_Worker(self._ctx, self.memory_bytes) for _ in range(self.n)]
        return self

    def __exit__(self, *exc) -> None:
        for w in self._workers:
            w.stop(kill=exc[0] is not None)
        self._workers = []

    def _replace(self, w: _Worker) -> _Worker:
        w.stop(kill=True)
        new = _Worker(self._ctx, self.memory_bytes)
        self._workers[self._workers.index(w)] = new
        return new

    def map(self, items: Iterable[tuple[Any, bytes]]) -> Iterator[tuple[Any, Any]]:
        """For each ``(tag, pickle bytes)``: ``(tag, plain object)`` or ``(tag, SandboxError)``."""
        if not self._workers:
            raise RuntimeError("Sandbox.map outside its `with` block")
        source = iter(items)
        tags: dict[int, Any] = {}
        done: dict[int, Any] = {}
        started: dict[int, float] = {}
        order = collections.deque()
        next_id, exhausted = 0, False
        while True:
            for w in self._workers:  # keep every idle worker busy
                if w.task is None and not exhausted:
                    try:
                        tag, data = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    tags[next_id], w.task = tag, next_id
                    order.append(next_id)
                    started[next_id] = _now()
                    try:
                        w.conn.send_bytes(bytes(data))
                    except (BrokenPipeError, OSError):
                        pass  # the worker died; noticed below
                    next_id += 1
            while order and order[0] in done:  # in submission order
                i = order.popleft()
                yield tags.pop(i), done.pop(i)
            busy = [w for w in self._workers if w.task is not None]
            if not busy:
                if exhausted and not order:
                    return
                continue
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=1.0)
            for w in busy:
                i = w.task
                if w.conn in ready:
                    try:
                        status, value = _plain_loads(w.conn.recv_bytes())
                        if status == "ok":
                            done[i] = value
                        elif status == "refused":
                            done[i] = safe_pickle.RefusedPickle(value)
                        else:
                            done[i] = SandboxError(value)
                        w.task = None
                        continue
                    except (EOFError, OSError):
                        pass  # died while answering: handled as a crash
                    except Exception as e:  # noqa: BLE001 - a reply that is not plain data
                        done[i] = SandboxError(f"unusable reply from the unpickling child: {e}")
                        w.task = None
                        continue
                elif w.proc.sentinel not in ready:
                    if _now() - started[i] <= self.timeout_s:
                        continue
                    w.proc.kill()
                    w.proc.join()
                    done[i] = SandboxError(f"unpickling took longer than {self.timeout_s:g} s")
                    self._replace(w)
                    continue
                w.proc.join(timeout=5)
                self.crashes += 1
                done[i] = SandboxError(
                    f"the unpickling child {_describe_exit(w.proc.exitcode)} (corrupt or hostile "
                    "pickle; memory limit "
                    f"{self.memory_bytes >> 20} MiB)"
                )
                self._replace(w)


_CTX = None


def _context():
    """A forkserver context (children fork from a clean server with RDKit already imported:
    nothing of the parent is shared, and a replacement child starts in milliseconds)."""
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["equipipe.data.pickle_sandbox", "rdkit.Chem"])
        _CTX = ctx
    return _CTX


def _now() -> float:
    return os.times().elapsed
