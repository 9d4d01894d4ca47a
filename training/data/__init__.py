"""Training data sources: the Shapes World generator and friends."""
