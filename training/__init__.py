"""DREAM Studio training: data, recipes and evaluation."""
