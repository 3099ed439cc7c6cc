"""The access log writer: one line per request, to a file or standard output.

Theory of operation
-------------------
`AccessLog` is a logging.Handler installed on the "doproxy.access" logger with propagation
off, so access lines never reach the error log (stderr) and the error log's level
(`--log-level`) does not filter them. The data plane does not go through logging for each
request, though: a LogRecord, the logger's checks and the handler lock cost about 6 µs a line
on this kind of machine before any formatting, a third of a proxied request. It calls
`request()`, which formats the line (doproxy/core/access_log.py) and hands it to a buffered
stream: about 3 µs a line in the combined format and 5 µs in JSON, plus 1 to 2 µs in the data
plane to pick the fields out of the request head (measured with a browser's User-Agent).
Anything else logged to "doproxy.access" still lands in the same place through `emit`.

Lines sit in the stream's buffer until it fills or until FLUSH_EVERY after the first line since
the last flush, so `tail -f` sees them within about a second and an idle proxy makes no system
call at all. `close()` (shutdown, or a reload that changes the access log) flushes what is left;
logging's own shutdown flushes every handler at exit too.

SIGUSR1 calls `reopen()`, as nginx does for logrotate: whatever is buffered goes to the old
(renamed) file, then the configured path is opened anew. A file that cannot be reopened leaves
the old one in use, with an error saying what to do.

Everything here runs on the event loop's thread; `emit` alone takes the handler's lock, for a
record logged from another thread.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Final, Protocol, TextIO

from doproxy.core.access_log import Timestamps, as_json, combined, escape

log = logging.getLogger(__name__)

LOGGER: Final = "doproxy.access"
FLUSH_EVERY: Final = 1.0  # seconds a line may wait in the buffer
# Big enough that a busy proxy makes a write system call per few hundred lines, not per line.
BUFFER_BYTES: Final = 64 * 1024


class AccessLog(logging.Handler):
    """Writes access lines in `fmt` ("combined" or "json") to `path`, or to `stream` (standard
    output by default) when `path` is None. Opening the file raises OSError."""

    def __init__(self, fmt: str, path: Path | None = None, stream: TextIO | None = None) -> None:
        super().__init__(logging.INFO)
        self.fmt = fmt
        self.path = path
        self._json = fmt == "json"
        self._stream: TextIO = self._open(path) if path is not None else (stream or sys.stdout)
        self._owned = path is not None  # a stream we opened, and so close
        self._stamps = Timestamps()
        self._clock = time.time  # wall clock: log lines carry the date
        self._flush_timer: asyncio.TimerHandle | None = None
        self._failing = False  # a write failed and that was logged; quiet until one succeeds
        self._closed = False

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "standard output"

    @staticmethod
    def _open(path: Path) -> TextIO:
        # Append, so a restart and other writers never truncate it; every line is ASCII, the
        # error handler is for a record someone else logged here.
        return open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=BUFFER_BYTES)

    # --- the data plane's call -----------------------------------------------------------------

    def request(
        self,
        client: bytes,
        method: bytes,
        target: bytes,
        version: bytes,
        status: int,
        sent: int,
        referer: bytes | None,
        user_agent: bytes | None,
        duration: float,
        backend: str | None,
        retries: int,
    ) -> None:
        """One finished (or refused) request. `method` empty: its request line is unknown."""
        now = self._clock()
        if self._json:
            line = as_json(
                self._stamps.iso(now),
                client,
                method,
                target,
                version,
                status,
                sent,
                referer,
                user_agent,
                duration,
                backend,
                retries,
            )
        else:
            line = combined(
                self._stamps.clf(now),
                client,
                method,
                target,
                version,
                status,
                sent,
                referer,
                user_agent,
                duration,
                backend,
            )
        self.write(line)

    def write(self, line: str) -> None:
        """Buffer one line (it must hold no line break) and make sure a flush follows soon."""
        if self._closed:
            return  # a record logged after shutdown
        try:
            self._stream.write(line + "\n")
        except (OSError, ValueError) as e:
            self._failed(e)
            return
        if self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: nobody would flush later
                self.flush()
                return
            self._flush_timer = loop.call_later(FLUSH_EVERY, self._flush_due)

    def _flush_due(self) -> None:
        self._flush_timer = None
        self.flush()

    def _failed(self, e: Exception) -> None:
        if self._failing:
            return  # said once; the next success re-arms it
        self._failing = True
        log.error(
            "access log: cannot write to %s (%s): lines are being lost; free disk space or fix "
            "the file's permissions, then send SIGUSR1 to reopen it",
            self.where,
            e,
        )

    # --- logging.Handler ---------------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        """A record logged to "doproxy.access" by anyone else: its message as one line."""
        try:
            message = record.getMessage()
        except Exception:
            self.handleError(record)
            return
        # Escaped like a client's bytes, so a message cannot add a line either.
        self.write(escape(message.encode("utf-8", "backslashreplace")))

    def flush(self) -> None:
        if self._closed:
            return  # logging's shutdown flushes every handler again at exit
        try:
            self._stream.flush()
        except (OSError, ValueError) as e:
            self._failed(e)
        else:
            self._failing = False

    def reopen(self) -> bool:
        """SIGUSR1 (logrotate): finish the old file, then open the configured path anew.
        Returns False (still writing to the old file) when the new one cannot be opened."""
        if self.path is None:
            self.flush()  # standard output has nothing to reopen
            return True
        try:
            fresh = self._open(self.path)
        except OSError as e:
            log.error(
                "access log: cannot reopen %s (%s); still writing to the old file. Make sure "
                "its folder exists and is writable, then send SIGUSR1 again",
                self.path,
                e.strerror or e,
            )
            return False
        old, self._stream = self._stream, fresh
        self._close_stream(old)
        return True

    def close(self) -> None:
        """Flush what is buffered; close the file (never standard output)."""
        if self._closed:
            return
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._owned:
            self._close_stream(self._stream)
        else:
            self.flush()
        self._closed = True
        super().close()

    def _close_stream(self, stream: TextIO) -> None:
        try:
            stream.close()  # flushes first
        except (OSError, ValueError) as e:
            self._failed(e)


class Served(Protocol):
    """What writes access lines: a listener (ProxyServer) and who runs it keep the same one."""

    access: AccessLog | None


def switch(holders: tuple[Served, ...], access: AccessLog | None) -> None:
    """Make `access` the running access log of every holder (the first one's is the one it
    replaces) and of the "doproxy.access" logger; flush and close the one it replaces."""
    old = holders[0].access
    if access is old:
        return
    install(access)
    for holder in holders:
        holder.access = access
    if old is not None:
        old.close()


def install(access: AccessLog | None) -> None:
    """Make `access` the one handler of the "doproxy.access" logger (None: remove it)."""
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        if isinstance(h, AccessLog):
            logger.removeHandler(h)
    if access is None:
        logger.propagate = True
        return
    logger.addHandler(access)
    logger.propagate = False  # access lines stay out of the error log
    logger.setLevel(logging.INFO)
