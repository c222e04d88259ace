"""Training: PLIP pre-training (`plip*`) and the assistant's two stages (`trainer`, see docs/training.md).

Assistant API: `pallava.train.config.load_recipe`, `pallava.train.trainer.train` / `Trainer`,
`pallava.train.export.export_model`, `pallava.train.feature_cache.FeatureCache`, `pallava.train.checkpoints`.
Modules are imported on use so that `import pallava.train.plip` stays light.
"""
