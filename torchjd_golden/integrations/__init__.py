"""
The trainer integrations, one module each, imported on demand (each imports its trainer, an
optional dependency, which ``import torchjd_golden`` never does):

- :mod:`torchjd_golden.integrations.lightning`: ``MultiTaskModule``, a ``LightningModule``
  (``pip install 'torchjd-golden[lightning]'``);
- :mod:`torchjd_golden.integrations.huggingface`: ``MultiTaskTrainer``, a Transformers
  ``Trainer`` (``pip install 'torchjd-golden[huggingface]'``).

They stand on :mod:`torchjd_golden.step`. ``torchjd_golden.lightning`` and
``torchjd_golden.huggingface`` are the same modules under their earlier names.
"""
