"""Whole-slide images: reading (`reader`), tissue detection (`tissue`), tile grids (`tiling`), the embedding
cache (`cache`), PLIP zero-shot maps (`mapping`, `heatmap`, `geojson`) and questions about regions (`ask`).

Submodules are imported directly (`from pallava.slides.reader import open_slide`) so that reading a slide
never loads torch or the models.
"""
