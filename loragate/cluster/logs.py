"""Logging inside Ray worker processes: the `loragate` loggers get the level `--log-level` gave the
launcher and a handler on stderr (which Ray forwards to the driver's terminal), as in one server."""
from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    logger = logging.getLogger("loragate")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_loragate", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._loragate = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
