"""Stage: scoring paraphrases -- the sentence embedder and its cache (``embedder``), the per-row metrics,
objective and rerank (``metrics``), the shared Ray actor that scores for every trial (``evaluator``), and the
side-by-side report of systems on held-out rows (``report``, which generates through ``generation``)."""
