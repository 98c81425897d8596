"""fedxray shared code: config, data, transforms, models, training, metrics, bundle, explanations."""

__version__ = "0.1.0"
