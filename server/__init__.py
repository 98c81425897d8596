"""The aggregator side: Flower ServerApp, strategy construction, global evaluation, checkpoints, launchers."""
