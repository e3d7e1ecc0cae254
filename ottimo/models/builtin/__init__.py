"""The built-in model families, each one module with `build(spec, n_classes, **hparams)` (ottimo.models.family)."""
