"""ensemble: k-fold timm/torchvision backbones, cached out-of-fold logits, honest combiners.

Entry points: ``python -m ensemble.fit RECIPE``, ``python -m ensemble.predict RUN INPUT...``,
``python -m ensemble.report RUN``, ``python -m ensemble.bench NAME``.
"""

__version__ = "0.1.0"
