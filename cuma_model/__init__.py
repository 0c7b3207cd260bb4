"""cuma_model: the thin model layer of CuMA (config, router, adapted linear, patching, data, training, evaluation)."""
