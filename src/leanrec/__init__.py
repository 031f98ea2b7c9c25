"""leanrec: lean data plumbing for feed recommenders.

A ranking service of one's own needs one import: :func:`open_logging` (see
:mod:`leanrec.serve.rankinglog`), and :func:`load_featureset` for its FeatureSet file.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_featureset", "open_logging"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``import leanrec`` stays cheap for the command line.
    if name == "open_logging":
        from leanrec.serve.rankinglog import open_logging

        return open_logging
    if name == "load_featureset":
        from leanrec.featurefile import load_featureset

        return load_featureset
    raise AttributeError(f"module 'leanrec' has no attribute {name!r}")
