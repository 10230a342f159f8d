"""Turns feedback into training data, trains LoRA adapters with TRL, evaluates and gates them.

Pure cores: ``pairs`` (feedback -> TRL rows), ``gate`` (eval report -> decision),
``policy`` (should we train now). I/O shells: ``models`` (fetch/convert the base model),
``job`` (the training subprocess), ``cycle`` (one whole run), ``schedule`` (APScheduler).
Imports ``feedback``, never ``server``.
"""
