"""Training: one loop (`loop`) running PLIP pre-training (`plip*`), the assistant's stages (`trainer`) and
stage slide (`slide`); see docs/training.md.

Assistant API: `pallava.train.config.load_recipe`, `pallava.train.trainer.train` / `AssistantTask`,
`pallava.train.export.export_model`, `pallava.train.feature_cache.FeatureCache`, `pallava.train.checkpoints`.
Modules are imported on use so that `import pallava.train.plip` stays light.
"""
