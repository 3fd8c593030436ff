"""hpt-dsl estimators inside other trainers: ``hpt_dsl.integrations.trl`` (a ``GRPOTrainer``
whose loss is a compiled recipe) and ``hpt_dsl.integrations.verl`` (a recipe registered as a
verl policy loss). Each module imports its trainer library on import; neither is a
dependency of hpt-dsl (``pip install "hpt-dsl[trl]"`` / ``"hpt-dsl[verl]"``)."""
