"""Offline evaluation on real models: model loading (more lands with the quality issue)."""
