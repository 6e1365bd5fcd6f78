"""One small module per backend, each exposing ``load(source, device, **options) -> Engine``."""
