"""The ranking a serving process does on a user's catalog, as its config describes it."""

from __future__ import annotations

from leanrec.funnel.catalog import CatalogFunnel
from leanrec.retrieval.index import RetrievalIndex
from leanrec.schema import FeatureSet
from leanrec.serve.config import ConfigError, ServeConfig
from leanrec.stores.loading import open_catalog_store


def catalog_funnel(config: ServeConfig, fs: FeatureSet) -> CatalogFunnel | None:
    """The funnel over ``config.features_url`` (None without one: the process only logs).

    Raises:
        ConfigError: The retrieval index or the checkpoint cannot be used with ``fs``, or the model
            needs torch and it is not installed.
        ConnectionError: The FeatureStore does not answer.

    """
    if not config.features_url:
        return None
    index = RetrievalIndex.load(config.retrieval) if config.retrieval else None
    scorer, model_fs = None, None
    if config.model:
        try:
            from leanrec.models.scorer import ModelScorer
            from leanrec.train.trainer import load_checkpoint
        except ImportError:
            raise ConfigError(
                f"serving the model {config.model} needs torch: pip install 'leanrec[train]'"
            ) from None
        model = load_checkpoint(config.model, fs)  # refuses a model that cannot read fs's features
        scorer, model_fs = ModelScorer(model), model.fs
    return CatalogFunnel(
        fs,
        open_catalog_store(config.features_url, fs),
        index,
        scorer,
        model_fs,
        n_retrieve=config.n_retrieve,
        n_rank=config.n_rank,
    )
