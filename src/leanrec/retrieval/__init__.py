"""The retrieval stage on real interaction data: RecBole's atomic files, models, full-ranking metrics."""
