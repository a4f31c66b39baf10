"""The measuring world: a tiny SD1-architecture model on real handwritten digits, concept LoRAs, judges.

See ``lib_loraclr/world/README.md`` for the design, the numbers and the regeneration command. Modules:
`data` (digits, scenes, captions), `vocab` (triggers, word tokenizer), `model` (the training model),
`concepts` (concept definitions), `judges` (classifier + identity), `assets` (loading the committed
files as a `SD1Model` and `DeltaSet` s), `evaluate` (scene scoring used by ``bench/quality.py``).
"""
