"""Offline training of the encoder: behaviour pairs (``pairs``), fine-tuning (``finetune``) and
the lexical baselines it is compared with (``baselines``). Never imported by the worker."""
