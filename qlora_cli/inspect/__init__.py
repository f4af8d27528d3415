"""``qlora inspect``: a config's plan, a dataset as the model sees it (``report``), an adapter (``adapter``)."""
