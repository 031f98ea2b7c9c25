"""The serving side of logging: what a ranking service does after it ranks."""

from leanrec.serve.service import LoggingService, LoggingUnavailable, ServiceStats

__all__ = ["LoggingService", "LoggingUnavailable", "ServiceStats"]
